//! Real client drivers through pgbudget in transaction mode: asyncpg (statement cache, named prepared
//! statements), psycopg 3 (server-side prepare after `prepare_threshold`, pipeline mode), node-postgres (named
//! queries) and `pgbench -M prepared`; session state that must not leak from one client to the next; and the
//! session features that pin a server to its client (`pin = "allow"`, the default) or are refused
//! (`pin = "refuse"`).
//!
//! The scenarios are scripts in `tests/drivers/` (`*.py`, `node/*.js`) that read `PROXY_DSN` and `DIRECT_DSN`
//! (postgres:// URLs), print one summary line of figures and exit non-zero naming every failed check. The drivers
//! come from `scripts/driver-deps` (scripts/deps runs it); without them every test here fails saying so.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest a scenario script may run before it is killed (each script has its own, shorter, deadline).
const SCRIPT_DEADLINE: Duration = Duration::from_secs(90);

fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

fn require_python_drivers() {
    let out = Command::new("python3")
        .args(["-c", "import asyncpg, psycopg; print(asyncpg.__version__, psycopg.__version__)"])
        .output();
    let ok = out.as_ref().map(|o| o.status.success()).unwrap_or(false);
    assert!(
        ok,
        "python3 cannot import asyncpg and psycopg: run `scripts/driver-deps` (scripts/deps and scripts/test run it)\n{}",
        out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_else(|e| e.to_string())
    );
}

fn require_node_pg() {
    let out = Command::new("node").args(["-e", "require('pg')"]).current_dir(drivers_dir().join("node")).output();
    let ok = out.as_ref().map(|o| o.status.success()).unwrap_or(false);
    assert!(
        ok,
        "node cannot load `pg` from tests/drivers/node: run `scripts/driver-deps` (scripts/deps and scripts/test run it)\n{}",
        out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_else(|e| e.to_string())
    );
}

/// One transaction-mode service `app` with the given share and extra keys.
fn service(share: u32, extra: &str) -> String {
    format!("[services.app]\nslice = {share}\npool_mode = \"transaction\"\n{extra}")
}

/// Start pgbudget for `services` (slice floor 1, so a share of 1 is allowed). The file is checked with
/// `pgbudget check` first: a refused key fails here at once, with pgbudget's reasons, instead of after
/// `Proxy::start`'s 20 s wait for a listener.
fn start_proxy(pg: &Pg, services: &str) -> Proxy {
    let cfg = config(pg, services).replace("[proxy]\n", "[proxy]\nslice_floor = 1\n");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("budgets.toml");
    std::fs::write(&path, &cfg).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pgbudget"))
        .args(["check", "--config"])
        .arg(&path)
        .env_remove("RAILWAY_SERVICE_NAME")
        .output()
        .expect("pgbudget check runs");
    assert!(
        out.status.success(),
        "pgbudget refuses the test's configuration:\n{}{}\n--- budgets.toml ---\n{cfg}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Proxy::start(&cfg)
}

fn url(port: u16) -> String {
    format!("postgres://postgres:{PG_PASSWORD}@127.0.0.1:{port}/postgres")
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The last `lines` lines of pgbudget's log above DEBUG (the tests run it with RUST_LOG=debug).
fn log_tail(proxy: &Proxy, lines: usize) -> String {
    let log = proxy.log();
    let kept: Vec<&str> = log.lines().filter(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE ")).collect();
    kept[kept.len().saturating_sub(lines)..].join("\n")
}

/// Run one scenario script (`program script`) against `proxy` and `pg`; panics with its output and the end of
/// pgbudget's log unless it exits 0 within `SCRIPT_DEADLINE`. Returns its stdout.
fn run_scenario(program: &str, script: &str, pg: &Pg, proxy: &Proxy, env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let script_path = drivers_dir().join(script);
    let started = Instant::now();
    let mut child = Command::new(program)
        .arg(&script_path)
        .current_dir(script_path.parent().unwrap())
        .env("PROXY_DSN", url(proxy.port))
        .env("DIRECT_DSN", url(pg.port))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .env_remove("PGAPPNAME")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (run scripts/driver-deps)"));
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if started.elapsed() > SCRIPT_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let verdict = match status {
        Some(st) if st.success() => {
            println!("{script}: {:.1} s\n{stdout}{stderr}", started.elapsed().as_secs_f64());
            return stdout;
        }
        Some(st) => format!("{script} failed ({st}) after {:.1} s", started.elapsed().as_secs_f64()),
        None => format!("{script} did not finish within {SCRIPT_DEADLINE:?} and was killed"),
    };
    panic!(
        "{verdict}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n--- pgbudget log (last 40 lines above DEBUG) ---\n{}",
        log_tail(proxy, 40)
    );
}

/// 50 asyncpg clients, default statement cache, share 5: every result right, peak server connections <= 5.
#[test]
fn asyncpg_statement_cache_hammer() {
    require_python_drivers();
    let pg = Pg::start();
    let proxy = start_proxy(&pg, &service(5, "checkout_timeout = \"20s\"\n"));
    let out = run_scenario(
        "python3",
        "asyncpg_hammer.py",
        &pg,
        &proxy,
        &[("CLIENTS", "50"), ("ITERATIONS", "100"), ("SHARE", "5")],
    );
    assert!(out.contains("asyncpg_statement_cache_hammer: ok"), "{out}");
}

/// SET search_path / ROLE / statement_timeout / standard_conforming_strings / application_name and
/// set_config(work_mem) follow their client across transactions and never reach another client (share 1:
/// every client uses the same server). asyncpg and psycopg.
#[test]
fn session_state_does_not_leak() {
    require_python_drivers();
    let pg = Pg::start();
    let proxy = start_proxy(&pg, &service(1, "checkout_timeout = \"5s\"\n"));
    let out = run_scenario("python3", "session_state.py", &pg, &proxy, &[]);
    assert!(out.contains("session_state_does_not_leak: ok"), "{out}");
}

/// psycopg 3 with the default prepare_threshold (5): 10 connections over share 2 run 3 queries 30 times each
/// (so they are prepared server-side as _pg3_0.._pg3_2 by every connection), plus a 50-statement pipeline.
#[test]
fn psycopg_prepare_threshold() {
    require_python_drivers();
    let pg = Pg::start();
    let proxy = start_proxy(&pg, &service(2, "checkout_timeout = \"20s\"\n"));
    let out = run_scenario("python3", "psycopg_prepare.py", &pg, &proxy, &[("SHARE", "2")]);
    assert!(out.contains("psycopg_prepare_threshold: ok"), "{out}");
}

/// node-postgres: 20 clients over share 3, each running two named queries (same names in every client) 50 times.
#[test]
fn node_pg_named_queries() {
    require_node_pg();
    let pg = Pg::start();
    let proxy = start_proxy(&pg, &service(3, "checkout_timeout = \"20s\"\n"));
    let out = run_scenario("node", "node/named_queries.js", &pg, &proxy, &[("CLIENTS", "20"), ("SHARE", "3")]);
    assert!(out.contains("node_pg_named_queries: ok"), "{out}");
}

/// Default pinning (`pin = "allow"`): LISTEN, a temp table, a session advisory lock, SQL PREPARE and a WITH HOLD
/// cursor keep the client's server (share 1: another client's checkout times out with 53300) until the state
/// is gone again; CREATE TEMP TABLE ... ON COMMIT DROP inside a transaction does not pin.
#[test]
fn pinning_allow() {
    require_python_drivers();
    let pg = Pg::start();
    // `pin` is left at its default ("allow").
    let proxy = start_proxy(&pg, &service(1, "checkout_timeout = \"1s\"\nnotice_after = \"0s\"\n"));
    let out = run_scenario("python3", "pinning_allow.py", &pg, &proxy, &[("CHECKOUT_TIMEOUT_S", "1")]);
    assert!(out.contains("pinning_allow: ok"), "{out}");
}

/// `pin = "refuse"`: each session feature that would pin fails with 0A000 naming pinning, leaves nothing behind
/// on the server, and the connection goes on.
#[test]
fn pinning_refuse() {
    require_python_drivers();
    let pg = Pg::start();
    let proxy = start_proxy(&pg, &service(1, "checkout_timeout = \"1s\"\nnotice_after = \"0s\"\npin = \"refuse\"\n"));
    let out = run_scenario("python3", "pinning_refuse.py", &pg, &proxy, &[("CHECKOUT_TIMEOUT_S", "1")]);
    assert!(out.contains("pinning_refuse: ok"), "{out}");
}

fn pgbench(pg: &Pg, port: u16, args: &[&str]) -> Command {
    let mut c = Command::new(pgbench_bin(pg));
    c.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(args)
        .arg("postgres")
        .env("PGPASSWORD", PG_PASSWORD)
        .env_remove("PGAPPNAME");
    c
}

/// `pgbench -M prepared` (named statements P_0.. in every client) with 8 clients over share 3: no failed or
/// aborted transaction, a positive TPS, and never more than 3 server connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_transaction_mode() {
    let pg = Pg::start();
    let init = pgbench(&pg, pg.port, &["-i", "-q", "-s", "1"]).output().expect("pgbench runs");
    assert!(init.status.success(), "pgbench -i failed: {}", String::from_utf8_lossy(&init.stderr));
    // 8 clients over 3 servers wait milliseconds for a checkout; 5 s bounds a run whose servers get stuck.
    let proxy = start_proxy(&pg, &service(3, "checkout_timeout = \"5s\"\n"));
    let admin = connect(&pg.conninfo()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = pgbench(&pg, proxy.port, &["-n", "-M", "prepared", "-c", "8", "-j", "2", "-T", "5"])
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("pgbench runs");
    let started = Instant::now();
    let (mut peak, mut samples) = (0i64, 0u32);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        let n: i64 = admin
            .query_one(
                "select count(*) from pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        peak = peak.max(n);
        samples += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    let context = format!(
        "--- pgbench stdout ---\n{out}\n--- pgbench stderr (last 20 lines) ---\n{}\n--- pgbudget log (last 30 lines above DEBUG) ---\n{}",
        tail(&err, 20),
        log_tail(&proxy, 30)
    );
    let failed: Option<u64> = out
        .lines()
        .find_map(|l| l.strip_prefix("number of failed transactions: "))
        .and_then(|v| v.split_whitespace().next()?.parse().ok());
    let processed: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next()?.trim().parse().ok())
        .unwrap_or(0);
    let tps: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let aborted = err.lines().filter(|l| l.contains("aborted")).count();
    println!(
        "pgbench -M prepared -c 8 over share 3: exit {status:?}, {processed} transactions, tps {tps:.0}, \
         failed {failed:?}, {aborted} aborted-client lines, peak {peak} server connections over {samples} samples"
    );
    let status = status.unwrap_or_else(|| panic!("pgbench did not finish within 30 s\n{context}"));
    assert!(status.success(), "pgbench exited with {status} ({aborted} aborted-client lines)\n{context}");
    assert_eq!(aborted, 0, "pgbench clients aborted\n{context}");
    if let Some(f) = failed {
        assert_eq!(f, 0, "pgbench reports {f} failed transactions\n{context}");
    }
    assert!(processed > 0 && tps > 0.0, "pgbench reports {processed} transactions, tps {tps}\n{context}");
    assert!(samples >= 5, "only {samples} samples of pg_stat_activity during the run");
    assert!(peak <= 3, "peak of {peak} server connections during the run, share is 3\n{context}");
    // The books balance: every history delta is in the account totals.
    let row = admin
        .query_one(
            "select (select sum(abalance) from pgbench_accounts) = (select coalesce(sum(delta),0) from pgbench_history)",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "pgbench_accounts and pgbench_history disagree\n{context}");
}
