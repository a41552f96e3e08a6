//! Read-only routes against a real Postgres: writes and every known bypass spelling fail with 25006 in
//! both protocols while the session goes on; read-write is untouched; reused connections stay read-only;
//! the routing gauge tells replica from primary fallthrough.

mod common;
use common::*;
use pgbudget::read_only::policy::KNOWN_BYPASSES;
use tokio_postgres::types::Type;

const SERVICES: &str = "[services.app]\nslice = 6\nread_only_share = 2\ncheckout_timeout = \"2s\"\n";

fn ro_config(pg: &Pg, extra_ro: &str, mode: &str, admin_port: u16) -> String {
    config(pg, &SERVICES.replace("slice = 6", &format!("slice = 6\npool_mode = \"{mode}\""))).replace(
        "[upstreams.primary]",
        &format!("[read_only]\ndatabase = \"app_ro\"\n{extra_ro}\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n[upstreams.primary]"),
    )
}

fn ro(proxy: &Proxy) -> String {
    proxy.conninfo().replace("dbname=postgres", "dbname=app_ro")
}

async fn gauge(port: u16, name: &str) -> String {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap().text().await.unwrap();
    text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} missing:\n{text}")).to_owned()
}

fn code(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_owned()).unwrap_or_else(|| format!("no SQLSTATE: {e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_bypasses_fail_with_25006_in_both_protocols() {
    let pg = Pg::start();
    let admin = connect(&pg.conninfo()).await.unwrap();
    admin
        .batch_execute("create table t(id int primary key, v text); insert into t values (1, 'a'); create sequence s")
        .await
        .unwrap();
    for mode in ["transaction", "session"] {
        let port = free_port();
        let proxy = Proxy::start(&ro_config(&pg, "", mode, port));
        let c = connect(&ro(&proxy)).await.unwrap();
        let writes = [
            "insert into t values (2, 'b')",
            "update t set v = 'x'",
            "delete from t",
            "create table nope(x int)",
            "select * from t for update",
            "select nextval('s')",
        ];
        for sql in writes {
            let e = c.simple_query(sql).await.unwrap_err();
            assert_eq!(code(&e), "25006", "{mode} simple: {sql}");
            let e = c.query_typed(sql, &[]).await.unwrap_err();
            assert_eq!(code(&e), "25006", "{mode} extended: {sql}");
        }
        for sql in KNOWN_BYPASSES {
            let e = c.simple_query(sql).await.unwrap_err();
            assert_eq!(code(&e), "25006", "{mode} simple bypass: {sql}");
            let msg = e.as_db_error().unwrap().message().to_owned();
            assert!(msg.contains("app_ro"), "{msg}");
            if !sql.contains(';') {
                let params: Vec<(&(dyn tokio_postgres::types::ToSql + Sync), Type)> = if sql.contains("$1") {
                    vec![(&"default_transaction_read_only", Type::TEXT), (&"off", Type::TEXT)]
                } else {
                    vec![]
                };
                let e = c.query_typed(sql, &params).await.unwrap_err();
                assert_eq!(code(&e), "25006", "{mode} extended bypass: {sql}");
            }
            // The session goes on, still read-only.
            let rows = c.simple_query("select v from t where id = 1").await.expect("next select works");
            assert!(rows.len() >= 2);
            let on: String = c.query_typed("show default_transaction_read_only", &[]).await.unwrap()[0].get(0);
            assert_eq!(on, "on", "after {sql}");
        }
        // A refused statement inside a transaction aborts it, as Postgres would.
        c.batch_execute("begin").await.unwrap();
        assert_eq!(code(&c.simple_query("reset all").await.unwrap_err()), "25006");
        assert_eq!(code(&c.simple_query("select 1").await.unwrap_err()), "25P02");
        c.batch_execute("rollback").await.unwrap();
        let text = gauge(port, "pgbudget_ro_violations_total").await;
        let n: f64 = text.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n >= KNOWN_BYPASSES.len() as f64, "{text}");
        assert!(proxy.log().contains("fingerprint=set default_transaction_read_only = off"), "audit log line missing");
        let leaked: Vec<String> = proxy.log().lines().filter(|l| l.contains("'off'")).map(str::to_owned).collect();
        assert!(leaked.is_empty(), "constants must not be logged: {leaked:?}");
        // The same statements succeed on the read-write route.
        let rw = connect(&proxy.conninfo()).await.unwrap();
        rw.batch_execute("insert into t values (100, 'rw'); delete from t where id = 100").await.unwrap();
        for sql in ["set default_transaction_read_only = off", "reset all", "discard all"] {
            rw.batch_execute(sql).await.unwrap();
        }
        let off: String = rw.query_typed("show default_transaction_read_only", &[]).await.unwrap()[0].get(0);
        assert_eq!(off, "off");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_connections_stay_read_only_and_pools_stay_apart() {
    let pg = Pg::start();
    let admin = connect(&pg.conninfo()).await.unwrap();
    let port = free_port();
    let proxy = Proxy::start(&ro_config(&pg, "", "session", port));
    for _ in 0..3 {
        let c = connect(&ro(&proxy)).await.unwrap();
        let on: String = c.query_one("show default_transaction_read_only", &[]).await.unwrap().get(0);
        assert_eq!(on, "on");
        drop(c);
        let rw = connect(&proxy.conninfo()).await.unwrap();
        let off: String = rw.query_one("show default_transaction_read_only", &[]).await.unwrap().get(0);
        assert_eq!(off, "off", "a read-write client got a read-only connection");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Read-only server connections carry their own label and count against the service's slice.
    let n: i64 = admin
        .query_one("select count(*) from pg_stat_activity where application_name = 'pgbudget:app:ro'", &[])
        .await
        .unwrap()
        .get(0);
    assert!((1..=2).contains(&n), "{n}");
    assert!(gauge(port, "pgbudget_ro_routes_to{").await.ends_with(" 2"), "no replica: primary_fallthrough");
    let body = reqwest::get(format!("http://127.0.0.1:{port}/pools")).await.unwrap().text().await.unwrap();
    let pools: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(pools["read_only"]["routes_to"], "primary_fallthrough");
    let ro_row = pools["pools"].as_array().unwrap().iter().find(|p| p["route"] == "ro").unwrap().clone();
    assert_eq!(ro_row["share"], 2);
    assert_eq!(ro_row["ro_routes_to"], "primary_fallthrough");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_serves_reads_and_gauge_reads_1() {
    let pg = Pg::start();
    let replica = Pg::start();
    let r = connect(&replica.conninfo()).await.unwrap();
    r.batch_execute("create table only_on_replica(x int); insert into only_on_replica values (7)").await.unwrap();
    let port = free_port();
    let extra = format!("replica_url = \"{}\"\nreplica_ceiling = 10\n", replica.url());
    let proxy = Proxy::start(&ro_config(&pg, &extra, "transaction", port));
    let c = connect(&ro(&proxy)).await.unwrap();
    let x: i32 = c.query_typed("select x from only_on_replica", &[]).await.unwrap()[0].get(0);
    assert_eq!(x, 7);
    assert_eq!(code(&c.simple_query("insert into only_on_replica values (8)").await.unwrap_err()), "25006");
    assert!(gauge(port, "pgbudget_ro_routes_to{").await.ends_with(" 1"));
    // The read-write route still goes to the primary.
    let rw = connect(&proxy.conninfo()).await.unwrap();
    assert!(rw.simple_query("select * from only_on_replica").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_replica_falls_through_with_enforcement_or_refuses() {
    let pg = Pg::start();
    let dead = format!("postgres://postgres:{PG_PASSWORD}@127.0.0.1:{}/postgres", free_port());
    let port = free_port();
    let extra = format!("replica_url = \"{dead}\"\non_replica_down = \"fallthrough\"\n");
    let proxy = Proxy::start(&ro_config(&pg, &extra, "transaction", port));
    let c = connect(&ro(&proxy)).await.unwrap();
    c.simple_query("select 1").await.expect("served by the primary");
    let on: String = c.query_typed("show default_transaction_read_only", &[]).await.unwrap()[0].get(0);
    assert_eq!(on, "on");
    assert_eq!(code(&c.simple_query("create table x(i int)").await.unwrap_err()), "25006");
    assert!(gauge(port, "pgbudget_ro_routes_to{").await.ends_with(" 2"));

    let port = free_port();
    let extra = format!("replica_url = \"{dead}\"\non_replica_down = \"refuse\"\n");
    let proxy = Proxy::start(&ro_config(&pg, &extra, "session", port));
    let e = connect(&ro(&proxy)).await.unwrap_err();
    assert_eq!(code(&e), "08006");
}
