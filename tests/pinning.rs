//! Transaction mode's pins and named statements, as an operator sees them while they happen: `SHOW CLIENTS`
//! names why a client is pinned, `/metrics` counts pins by reason and shows pinned clients per pool, `/pools`
//! carries the same, and `SHOW PREPARED` lists the pool's statements without their constants.

mod common;
use common::*;

async fn get(port: u16, path: &str) -> String {
    reqwest::get(format!("http://127.0.0.1:{port}{path}")).await.unwrap().text().await.unwrap()
}

fn console(proxy: &Proxy, cmd: &str) -> String {
    let out = psql(&proxy.conninfo().replace("dbname=postgres", "dbname=pgbudget"), &["-A", "-F", "|", "-c", cmd]);
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listening_client_is_shown_pinned_until_it_unlistens() {
    let pg = Pg::start();
    let (cfg, port) = with_admin(config(&pg, "[services.app]\nslice = 2\ncheckout_timeout = \"500ms\"\n"));
    let proxy = Proxy::start(&cfg);
    let sr = [("service", "app"), ("route", "rw")];
    let a = connect(&proxy.conninfo()).await.unwrap();
    a.batch_execute("LISTEN chan").await.unwrap();
    // While A is pinned: SHOW CLIENTS says why, the gauge and /pools count it, the counter counted one pin.
    let clients = console(&proxy, "SHOW CLIENTS");
    assert!(clients.lines().any(|l| l.ends_with("|listen")), "{clients}");
    let text = get(port, "/metrics").await;
    assert_eq!(sample(&text, "pgbudget_pool_pinned", &sr), Some(1.0), "pinned gauge while pinned");
    assert_eq!(sample(&text, "pgbudget_pinned_total", &[("service", "app"), ("reason", "listen")]), Some(1.0));
    assert_eq!(sample(&text, "pgbudget_pinned_total", &[("service", "app"), ("reason", "temp_table")]), Some(0.0));
    let pools: serde_json::Value = serde_json::from_str(&get(port, "/pools").await).unwrap();
    assert_eq!(pools["pools"][0]["pinned"], 1);
    // The pinned server stays A's across transactions: one of two servers is left for everyone else.
    let b = connect(&proxy.conninfo()).await.unwrap();
    let held = connect(&proxy.conninfo()).await.unwrap();
    held.batch_execute("BEGIN").await.unwrap();
    let err = b.simple_query("select 1").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("53300"), "{err}");
    held.batch_execute("COMMIT").await.unwrap();
    // UNLISTEN * ends the pin: the gauge drops and the server goes back to the pool.
    a.batch_execute("UNLISTEN *").await.unwrap();
    // The server is read back right after the reply reached A: the pin ends within moments.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let text = get(port, "/metrics").await;
        let pinned = sample(&text, "pgbudget_pool_pinned", &sr);
        if pinned == Some(0.0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still pinned after UNLISTEN *: {pinned:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let clients = console(&proxy, "SHOW CLIENTS");
    assert!(!clients.contains("|listen"), "{clients}");
    held.batch_execute("BEGIN").await.unwrap();
    b.simple_query("select 1").await.expect("A's server is free again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_statements_are_shared_and_listed_without_constants() {
    let pg = Pg::start();
    let (cfg, port) = with_admin(config(&pg, "[services.app]\nslice = 2\n"));
    let proxy = Proxy::start(&cfg);
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(connect(&proxy.conninfo()).await.unwrap());
    }
    // Statements stay prepared while their handles live (a dropped one is closed).
    let mut kept = Vec::new();
    for round in 0..5i32 {
        for c in &clients {
            // tokio-postgres prepares every statement under a name of its own (s0, s1, ...).
            let st = c.prepare("select $1::int + 40 as x, 'secret-literal' as y").await.unwrap();
            let row = c.query_one(&st, &[&round]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), round + 40);
            kept.push(st);
        }
    }
    let listed = console(&proxy, "SHOW PREPARED");
    let rows: Vec<&str> = listed.lines().filter(|l| l.starts_with("app|rw|pgbudget_")).collect();
    assert_eq!(rows.len(), 1, "one pool statement for one text: {listed}");
    assert!(rows[0].contains("|20|"), "used by the 20 live client statements: {listed}");
    assert!(!listed.contains("secret-literal") && !listed.contains("40"), "constants are taken out: {listed}");
    let text = get(port, "/metrics").await;
    let n = |result| {
        sample(&text, "pgbudget_prepared_statements_total", &[("service", "app"), ("route", "rw"), ("result", result)])
            .unwrap()
    };
    // 20 prepares and 20 executes over 2 servers: the statement is prepared once per server at most.
    assert!(n("miss") <= 2.0, "misses {}", n("miss"));
    assert!(n("hit") >= 38.0, "hits {}", n("hit"));
    assert_eq!(n("eviction"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_client_that_leaves_leaves_nothing_behind() {
    let pg = Pg::start();
    let proxy = Proxy::start(&config(&pg, "[services.app]\nslice = 2\n"));
    let a = connect(&proxy.conninfo()).await.unwrap();
    a.batch_execute(
        "LISTEN chan; CREATE TEMP TABLE t (x int); SELECT pg_advisory_lock(7); PREPARE p AS SELECT 1; \
         BEGIN; DECLARE c CURSOR WITH HOLD FOR SELECT 1; COMMIT; SET search_path = left_by_a",
    )
    .await
    .unwrap();
    drop(a);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Two clients in open transactions hold both servers: whichever had A's state is one of them.
    let mut seen = Vec::new();
    let mut held = Vec::new();
    for _ in 0..2 {
        let c = connect(&proxy.conninfo()).await.unwrap();
        c.batch_execute("BEGIN").await.unwrap();
        let row = c
            .query_one(
                "select (select count(*) from pg_listening_channels()), \
                 (select count(*) from pg_class where relnamespace = pg_my_temp_schema()), \
                 (select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()), \
                 (select count(*) from pg_prepared_statements where from_sql), \
                 (select count(*) from pg_cursors where is_holdable), \
                 current_setting('search_path'), pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        let counts: Vec<i64> = (0..5).map(|i| row.get(i)).collect();
        seen.push((counts, row.get::<_, String>(5), row.get::<_, i32>(6)));
        held.push(c);
    }
    assert_ne!(seen[0].2, seen[1].2, "two different servers were checked");
    for (counts, search_path, _) in &seen {
        assert_eq!(counts, &vec![0; 5], "listen, temp, advisory, sql prepare, cursor left behind: {seen:?}");
        assert_eq!(search_path, "\"$user\", public");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_types_functions_and_operators_pin_and_leave_nothing_behind() {
    let pg = Pg::start();
    let proxy = Proxy::start(&config(&pg, "[services.app]\nslice = 2\n"));
    let objects = [
        ("enum", "CREATE TYPE pg_temp.mood AS ENUM ('ok')", "SELECT 'ok'::pg_temp.mood::text"),
        ("domain", "CREATE DOMAIN pg_temp.pos AS int CHECK (VALUE > 0)", "SELECT 1::pg_temp.pos::text"),
        ("range", "CREATE TYPE pg_temp.fr AS RANGE (subtype = float8)", "SELECT pg_temp.fr(1, 2)::text"),
        (
            "function",
            "CREATE FUNCTION pg_temp.f() RETURNS text LANGUAGE sql AS $$ SELECT 'ok' $$",
            "SELECT pg_temp.f()",
        ),
    ];
    for (what, create, usage) in objects {
        let a = connect(&proxy.conninfo()).await.unwrap();
        a.batch_execute(create).await.unwrap_or_else(|e| panic!("{what}: {e}"));
        // Another client's transactions in between would take an unpinned server.
        let b = connect(&proxy.conninfo()).await.unwrap();
        for _ in 0..3 {
            b.batch_execute("SELECT 1").await.unwrap();
            let r = a.simple_query(usage).await.unwrap_or_else(|e| panic!("{what}: A lost its temp object: {e}"));
            assert!(!r.is_empty(), "{what}");
        }
        drop((a, b));
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let c = connect(&proxy.conninfo()).await.unwrap();
        c.batch_execute("BEGIN").await.unwrap();
        let d = connect(&proxy.conninfo()).await.unwrap();
        d.batch_execute("BEGIN").await.unwrap();
        for x in [&c, &d] {
            let left: i64 = x
                .query_one(
                    "select (select count(*) from pg_type where typnamespace = pg_my_temp_schema()) \
                     + (select count(*) from pg_proc where pronamespace = pg_my_temp_schema())",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(left, 0, "{what}: a temp object was left behind for the next client");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_right_after_a_reply_never_breaks_the_session() {
    // The cancel may reach the proxy's own session probe (run after a transaction that changed state);
    // direct, a cancel of an idle backend does nothing, and through the proxy the session must go on.
    let pg = Pg::start();
    let proxy = Proxy::start(&config(&pg, "[services.app]\nslice = 2\n"));
    let mut broken = Vec::new();
    for i in 0..60 {
        let c = connect(&proxy.conninfo()).await.unwrap();
        c.batch_execute("SET search_path = public").await.unwrap();
        let _ = c.cancel_token().cancel_query(tokio_postgres::NoTls).await;
        let after = c.simple_query("select 1").await;
        // The next statement may itself be the one cancelled (57014), as direct; it must not end the session.
        if let Err(e) = &after {
            let code = e.code().map(|c| c.code().to_owned());
            if code.as_deref() != Some("57014") {
                broken.push((i, e.to_string()));
            }
        }
        if let Err(e) = c.simple_query("select 2").await {
            broken.push((i, format!("then: {e}")));
        }
    }
    assert!(broken.is_empty(), "sessions broken by an idle cancel: {broken:?}");
}

/// `DISCARD ALL` drops a backend's temp objects but not its temporary namespace, and a session that finds one
/// behaves unlike a new backend (`pg_my_temp_schema()` is set; `current_schema()` under `search_path =
/// pg_temp` no longer creates it, so `PREPARE TRANSACTION` is allowed where direct it is refused: Postgres's
/// own `temp` regression test). A server whose client used temp objects is closed, not reused, in both modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_client_never_finds_a_temporary_namespace() {
    let pg = Pg::start();
    for mode in ["session", "transaction"] {
        let proxy = Proxy::start(&config(&pg, &format!("[services.app]\nslice = 2\npool_mode = \"{mode}\"\n")));
        let a = connect(&proxy.conninfo()).await.unwrap();
        a.batch_execute("CREATE TEMP TABLE t (x int)").await.unwrap();
        let a_pid: i32 = a.query_one("select pg_backend_pid()", &[]).await.unwrap().get(0);
        drop(a);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let b = connect(&proxy.conninfo()).await.unwrap();
        let row = b.query_one("select pg_backend_pid(), pg_my_temp_schema()::int8", &[]).await.unwrap();
        let (b_pid, temp): (i32, i64) = (row.get(0), row.get(1));
        assert_eq!(temp, 0, "{mode}: B found A's temporary namespace");
        assert_ne!(b_pid, a_pid, "{mode}: the server A left with a temporary namespace was reused");
        // And a server whose client never touched temp objects is still reused.
        drop(b);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let c = connect(&proxy.conninfo()).await.unwrap();
        let c_pid: i32 = c.query_one("select pg_backend_pid()", &[]).await.unwrap().get(0);
        assert_eq!(c_pid, b_pid, "{mode}: a clean server is reused");
    }
}

/// A client that closes its named statement (psycopg 3 evicting from its cache, a dropped tokio-postgres
/// statement) finds it gone from `pg_prepared_statements` at once, in the same transaction, as direct —
/// unless another client still holds the same statement, whose handle keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_statement_no_other_client_holds_is_gone_from_the_server_at_once() {
    let pg = Pg::start();
    let proxy = Proxy::start(&config(&pg, "[services.app]\nslice = 2\n"));
    let a = connect(&proxy.conninfo()).await.unwrap();
    let count = "select count(*) from pg_prepared_statements where statement = 'select ''only a'''";
    a.batch_execute("BEGIN").await.unwrap();
    let st = a.prepare("select 'only a'").await.unwrap();
    a.query(&st, &[]).await.unwrap();
    assert_eq!(a.query_one(count, &[]).await.unwrap().get::<_, i64>(0), 1, "prepared on A's server");
    drop(st); // tokio-postgres sends Close + Sync
    assert_eq!(a.query_one(count, &[]).await.unwrap().get::<_, i64>(0), 0, "closed on the server at once");
    a.batch_execute("COMMIT").await.unwrap();

    // Shared: B holds the same statement; A's Close leaves it for B.
    let b = connect(&proxy.conninfo()).await.unwrap();
    let kept = b.prepare("select 'shared'").await.unwrap();
    a.batch_execute("BEGIN").await.unwrap();
    let st = a.prepare("select 'shared'").await.unwrap();
    a.query(&st, &[]).await.unwrap();
    drop(st);
    a.query_one("select 1", &[]).await.unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    for _ in 0..4 {
        let rows = b.query(&kept, &[]).await.unwrap();
        assert_eq!(rows[0].get::<_, &str>(0), "shared", "B's statement survives A's Close");
    }
}

/// Ending backend-only state matters only to a pinned client: an unpinned client's `DROP TABLE` (or `CLOSE`,
/// `UNLISTEN`) costs no session probe round trip, a pinned client's `UNLISTEN` still does (and unpins it).
/// Counted off the server's statement log between two markers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_pinned_client_pays_a_probe_for_ending_backend_state() {
    let pg = Pg::start_with(&["log_statement=all"]);
    let proxy = Proxy::start(&config(&pg, "[services.app]\nslice = 2\npool_mode = \"transaction\"\n"));
    let c = connect(&proxy.conninfo()).await.unwrap();
    let probes_between = |log: &str, from: &str, to: &str| {
        let (start, end) = (log.find(from).expect("first marker"), log.find(to).expect("second marker"));
        log[start..end].matches("current_setting('statement_timeout')").count()
    };
    c.simple_query("select 'mark 1'").await.unwrap();
    for sql in ["create table t1 (a int)", "drop table t1", "close all", "unlisten *", "select 1"] {
        c.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    c.simple_query("select 'mark 2'").await.unwrap();
    c.simple_query("listen ch").await.unwrap();
    c.simple_query("select 'mark 3'").await.unwrap();
    c.simple_query("unlisten ch").await.unwrap();
    c.simple_query("select 'mark 4'").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let log = pg.log();
    assert_eq!(probes_between(&log, "'mark 1'", "'mark 2'"), 0, "unpinned: no probe");
    assert_eq!(probes_between(&log, "'mark 2'", "'mark 3'"), 1, "LISTEN pins, read off a probe");
    assert_eq!(probes_between(&log, "'mark 3'", "'mark 4'"), 1, "the pinned client's UNLISTEN is probed");
}
