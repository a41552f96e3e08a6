//! Operator controls and hot reload against a real Postgres: budgets raised and lowered under load by SIGHUP
//! with no failed transaction, invalid and restart-only reloads refused, PAUSE/RESUME around a Postgres
//! restart, RECONNECT, KILL and SHUTDOWN from the console.

mod common;
use common::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn services(slice: u32) -> String {
    format!("[services.app]\nslice = {slice}\ncheckout_timeout = \"5s\"\n")
}

/// Console on, admin HTTP off (tests run in parallel).
fn admin_config(pg: &Pg, services: &str) -> String {
    config(pg, services)
        .replace("[upstreams.primary]", "[admin]\nlisten = \"\"\nusers = [\"postgres\"]\n\n[upstreams.primary]")
}

/// Run a console command; Ok(stdout) or Err(stderr).
fn console(proxy: &Proxy, cmd: &str) -> Result<String, String> {
    let out = psql(&proxy.conninfo().replace("dbname=postgres", "dbname=pgbudget"), &["-c", cmd]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn rewrite(proxy: &Proxy, text: &str) {
    std::fs::write(proxy.dir.path().join("budgets.toml"), text).unwrap();
}

fn hup(proxy: &Proxy) {
    assert!(std::process::Command::new("kill").args(["-HUP", &proxy.pid().to_string()]).status().unwrap().success());
}

async fn wait_log(proxy: &Proxy, needle: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.log().matches(needle).count() < n {
        assert!(Instant::now() < deadline, "no {needle:?} in the log: {}", proxy.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Clients looping short transactions until `stop` (all logged in before this returns); (ok, failures) each.
async fn load(conninfo: String, clients: usize, sql: &'static str, stop: Arc<AtomicU64>) -> Vec<Looper> {
    let mut handles = Vec::new();
    for _ in 0..clients {
        let c = connect(&conninfo).await.unwrap();
        let stop = stop.clone();
        handles.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0, Vec::new());
            while stop.load(Ordering::Relaxed) == 0 {
                match c.batch_execute(sql).await {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        failed.push(e.to_string());
                        if failed.len() >= 100 || c.is_closed() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (ok, failed)
        }));
    }
    handles
}

type Looper = tokio::task::JoinHandle<(u64, Vec<String>)>;

async fn finish(hs: Vec<Looper>) -> (u64, Vec<String>) {
    let (mut ok, mut failed) = (0, Vec::new());
    for h in hs {
        let (o, f) = h.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    (ok, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_raises_and_lowers_a_budget_under_load_and_refuses_bad_files() {
    let pg = Pg::start();
    let admin = connect(&pg.conninfo()).await.unwrap();
    let proxy = Proxy::start(&admin_config(&pg, &services(4)));
    let stop = Arc::new(AtomicU64::new(0));
    let clients = load(proxy.conninfo(), 10, "select pg_sleep(0.02)", stop.clone()).await;

    let peak = |limit: Duration| {
        let admin = &admin;
        async move {
            let (mut peak, until) = (0, Instant::now() + limit);
            while Instant::now() < until {
                peak = peak.max(server_conns(admin, "app").await);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            peak
        }
    };
    let p = peak(Duration::from_millis(700)).await;
    assert_eq!(
        p,
        4,
        "the starting share is used in full: {}",
        proxy.log().lines().rev().take(15).collect::<Vec<_>>().join("\n")
    );

    rewrite(&proxy, &admin_config(&pg, &services(8)));
    hup(&proxy);
    wait_log(&proxy, "configuration reloaded", 1).await;
    assert_eq!(peak(Duration::from_millis(1000)).await, 8, "a raised budget is used at once");

    rewrite(&proxy, &admin_config(&pg, &services(3)));
    hup(&proxy);
    wait_log(&proxy, "configuration reloaded", 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // in-flight transactions end; extra servers close
    assert!(peak(Duration::from_millis(800)).await <= 3, "a lowered budget holds after in-flight work ends");

    // An invalid file is refused with its reason; the old configuration (share 3) stays in force.
    rewrite(&proxy, &admin_config(&pg, &services(1000)));
    let err = console(&proxy, "RELOAD").unwrap_err();
    assert!(err.contains("exceeds the ceiling"), "{err}");
    let text = admin_config(&pg, &services(3)).replace("ceiling = 90", "ceiling = 80");
    rewrite(&proxy, &text);
    let err = console(&proxy, "RELOAD").unwrap_err();
    assert!(err.contains("upstreams.primary") && err.contains("restart"), "{err}");
    let pools = console(&proxy, "SHOW POOLS").unwrap();
    let row: Vec<&str> = pools.lines().find(|l| l.contains("|app|rw|")).expect("app pool row").split('|').collect();
    assert_eq!((row[11], row[12]), ("3", "3"), "share and slice still the old ones: {pools}");
    assert!(peak(Duration::from_millis(500)).await <= 3);

    stop.store(1, Ordering::Relaxed);
    let (ok, failed) = finish(clients).await;
    assert!(failed.is_empty(), "no transaction failed across reloads: {:?}", &failed[..failed.len().min(3)]);
    println!("reload under load: {ok} transactions, 0 failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_around_a_postgres_restart_lose_no_transaction() {
    let mut pg = Pg::start();
    let admin = connect(&pg.conninfo()).await.unwrap();
    admin.batch_execute("create table t (id serial primary key, x int)").await.unwrap();
    drop(admin);
    let proxy = Proxy::start(&admin_config(&pg, &services(3)));
    let stop = Arc::new(AtomicU64::new(0));
    let clients = load(proxy.conninfo(), 4, "begin; insert into t (x) values (1); commit", stop.clone()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let t = Instant::now();
    console(&proxy, "PAUSE app").expect("PAUSE completes once transactions end");
    println!("PAUSE took {:?}", t.elapsed());
    pg.restart();
    console(&proxy, "RESUME app").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(1, Ordering::Relaxed);
    let (ok, failed) = finish(clients).await;
    assert!(failed.is_empty(), "no transaction lost: {:?}", &failed[..failed.len().min(3)]);
    let admin = connect(&pg.conninfo()).await.unwrap();
    let rows: i64 = admin.query_one("select count(*) from t", &[]).await.unwrap().get(0);
    assert_eq!(rows as u64, ok, "every committed transaction is in the table");
    assert!(ok > 10);
}

async fn pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("select pg_backend_pid()", &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_kill_and_shutdown_from_the_console() {
    let pg = Pg::start();
    let admin = connect(&pg.conninfo()).await.unwrap();
    let mut proxy = Proxy::start(&admin_config(&pg, &services(3)));
    let a = connect(&proxy.conninfo()).await.unwrap();
    let first = pid(&a).await;
    console(&proxy, "RECONNECT").unwrap();
    let second = pid(&a).await;
    assert_ne!(first, second, "RECONNECT replaces server connections");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gone: i64 =
        admin.query_one("select count(*) from pg_stat_activity where pid = $1", &[&first]).await.unwrap().get(0);
    assert_eq!(gone, 0, "the retired backend is closed");

    a.batch_execute("begin").await.unwrap();
    console(&proxy, "KILL app").unwrap();
    let err = a.simple_query("select 1").await.unwrap_err();
    assert!(a.is_closed() || err.code().is_some_and(|c| c.code() == "57P01"), "{err}");
    let pools = console(&proxy, "SHOW POOLS").unwrap();
    let row: Vec<&str> = pools.lines().find(|l| l.contains("|app|rw|")).expect("app pool row").split('|').collect();
    assert_eq!(row[14], "yes", "KILL leaves the pool paused: {pools}");
    let b = connect(&proxy.conninfo()).await.unwrap();
    let waiting = tokio::spawn(async move { b.simple_query("select 1").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a killed service holds new work until RESUME");
    console(&proxy, "RESUME").unwrap();
    tokio::time::timeout(Duration::from_secs(3), waiting).await.unwrap().unwrap().expect("served after RESUME");

    console(&proxy, "SHUTDOWN").unwrap();
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", proxy.port)).is_ok() {
        assert!(t.elapsed() < Duration::from_secs(10), "SHUTDOWN stops the proxy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(proxy.terminate(), Some(0));
}
