//! Fidelity, what a client sees through pgbudget against a direct connection to the same Postgres: session
//! mode's backend pid (BackendKeyData, cancel, pg_terminate_backend, notifications), startup parameters in both
//! modes, and `server_application_name`.

mod common;
#[path = "common/fidelity.rs"]
mod fidelity;
#[path = "common/raw.rs"]
mod raw;

use common::*;
use fidelity::*;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::time::timeout;

// 1. Session mode: the client's pid is its server's.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_backend_key_pid_is_pg_backend_pid() {
    let pg = Pg::start();
    let proxy = start(&pg, 2, SESSION, "");
    let (mut a, mut b) = (login(proxy.port).await, login(proxy.port).await);
    let pa = simple_col(&mut a, "select pg_backend_pid()").await;
    let pb = simple_col(&mut b, "select pg_backend_pid()").await;
    assert_eq!((pa, pb), (vec![a.pid.to_string()], vec![b.pid.to_string()]), "BackendKeyData pid vs pg_backend_pid()");
    assert_ne!(a.pid, b.pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_cancel_via_tokio_postgres_gives_57014() {
    let pg = Pg::start();
    let proxy = start(&pg, 2, SESSION, "");
    let adm = admin(&pg).await;
    let c = connect(&proxy.conninfo()).await.unwrap();
    let token = c.cancel_token();
    let started = Instant::now();
    let q = tokio::spawn(async move { c.simple_query("select pg_sleep(10)").await.map(|_| ()) });
    let until = Instant::now() + Duration::from_secs(5);
    let active = "select count(*) from pg_stat_activity where query = 'select pg_sleep(10)' and state = 'active'";
    while adm.query_one(active, &[]).await.unwrap().get::<_, i64>(0) == 0 {
        assert!(Instant::now() < until, "pg_sleep never became active");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    token.cancel_query(tokio_postgres::NoTls).await.expect("cancel request through the proxy");
    let r = timeout(Duration::from_secs(5), q).await.expect("cancelled query returns within 5 s").unwrap();
    let code = r.err().and_then(|e| e.code().map(|c| c.code().to_owned()));
    assert_eq!(code.as_deref(), Some("57014"), "cancelled query's SQLSTATE");
    assert!(started.elapsed() < Duration::from_secs(3), "cancel took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pg_terminate_backend_ends_proxied_client() {
    let pg = Pg::start();
    let proxy = start(&pg, 2, SESSION, "");
    let adm = admin(&pg).await;
    let mut outcome = Vec::new();
    for port in [pg.port, proxy.port] {
        let mut c = login(port).await;
        let killed: bool = adm.query_one("select pg_terminate_backend($1)", &[&c.pid]).await.unwrap().get(0);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let next = c.simple("select 1").await.map(|r| r.rows.len()).map_err(|e| (e.severity, e.code));
        outcome.push((killed, next));
    }
    assert_eq!(outcome[1], outcome[0], "proxy (right) vs direct (left): terminated, next query");
    let mut fresh = login(proxy.port).await;
    assert_eq!(simple_col(&mut fresh, "select 1").await, s(&["1"]), "a new client after the terminate");
}

#[test]
fn session_asyncpg_server_pid_and_notification_pid() {
    let pg = Pg::start();
    let proxy = start(&pg, 2, SESSION, "");
    let out = script("session", &pg, &proxy);
    assert!(out.contains("fidelity_session: ok"), "{out}");
}

// ---------------------------------------------------------------------------------------------------------
// 2. Startup parameters, both modes.

const STARTUP: [(&str, &str); 4] = [
    ("datestyle", "Postgres, MDY"),
    ("intervalstyle", "iso_8601"),
    ("extra_float_digits", "0"),
    ("options", "-c search_path=foo"),
];
const SETTINGS_Q: &str = "select current_setting('datestyle'), current_setting('intervalstyle'), \
     current_setting('extra_float_digits'), current_setting('search_path'), date '2024-03-05'::text, \
     interval '1 day 2 hours'::text, (1::float8/3)::text";

fn psql_datestyle(port: u16) -> String {
    let out = Command::new("psql")
        .arg(format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"))
        .args(["-X", "-At", "-c", "show datestyle"])
        .env("PGPASSWORD", PG_PASSWORD)
        .env("PGDATESTYLE", "Postgres, MDY")
        .env_remove("PGAPPNAME")
        .output()
        .expect("psql runs");
    format!("{}{}", String::from_utf8_lossy(&out.stdout).trim(), String::from_utf8_lossy(&out.stderr).trim())
}

async fn startup_parameters_reach_server(svc: &str, mode: &str) {
    let pg = Pg::start();
    let proxy = start(&pg, 1, svc, "");
    assert_eq!(psql_datestyle(pg.port), "Postgres, MDY", "direct psql with PGDATESTYLE");
    assert_eq!(psql_datestyle(proxy.port), "Postgres, MDY", "{mode}: psql with PGDATESTYLE through the proxy");
    let want = s(&["Postgres, MDY|iso_8601|0|foo|03-05-2024|P1DT2H|0.333333333333333"]);
    let defaults = s(&["ISO, MDY|postgres|1|\"$user\", public|2024-03-05|1 day 02:00:00|0.3333333333333333"]);
    let mut direct = login_with(pg.port, &STARTUP).await;
    assert_eq!(simple_col(&mut direct, SETTINGS_Q).await, want, "direct with startup parameters");
    let mut direct0 = login(pg.port).await;
    assert_eq!(simple_col(&mut direct0, SETTINGS_Q).await, defaults, "direct without startup parameters");
    let mut a = Some(login_with(proxy.port, &STARTUP).await);
    let c = a.as_mut().unwrap();
    assert_eq!(simple_col(c, SETTINGS_Q).await, want, "{mode}: client with startup parameters");
    let pid_a = simple_col(c, "select pg_backend_pid()").await;
    if mode == "session" {
        a = None; // share 1: the next client gets the same server after its reset
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut b = login(proxy.port).await;
    let pid_b = simple_col(&mut b, "select pg_backend_pid()").await;
    if mode == "session" {
        // Session mode opened A's server with A's settings (its reset values): B gets one opened without them.
        assert_ne!(pid_b, pid_a, "session: a server opened with another client's startup settings");
    } else {
        assert_eq!(pid_b, pid_a, "{mode}: share 1 reuses the server");
    }
    assert_eq!(simple_col(&mut b, SETTINGS_Q).await, defaults, "{mode}: next client without startup parameters");
    if let Some(a) = a.as_mut() {
        assert_eq!(simple_col(a, SETTINGS_Q).await, want, "{mode}: first client again after the second");
    }
    drop((a, b)); // share 1: the script's clients need the server
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = script("startup", &pg, &proxy);
    assert!(out.contains("fidelity_startup: ok"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_reach_server_transaction_mode() {
    startup_parameters_reach_server(TXN, "transaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_reach_server_session_mode() {
    startup_parameters_reach_server(SESSION, "session").await;
}

// ---------------------------------------------------------------------------------------------------------
// 3. server_application_name

async fn app_name(port: u16, name: Option<&str>) -> String {
    let mut info = format!("host=127.0.0.1 port={port} user=postgres password={PG_PASSWORD} dbname=postgres");
    if let Some(n) = name {
        info.push_str(&format!(" application_name={n}"));
    }
    let c = connect(&info).await.unwrap();
    c.query_one("show application_name", &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_application_name_is_the_clients_by_default_and_a_label_on_request() {
    let pg = Pg::start();
    let direct = (app_name(pg.port, None).await, app_name(pg.port, Some("myapp")).await);
    assert_eq!(direct, (String::new(), "myapp".to_owned()), "direct");
    let mut got = Vec::new();
    let runs = [(SESSION, ""), (TXN, ""), (SESSION, "client"), (TXN, "client"), (SESSION, "label"), (TXN, "label")];
    for (svc, policy) in runs {
        let extra = if policy.is_empty() { String::new() } else { format!("server_application_name = \"{policy}\"\n") };
        let proxy = start(&pg, 1, svc, &extra);
        got.push((svc.trim(), policy, app_name(proxy.port, None).await, app_name(proxy.port, Some("myapp")).await));
    }
    let want: Vec<_> = [(SESSION, "", ""), (TXN, "", ""), (SESSION, "client", ""), (TXN, "client", "")]
        .into_iter()
        .chain([(SESSION, "label", "pgbudget:app:rw"), (TXN, "label", "pgbudget:app:rw")])
        .map(|(m, p, none)| (m.trim(), p, none.to_owned(), "myapp".to_owned()))
        .collect();
    assert_eq!(got, want, "(mode, policy, SHOW application_name without a name, with application_name=myapp)");
}

// ---------------------------------------------------------------------------------------------------------
