//! Helpers of the deployment tests: processes and their children, HTTP probes, the sidecar entrypoint under test.

use super::*;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_pgbudget");
pub(crate) const SLICES: &str = "worker=38,canvas=20,web=15,landing=5:session,evergreen=5:session";

/// The example app's driver must import; a missing one fails with how to install it (never a silent skip).
pub(crate) fn require_python(module: &str) {
    let ok = Command::new("python3").args(["-c", &format!("import {module}")]).status().is_ok_and(|s| s.success());
    assert!(ok, "python3 cannot import {module}: run `scripts/driver-deps` (scripts/test runs it)");
}

pub(crate) fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// A command with none of the developer's pgbudget or platform variables leaking in.
pub(crate) fn clean(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars() {
        if k.starts_with("PGBUDGET_") || k.starts_with("RAILWAY_") || k == "DATABASE_URL" || k == "PORT" {
            cmd.env_remove(k);
        }
    }
    cmd.env_remove("WEB_CONCURRENCY").env("RUST_LOG", "info")
}

pub(crate) fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(") ").next().is_some_and(|rest| !rest.starts_with('Z')))
        .unwrap_or(false)
}

pub(crate) fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

pub(crate) fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_owned()
}

/// Kills a spawned pgbudget if a test panics before stopping it (checked by its command line, so a pid the
/// system reused is left alone).
pub(crate) struct KillOnPanic(pub(crate) u32);

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.0)).unwrap_or_default();
        if std::thread::panicking() && cmdline.starts_with(BIN.as_bytes()) {
            let _ = Command::new("kill").args(["-KILL", &self.0.to_string()]).status();
        }
    }
}

pub(crate) fn wait_exit(child: &mut Child, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st.code().unwrap_or(-1));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

pub(crate) fn http_get(port: u16, path: &str) -> (u16, String) {
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    match pgbudget::admin::probe::get(addr, path, Duration::from_secs(5)) {
        Ok(body) => (200, body),
        Err(pgbudget::admin::probe::ProbeError::Status { status, body, .. }) => (status, body),
        Err(e) => panic!("GET {path} on {port}: {e}"),
    }
}

/// Lines of the app's stdout, read on a thread.
pub(crate) fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Postgres logging every connection that ends without a Terminate (DEBUG1 "unexpected EOF on client
/// connection"), so a pgbudget killed under its servers shows in the log.
pub(crate) fn pg_logging_eof() -> Pg {
    Pg::start_with(&["log_min_messages=debug1"])
}

pub(crate) fn disconnect_noise(pg_log: &str) -> Vec<String> {
    pg_log
        .lines()
        .filter(|l| {
            l.contains("Connection reset") || l.contains("unexpected EOF") || l.contains("could not receive data")
        })
        .map(str::to_owned)
        .collect()
}

pub(crate) struct Sidecar {
    pub(crate) child: Child,
    pub(crate) proxy_port: u16,
    pub(crate) admin_port: u16,
    pub(crate) lines: mpsc::Receiver<String>,
    pub(crate) _cwd: tempfile::TempDir,
}

impl Sidecar {
    pub(crate) fn start(pg: &Pg, app: &[&str], extra: &[(&str, &str)]) -> Sidecar {
        let cwd = tempfile::tempdir().unwrap();
        let (proxy_port, admin_port) = (free_port(), free_port());
        let mut cmd = Command::new("sh");
        clean(&mut cmd)
            .arg(repo("examples/sidecar/entrypoint"))
            .args(app)
            .current_dir(cwd.path())
            .env("PGBUDGET_BIN", BIN)
            .env("DATABASE_URL", format!("{}?sslmode=prefer", pg.url()))
            .env("PGBUDGET_SLICES", "app=6,other=4")
            .env("PGBUDGET_CEILING", "20")
            .env("RAILWAY_SERVICE_NAME", "app")
            .env("WEB_CONCURRENCY", "4")
            .env("PGBUDGET_LISTEN", format!("127.0.0.1:{proxy_port}"))
            .env("PGBUDGET_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
            .envs(extra.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(cwd.path().join("stderr")).unwrap());
        let mut child = cmd.spawn().expect("entrypoint starts");
        let lines = lines_of(&mut child);
        Sidecar { child, proxy_port, admin_port, lines, _cwd: cwd }
    }

    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(self._cwd.path().join("stderr")).unwrap_or_default()
    }

    /// The next app line matching `pred`, within `d`.
    pub(crate) fn expect_line(&self, d: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + d;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if pred(&l) => return l,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        panic!("no such app line within {d:?}; entrypoint stderr:\n{}", self.stderr());
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        for pid in children(self.child.id()) {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn queries(line: &str) -> u64 {
    line.split_whitespace().find_map(|w| w.strip_prefix("queries=")).and_then(|n| n.parse().ok()).unwrap_or(0)
}
