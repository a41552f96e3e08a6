//! The admin surface against a real Postgres: the bearer token guards every endpoint except `/health`,
//! `/ready` and `/metrics` (and everything stays open, with a warning, when no token is set); `/ready` answers
//! from a cached probe, so a flood of requests costs the upstream at most one connection, an idle pool
//! connection serves the check without any new one, and a stopped Postgres still turns it 503 in time.

mod common;
use common::*;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// `READY_TIMEOUT` of the proxy: the deadline of one check.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

async fn get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new().get(format!("http://127.0.0.1:{port}{path}"));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// `cfg` with `line` added to its `[admin]` section.
fn admin_line(cfg: &str, line: &str) -> String {
    cfg.replacen("[admin]\n", &format!("[admin]\n{line}\n"), 1)
}

/// Logins of the readiness probe's own connections so far, from the Postgres log (`log_connections = on`).
fn health_logins(pg: &Pg) -> usize {
    pg.log()
        .lines()
        .filter(|l| l.contains("connection authorized") && l.contains("application_name=pgbudget:health"))
        .count()
}

/// The test's own direct connections call themselves this, and are not counted.
const OBSERVER: &str = "admin-surface-observer";

/// A direct connection to Postgres (no proxy), not counted by [`COUNTS`].
async fn observer(pg: &Pg) -> tokio_postgres::Client {
    connect(&format!("{} application_name={OBSERVER}", pg.conninfo())).await.unwrap()
}

/// Client backends other than the test's own: (readiness probe connections, connections no pool of `app`
/// made, all of them).
const COUNTS: &str = "select count(*) filter (where application_name = 'pgbudget:health'), \
     count(*) filter (where application_name not like 'pgbudget:app:%'), count(*) \
     from pg_stat_activity where backend_type = 'client backend' and application_name <> $1";

async fn counts(c: &tokio_postgres::Client) -> (i64, i64, i64) {
    let r = c.query_one(COUNTS, &[&OBSERVER]).await.unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// When the probe's connections last started a statement: one value per check they ran.
const PROBE_QUERIES: &str =
    "select query_start::text from pg_stat_activity where application_name = 'pgbudget:health' and query_start is not null";

/// Samples `pg_stat_activity` on a direct connection until stopped, keeping the peaks of [`COUNTS`] and every
/// `query_start` of the probe's connections seen.
struct Sampler {
    stop: Arc<AtomicBool>,
    peaks: Arc<[AtomicI64; 3]>,
    samples: Arc<AtomicI64>,
    checks: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    async fn start(pg: &Pg) -> Sampler {
        let c = observer(pg).await;
        let stop = Arc::new(AtomicBool::new(false));
        let peaks: Arc<[AtomicI64; 3]> = Arc::new(Default::default());
        let samples = Arc::new(AtomicI64::new(0));
        let checks: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>> = Default::default();
        let (s, p, n, q) = (stop.clone(), peaks.clone(), samples.clone(), checks.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                let (a, b, all) = counts(&c).await;
                for (peak, v) in p.iter().zip([a, b, all]) {
                    peak.fetch_max(v, Ordering::Relaxed);
                }
                for row in c.query(PROBE_QUERIES, &[]).await.unwrap() {
                    q.lock().unwrap().insert(row.get(0));
                }
                n.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Sampler { stop, peaks, samples, checks, task }
    }

    /// (peaks of [`COUNTS`], number of samples taken, checks seen on the probe's connections).
    async fn stop(self) -> ([i64; 3], i64, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        let peaks = std::array::from_fn(|i| self.peaks[i].load(Ordering::Relaxed));
        (peaks, self.samples.load(Ordering::Relaxed), self.checks.lock().unwrap().len())
    }
}

fn parse_time(v: &serde_json::Value) -> SystemTime {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    humantime_serde::re::humantime::parse_rfc3339(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_guards_everything_but_the_open_probes() {
    const TOKEN: &str = "adm1n-T0ken-xyz";
    let pg = Pg::start();
    let (cfg, port) = with_admin(config(&pg, "[services.app]\nslice = 2\n"));
    let cfg = admin_line(&cfg, "api_token_env = \"ADMIN_SURFACE_TOKEN\"");
    let proxy = Proxy::start_env(&cfg, &[("ADMIN_SURFACE_TOKEN", TOKEN)]);
    for path in ["/pools", "/errors", "/errors/health?minutes=5", "/lake/health", "/no-such-endpoint"] {
        let (status, body) = get(port, path, None).await;
        assert_eq!(status, 401, "{path} without a token: {body}");
        let error = json(&body)["error"].as_str().unwrap_or_default().to_owned();
        assert!(error.contains("missing Authorization header") && error.contains("ADMIN_SURFACE_TOKEN"), "{body}");
        let (status, body) = get(port, path, Some("wrong-token-abc")).await;
        assert_eq!(status, 401, "{path} with a wrong token: {body}");
        assert!(json(&body)["error"].as_str().unwrap().contains("wrong bearer token"), "{body}");
        assert!(!body.contains("wrong-token-abc") && !body.contains(TOKEN), "a token is echoed: {body}");
    }
    // Not a bearer token at all.
    let r = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/pools"))
        .header("authorization", format!("Basic {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"pgbudget admin\"");
    assert!(r.text().await.unwrap().contains("is not `Bearer <token>`"));

    let (status, body) = get(port, "/pools", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["budget"][0]["service"], "app");
    for path in ["/errors", "/errors/health?minutes=5"] {
        assert_eq!(get(port, path, Some(TOKEN)).await.0, 200, "{path}");
    }
    #[cfg(feature = "lake")]
    assert_eq!(json(&get(port, "/lake/health", Some(TOKEN)).await.1)["enabled"], false);
    assert_eq!(get(port, "/no-such-endpoint", Some(TOKEN)).await.0, 404);

    // The probes and the scrape stay open.
    for path in ["/health", "/ready", "/metrics"] {
        let (status, body) = get(port, path, None).await;
        assert_eq!(status, 200, "{path} without a token: {body}");
    }
    let log = proxy.log();
    assert!(log.contains("need the bearer token"), "{log}");
    assert!(!log.contains("are open to anyone"), "{log}");
    assert!(!log.contains(TOKEN) && !log.contains("wrong-token-abc"), "a token reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_admin_endpoints_stay_open_and_say_so() {
    let pg = Pg::start();
    let (cfg, port) = with_admin(config(&pg, "[services.app]\nslice = 2\n"));
    // Empty counts as unset.
    let proxy = Proxy::start_env(&cfg, &[("PGBUDGET_ADMIN_TOKEN", "")]);
    for path in ["/pools", "/errors", "/errors/health", "/health", "/ready", "/metrics"] {
        let (status, body) = get(port, path, None).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    // A token sent anyway changes nothing.
    assert_eq!(get(port, "/pools", Some("whatever")).await.0, 200);
    #[cfg(feature = "lake")]
    {
        let r = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/lake/query"))
            .header("content-type", "application/json")
            .body(r#"{"sql": "select 1"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "the lake API needs a token to be on");
        assert!(r.text().await.unwrap().contains("the lake API is off: set PGBUDGET_ADMIN_TOKEN"));
    }
    let log = proxy.log();
    let warnings = log.lines().filter(|l| l.contains("are open to anyone who reaches the listener")).count();
    assert_eq!(warnings, 1, "one startup warning:\n{log}");
    assert!(log.lines().any(|l| l.contains("are open") && l.contains("WARN") && l.contains("PGBUDGET_ADMIN_TOKEN")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_ready_requests_cost_at_most_one_upstream_connection() {
    let pg = Pg::start();
    // Default ready_interval (5 s); the harness's upstream has reserved = 2, so the probe's one connection
    // is counted inside it. The flood is paced to last longer than one interval, so its results go stale once.
    let (cfg, port) = with_admin(config(&pg, "[services.app]\nslice = 4\n"));
    let _proxy = Proxy::start(&cfg);
    let direct = observer(&pg).await;
    assert_eq!(counts(&direct).await, (0, 0, 0), "nothing connected before the flood");
    let logins_before = health_logins(&pg);
    let sampler = Sampler::start(&pg).await;
    let started = Instant::now();
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/ready");
    let workers: Vec<_> = (0..50)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let mut statuses = Vec::with_capacity(20);
                for _ in 0..20 {
                    let r = client.get(&url).send().await.unwrap();
                    statuses.push(r.status().as_u16());
                    let _ = r.bytes().await;
                    tokio::time::sleep(Duration::from_millis(280)).await;
                }
                statuses
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for w in workers {
        statuses.extend(w.await.unwrap());
    }
    let elapsed = started.elapsed();
    let ([peak_health, peak_other, peak_all], samples, checks) = sampler.stop().await;
    let logins = health_logins(&pg) - logins_before;
    println!(
        "1000 /ready in {} ms; peak connections: health {peak_health}, non-pool {peak_other}, all {peak_all} \
         ({samples} samples); probe logins {logins}; checks seen {checks}",
        elapsed.as_millis()
    );
    assert_eq!(statuses.len(), 1000);
    assert!(statuses.iter().all(|&s| s == 200), "not all 200: {statuses:?}");
    assert!(elapsed <= Duration::from_secs(10), "1000 requests took {elapsed:?}");
    assert!(samples >= 10, "the sampler ran during the flood ({samples} samples)");
    assert!(peak_all <= 1 && peak_other <= 1, "peak upstream connections during the flood: {peak_all}");
    // The sampler sees the one connection it counts: the probe's own (kept while its result is fresh).
    assert_eq!(peak_health, 1, "the probe's connection was never seen");
    assert!(logins <= 1, "{logins} probe connections were opened for one flood");
    // One check per 5 s interval: at the start and once after it went stale (the flood lasts 5.6 s or more).
    let intervals = elapsed.as_secs() / 5 + 1;
    assert!(elapsed > Duration::from_secs(5) && (1..=intervals as usize).contains(&checks), "{checks} checks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_turns_503_naming_the_upstream_and_since_when_then_recovers() {
    let interval = Duration::from_secs(1);
    let mut pg = Pg::start();
    let (cfg, port) = with_admin(config(&pg, "[services.app]\nslice = 2\nconnect_timeout = \"1s\"\n"));
    let _proxy = Proxy::start(&admin_line(&cfg, "ready_interval = \"1s\""));
    let (status, body) = get(port, "/ready", None).await;
    assert_eq!(status, 200, "{body}");
    let ready = json(&body);
    let checked_at = parse_time(&ready["upstreams"]["primary"]["checked_at"]);
    assert!(SystemTime::now().duration_since(checked_at).unwrap() < Duration::from_secs(5), "{body}");

    pg.stop();
    let stopped = Instant::now();
    let failing = loop {
        let (status, body) = get(port, "/ready", None).await;
        if status == 503 {
            break json(&body);
        }
        assert_eq!(status, 200, "{body}");
        assert!(stopped.elapsed() < interval + READY_TIMEOUT + Duration::from_secs(1), "still ready: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("503 {} ms after Postgres stopped", stopped.elapsed().as_millis());
    assert_eq!(failing["status"], "not ready", "{failing}");
    let primary = &failing["failing"]["upstream:primary"];
    assert!(!primary["error"].as_str().unwrap_or_default().is_empty(), "{failing}");
    let since = parse_time(&primary["since"]);
    let first_check = parse_time(&primary["checked_at"]);

    // Later failing checks keep the first `since`.
    tokio::time::sleep(interval + Duration::from_millis(200)).await;
    let (status, body) = get(port, "/ready", None).await;
    assert_eq!(status, 503, "{body}");
    let again = json(&body);
    let primary = &again["failing"]["upstream:primary"];
    assert_eq!(parse_time(&primary["since"]), since, "{again}");
    assert!(parse_time(&primary["checked_at"]) > first_check, "no new check after the interval: {again}");

    pg.restart();
    let restarted = Instant::now();
    loop {
        let (status, body) = get(port, "/ready", None).await;
        if status == 200 {
            assert!(json(&body)["upstreams"]["primary"]["checked_at"].is_string(), "{body}");
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(restarted.elapsed() < interval + READY_TIMEOUT + Duration::from_secs(1), "not ready again: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("200 {} ms after Postgres restarted", restarted.elapsed().as_millis());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_checks_through_an_idle_pool_connection_without_a_new_one() {
    let pg = Pg::start();
    let (cfg, port) = with_admin(config(&pg, "[services.app]\nslice = 2\npool_mode = \"transaction\"\n"));
    let _proxy = Proxy::start(&admin_line(&cfg, "ready_interval = \"500ms\""));
    let client = connect(&_proxy.conninfo()).await.unwrap();
    client.simple_query("select 1").await.unwrap();
    let direct = observer(&pg).await;
    let pool_pids =
        "select array_agg(pid order by pid) from pg_stat_activity where application_name = 'pgbudget:app:rw'";
    let before: Vec<i32> = direct.query_one(pool_pids, &[]).await.unwrap().get(0);
    assert_eq!(before.len(), 1, "one idle pool connection");
    assert_eq!(counts(&direct).await, (0, 0, 1));
    let logins_before = health_logins(&pg);

    let sampler = Sampler::start(&pg).await;
    // Several intervals, so several checks run.
    let until = Instant::now() + Duration::from_millis(2200);
    let mut answers = 0;
    while Instant::now() < until {
        let (status, body) = get(port, "/ready", None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(json(&body)["upstreams"]["primary"]["via"], "pool:app/rw", "{body}");
        answers += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ([peak_health, peak_other, peak_all], samples, _) = sampler.stop().await;
    println!("{answers} /ready answers; peak connections: health {peak_health}, all {peak_all} ({samples} samples)");
    assert!(samples >= 10);
    assert_eq!((peak_health, peak_other, peak_all), (0, 0, 1), "/ready opened a connection");
    assert_eq!(health_logins(&pg), logins_before, "the probe logged in");
    let after: Vec<i32> = direct.query_one(pool_pids, &[]).await.unwrap().get(0);
    assert_eq!(after, before, "the same pool connection serves");
    // The pool connection still serves the client afterwards.
    client.simple_query("select 1").await.unwrap();
}
