//! Fidelity in transaction mode: the mapping of named prepared statements, driven by a raw protocol client
//! whose replies are compared message by message (type, SQLSTATE and text) with the same exchange on a direct
//! connection, and the driver checks (asyncpg, psycopg) of `tests/drivers/fidelity_drivers.py`. Session mode's
//! backend pid, startup parameters and `application_name` are in `tests/fidelity_session.rs`.

mod common;
#[path = "common/fidelity.rs"]
mod fidelity;
#[path = "common/raw.rs"]
mod raw;

use common::*;
use fidelity::*;
use raw::{bind, execute, parse, query, sync};
use std::time::{Duration, Instant};
use tokio::time::timeout;

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

/// An unnamed statement whose text is larger than what the proxy reads whole to rename (asyncpg sends one
/// unnamed when it is too large for its cache: its test of 32,767 arguments is 218 KB) is described and run
/// like any other, also in a later transaction and on another server: as direct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_large_unnamed_statement_is_described_and_run_like_direct() {
    let pg = Pg::start();
    let proxy = start(&pg, 2, "", "");
    let sql = format!("SELECT length('{}') AS n", "x".repeat(200_000));
    let mut a = login(proxy.port).await;
    let t = exchange(&mut a, &[parse("", &sql), describe_stmt(""), sync()], 1).await;
    assert_eq!(
        t,
        s(&["1", "t", "T:1", "Z:I"]),
        "Parse and Describe of a {} byte statement\n{}",
        sql.len(),
        log_tail(&proxy, 40)
    );
    // Another client takes the other server meanwhile, with an unnamed statement of its own.
    let mut b = login(proxy.port).await;
    let t = exchange(&mut b, &[parse("", "SELECT 'b'"), bind(""), execute(), sync()], 1).await;
    assert_eq!(t, s(&["1", "2", "D:b", "C:SELECT 1", "Z:I"]));
    for _ in 0..3 {
        let t = exchange(&mut a, &[bind(""), execute(), sync()], 1).await;
        assert_eq!(t, s(&["2", "D:200000", "C:SELECT 1", "Z:I"]), "A's large unnamed statement");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_server_errors_name_the_statement_as_the_client_named_it() {
    // Postgres names the statement in a Bind's parameter-count error; through the proxy that is the client's
    // name, not the pool's, in each way the error's read can be scanned: alone, after a row larger than one
    // read, and behind a second client name of the same text.
    let t = differential("", |port, _adm| async move {
        let mut c = login(port).await;
        let two = "select $1::int + $2::int";
        let mut t =
            vec![exchange(&mut c, &[parse("add", two), parse("big", "select repeat('x', 300000)"), sync()], 1).await];
        t.push(exchange(&mut c, &run("add"), 1).await);
        let after_big = [bind("big"), execute(), bind("add"), execute(), sync()];
        t.push(
            exchange(&mut c, &after_big, 1)
                .await
                .into_iter()
                .map(|m| if m.starts_with("D:") { format!("D:{}", m.len()) } else { m })
                .collect(),
        );
        t.push(exchange(&mut c, &[parse("plus", two), sync()], 1).await);
        t.push(exchange(&mut c, &run("plus"), 1).await);
        t.push(exchange(&mut c, &run("add"), 1).await);
        t
    })
    .await;
    let e = |n: &str| format!("E:08P01:bind message supplies 0 parameters, but prepared statement \"{n}\" requires 2");
    assert_eq!(t[1], vec![e("add"), "Z:I".to_owned()]);
    assert_eq!(t[2], vec!["2".to_owned(), "D:300002".to_owned(), "C:SELECT 1".to_owned(), e("add"), "Z:I".to_owned()]);
    assert_eq!(t[4], vec![e("plus"), "Z:I".to_owned()]);
    assert_eq!(t[5], vec![e("add"), "Z:I".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_sql_deallocate_by_extended_protocol_drops_the_clients_statement_like_direct() {
    // psycopg 3 evicts a prepared statement with PQexecParams("DEALLOCATE _pg3_0"): Parse of the unnamed
    // statement, Bind, Execute. Through the proxy the server has the statement under the pool's name.
    let dealloc = |name: &str| vec![parse("", &format!("DEALLOCATE {name}")), bind(""), execute(), sync()];
    let t = differential("", |port, _adm| async move {
        let mut c = login(port).await;
        let mut t = vec![exchange(&mut c, &[parse("_pg3_0", "select 1"), parse("kept", "select 2"), sync()], 1).await];
        t.push(exchange(&mut c, &run("_pg3_0"), 1).await);
        t.push(exchange(&mut c, &dealloc("_pg3_0"), 1).await);
        t.push(exchange(&mut c, &run("_pg3_0"), 1).await);
        t.push(exchange(&mut c, &[parse("_pg3_0", "select 3"), bind("_pg3_0"), execute(), sync()], 1).await);
        // Inside a transaction block, then an unknown name, then after an error earlier in the batch (the
        // DEALLOCATE is skipped: the statement stays), then in a failed transaction.
        t.push(exchange(&mut c, &[query("begin")], 1).await);
        t.push(exchange(&mut c, &dealloc("\"_pg3_0\""), 1).await);
        t.push(exchange(&mut c, &[query("commit")], 1).await);
        t.push(exchange(&mut c, &dealloc("nope"), 1).await);
        let mut skipped = run("nope");
        skipped.pop();
        skipped.extend(dealloc("kept"));
        t.push(exchange(&mut c, &skipped, 1).await);
        t.push(exchange(&mut c, &run("kept"), 1).await);
        t.push(exchange(&mut c, &[query("begin"), query("select 1/0")], 2).await);
        t.push(exchange(&mut c, &dealloc("kept"), 1).await);
        t.push(exchange(&mut c, &[query("rollback")], 1).await);
        t.push(exchange(&mut c, &run("kept"), 1).await);
        t
    })
    .await;
    assert_eq!(t[2], s(&["1", "2", "C:DEALLOCATE", "Z:I"]));
    assert_eq!(t[3], s(&["E:26000:prepared statement \"_pg3_0\" does not exist", "Z:I"]));
    assert_eq!(t[4], s(&["1", "2", "D:3", "C:SELECT 1", "Z:I"]), "the name is free again");
    assert_eq!(t[6], s(&["1", "2", "C:DEALLOCATE", "Z:T"]));
    assert_eq!(t[10], s(&["2", "D:2", "C:SELECT 1", "Z:I"]), "a skipped DEALLOCATE left the statement");
    assert_eq!(t[14], t[10]);
}

/// psycopg 3's cache eviction (`DEALLOCATE _pg3_N` by PQexecParams) of a statement no other client holds:
/// gone from the server's `pg_prepared_statements` at once, also inside a transaction block, as direct
/// (psycopg's `test_evict_lru_deallocate` lists them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_deallocate_by_extended_protocol_of_an_unshared_statement_leaves_the_server_like_direct() {
    let dealloc = |name: &str| vec![parse("", &format!("DEALLOCATE {name}")), bind(""), execute(), sync()];
    let listed = || query("select statement from pg_prepared_statements order by prepare_time");
    let t = differential("", |port, _adm| async move {
        let mut c = login(port).await;
        let prep = [parse("_pg3_0", "select 'a'"), parse("_pg3_1", "select 0"), sync()];
        let mut t = vec![exchange(&mut c, &prep, 1).await];
        t.push(exchange(&mut c, &[run("_pg3_0"), run("_pg3_1")].concat(), 2).await);
        t.push(exchange(&mut c, &dealloc("_pg3_1"), 1).await);
        t.push(exchange(&mut c, &[listed()], 1).await);
        t.push(exchange(&mut c, &[query("begin"), parse("_pg3_2", "select 2"), sync()], 2).await);
        t.push(exchange(&mut c, &run("_pg3_2"), 1).await);
        t.push(exchange(&mut c, &dealloc("_pg3_2"), 1).await);
        t.push(exchange(&mut c, &[listed(), query("commit")], 2).await);
        t.push(exchange(&mut c, &run("_pg3_0"), 1).await);
        // Skipped after an error earlier in its batch: the statement stays, on the server too.
        let mut skipped = run("nope");
        skipped.pop();
        skipped.extend(dealloc("_pg3_0"));
        t.push(exchange(&mut c, &skipped, 1).await);
        t.push(exchange(&mut c, &[run("_pg3_0"), vec![listed()]].concat(), 2).await);
        t
    })
    .await;
    assert_eq!(t[3], s(&["T:1", "D:select 'a'", "C:SELECT 1", "Z:I"]), "only the kept statement is listed");
    assert_eq!(t[10], s(&["2", "D:a", "C:SELECT 1", "Z:I", "T:1", "D:select 'a'", "C:SELECT 1", "Z:I"]));
    assert_eq!(t[7][..3], s(&["T:1", "D:select 'a'", "C:SELECT 1"]), "gone inside the transaction too");
    assert_eq!(t[8], s(&["2", "D:a", "C:SELECT 1", "Z:I"]));
}

/// The same DEALLOCATE of a statement another client also prepared (one pool statement, one server): the
/// server keeps it for the other client, whose statement goes on working; the first client's name is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_deallocate_by_extended_protocol_of_a_shared_statement_keeps_it_for_the_other_client() {
    let dealloc = |name: &str| vec![parse("", &format!("DEALLOCATE {name}")), bind(""), execute(), sync()];
    let listed = || query("select count(*) from pg_prepared_statements where statement = 'select ''shared'''");
    let pg = Pg::start();
    let proxy = start(&pg, 1, TXN, "");
    let (mut a, mut b) = (login(proxy.port).await, login(proxy.port).await);
    let prep = |n: &str| [parse(n, "select 'shared'"), bind(n), execute(), sync()];
    assert_eq!(exchange(&mut a, &prep("a1"), 1).await, s(&["1", "2", "D:shared", "C:SELECT 1", "Z:I"]));
    assert_eq!(exchange(&mut b, &prep("b1"), 1).await, s(&["1", "2", "D:shared", "C:SELECT 1", "Z:I"]));
    assert_eq!(exchange(&mut a, &dealloc("a1"), 1).await, s(&["1", "2", "C:DEALLOCATE", "Z:I"]));
    assert_eq!(exchange(&mut a, &run("a1"), 1).await, s(&["E:26000:prepared statement \"a1\" does not exist", "Z:I"]));
    assert_eq!(
        exchange(&mut b, &[run("b1"), vec![listed()]].concat(), 2).await,
        s(&["2", "D:shared", "C:SELECT 1", "Z:I", "T:1", "D:1", "C:SELECT 1", "Z:I"]),
        "kept for b"
    );
    // Once b deallocates it too, nobody holds it: gone from the server.
    assert_eq!(exchange(&mut b, &dealloc("b1"), 1).await, s(&["1", "2", "C:DEALLOCATE", "Z:I"]));
    assert_eq!(exchange(&mut b, &[listed()], 1).await, s(&["T:1", "D:0", "C:SELECT 1", "Z:I"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_deallocate_all_by_extended_protocol_drops_the_clients_statements_like_direct() {
    // psycopg 3 clears its statement cache with DEALLOCATE ALL by PQexecParams; DISCARD ALL the same way.
    let ext = |sql: &str| vec![parse("", sql), bind(""), execute(), sync()];
    let t = differential("", |port, _adm| async move {
        let mut c = login(port).await;
        let prep = [parse("s1", "select 1"), parse("s2", "select 2"), sync()];
        let mut t = vec![exchange(&mut c, &prep, 1).await];
        // Parsed and bound, never executed: nothing is deallocated.
        t.push(exchange(&mut c, &[parse("", "DEALLOCATE ALL"), bind(""), sync()], 1).await);
        t.push(exchange(&mut c, &run("s1"), 1).await);
        // Skipped after an earlier error, and refused inside a transaction block (DISCARD ALL): kept.
        let mut skipped = run("nope");
        skipped.pop();
        skipped.extend(ext("DEALLOCATE ALL"));
        t.push(exchange(&mut c, &skipped, 1).await);
        t.push(exchange(&mut c, &[query("begin")], 1).await);
        t.push(exchange(&mut c, &ext("DISCARD ALL"), 1).await);
        t.push(exchange(&mut c, &[query("rollback")], 1).await);
        t.push(exchange(&mut c, &run("s2"), 1).await);
        // Executed: both names are gone and free again.
        t.push(exchange(&mut c, &ext("DEALLOCATE ALL"), 1).await);
        t.push(exchange(&mut c, &run("s1"), 1).await);
        t.push(exchange(&mut c, &[parse("s2", "select 22"), bind("s2"), execute(), sync()], 1).await);
        // A DEALLOCATE ALL parsed and never executed, then a DEALLOCATE of one name: only that one goes.
        t.push(exchange(&mut c, &[parse("s3", "select 3"), parse("", "DEALLOCATE ALL"), sync()], 1).await);
        t.push(exchange(&mut c, &ext("DEALLOCATE s2"), 1).await);
        t.push(exchange(&mut c, &run("s3"), 1).await);
        // Bound to the unnamed portal but only another portal executed: nothing is deallocated.
        let other_portal = raw::msg(b'B', b"p\0s3\0\0\0\0\0\0\0");
        let batch = [parse("", "DEALLOCATE ALL"), bind(""), other_portal, raw::execute_portal("p", 0), sync()];
        t.push(exchange(&mut c, &batch, 1).await);
        t.push(exchange(&mut c, &run("s3"), 1).await);
        t
    })
    .await;
    assert_eq!(t[13], s(&["2", "D:3", "C:SELECT 1", "Z:I"]), "s3 outlives the DEALLOCATE of s2");
    assert_eq!(t[15], t[13], "s3 outlives a DEALLOCATE ALL bound and never executed");
    assert_eq!(t[2], s(&["2", "D:1", "C:SELECT 1", "Z:I"]));
    assert_eq!(t[7], s(&["2", "D:2", "C:SELECT 1", "Z:I"]));
    assert_eq!(t[8], s(&["1", "2", "C:DEALLOCATE ALL", "Z:I"]));
    assert_eq!(t[9], s(&["E:26000:prepared statement \"s1\" does not exist", "Z:I"]));
    assert_eq!(t[10], s(&["1", "2", "D:22", "C:SELECT 1", "Z:I"]));
}

/// The Execute of a `DEALLOCATE ALL` whose header arrives in one read and its body in the next still drops
/// the client's names, as direct: the proxy waits for the body's first byte (the portal) before deciding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_deallocate_all_whose_execute_arrives_split_drops_the_clients_statements_like_direct() {
    use tokio::io::AsyncWriteExt;
    let t = differential("", |port, _adm| async move {
        let mut c = login(port).await;
        let mut t = vec![exchange(&mut c, &[parse("s1", "select 1"), sync()], 1).await];
        let exec = execute();
        let head = [parse("", "DEALLOCATE ALL"), bind(""), exec[..5].to_vec()].concat();
        c.s.write_all(&head).await.expect("write the batch up to the Execute header");
        c.s.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(200)).await;
        t.push(exchange(&mut c, &[exec[5..].to_vec(), sync()], 1).await);
        t.push(exchange(&mut c, &run("s1"), 1).await);
        t
    })
    .await;
    assert_eq!(t[1], s(&["1", "2", "C:DEALLOCATE ALL", "Z:I"]));
    assert_eq!(t[2], s(&["E:26000:prepared statement \"s1\" does not exist", "Z:I"]), "s1 went with the rest");
}

/// A statement evicted from its server (max_prepared_statements = 1) and prepared there again after its
/// table changed shape fails 0A000 as direct, where the server kept the old plan: the proxy's shape check
/// compares the new RowDescription with the one the client was told at its Describe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_reprepared_statement_of_another_shape_fails_like_direct() {
    let t = differential("max_prepared_statements = 1\n", |port, adm| async move {
        adm.batch_execute("drop table if exists rs; create table rs(a int); insert into rs values (1)").await.unwrap();
        let mut c = login(port).await;
        let mut t = vec![exchange(&mut c, &[parse("s", "select * from rs"), describe_stmt("s"), sync()], 1).await];
        adm.batch_execute("alter table rs add column b int default 5").await.unwrap();
        // Run, so it reaches the server (a batch of Parses alone is answered by the proxy) and evicts s there.
        t.push(exchange(&mut c, &[parse("other", "select 2"), bind("other"), execute(), sync()], 1).await);
        t.push(exchange(&mut c, &run("s"), 1).await);
        t
    })
    .await;
    assert_eq!(t[0], s(&["1", "t", "T:1", "Z:I"]));
    assert_eq!(t[2], s(&["E:0A000:cached plan must not change result type", "Z:I"]));
}
