//! Admission control against a real Postgres: the hard-reject line and the exempt class, queue NOTICEs and
//! leaving the queue (disconnect, cancel), the client timeouts, and a 200-client storm on one service while
//! another keeps its share.

mod common;
use common::*;
use futures_util::StreamExt;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

fn with_admin(cfg: String) -> (String, u16) {
    let port = free_port();
    let cfg = cfg.replace(
        "[upstreams.primary]",
        &format!("[admin]\nlisten = \"127.0.0.1:{port}\"\nusers = [\"postgres\"]\n\n[upstreams.primary]"),
    );
    (cfg, port)
}

async fn metric(port: u16, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap().text().await.unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
            _ => f64::NAN,
        })
        .unwrap_or_else(|| panic!("{name} {labels:?} missing"))
}

/// A client whose notices arrive on a channel and whose connection task can be aborted (a hard disconnect).
struct Watched {
    client: tokio_postgres::Client,
    notices: mpsc::UnboundedReceiver<String>,
    conn: tokio::task::JoinHandle<Option<tokio_postgres::Error>>,
}

async fn watched(conninfo: &str) -> Watched {
    let (client, mut conn) = tokio_postgres::connect(conninfo, NoTls).await.unwrap();
    let (tx, notices) = mpsc::unbounded_channel();
    let conn = tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = stream.next().await {
            match m {
                Ok(AsyncMessage::Notice(n)) => {
                    let _ = tx.send(n.message().to_owned());
                }
                Ok(_) => {}
                Err(e) => return Some(e),
            }
        }
        None
    });
    Watched { client, notices, conn }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_line_refuses_at_once_and_the_exempt_class_uses_the_headroom() {
    let pg = Pg::start();
    let admin = connect(&pg.conninfo()).await.unwrap();
    let (cfg, port) = with_admin(config(
        &pg,
        "[services.app]\nslice = 10\npool_mode = \"session\"\ncheckout_timeout = \"1s\"\n\
         [services.app.admission]\nhard_reject = 0.88\nexempt_application_names = [\"ops\"]\n",
    ));
    let proxy = Proxy::start(&cfg);
    let mut held = Vec::new();
    for _ in 0..9 {
        held.push(connect(&proxy.conninfo()).await.expect("below the line"));
    }
    let t = Instant::now();
    let err = connect(&proxy.conninfo()).await.unwrap_err();
    let db = err.as_db_error().expect("a Postgres error");
    assert_eq!(db.code().code(), "53300");
    assert!(db.message().contains("\"app\"") && db.message().contains("line of 9"), "{}", db.message());
    assert!(t.elapsed() < Duration::from_millis(700), "refused at once, not after a wait: {:?}", t.elapsed());

    let ops = connect(&format!("{} application_name=ops", proxy.conninfo())).await.expect("exempt passes");
    ops.simple_query("select 1").await.unwrap();
    assert_eq!(server_conns(&admin, "app").await, 10);
    // The share itself still holds for the exempt class: the next one waits checkout_timeout, then 53300.
    let t = Instant::now();
    let err = connect(&format!("{} application_name=ops", proxy.conninfo())).await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "53300");
    assert!(t.elapsed() >= Duration::from_millis(900) && t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

    // 8 ordinary + 1 exempt = 9 held: still at the line. One more leaves: room again.
    held.truncate(8);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(connect(&proxy.conninfo()).await.unwrap_err().code().unwrap().code(), "53300");
    held.truncate(7);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = connect(&proxy.conninfo()).await.expect("below the line again");
    again.simple_query("select 1").await.unwrap();

    let d = |decision: &'static str| async move {
        metric(port, "pgbudget_admission_total", &[("service", "app"), ("decision", decision)]).await
    };
    assert_eq!(d("rejected_hard").await, 2.0);
    assert_eq!(d("exempt").await, 1.0);
    assert_eq!(d("timed_out").await, 1.0);
    assert!(d("admitted").await >= 10.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_clients_are_told_their_place_and_leave_on_disconnect_or_cancel() {
    let pg = Pg::start();
    let (cfg, port) =
        with_admin(config(&pg, "[services.app]\nslice = 2\ncheckout_timeout = \"10s\"\nnotice_after = \"300ms\"\n"));
    let proxy = Proxy::start(&cfg);
    let h1 = connect(&proxy.conninfo()).await.unwrap();
    let h2 = connect(&proxy.conninfo()).await.unwrap();
    h1.batch_execute("begin; select 1").await.unwrap();
    h2.batch_execute("begin; select 1").await.unwrap();

    let mut c = watched(&proxy.conninfo()).await;
    let mut d = watched(&proxy.conninfo()).await;
    let e = watched(&proxy.conninfo()).await;
    let cq = c.client.cancel_token();
    let c_query = tokio::spawn(async move {
        let r = c.client.simple_query("select 'c'").await.map(|_| ());
        (r, c.notices.recv().await)
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let d_client = std::sync::Arc::new(d.client);
    let d2 = d_client.clone();
    let d_query = tokio::spawn(async move { d2.simple_query("select 'd'").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let e_client = e.client;
    let e_query = tokio::spawn(async move { e_client.simple_query("select 'e'").await.map(|_| ()) });

    let notice = tokio::time::timeout(Duration::from_secs(3), d.notices.recv()).await.expect("NOTICE in time").unwrap();
    assert!(notice.contains("\"app\"") && notice.contains("1 ahead"), "{notice}");

    cq.cancel_query(NoTls).await.unwrap();
    let (c_result, c_notice) = tokio::time::timeout(Duration::from_secs(3), c_query).await.unwrap().unwrap();
    assert_eq!(c_result.unwrap_err().code().unwrap().code(), "57014");
    assert!(c_notice.unwrap().contains("0 ahead"));
    e.conn.abort(); // a hard disconnect while queued
    let _ = e_query.await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let abandoned = metric(port, "pgbudget_admission_total", &[("service", "app"), ("decision", "abandoned")]).await;
    assert_eq!(abandoned, 2.0);

    // d is next: the first freed server goes to it, not to the clients that left.
    h1.batch_execute("commit").await.unwrap();
    tokio::time::timeout(Duration::from_secs(3), d_query).await.expect("d served").unwrap().unwrap();
    h2.batch_execute("commit").await.unwrap();
    // Nothing leaked: both servers are free for two concurrent transactions.
    h1.batch_execute("begin; select 1").await.unwrap();
    h2.batch_execute("begin; select 1").await.unwrap();
    h1.batch_execute("commit").await.unwrap();
    h2.batch_execute("commit").await.unwrap();
    assert_eq!(metric(port, "pgbudget_pool_size", &[("service", "app"), ("route", "rw")]).await, 2.0);
    assert!(d_client.is_closed() || d_client.simple_query("select 1").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_timeouts_end_idle_clients_and_reuse_their_servers_clean() {
    let pg = Pg::start();
    let admin = connect(&pg.conninfo()).await.unwrap();
    admin.batch_execute("create table t (x int)").await.unwrap();
    let proxy = Proxy::start(&config(
        &pg,
        "[services.app]\nslice = 2\nidle_in_transaction_timeout = \"400ms\"\nclient_idle_timeout = \"1500ms\"\n\
         query_timeout = \"300ms\"\n",
    ));

    let a = watched(&proxy.conninfo()).await;
    a.client.batch_execute("begin; insert into t values (1)").await.unwrap();
    let pid: i32 = a.client.query_one("select pg_backend_pid()", &[]).await.unwrap().get(0);
    let ended = tokio::time::timeout(Duration::from_secs(3), a.conn).await.expect("ended in time").unwrap();
    let db = ended.expect("connection error").as_db_error().cloned().expect("a FATAL from the proxy");
    assert_eq!((db.severity(), db.code().code()), ("FATAL", "25P03"));
    assert!(a.client.simple_query("select 1").await.is_err());

    let b = connect(&proxy.conninfo()).await.unwrap();
    let (pid_b, n): (i32, i64) = {
        let r = b.query_one("select pg_backend_pid(), (select count(*) from t)", &[]).await.unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(pid_b, pid, "the ended client's server is reused");
    assert_eq!(n, 0, "its transaction was rolled back");
    let idle_tx: i64 = admin
        .query_one("select count(*) from pg_stat_activity where state like 'idle in transaction%'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(idle_tx, 0);

    // query_timeout becomes statement_timeout unless the client set its own.
    let err = b.simple_query("select pg_sleep(2)").await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "57014");
    let own = connect(&format!("{} options='-c statement_timeout=0'", proxy.conninfo())).await.unwrap();
    own.simple_query("select pg_sleep(0.5)").await.expect("the client's own statement_timeout wins");

    // client_idle_timeout: a client that sends nothing is ended with 57P05.
    let c = watched(&proxy.conninfo()).await;
    c.client.simple_query("select 1").await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(4), c.conn).await.expect("ended in time").unwrap();
    assert_eq!(ended.unwrap().as_db_error().unwrap().code().code(), "57P05");
}

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
                tokio::time::sleep(Duration::from_millis(20)).await; // an application's back-off
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
        "[proxy]\nmode = \"shared\"\nservice_from = \"application_name\"\n[auth]\nmethod = \"trust\"\n\n\
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
