//! Test harness: a throwaway Postgres (initdb + postgres as an unprivileged user on a free port in a temp
//! dir) and the pgbudget binary in front of it. Everything started here is stopped by PID on Drop, and a
//! watchdog stops Postgres even if the test process dies.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const PG_PASSWORD: &str = "secret";

static NEXT_PORT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A bindable loopback port below the kernel's ephemeral range (32768+), so no outgoing connection of a
/// parallel test can take it between this check and the server's bind. Spread by process id.
pub fn free_port() -> u16 {
    let seed = std::process::id().wrapping_mul(7919);
    loop {
        let n = NEXT_PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 20_000 + (seed.wrapping_add(n.wrapping_mul(13)) % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn pg_bindir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").exists() {
            return p;
        }
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).filter(|p| p.join("initdb").exists()).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs.pop()
        .expect("PostgreSQL server binaries not found: install them with `apt-get install postgresql` (see README)")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// Run a command as the unprivileged `postgres` user when we are root.
fn as_pg(bin: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

pub struct Pg {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub bindir: PathBuf,
    child: Option<Child>,
}

impl Pg {
    pub fn start() -> Pg {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Pg {
        let bindir = pg_bindir();
        let dir = tempfile::Builder::new().prefix("pgbudget-pg-").tempdir_in("/tmp").unwrap();
        if is_root() {
            let st = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status().unwrap();
            assert!(st.success(), "chown of the Postgres temp dir failed");
        }
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, PG_PASSWORD).unwrap();
        if is_root() {
            Command::new("chown").args(["postgres:postgres"]).arg(&pwfile).status().unwrap();
        }
        let data = dir.path().join("data");
        let out = as_pg(&bindir.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "scram-sha-256", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .expect("initdb runs");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut pg = Pg { port: 0, dir, bindir, child: None };
        pg.launch(free_port(), extra);
        pg
    }

    fn launch(&mut self, port: u16, extra: &[&str]) {
        self.port = port;
        let data = self.dir.path().join("data");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let mut cmd = as_pg(&self.bindir.join("postgres"));
        cmd.arg("-D").arg(&data).arg("-p").arg(self.port.to_string()).arg("-k").arg(self.dir.path());
        cmd.args(["-c", "listen_addresses=127.0.0.1", "-c", "max_connections=300", "-c", "fsync=off"]);
        cmd.args(["-c", "log_connections=on", "-c", "log_disconnections=on", "-c", "shared_buffers=32MB"]);
        for e in extra {
            cmd.args(["-c", e]);
        }
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().expect("postgres starts");
        // Watchdog: if this test process dies without running Drop, stop Postgres anyway.
        let me = std::process::id();
        let pidfile = data.join("postmaster.pid");
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {me} 2>/dev/null; do sleep 1; done; p=$(head -1 {} 2>/dev/null); [ -n \"$p\" ] && kill -INT $p",
                pidfile.display()
            ))
            .stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null())
            .spawn();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "postgres did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        // The port opens before startup ends (a login then gets 57P03 "not yet accepting connections"):
        // wait until pg_isready says it accepts.
        let ready = || {
            Command::new(self.bindir.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-t", "2", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success())
        };
        while !ready() {
            assert!(Instant::now() < deadline, "postgres does not accept connections: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres:{PG_PASSWORD}@127.0.0.1:{}/postgres", self.port)
    }

    /// A direct connection string (no proxy) for psql/tokio-postgres.
    pub fn conninfo(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres password={PG_PASSWORD} dbname=postgres", self.port)
    }

    fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Fast shutdown by PID, waiting for the process to go.
    pub fn stop(&mut self) {
        if let Some(pid) = self.postmaster_pid() {
            let _ = Command::new("kill").args(["-INT", &pid.to_string()]).status();
        }
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same data directory and port.
    pub fn restart(&mut self) {
        self.stop();
        self.launch(self.port, &[]);
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct Proxy {
    pub port: u16,
    child: Option<Child>,
    pub dir: tempfile::TempDir,
}

/// A budgets.toml for one upstream and the given services block.
/// The tests count a service's server connections in `pg_stat_activity` by pgbudget's label, so their
/// proxies label every server (`server_application_name = "label"`; the default shows exactly the client's).
pub const LABEL: &str = "server_application_name = \"label\"\n";

pub fn config(pg: &Pg, services: &str) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nmode = \"sidecar\"\nservice = \"app\"\ndrain_timeout = \"10s\"\n{LABEL}\n\
         [upstreams.primary]\nurl = \"{}\"\nceiling = 90\nreserved = 2\n\n{services}",
        pg.url()
    )
}

impl Proxy {
    pub fn start(config: &str) -> Proxy {
        Self::start_env(config, &[])
    }

    pub fn start_env(config: &str, env: &[(&str, &str)]) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("budgets.toml");
        std::fs::write(&path, config).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("pgbudget.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_pgbudget"))
            .args(["run", "--config"])
            .arg(&path)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            // Tests run in parallel: no admin listener unless the test's config asks for one.
            .args(if config.contains("[admin]") { vec![] } else { vec!["--admin-listen", ""] })
            .env("RUST_LOG", "debug")
            .env_remove("RAILWAY_SERVICE_NAME")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("pgbudget starts");
        watchdog(child.id(), &path);
        let p = Proxy { port, child: Some(child), dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "pgbudget did not start: {}", p.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbudget.log")).unwrap_or_default()
    }

    pub fn conninfo(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres password={PG_PASSWORD} dbname=postgres", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Send SIGTERM and wait for exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A test stuck on its proxy fails in minutes instead of holding CI until its deadline: after
/// [`WATCHDOG`], a pgbudget still running from this config (its command line names the config's unique temp
/// path, so a reused pid is never touched) prints its log tail and is killed, and the test sees its connection end.
const WATCHDOG: Duration = Duration::from_secs(600);

fn watchdog(pid: u32, config: &Path) {
    let config = config.display().to_string();
    let log = Path::new(&config).with_file_name("pgbudget.log");
    std::thread::spawn(move || {
        std::thread::sleep(WATCHDOG);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(&config) {
            return;
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
        eprintln!("test watchdog: pgbudget {pid} still running after {WATCHDOG:?}; its log ends:\n{}", tail.join("\n"));
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    });
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub async fn connect(conninfo: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Number of server connections pgbudget holds for `service`: by its label, or by the names the tests' clients
/// give themselves (the service's name in shared mode, the tools' own, an exempt class's): a client's own
/// application_name is replayed on its server while it holds it.
pub async fn server_conns(admin: &tokio_postgres::Client, service: &str) -> i64 {
    admin
        .query_one(
            "select count(*) from pg_stat_activity where pid <> pg_backend_pid() \
             and (application_name in ($1, $2) or application_name in ('pgbench', 'psql', 'ops'))",
            &[&format!("pgbudget:{service}:rw"), &service],
        )
        .await
        .unwrap()
        .get(0)
}

/// `cfg` with an `[admin]` section: the HTTP listener on a free port (returned) and the console for `postgres`.
pub fn with_admin(cfg: String) -> (String, u16) {
    let port = free_port();
    let cfg = cfg.replace(
        "[upstreams.primary]",
        &format!("[admin]\nlisten = \"127.0.0.1:{port}\"\nusers = [\"postgres\"]\n\n[upstreams.primary]"),
    );
    (cfg, port)
}

/// The value of one sample in Prometheus text, parsed by a real Prometheus text parser.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    scrape.samples.iter().find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))).map(
        |s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        },
    )
}

pub fn psql(conninfo: &str, args: &[&str]) -> std::process::Output {
    Command::new("psql")
        .arg(conninfo)
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-At"])
        .args(args)
        .output()
        .expect("psql runs")
}

pub fn pgbench_bin(pg: &Pg) -> PathBuf {
    let p = pg.bindir.join("pgbench");
    if p.exists() {
        p
    } else {
        PathBuf::from("pgbench")
    }
}
