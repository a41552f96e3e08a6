//! End-to-end relay tests through the pgbudget binary against a real Postgres: protocols, COPY,
//! LISTEN/NOTIFY, cancel, abandoned transactions, settings, auth and error replies.

mod common;
use common::*;
use std::time::{Duration, Instant};

const TXN: &str = "[services.app]\nslice = 4\npool_mode = \"transaction\"\ncheckout_timeout = \"2s\"\n";
const SESSION: &str = "[services.app]\nslice = 4\npool_mode = \"session\"\ncheckout_timeout = \"2s\"\n";

#[test]
fn psql_simple_queries_and_transactions_in_transaction_mode() {
    let pg = Pg::start();
    let proxy = Proxy::start(&config(&pg, TXN));
    let out = psql(
        &proxy.conninfo(),
        &[
            "-c",
            "create table t(id int primary key, v text)",
            "-c",
            "begin; insert into t values (1, 'a'); insert into t values (2, 'b'); commit;",
            "-c",
            "select count(*), string_agg(v, ',' order by id) from t",
            "-c",
            "select current_setting('application_name')",
        ],
    );
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), proxy.log());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("2|a,b"), "{text}");
    // The client sees the application_name it set (psql names itself), as on a direct connection.
    assert_eq!(text.lines().last(), Some("psql"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameter_status_set_matches_direct_postgres() {
    let pg = Pg::start();
    let proxy = Proxy::start(&config(&pg, TXN));
    let direct = connect(&pg.conninfo()).await.unwrap();
    let via = connect(&proxy.conninfo()).await.unwrap();
    for key in [
        "server_version",
        "server_encoding",
        "client_encoding",
        "DateStyle",
        "TimeZone",
        "integer_datetimes",
        "standard_conforming_strings",
    ] {
        let d: String = direct.query_one(&format!("show \"{key}\""), &[]).await.unwrap().get(0);
        let v: String = via
            .simple_query(&format!("show \"{key}\""))
            .await
            .unwrap()
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .unwrap();
        assert_eq!(d, v, "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_in_transaction_mode_and_prepared_in_session_mode() {
    let pg = Pg::start();
    let tx = Proxy::start(&config(&pg, TXN));
    let c = connect(&tx.conninfo()).await.unwrap();
    // query_typed: unnamed statements, one round trip (what transaction pooling supports).
    let rows = c
        .query_typed(
            "select $1::int + 1, $2::text",
            &[(&41i32, tokio_postgres::types::Type::INT4), (&"x", tokio_postgres::types::Type::TEXT)],
        )
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, i32>(0), 42);
    assert_eq!(rows[0].get::<_, &str>(1), "x");
    // A failing statement in extended protocol is an error, and the client goes on.
    let err = c.query_typed("select 1/0", &[]).await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "22012");
    assert_eq!(c.query_typed("select 7", &[]).await.unwrap()[0].get::<_, i32>(0), 7);

    let ss = Proxy::start(&config(&pg, SESSION));
    let mut c = connect(&ss.conninfo()).await.unwrap();
    let stmt = c.prepare("select $1::int * 2").await.unwrap();
    for i in 0..20 {
        assert_eq!(c.query_one(&stmt, &[&i]).await.unwrap().get::<_, i32>(0), i * 2);
    }
    let t = c.transaction().await.unwrap();
    t.execute("create temp table tt(x int)", &[]).await.unwrap();
    t.commit().await.unwrap();
    assert_eq!(c.query_one("select count(*) from tt", &[]).await.unwrap().get::<_, i64>(0), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_in_session_mode() {
    copy_in_and_out(SESSION).await;
}

/// tokio-postgres drops the copy statements while the COPY runs, so a Close reaches the proxy during the COPY
/// OUT and the server's reads start being copied (to swallow the Close's reply) between two reads: a read that
/// had ended inside a DataRow's header then had that header's first bytes twice, and the client waited for a
/// message of 1.6 GB. It happened in 2–6 of 30 runs under CPU load; `pump_tests` has the exact case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_in_transaction_mode() {
    copy_in_and_out(TXN).await;
}

async fn copy_in_and_out(cfg: &str) {
    use futures_util::{SinkExt, TryStreamExt};
    let pg = Pg::start();
    {
        let proxy = Proxy::start(&config(&pg, cfg));
        let c = connect(&proxy.conninfo()).await.unwrap();
        c.batch_execute("drop table if exists cp; create table cp(a int, b text)").await.unwrap();
        let sink = c.copy_in("copy cp from stdin").await.unwrap();
        futures_util::pin_mut!(sink);
        let mut data = String::new();
        for i in 0..5000 {
            data.push_str(&format!("{i}\tvalue-{i}\n"));
        }
        sink.send(bytes::Bytes::from(data.clone())).await.unwrap();
        assert_eq!(sink.finish().await.unwrap(), 5000);
        let out: Vec<bytes::Bytes> = c.copy_out("copy cp to stdout").await.unwrap().try_collect().await.unwrap();
        let got: Vec<u8> = out.concat();
        assert_eq!(String::from_utf8(got).unwrap(), data);
        // psql \copy too.
        let o = psql(&proxy.conninfo(), &["-c", "\\copy (select * from cp where a < 3 order by a) to stdout"]);
        assert_eq!(String::from_utf8_lossy(&o.stdout), "0\tvalue-0\n1\tvalue-1\n2\tvalue-2\n");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_in_session_mode() {
    use futures_util::StreamExt;
    let pg = Pg::start();
    let proxy = Proxy::start(&config(&pg, SESSION));
    let (client, mut conn) = tokio_postgres::connect(&proxy.conninfo(), tokio_postgres::NoTls).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
            }
        }
    });
    client.batch_execute("listen jobs").await.unwrap();
    let other = connect(&proxy.conninfo()).await.unwrap();
    other.batch_execute("notify jobs, 'hello'").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("notification arrives").unwrap();
    assert_eq!(got, ("jobs".to_owned(), "hello".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_only_the_right_backend() {
    let pg = Pg::start();
    for cfg in [TXN, SESSION] {
        let proxy = Proxy::start(&config(&pg, cfg));
        let a = connect(&proxy.conninfo()).await.unwrap();
        let b = connect(&proxy.conninfo()).await.unwrap();
        let token = a.cancel_token();
        let slow_a = tokio::spawn(async move { a.simple_query("select pg_sleep(20)").await });
        let slow_b = tokio::spawn(async move { b.simple_query("select pg_sleep(1.5)").await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = std::time::Instant::now();
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        let err = slow_a.await.unwrap().unwrap_err();
        assert_eq!(err.code().unwrap().code(), "57014", "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // The other client's query was not cancelled.
        slow_b.await.unwrap().expect("b's query completes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_transaction_leaves_no_lock_or_open_transaction() {
    let pg = Pg::start();
    let admin = connect(&pg.conninfo()).await.unwrap();
    admin.batch_execute("create table acct(id int primary key, n int); insert into acct values (1, 0)").await.unwrap();
    for cfg in [TXN, SESSION] {
        let proxy = Proxy::start(&config(&pg, cfg));
        {
            let (c, conn) = tokio_postgres::connect(&proxy.conninfo(), tokio_postgres::NoTls).await.unwrap();
            let h = tokio::spawn(conn);
            c.batch_execute("begin; update acct set n = n + 1 where id = 1").await.unwrap();
            // Abort the socket mid-transaction, without Terminate.
            h.abort();
            drop(c);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let open: i64 = admin
            .query_one(
                "select count(*) from pg_stat_activity where application_name like 'pgbudget:%' and state <> 'idle'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(open, 0, "a pgbudget server connection is still in a transaction");
        let locks: i64 = admin
            .query_one(
                "select count(*) from pg_locks l join pg_class c on c.oid = l.relation where c.relname = 'acct'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(locks, 0);
        // The row is not locked and the update was rolled back.
        let c = connect(&proxy.conninfo()).await.unwrap();
        c.batch_execute("set lock_timeout = '1s'; update acct set n = n + 10 where id = 1").await.unwrap();
        let n: i32 = admin.query_one("select n from acct where id = 1", &[]).await.unwrap().get(0);
        assert_eq!(n % 10, 0, "abandoned update must have been rolled back");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_resets_state_before_reuse() {
    let pg = Pg::start();
    let proxy = Proxy::start(&config(&pg, "[services.app]\nslice = 2\npool_mode = \"session\"\n"));
    let first = connect(&proxy.conninfo()).await.unwrap();
    let pid: i32 = first.query_one("select pg_backend_pid()", &[]).await.unwrap().get(0);
    first.batch_execute("set search_path = nowhere; prepare p as select 1").await.unwrap();
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c1 = connect(&proxy.conninfo()).await.unwrap();
    let c2 = connect(&proxy.conninfo()).await.unwrap();
    let mut saw_reused = false;
    for c in [&c1, &c2] {
        let p: i32 = c.query_one("select pg_backend_pid()", &[]).await.unwrap().get(0);
        saw_reused |= p == pid;
        let sp: String = c.query_one("show search_path", &[]).await.unwrap().get(0);
        assert_ne!(sp, "nowhere");
        let n: i64 =
            c.query_one("select count(*) from pg_prepared_statements where name = 'p'", &[]).await.unwrap().get(0);
        assert_eq!(n, 0);
    }
    // (A server whose client used temp objects is closed instead: tests/pinning.rs.)
    assert!(saw_reused, "the first server connection should have been reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_settings_follow_the_client_across_checkouts() {
    let pg = Pg::start();
    let cfg = config(&pg, "[services.app]\nslice = 1\npool_mode = \"transaction\"\n")
        .replace("[proxy]", "[proxy]\nslice_floor = 1");
    let proxy = Proxy::start(&cfg);
    let utc = connect(&proxy.conninfo()).await.unwrap();
    let tokyo =
        connect(&format!("{} options='-c TimeZone=Asia/Tokyo -c search_path=tk'", proxy.conninfo())).await.unwrap();
    for _ in 0..3 {
        let tz: String = tokyo.query_one("show timezone", &[]).await.unwrap().get(0);
        assert_eq!(tz, "Asia/Tokyo");
        let sp: String = tokyo.query_one("show search_path", &[]).await.unwrap().get(0);
        assert_eq!(sp, "tk");
        // Same single server connection, other client: its settings are back to the defaults.
        let tz: String = utc.query_one("show timezone", &[]).await.unwrap().get(0);
        assert_ne!(tz, "Asia/Tokyo");
        let sp: String = utc.query_one("show search_path", &[]).await.unwrap().get(0);
        assert_ne!(sp, "tk");
    }
    // A value the server refuses fails the login, as it does on a direct connection (a reported setting is
    // checked against a server when the greeting is built).
    let err = connect(&format!("{} options='-c TimeZone=Not/AZone'", proxy.conninfo())).await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "22023", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failures_look_the_same_and_bad_targets_are_named() {
    let pg = Pg::start();
    let proxy = Proxy::start(&config(&pg, TXN));
    let wrong = connect(&format!("host=127.0.0.1 port={} user=postgres password=nope dbname=postgres", proxy.port))
        .await
        .unwrap_err();
    let unknown = connect(&format!("host=127.0.0.1 port={} user=ghost password=nope dbname=postgres", proxy.port))
        .await
        .unwrap_err();
    let (w, u) = (wrong.as_db_error().unwrap(), unknown.as_db_error().unwrap());
    assert_eq!(w.code().code(), "28P01");
    assert_eq!(u.code().code(), "28P01");
    assert_eq!(w.message().replace("postgres", "X"), u.message().replace("ghost", "X"));
    let db = connect(&format!("host=127.0.0.1 port={} user=postgres password={PG_PASSWORD} dbname=other", proxy.port))
        .await
        .unwrap_err();
    assert_eq!(db.code().unwrap().code(), "3D000");
    // md5 clients are served when configured.
    let md5 = Proxy::start(
        &config(&pg, TXN).replace("[upstreams.primary]", "[auth]\nmethod = \"md5\"\n\n[upstreams.primary]"),
    );
    let out = psql(&md5.conninfo(), &["-c", "select 'md5 ok'"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "md5 ok", "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_08006_with_cause() {
    let pg = Pg::start();
    let dead_port = free_port();
    let cfg = config(&pg, "[services.app]\nslice = 2\nconnect_timeout = \"1s\"\n")
        .replace(&format!(":{}/", pg.port), &format!(":{dead_port}/"));
    let proxy = Proxy::start(&cfg);
    let err = connect(&proxy.conninfo()).await.unwrap_err();
    let db = err.as_db_error().expect("a Postgres error, not a hang or a reset");
    assert_eq!(db.code().code(), "08006");
    assert!(db.message().contains("primary") && db.message().contains("connect"), "{}", db.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_and_idle_server_connections_are_replaced_transparently() {
    let pg = Pg::start();
    let admin = connect(&pg.conninfo()).await.unwrap();
    let services = "[services.app]\nslice = 2\nserver_idle_timeout = \"1s\"\nterminate_window = \"200ms\"\n";
    let proxy = Proxy::start(&config(&pg, services));
    let c = connect(&proxy.conninfo()).await.unwrap();
    c.simple_query("select 1").await.unwrap();
    assert_eq!(server_conns(&admin, "app").await, 1);
    // Kill the pooled server connection behind pgbudget's back (as an idle killer does), after the client
    // idled past terminate_window: the pool shields it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    admin
        .batch_execute(
            "select pg_terminate_backend(pid) from pg_stat_activity where application_name = 'pgbudget:app:rw'",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.simple_query("select 1").await.expect("a dead idle connection is replaced, not reported");
    // Idle past server_idle_timeout: the proxy closes it itself.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(server_conns(&admin, "app").await, 0);
    c.simple_query("select 1").await.unwrap();
}

/// A server that outlived `server_lifetime` is not handed out again: the next transaction gets a new backend.
/// A lifetime shortened by reload applies to the servers already open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_past_its_lifetime_is_replaced_at_checkout_and_a_reloaded_lifetime_applies() {
    let pg = Pg::start();
    let cfg = config(&pg, "[services.app]\nslice = 2\npool_mode = \"transaction\"\nserver_lifetime = \"1h\"\n");
    let proxy = Proxy::start(&cfg);
    let c = connect(&proxy.conninfo()).await.unwrap();
    let pid = || async { c.query_one("select pg_backend_pid()", &[]).await.unwrap().get::<_, i32>(0) };
    let first = pid().await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(pid().await, first, "an hour's lifetime keeps the server");
    let path = proxy.dir.path().join("budgets.toml");
    std::fs::write(&path, cfg.replace("server_lifetime = \"1h\"", "server_lifetime = \"1s\"")).unwrap();
    let st = std::process::Command::new("kill").args(["-HUP", &proxy.pid().to_string()]).status().unwrap();
    assert!(st.success());
    // The server is over 1.2 s old: once the reload is in force, the next checkout retires it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let second = loop {
        let p = pid().await;
        if p != first {
            break p;
        }
        assert!(Instant::now() < deadline, "the server outlived a reloaded 1 s lifetime by 5 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(pid().await, second, "a new server is kept within its lifetime");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_ne!(pid().await, second, "and replaced once it outlives it");
}

/// The count of prepared statements on the one server of a share of 1, read with a simple Query (which
/// prepares nothing itself).
async fn prepared_on_server(c: &tokio_postgres::Client) -> String {
    let rows = c.simple_query("select count(*) from pg_prepared_statements").await.unwrap();
    match &rows[1] {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).unwrap().to_owned(),
        _ => panic!("no row"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_of_a_client_that_left_are_closed_on_the_server() {
    let pg = Pg::start();
    let cfg = config(&pg, "[services.app]\nslice = 1\npool_mode = \"transaction\"\n")
        .replace("[proxy]", "[proxy]\nslice_floor = 1");
    let proxy = Proxy::start(&cfg);
    let a = connect(&proxy.conninfo()).await.unwrap();
    let st = a.prepare("select $1::int + 1").await.unwrap();
    let n: i32 = a.query_one(&st, &[&41]).await.unwrap().get(0);
    assert_eq!(n, 42);
    let b = connect(&proxy.conninfo()).await.unwrap();
    assert_eq!(prepared_on_server(&b).await, "1", "a's statement lives on the server while a holds it");
    drop(st);
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(prepared_on_server(&b).await, "0", "closed at the next checkout once nobody holds it");
    // The server's statement list stays right: a statement prepared again works.
    let c = connect(&proxy.conninfo()).await.unwrap();
    let n: i32 = c.query_one("select $1::int + 1", &[&1]).await.unwrap().get(0);
    assert_eq!(n, 2);
}
