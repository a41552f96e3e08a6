//! Memory per idle client: N clients logged in through pgbudget in transaction mode, holding no server, and the
//! proxy's RSS before and after. Ignored by default (it opens thousands of sockets); run it as
//! `ulimit -n 20000; IDLE_CLIENTS=5000 cargo test --release --test idle_memory -- --ignored --nocapture`.

mod common;
#[path = "common/raw.rs"]
mod raw;
use common::*;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Log in with trust auth and read up to ReadyForQuery.
async fn idle_client(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    s.write_all(&raw::startup(raw::V3, &raw::params("postgres"))).await.unwrap();
    loop {
        match raw::read_msg(&mut s, Duration::from_secs(10)).await {
            Ok(Some((b'Z', _))) => return s,
            Ok(Some((b'E', body))) => panic!("login refused: {:?}", raw::error_fields(&body)),
            Ok(Some(_)) => {}
            other => panic!("login failed: {other:?}"),
        }
    }
}

fn open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "opens thousands of sockets; run explicitly (see the module doc)"]
async fn rss_per_idle_client() {
    let n: usize = std::env::var("IDLE_CLIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);
    assert!(open_files_limit() > 2 * n as u64 + 100, "raise the open-files limit first: ulimit -n {}", 2 * n + 1000);
    let pg = Pg::start();
    let services = "[services.app]\nslice = 4\npool_mode = \"transaction\"\n";
    let cfg = config(&pg, services)
        .replace("[upstreams.primary]", "[auth]\nmethod = \"trust\"\n\n[upstreams.primary]")
        .replace("drain_timeout = \"10s\"\n", &format!("drain_timeout = \"10s\"\nmax_pending_logins = {}\n", n + 10));
    let proxy = Proxy::start(&cfg);
    // Warm up: one client runs a query (pool, template, buffers), then everything settles.
    let warm = connect(&format!("{} ", proxy.conninfo())).await.unwrap();
    warm.simple_query("select 1").await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = raw::rss_kib(proxy.pid());
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(idle_client(proxy.port).await);
    }
    // Buffers are given back after a second of idling.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = raw::rss_kib(proxy.pid());
    let per = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
    println!("idle_memory: {n} idle clients: RSS {before} KiB -> {after} KiB, {per:.0} bytes per idle client");
    assert!(per <= 8.0 * 1024.0, "{per:.0} bytes per idle client (target: at most 8 KiB)");
    warm.simple_query("select 1").await.unwrap();
    drop(clients);
}
