//! The proxy writes its history into the lake: pool snapshots, admission refusals, checkout timeouts, read-only
//! violations, server errors, client sessions and config loads land in their tables after a flush, and the lake
//! HTTP API reads them (authenticated, one read-only query) and takes rows from services (bad rows named).

mod common;
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const TOKEN: &str = "t0ken-for-tests";

async fn post(port: u16, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}{path}"))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null))
}

async fn count(port: u16, sql: &str) -> i64 {
    let (status, body) = post(port, "/lake/query", Some(TOKEN), json!({ "sql": sql })).await;
    assert_eq!(status, 200, "{sql}: {body}");
    body["rows"][0]["n"].as_i64().unwrap_or_else(|| panic!("{sql}: {body}"))
}

/// Poll until `sql` (a `count(*) AS n` query) reaches `at_least`.
async fn wait_count(port: u16, sql: &str, at_least: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n = count(port, sql).await;
        if n >= at_least || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_history_lands_in_the_lake_and_the_http_api_reads_it() {
    let pg = Pg::start();
    let lake_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = config(
        &pg,
        "[read_only]\ndatabase = \"app_ro\"\n\n\
         [services.app]\nslice = 5\nread_only_share = 2\npool_mode = \"session\"\ncheckout_timeout = \"300ms\"\n\
         [services.app.admission]\nwarn = 0.2\nshed = 0.3\nhard_reject = 0.5\nexempt_application_names = [\"ops\"]\n",
    )
    .replace(
        "[upstreams.primary]",
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{port}\"\nusers = [\"postgres\"]\npool_log_interval = \"1s\"\n\n\
             [lake]\nenabled = true\ndir = \"{}\"\nflush_interval = \"500ms\"\nquery_timeout = \"1s\"\n\
             [[lake.tables]]\nname = \"signups\"\ncolumns = [\"plan VARCHAR\", \"amount DOUBLE\", \"seats INTEGER\"]\n\n\
             [upstreams.primary]",
            lake_dir.path().display()
        ),
    );
    let proxy = Proxy::start_env(&cfg, &[("PGBUDGET_ADMIN_TOKEN", TOKEN)]);

    // rw share 3, hard line ceil(0.5 × 3) = 2: the third session is shed.
    let a = connect(&proxy.conninfo()).await.unwrap();
    let b = connect(&proxy.conninfo()).await.unwrap();
    let shed = connect(&proxy.conninfo()).await.unwrap_err();
    assert_eq!(shed.code().unwrap().code(), "53300");
    assert_eq!(a.simple_query("select 1/0").await.unwrap_err().code().unwrap().code(), "22012");
    // ro share 2, line 1: the exempt class takes the headroom, the next exempt client times out.
    let ro_url = proxy.conninfo().replace("dbname=postgres", "dbname=app_ro");
    let ro = connect(&ro_url).await.unwrap();
    let code =
        ro.simple_query("set default_transaction_read_only = off").await.unwrap_err().code().unwrap().code().to_owned();
    assert_eq!(code, "25006");
    let ops = connect(&format!("{ro_url} application_name=ops")).await.unwrap();
    let timeout = connect(&format!("{ro_url} application_name=ops")).await.unwrap_err();
    assert_eq!(timeout.code().unwrap().code(), "53300");
    drop((ro, ops, b));
    a.simple_query("select 1").await.unwrap();
    drop(a);

    let sessions = "select count(*) as n from lake.client_sessions where service = 'app' and queries >= 2";
    assert!(wait_count(port, sessions, 1).await >= 1, "client_sessions row");
    let shed_rows =
        "select count(*) as n from lake.admission_decisions where not accepted and reason = 'rejected_hard'";
    assert_eq!(wait_count(port, shed_rows, 1).await, 1);
    assert!(wait_count(port, "select count(*) as n from lake.checkout_timeouts where route = 'ro'", 1).await >= 1);
    let viol = "select count(*) as n from lake.ro_violations where service = 'app' and fingerprint like '%read_only%'";
    assert_eq!(wait_count(port, viol, 1).await, 1);
    assert!(wait_count(port, "select count(*) as n from lake.pool_snapshots where service = 'app'", 2).await >= 2);
    assert_eq!(wait_count(port, "select count(*) as n from lake.config_reloads where outcome = 'startup'", 1).await, 1);
    // The client's own SQL error (22012) and the proxy's refusals (53300) are not upstream-side server errors.
    assert_eq!(count(port, "select count(*) as n from lake.server_errors").await, 0);

    // Parameters are bound, timestamps come back as ISO strings.
    let (status, body) = post(
        port,
        "/lake/query",
        Some(TOKEN),
        json!({ "sql": "select ts, reason from lake.admission_decisions where reason = ?", "params": ["rejected_hard"] }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["rows"][0]["ts"].as_str().is_some_and(|t| t.starts_with("20") && t.contains('T')), "{body}");

    // Only authenticated, read-only, lake-only queries.
    assert_eq!(post(port, "/lake/query", None, json!({ "sql": "select 1 as n" })).await.0, 401);
    assert_eq!(post(port, "/lake/query", Some("wrong"), json!({ "sql": "select 1 as n" })).await.0, 401);
    for bad in [
        "delete from lake.pool_snapshots",
        "select * from read_csv('/etc/passwd')",
        "select * from '/etc/passwd'",
        "select 1; drop table lake.pool_snapshots",
        "call ducklake_cleanup_old_files('lake', cleanup_all => true)",
    ] {
        let (status, body) = post(port, "/lake/query", Some(TOKEN), json!({ "sql": bad })).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    assert!(count(port, "select count(*) as n from lake.pool_snapshots").await >= 2, "nothing was deleted");

    // A runaway query is stopped at lake.query_timeout and the reader is free again at once.
    let t = Instant::now();
    let (status, body) = post(
        port,
        "/lake/query",
        Some(TOKEN),
        json!({ "sql": "select sum(i * i) as n from range(1000000000000) t(i)" }),
    )
    .await;
    assert_eq!(status, 504, "{body}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let t = Instant::now();
    assert!(count(port, "select count(*) as n from lake.pool_snapshots").await >= 2);
    assert!(t.elapsed() < Duration::from_secs(2), "the reader was released: {:?}", t.elapsed());

    // Services append JSON rows: good rows are kept, a bad one is named.
    let rows = json!([
        { "service": "billing", "route": "rw", "client_addr": "10.0.0.1", "reason": "test", "fingerprint": "SELECT ?" },
        { "service": "billing", "route": "rw", "client_adr": "typo" },
        { "service": "billing", "route": 7 },
    ]);
    let (status, body) = post(port, "/lake/ro_violations", Some(TOKEN), rows).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["accepted"], 1);
    assert_eq!(body["rejected"][0]["field"], "client_adr");
    assert_eq!(body["rejected"][1]["field"], "route");
    assert_eq!(wait_count(port, "select count(*) as n from lake.ro_violations where service = 'billing'", 1).await, 1);
    assert_eq!(post(port, "/lake/no_such_table", Some(TOKEN), json!({})).await.0, 404);

    // A table a service declared in [[lake.tables]]: readable before the first write, then written through the API.
    assert_eq!(count(port, "select count(*) as n from lake.signups").await, 0);
    let rows = json!([
        { "ts": "2026-11-20T08:30:00Z", "plan": "pro", "amount": 49.5, "seats": 3 },
        { "plan": "free", "amount": 0, "seats": 1 },
        { "plan": "pro", "seats": "three" },
    ]);
    let (status, body) = post(port, "/lake/signups", Some(TOKEN), rows).await;
    assert_eq!(
        (status, body["accepted"].as_i64(), body["rejected"][0]["field"].as_str()),
        (400, Some(2), Some("seats"))
    );
    assert_eq!(wait_count(port, "select count(*) as n from lake.signups", 2).await, 2);
    let (_, body) = post(
        port,
        "/lake/query",
        Some(TOKEN),
        json!({ "sql": "select ts, amount from lake.signups where plan = ?", "params": ["pro"] }),
    )
    .await;
    assert_eq!(body["rows"][0]["amount"], 49.5, "{body}");
    assert!(body["rows"][0]["ts"].as_str().is_some_and(|t| t.starts_with("2026-11-20T08:30:00")), "{body}");
}
