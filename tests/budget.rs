//! Budget enforcement against a real Postgres: overflow answered with 53300, the share and ceiling never
//! exceeded under churn (sampled from pg_stat_activity), graceful drain, and config refusal at startup.

mod common;
use common::*;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhaustion_is_53300_naming_service_share_and_wait_then_service_goes_on() {
    let pg = Pg::start();
    let proxy = Proxy::start(&config(&pg, "[services.app]\nslice = 2\ncheckout_timeout = \"300ms\"\n"));
    let a = connect(&proxy.conninfo()).await.unwrap();
    let b = connect(&proxy.conninfo()).await.unwrap();
    a.batch_execute("begin; select 1").await.unwrap();
    b.batch_execute("begin; select 1").await.unwrap();
    let c = connect(&proxy.conninfo()).await.unwrap();
    let started = Instant::now();
    let err = c.simple_query("select 1").await.unwrap_err();
    let waited = started.elapsed();
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "53300");
    assert!(
        db.message().contains("\"app\"") && db.message().contains("all 2") && db.message().contains("ms"),
        "{}",
        db.message()
    );
    assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(2), "waited {waited:?}");
    // The rejected client keeps its connection and gets served once a slot frees.
    a.batch_execute("commit").await.unwrap();
    c.simple_query("select 1").await.expect("served after a slot freed");
    b.batch_execute("commit").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflowing_clients_each_get_53300_and_the_share_holds() {
    let pg = Pg::start();
    let admin = connect(&pg.conninfo()).await.unwrap();
    let proxy = Proxy::start(&config(&pg, "[services.app]\nslice = 3\ncheckout_timeout = \"200ms\"\n"));
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let ci = proxy.conninfo();
        tasks.push(tokio::spawn(async move {
            let c = connect(&ci).await?;
            c.simple_query("select pg_sleep(0.5)").await.map(|_| ())
        }));
    }
    let mut peak = 0;
    while tasks.iter().any(|t| !t.is_finished()) {
        peak = peak.max(server_conns(&admin, "app").await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (mut ok, mut rejected) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(e) => {
                assert_eq!(e.code().map(|c| c.code()), Some("53300"), "unexpected error: {e}");
                rejected += 1;
            }
        }
    }
    assert!(ok >= 3 && rejected >= 20, "ok {ok} rejected {rejected}");
    assert_eq!(peak, 3, "server connections must reach but never exceed the share");
}

/// The ceiling property: 10x more churning clients than the share, sampled every few ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_churn_never_exceeds_the_share() {
    let pg = Pg::start();
    let admin = connect(&pg.conninfo()).await.unwrap();
    let proxy = Proxy::start(&config(&pg, "[services.app]\nslice = 5\ncheckout_timeout = \"250ms\"\n"));
    let script = proxy.dir.path().join("sleep.sql");
    std::fs::write(&script, "select pg_sleep(0.02);\n").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicI64::new(0));
    let samples = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (stop, peak, samples) = (stop.clone(), peak.clone(), samples.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let n = server_conns(&admin, "app").await;
                peak.fetch_max(n, Ordering::Relaxed);
                samples.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    let out = tokio::task::spawn_blocking({
        let bin = pgbench_bin(&pg);
        let port = proxy.port.to_string();
        move || {
            Command::new(bin)
                .args([
                    "-n",
                    "-C",
                    "-c",
                    "50",
                    "-j",
                    "2",
                    "-T",
                    "6",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                    "-f",
                ])
                .arg(&script)
                .arg("postgres")
                .env("PGPASSWORD", PG_PASSWORD)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let processed: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next()?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pgbench summary:\n{stdout}\n{stderr}"));
    assert!(processed > 100, "only {processed} transactions went through:\n{stderr}");
    for line in stderr.lines().filter(|l| l.contains("ERROR") || l.contains("FATAL")) {
        assert!(line.contains("pgbudget: service \"app\" is using all 5"), "unexpected failure: {line}");
    }
    let peak = peak.load(Ordering::Relaxed);
    assert!(samples.load(Ordering::Relaxed) > 200, "too few samples");
    assert!(peak <= 5, "server connections peaked at {peak}, above the share of 5");
    assert!(peak >= 4, "the load should have used the share (peak {peak})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_transactions_and_exits_cleanly() {
    let pg = Pg::start();
    let admin = connect(&pg.conninfo()).await.unwrap();
    admin.batch_execute("create table drained(x int)").await.unwrap();
    let mut proxy = Proxy::start(&config(&pg, "[services.app]\nslice = 3\npool_mode = \"transaction\"\n"));
    let busy = connect(&proxy.conninfo()).await.unwrap();
    let idle = connect(&proxy.conninfo()).await.unwrap();
    idle.simple_query("select 1").await.unwrap();
    busy.batch_execute("begin; insert into drained values (1)").await.unwrap();
    let pid = proxy.pid();
    let term = tokio::task::spawn_blocking(move || {
        let st = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
        assert!(st.success());
    });
    term.await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // New clients are refused; the open transaction finishes.
    assert!(connect(&proxy.conninfo()).await.is_err());
    busy.batch_execute("insert into drained values (2); commit").await.expect("in-flight transaction completes");
    let code = tokio::task::spawn_blocking(move || proxy.terminate()).await.unwrap();
    assert_eq!(code, Some(0));
    let n: i64 = admin.query_one("select count(*) from drained", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
    assert_eq!(server_conns(&admin, "app").await, 0);
    let log = pg.log();
    assert!(
        !log.contains("Connection reset by peer") && !log.contains("unexpected EOF"),
        "unclean close in Postgres log:\n{log}"
    );
}

#[test]
fn invalid_config_refuses_to_start_with_every_reason() {
    let pg = Pg::start();
    let cfg = config(&pg, "[services.app]\nslice = 60\n[services.other]\nslice = 40\ncheckout_timeout = \"0s\"\n");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("budgets.toml");
    std::fs::write(&path, cfg).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pgbudget"))
        .args(["run", "--config"])
        .arg(&path)
        .env_remove("RAILWAY_SERVICE_NAME")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("slices sum to 100 + 2 reserved = 102 which exceeds the ceiling of 90"), "{err}");
    assert!(err.contains("services.other.checkout_timeout = 0s is out of range"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_pgbudget")).args(["check", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    // The shipped example passes `check` and prints the table.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/budgets.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_pgbudget"))
        .args(["check", "--config", example])
        .env("DATABASE_URL", pg.url())
        .env("RAILWAY_SERVICE_NAME", "worker")
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        table.contains("worker")
            && table.contains("slices 83 + reserved 2 = 85 of ceiling 97")
            && table.contains("sidecar service: worker"),
        "{table}"
    );
}
