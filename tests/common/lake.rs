//! Lake test helpers: configs in a temp dir, pool_snapshots rows, and metric reads from a prometheus registry.
#![allow(dead_code)]

use pgbudget::lake::{LakeConfig, Row, Value};
use std::path::Path;
use std::time::Duration;

/// A lake in `dir` with an embedded file catalog; timers long enough that only size and explicit flushes fire.
pub fn file_config(dir: &Path) -> LakeConfig {
    LakeConfig {
        enabled: true,
        dir: dir.join("lake"),
        flush_interval: Duration::from_secs(3600),
        retry_interval: Duration::from_secs(3600),
        shutdown_timeout: Duration::from_secs(30),
        ..Default::default()
    }
}

/// Microseconds since the epoch of `YYYY-MM-01 00:00:00 UTC` plus `secs`.
pub fn month_start(year: i64, month: i64, secs: i64) -> i64 {
    // days from civil (Howard Hinnant), day 1 of the month
    let (y, m) = if month <= 2 { (year - 1, month + 9) } else { (year, month - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    (days * 86_400 + secs) * 1_000_000
}

/// A pool_snapshots row (20 columns) whose figures derive from `i`.
pub fn pool_row(i: i64, ts_micros: i64) -> Row {
    vec![
        Value::Ts(ts_micros),
        format!("svc{}", i % 3).into(),
        "rw".into(),
        "primary".into(),
        "transaction".into(),
        Value::Int(15),
        Value::Int(i % 1000),
        Value::Int(3),
        Value::Int(12),
        Value::Int(i % 7),
        Value::Int(i),
        Value::Int(i * 10),
        Value::Int(i * 100),
        Value::Int(40),
        Value::Int(97),
        Value::Null,
        Value::Int(i % 1000),
        Value::Int(i % 7),
        Value::Float(0.5),
        Value::Int(i % 3),
        Value::Text("app".into()),
        Value::Text("postgres".into()),
    ]
}

/// Sum of a metric's samples whose labels include all of `labels` (`<histogram>_sum`: the histogram's sum).
pub fn metric(reg: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    let (family, hist_sum) = match name.strip_suffix("_sum") {
        Some(base) => (base, true),
        None => (name, false),
    };
    for fam in reg.gather().iter().filter(|f| f.get_name() == family) {
        for m in fam.get_metric() {
            let ok =
                labels.iter().all(|(k, v)| m.get_label().iter().any(|l| l.get_name() == *k && l.get_value() == *v));
            if ok {
                total += if hist_sum {
                    m.get_histogram().get_sample_sum()
                } else {
                    m.get_counter().get_value() + m.get_gauge().get_value()
                };
            }
        }
    }
    total
}

/// Every file path under `dir`, relative, with `/` separators.
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(dir) {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

/// Microseconds since the epoch of today's UTC midnight minus `days_ago` days.
pub fn day_start(days_ago: i64) -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    (now.div_euclid(86_400) - days_ago) * 86_400_000_000
}

/// `YYYY-MM-DD` of a UTC timestamp in microseconds.
pub fn ymd(micros: i64) -> String {
    let z = micros.div_euclid(86_400_000_000) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    format!("{:04}-{m:02}-{d:02}", yoe + era * 400 + i64::from(m <= 2))
}

/// A budgets.toml whose upstream is never contacted (port 1) plus `lake` as the `[lake]` section body.
pub fn budgets_toml(lake: &str) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nmode = \"sidecar\"\nservice = \"app\"\n\n\
         [upstreams.primary]\nurl = \"postgres://u:p@127.0.0.1:1/db\"\nceiling = 20\nreserved = 2\n\n\
         [services.app]\nslice = 5\n\n[lake]\n{lake}"
    )
}

/// The `[lake]` lines for `cfg` (file catalog or Postgres, local or S3 data).
pub fn lake_toml(cfg: &LakeConfig) -> String {
    let mut s = format!(
        "enabled = true\ndir = {:?}\ncatalog = {:?}\ndata_path = {:?}\nexpire_older_than = \"{}s\"\ncleanup_older_than = \"{}s\"\n",
        cfg.dir.display().to_string(),
        cfg.catalog,
        cfg.data_path,
        cfg.expire_older_than.as_secs(),
        cfg.cleanup_older_than.as_secs(),
    );
    if let Some(s3) = &cfg.s3 {
        s += &format!(
            "[lake.s3]\nkey_id = {:?}\nsecret = {:?}\nregion = {:?}\nendpoint = {:?}\nurl_style = {:?}\nuse_ssl = {}\n",
            s3.key_id, s3.secret, s3.region, s3.endpoint, s3.url_style, s3.use_ssl
        );
        if !s3.scope.is_empty() {
            s += &format!("scope = {:?}\n", s3.scope);
        }
    }
    s
}

/// Run the built `pgbudget` with `args`; (exit code, stdout, stderr).
pub fn pgbudget(args: &[&str]) -> (i32, String, String) {
    pgbudget_env(args, &[])
}

/// [`pgbudget`] with extra environment variables.
pub fn pgbudget_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgbudget"))
        .args(args)
        .env_remove("PGBUDGET_CONFIG")
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .output()
        .expect("pgbudget runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The Python modules the interoperability and S3 tests need must import; a missing one fails the test with
/// how to install it (never a silent skip).
pub fn require_python(modules: &str, install: &str) {
    let ok = std::process::Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(ok, "python3 cannot import {modules}: install them with `{install}` (scripts/test does this)");
}

/// Run a Python script with arguments; panics with its stderr when it fails. Returns stdout.
pub fn python(script: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("python3").arg("-c").arg(script).args(args).output().expect("python3 runs");
    assert!(
        out.status.success(),
        "python failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
