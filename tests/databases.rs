//! Many databases and upstream roles under one budget: `[upstreams] databases` (names, renames, `*`),
//! `[[auth.users]] upstream_user`, pools per (service, route, database, role) that share their service's share
//! and the upstream ceiling, `max_pools`, pools closing when their database goes unused, and the migration
//! tool pattern (create a database, work in it, drop it) through the proxy.

mod common;
use common::*;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn setup(pg: &Pg, sql: &str) {
    let admin = connect(&pg.conninfo()).await.unwrap();
    // One statement per round trip: CREATE DATABASE refuses the implicit transaction of a multi-statement query.
    for stmt in sql.split(';') {
        admin.batch_execute(stmt).await.unwrap();
    }
}

fn db_error(e: &tokio_postgres::Error) -> (String, String, String) {
    let d = e.as_db_error().unwrap_or_else(|| panic!("not a server error: {e}"));
    (d.severity().to_owned(), d.code().code().to_owned(), d.message().to_owned())
}

/// Clients spread over 3 databases and 2 upstream roles of two services: sampled while the load runs, no
/// service ever holds more than its share and the upstream never more than its ceiling less `reserved`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shares_and_ceiling_hold_across_databases_and_roles() {
    let pg = Pg::start();
    setup(&pg, "create database db2; create database db3; create role r2 login password 'r2pw'").await;
    let cfg = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nmode = \"shared\"\nservice_from = \"user\"\n{LABEL}\
         [auth]\nmethod = \"scram-sha-256\"\n\
         [[auth.users]]\nname = \"a1\"\npassword_env = \"PW\"\nservice = \"a\"\n\
         [[auth.users]]\nname = \"a2\"\npassword_env = \"PW\"\nservice = \"a\"\nupstream_user = \"r2\"\nupstream_password_env = \"R2_PW\"\n\
         [[auth.users]]\nname = \"b1\"\npassword_env = \"PW\"\nservice = \"b\"\n\
         [[auth.users]]\nname = \"b2\"\npassword_env = \"PW\"\nservice = \"b\"\nupstream_user = \"r2\"\nupstream_password_env = \"R2_PW\"\n\
         [upstreams.primary]\nurl = \"{}\"\nceiling = 12\nreserved = 2\ndatabases = [\"postgres\", \"db2\", \"db3\"]\n\
         [services.a]\nslice = 6\ncheckout_timeout = \"20s\"\n[services.b]\nslice = 4\ncheckout_timeout = \"20s\"\n",
        pg.url()
    );
    let proxy = Proxy::start_env(&cfg, &[("PW", "pw"), ("R2_PW", "r2pw")]);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let starved = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for i in 0..36 {
        let user = ["a1", "a2", "b1", "b2"][i % 4];
        let db = ["postgres", "db2", "db3"][(i / 4) % 3];
        let conninfo = format!("host=127.0.0.1 port={} user={user} password=pw dbname={db}", proxy.port);
        let (stop, done, starved) = (stop.clone(), done.clone(), starved.clone());
        clients.push(tokio::spawn(async move {
            let c = connect(&conninfo).await.unwrap_or_else(|e| panic!("{user}@{db}: {e}"));
            let mut mine = 0;
            while !stop.load(Ordering::Relaxed) {
                c.simple_query("select pg_sleep(0.01)").await.unwrap_or_else(|e| panic!("{user}@{db}: {e}"));
                done.fetch_add(1, Ordering::Relaxed);
                mine += 1;
            }
            if mine == 0 {
                starved.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let admin = connect(&pg.conninfo()).await.unwrap();
    let (mut peak_a, mut peak_b, mut peak_all) = (0i64, 0i64, 0i64);
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let rows = admin
            .query(
                "select application_name, datname::text, usename::text from pg_stat_activity \
                 where application_name like 'pgbudget:%'",
                &[],
            )
            .await
            .unwrap();
        let count = |svc: &str| rows.iter().filter(|r| r.get::<_, String>(0) == format!("pgbudget:{svc}:rw")).count();
        peak_a = peak_a.max(count("a") as i64);
        peak_b = peak_b.max(count("b") as i64);
        peak_all = peak_all.max(rows.len() as i64);
        for r in &rows {
            seen.insert((r.get(1), r.get(2)));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert!(peak_a <= 6, "service a held {peak_a} > share 6");
    assert!(peak_b <= 4, "service b held {peak_b} > share 4");
    assert!(peak_all <= 10, "the upstream held {peak_all} > ceiling 12 - reserved 2");
    assert!(peak_a >= 5 && peak_b >= 3, "the load filled the shares (a {peak_a}, b {peak_b})");
    let dbs: BTreeSet<&str> = seen.iter().map(|(d, _)| d.as_str()).collect();
    let roles: BTreeSet<&str> = seen.iter().map(|(_, r)| r.as_str()).collect();
    assert_eq!(dbs, BTreeSet::from(["db2", "db3", "postgres"]), "{seen:?}");
    assert_eq!(roles, BTreeSet::from(["postgres", "r2"]), "{seen:?}");
    let (done, starved) = (done.load(Ordering::Relaxed), starved.load(Ordering::Relaxed));
    eprintln!("queries done: {done} by 36 clients over 12 pools (2 shares of 6 and 4)");
    assert_eq!(starved, 0, "every client got servers ({done} queries)");
    assert!(done > 1000, "the pools kept serving while they traded slots: {done} queries in 5 s");
}

/// Four pools of one service trade a share of 2 all the time (each checkout on one database closes an idle
/// server of the other to make room). A closed server's slot is free only once its backend is gone: sampled in
/// a tight loop while the pools trade, Postgres never runs more than 2 backends of the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_closed_servers_slot_is_free_only_once_its_backend_has_exited() {
    let pg = Pg::start();
    setup(&pg, "create database db2; create database db3; create database db4").await;
    let cfg = config(&pg, "[services.app]\nslice = 2\ncheckout_timeout = \"20s\"\n")
        .replace("reserved = 2\n", "reserved = 2\ndatabases = [\"postgres\", \"db2\", \"db3\", \"db4\"]\n");
    let proxy = Proxy::start(&cfg);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for i in 0..8 {
        let db = ["postgres", "db2", "db3", "db4"][i % 4];
        let conninfo = format!("host=127.0.0.1 port={} user=postgres password={PG_PASSWORD} dbname={db}", proxy.port);
        let (stop, done) = (stop.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            let c = connect(&conninfo).await.unwrap_or_else(|e| panic!("{db}: {e}"));
            while !stop.load(Ordering::Relaxed) {
                c.simple_query("select 1").await.unwrap_or_else(|e| panic!("{db}: {e}"));
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let admin = connect(&pg.conninfo()).await.unwrap();
    let (mut peak, mut samples, mut pids) = (0usize, 0u64, BTreeSet::new());
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let rows = admin
            .query("select pid from pg_stat_activity where application_name = 'pgbudget:app:rw'", &[])
            .await
            .unwrap();
        peak = peak.max(rows.len());
        pids.extend(rows.iter().map(|r| r.get::<_, i32>(0)));
        samples += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let done = done.load(Ordering::Relaxed);
    let opened = pids.len();
    eprintln!("{done} queries, {opened} backends seen, {samples} samples of pg_stat_activity, peak {peak}");
    assert!(done > 200, "the pools kept serving: {done} queries in 4 s");
    assert!(opened > 50, "the pools traded the share: {opened} backends seen");
    assert!(peak <= 2, "Postgres ran {peak} backends of a service whose share is 2 ({samples} samples)");
}

/// What a migration tool does: on `postgres`, CREATE DATABASE; connect to it, work; disconnect; DROP it — all
/// through pgbudget, with the same user. Also a session on `template1` before a CREATE DATABASE (which copies
/// template1 and needs it free).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_tool_creates_works_in_and_drops_a_database() {
    let pg = Pg::start();
    let cfg = config(&pg, "[services.app]\nslice = 4\n").replace("reserved = 2\n", "reserved = 2\ndatabases = \"*\"\n");
    let proxy = Proxy::start(&cfg);
    let at = |db: &str| format!("host=127.0.0.1 port={} user=postgres password={PG_PASSWORD} dbname={db}", proxy.port);
    let main = connect(&at("postgres")).await.unwrap();
    let t1 = connect(&at("template1")).await.unwrap();
    let db: String = t1.query_one("select current_database()::text", &[]).await.unwrap().get(0);
    assert_eq!(db, "template1");
    drop(t1);
    main.batch_execute("create database mig_x").await.unwrap();
    {
        let x = connect(&at("mig_x")).await.unwrap();
        x.batch_execute("create table t (id int); insert into t select generate_series(1, 10)").await.unwrap();
        let n: i64 = x.query_one("select count(*) from t", &[]).await.unwrap().get(0);
        assert_eq!(n, 10);
    }
    let started = Instant::now();
    main.batch_execute("drop database mig_x").await.expect("DROP DATABASE finds no pgbudget session in it");
    assert!(started.elapsed() < Duration::from_secs(5), "DROP waited {:?}", started.elapsed());
    let direct = connect(&pg.conninfo()).await.unwrap();
    let left: i64 =
        direct.query_one("select count(*) from pg_database where datname = 'mig_x'", &[]).await.unwrap().get(0);
    assert_eq!(left, 0);
    // A database the upstream does not have: Postgres's own answer, passed through.
    let err = connect(&at("no_such_db")).await.unwrap_err();
    assert_eq!(db_error(&err).1, "3D000");
}

/// Renames, a user mapped to its own upstream role, and a database that is not served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renames_roles_and_unserved_databases() {
    let pg = Pg::start();
    setup(&pg, "create database db2; create role r2 login password 'r2pw'").await;
    let cfg = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nservice = \"app\"\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\nusers = [\"postgres\"]\n\
         [auth]\nmethod = \"scram-sha-256\"\n\
         [[auth.users]]\nname = \"postgres\"\npassword_env = \"PG_PW\"\n\
         [[auth.users]]\nname = \"alt\"\npassword_env = \"ALT_PW\"\nupstream_user = \"r2\"\nupstream_password_env = \"R2_PW\"\n\
         [upstreams.primary]\nurl = \"{}\"\nceiling = 20\ndatabases = [\"app -> postgres\", \"db2\"]\n\
         [services.app]\nslice = 4\n",
        pg.url(),
        admin = free_port(),
    );
    let admin_port: u16 = cfg.split("127.0.0.1:").nth(2).unwrap().split('"').next().unwrap().parse().unwrap();
    let proxy = Proxy::start_env(&cfg, &[("PG_PW", PG_PASSWORD), ("ALT_PW", "alt-pw"), ("R2_PW", "r2pw")]);
    let at = |user: &str, pw: &str, db: &str| {
        format!("host=127.0.0.1 port={} user={user} password={pw} dbname={db}", proxy.port)
    };
    let who = |c: tokio_postgres::Client| async move {
        let r = c.query_one("select current_database()::text, current_user::text", &[]).await.unwrap();
        (r.get::<_, String>(0), r.get::<_, String>(1))
    };
    let app = connect(&at("postgres", PG_PASSWORD, "app")).await.unwrap();
    assert_eq!(who(app).await, ("postgres".into(), "postgres".into()));
    let alt = connect(&at("alt", "alt-pw", "db2")).await.unwrap();
    let alt2 = connect(&at("alt", "alt-pw", "db2")).await.unwrap();
    assert_eq!(who(alt).await, ("db2".into(), "r2".into()));
    for db in ["db3", "postgres"] {
        let err = connect(&at("postgres", PG_PASSWORD, db)).await.unwrap_err();
        let (sev, code, msg) = db_error(&err);
        assert_eq!((sev.as_str(), code.as_str()), ("FATAL", "3D000"), "{db}: {msg}");
        assert!(msg.contains(db) && msg.contains("not served"), "{msg}");
    }
    // Both pools show with their database and role; alt2 still holds its session open.
    let body = http_get(admin_port, "/pools").await;
    let pools: serde_json::Value = serde_json::from_str(&body).unwrap();
    let rows: Vec<(String, String)> = pools["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["database"].as_str().unwrap().to_owned(), p["role"].as_str().unwrap().to_owned()))
        .collect();
    assert!(rows.contains(&("postgres".into(), "postgres".into())) && rows.contains(&("db2".into(), "r2".into())));
    let console =
        connect(&format!("host=127.0.0.1 port={} user=postgres password={PG_PASSWORD} dbname=pgbudget", proxy.port))
            .await
            .unwrap();
    let show = console.simple_query("SHOW POOLS").await.unwrap();
    let listed: Vec<(String, String)> = show
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((r.get("database").unwrap().to_owned(), r.get("user").unwrap().to_owned()))
            }
            _ => None,
        })
        .collect();
    assert!(listed.contains(&("db2".into(), "r2".into())), "{listed:?}");
    drop(alt2);
}

async fn http_get(port: u16, path: &str) -> String {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        pgbudget::admin::probe::get(addr, &path, Duration::from_secs(5)).unwrap()
    })
    .await
    .unwrap()
}

/// `max_pools` caps the pools (53300 past it); a pool of a database nobody uses closes, making room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_pools_refuses_then_unused_pools_close() {
    let pg = Pg::start();
    setup(&pg, "create database db2; create database db3").await;
    let cfg = config(&pg, "[services.app]\nslice = 4\nserver_idle_timeout = \"1s\"\n")
        .replace("drain_timeout", "max_pools = 2\ndrain_timeout")
        .replace("reserved = 2\n", "reserved = 2\ndatabases = \"*\"\n");
    let (cfg, admin_port) = with_admin(cfg);
    let proxy = Proxy::start(&cfg);
    let metric = |name: &'static str, labels: &'static [(&'static str, &'static str)]| async move {
        let text = http_get(admin_port, "/metrics").await;
        sample(&text, name, labels).unwrap_or(-1.0)
    };
    let at = |db: &str| format!("host=127.0.0.1 port={} user=postgres password={PG_PASSWORD} dbname={db}", proxy.port);
    let direct = connect(&pg.conninfo()).await.unwrap();
    let backends_in = |db: &'static str| {
        let direct = &direct;
        async move {
            let n: i64 = direct
                .query_one(
                    "select count(*) from pg_stat_activity where datname = $1 and pid <> pg_backend_pid()",
                    &[&db],
                )
                .await
                .unwrap()
                .get(0);
            n
        }
    };
    {
        let c2 = connect(&at("db2")).await.unwrap();
        c2.simple_query("select 1").await.unwrap();
        // The default pool plus db2's: the cap. A third database is refused while db2's pool lives.
        let err = connect(&at("db3")).await.unwrap_err();
        let (sev, code, msg) = db_error(&err);
        assert_eq!((sev.as_str(), code.as_str()), ("FATAL", "53300"), "{msg}");
        assert!(msg.contains("max_pools"), "{msg}");
        assert_eq!(backends_in("db2").await, 1);
        assert_eq!(metric("pgbudget_pools", &[]).await, 2.0);
        let refused = metric("pgbudget_client_connections_rejected_total", &[("reason", "max_pools")]).await;
        assert_eq!(refused, 1.0);
    }
    // db2's client is gone: its idle server closes within other_database_idle_timeout (1 s) ...
    let deadline = Instant::now() + Duration::from_secs(6);
    while backends_in("db2").await > 0 {
        assert!(Instant::now() < deadline, "db2's idle server was not closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... and its pool after server_idle_timeout unused, so db3 gets one.
    let deadline = Instant::now() + Duration::from_secs(8);
    let c3 = loop {
        match connect(&at("db3")).await {
            Ok(c) => break c,
            Err(e) => {
                assert_eq!(db_error(&e).1, "53300", "{e}");
                assert!(Instant::now() < deadline, "db2's pool never closed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let db: String = c3.query_one("select current_database()::text", &[]).await.unwrap().get(0);
    assert_eq!(db, "db3");
}

/// The databases an upstream serves change on reload (no restart): a new name is served at once, a removed
/// one is refused, and the pools that stay keep their connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn databases_change_on_reload() {
    let pg = Pg::start();
    setup(&pg, "create database db2").await;
    let cfg = config(&pg, "[services.app]\nslice = 4\n");
    let proxy = Proxy::start(&cfg);
    let at = |db: &str| format!("host=127.0.0.1 port={} user=postgres password={PG_PASSWORD} dbname={db}", proxy.port);
    let main = connect(&at("postgres")).await.unwrap();
    let before: i32 = main.query_one("select pg_backend_pid()", &[]).await.unwrap().get(0);
    assert_eq!(db_error(&connect(&at("db2")).await.unwrap_err()).1, "3D000");
    let path = proxy.dir.path().join("budgets.toml");
    let reload = |text: String| {
        std::fs::write(&path, text).unwrap();
        let st = std::process::Command::new("kill").args(["-HUP", &proxy.pid().to_string()]).status().unwrap();
        assert!(st.success());
    };
    reload(cfg.replace("reserved = 2\n", "reserved = 2\ndatabases = [\"postgres\", \"db2\"]\n"));
    let deadline = Instant::now() + Duration::from_secs(5);
    let c2 = loop {
        match connect(&at("db2")).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "db2 not served after reload: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let db: String = c2.query_one("select current_database()::text", &[]).await.unwrap().get(0);
    assert_eq!(db, "db2");
    // The default pool kept its server: the same backend answers (transaction mode, one idle server).
    let after: i32 = main.query_one("select pg_backend_pid()", &[]).await.unwrap().get(0);
    assert_eq!(before, after, "the pool that stayed kept its connection");
    drop(c2);
    reload(cfg.clone());
    let deadline = Instant::now() + Duration::from_secs(5);
    while connect(&at("db2")).await.is_ok() {
        assert!(Instant::now() < deadline, "db2 still served after it was removed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(proxy.log().contains("configuration reloaded"), "{}", proxy.log());
}
