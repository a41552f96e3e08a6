//! Issue #14, forensics: the error journal tells the upstream's errors from the client's own SQL and from the
//! proxy's refusals (health, `/errors`, the lake's `server_errors`), keeps no literal, survives a restart, and
//! the lake's timeline sees a burst between two snapshots.

mod common;
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const TOKEN: &str = "t0ken-for-forensics";

async fn get(port: u16, path: &str) -> Value {
    let r = reqwest::get(format!("http://127.0.0.1:{port}{path}")).await.unwrap();
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
        match reqwest::get(format!("http://127.0.0.1:{port}{path}")).await {
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
    let before = get(port, "/errors").await;
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
