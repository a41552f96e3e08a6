//! Observability against a real Postgres: /metrics (parsed by a Prometheus parser) agrees with
//! pg_stat_activity, /ready follows Postgres while /health does not, snapshot lines, the error journal,
//! /pools, and the admin console.

mod common;
use common::*;
use std::time::{Duration, Instant};

async fn get(port: u16, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("http://127.0.0.1:{port}{path}")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_pg_stat_activity_under_load() {
    let pg = Pg::start();
    let admin = connect(&pg.conninfo()).await.unwrap();
    let (cfg, port) = with_admin(config(&pg, "[services.app]\nslice = 4\ncheckout_timeout = \"200ms\"\n"));
    let proxy = Proxy::start(&cfg);
    let mut holders = Vec::new();
    for _ in 0..3 {
        let c = connect(&proxy.conninfo()).await.unwrap();
        c.batch_execute("begin; select 1").await.unwrap();
        holders.push(c);
    }
    let load = connect(&proxy.conninfo()).await.unwrap();
    for _ in 0..50 {
        load.simple_query("select 1").await.unwrap();
    }
    let (status, text) = get(port, "/metrics").await;
    assert_eq!(status, 200);
    let sr = [("service", "app"), ("route", "rw")];
    let size = sample(&text, "pgbudget_pool_size", &sr).expect("pool size gauge");
    assert_eq!(size as i64, server_conns(&admin, "app").await, "gauge vs pg_stat_activity");
    assert_eq!(sample(&text, "pgbudget_pool_max", &sr), Some(4.0));
    assert!(sample(&text, "pgbudget_pool_available", &sr).unwrap() <= size - 3.0);
    assert!(sample(&text, "pgbudget_transactions_total", &sr).unwrap() >= 50.0);
    assert!(sample(&text, "pgbudget_queries_total", &sr).unwrap() >= 53.0);
    assert_eq!(sample(&text, "pgbudget_upstream_ceiling", &[("upstream", "primary")]), Some(90.0));
    assert_eq!(sample(&text, "pgbudget_upstream_connections", &[("upstream", "primary")]), Some(size));
    assert!(sample(&text, "pgbudget_client_connections_accepted_total", &[]).unwrap() >= 4.0);
    assert!(text.contains("pgbudget_checkout_wait_seconds_bucket"));
    assert!(text.contains("pgbudget_transaction_duration_seconds_count"));
    // Exhaust the share: timeouts are counted.
    let extra = connect(&proxy.conninfo()).await.unwrap();
    extra.batch_execute("begin; select 1").await.unwrap();
    let late = connect(&proxy.conninfo()).await.unwrap();
    assert_eq!(late.simple_query("select 1").await.unwrap_err().code().unwrap().code(), "53300");
    let (_, text) = get(port, "/metrics").await;
    assert_eq!(sample(&text, "pgbudget_checkout_timeouts_total", &sr), Some(1.0));
    assert_eq!(sample(&text, "pgbudget_pool_size", &sr), Some(4.0));
    assert_eq!(server_conns(&admin, "app").await, 4);
    // /pools carries the same figures and the budget table.
    let (_, pools) = get(port, "/pools").await;
    let v: serde_json::Value = serde_json::from_str(&pools).unwrap();
    assert_eq!(v["pools"][0]["size"], 4);
    assert_eq!(v["pools"][0]["share"], 4);
    assert_eq!(v["pools"][0]["ro_dsn_configured"], false);
    assert_eq!(v["upstreams"][0]["ceiling"], 90);
    assert_eq!(v["upstreams"][0]["sum"], 6);
    assert_eq!(v["budget"][0]["service"], "app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_follows_postgres_and_health_does_not() {
    let mut pg = Pg::start();
    let (cfg, port) = with_admin(config(&pg, "[services.app]\nslice = 2\nconnect_timeout = \"1s\"\n"));
    let _proxy = Proxy::start(&cfg);
    assert_eq!(get(port, "/ready").await.0, 200);
    pg.stop();
    let started = Instant::now();
    let (status, body) = get(port, "/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("upstream:primary"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let (status, body) = get(port, "/health").await;
    assert_eq!(status, 200);
    assert!(body.contains("uptime_seconds"));
    pg.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(port, "/ready").await.0 != 200 {
        assert!(Instant::now() < deadline, "ready did not come back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_lines_at_the_configured_interval() {
    let pg = Pg::start();
    let (cfg, _) = with_admin(config(&pg, "[services.app]\nslice = 3\n"));
    let proxy = Proxy::start_env(&cfg, &[("PGBUDGET_POOL_LOG_INTERVAL", "1")]);
    let c = connect(&proxy.conninfo()).await.unwrap();
    c.batch_execute("begin; select 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let log = proxy.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("pool snapshot")).collect();
    assert!(lines.len() >= 2, "expected a snapshot per second:\n{log}");
    let last = lines.last().unwrap();
    for field in
        ["pool=app/rw size=1 idle=0 waiting=0 share=3 timeouts=0", "upstream=primary open=1 ceiling=90", "clients=1"]
    {
        assert!(last.contains(field), "{field} missing in: {last}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_reach_the_journal() {
    let pg = Pg::start();
    let (cfg, port) = with_admin(config(&pg, "[services.app]\nslice = 2\n"));
    let proxy = Proxy::start(&cfg);
    let c = connect(&proxy.conninfo()).await.unwrap();
    assert!(c.simple_query("select 1/0").await.is_err());
    let (status, body) = get(port, "/errors").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let e = &v["errors"][0];
    assert_eq!(e["sqlstate"], "22012");
    assert_eq!(e["service"], "app");
    assert_eq!(e["upstream"], "primary");
    assert!(e["message"].as_str().unwrap().contains("division by zero"));
    // Server-side failures (not the client's SQL) make the pool unhealthy at three.
    for _ in 0..2 {
        let victim = connect(&proxy.conninfo()).await.unwrap();
        let err = victim.simple_query("select pg_terminate_backend(pg_backend_pid())").await.unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("57P01"), "{err:?}");
    }
    // The client reads the FATAL before the proxy has read the server's close (journalled then): look again
    // for up to 2 s.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let (body, v) = loop {
        let (_, body) = get(port, "/errors/health?minutes=5").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["healthy"] == false || std::time::Instant::now() > until {
            break (body, v);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(v["healthy"], false, "{body}");
    assert_eq!(v["pools"][0]["service"], "app");
}

#[test]
fn admin_console_shows_pools_to_admins_only() {
    let pg = Pg::start();
    let (cfg, _) = with_admin(config(&pg, "[services.app]\nslice = 2\n"));
    let proxy = Proxy::start(&cfg);
    let _ = psql(&proxy.conninfo(), &["-c", "select 1"]);
    let console = proxy.conninfo().replace("dbname=postgres", "dbname=pgbudget");
    let out = psql(
        &console,
        &["-c", "SHOW POOLS", "-c", "show stats", "-c", "SHOW SERVERS", "-c", "SHOW CLIENTS", "-c", "SHOW CONFIG"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("postgres|postgres|app|rw|"), "{text}");
    assert!(text.contains("service.app|slice=2"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("S|primary|app|rw|idle|127.0.0.1|")), "{text}");
    let out = psql(&console, &["-c", "DROP TABLE x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported admin console command"));
    let no_admin = Proxy::start(&config(&pg, "[services.app]\nslice = 2\n"));
    let out = psql(&no_admin.conninfo().replace("dbname=postgres", "dbname=pgbudget"), &["-c", "SHOW POOLS"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("password authentication failed"));
}
