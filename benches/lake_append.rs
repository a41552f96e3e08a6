//! Criterion benchmarks of the lake writer: the cost of one `append` on the caller's thread (a 16-column
//! pool_snapshots row into the bounded queue), and one 100-row batch appended and flushed into a local
//! file-catalog DuckLake (appender, one snapshot, one Parquet file).

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pgbudget::lake::{tables, Lake, LakeConfig, Registry, Row, Value};
use std::time::Duration;

#[path = "../tests/common/lake.rs"]
mod lake_common;

/// A 16-column pool_snapshots row (the test helper's).
fn row(i: i64) -> Row {
    lake_common::pool_row(i, lake_common::month_start(2026, 1, 0) + i)
}

/// `catalog = ""`: a file catalog in `dir`. Otherwise the given catalog string.
fn lake(dir: &std::path::Path, catalog: &str, rows: usize, metrics: &prometheus::Registry) -> Lake {
    let cfg = LakeConfig {
        enabled: true,
        catalog: catalog.into(),
        dir: dir.to_path_buf(),
        flush_rows: rows,
        buffer_rows: rows,
        flush_interval: Duration::from_secs(3600),
        retry_interval: Duration::from_secs(3600),
        shutdown_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    Lake::open(&cfg, Registry::builtin(), metrics).expect("lake opens (run scripts/lake-deps)")
}

fn counter(reg: &prometheus::Registry, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for f in reg.gather().iter().filter(|f| f.get_name() == name) {
        for m in f.get_metric() {
            let labels: Vec<_> = m.get_label().iter().map(|l| l.get_value().to_owned()).collect();
            if m.get_counter().get_value() > 0.0 {
                out.push(format!("{}={}", labels.join("/"), m.get_counter().get_value()));
            }
        }
    }
    out
}

fn append(c: &mut Criterion) {
    let mut g = c.benchmark_group("lake");
    g.throughput(Throughput::Elements(1));
    // The caller's side only: validation, try_send, one counter. The catalog is unreachable (port 1), so the
    // first flush fails at once and no retry comes within the run: the flush thread just drains the queue
    // into its bounded buffer (dropping the oldest past 200,000), with no DuckDB work competing for the CPU.
    // How many rows were queued or dropped is printed.
    let dir = tempfile::tempdir().unwrap();
    let reg = prometheus::Registry::new();
    let l = lake(dir.path(), "postgres:host=127.0.0.1 port=1 user=x dbname=x connect_timeout=1", 200_000, &reg);
    g.measurement_time(Duration::from_secs(3));
    let w = l.writer().unwrap();
    let r = row(42);
    // As in production: far below the flush thread's drain rate. Chunks of 1,000 appends are timed, with a
    // pause after each (not timed) in which the flush thread drains the queue.
    g.bench_function("append_pool_snapshot_row", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(1000);
                let rows: Vec<Row> = (0..n).map(|_| r.clone()).collect();
                let t = std::time::Instant::now();
                for row in rows {
                    w.append(tables::POOL_SNAPSHOTS, black_box(row));
                }
                spent += t.elapsed();
                left -= n;
                std::thread::sleep(Duration::from_millis(1));
            }
            spent
        })
    });
    eprintln!("unsaturated: dropped {:?}", counter(&reg, "pgbudget_lake_rows_dropped_total"));
    // Saturated: appends outrun the flush thread, so many find the queue full (and free their row here).
    g.bench_function("append_pool_snapshot_row_saturated", |b| {
        b.iter_batched(|| r.clone(), |row| w.append(tables::POOL_SNAPSHOTS, black_box(row)), BatchSize::SmallInput)
    });
    g.bench_function("append_invalid_row_dropped", |b| {
        b.iter_batched(
            || vec![Value::now()],
            |row| w.append(tables::POOL_SNAPSHOTS, black_box(row)),
            BatchSize::SmallInput,
        )
    });
    eprintln!(
        "appended: {:?}; dropped: {:?}",
        counter(&reg, "pgbudget_lake_rows_appended_total"),
        counter(&reg, "pgbudget_lake_rows_dropped_total")
    );
    drop(l);

    let dir = tempfile::tempdir().unwrap();
    let l = lake(dir.path(), "", 1_000_000, &prometheus::Registry::new());
    let w = l.writer().unwrap();
    g.throughput(Throughput::Elements(100));
    g.sample_size(20);
    g.bench_function("append_100_rows_and_flush_file_catalog", |b| {
        let mut i = 0;
        b.iter(|| {
            for _ in 0..100 {
                w.append(tables::POOL_SNAPSHOTS, row(i));
                i += 1;
            }
            assert_eq!(w.flush().unwrap().rows_written, 100);
        })
    });
    g.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
