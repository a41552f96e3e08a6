//! pgbench through pgbudget in every supported (pool mode, query protocol) pair: no failed transactions,
//! balances consistent afterwards, and the server connection count within the share.

mod common;
use common::*;
use std::process::Command;

fn pgbench(pg: &Pg, port: u16, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(pgbench_bin(pg))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(args)
        .arg("postgres")
        .env("PGPASSWORD", PG_PASSWORD)
        .output()
        .expect("pgbench runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn processed(stdout: &str) -> u64 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next()?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_tpcb_in_every_mode_and_protocol() {
    let pg = Pg::start();
    let (ok, _, err) = pgbench(&pg, pg.port, &["-i", "-q", "-s", "1"]);
    assert!(ok, "pgbench -i failed: {err}");
    let admin = connect(&pg.conninfo()).await.unwrap();
    let cases = [
        ("session", "simple"),
        ("session", "extended"),
        ("session", "prepared"),
        ("transaction", "simple"),
        ("transaction", "extended"),
    ];
    for (mode, proto) in cases {
        let proxy = Proxy::start(&config(
            &pg,
            &format!("[services.app]\nslice = 4\npool_mode = \"{mode}\"\ncheckout_timeout = \"20s\"\n"),
        ));
        let clients = if mode == "session" { "4" } else { "12" };
        let (ok, out, err) = pgbench(&pg, proxy.port, &["-n", "-M", proto, "-c", clients, "-j", "2", "-T", "3"]);
        assert!(ok, "{mode}/{proto}: pgbench failed:\n{out}\n{err}\n{}", proxy.log());
        assert!(out.contains("number of failed transactions: 0"), "{mode}/{proto}:\n{out}");
        let n = processed(&out);
        assert!(n > 200, "{mode}/{proto}: only {n} transactions");
        assert!(server_conns(&admin, "app").await <= 4);
        println!("{mode}/{proto}: {n} transactions in 3 s");
    }
    // tpcb-like keeps the books balanced: every history delta is in the account totals.
    let row = admin
        .query_one("select (select sum(abalance) from pgbench_accounts) = (select coalesce(sum(delta),0) from pgbench_history)", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
}
