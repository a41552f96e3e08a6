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

/// A pool_snapshots row (16 columns) whose figures derive from `i`.
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
