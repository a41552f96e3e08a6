//! Issue #14, forensics: the error journal tells the upstream's errors from the client's own SQL and from the
//! proxy's refusals (health, `/errors`, the lake's `server_errors`), keeps no literal, survives a restart, and
//! the lake's timeline sees a burst between two snapshots.

mod common;
#[path = "common/lake.rs"]
mod lake_common;
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const TOKEN: &str = "t0ken-for-forensics";

/// GET with the admin token (the proxies here set one, which guards every endpoint but the open probes).
async fn get(port: u16, path: &str) -> Value {
    let r =
        reqwest::Client::new().get(format!("http://127.0.0.1:{port}{path}")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "{path}");
    serde_json::from_str(&r.text().await.unwrap()).unwrap()
}

async fn lake_query(port: u16, sql: &str) -> Value {
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/lake/query"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(json!({ "sql": sql }).to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(status, 200, "{sql}: {body}");
    body
}

/// Poll a `count(*) AS n` lake query until it reaches `at_least` (rows land after a flush).
async fn wait_count(port: u16, sql: &str, at_least: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n = lake_query(port, sql).await["rows"][0]["n"].as_i64().unwrap();
        if n >= at_least || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `cfg` with an admin listener (returned port) and a lake in `dir` flushed every 300 ms.
fn with_lake(cfg: String, dir: &std::path::Path) -> (String, u16) {
    let (cfg, port) = with_admin(cfg);
    let lake = format!("[lake]\nenabled = true\ndir = \"{}\"\nflush_interval = \"300ms\"\n\n", dir.display());
    (cfg.replace("[upstreams.primary]", &format!("{lake}[upstreams.primary]")), port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raise_keeps_the_pool_healthy_and_upstream_failures_flip_it() {
    let mut pg = Pg::start();
    let (cfg, port) = with_admin(config(&pg, "[services.app]\nslice = 2\nconnect_timeout = \"1s\"\n"));
    let proxy = Proxy::start(&cfg);
    let c = connect(&proxy.conninfo()).await.unwrap();
    for i in 0..3 {
        let e = c.batch_execute(&format!("do $$ begin raise exception 'app says no {i}'; end $$")).await.unwrap_err();
        assert_eq!(e.code().unwrap().code(), "P0001");
    }
    let h = get(port, "/errors/health?minutes=5").await;
    assert_eq!(h["healthy"], true, "{h}");
    assert_eq!(h["pools"][0]["query_errors"], 3, "{h}");
    assert_eq!(h["pools"][0]["errors"], 0, "{h}");
    let recent = get(port, "/errors").await;
    assert_eq!(recent["errors"][0]["kind"], "query_error", "{recent}");
    drop(c);

    pg.stop();
    for _ in 0..3 {
        // A fresh session needs a server: the connect fails and the client gets an error.
        let r = match connect(&proxy.conninfo()).await {
            Ok(c) => c.simple_query("select 1").await.map(|_| ()),
            Err(e) => Err(e),
        };
        assert!(r.is_err(), "the upstream is down");
    }
    let h = get(port, "/errors/health?minutes=5").await;
    assert_eq!(h["healthy"], false, "{h}");
    assert!(h["pools"][0]["errors"].as_u64().unwrap() >= 3, "{h}");
    assert_eq!(h["pools"][0]["query_errors"], 3, "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_query_errors_stay_out_of_server_errors() {
    let pg = Pg::start();
    let dir = tempfile::tempdir().unwrap();
    let (cfg, port) = with_lake(
        config(&pg, "[services.app]\nslice = 2\npool_mode = \"session\"\ncheckout_timeout = \"200ms\"\n"),
        dir.path(),
    );
    let proxy = Proxy::start_env(&cfg, &[("PGBUDGET_ADMIN_TOKEN", TOKEN)]);
    let holder = connect(&proxy.conninfo()).await.unwrap();
    holder.simple_query("select 1").await.unwrap();
    assert_eq!(holder.simple_query("select 1/0").await.unwrap_err().code().unwrap().code(), "22012");
    let _second = connect(&proxy.conninfo()).await.unwrap();
    // Share 2 held by two sessions: the next client waits 200 ms and is refused (53300).
    let late = connect(&proxy.conninfo()).await.unwrap_err();
    assert_eq!(late.code().unwrap().code(), "53300");
    // One upstream-side error: a server terminated under its client.
    let e = holder.simple_query("select pg_terminate_backend(pg_backend_pid())").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "57P01");

    let errors = get(port, "/errors").await;
    let kinds: Vec<&str> = errors["errors"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"budget") && kinds.contains(&"query_error"), "{errors}");
    assert_eq!(wait_count(port, "select count(*) as n from lake.checkout_timeouts", 1).await, 1);
    assert!(wait_count(port, "select count(*) as n from lake.server_errors where sqlstate = '57P01'", 1).await >= 1);
    let leaked = lake_query(
        port,
        "select count(*) as n from lake.server_errors where kind in ('budget', 'ceiling', 'load_shed', 'query_error') \
         or sqlstate in ('53300', '22012')",
    )
    .await;
    assert_eq!(leaked["rows"][0]["n"], 0, "{leaked}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn literals_never_reach_errors_the_lake_or_the_log() {
    let pg = Pg::start();
    let dir = tempfile::tempdir().unwrap();
    let (cfg, port) = with_lake(config(&pg, "[services.app]\nslice = 2\n"), dir.path());
    let proxy = Proxy::start_env(&cfg, &[("PGBUDGET_ADMIN_TOKEN", TOKEN)]);
    let c = connect(&proxy.conninfo()).await.unwrap();
    let e = c.simple_query("select 'alice@example.com:hunter2'::int").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "22P02");
    // The client still sees the whole message: only what pgbudget keeps is redacted.
    assert!(e.as_db_error().unwrap().message().contains("hunter2"), "{e:?}");
    // A server-class error (XX000) goes to the lake's server_errors too.
    c.batch_execute("do $$ begin raise exception using errcode = 'XX000', message = 'token ''s3cr3t-t0ken'''; end $$")
        .await
        .unwrap_err();
    let errors = get(port, "/errors").await;
    let msgs: Vec<&str> = errors["errors"].as_array().unwrap().iter().map(|e| e["message"].as_str().unwrap()).collect();
    assert_eq!(msgs[..2], ["token '…'", "invalid input syntax for type integer: \"…\""], "{errors}");
    assert_eq!(errors["errors"][0]["sqlstate"], "XX000");
    assert_eq!(errors["errors"][1]["sqlstate"], "22P02");
    assert_eq!(errors["errors"][1]["service"], "app");
    let sql = "select count(*) as n from lake.server_errors where sqlstate = 'XX000' and message = 'token ''…'''";
    assert_eq!(wait_count(port, sql, 1).await, 1);
    let all = lake_query(port, "select * from lake.server_errors").await.to_string();
    assert!(!all.contains("s3cr3t") && !all.contains("hunter2"), "{all}");
    let log = proxy.log();
    assert!(!log.contains("hunter2") && !log.contains("s3cr3t"), "{log}");
}

/// The first answer of the admin listener at `path` (it comes up after the lake is open and read).
async fn first_answer(port: u16, path: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match reqwest::Client::new().get(format!("http://127.0.0.1:{port}{path}")).bearer_auth(TOKEN).send().await {
            Ok(r) => return serde_json::from_str(&r.text().await.unwrap()).unwrap(),
            Err(e) => assert!(Instant::now() < deadline, "admin listener never answered: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_error_ring_survives_a_restart() {
    let pg = Pg::start();
    let dir = tempfile::tempdir().unwrap();
    let (cfg, port) = with_lake(config(&pg, "[services.app]\nslice = 2\n"), dir.path());
    let mut proxy = Proxy::start_env(&cfg, &[("PGBUDGET_ADMIN_TOKEN", TOKEN)]);
    let c = connect(&proxy.conninfo()).await.unwrap();
    c.simple_query("select 1/0").await.unwrap_err();
    for i in 0..2 {
        let sql = format!("do $$ begin raise exception using errcode = 'XX000', message = 'broken {i}'; end $$");
        c.batch_execute(&sql).await.unwrap_err();
    }
    let victim = connect(&proxy.conninfo()).await.unwrap();
    victim.simple_query("select pg_terminate_backend(pg_backend_pid())").await.unwrap_err();
    // The relay journals the lost server (08006) just after the client got the 57P01: wait for it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let before = loop {
        let v = get(port, "/errors").await;
        if v.to_string().contains("\"08006\"") || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let upstream: Vec<Value> =
        before["errors"].as_array().unwrap().iter().filter(|e| e["kind"] != "query_error").cloned().collect();
    assert!(upstream.len() >= 3, "{before}");
    drop((c, victim));
    assert_eq!(proxy.terminate(), Some(0), "{}", proxy.log());

    let proxy = Proxy::start_env(&cfg, &[("PGBUDGET_ADMIN_TOKEN", TOKEN)]);
    let after = first_answer(port, "/errors").await;
    let got = after["errors"].as_array().unwrap();
    let key = |e: &Value| (e["kind"].to_string(), e["sqlstate"].to_string(), e["message"].to_string());
    assert_eq!(got.iter().map(key).collect::<Vec<_>>(), upstream.iter().map(key).collect::<Vec<_>>(), "{after}");
    for (g, u) in got.iter().zip(&upstream) {
        assert!((g["time"].as_f64().unwrap() - u["time"].as_f64().unwrap()).abs() < 1.0, "{g} vs {u}");
        assert_eq!((&g["service"], &g["route"], &g["upstream"]), (&u["service"], &u["route"], &u["upstream"]));
    }
    let h = get(port, "/errors/health?minutes=5").await;
    assert_eq!(h["healthy"], false, "the refilled errors count: {h}");
    assert!(proxy.log().contains("error journal refilled from the lake"), "{}", proxy.log());
}

/// The burst: share 4, 30 clients of `pg_sleep(0.05)` for 4 s, all of it between two 10 s snapshots.
/// The timeline shows the share full (100 %), no server errors, and each 53300 a client saw exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_between_two_snapshots_shows_in_the_timeline() {
    let pg = Pg::start();
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _) = with_lake(
        config(&pg, "[services.app]\nslice = 4\npool_mode = \"transaction\"\ncheckout_timeout = \"250ms\"\n"),
        dir.path(),
    );
    let mut proxy = Proxy::start(&cfg);
    let mut clients = Vec::new();
    for _ in 0..30 {
        clients.push(connect(&proxy.conninfo()).await.unwrap());
    }
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs(4);
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|c| {
            tokio::spawn(async move {
                let (mut ok, mut refused) = (0u64, 0u64);
                while Instant::now() < until {
                    match c.simple_query("select pg_sleep(0.05)").await {
                        Ok(_) => ok += 1,
                        Err(e) if e.code().map(|c| c.code()) == Some("53300") => refused += 1,
                        Err(e) => panic!("unexpected error: {e:?}"),
                    }
                }
                (ok, refused)
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let (o, r) = t.await.unwrap();
        (ok, refused) = (ok + o, refused + r);
    }
    let burst = t0.elapsed();
    assert!(burst < Duration::from_secs(9), "the burst must fit between two snapshots: {burst:?}");
    assert!(refused > 0 && ok > 100, "ok {ok}, refused {refused}");
    assert_eq!(proxy.terminate(), Some(0), "{}", proxy.log());

    let config = proxy.dir.path().join("budgets.toml");
    let config = config.to_str().unwrap();
    let (code, timeline, err) = lake_common::pgbudget(&["lake", "timeline", "--days", "1", "--config", config]);
    assert_eq!(code, 0, "{err}");
    eprintln!("burst: {ok} served, {refused} refused (53300) in {burst:?}\n{timeline}");
    let today = lake_common::ymd(lake_common::day_start(0));
    let row: Vec<&str> = timeline
        .lines()
        .find(|l| l.starts_with("app") && l.contains(&today))
        .unwrap_or_else(|| panic!("{timeline}"))
        .split_whitespace()
        .collect();
    let (timeouts, rejections): (u64, u64) = (row[2].parse().unwrap(), row[3].parse().unwrap());
    assert_eq!(timeouts + rejections, refused, "each refusal counted once: {timeline}");
    assert_eq!((row[4], row[5], row[6]), ("0", "0", "100%"), "{timeline}");

    // The rows: few (two snapshots: at start and at shutdown), yet they carry the burst's marks.
    let (code, out, err) = lake_common::pgbudget(&[
        "lake",
        "query",
        "select count(*) as n, max(in_use) as sampled, max(max_in_use) as peak, max(max_waiting) as waiting, \
         sum(waited_checkouts) as waited, max(max_wait_ms) as wait_ms from pool_snapshots where route = 'rw'",
        "--json",
        "--config",
        config,
    ]);
    assert_eq!(code, 0, "{err}");
    eprintln!("pool_snapshots: {out}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["n"].as_i64().unwrap() <= 3, "{out}");
    assert_eq!(v["sampled"], 0, "the 10 s samples never saw the burst: {out}");
    assert_eq!(v["peak"], 4, "{out}");
    assert!(v["waiting"].as_i64().unwrap() >= 10, "{out}");
    assert!(v["waited"].as_i64().unwrap() >= refused as i64, "{out}");
    assert!(v["wait_ms"].as_f64().unwrap() >= 200.0, "{out}");
}

/// A lake written before the high-water columns existed: read-only commands read it as it is, the next writer
/// adds the columns (old rows read NULL) and the timeline uses the marks where rows have them.
#[test]
fn old_pool_snapshots_gain_the_mark_columns_and_stay_readable() {
    use pgbudget::lake::registry::{ColumnType, TableSpec};
    use pgbudget::lake::{tables, Lake, Registry, Value as V};
    let dir = tempfile::tempdir().unwrap();
    let cfg = lake_common::file_config(dir.path());
    let config = dir.path().join("budgets.toml");
    std::fs::write(&config, lake_common::budgets_toml(&lake_common::lake_toml(&cfg))).unwrap();
    let config = config.to_str().unwrap();
    let now = lake_common::day_start(0) + 60_000_000;
    let old_row = |in_use: i64| {
        let mut r = lake_common::pool_row(1, now);
        r.truncate(16);
        (r[1], r[5], r[8]) = ("old".into(), V::Int(10), V::Int(in_use));
        r
    };
    {
        // The registry as it was: pool_snapshots without the four mark columns.
        let mut specs: Vec<TableSpec> = Registry::builtin().tables().to_vec();
        specs[0].columns.truncate(16);
        assert!(specs[0].columns.iter().all(|c| !c.name.starts_with("max_")));
        assert_eq!(specs[0].columns[8].ty, ColumnType::Integer);
        let lake = Lake::open(&cfg, Registry::new(specs).unwrap(), &prometheus::Registry::new()).unwrap();
        lake.writer().unwrap().append(tables::POOL_SNAPSHOTS, old_row(3));
        assert_eq!(lake.writer().unwrap().flush().unwrap().rows_written, 1);
        lake.shutdown();
    }
    let timeline = || {
        let (code, out, err) = lake_common::pgbudget(&["lake", "timeline", "--days", "1", "--config", config]);
        assert_eq!(code, 0, "{err}");
        out.lines().find(|l| l.starts_with("old")).map(|l| l.split_whitespace().last().unwrap().to_owned())
    };
    assert_eq!(timeline().as_deref(), Some("30%"), "the old lake reads as before");
    {
        let lake = Lake::open(&cfg, Registry::builtin(), &prometheus::Registry::new()).unwrap();
        let mut r = old_row(2);
        r.extend([V::Int(9), V::Int(5), V::Float(120.0), V::Int(7), "postgres".into(), "postgres".into()]);
        lake.writer().unwrap().append(tables::POOL_SNAPSHOTS, r);
        assert_eq!(lake.writer().unwrap().flush().unwrap().rows_written, 1);
        lake.shutdown();
    }
    let (code, out, err) = lake_common::pgbudget(&[
        "lake",
        "query",
        "select in_use, max_in_use, waited_checkouts from pool_snapshots order by in_use",
        "--json",
        "--config",
        config,
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "{\"in_use\":2,\"max_in_use\":9,\"waited_checkouts\":7}\n{\"in_use\":3,\"max_in_use\":null,\"waited_checkouts\":null}\n"
    );
    assert_eq!(timeline().as_deref(), Some("90%"), "the new row's mark, 9 of 10");
}

/// While the proxy holds the embedded catalog, `pgbudget lake timeline|query` ask it through the admin
/// listener (with the admin token) and print what they print once it has stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lake_commands_ask_the_running_proxy() {
    let pg = Pg::start();
    let dir = tempfile::tempdir().unwrap();
    let (cfg, port) = with_lake(
        config(&pg, "[services.app]\nslice = 2\npool_mode = \"transaction\"\ncheckout_timeout = \"200ms\"\n"),
        dir.path(),
    );
    let cfg = cfg.replace("users = [\"postgres\"]\n", "users = [\"postgres\"]\npool_log_interval = \"1s\"\n");
    let mut proxy = Proxy::start_env(&cfg, &[("PGBUDGET_ADMIN_TOKEN", TOKEN)]);
    let (a, b, late) = (
        connect(&proxy.conninfo()).await.unwrap(),
        connect(&proxy.conninfo()).await.unwrap(),
        connect(&proxy.conninfo()).await.unwrap(),
    );
    a.batch_execute("begin; select 1").await.unwrap();
    b.batch_execute("begin; select 1").await.unwrap();
    assert_eq!(late.simple_query("select 1").await.unwrap_err().code().unwrap().code(), "53300");
    a.batch_execute("commit").await.unwrap();
    b.batch_execute("commit").await.unwrap();
    late.simple_query("select 1").await.unwrap();
    drop((a, b, late));
    assert_eq!(wait_count(port, "select count(*) as n from lake.checkout_timeouts", 1).await, 1);
    // A snapshot row after the activity (its marks) has landed; later ones are quiet.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let config = proxy.dir.path().join("budgets.toml");
    let config = config.to_str().unwrap().to_owned();
    let cli = |args: &[&str], token: bool| {
        let mut all = vec!["lake"];
        all.extend(args);
        all.extend(["--config", config.as_str()]);
        let env: &[(&str, &str)] = if token { &[("PGBUDGET_ADMIN_TOKEN", TOKEN)] } else { &[] };
        lake_common::pgbudget_env(&all, env)
    };
    let (code, _, err) = cli(&["timeline"], false);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("held by a running pgbudget") && err.contains("PGBUDGET_ADMIN_TOKEN"), "{err}");
    let (code, _, err) =
        lake_common::pgbudget_env(&["lake", "timeline", "--config", &config], &[("PGBUDGET_ADMIN_TOKEN", "wrong")]);
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");

    let (code, remote_timeline, err) = cli(&["timeline"], true);
    assert_eq!(code, 0, "{err}");
    print!("{remote_timeline}");
    let today = lake_common::ymd(lake_common::day_start(0));
    let row = remote_timeline.lines().find(|l| l.starts_with("app") && l.contains(&today)).unwrap();
    assert_eq!(row.split_whitespace().collect::<Vec<_>>()[2..], ["1", "0", "0", "0", "100%"], "{remote_timeline}");
    let (code, remote_json, err) = cli(&["timeline", "--by", "hour", "--since", "3h", "--format", "json"], true);
    assert_eq!(code, 0, "{err}");
    let (code, remote_timeouts, err) =
        cli(&["query", "select service, count(*) as n from checkout_timeouts group by 1"], true);
    assert_eq!(code, 0, "{err}");
    assert_eq!(remote_timeouts, "service  n\n-------  -\napp      1\n(1 row)\n");
    // The query: the same count the HTTP API gives at that moment.
    let http = |sql: &'static str| async move { lake_query(port, sql).await["rows"][0]["n"].as_i64().unwrap() };
    let before = http("select count(*) as n from lake.pool_snapshots").await;
    let (code, snapshots, err) = cli(&["query", "select count(*) from pool_snapshots", "--json"], true);
    let after = http("select count(*) as n from lake.pool_snapshots").await;
    assert_eq!(code, 0, "{err}");
    let n = serde_json::from_str::<Value>(snapshots.trim()).unwrap()["count_star()"].as_i64().unwrap();
    assert!(before >= 2 && (before..=after).contains(&n), "{before} <= {n} <= {after}");

    assert_eq!(proxy.terminate(), Some(0), "{}", proxy.log());
    let (code, local_timeline, err) = cli(&["timeline"], false);
    assert_eq!(code, 0, "{err}");
    assert_eq!(local_timeline, remote_timeline);
    assert_eq!(cli(&["timeline", "--by", "hour", "--since", "3h", "--format", "json"], false).1, remote_json);
    assert_eq!(
        cli(&["query", "select service, count(*) as n from checkout_timeouts group by 1"], false).1,
        remote_timeouts
    );
}
