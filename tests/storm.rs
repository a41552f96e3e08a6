//! A 200-client storm on one service (tokio-postgres, then pgbench) is shed with 53300 within its bounds
//! while a second service keeps its share and its latency. Its own test binary, so it runs alone.

mod common;
use common::*;
use std::time::{Duration, Instant};

/// Per-request latencies of a client loop, and the error code and latency of each failure.
type Tally = (Vec<Duration>, Vec<(String, Duration)>);

async fn hammer(conninfo: String, sql: &'static str, start: Instant, until: Instant) -> Tally {
    let client = match connect(&conninfo).await {
        Ok(c) => c,
        Err(e) => return (vec![], vec![(e.code().map(|c| c.code().to_owned()).unwrap_or_default(), Duration::ZERO)]),
    };
    tokio::time::sleep_until(start.into()).await;
    let (mut ok, mut failed) = (Vec::new(), Vec::new());
    while Instant::now() < until {
        let t = Instant::now();
        match client.simple_query(sql).await {
            Ok(_) => ok.push(t.elapsed()),
            Err(e) => {
                failed.push((e.code().map(|c| c.code().to_owned()).unwrap_or_else(|| e.to_string()), t.elapsed()));
                tokio::time::sleep(Duration::from_millis(50)).await; // an application's back-off
            }
        }
    }
    (ok, failed)
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v.get(((v.len() as f64 - 1.0) * p) as usize).copied().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_on_one_service_is_shed_while_another_keeps_its_share() {
    let pg = Pg::start();
    let admin = connect(&pg.conninfo()).await.unwrap();
    let cfg = format!(
        "[proxy]\nmode = \"shared\"\nservice_from = \"application_name\"\ntrust_application_name = true\n[auth]\nmethod = \"trust\"\n\n\
         [upstreams.primary]\nurl = \"{}\"\n\
         ceiling = 40\n\n[services.hot]\nslice = 10\ncheckout_timeout = \"1s\"\n\
         [services.hot.admission]\nhard_reject = 0.88\nmax_waiting = 10\n\
         [services.calm]\nslice = 5\ncheckout_timeout = \"1s\"\n",
        pg.url()
    );
    let proxy = Proxy::start(&cfg);
    let calm = format!("{} application_name=calm", proxy.conninfo());
    let hot = format!("{} application_name=hot", proxy.conninfo());

    let run_calm = |secs: u64| {
        let start = Instant::now() + Duration::from_millis(300);
        let until = start + Duration::from_secs(secs);
        (0..4).map(|_| tokio::spawn(hammer(calm.clone(), "select pg_sleep(0.005)", start, until))).collect::<Vec<_>>()
    };
    let collect = |hs: Vec<tokio::task::JoinHandle<Tally>>| async move {
        let (mut ok, mut failed) = (Vec::new(), Vec::new());
        for h in hs {
            let (o, f) = h.await.unwrap();
            ok.extend(o);
            failed.extend(f);
        }
        (ok, failed)
    };
    let (mut base, base_err) = collect(run_calm(2)).await;
    assert!(base_err.is_empty(), "{base_err:?}");

    // 200 clients log in first, then all start at once.
    let start = Instant::now() + Duration::from_secs(3);
    let until = start + Duration::from_secs(4);
    let storm: Vec<_> =
        (0..200).map(|_| tokio::spawn(hammer(hot.clone(), "select pg_sleep(0.05)", start, until))).collect();
    tokio::time::sleep_until((start + Duration::from_millis(200)).into()).await;
    let calm_during = run_calm(3);
    let mut peak_hot = 0;
    while Instant::now() < until {
        peak_hot = peak_hot.max(server_conns(&admin, "hot").await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut hot_ok, hot_err) = collect(storm).await;
    let (mut during, calm_err) = collect(calm_during).await;

    assert!(peak_hot <= 10, "hot stayed within its share: {peak_hot}");
    assert!(!hot_ok.is_empty() && !hot_err.is_empty(), "the storm was served in part and shed in part");
    assert!(hot_err.iter().all(|(c, _)| c == "53300"), "only 53300: {:?}", &hot_err[..hot_err.len().min(5)]);
    let mut waits: Vec<Duration> = hot_err.iter().map(|(_, d)| *d).collect();
    waits.sort();
    println!(
        "slowest refusals: {:?}; over 1.5s: {}",
        &waits[waits.len().saturating_sub(5)..],
        waits.iter().filter(|d| **d > Duration::from_millis(1500)).count()
    );
    let slowest_refusal = hot_err.iter().map(|(_, d)| *d).max().unwrap();
    assert!(
        slowest_refusal < Duration::from_millis(1500),
        "no client waits past checkout_timeout: {slowest_refusal:?}"
    );
    assert!(calm_err.is_empty(), "calm kept its share: {:?}", &calm_err[..calm_err.len().min(5)]);
    let (b50, b99, d50, d99) =
        (pct(&mut base, 0.5), pct(&mut base, 0.99), pct(&mut during, 0.5), pct(&mut during, 0.99));
    println!(
        "hot: {} served (p50 {:?}), {} shed; calm p50/p99 before {b50:?}/{b99:?}, during {d50:?}/{d99:?}",
        hot_ok.len(),
        pct(&mut hot_ok, 0.5),
        hot_err.len()
    );
    // Two shared cores run 200 storm clients too: allow CPU noise, but no queueing behind the storm.
    assert!(d50 < b50 * 4 + Duration::from_millis(20), "calm p50 {d50:?} vs {b50:?} before");

    // The same storm from pgbench: 200 clients, every refusal is our 53300 text, nobody hangs.
    let script = proxy.dir.path().join("sleep.sql");
    std::fs::write(&script, "select pg_sleep(0.05);\n").unwrap();
    let t = Instant::now();
    let out = std::process::Command::new(pgbench_bin(&pg))
        .args(["-h", "127.0.0.1", "-p", &proxy.port.to_string(), "-U", "postgres", "-n", "-c", "200", "-j", "2"])
        .args(["-T", "3", "-f"])
        .arg(&script)
        .arg("postgres")
        .env("PGAPPNAME", "hot")
        .output()
        .expect("pgbench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(!errors.is_empty(), "200 clients on a share of 10 must overflow: {stderr}");
    assert!(errors.iter().all(|l| l.contains("pgbudget: service \"hot\"")), "{:?}", &errors[..errors.len().min(3)]);
    assert!(t.elapsed() < Duration::from_secs(10), "pgbench finished in {:?}", t.elapsed());
    println!("pgbench: {} clients refused with 53300 in {:?}", errors.len(), t.elapsed());
}
