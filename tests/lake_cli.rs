//! `pgbudget lake timeline|query|maintain` run as the built binary against a lake written by this test, and
//! maintenance against a Postgres catalog under the cross-process advisory lock.

mod common;
#[path = "common/lake.rs"]
mod lake_common;

use lake_common::{budgets_toml, day_start, file_config, files_under, lake_toml, pgbudget, pgbudget_env, ymd};
use pgbudget::lake::timeline::{format_timeline, Timeline, TimelineOptions, TimelineRow};
use pgbudget::lake::{maintain, tables, Lake, LakeConfig, Registry, Row, TableId, Value};
use std::time::{Duration, Instant};

const HOUR: i64 = 3_600_000_000;

fn snapshot(ts: i64, service: &str, share: i64, in_use: i64) -> Row {
    let mut r: Row = vec![Value::Ts(ts), service.into(), "rw".into(), "primary".into(), "transaction".into()];
    r.extend([share, 20, 2, in_use, 0, 0, 10, 100, 30, 97].map(Value::Int));
    r.push(Value::Int(4));
    // No high-water marks (as a row written before they existed): the peak is the sampled in_use.
    r.extend([Value::Null, Value::Null, Value::Null, Value::Null]);
    r.extend(["appdb".into(), "app".into()]);
    r
}

fn decision(ts: i64, service: &str, accepted: bool, reason: &str) -> Row {
    vec![
        Value::Ts(ts),
        service.into(),
        "rw".into(),
        "app".into(),
        "appdb".into(),
        "10.0.0.7".into(),
        accepted.into(),
        reason.into(),
        Value::Float(12.5),
    ]
}

fn timeout(ts: i64, service: &str, waited_ms: f64) -> Row {
    vec![
        Value::Ts(ts),
        service.into(),
        "rw".into(),
        "primary".into(),
        waited_ms.into(),
        Value::Int(15),
        Value::Int(15),
        Value::Int(3),
    ]
}

fn violation(ts: i64, service: &str) -> Row {
    vec![Value::Ts(ts), service.into(), "ro".into(), "10.0.0.8".into(), "write".into(), "f00d".into()]
}

fn server_error(ts: i64, service: &str, kind: &str) -> Row {
    vec![Value::Ts(ts), service.into(), "rw".into(), "primary".into(), kind.into(), "57P01".into(), "bye".into()]
}

/// Append `rows` and flush them as one batch; every row must land.
fn write(lake: &Lake, rows: Vec<(TableId, Row)>) {
    let w = lake.writer().unwrap();
    let n = rows.len() as u64;
    for (t, r) in rows {
        w.append(t, r);
    }
    assert_eq!(w.flush().unwrap().rows_written, n);
}

fn parquet_files(cfg: &LakeConfig) -> usize {
    files_under(&cfg.dir.join("data")).iter().filter(|f| f.ends_with(".parquet")).count()
}

/// Count and an order-independent hash of every row of every table written here, as JSON lines.
fn checksums(config: &str) -> String {
    let sql = ["pool_snapshots", "admission_decisions", "checkout_timeouts", "ro_violations", "server_errors"]
        .map(|t| format!("SELECT '{t}' AS t, count(*) AS n, sum(hash(x)) AS h FROM lake.{t} x"))
        .join(" UNION ALL ")
        + " ORDER BY t";
    let (code, out, err) = pgbudget(&["lake", "query", &sql, "--json", "--config", config]);
    assert_eq!(code, 0, "{err}");
    out
}

#[test]
fn timeline_query_and_maintain_through_the_cli() {
    let started = Instant::now();
    let today = ymd(day_start(0));
    let dir = tempfile::tempdir().unwrap();
    let cfg = LakeConfig {
        // Maintenance may expire and delete everything it replaced right away.
        expire_older_than: Duration::ZERO,
        cleanup_older_than: Duration::ZERO,
        ..file_config(dir.path())
    };
    let config = dir.path().join("budgets.toml");
    std::fs::write(&config, budgets_toml(&lake_toml(&cfg))).unwrap();
    let config = config.to_str().unwrap();
    let d = |days_ago: i64, hour: i64| day_start(days_ago) + hour * HOUR + 17;
    let (ct, ad, ps, ro, se) = (
        tables::CHECKOUT_TIMEOUTS,
        tables::ADMISSION_DECISIONS,
        tables::POOL_SNAPSHOTS,
        tables::RO_VIOLATIONS,
        tables::SERVER_ERRORS,
    );
    let inlined;
    {
        let lake = Lake::open(&cfg, Registry::builtin(), &prometheus::Registry::new()).unwrap();
        // Two small batches: at most 10 rows per table per insert, so DuckLake inlines them in the catalog.
        let mut a = vec![];
        a.extend((0..3).map(|i| (ct, timeout(d(0, i), "api", 250.0))));
        a.push((ct, timeout(d(6, 1), "billing", 300.0)));
        a.extend((0..5).map(|_| (ct, timeout(d(8, 1), "api", 1.0)))); // outside the 7-day window
        a.extend([(ps, snapshot(d(0, 1), "api", 15, 6)), (ps, snapshot(d(0, 2), "api", 15, 3))]);
        a.push((ps, snapshot(d(3, 1), "api", 15, 15)));
        a.extend([(ps, snapshot(d(1, 1), "billing", 10, 7)), (ps, snapshot(d(1, 2), "billing", 0, 3))]);
        a.push((ps, snapshot(d(0, 3), "idle", 5, 0)));
        a.extend((0..2).map(|_| (ad, decision(d(0, 1), "billing", false, "rejected_hard"))));
        a.push((ad, decision(d(0, 2), "billing", false, "rejected_queue_full")));
        a.push((ad, decision(d(1, 1), "billing", false, "timed_out")));
        a.push((ad, decision(d(1, 2), "billing", false, "budget")));
        a.push((ad, decision(d(3, 2), "api", false, "budget")));
        a.extend([(ro, violation(d(1, 5), "api")), (ro, violation(d(1, 6), "api"))]);
        a.push((ro, violation(d(5, 0), "billing")));
        a.push((se, server_error(d(0, 4), "api", "server_error")));
        a.extend((0..5).map(|_| (se, server_error(d(0, 4), "api", "query_error"))));
        a.push((se, server_error(d(6, 4), "billing", "connect")));
        // Not server errors: the proxy's own refusals and a RAISE that an older pgbudget filed as server errors.
        a.push((se, server_error(d(0, 4), "api", "budget")));
        a.push((
            se,
            vec![
                Value::Ts(d(0, 4)),
                "api".into(),
                "rw".into(),
                "primary".into(),
                "server_error".into(),
                "P0001".into(),
                "raised".into(),
            ],
        ));
        // Not 53300 rejections: refused logins for other reasons, admitted, queued, exempt, abandoned, too old.
        let b = vec![
            (ad, decision(d(0, 3), "billing", false, "auth")),
            (ad, decision(d(0, 3), "billing", false, "unknown_service")),
            (ad, decision(d(0, 3), "billing", true, "queued")),
            (ad, decision(d(0, 3), "billing", true, "exempt")),
            (ad, decision(d(0, 3), "api", false, "abandoned")),
            (ad, decision(d(9, 3), "billing", false, "rejected_hard")),
        ];
        inlined = a.len() + b.len();
        write(&lake, a);
        write(&lake, b);
        // Six larger batches (12 and 15 rows per table): one small Parquet file per table each.
        for batch in 0..6 {
            let mut rows: Vec<(TableId, Row)> =
                (0..12).map(|i| (ct, timeout(d(2, i), "api", 100.0 + i as f64))).collect();
            rows.extend((0..15).map(|i| (ps, snapshot(d(2, i), "api", 15, (batch * 15 + i) % 13))));
            write(&lake, rows);
        }
        lake.shutdown();
    }
    assert_eq!(parquet_files(&cfg), 12, "{:?}", files_under(&cfg.dir.join("data")));

    // The timeline, figure by figure.
    let zero = |service: &str, days_ago: i64| TimelineRow {
        service: service.into(),
        bucket: ymd(day_start(days_ago)),
        checkout_timeouts: 0,
        rejections: 0,
        ro_violations: 0,
        server_errors: 0,
        peak_utilisation: None,
    };
    let mut rows: Vec<TimelineRow> =
        ["api", "billing", "idle"].iter().flat_map(|s| (0..7).rev().map(move |k| zero(s, k))).collect();
    let at = |rows: &[TimelineRow], s: &str, k: i64| {
        let day = ymd(day_start(k));
        rows.iter().position(|r| r.service == s && r.bucket == day).unwrap()
    };
    // `budget` (a refused login beside its checkout's own row) and `timed_out` (a checkout_timeouts row) are not
    // counted again as rejections.
    let i = at(&rows, "api", 3);
    rows[i].peak_utilisation = Some(1.0);
    let i = at(&rows, "api", 2);
    (rows[i].checkout_timeouts, rows[i].peak_utilisation) = (72, Some(12.0 / 15.0));
    let i = at(&rows, "api", 1);
    rows[i].ro_violations = 2;
    let i = at(&rows, "api", 0);
    (rows[i].checkout_timeouts, rows[i].server_errors, rows[i].peak_utilisation) = (3, 1, Some(6.0 / 15.0));
    let i = at(&rows, "billing", 6);
    (rows[i].checkout_timeouts, rows[i].server_errors) = (1, 1);
    let i = at(&rows, "billing", 5);
    rows[i].ro_violations = 1;
    let i = at(&rows, "billing", 1);
    rows[i].peak_utilisation = Some(0.7);
    let i = at(&rows, "billing", 0);
    rows[i].rejections = 3;
    let i = at(&rows, "idle", 0);
    rows[i].peak_utilisation = Some(0.0);
    let expected = format_timeline(&Timeline { options: TimelineOptions::days(7), rows, truncated: false });
    let (code, timeline, err) = pgbudget(&["lake", "timeline", "--days", "7", "--config", config]);
    assert_eq!(code, 0, "{err}");
    if ymd(day_start(0)) != today {
        eprintln!("SKIPPED the figure checks: the UTC day changed while the test ran");
        return;
    }
    print!("{timeline}");
    assert_eq!(timeline, expected);
    assert!(timeline.contains(&format!("api      {}                 72", ymd(day_start(2)))), "{timeline}");
    assert!(timeline.contains(&format!("billing  {}                  0                 3", today)), "{timeline}");
    // Days are UTC days whatever the local time zone (here UTC+14, a different date most of the day).
    let (code, far_east, err) =
        pgbudget_env(&["lake", "timeline", "--days", "7", "--config", config], &[("TZ", "Pacific/Kiritimati")]);
    assert_eq!((code, far_east.as_str()), (0, expected.as_str()), "{err}");
    let (code, one_day, _) = pgbudget(&["lake", "timeline", "--days", "1", "--config", config]);
    assert_eq!(code, 0);
    assert_eq!(one_day.lines().filter(|l| l.contains(&today)).count(), 3, "{one_day}");

    // Ad-hoc queries: qualified and bare names, table and JSON output, errors.
    let count = |sql: &str| {
        let (code, out, err) = pgbudget(&["lake", "query", sql, "--config", config]);
        assert_eq!(code, 0, "{err}");
        out
    };
    assert_eq!(count("select count(*) as n from lake.pool_snapshots"), " n\n--\n96\n(1 row)\n");
    assert_eq!(count("select count(*) as n from pool_snapshots"), " n\n--\n96\n(1 row)\n");
    let (code, out, _) = pgbudget(&[
        "lake",
        "query",
        "select service, count(*) as n from lake.checkout_timeouts group by 1 order by 1",
        "--json",
        "--config",
        config,
    ]);
    assert_eq!((code, out.as_str()), (0, "{\"service\":\"api\",\"n\":80}\n{\"service\":\"billing\",\"n\":1}\n"));
    let (code, _, err) = pgbudget(&["lake", "query", "select * from lake.no_such_table", "--config", config]);
    assert_eq!(code, 1);
    assert!(err.contains("no_such_table"), "{err}");
    let (code, _, err) = pgbudget(&["lake", "query", "delete from lake.pool_snapshots", "--config", config]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(count("select count(*) as n from lake.pool_snapshots"), " n\n--\n96\n(1 row)\n");

    // Maintenance: inlined rows into Parquet, small files merged, replaced files deleted; same data after.
    let before = checksums(config);
    let files_before = parquet_files(&cfg);
    let t = Instant::now();
    let (code, report, err) = pgbudget(&["lake", "maintain", "--config", config]);
    let maintain_took = t.elapsed();
    assert_eq!(code, 0, "{err}");
    print!("{report}");
    let files_after = parquet_files(&cfg);
    eprintln!(
        "maintenance: {files_before} Parquet files before, {files_after} after, {maintain_took:?} for the CLI run"
    );
    let figure = |label: &str| -> u64 {
        let at = report.find(label).unwrap_or_else(|| panic!("{label} in {report}"));
        report[..at].split_whitespace().last().unwrap().trim_end_matches(',').parse().unwrap()
    };
    assert_eq!(figure(" inlined rows flushed"), inlined as u64, "{report}");
    assert!(figure(" files merged into") >= 12, "{report}");
    assert!(figure(" snapshots expired") >= 9, "{report}");
    assert!(figure(" files cleaned up") >= 12, "{report}");
    assert!(files_after < files_before, "{files_before} -> {files_after}");
    assert_eq!(checksums(config), before);
    let (_, again, _) = pgbudget(&["lake", "timeline", "--days", "7", "--config", config]);
    assert_eq!(again, timeline);
    // Nothing left to do the second time.
    let (code, report, _) = pgbudget(&["lake", "maintain", "--config", config]);
    assert_eq!(code, 0);
    assert!(report.contains(" 0 inlined rows flushed, 0 files merged into 0,"), "{report}");
    assert_eq!(parquet_files(&cfg), files_after);
    eprintln!("lake CLI test took {:?}", started.elapsed());
}

#[test]
fn lake_commands_refuse_bad_configs_without_touching_the_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("budgets.toml");
    let config = path.to_str().unwrap();
    // Disabled lake.
    std::fs::write(&path, budgets_toml("enabled = false\n")).unwrap();
    let (code, _, err) = pgbudget(&["lake", "timeline", "--config", config]);
    assert_eq!(code, 2);
    assert!(err.contains("enabled = false"), "{err}");
    // A lake that was never written: read-only attach refuses to create it.
    let cfg = file_config(dir.path());
    std::fs::write(&path, budgets_toml(&lake_toml(&cfg))).unwrap();
    let (code, _, err) = pgbudget(&["lake", "query", "select 1", "--config", config]);
    assert_eq!(code, 1);
    assert!(err.contains("does not exist"), "{err}");
    // Bad [lake] values are named.
    std::fs::write(&path, budgets_toml("enabled = true\nflush_rows = 0\nmaintenance_interval = \"5s\"\n")).unwrap();
    let (code, _, err) = pgbudget(&["lake", "maintain", "--config", config]);
    assert_eq!(code, 2);
    assert!(err.contains("flush_rows") && err.contains("maintenance_interval"), "{err}");
    let (code, _, _) = pgbudget(&["lake", "timeline", "--days", "0", "--config", config]);
    assert_eq!(code, 2);
}

/// Postgres backends with this application_name.
fn backends(pg: &common::Pg, app: &str) -> i64 {
    let out = common::psql(
        &pg.conninfo(),
        &["-c", &format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}'")],
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_takes_turns_across_processes_on_a_postgres_catalog() {
    let pg = common::Pg::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = LakeConfig { catalog: format!("postgres:{}", pg.conninfo()), ..file_config(dir.path()) };
    let lake = std::sync::Arc::new(Lake::open(&cfg, Registry::builtin(), &prometheus::Registry::new()).unwrap());
    // 7 rows: inlined into the Postgres catalog.
    write(&lake, (0..7).map(|i| (tables::CHECKOUT_TIMEOUTS, timeout(day_start(0) + i, "api", 5.0))).collect());

    // Another "process" holds the lock: maintenance is skipped, nothing changes.
    let other = common::connect(&pg.conninfo()).await.unwrap();
    let key = pgbudget::lake::maintain::lock_key("");
    other.execute("SELECT pg_advisory_lock($1)", &[&key]).await.unwrap();
    let l = lake.clone();
    let rep = tokio::task::spawn_blocking(move || maintain(&l)).await.unwrap().unwrap();
    assert_eq!(rep.skipped.as_deref(), Some("another process holds the lake maintenance lock"), "{rep}");
    assert_eq!(rep.rows_flushed, 0);
    assert_eq!(backends(&pg, "pgbudget:lake-maintenance"), 0, "the lock connection is closed after a skip");
    // The CLI (a real second process) skips too.
    let path = dir.path().join("budgets.toml");
    std::fs::write(&path, budgets_toml(&lake_toml(&cfg))).unwrap();
    let (code, out, err) = pgbudget(&["lake", "maintain", "--config", path.to_str().unwrap()]);
    assert_eq!(
        (code, out.trim()),
        (0, "lake maintenance: skipped: another process holds the lake maintenance lock"),
        "{err}"
    );

    // Released: this process maintains, holding the lock meanwhile, and closes the lock connection after.
    other.execute("SELECT pg_advisory_unlock($1)", &[&key]).await.unwrap();
    let l = lake.clone();
    let t = Instant::now();
    let rep = tokio::task::spawn_blocking(move || maintain(&l)).await.unwrap().unwrap();
    eprintln!("maintenance on the Postgres catalog: {rep} (wall {:?})", t.elapsed());
    assert_eq!((rep.skipped.clone(), rep.rows_flushed), (None, 7), "{rep}");
    assert_eq!(backends(&pg, "pgbudget:lake-maintenance"), 0);
    assert!(backends(&pg, "pgbudget:lake") <= 2);
    let r =
        lake.reader().query("SELECT count(*) AS n, sum(waited_ms) AS w FROM lake.checkout_timeouts", &[], 1).unwrap();
    assert_eq!(serde_json::Value::Object(r.rows[0].clone()), serde_json::json!({"n": 7, "w": 35.0}));
    // A second process runs fine once the lock is free.
    let (code, out, err) = pgbudget(&["lake", "maintain", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("inlined rows flushed"), "{out}");
    lake.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduled_job_maintains_and_stops_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = file_config(dir.path());
    let lake = std::sync::Arc::new(Lake::open(&cfg, Registry::builtin(), &prometheus::Registry::new()).unwrap());
    // 5 rows: inlined, no Parquet file until maintenance flushes them.
    write(&lake, (0..5).map(|i| (tables::RO_VIOLATIONS, violation(day_start(0) + i, "api"))).collect());
    assert_eq!(parquet_files(&cfg), 0);
    let (shutdown, tasks) = (tokio_util::sync::CancellationToken::new(), tokio_util::task::TaskTracker::new());
    let started = Instant::now();
    pgbudget::lake::spawn_maintenance(lake.clone(), Duration::from_millis(300), shutdown.clone(), &tasks);
    while parquet_files(&cfg) == 0 {
        assert!(started.elapsed() < Duration::from_secs(20), "the scheduled maintenance never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("first scheduled maintenance after {:?}", started.elapsed());
    // A few more rounds, then shutdown ends the task promptly.
    tokio::time::sleep(Duration::from_millis(700)).await;
    shutdown.cancel();
    tasks.close();
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), tasks.wait()).await.expect("the maintenance task ends at shutdown");
    eprintln!("maintenance task stopped {:?} after shutdown", t.elapsed());
    let r = lake.reader().query("SELECT count(*) AS n FROM lake.ro_violations", &[], 1).unwrap();
    assert_eq!(r.rows[0]["n"], 5);
    // Interval 0: nothing is spawned.
    let tasks = tokio_util::task::TaskTracker::new();
    pgbudget::lake::spawn_maintenance(lake.clone(), Duration::ZERO, shutdown.clone(), &tasks);
    assert!(tasks.is_empty());
    lake.shutdown();
}
