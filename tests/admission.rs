//! Admission control against a real Postgres: the hard-reject line and the exempt class, queue NOTICEs and
//! leaving the queue (disconnect, cancel), and the client timeouts. The 200-client storm is in `storm.rs`.

mod common;
use common::*;
use futures_util::StreamExt;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

async fn metric(port: u16, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap().text().await.unwrap();
    sample(&text, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} missing"))
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
