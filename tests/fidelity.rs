//! Fidelity: what a client sees through pgbudget against what it sees on a direct connection to the same
//! Postgres. Session mode's backend pid (BackendKeyData, cancel, pg_terminate_backend, notifications),
//! startup parameters in both modes, `server_application_name`, and transaction mode's mapping of named
//! prepared statements, driven by a raw protocol client whose replies are compared message by message
//! (type, SQLSTATE and text) with the same exchange on a direct connection. Driver checks (asyncpg,
//! psycopg) are in `tests/drivers/fidelity_drivers.py`.

mod common;
#[path = "common/raw.rs"]
mod raw;

use common::*;
use raw::{bind, error_fields, execute, msg, params, parse, query, sync, Raw};
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::time::timeout;

const TXN: &str = "pool_mode = \"transaction\"\n";
const SESSION: &str = "pool_mode = \"session\"\n";

/// pgbudget for service `app` (share `slice`, `svc` lines) with `proxy_extra` lines in `[proxy]`.
fn start(pg: &Pg, slice: u32, svc: &str, proxy_extra: &str) -> Proxy {
    let services = format!("[services.app]\nslice = {slice}\ncheckout_timeout = \"3s\"\n{svc}");
    // Fidelity is checked with pgbudget's own default for application_name unless `proxy_extra` sets one.
    let cfg = config(pg, &services).replace(LABEL, "");
    Proxy::start(&cfg.replace("[proxy]\n", &format!("[proxy]\nslice_floor = 1\n{proxy_extra}")))
}

async fn login(port: u16) -> Raw {
    login_with(port, &[]).await
}

async fn login_with(port: u16, extra: &[(&str, &str)]) -> Raw {
    let mut p: Vec<(&str, &str)> = params("postgres").to_vec();
    p.extend_from_slice(extra);
    Raw::login(port, &p, PG_PASSWORD).await.unwrap_or_else(|e| panic!("raw login on port {port}: {e:?}"))
}

async fn admin(pg: &Pg) -> tokio_postgres::Client {
    connect(&pg.conninfo()).await.expect("direct admin connection")
}

fn close_stmt(name: &str) -> Vec<u8> {
    msg(b'C', format!("S{name}\0").as_bytes())
}

fn describe_stmt(name: &str) -> Vec<u8> {
    msg(b'D', format!("S{name}\0").as_bytes())
}

fn cstr(b: &[u8]) -> String {
    String::from_utf8_lossy(b.split(|c| *c == 0).next().unwrap_or(b)).into_owned()
}

fn row(body: &[u8]) -> String {
    let n = u16::from_be_bytes([body[0], body[1]]) as usize;
    let (mut at, mut vals) = (2, Vec::new());
    for _ in 0..n {
        let len = i32::from_be_bytes(body[at..at + 4].try_into().unwrap());
        at += 4;
        if len < 0 {
            vals.push("NULL".to_owned());
        } else {
            vals.push(String::from_utf8_lossy(&body[at..at + len as usize]).into_owned());
            at += len as usize;
        }
    }
    vals.join("|")
}

/// Write `parts` in one go, then read to the `syncs`-th ReadyForQuery: the backend messages as a trace
/// (`1` ParseComplete, `2` BindComplete, `3` CloseComplete, `D:<row>`, `C:<tag>`, `E:<code>:<message>`,
/// `E:FATAL:<code>:<message>`, `Z:<status>`; ParameterStatus, notices and notifications are left out).
/// A close or timeout ends the trace with `closed` / `timeout`.
async fn exchange(c: &mut Raw, parts: &[Vec<u8>], syncs: usize) -> Vec<String> {
    let mut t = Vec::new();
    if let Err(e) = c.s.write_all(&parts.concat()).await {
        return vec![format!("write failed: {e}")];
    }
    let mut left = syncs;
    while left > 0 {
        match c.recv().await {
            Ok((b'S' | b'N' | b'A', _)) => {}
            Ok((b'D', body)) => t.push(format!("D:{}", row(&body))),
            Ok((b'C', body)) => t.push(format!("C:{}", cstr(&body))),
            Ok((b'T', body)) => t.push(format!("T:{}", u16::from_be_bytes([body[0], body[1]]))),
            Ok((b'E', body)) => {
                let e = error_fields(&body);
                let fatal = if e.severity == "FATAL" { "FATAL:" } else { "" };
                t.push(format!("E:{fatal}{}:{}", e.code, e.message));
            }
            Ok((b'Z', body)) => {
                t.push(format!("Z:{}", body[0] as char));
                left -= 1;
            }
            Ok((k, _)) => t.push((k as char).to_string()),
            Err(e) => {
                t.push(e.code);
                break;
            }
        }
    }
    t
}

/// One simple query's first column values (panics on error).
async fn simple_col(c: &mut Raw, sql: &str) -> Vec<String> {
    let r = c.simple(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    assert!(r.error.is_none(), "{sql}: {:?}", r.error);
    r.rows.into_iter().map(|r| r.into_iter().map(|v| v.unwrap_or_default()).collect::<Vec<_>>().join("|")).collect()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Bind `name`, Execute, Sync.
fn run(name: &str) -> Vec<Vec<u8>> {
    vec![bind(name), execute(), sync()]
}

/// The last `n` lines of pgbudget's log above DEBUG.
fn log_tail(proxy: &Proxy, n: usize) -> String {
    let log = proxy.log();
    let kept: Vec<&str> = log.lines().filter(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE ")).collect();
    kept[kept.len().saturating_sub(n)..].join("\n")
}

/// Run `tests/drivers/fidelity_drivers.py` with SCENARIO=`scenario` (killed after 40 s); its stdout.
fn script(scenario: &str, pg: &Pg, proxy: &Proxy) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers/fidelity_drivers.py");
    let url = |port: u16| format!("postgres://postgres:{PG_PASSWORD}@127.0.0.1:{port}/postgres");
    let out = Command::new("timeout")
        .args(["-s", "KILL", "40", "python3"])
        .arg(&path)
        .env("SCENARIO", scenario)
        .env("PROXY_DSN", url(proxy.port))
        .env("DIRECT_DSN", url(pg.port))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("PGAPPNAME")
        .output()
        .expect("python3 runs (scripts/driver-deps installs asyncpg and psycopg)");
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "fidelity_drivers.py {scenario} failed ({}):\n--- stdout ---\n{so}\n--- stderr ---\n{se}\n--- pgbudget log ---\n{}",
        out.status,
        log_tail(proxy, 30)
    );
    so.into_owned()
}

// ---------------------------------------------------------------------------------------------------------
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
// 4. Transaction mode, raw protocol: the same exchanges through the proxy and direct.

/// Run `scenario` on a direct connection, then through a transaction-mode proxy (share 1, `svc` lines);
/// assert both traces are equal and return them.
async fn differential<F, Fut>(svc: &str, scenario: F) -> Vec<Vec<String>>
where
    F: Fn(u16, tokio_postgres::Client) -> Fut,
    Fut: std::future::Future<Output = Vec<Vec<String>>>,
{
    let pg = Pg::start();
    let proxy = start(&pg, 1, &format!("{TXN}{svc}"), "");
    let direct = scenario(pg.port, admin(&pg).await).await;
    let proxied = timeout(Duration::from_secs(30), scenario(proxy.port, admin(&pg).await)).await.expect("30 s");
    let diff: Vec<String> = (0..direct.len().max(proxied.len()))
        .filter(|i| direct.get(*i) != proxied.get(*i))
        .map(|i| format!("step {i}:\n  proxy:  {:?}\n  direct: {:?}", proxied.get(i), direct.get(i)))
        .collect();
    assert!(diff.is_empty(), "{}\n--- pgbudget log ---\n{}", diff.join("\n"), log_tail(&proxy, 20));
    direct
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_parse_same_name_twice_in_one_batch_gives_42p05() {
    let t = differential("", |port, _adm| async move {
        let mut c = login(port).await;
        let mut t = vec![exchange(&mut c, &[parse("s1", "select 1"), parse("s1", "select 2"), sync()], 1).await];
        t.push(exchange(&mut c, &run("s1"), 1).await);
        // The same with a Bind in the batch (not answerable without a server).
        let batch = [parse("s2", "select 3"), parse("s2", "select 4"), bind("s2"), execute(), sync()];
        t.push(exchange(&mut c, &batch, 1).await);
        t.push(exchange(&mut c, &run("s2"), 1).await);
        t
    })
    .await;
    assert_eq!(t[0], s(&["1", "E:42P05:prepared statement \"s1\" already exists", "Z:I"]));
    assert_eq!(t[1], s(&["2", "D:1", "C:SELECT 1", "Z:I"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_bind_or_describe_unknown_statement_gives_26000() {
    let t = differential("", |port, _adm| async move {
        let mut c = login(port).await;
        vec![
            exchange(&mut c, &run("nope"), 1).await,
            exchange(&mut c, &[describe_stmt("nope"), sync()], 1).await,
            exchange(&mut c, &[query("select 1")], 1).await,
        ]
    })
    .await;
    assert_eq!(t[0], s(&["E:26000:prepared statement \"nope\" does not exist", "Z:I"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_close_then_bind_gives_26000_and_name_is_reusable() {
    let t = differential("", |port, _adm| async move {
        let mut c = login(port).await;
        vec![
            exchange(&mut c, &[parse("s1", "select 1"), bind("s1"), execute(), sync()], 1).await,
            exchange(&mut c, &[close_stmt("s1"), sync()], 1).await,
            exchange(&mut c, &run("s1"), 1).await,
            exchange(&mut c, &[parse("s1", "select 2"), bind("s1"), execute(), sync()], 1).await,
        ]
    })
    .await;
    assert_eq!(t[1], s(&["3", "Z:I"]));
    assert_eq!(t[2], s(&["E:26000:prepared statement \"s1\" does not exist", "Z:I"]));
    assert_eq!(t[3], s(&["1", "2", "D:2", "C:SELECT 1", "Z:I"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_bind_after_table_dropped_gives_42p01_in_order() {
    let t = differential("", |port, adm| async move {
        adm.batch_execute("drop table if exists d1, d2; create table d1(a int); create table d2(a int)").await.unwrap();
        let mut c = login(port).await;
        let mut t = vec![exchange(&mut c, &[parse("s1", "select a from d1"), sync()], 1).await];
        t.push(exchange(&mut c, &[parse("s2", "select a from d2"), bind("s2"), execute(), sync()], 1).await);
        adm.batch_execute("drop table d1, d2").await.unwrap();
        t.push(exchange(&mut c, &run("s1"), 1).await);
        t.push(exchange(&mut c, &run("s2"), 1).await);
        t.push(exchange(&mut c, &[query("select 7")], 1).await);
        t
    })
    .await;
    assert_eq!(t[2], s(&["E:42P01:relation \"d1\" does not exist", "Z:I"]));
    assert_eq!(t[3], s(&["E:42P01:relation \"d2\" does not exist", "Z:I"]));
}

/// A client Parse of a text that is already prepared on the server (by another client) must still be checked
/// against the catalog: direct, it fails at the Parse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_parse_of_text_another_client_prepared_fails_at_parse_like_direct() {
    differential("", |port, adm| async move {
        adm.batch_execute("drop table if exists d3; create table d3(a int)").await.unwrap();
        let mut x = login(port).await;
        let mut t = vec![exchange(&mut x, &[parse("x", "select a from d3"), bind("x"), execute(), sync()], 1).await];
        adm.batch_execute("drop table d3").await.unwrap();
        let mut y = login(port).await;
        t.push(exchange(&mut y, &[parse("y", "select a from d3"), bind("y"), execute(), sync()], 1).await);
        t
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_pipelined_100_parse_bind_execute_one_sync() {
    let t = differential("", |port, _adm| async move {
        let mut c = login(port).await;
        let mut batch = Vec::new();
        for n in 0..100 {
            batch.extend([parse(&format!("s{n}"), &format!("select {n}")), bind(&format!("s{n}")), execute()]);
        }
        batch.push(sync());
        vec![exchange(&mut c, &batch, 1).await]
    })
    .await;
    assert_eq!(t[0].len(), 401);
    assert_eq!(t[0][4 * 99..], s(&["1", "2", "D:99", "C:SELECT 1", "Z:I"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_max_prepared_statements_2_evicts_and_reprepares_transparently() {
    let pg = Pg::start();
    let proxy = start(&pg, 1, &format!("{TXN}max_prepared_statements = 2\n"), "");
    let mut c = login(proxy.port).await;
    let parses: Vec<_> = (0..6).map(|k| parse(&format!("s{k}"), &format!("select {k} * 10"))).collect();
    let mut batch = parses;
    batch.push(sync());
    assert_eq!(exchange(&mut c, &batch, 1).await, s(&["1", "1", "1", "1", "1", "1", "Z:I"]));
    let mut peak = 0;
    for i in 0..200 {
        let (a, b) = (i % 6, (i + 3) % 6);
        let batch = [bind(&format!("s{a}")), execute(), bind(&format!("s{b}")), execute(), sync()];
        let got = exchange(&mut c, &batch, 1).await;
        let want =
            s(&["2", &format!("D:{}", a * 10), "C:SELECT 1", "2", &format!("D:{}", b * 10), "C:SELECT 1", "Z:I"]);
        assert_eq!(got, want, "iteration {i}\n--- pgbudget log ---\n{}", log_tail(&proxy, 20));
        if i % 20 == 0 {
            let n = simple_col(&mut c, "select count(*) from pg_prepared_statements").await;
            peak = peak.max(n[0].parse::<i32>().unwrap());
        }
    }
    assert!(peak <= 2, "{peak} statements prepared on the server, max_prepared_statements is 2");
}

/// max_prepared_statements = 2: the Close of an evicted statement that an earlier error in the batch skipped
/// must not leave the pool believing it is gone (its re-Parse would then fail with 42P05 on that server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_eviction_skipped_by_batch_error_does_not_break_statement() {
    differential("max_prepared_statements = 2\n", |port, _adm| async move {
        let mut c = login(port).await;
        let p = [parse("a", "select 1"), parse("b", "select 2"), parse("c", "select 3"), sync()];
        let mut t = vec![exchange(&mut c, &p, 1).await];
        t.push(exchange(&mut c, &[bind("a"), execute(), bind("b"), execute(), sync()], 1).await);
        // The unnamed Parse fails: the server skips everything to the Sync (including what the proxy injected).
        t.push(exchange(&mut c, &[parse("", "select )"), bind("c"), execute(), sync()], 1).await);
        t.push(exchange(&mut c, &run("a"), 1).await);
        t.push(exchange(&mut c, &run("c"), 1).await);
        t.push(exchange(&mut c, &run("b"), 1).await);
        t
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_bind_of_unprepared_reserved_name_is_fatal_others_unaffected() {
    let pg = Pg::start();
    let proxy = start(&pg, 1, TXN, "");
    let mut b = login(proxy.port).await;
    let ok = s(&["2", "D:42", "C:SELECT 1", "Z:I"]);
    let first = exchange(&mut b, &[parse("mine", "select 42"), bind("mine"), execute(), sync()], 1).await;
    assert_eq!(first[1..], ok, "the honest client's first batch");
    let fatal = "E:FATAL:08P01";
    let mut a = login(proxy.port).await;
    let t = exchange(&mut a, &run("pgbudget_1"), 1).await;
    assert!(t.len() == 2 && t[0].starts_with(fatal) && t[1] == "closed", "Bind pgbudget_1: {t:?}");
    let mut a2 = login(proxy.port).await;
    let t = exchange(&mut a2, &[parse("x", "select 1"), bind("pgbudget_1"), execute(), sync()], 1).await;
    assert!(t.last().map(String::as_str) == Some("closed") && t.iter().any(|m| m.starts_with(fatal)), "{t:?}");
    let mut a3 = login(proxy.port).await;
    let t = exchange(&mut a3, &[describe_stmt("pgbudget_1"), sync()], 1).await;
    assert!(t.len() == 2 && t[0].starts_with(fatal) && t[1] == "closed", "Describe pgbudget_1: {t:?}");
    assert_eq!(exchange(&mut b, &run("mine"), 1).await, ok, "the honest client after the refusals");
    assert_eq!(simple_col(&mut b, "select 1").await, s(&["1"]));
}

/// A client that never prepared `pgbudget_1` must not be able to take it away from the client that did
/// (protocol Close, or SQL DEALLOCATE); each attack on a fresh proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_close_or_deallocate_of_reserved_name_cannot_break_other_clients() {
    let pg = Pg::start();
    let ok = s(&["2", "D:42", "C:SELECT 1", "Z:I"]);
    let mut report = Vec::new();
    for attack in [vec![close_stmt("pgbudget_1"), sync()], vec![query("deallocate pgbudget_1")]] {
        let proxy = start(&pg, 1, TXN, "");
        let mut b = login(proxy.port).await;
        exchange(&mut b, &[parse("mine", "select 42"), bind("mine"), execute(), sync()], 1).await;
        let before = exchange(&mut b, &run("mine"), 1).await;
        let mut a = login(proxy.port).await;
        let t = exchange(&mut a, &attack, 1).await;
        let after = [exchange(&mut b, &run("mine"), 1).await, exchange(&mut b, &run("mine"), 1).await];
        report.push((String::from_utf8_lossy(&attack[0][..1]).into_owned(), before, t, after));
    }
    for (kind, before, attacker, after) in &report {
        let want = (&ok, [ok.clone(), ok.clone()]);
        assert_eq!((before, after.clone()), want, "{kind} attack (attacker got {attacker:?}); all: {report:?}");
    }
}

async fn alter_scenario(port: u16, adm: tokio_postgres::Client, second_bind: bool) -> Vec<Vec<String>> {
    adm.batch_execute("drop table if exists h; create table h(a int); insert into h values (1)").await.unwrap();
    let mut c = login(port).await;
    let mut t = vec![exchange(&mut c, &[parse("s", "select * from h"), bind("s"), execute(), sync()], 1).await];
    adm.batch_execute("alter table h add column b int default 5").await.unwrap();
    t.push(exchange(&mut c, &run("s"), 1).await);
    if second_bind {
        t.push(exchange(&mut c, &[describe_stmt("s"), bind("s"), execute(), sync()], 1).await);
    }
    let again = [close_stmt("s"), parse("s", "select * from h"), bind("s"), execute(), sync()];
    t.push(exchange(&mut c, &again, 1).await);
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_add_column_gives_0a000_then_reprepare_after_close_works() {
    let t = differential("", |port, adm| alter_scenario(port, adm, false)).await;
    assert_eq!(t[1], s(&["E:0A000:cached plan must not change result type", "Z:I"]));
    assert_eq!(t[2], s(&["3", "1", "2", "D:1|5", "C:SELECT 1", "Z:I"]));
}

/// Direct, a statement whose result type changed keeps failing with 0A000 (and Describe keeps the old row
/// shape) until the client re-prepares it; it must not silently start returning the new shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_stale_statement_keeps_failing_until_reprepared_like_direct() {
    differential("", |port, adm| alter_scenario(port, adm, true)).await;
}

// ---------------------------------------------------------------------------------------------------------
// 5. asyncpg's own retry of InvalidCachedStatementError.

#[test]
fn txn_asyncpg_column_type_change_between_fetches_like_direct() {
    let pg = Pg::start();
    let proxy = start(&pg, 1, TXN, "");
    let out = script("txn", &pg, &proxy);
    assert!(out.contains("fidelity_txn: ok"), "{out}");
}

/// asyncpg: a statement named at the protocol level runs by SQL `EXECUTE`, and a client that left leaves no
/// statements behind on the server for the next one to see (asyncpg's own suite checks both).
#[test]
fn txn_protocol_named_statement_by_sql_execute_and_none_left_behind() {
    let pg = Pg::start();
    let proxy = start(&pg, 1, TXN, "");
    let out = script("named", &pg, &proxy);
    assert!(out.contains("proxy (1, 0)"), "{out}");
}

/// SQL `DEALLOCATE` of a protocol-level statement: psycopg 3 evicts its prepared statements this way, and
/// asyncpg's explicit one is gone afterwards (26000 when run), both as direct.
#[test]
fn txn_protocol_named_statement_deallocated_by_sql_like_direct() {
    let pg = Pg::start();
    let proxy = start(&pg, 2, TXN, "");
    let out = script("deallocate", &pg, &proxy);
    assert!(out.contains("fidelity_deallocate: ok") && out.contains("('DEALLOCATE', '26000')"), "{out}");
}

/// A statement re-prepared on another server after its table changed type fails as on a direct connection.
#[test]
fn txn_statement_whose_shape_changed_fails_on_any_server_like_direct() {
    let pg = Pg::start();
    let proxy = start(&pg, 6, TXN, "");
    let out = script("reshape", &pg, &proxy);
    assert!(out.contains("fidelity_reshape: ok"), "{out}");
}

/// NotificationResponses name their sender by the pid its client was given, and none is lost while the
/// listener's server is read by the proxy.
#[test]
fn txn_notifications_name_the_senders_client_pid() {
    let pg = Pg::start();
    let proxy = start(&pg, 3, TXN, "");
    let out = script("notify", &pg, &proxy);
    assert!(out.contains("fidelity_notify: ok"), "{out}");
}

/// The client's unnamed statement lives across its transactions although its server changes in between, and
/// nothing the proxy or another client does on that server replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_unnamed_statement_survives_a_change_of_server_and_other_clients() {
    let pg = Pg::start();
    let proxy = start(&pg, 2, "", "");
    let mut a = login_with(proxy.port, &[("DateStyle", "German")]).await;
    let t = exchange(&mut a, &[parse("", "SELECT 40 + 2"), describe_stmt(""), sync()], 1).await;
    assert_eq!(t.last().map(String::as_str), Some("Z:I"), "{t:?}");
    // Other clients (with other settings, so the proxy replays settings on the servers) use both servers and
    // their own unnamed statements.
    for _ in 0..3 {
        let mut b = login(proxy.port).await;
        let t = exchange(&mut b, &[parse("", "SELECT 'b'"), bind(""), execute(), sync()], 1).await;
        assert_eq!(t, s(&["1", "2", "D:b", "C:SELECT 1", "Z:I"]));
    }
    for _ in 0..3 {
        let t = exchange(&mut a, &[bind(""), execute(), sync()], 1).await;
        assert_eq!(t, s(&["2", "D:42", "C:SELECT 1", "Z:I"]), "A's unnamed statement");
    }
    // A simple Query drops the unnamed statement, as on a direct connection.
    simple_col(&mut a, "select 1").await;
    let t = exchange(&mut a, &[bind(""), execute(), sync()], 1).await;
    assert_eq!(t.first().map(|e| e.starts_with("E:26000")), Some(true), "{t:?}");
}

/// A server that ends a running query with FATAL (an administrator's `pg_terminate_backend`) is heard by
/// the client as it would be directly: the server's own 57P01, not a proxy error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_server_fatal_reaches_the_client_as_is() {
    let pg = Pg::start();
    let proxy = start(&pg, 2, "", "");
    let admin = admin(&pg).await;
    let c = connect(&proxy.conninfo()).await.unwrap();
    let sleeper = tokio::spawn(async move { c.simple_query("select pg_sleep(20)").await.map(|_| ()) });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = admin
            .query_one(
                "select count(pg_terminate_backend(pid)) from pg_stat_activity where query = 'select pg_sleep(20)' \
                 and pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the query never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let err = timeout(Duration::from_secs(5), sleeper).await.unwrap().unwrap().unwrap_err();
    let db = err.as_db_error().unwrap_or_else(|| panic!("a server error, not {err}"));
    assert_eq!((db.severity(), db.code().code()), ("FATAL", "57P01"), "{db:?}");
    assert!(db.message().contains("administrator command"), "{}", db.message());
}
