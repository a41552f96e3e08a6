//! `pgbudget lake timeline` options through the built binary: `--by hour --since 2d`, `--service`,
//! `--format json`, and `--days N` as before.

#[path = "common/lake.rs"]
mod lake_common;

use lake_common::{budgets_toml, file_config, lake_toml, pgbudget, ymd};
use pgbudget::lake::{tables, Lake, Registry, Row, Value};
use serde_json::Value as Json;

const HOUR: i64 = 3_600_000_000;

fn hour_start(hours_ago: i64) -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    (now.div_euclid(3600) - hours_ago) * HOUR
}

/// `YYYY-MM-DD HH:00` of a UTC timestamp in microseconds.
fn hour_label(micros: i64) -> String {
    format!("{} {:02}:00", ymd(micros), micros.div_euclid(HOUR).rem_euclid(24))
}

fn timeout(ts: i64, service: &str) -> Row {
    let mut r: Row = vec![Value::Ts(ts), service.into(), "rw".into(), "primary".into(), Value::Float(250.0)];
    r.extend([15, 15, 3].map(Value::Int));
    r
}

fn server_error(ts: i64, service: &str) -> Row {
    vec![Value::Ts(ts), service.into(), "rw".into(), "primary".into(), "connect".into(), "08006".into(), "x".into()]
}

fn violation(ts: i64, service: &str) -> Row {
    vec![Value::Ts(ts), service.into(), "ro".into(), "10.0.0.8".into(), "write".into(), "f00d".into()]
}

fn snapshot(ts: i64, service: &str, share: i64, in_use: i64, max_in_use: i64) -> Row {
    let mut r: Row = vec![Value::Ts(ts), service.into(), "rw".into(), "primary".into(), "transaction".into()];
    r.extend([share, 20, 2, in_use, 0, 0, 10, 100, 30, 97, 4, max_in_use, 0].map(Value::Int));
    r.extend([Value::Float(0.0), Value::Int(0)]);
    r.extend(["appdb".into(), "app".into()]);
    r
}

/// Rows in the API's current and previous hour, 30 hours ago and 3 days ago; billing only has a snapshot.
fn write_lake(dir: &std::path::Path) -> String {
    let cfg = file_config(dir);
    let config = dir.join("budgets.toml");
    std::fs::write(&config, budgets_toml(&lake_toml(&cfg))).unwrap();
    let lake = Lake::open(&cfg, Registry::builtin(), &prometheus::Registry::new()).unwrap();
    let w = lake.writer().unwrap();
    w.append(tables::CHECKOUT_TIMEOUTS, timeout(hour_start(0) + 1, "api"));
    w.append(tables::CHECKOUT_TIMEOUTS, timeout(hour_start(0) + 2, "api"));
    w.append(tables::SERVER_ERRORS, server_error(hour_start(1) + 5, "api"));
    w.append(tables::RO_VIOLATIONS, violation(hour_start(30) + 5, "api"));
    w.append(tables::CHECKOUT_TIMEOUTS, timeout(hour_start(72) + 5, "api"));
    w.append(tables::POOL_SNAPSHOTS, snapshot(hour_start(0) + 3, "billing", 10, 2, 8));
    assert_eq!(w.flush().unwrap().rows_written, 6);
    lake.shutdown();
    config.to_str().unwrap().to_owned()
}

fn run(args: &[&str], config: &str) -> String {
    let mut all = vec!["lake", "timeline"];
    all.extend(args);
    all.extend(["--config", config]);
    let (code, out, err) = pgbudget(&all);
    assert_eq!(code, 0, "{args:?}: {err}");
    out
}

/// The cells of the text row of `service` in `bucket`.
fn cells(out: &str, service: &str, bucket: &str) -> Vec<String> {
    let line = out.lines().find(|l| l.starts_with(service) && l.contains(bucket));
    let line = line.unwrap_or_else(|| panic!("no {service} {bucket} in\n{out}"));
    line.replace(bucket, "B").split_whitespace().map(str::to_owned).collect()
}

#[test]
fn timeline_by_hour_since_service_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_lake(dir.path());
    let now_hour = hour_start(0);

    let out = run(&["--by", "hour", "--since", "2d"], &config);
    if hour_start(0) != now_hour {
        eprintln!("SKIPPED: the UTC hour changed while the test ran");
        return;
    }
    print!("{out}");
    assert!(out.starts_with("lake timeline: last 48 UTC hour(s), 2 service(s)\n"), "{out}");
    assert!(out.lines().nth(1).unwrap().contains("hour (UTC)"), "{out}");
    let rows = |service: &str| out.lines().filter(|l| l.starts_with(&format!("{service} "))).count();
    assert_eq!((rows("api"), rows("billing")), (48, 48));
    assert_eq!(cells(&out, "api", &hour_label(hour_start(0))), ["api", "B", "2", "0", "0", "0", "-"]);
    assert_eq!(cells(&out, "api", &hour_label(hour_start(1))), ["api", "B", "0", "0", "0", "1", "-"]);
    assert_eq!(cells(&out, "api", &hour_label(hour_start(30))), ["api", "B", "0", "0", "1", "0", "-"]);
    assert_eq!(cells(&out, "billing", &hour_label(hour_start(0))), ["billing", "B", "0", "0", "0", "0", "80%"]);
    assert!(!out.contains(&hour_label(hour_start(48))), "the window is 48 hours: {out}");
    let last_api = out.lines().rfind(|l| l.starts_with("api ")).unwrap();
    assert!(last_api.contains(&hour_label(hour_start(0))), "current hour last: {out}");

    // One service only.
    let api = run(&["--by", "hour", "--since", "2d", "--service", "api"], &config);
    assert!(api.starts_with("lake timeline: last 48 UTC hour(s), 1 service(s)\n"), "{api}");
    assert_eq!(api.lines().filter(|l| l.starts_with("billing")).count(), 0, "{api}");
    assert_eq!(api.lines().filter(|l| l.starts_with("api ")).count(), 48, "{api}");
    let none = run(&["--service", "nobody"], &config);
    assert!(none.contains("no events in the window"), "{none}");

    // JSON for scripts: the same figures.
    let json: Json =
        serde_json::from_str(&run(&["--by", "hour", "--since", "2d", "--format", "json"], &config)).unwrap();
    assert_eq!(json["options"], serde_json::json!({ "by": "hour", "buckets": 48, "service": null }));
    assert_eq!(json["truncated"], false);
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 96);
    let current = hour_label(hour_start(0));
    let billing = rows.iter().find(|r| r["service"] == "billing" && r["bucket"] == current.as_str()).unwrap();
    assert_eq!(billing["peak_utilisation"], 0.8);
    let api_now = rows.iter().find(|r| r["service"] == "api" && r["bucket"] == current.as_str()).unwrap();
    assert_eq!((api_now["checkout_timeouts"].as_i64(), api_now["server_errors"].as_i64()), (Some(2), Some(0)));

    // Days, as before: `--days 3` and `--since 3d` are the same three days; 3 days ago is outside both.
    let days = run(&["--days", "3"], &config);
    assert!(days.starts_with("lake timeline: last 3 UTC day(s), 2 service(s)\n"), "{days}");
    assert_eq!(days, run(&["--since", "3d"], &config));
    assert_eq!(days, run(&["--since", "3d", "--by", "day"], &config));
    assert_eq!(days.lines().filter(|l| l.starts_with("api ")).count(), 3, "{days}");
    let today = ymd(hour_start(0));
    let api_today = cells(&days, "api", &today);
    let in_today = if ymd(hour_start(1)) == today { ["2", "0", "0", "1"] } else { ["2", "0", "0", "0"] };
    assert_eq!(api_today[2..6], in_today, "{days}");
    // The default is still 7 days.
    assert!(run(&[], &config).starts_with("lake timeline: last 7 UTC day(s), 2 service(s)\n"));

    // Conflicting or bad options are usage errors (exit 2) and say why.
    let (code, _, err) = pgbudget(&["lake", "timeline", "--days", "2", "--since", "1d", "--config", &config]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = pgbudget(&["lake", "timeline", "--since", "soon", "--config", &config]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--since"), "{err}");
    let (code, _, err) = pgbudget(&["lake", "timeline", "--by", "week", "--config", &config]);
    assert_eq!(code, 2, "{err}");
}
