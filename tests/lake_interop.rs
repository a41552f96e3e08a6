//! What pgbudget writes is what an independent DuckDB reads: the Python `duckdb==1.5.5` package, with the same
//! ducklake/postgres_scanner extension files, attaches the lake READ_ONLY and aggregates every column kind
//! (timestamps, integers, doubles, booleans, text with quotes and non-ASCII, NULLs) over inlined and Parquet
//! rows. The expected figures are computed here from the generated rows, not read back through pgbudget.
//! File catalog and Postgres catalog. Python comes from `scripts/lake-deps --python` (scripts/test runs it).

mod common;
#[path = "common/lake.rs"]
mod lake_common;

use lake_common::{file_config, month_start, python, require_python};
use md5::{Digest, Md5};
use pgbudget::lake::reader::iso_micros;
use pgbudget::lake::{tables, Lake, LakeConfig, Registry, Row, TableId, Value};
use serde_json::{json, Value as Json};
use std::collections::BTreeMap;
use std::time::Instant;

const READER: &str = r#"
import duckdb, json, sys
ext, target, data_path = sys.argv[1:4]
q = lambda s: "'" + s.replace("'", "''") + "'"
con = duckdb.connect()
con.execute(f"SET extension_directory = {q(ext)}")
con.execute("SET autoinstall_known_extensions = false")
con.execute("SET autoload_known_extensions = true")
con.execute("LOAD ducklake")
if target.startswith("postgres:"):
    con.execute("LOAD postgres_scanner")
con.execute(f"ATTACH {q('ducklake:' + target)} AS lake (DATA_PATH {q(data_path)}, READ_ONLY)")
out = {"duckdb": duckdb.__version__}
out["ducklake"] = con.execute(
    "SELECT extension_version FROM duckdb_extensions() WHERE extension_name = 'ducklake'").fetchone()[0]
out["columns"] = con.execute(
    "SELECT table_name, column_name, data_type FROM duckdb_columns() WHERE database_name = 'lake' "
    "ORDER BY table_name, column_index").fetchall()
iso = lambda c: f"strftime({c}, '%Y-%m-%dT%H:%M:%S.%fZ')"
queries = {
    "pool_snapshots": f"""SELECT count(*), sum(in_use), sum(queries), count(clients), count(DISTINCT service),
        {iso('min(ts)')}, {iso('max(ts)')}, sum(epoch_us(ts)), md5(string_agg(service || ':' || size, ',' ORDER BY ts))
        FROM lake.pool_snapshots""",
    "pool_months": "SELECT strftime(ts, '%Y-%m'), count(*) FROM lake.pool_snapshots GROUP BY 1 ORDER BY 1",
    "server_errors": f"""SELECT count(*), sum(length(message)), md5(string_agg(message, '|' ORDER BY ts)),
        count(*) FILTER (kind = 'server_error'), {iso('max(ts)')} FROM lake.server_errors""",
    "admission_decisions": f"""SELECT count(*), count(*) FILTER (accepted), sum(wait_ms),
        md5(string_agg(reason, ',' ORDER BY ts)), {iso('min(ts)')} FROM lake.admission_decisions""",
    "client_sessions": f"""SELECT count(*), sum(bytes_in), sum(epoch_us(started_at)), count(application_name),
        sum(duration_ms), {iso('max(started_at)')} FROM lake.client_sessions""",
}
for name, sql in queries.items():
    out[name] = [[v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for v in r]
                 for r in con.execute(sql).fetchall()]
print(json.dumps(out))
"#;

fn md5_hex(s: &str) -> String {
    Md5::digest(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The rows pgbudget writes, in flush batches (some of at most 10 rows per table: inlined in the catalog).
fn batches() -> Vec<Vec<(TableId, Row)>> {
    let base = month_start(2025, 12, 0); // December 2025 to February 2026: three partitions over a year boundary
    let mut out = Vec::new();
    // pool_snapshots: 300 rows every 6 hours, in Parquet batches of 60.
    for b in 0..5 {
        out.push(
            (b * 60..(b + 1) * 60)
                .map(|i: i64| {
                    let mut r: Row = vec![
                        Value::Ts(base + i * 6 * 3_600_000_000 + i),
                        format!("svc{}", i % 4).into(),
                        "rw".into(),
                        "primary".into(),
                        "transaction".into(),
                    ];
                    r.extend([15, i % 40, 3, i % 16, i % 5, i, i * 10, i * i].map(Value::Int));
                    r.extend([Value::Int(30), Value::Int(97), if i % 5 == 0 { Value::Null } else { Value::Int(i) }]);
                    // High-water marks, database and role.
                    r.extend([Value::Int(i % 16), Value::Int(i % 5), Value::Float(1.5), Value::Int(i % 3)]);
                    r.extend(["appdb".into(), "app".into()]);
                    (tables::POOL_SNAPSHOTS, r)
                })
                .collect(),
        );
    }
    // server_errors: 40 rows in inlined batches of 8, text with quotes, a backslash and non-ASCII.
    for b in 0..5 {
        out.push(
            (b * 8..(b + 1) * 8)
                .map(|i: i64| {
                    let kind = if i % 3 == 0 { "server_error" } else { "connect_error" };
                    let msg = format!("it's \"down\" \\ ünïcødé ✓ #{i}");
                    let r: Row = vec![
                        Value::Ts(base + 86_400_000_000 + i * 1_000_003),
                        format!("svc{}", i % 2).into(),
                        "rw".into(),
                        "primary".into(),
                        kind.into(),
                        "57P01".into(),
                        msg.into(),
                    ];
                    (tables::SERVER_ERRORS, r)
                })
                .collect(),
        );
    }
    // admission_decisions: 120 rows, one Parquet batch of 100 and two inlined batches of 10.
    let decision = |i: i64| -> (TableId, Row) {
        let reasons = ["admitted", "queued", "rejected_hard", "timed_out", "budget"];
        let r: Row = vec![
            Value::Ts(base + 2 * 86_400_000_000 + i * 250_000),
            "api".into(),
            "rw".into(),
            "app".into(),
            "appdb".into(),
            format!("10.0.0.{}", i % 250).into(),
            (i % 3 != 0).into(),
            reasons[(i % 5) as usize].into(),
            Value::Float(i as f64 * 0.25),
        ];
        (tables::ADMISSION_DECISIONS, r)
    };
    out.push((0..100).map(decision).collect());
    out.push((100..110).map(decision).collect());
    out.push((110..120).map(decision).collect());
    // client_sessions: 50 rows with a second timestamp column, big counters and NULLs.
    out.push(
        (0..50)
            .map(|i: i64| {
                let end = base + 40 * 86_400_000_000 + i * 60_000_000;
                let r: Row = vec![
                    Value::Ts(end),
                    Value::Int(1000 + i),
                    "api".into(),
                    "app".into(),
                    "appdb".into(),
                    if i % 4 == 0 { Value::Null } else { format!("worker-{i}").into() },
                    "10.0.0.9".into(),
                    Value::Ts(end - i * 1_500_000),
                    Value::Float(i as f64 * 1500.0),
                    Value::Int(i),
                    Value::Int(i * 3),
                    Value::Int((1 << 40) + i),
                    Value::Int(i * 100),
                    "client_done".into(),
                ];
                (tables::CLIENT_SESSIONS, r)
            })
            .collect(),
    );
    out
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) | Value::Ts(i) => *i,
        other => panic!("not an integer: {other:?}"),
    }
}

fn text(v: &Value) -> &str {
    match v {
        Value::Text(s) => s,
        other => panic!("not text: {other:?}"),
    }
}

/// The figures the Python script must report, from the generated rows.
fn expected(rows: &[(TableId, Row)]) -> Json {
    let of = |t: TableId| {
        let mut v: Vec<&Row> = rows.iter().filter(|(id, _)| *id == t).map(|(_, r)| r).collect();
        v.sort_by_key(|r| int(&r[0]));
        v
    };
    let ps = of(tables::POOL_SNAPSHOTS);
    let ts: Vec<i64> = ps.iter().map(|r| int(&r[0])).collect();
    let mut months = BTreeMap::new();
    for &t in &ts {
        *months.entry(iso_micros(t)[..7].to_owned()).or_insert(0) += 1;
    }
    let services: std::collections::BTreeSet<&str> = ps.iter().map(|r| text(&r[1])).collect();
    let se = of(tables::SERVER_ERRORS);
    let ad = of(tables::ADMISSION_DECISIONS);
    let cs = of(tables::CLIENT_SESSIONS);
    json!({
        "pool_snapshots": [[
            ps.len(),
            ps.iter().map(|r| int(&r[8])).sum::<i64>(),
            ps.iter().map(|r| int(&r[12])).sum::<i64>(),
            ps.iter().filter(|r| r[15] != Value::Null).count(),
            services.len(),
            iso_micros(ts[0]),
            iso_micros(*ts.last().unwrap()),
            ts.iter().sum::<i64>(),
            md5_hex(&ps.iter().map(|r| format!("{}:{}", text(&r[1]), int(&r[6]))).collect::<Vec<_>>().join(",")),
        ]],
        "pool_months": months.into_iter().map(|(m, n)| json!([m, n])).collect::<Vec<_>>(),
        "server_errors": [[
            se.len(),
            se.iter().map(|r| text(&r[6]).chars().count()).sum::<usize>(),
            md5_hex(&se.iter().map(|r| text(&r[6])).collect::<Vec<_>>().join("|")),
            se.iter().filter(|r| text(&r[4]) == "server_error").count(),
            iso_micros(int(&se.last().unwrap()[0])),
        ]],
        "admission_decisions": [[
            ad.len(),
            ad.iter().filter(|r| r[6] == Value::Bool(true)).count(),
            ad.iter().map(|r| match r[8] { Value::Float(f) => f, _ => 0.0 }).sum::<f64>(),
            md5_hex(&ad.iter().map(|r| text(&r[7])).collect::<Vec<_>>().join(",")),
            iso_micros(int(&ad[0][0])),
        ]],
        "client_sessions": [[
            cs.len(),
            cs.iter().map(|r| int(&r[11])).sum::<i64>(),
            cs.iter().map(|r| int(&r[7])).sum::<i64>(),
            cs.iter().filter(|r| r[5] != Value::Null).count(),
            cs.iter().map(|r| match r[8] { Value::Float(f) => f, _ => 0.0 }).sum::<f64>(),
            iso_micros(cs.iter().map(|r| int(&r[7])).max().unwrap()),
        ]],
    })
}

/// Only explicit flushes: every batch is one insert per table, so the inlined/Parquet split is as planned.
fn config(dir: &std::path::Path) -> LakeConfig {
    LakeConfig { flush_rows: 5000, ..file_config(dir) }
}

fn write_all(lake: &Lake) -> Vec<(TableId, Row)> {
    let w = lake.writer().unwrap();
    let mut all = Vec::new();
    for batch in batches() {
        let n = batch.len() as u64;
        for (t, r) in &batch {
            w.append(*t, r.clone());
        }
        assert_eq!(w.flush().unwrap().rows_written, n);
        all.extend(batch);
    }
    all
}

/// Run the Python reader and compare every figure, and the table/column types, with what Rust wrote.
fn check_with_python(cfg: &LakeConfig, target: &str, rows: &[(TableId, Row)]) {
    let ext = cfg.resolved_extension_dir().unwrap();
    let t = Instant::now();
    let out = python(READER, &[ext.to_str().unwrap(), target, &cfg.resolved_data_path()]);
    let got: Json = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    eprintln!("python duckdb {} (ducklake {}) read the lake in {:?}", got["duckdb"], got["ducklake"], t.elapsed());
    assert_eq!(got["duckdb"], "1.5.5");
    let want = expected(rows);
    for key in ["pool_snapshots", "pool_months", "server_errors", "admission_decisions", "client_sessions"] {
        assert_eq!(got[key], want[key], "{key}");
        eprintln!("  {key}: {}", got[key]);
    }
    // Every registered table and column, with the registry's type.
    let registry = Registry::builtin();
    let mut cols: Vec<Json> = Vec::new();
    let mut specs: Vec<_> = registry.tables().iter().collect();
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    for spec in specs {
        for c in &spec.columns {
            cols.push(json!([spec.name, c.name, c.ty.sql()]));
        }
    }
    assert_eq!(got["columns"], Json::Array(cols));
}

#[test]
fn python_duckdb_reads_a_file_catalog_lake() {
    require_python("duckdb", "scripts/lake-deps --python");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let rows = {
        let lake = Lake::open(&cfg, Registry::builtin(), &prometheus::Registry::new()).unwrap();
        let rows = write_all(&lake);
        lake.shutdown();
        rows
    }; // dropped: the embedded catalog file is free for another process
    let meta = cfg.dir.join("meta.ducklake");
    check_with_python(&cfg, meta.to_str().unwrap(), &rows);
}

#[test]
fn python_duckdb_reads_a_postgres_catalog_lake_while_pgbudget_writes() {
    require_python("duckdb", "scripts/lake-deps --python");
    let pg = common::Pg::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = LakeConfig { catalog: format!("postgres:{}", pg.conninfo()), ..config(dir.path()) };
    let lake = Lake::open(&cfg, Registry::builtin(), &prometheus::Registry::new()).unwrap();
    let rows = write_all(&lake);
    // The lake stays open in this process: the Postgres catalog serves both.
    check_with_python(&cfg, &format!("postgres:{}", pg.conninfo()), &rows);
    // Inlined rows really were in Postgres (server_errors: all 40, batches of 8).
    let inlined = common::psql(
        &pg.conninfo(),
        &["-c", "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'ducklake_inlined_data_%'"],
    );
    let n: i64 = String::from_utf8_lossy(&inlined.stdout).trim().parse().unwrap();
    assert!(n >= 2, "inlined-data tables in Postgres: {n}");
    lake.shutdown();
}
