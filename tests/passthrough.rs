//! `[auth] passthrough`: roles only Postgres knows log in through pgbudget with their own passwords, and their
//! servers log in as them, without pgbudget ever holding the password.

mod common;
use common::*;

const AUTH: &str = "[auth]\nmethod = \"scram-sha-256\"\npassthrough = true\n";

fn services(mode: &str) -> String {
    format!("{AUTH}[services.app]\nslice = 4\npool_mode = \"{mode}\"\ncheckout_timeout = \"2s\"\n")
}

fn as_role(proxy: &Proxy, user: &str, password: &str) -> String {
    proxy
        .conninfo()
        .replace("user=postgres", &format!("user={user}"))
        .replace(&format!("password={PG_PASSWORD}"), &format!("password={password}"))
}

fn code(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map(|d| d.code().code().to_owned()).unwrap_or_else(|| format!("no SQLSTATE: {e}"))
}

fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default()
}

async fn direct(pg: &Pg) -> tokio_postgres::Client {
    connect(&pg.conninfo()).await.unwrap()
}

/// Backends logged in as `role`, seen directly.
async fn backends_of(admin: &tokio_postgres::Client, role: &str) -> i64 {
    admin
        .query_one(
            "select count(*) from pg_stat_activity where usename = $1 and backend_type = 'client backend'",
            &[&role],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_only_postgres_knows_logs_in_with_its_own_password_and_its_servers_run_as_it() {
    let pg = Pg::start();
    let admin = direct(&pg).await;
    admin.batch_execute("create role alice login password 'wonder land'; create role nologin_role").await.unwrap();
    for mode in ["transaction", "session"] {
        let proxy = Proxy::start(&config(&pg, &services(mode)));
        let alice = connect(&as_role(&proxy, "alice", "'wonder land'")).await.expect("alice logs in");
        let row = alice.query_one("select current_user::text, session_user::text", &[]).await.unwrap();
        assert_eq!((row.get::<_, String>(0), row.get::<_, String>(1)), ("alice".into(), "alice".into()), "{mode}");
        assert!(backends_of(&admin, "alice").await >= 1, "{mode}: a server logged in as alice");
        // The URL's own role still logs in as before.
        let pgc = connect(&proxy.conninfo()).await.expect("the URL's role");
        let who: String = pgc.query_one("select current_user::text", &[]).await.unwrap().get(0);
        assert_eq!(who, "postgres");
        // A wrong password and an unknown role read the same, as direct.
        for (user, pw) in [("alice", "wrong"), ("nobody", "wonder"), ("nologin_role", "x")] {
            let e = connect(&as_role(&proxy, user, pw)).await.err().unwrap_or_else(|| panic!("{mode}: {user} got in"));
            assert_eq!(code(&e), "28P01", "{mode} {user}: {e}");
            assert_eq!(message(&e), format!("password authentication failed for user \"{user}\""));
        }
        // Still in service after the refusals.
        let n: i32 = alice.query_one("select 1", &[]).await.unwrap().get(0);
        assert_eq!(n, 1);
        let log = proxy.log();
        assert!(!log.contains("wonder"), "no password in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_password_takes_effect_with_the_next_login() {
    let pg = Pg::start();
    let admin = direct(&pg).await;
    admin.batch_execute("create role bob login password 'first'").await.unwrap();
    let proxy = Proxy::start(&config(&pg, &services("transaction")));
    let bob = connect(&as_role(&proxy, "bob", "first")).await.unwrap();
    bob.batch_execute("select 1").await.unwrap();
    admin.batch_execute("alter role bob password 'second'").await.unwrap();
    let e = connect(&as_role(&proxy, "bob", "first")).await.expect_err("the old password is refused");
    assert_eq!(code(&e), "28P01", "{e}");
    // The servers logged in with the old keys are ended: the next ones log in with the new client's keys.
    admin.batch_execute("select pg_terminate_backend(pid) from pg_stat_activity where usename = 'bob'").await.unwrap();
    let bob2 = connect(&as_role(&proxy, "bob", "second")).await.expect("the new password");
    let who: String = bob2.query_one("select current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(who, "bob");
    assert!(backends_of(&admin, "bob").await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_with_an_md5_secret_cannot_pass_through_and_a_failing_auth_query_says_so() {
    let pg = Pg::start();
    let admin = direct(&pg).await;
    admin.batch_execute("set password_encryption = 'md5'; create role carol login password 'md5pw'").await.unwrap();
    let proxy = Proxy::start(&config(&pg, &services("transaction")));
    let e = connect(&as_role(&proxy, "carol", "md5pw")).await.expect_err("an md5 secret cannot log a server in");
    assert_eq!(code(&e), "28P01", "{e}");
    drop(proxy);
    let broken = services("transaction").replace(
        "passthrough = true\n",
        "passthrough = true\nauth_query = \"SELECT secret FROM no_such_table WHERE name = $1\"\n",
    );
    let proxy = Proxy::start(&config(&pg, &broken));
    let e = connect(&as_role(&proxy, "carol", "md5pw")).await.expect_err("the lookup fails");
    assert_eq!(code(&e), "28000", "{e}");
    assert!(message(&e).contains("could not read the password of role \"carol\""), "{e}");
    assert!(proxy.log().contains("auth_query: server error 42P01"), "the cause is in the log: {}", proxy.log());
    // The URL's role is not looked up, and the server the lookup used is fine for it.
    let pgc = connect(&proxy.conninfo()).await.unwrap();
    pgc.batch_execute("select 1").await.unwrap();
}

/// `method = "md5"` follows Postgres's own md5 method: a role with an md5 secret logs in with md5 (and its
/// servers answer md5 from the secret), a role with a SCRAM secret with SCRAM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_method_md5_each_role_logs_in_the_way_its_secret_allows() {
    let pg = Pg::start();
    let admin = direct(&pg).await;
    // TCP logins as md5 (a SCRAM secret still gets SCRAM there, as Postgres does).
    std::fs::write(
        pg.dir.path().join("data/pg_hba.conf"),
        "local all all scram-sha-256\nhost all all 127.0.0.1/32 md5\n",
    )
    .unwrap();
    admin.batch_execute("select pg_reload_conf()").await.unwrap();
    admin
        .batch_execute(
            "set password_encryption = 'md5'; create role carol login password 'md5pw'; \
             set password_encryption = 'scram-sha-256'; create role alice login password 'scrampw'",
        )
        .await
        .unwrap();
    let cfg = services("transaction").replace("method = \"scram-sha-256\"", "method = \"md5\"");
    let proxy = Proxy::start(&config(&pg, &cfg));
    for (role, pw) in [("carol", "md5pw"), ("alice", "scrampw")] {
        let c = connect(&as_role(&proxy, role, pw)).await.unwrap_or_else(|e| panic!("{role}: {e}\n{}", proxy.log()));
        let who: String = c.query_one("select current_user::text", &[]).await.unwrap().get(0);
        assert_eq!(who, role);
        assert!(backends_of(&admin, role).await >= 1, "{role}'s server logged in as {role}");
        let e = connect(&as_role(&proxy, role, "wrong")).await.expect_err("a wrong password");
        assert_eq!(code(&e), "28P01", "{role}: {e}");
    }
}

/// A server line a passthrough role cannot answer says why: a cleartext password (pgbudget never holds the
/// role's password, whatever `allow_cleartext_upstream` says) or GSSAPI (not supported upstream), with 08006.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_method_a_passthrough_role_cannot_answer_is_named() {
    let pg = Pg::start();
    let admin = direct(&pg).await;
    admin.batch_execute("create role pat login password 'pw1'; create role gus login password 'pw2'").await.unwrap();
    std::fs::write(
        pg.dir.path().join("data/pg_hba.conf"),
        "local all all scram-sha-256\nhost all pat 127.0.0.1/32 password\nhost all gus 127.0.0.1/32 gss\n\
         host all all 127.0.0.1/32 scram-sha-256\n",
    )
    .unwrap();
    admin.batch_execute("select pg_reload_conf()").await.unwrap();
    let proxy = Proxy::start(&config(&pg, &services("transaction")));
    for (role, pw, needle) in [("pat", "pw1", "which a passthrough role does not have"), ("gus", "pw2", "GSSAPI")] {
        let e = connect(&as_role(&proxy, role, pw)).await.expect_err(role);
        assert_eq!(code(&e), "08006", "{role}: {e}");
        assert!(message(&e).contains(needle), "{role}: {}", message(&e));
    }
}

/// The secret lookup runs on a server of the pool the URL's role uses, which a client of that role may have
/// left in its own session state: a `SET ROLE` to a role that cannot read `pg_authid`, a `search_path`
/// without `pg_catalog` first. Other clients' logins must not depend on it (one client never affects another).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_left_in_another_role_does_not_break_the_secret_lookup_of_other_logins() {
    let pg = Pg::start();
    let admin = direct(&pg).await;
    admin
        .batch_execute(
            "create role alice login password 'wonder land'; create role lowpriv; create schema trap; \
             create view trap.pg_authid as select 'x'::name as rolname, null::text as rolpassword",
        )
        .await
        .unwrap();
    let cfg = format!("{AUTH}[services.app]\nslice = 2\npool_mode = \"transaction\"\ncheckout_timeout = \"2s\"\n");
    let proxy = Proxy::start(&config(&pg, &cfg));
    let a = connect(&proxy.conninfo()).await.unwrap();
    for setup in ["set role lowpriv", "reset role; set search_path = trap, pg_catalog"] {
        a.batch_execute(setup).await.unwrap();
        // a's server is idle in the pool now, in a's settings; alice's login looks her secret up on it.
        for _ in 0..3 {
            let alice = connect(&as_role(&proxy, "alice", "'wonder land'"))
                .await
                .unwrap_or_else(|e| panic!("after {setup:?}: alice's login: {} {}", code(&e), message(&e)));
            let who: String = alice.query_one("select current_user::text", &[]).await.unwrap().get(0);
            assert_eq!(who, "alice", "after {setup:?}");
        }
        // And a's own state is as a left it.
        let row = a.query_one("select current_user::text, current_setting('search_path')", &[]).await.unwrap();
        let expect_user = if setup.starts_with("set role") { "lowpriv" } else { "postgres" };
        assert_eq!(row.get::<_, String>(0), expect_user, "after {setup:?}");
    }
}
