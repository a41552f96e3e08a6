//! The DuckLake telemetry warehouse against real catalogs: an embedded DuckDB file in a temp dir and a real
//! Postgres 15 (started by the harness), with the prebuilt libduckdb.so and the wheel extensions.

mod common;
#[path = "common/lake.rs"]
mod lake_common;

use common::Pg;
use lake_common::{file_config, files_under, metric, month_start, pool_row};
use pgbudget::lake::{tables, ColumnType, Lake, LakeConfig, LakeError, Registry, TableSpec, Value};
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn count(lake: &Lake, table: &str) -> i64 {
    let r = lake.reader().query(&format!("SELECT count(*) AS n FROM lake.main.{table}"), &[], 1).unwrap();
    r.rows[0]["n"].as_i64().unwrap()
}

#[test]
fn file_catalog_round_trip_with_year_month_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = file_config(dir.path());
    let reg = prometheus::Registry::new();
    let lake = Lake::open(&cfg, Registry::builtin(), &reg).unwrap();
    assert!(lake.is_attached());
    let w = lake.writer().unwrap();
    // 250 rows over two months of two years; 100-row batches flush by themselves, the rest on request.
    let jan26 = month_start(2026, 1, 0);
    let feb27 = month_start(2027, 2, 3600);
    let row = |i: i64| pool_row(i, if i % 2 == 0 { jan26 + i } else { feb27 + i });
    for i in 0..150 {
        w.append(tables::POOL_SNAPSHOTS, row(i));
    }
    // The size trigger (flush_rows = 100) writes without being asked; the timer is an hour away.
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&reg, "pgbudget_lake_rows_written_total", &[]) < 100.0 {
        assert!(Instant::now() < deadline, "no flush by size");
        std::thread::sleep(Duration::from_millis(20));
    }
    for i in 150..250 {
        w.append(tables::POOL_SNAPSHOTS, row(i));
    }
    w.append(tables::POOL_SNAPSHOTS, vec![Value::now()]); // wrong arity: dropped, counted
    w.flush().unwrap();
    assert_eq!(count(&lake, "pool_snapshots"), 250);
    let r = lake
        .reader()
        .query(
            "SELECT ts, service, size, queries, clients FROM lake.main.pool_snapshots WHERE checkout_timeouts = ?",
            &[Value::Int(201)],
            10,
        )
        .unwrap();
    assert_eq!(r.columns, ["ts", "service", "size", "queries", "clients"]);
    assert_eq!(
        serde_json::Value::Object(r.rows[0].clone()),
        json!({"ts": "2027-02-01T01:00:00.000201Z", "service": "svc0", "size": 201, "queries": 20100, "clients": null})
    );
    let agg = lake
        .reader()
        .query(
            "SELECT sum(queries) AS q, count(DISTINCT service) AS s, min(ts) AS first FROM lake.main.pool_snapshots \
             WHERE ts >= ?",
            &[Value::Ts(jan26)],
            1,
        )
        .unwrap();
    assert_eq!(agg.rows[0]["q"], json!((0..250).map(|i| i * 100).sum::<i64>()));
    assert_eq!(agg.rows[0]["s"], json!(3));
    assert_eq!(agg.rows[0]["first"], json!("2026-01-01T00:00:00.000000Z"));
    // Order survives the limit wrapper.
    let top = lake
        .reader()
        .query("SELECT checkout_timeouts AS c FROM lake.main.pool_snapshots ORDER BY c DESC", &[], 3)
        .unwrap();
    assert_eq!(top.rows.iter().map(|r| r["c"].as_i64().unwrap()).collect::<Vec<_>>(), [249, 248, 247]);
    // Row limit.
    let some = lake.reader().query("SELECT * FROM lake.main.pool_snapshots", &[], 7).unwrap();
    assert_eq!((some.rows.len(), some.truncated), (7, true));
    // Hive layout by (year, month): both partitions exist, and no month directory without a year above it.
    let files = files_under(&cfg.dir.join("data"));
    let parquet: Vec<_> = files.iter().filter(|f| f.ends_with(".parquet")).collect();
    assert!(parquet.iter().any(|f| f.contains("pool_snapshots/year=2026/month=1/")), "{files:?}");
    assert!(parquet.iter().any(|f| f.contains("pool_snapshots/year=2027/month=2/")), "{files:?}");
    assert!(parquet.iter().all(|f| f.contains("/year=")), "{files:?}");
    assert_eq!(metric(&reg, "pgbudget_lake_rows_written_total", &[("table", "pool_snapshots")]), 250.0);
    assert_eq!(metric(&reg, "pgbudget_lake_rows_dropped_total", &[("reason", "invalid_row")]), 1.0);
    assert!(metric(&reg, "pgbudget_lake_flushes_total", &[]) >= 2.0, "by size, then on request");
    // Shutdown flushes what is buffered; appends after it are dropped and counted.
    w.append(tables::CONFIG_RELOADS, vec![Value::now(), "ok".into(), Value::Null, Value::Int(0), Value::Null]);
    lake.shutdown();
    w.append(tables::CONFIG_RELOADS, vec![Value::now(), "late".into(), Value::Null, Value::Int(0), Value::Null]);
    assert_eq!(count(&lake, "config_reloads"), 1);
    assert_eq!(metric(&reg, "pgbudget_lake_rows_dropped_total", &[("reason", "shutdown")]), 1.0);
}

fn evo(cols: &[(&'static str, ColumnType)]) -> Registry {
    Registry::new(vec![TableSpec::new("evo", cols)]).unwrap()
}

#[test]
fn add_column_round_trip_and_refused_changes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = file_config(dir.path());
    let v1 = evo(&[("a", ColumnType::BigInt)]);
    {
        let lake = Lake::open(&cfg, v1.clone(), &prometheus::Registry::new()).unwrap();
        let w = lake.writer().unwrap();
        for i in 0..20 {
            w.append(lake.registry().id("evo").unwrap(), vec![Value::now(), Value::Int(i)]);
        }
        w.flush().unwrap();
        lake.shutdown();
    }
    let v2 = evo(&[("a", ColumnType::BigInt), ("b", ColumnType::Varchar)]);
    let lake = Lake::open(&cfg, v2.clone(), &prometheus::Registry::new()).unwrap();
    let w = lake.writer().unwrap();
    for i in 0..5 {
        w.append(w.table("evo").unwrap(), vec![Value::now(), Value::Int(100 + i), "new".into()]);
    }
    w.flush().unwrap();
    let r = lake
        .reader()
        .query(
            "SELECT count(*) AS n, count(b) AS nb, count(*) FILTER (a < 100 AND b IS NULL) AS old FROM lake.main.evo",
            &[],
            1,
        )
        .unwrap();
    assert_eq!(serde_json::Value::Object(r.rows[0].clone()), json!({"n": 25, "nb": 5, "old": 20}));
    let cols = lake
        .reader()
        .query("SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = 'evo'", &[], 10)
        .unwrap();
    assert_eq!(cols.rows.len(), 3);
    lake.shutdown();
    drop(lake);
    // Retyping and removing are refused, naming the column.
    let retyped = evo(&[("a", ColumnType::Varchar), ("b", ColumnType::Varchar)]);
    match Lake::open(&cfg, retyped, &prometheus::Registry::new()) {
        Err(e @ LakeError::Schema { .. }) => {
            assert!(e.to_string().contains("column a is BIGINT in the lake but VARCHAR"), "{e}")
        }
        Err(e) => panic!("expected a schema error, got {e}"),
        Ok(_) => panic!("a retyped column was accepted"),
    }
    match Lake::open(&cfg, v1, &prometheus::Registry::new()) {
        Err(e @ LakeError::Schema { .. }) => {
            assert!(e.to_string().contains("column b (VARCHAR) exists in the lake"), "{e}")
        }
        Err(e) => panic!("expected a schema error, got {e}"),
        Ok(_) => panic!("a removed column was accepted"),
    }
    // The refused opens changed nothing.
    let lake = Lake::open(&cfg, v2, &prometheus::Registry::new()).unwrap();
    assert_eq!(count(&lake, "evo"), 25);
}

#[test]
fn read_only_lake_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = file_config(dir.path());
    {
        let lake = Lake::open(&cfg, Registry::builtin(), &prometheus::Registry::new()).unwrap();
        lake.writer().unwrap().append(tables::POOL_SNAPSHOTS, pool_row(1, month_start(2026, 3, 0)));
        lake.shutdown();
    }
    let ro = LakeConfig { read_only: true, ..cfg };
    let lake = Lake::open(&ro, Registry::builtin(), &prometheus::Registry::new()).unwrap();
    assert!(lake.writer().is_none());
    assert_eq!(count(&lake, "pool_snapshots"), 1);
    for sql in [
        "INSERT INTO lake.main.pool_snapshots (ts) VALUES (now()::TIMESTAMP)",
        "CREATE TABLE lake.main.x (ts TIMESTAMP)",
        "ALTER TABLE lake.main.pool_snapshots ADD COLUMN y INTEGER",
    ] {
        let e = lake.reader().with_conn(|c| Ok(c.execute_batch(sql)?)).unwrap_err().to_string();
        assert!(e.contains("read-only") || e.contains("read only"), "{sql}: {e}");
    }
    // The reader's own API takes only a query.
    assert!(lake.reader().query("DELETE FROM lake.main.pool_snapshots", &[], 1).is_err());
    assert_eq!(count(&lake, "pool_snapshots"), 1);
}

/// Catalog connections the lake holds right now, as Postgres sees them.
fn lake_backends(pg: &Pg) -> i64 {
    let out = common::psql(
        &pg.conninfo(),
        &["-c", "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgbudget:lake'"],
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(-1)
}

#[test]
fn postgres_catalog_caps_connections_and_survives_a_restart() {
    let mut pg = Pg::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = LakeConfig {
        catalog: format!("postgres:{}", pg.conninfo()),
        buffer_rows: 500,
        retry_interval: Duration::from_secs(2),
        ..file_config(dir.path())
    };
    let reg = prometheus::Registry::new();
    let lake = Arc::new(Lake::open(&cfg, Registry::builtin(), &reg).unwrap());
    assert!(lake.is_attached());

    // Writer and reader busy at the same time while a monitor samples pg_stat_activity.
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicI64::new(0));
    let samples = Arc::new(AtomicI64::new(0));
    let monitor = {
        let (stop, peak, samples, conninfo) = (stop.clone(), peak.clone(), samples.clone(), pg.conninfo());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let out = common::psql(
                    &conninfo,
                    &["-c", "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgbudget:lake'"],
                );
                let n: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
                peak.fetch_max(n, Ordering::Relaxed);
                samples.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let reader = {
        let (lake, stop) = (lake.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut queries = 0;
            while !stop.load(Ordering::Relaxed) {
                lake.reader().query("SELECT count(*) AS n FROM lake.main.pool_snapshots", &[], 1).unwrap();
                queries += 1;
            }
            queries
        })
    };
    let w = lake.writer().unwrap();
    let t0 = month_start(2026, 5, 0);
    // 100-row flushes until the monitor has looked often enough (at least 600 rows).
    let started = Instant::now();
    let mut written = 0;
    while written < 600 || (samples.load(Ordering::Relaxed) < 20 && started.elapsed() < Duration::from_secs(60)) {
        for _ in 0..100 {
            w.append(tables::POOL_SNAPSHOTS, pool_row(written, t0 + written));
            written += 1;
        }
        w.flush().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let queries = reader.join().unwrap();
    monitor.join().unwrap();
    let (peak, samples) = (peak.load(Ordering::Relaxed), samples.load(Ordering::Relaxed));
    let flush_ms = 1000.0 * metric(&reg, "pgbudget_lake_flush_seconds_sum", &[])
        / metric(&reg, "pgbudget_lake_flushes_total", &[]);
    eprintln!(
        "pg catalog: peak {peak} lake connections over {samples} samples, {written} rows, {queries} reader queries, \
         {flush_ms:.1} ms per 100-row flush"
    );
    assert!(samples >= 20, "the monitor sampled only {samples} times");
    assert!((1..=2).contains(&peak), "lake catalog connections peaked at {peak} (cap 2)");
    assert_eq!(count(&lake, "pool_snapshots"), written);

    // Catalog down: appends still return at once; rows are kept up to the bound, the rest dropped and counted.
    pg.stop();
    let mut slowest = Duration::ZERO;
    for i in 0..2000 {
        let at = Instant::now();
        w.append(tables::POOL_SNAPSHOTS, pool_row(10_000 + i, t0 + 10_000 + i));
        slowest = slowest.max(at.elapsed());
    }
    let err = w.flush().unwrap_err();
    eprintln!("flush while the catalog is down: kind={} {err}", err.kind());
    assert!(slowest < Duration::from_millis(50), "an append took {slowest:?}");
    let dropped = metric(&reg, "pgbudget_lake_rows_dropped_total", &[("table", "pool_snapshots")]);
    let buffered = metric(&reg, "pgbudget_lake_buffered_rows", &[]);
    assert!(dropped >= 1500.0, "dropped {dropped}");
    assert!(buffered > 0.0 && buffered <= 500.0, "buffered {buffered}");
    assert!(metric(&reg, "pgbudget_lake_flush_errors_total", &[]) >= 1.0);

    let at = Instant::now();
    assert!(lake.reader().query("SELECT count(*) FROM lake.main.pool_snapshots", &[], 1).is_err());
    assert!(at.elapsed() < Duration::from_secs(10), "a reader query on a dead catalog took {:?}", at.elapsed());

    // Catalog back: the reader works again, and the same writer's next (timed) retry lands the retained rows.
    pg.restart();
    let seen = count(&lake, "pool_snapshots");
    assert!(seen == written || seen == written + buffered as i64, "{seen}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&reg, "pgbudget_lake_buffered_rows", &[]) > 0.0 {
        assert!(Instant::now() < deadline, "the retained rows were not retried");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(count(&lake, "pool_snapshots"), written + buffered as i64);
    assert_eq!(w.flush().unwrap().rows_written, 0);
    assert!(lake_backends(&pg) <= 2);
    lake.shutdown();
}

#[test]
fn reattach_is_exclusive_with_running_flushes() {
    // A DETACH under a running statement fails it (and, on a file catalog, the re-ATTACH too): re-attaching
    // waits for every connection using the lake.
    let dir = tempfile::tempdir().unwrap();
    let lake =
        Arc::new(Lake::open(&file_config(dir.path()), Registry::builtin(), &prometheus::Registry::new()).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (lake, stop) = (lake.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut flushes, mut rows) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..20 {
                    lake.writer()
                        .unwrap()
                        .append(tables::POOL_SNAPSHOTS, pool_row(rows, month_start(2026, 1, 0) + rows));
                    rows += 1;
                }
                lake.writer().unwrap().flush().unwrap();
                flushes += 1;
            }
            (flushes, rows)
        })
    };
    for _ in 0..20 {
        lake.reader().reattach().unwrap();
        assert!(lake.is_attached());
    }
    stop.store(true, Ordering::Relaxed);
    let (flushes, rows) = writer.join().unwrap();
    assert!(flushes > 0);
    assert_eq!(count(&lake, "pool_snapshots"), rows);
}
