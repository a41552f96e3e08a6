//! A client's startup parameters against a direct connection, in both pool modes: the NOTICE Postgres gives
//! at login for an `application_name` longer than an identifier, and `RESET` (`SET .. TO DEFAULT`, `RESET
//! ALL`, `DISCARD ALL`) returning a setting to the value the client started with, not the server's default.

mod common;
#[path = "common/raw.rs"]
mod raw;

use common::*;
use raw::{params, Raw};

/// Log in with `application_name`: the (code, message) of every NoticeResponse before ReadyForQuery.
async fn login_notices(port: u16, app: &str) -> Vec<(String, String)> {
    let mut p: Vec<(&str, &str)> = params("postgres").to_vec();
    p.push(("application_name", app));
    Raw::login(port, &p, PG_PASSWORD).await.unwrap_or_else(|e| panic!("login: {e:?}")).notices
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_too_long_application_name_gets_postgres_notice_in_both_modes() {
    let pg = Pg::start();
    let long = "x".repeat(65);
    let direct = login_notices(pg.port, &long).await;
    assert_eq!(direct.len(), 1, "direct: {direct:?}");
    assert_eq!(direct[0].0, "42622");
    for mode in ["transaction", "session"] {
        let proxy = Proxy::start(&config(&pg, &format!("[services.app]\nslice = 2\npool_mode = \"{mode}\"\n")));
        assert_eq!(login_notices(proxy.port, &long).await, direct, "{mode}: proxy vs direct");
        assert_eq!(login_notices(proxy.port, "short").await, vec![], "{mode}: no notice for a short name");
    }
}

async fn show(c: &mut Raw, what: &str) -> String {
    let r = c.simple(&format!("SHOW {what}")).await.unwrap_or_else(|e| panic!("SHOW {what}: {e:?}"));
    r.rows[0][0].clone().unwrap_or_default()
}

/// Each step is its own statement (as psql and pg_regress send them); the trace is what SHOW said after it.
async fn reset_trace(port: u16) -> Vec<String> {
    let mut p: Vec<(&str, &str)> = params("postgres").to_vec();
    p.extend([("datestyle", "Postgres, MDY"), ("timezone", "PST8PDT")]);
    let mut c = Raw::login(port, &p, PG_PASSWORD).await.unwrap_or_else(|e| panic!("login: {e:?}"));
    let mut trace = Vec::new();
    for step in [
        "SET datestyle = ISO",
        "RESET datestyle",
        "SET timezone = 'UTC'",
        "SET timezone TO DEFAULT",
        "SET datestyle = German",
        "RESET ALL",
        "SET datestyle = SQL",
        "DISCARD ALL",
    ] {
        let r = c.simple(step).await.unwrap_or_else(|e| panic!("{step}: {e:?}"));
        assert!(r.error.is_none(), "{step}: {:?}", r.error);
        trace.push(format!("{step} -> {} / {}", show(&mut c, "datestyle").await, show(&mut c, "timezone").await));
    }
    trace
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_returns_to_the_startup_value_in_both_modes() {
    let pg = Pg::start();
    let direct = reset_trace(pg.port).await;
    assert!(direct[1].ends_with("Postgres, MDY / PST8PDT"), "direct: {direct:?}");
    for mode in ["transaction", "session"] {
        let proxy = Proxy::start(&config(&pg, &format!("[services.app]\nslice = 2\npool_mode = \"{mode}\"\n")));
        assert_eq!(reset_trace(proxy.port).await, direct, "{mode}: proxy (left) vs direct (right)");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_startup_setting_fails_the_login_as_direct_in_session_mode() {
    let pg = Pg::start();
    let proxy = Proxy::start(&config(&pg, "[services.app]\nslice = 2\npool_mode = \"session\"\n"));
    let login = |port: u16| async move {
        let mut p: Vec<(&str, &str)> = params("postgres").to_vec();
        p.push(("datestyle", "Bogus"));
        Raw::login(port, &p, PG_PASSWORD).await.err().map(|e| (e.severity, e.code))
    };
    let direct = login(pg.port).await;
    assert_eq!(direct, Some(("FATAL".into(), "22023".into())), "direct");
    assert_eq!(login(proxy.port).await, direct, "session mode through pgbudget");
    // And the pool still serves everyone else.
    let mut c = Raw::login(proxy.port, &params("postgres"), PG_PASSWORD).await.unwrap();
    assert_eq!(show(&mut c, "datestyle").await, "ISO, MDY");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_is_set_after_another_clients_session_authorization_is_undone() {
    // Transaction mode, share 1: B's SET ROLE is replayed on the server A left under SET SESSION
    // AUTHORIZATION of a role that may not take B's role. The session user must come back first.
    let pg = Pg::start();
    let adm = connect(&pg.conninfo()).await.unwrap();
    adm.batch_execute("CREATE ROLE sa_alice; CREATE ROLE sa_bob").await.unwrap();
    let proxy = Proxy::start(
        &config(&pg, "[services.app]\nslice = 1\npool_mode = \"transaction\"\n")
            .replace("[proxy]\n", "[proxy]\nslice_floor = 1\n"),
    );
    let mut b = Raw::login(proxy.port, &params("postgres"), PG_PASSWORD).await.unwrap();
    let mut a = Raw::login(proxy.port, &params("postgres"), PG_PASSWORD).await.unwrap();
    b.simple("SET ROLE sa_bob").await.unwrap();
    let r = a.simple("SET SESSION AUTHORIZATION sa_alice").await.unwrap();
    assert!(r.error.is_none(), "{:?}", r.error);
    for _ in 0..3 {
        let r = b
            .simple("SELECT current_user::text || '/' || session_user::text")
            .await
            .unwrap_or_else(|e| panic!("B: {e:?}"));
        assert_eq!(r.rows[0][0].as_deref(), Some("sa_bob/postgres"), "{:?}", r.error);
        let r = a
            .simple("SELECT current_user::text || '/' || session_user::text")
            .await
            .unwrap_or_else(|e| panic!("A: {e:?}"));
        assert_eq!(r.rows[0][0].as_deref(), Some("sa_alice/sa_alice"), "{:?}", r.error);
    }
}

/// Bytes that do not frame as a startup packet get no reply, as from Postgres (which only logs "invalid
/// length of startup packet"): node-postgres's `end()` during `connect()` queues its Terminate ahead of the
/// startup packet, and an ErrorResponse then rejected its pending connect (an unhandled rejection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminate_before_the_startup_packet_is_closed_without_a_reply_as_direct() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pg = Pg::start();
    let proxy = Proxy::start(&config(&pg, "[services.app]\nslice = 2\npool_mode = \"transaction\"\n"));
    let mut bytes = raw::msg(b'X', b"");
    bytes.extend(raw::startup(raw::V3, &params("postgres")));
    for (name, port) in [("direct", pg.port), ("pgbudget", proxy.port)] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut got)).await;
        assert!(matches!(read, Ok(Ok(0))), "{name}: closed after {read:?}, sent {got:?}");
    }
    assert!(proxy.log().contains("not a startup packet"), "the refusal is logged:\n{}", proxy.log());
    let c = connect(&proxy.conninfo()).await.expect("the proxy still serves");
    c.simple_query("select 1").await.unwrap();
}
