//! Transaction mode's backend pid against a direct connection: BackendKeyData names a real server of the
//! client's pool (its home), `pg_backend_pid()` returns it, `pg_terminate_backend()` of it ends that client
//! (idle or not) and no other, and cancel keys that share a home pid still reach only their own client.

mod common;
#[path = "common/raw.rs"]
mod raw;

use common::*;
use raw::{cancel_request, params, Raw};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

/// pgbudget in transaction mode for service `app` with a share of `slice`.
fn start(pg: &Pg, slice: u32) -> Proxy {
    let services = format!("[services.app]\nslice = {slice}\ncheckout_timeout = \"3s\"\npool_mode = \"transaction\"\n");
    Proxy::start(&config(pg, &services).replace("[proxy]\n", "[proxy]\nslice_floor = 1\n"))
}

async fn login(port: u16) -> Raw {
    Raw::login(port, &params("postgres"), PG_PASSWORD).await.unwrap_or_else(|e| panic!("login on {port}: {e:?}"))
}

async fn one(c: &mut Raw, sql: &str) -> String {
    let r = c.simple(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    assert!(r.error.is_none(), "{sql}: {:?}", r.error);
    r.rows[0][0].clone().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_backend_key_pid_is_pg_backend_pid() {
    let pg = Pg::start();
    let proxy = start(&pg, 3);
    let (mut a, mut b) = (login(proxy.port).await, login(proxy.port).await);
    assert_ne!(a.pid, b.pid, "a share with room gives each client its own home");
    for round in 0..5 {
        // Interleaved transactions: each client gets its home back every time.
        assert_eq!(one(&mut a, "select pg_backend_pid()").await, a.pid.to_string(), "a, round {round}");
        assert_eq!(one(&mut b, "select pg_backend_pid()").await, b.pid.to_string(), "b, round {round}");
    }
    let adm = connect(&pg.conninfo()).await.unwrap();
    let backends: i64 = adm
        .query_one("select count(*) from pg_stat_activity where pid = any($1)", &[&vec![a.pid, b.pid]])
        .await
        .unwrap()
        .get(0);
    assert_eq!(backends, 2, "both pids are live Postgres backends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pid_query_waits_for_its_home_held_by_another_client() {
    let pg = Pg::start();
    let proxy = start(&pg, 1);
    let (mut a, mut b) = (login(proxy.port).await, login(proxy.port).await);
    assert_eq!(a.pid, b.pid, "share 1: both are homed on the one server");
    a.simple("begin").await.unwrap();
    let t = Instant::now();
    let waiter = tokio::spawn(async move {
        let pid = one(&mut b, "select pg_backend_pid()").await;
        (pid, t.elapsed(), b)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.simple("commit").await.unwrap();
    let (pid, waited, b) = waiter.await.unwrap();
    assert_eq!(pid, b.pid.to_string());
    assert!(waited >= Duration::from_millis(300), "b ran before a released the server: {waited:?}");
}

/// Terminate `victim`'s pid from an admin connection; what the victim's socket then holds within 3 s
/// without sending anything: the FATAL's (severity, SQLSTATE) and whether the connection closed; and how
/// long after the terminate returned the FATAL arrived.
async fn terminated_while_idle(
    adm: &tokio_postgres::Client,
    victim: &mut Raw,
) -> ((bool, Option<(String, String)>, bool), Duration) {
    let killed: bool = adm.query_one("select pg_terminate_backend($1)", &[&victim.pid]).await.unwrap().get(0);
    let t = Instant::now();
    let (mut fatal, mut after) = (None, Duration::MAX);
    let closed = loop {
        match timeout(Duration::from_secs(3), victim.recv()).await {
            Err(_) => break false,
            Ok(Err(_)) => break true,
            Ok(Ok((b'E', body))) => {
                let e = raw::error_fields(&body);
                fatal = Some((e.severity, e.code));
                after = t.elapsed();
            }
            Ok(Ok(_)) => {}
        }
    };
    ((killed, fatal, closed), after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_the_home_pid_ends_that_idle_client_only() {
    let pg = Pg::start();
    let proxy = start(&pg, 3);
    let adm = connect(&pg.conninfo()).await.unwrap();
    let mut direct = login(pg.port).await;
    let (want, direct_after) = terminated_while_idle(&adm, &mut direct).await;
    assert_eq!(want, (true, Some(("FATAL".into(), "57P01".into())), true), "direct");

    let mut bystander = login(proxy.port).await;
    let mut victim = login(proxy.port).await;
    assert_ne!(victim.pid, bystander.pid);
    assert_eq!(one(&mut victim, "select pg_backend_pid()").await, victim.pid.to_string());
    let (got, after) = terminated_while_idle(&adm, &mut victim).await;
    assert_eq!(got, want, "through pgbudget, idle victim (left) vs direct (right)");
    // The parked server's socket is watched: the client hears at once, as direct (asyncpg's pool releases a
    // connection 0.2 s after terminating it and expects it closed by then).
    assert!(after < Duration::from_millis(150), "told after {after:?} (direct: {direct_after:?})");
    assert_eq!(one(&mut bystander, "select 1").await, "1", "the other client is untouched");
    let mut fresh = login(proxy.port).await;
    assert_eq!(one(&mut fresh, "select pg_backend_pid()").await, fresh.pid.to_string(), "a new client after it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_the_home_pid_fails_the_next_statement_as_direct() {
    let pg = Pg::start();
    let proxy = start(&pg, 2);
    let adm = connect(&pg.conninfo()).await.unwrap();
    let mut outcome = Vec::new();
    for port in [pg.port, proxy.port] {
        let mut c = login(port).await;
        let pid = one(&mut c, "select pg_backend_pid()").await;
        let killed: bool = adm.query_one("select pg_terminate_backend($1)", &[&c.pid]).await.unwrap().get(0);
        // psycopg2's test_external_close: the very next statement, 1 ms later.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let next = c.simple("select 1").await.map(|r| r.rows.len()).map_err(|e| (e.severity, e.code));
        outcome.push((pid == c.pid.to_string(), killed, next));
    }
    assert_eq!(outcome[1], outcome[0], "proxy (right) vs direct (left): pid matched, terminated, next statement");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_keys_sharing_a_home_pid_reach_only_their_client() {
    let pg = Pg::start();
    let proxy = start(&pg, 2);
    // Two servers, three clients: the third shares a home (and so a pid) with one of the first two.
    let (a, b, mut c) = (login(proxy.port).await, login(proxy.port).await, login(proxy.port).await);
    assert_ne!(a.pid, b.pid);
    let twin = if c.pid == a.pid { a } else { b };
    assert_eq!(c.pid, twin.pid, "the third client shares a home pid");
    assert_ne!(c.secret, twin.secret);
    let mut twin = twin;
    twin.s.write_all(&raw::query("select pg_sleep(2)")).await.unwrap();
    c.s.write_all(&raw::query("select pg_sleep(2)")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut cancel = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    cancel.write_all(&cancel_request(c.pid, c.secret)).await.unwrap();
    let _ = cancel.read(&mut [0u8; 1]).await;
    let (rc, rt) = tokio::join!(c.reply(), twin.reply());
    let code =
        |r: &Result<raw::Reply, raw::PgError>| r.as_ref().ok().and_then(|r| r.error.as_ref().map(|e| e.code.clone()));
    assert_eq!(code(&rc).as_deref(), Some("57014"), "c's own query is cancelled");
    assert_eq!(code(&rt), None, "the twin's query with the same pid is not: {rt:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_idle_past_terminate_window_is_shielded_from_its_homes_termination() {
    let pg = Pg::start();
    let services = "[services.app]\nslice = 2\npool_mode = \"transaction\"\nterminate_window = \"300ms\"\n";
    let proxy = Proxy::start(&config(&pg, services).replace("[proxy]\n", "[proxy]\nslice_floor = 1\n"));
    let adm = connect(&pg.conninfo()).await.unwrap();
    let mut c = login(proxy.port).await;
    assert_eq!(one(&mut c, "select pg_backend_pid()").await, c.pid.to_string());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let killed: bool = adm.query_one("select pg_terminate_backend($1)", &[&c.pid]).await.unwrap().get(0);
    assert!(killed);
    // Nothing arrives: the session goes on (the reaper closes the dead server within a second).
    let quiet = timeout(Duration::from_millis(1500), c.recv()).await;
    assert!(quiet.is_err(), "the shielded client got {quiet:?}");
    assert_eq!(one(&mut c, "select 1").await, "1", "its next statement runs on another server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn currval_runs_where_the_clients_last_statement_ran() {
    let pg = Pg::start();
    connect(&pg.conninfo()).await.unwrap().batch_execute("CREATE SEQUENCE hp_seq").await.unwrap();
    let proxy = start(&pg, 2);
    let (mut c, mut d) = (login(proxy.port).await, login(proxy.port).await);
    assert_ne!(c.pid, d.pid);
    let mut x = login(proxy.port).await;
    assert_eq!(x.pid, c.pid, "the third client shares c's idle home");
    d.simple("begin").await.unwrap(); // d holds its home
    x.simple("begin").await.unwrap(); // x holds c's home
                                      // c's nextval waits for a server and gets d's once d commits: not c's home.
    c.s.write_all(&raw::query("select nextval('hp_seq')::text")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    d.simple("commit").await.unwrap();
    let t = Instant::now();
    let r = c.reply().await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(1), "nextval waited {:?}", t.elapsed());
    let next = r.rows[0][0].clone().unwrap();
    // currval follows it there at once, while c's home is still busy (x's transaction is open).
    let t = Instant::now();
    assert_eq!(one(&mut c, "select currval('hp_seq')::text").await, next);
    assert!(t.elapsed() < Duration::from_secs(1), "waited {:?} for its home instead", t.elapsed());
    x.simple("commit").await.unwrap();
}
