//! Read-only enforcement tiers against a real Postgres: `enforce = "role"` refuses a role that can write
//! (naming what it found) and serves one that cannot; `enforce = "replica"` refuses a primary; the config
//! rules of each tier; the session tier's tripwire (a function made on the read-write route turns read-only off:
//! the session ends with FATAL 25006 and its server is discarded, in both pool modes); and the route's added
//! refusals (CALL, DO, COMMIT PREPARED, transaction control bundled with other statements, FunctionCall).

mod common;
#[path = "common/raw.rs"]
mod raw;
use common::*;
use std::time::Duration;

const SERVICES: &str = "[services.app]\nslice = 6\nread_only_share = 2\ncheckout_timeout = \"2s\"\n";

fn ro_config(pg: &Pg, ro: &str, mode: &str) -> String {
    config(pg, &SERVICES.replace("slice = 6", &format!("slice = 6\npool_mode = \"{mode}\"")))
        .replace("[upstreams.primary]", &format!("[read_only]\ndatabase = \"app_ro\"\n{ro}\n\n[upstreams.primary]"))
}

fn ro(proxy: &Proxy) -> String {
    proxy.conninfo().replace("dbname=postgres", "dbname=app_ro")
}

fn db(e: &tokio_postgres::Error) -> (String, String, String) {
    let d = e.as_db_error().unwrap_or_else(|| panic!("not a server error: {e}"));
    (d.severity().to_owned(), d.code().code().to_owned(), d.message().to_owned())
}

async fn setup(pg: &Pg, stmts: &[&str]) {
    let admin = connect(&pg.conninfo()).await.unwrap();
    for s in stmts {
        admin.batch_execute(s).await.unwrap_or_else(|e| panic!("{s}: {e}"));
    }
}

/// A table and a function made on the read-write route that turns read-only off where no filter can see it.
async fn sneaky(pg: &Pg) {
    let sql = "create function sneaky() returns text language sql as \
               $$ select set_config('default_transaction_read_only', 'off', false) $$";
    setup(pg, &["create table t(id int)", sql]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_tier_refuses_a_role_that_can_write_and_serves_one_that_cannot() {
    let pg = Pg::start();
    setup(
        &pg,
        &[
            "create table t(id int); insert into t values (1); create table audit(id int)",
            "create role reader login password 'rpw'",
            "grant select on t to reader",
            "grant insert on audit to reader",
        ],
    )
    .await;
    let cfg = ro_config(&pg, "enforce = \"role\"\nuser = \"reader\"\npassword_env = \"READER_PW\"", "transaction");
    let proxy = Proxy::start_env(&cfg, &[("READER_PW", "rpw")]);
    // Checked at startup, before any client: the log says the route is not served and why.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !proxy.log().contains("read-only route is not served") {
        assert!(std::time::Instant::now() < deadline, "no startup verdict: {}", proxy.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(proxy.log().contains("may INSERT on public.audit"), "the startup check names what it found");
    let err = connect(&ro(&proxy)).await.err();
    let err = match err {
        Some(e) => e,
        None => {
            // Transaction mode logs in from the pool's template: the first statement meets the check.
            let c = connect(&ro(&proxy)).await.unwrap();
            c.simple_query("select 1").await.unwrap_err()
        }
    };
    let (sev, code, msg) = db(&err);
    assert_eq!(code, "25006", "{sev} {msg}");
    assert!(msg.contains("may INSERT on public.audit") && msg.contains("reader"), "{msg}");
    assert!(proxy.log().contains("read-only route refuses a server connection"), "logged");
    // The read-write route is not affected.
    connect(&proxy.conninfo()).await.unwrap().simple_query("insert into t values (2)").await.unwrap();

    // Revoked: the next server connection passes the check, reads work and writes fail in Postgres itself.
    setup(&pg, &["revoke insert on audit from reader"]).await;
    let c = connect(&ro(&proxy)).await.unwrap();
    let n: i64 = c.query_one("select count(*) from t", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
    let who: String = c.query_one("select current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(who, "reader", "the route logs in as its own role");
    let e = c.simple_query("insert into t values (3)").await.unwrap_err();
    assert_eq!(db(&e).1, "25006", "read-only is still forced on top of the role");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_tier_refuses_a_primary() {
    let pg = Pg::start();
    let ro_cfg = format!("enforce = \"replica\"\nreplica_url = \"{}\"\non_replica_down = \"refuse\"", pg.url());
    let proxy = Proxy::start(&ro_config(&pg, &ro_cfg, "session"));
    let err = connect(&ro(&proxy)).await.unwrap_err();
    let (sev, code, msg) = db(&err);
    assert_eq!((sev.as_str(), code.as_str()), ("FATAL", "25006"), "{msg}");
    assert!(msg.contains("not in recovery"), "{msg}");
}

#[test]
fn each_tier_states_what_it_needs() {
    let pg = Pg::start();
    let check = |ro_cfg: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("budgets.toml");
        std::fs::write(&path, ro_config(&pg, ro_cfg, "session")).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgbudget"))
            .args(["check", "--config"])
            .arg(&path)
            .env_remove("PGBUDGET_SLICES")
            .env_remove("RO_PW")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, out) = check("enforce = \"replica\"");
    assert_eq!(code, Some(2));
    assert!(out.contains("needs read_only.replica_url"), "{out}");
    let (code, out) = check(&format!("enforce = \"replica\"\nreplica_url = \"{}\"", pg.url()));
    assert_eq!(code, Some(2));
    assert!(out.contains("cannot fall through"), "{out}");
    let (code, out) = check("enforce = \"role\"");
    assert_eq!(code, Some(2));
    assert!(out.contains("needs read_only.user"), "{out}");
    let (code, out) = check("enforce = \"role\"\nuser = \"r\"\npassword_env = \"RO_PW\"");
    assert_eq!(code, Some(2));
    assert!(out.contains("RO_PW"), "{out}");
    let (code, out) = check("");
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("read-only enforcement: session") && out.contains("stops mistakes, not a hostile client"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tripwire_ends_the_session_and_discards_its_server() {
    let pg = Pg::start();
    sneaky(&pg).await;
    let admin = connect(&pg.conninfo()).await.unwrap();
    for mode in ["session", "transaction"] {
        let proxy = Proxy::start(&ro_config(&pg, "", mode));
        let c = connect(&ro(&proxy)).await.unwrap();
        c.simple_query("select 1").await.unwrap();
        let ro_backends = || async {
            let n: i64 = admin
                .query_one("select count(*) from pg_stat_activity where application_name = 'pgbudget:app:ro'", &[])
                .await
                .unwrap()
                .get(0);
            n
        };
        assert_eq!(ro_backends().await, 1, "{mode}");
        // The statement's own answer reaches the client (its transaction was still read-only); the session
        // ends right after it, so the write that would come next has no session to run in.
        let _ = c.simple_query("select sneaky()").await;
        let err = c.simple_query("insert into t values (1)").await.unwrap_err();
        if let Some(d) = err.as_db_error() {
            assert_eq!((d.severity(), d.code().code()), ("FATAL", "25006"), "{mode}: {}", d.message());
            assert!(d.message().contains("tripwire") && d.message().contains("default_transaction_read_only = off"));
        } else {
            assert!(err.is_closed(), "{mode}: {err}");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while ro_backends().await > 0 {
            assert!(std::time::Instant::now() < deadline, "{mode}: the tripped server was not discarded");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let rows: i64 = admin.query_one("select count(*) from t", &[]).await.unwrap().get(0);
        assert_eq!(rows, 0, "{mode}: nothing was written");
        assert!(proxy.log().contains("read_only_tripwire"), "{mode}: logged");
        // The route goes on for the next client, read-only again.
        let next = connect(&ro(&proxy)).await.unwrap();
        let e = next.simple_query("insert into t values (2)").await.unwrap_err();
        assert_eq!(db(&e).1, "25006");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn procedures_prepared_transactions_bundled_control_and_fastpath_are_refused() {
    let pg = Pg::start();
    setup(&pg, &["create procedure noop() language sql as $$ select 1 $$"]).await;
    for mode in ["session", "transaction"] {
        let proxy = Proxy::start(&ro_config(&pg, "", mode));
        let c = connect(&ro(&proxy)).await.unwrap();
        for sql in [
            "call noop()",
            "do $$ begin perform 1; end $$",
            "commit prepared 'x'",
            "rollback prepared 'x'",
            "prepare transaction 'x'",
            "select 1; commit; select 2",
            "select 1; begin; select 2",
        ] {
            let e = c.simple_query(sql).await.expect_err(sql);
            assert_eq!(db(&e).1, "25006", "{mode}: {sql}");
            // Extended protocol too (one statement per Parse, where it applies): the rewritten statement fails
            // when it runs.
            if !sql.contains(';') {
                let e = c.query(sql, &[]).await.expect_err(sql);
                assert_eq!(db(&e).1, "25006", "{mode} (extended): {sql}");
            }
            c.simple_query("select 1").await.expect("the session goes on");
        }
        // First in its message, transaction control is fine.
        c.batch_execute("begin").await.unwrap();
        c.batch_execute("commit").await.unwrap();
        c.batch_execute("begin; select 1").await.unwrap();
        c.batch_execute("commit").await.unwrap();
        // In one extended batch: a statement, then COMMIT, then more (Parse/Bind/Execute x3, one Sync).
        {
            use tokio::io::AsyncWriteExt;
            let mut s = raw::Raw::login(proxy.port, &raw::params("app_ro"), PG_PASSWORD).await.unwrap();
            let mut batch = Vec::new();
            for sql in ["select 1", "commit", "select 2"] {
                batch.extend(raw::parse("", sql));
                batch.extend(raw::bind(""));
                batch.extend(raw::execute());
            }
            batch.extend(raw::sync());
            s.s.write_all(&batch).await.unwrap();
            let reply = s.reply().await.unwrap();
            assert_eq!(reply.error.as_ref().map(|e| e.code.as_str()), Some("25006"), "{mode}: {reply:?}");
        }
        drop(c);
        // A fastpath FunctionCall of set_config (oid 2078) has no text to check: refused, the session goes on.
        let mut s = raw::Raw::login(proxy.port, &raw::params("app_ro"), PG_PASSWORD).await.unwrap();
        let mut body = Vec::new();
        body.extend_from_slice(&2078i32.to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes()); // argument formats
        body.extend_from_slice(&3i16.to_be_bytes()); // arguments
        for a in [&b"default_transaction_read_only"[..], b"off", b"false"] {
            body.extend_from_slice(&(a.len() as i32).to_be_bytes());
            body.extend_from_slice(a);
        }
        body.extend_from_slice(&0i16.to_be_bytes()); // result format
        use tokio::io::AsyncWriteExt;
        s.s.write_all(&raw::msg(b'F', &body)).await.unwrap();
        let reply = s.reply().await.unwrap();
        assert_eq!(reply.error.as_ref().map(|e| e.code.as_str()), Some("25006"), "{mode}: {reply:?}");
        let r = s.simple("show default_transaction_read_only").await.unwrap();
        assert_eq!(r.rows, vec![vec![Some("on".to_owned())]], "{mode}: still read-only");
    }
}

/// A pipelined bypass: the statement that turns read-only off and the write after it in one burst. The route
/// holds the write back until the first statement's ReadyForQuery (and its ParameterStatus) was read, so the
/// tripwire ends the session before the write reaches Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_write_after_turning_read_only_off_never_runs() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pg = Pg::start();
    sneaky(&pg).await;
    let admin = connect(&pg.conninfo()).await.unwrap();
    for mode in ["session", "transaction"] {
        let proxy = Proxy::start(&ro_config(&pg, "", mode));
        let mut s = raw::Raw::login(proxy.port, &raw::params("app_ro"), PG_PASSWORD).await.unwrap();
        let mut burst = raw::query("select sneaky()");
        burst.extend(raw::query("insert into t values (1)"));
        burst.extend(raw::query("insert into t values (2)"));
        s.s.write_all(&burst).await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.s.read_to_end(&mut got)).await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains("25006") && text.contains("tripwire"), "{mode}: {text}");
        let rows: i64 = admin.query_one("select count(*) from t", &[]).await.unwrap().get(0);
        assert_eq!(rows, 0, "{mode}: the pipelined write ran");
    }
}

/// Spellings only the server's own reading reveals: `U&` identifiers and strings (with `UESCAPE`), and a
/// statement hidden in a string that ends elsewhere once `standard_conforming_strings` is off. Each is refused
/// by the filter itself (25006, the session goes on), before any tripwire is needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicode_escapes_and_backslash_strings_are_read_as_the_server_reads_them() {
    let pg = Pg::start();
    for mode in ["session", "transaction"] {
        let proxy = Proxy::start(&ro_config(&pg, "", mode));
        let c = connect(&ro(&proxy)).await.unwrap();
        for sql in [
            r#"SET U&"d\0065fault_transaction_read_only" = off"#,
            r#"SET U&"d!0065fault_transaction_read_only" UESCAPE '!' = off"#,
            r"select set_config(U&'default\005ftransaction\005fread\005fonly', 'off', false)",
            r"select set_config(U&'default!005ftransaction!005fread!005fonly' UESCAPE '!', 'off', false)",
        ] {
            let e = c.simple_query(sql).await.expect_err(sql);
            assert_eq!(db(&e).1, "25006", "{mode}: {sql}");
            let e = c.query(sql, &[]).await.expect_err(sql);
            assert_eq!(db(&e).1, "25006", "{mode} (extended): {sql}");
        }
        c.simple_query("set standard_conforming_strings = off").await.unwrap();
        let e = c.simple_query(r"SELECT 'a\''; RESET ALL; --'").await.expect_err("hidden RESET ALL");
        let (_, code, msg) = db(&e);
        assert_eq!(code, "25006", "{mode}: {msg}");
        assert!(!msg.contains("tripwire"), "the filter refused it, not the tripwire: {msg}");
        let v: String = c.query_one("show default_transaction_read_only", &[]).await.unwrap().get(0);
        assert_eq!(v, "on", "{mode}: still read-only");
    }
}
