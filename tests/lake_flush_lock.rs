//! The cross-process flush lock on a Postgres catalog: two `Lake`s (two writers, as two pgbudget processes
//! would have) on one real Postgres 15 catalog. A flush waits while another session holds the lock, fails with
//! kind `lock` past the deadline and keeps its rows; the commits of two writers never overlap.

mod common;
#[path = "common/lake.rs"]
mod lake_common;

use common::Pg;
use lake_common::{file_config, metric, month_start, pool_row};
use pgbudget::lake::lock::flush_key;
use pgbudget::lake::writer::{error_kind, FLUSH_LOCK_APPLICATION_NAME};
use pgbudget::lake::{tables, FlushReport, Lake, LakeConfig, Registry};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// A lake on `pg`'s catalog with data under `dir`; only explicit flushes (no size or timer trigger).
fn open(pg: &Pg, dir: &std::path::Path) -> (Arc<Lake>, prometheus::Registry) {
    let cfg = LakeConfig {
        catalog: format!("postgres:{}", pg.conninfo()),
        flush_rows: 10_000,
        buffer_rows: 10_000,
        ..file_config(dir)
    };
    let reg = prometheus::Registry::new();
    (Arc::new(Lake::open(&cfg, Registry::builtin(), &reg).unwrap()), reg)
}

fn append(lake: &Lake, ids: std::ops::Range<i64>) {
    let w = lake.writer().unwrap();
    for i in ids {
        w.append(tables::POOL_SNAPSHOTS, pool_row(i, month_start(2026, 6, 0) + i));
    }
}

/// (rows, distinct ids, sum of ids) in the lake; the id is `checkout_timeouts`.
fn landed(lake: &Lake) -> (i64, i64, i64) {
    let r = lake
        .reader()
        .query(
            "SELECT count(*) AS n, count(DISTINCT checkout_timeouts) AS d, coalesce(sum(checkout_timeouts), 0) AS s \
             FROM lake.main.pool_snapshots",
            &[],
            1,
        )
        .unwrap();
    let g = |k: &str| r.rows[0][k].as_i64().unwrap();
    (g("n"), g("d"), g("s"))
}

/// Flush lock requests of the lake writers that Postgres has queued (not granted).
async fn waiting_flushes(admin: &tokio_postgres::Client) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
             WHERE l.locktype = 'advisory' AND NOT l.granted AND a.application_name = $1",
            &[&FLUSH_LOCK_APPLICATION_NAME],
        )
        .await
        .unwrap()
        .get(0)
}

/// Open flush lock sessions (all writers).
async fn lock_sessions(admin: &tokio_postgres::Client) -> i64 {
    admin
        .query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", &[&FLUSH_LOCK_APPLICATION_NAME])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_flush_lock_makes_flushes_wait_then_fail_keeping_their_rows() {
    let started = Instant::now();
    let pg = Pg::start();
    let dir = tempfile::tempdir().unwrap();
    let (a, reg_a) = open(&pg, dir.path());
    let (b, reg_b) = open(&pg, dir.path());
    for l in [&a, &b] {
        l.writer().unwrap().set_flush_lock_timeout(Duration::from_millis(1500));
    }
    // Both writers append to the same table at the same time.
    let (la, lb) = (a.clone(), b.clone());
    let appenders =
        [std::thread::spawn(move || append(&la, 0..300)), std::thread::spawn(move || append(&lb, 300..700))];
    for t in appenders {
        t.join().unwrap();
    }

    // Another process is in a long flush: it holds the flush lock.
    let other = common::connect(&pg.conninfo()).await.unwrap();
    let key = flush_key("");
    other.execute("SELECT pg_advisory_lock($1)", &[&key]).await.unwrap();
    let flush = |l: &Arc<Lake>| {
        let l = l.clone();
        tokio::task::spawn_blocking(move || {
            let at = Instant::now();
            (l.writer().unwrap().flush(), at.elapsed())
        })
    };
    let (fa, fb) = (flush(&a), flush(&b));
    // Both wait in Postgres, behind the holder.
    let deadline = Instant::now() + Duration::from_secs(5);
    while waiting_flushes(&other).await < 2 {
        assert!(Instant::now() < deadline, "the flushes never queued for the flush lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (name, f, reg, rows) in [("a", fa, &reg_a, 300.0), ("b", fb, &reg_b, 400.0)] {
        let (r, waited) = f.await.unwrap();
        let e = r.unwrap_err();
        eprintln!("writer {name}: flush failed after {waited:?}: kind={} {e}", error_kind(&e));
        assert_eq!(error_kind(&e), "lock", "{e}");
        assert!(waited >= Duration::from_millis(1400) && waited < Duration::from_secs(4), "waited {waited:?}");
        assert_eq!(metric(reg, "pgbudget_lake_flush_errors_total", &[("kind", "lock")]), 1.0);
        assert_eq!(metric(reg, "pgbudget_lake_buffered_rows", &[]), rows, "writer {name} kept its rows");
        assert_eq!(metric(reg, "pgbudget_lake_rows_dropped_total", &[]), 0.0);
    }
    assert_eq!(landed(&a), (0, 0, 0), "nothing was committed while the lock was held");

    // Released: both flush (one after the other) and every row lands exactly once.
    other.execute("SELECT pg_advisory_unlock($1)", &[&key]).await.unwrap();
    let (fa, fb) = (flush(&a), flush(&b));
    let (ra, rb) = (fa.await.unwrap().0.unwrap(), fb.await.unwrap().0.unwrap());
    assert_eq!((ra.rows_written, rb.rows_written), (300, 400));
    assert!(disjoint(&[ra.clone(), rb.clone()]), "{ra:?} {rb:?}");
    assert_eq!(landed(&a), (700, 700, (0..700).sum()));
    assert_eq!(landed(&b), (700, 700, (0..700).sum()));
    for reg in [&reg_a, &reg_b] {
        assert_eq!(metric(reg, "pgbudget_lake_buffered_rows", &[]), 0.0);
    }
    // One lock session per writer, apart from the lake's own pool; closed when the writer stops.
    assert_eq!(lock_sessions(&other).await, 2);
    a.shutdown();
    b.shutdown();
    let deadline = Instant::now() + Duration::from_secs(5);
    while lock_sessions(&other).await > 0 {
        assert!(Instant::now() < deadline, "the flush lock sessions outlived their writers");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop((a, b));
    eprintln!("test took {:?}", started.elapsed());
}

/// Whether the commit windows of these flushes are pairwise disjoint.
fn disjoint(reports: &[FlushReport]) -> bool {
    let mut w: Vec<(Instant, Instant)> = reports.iter().filter_map(|r| r.commits).collect();
    w.sort();
    w.windows(2).all(|p| p[0].1 <= p[1].0)
}

/// The commit windows as milliseconds from the earliest start, sorted.
fn windows_ms(reports: &[FlushReport]) -> Vec<(f64, f64)> {
    let mut w: Vec<(Instant, Instant)> = reports.iter().filter_map(|r| r.commits).collect();
    w.sort();
    let t0 = w.first().map_or_else(Instant::now, |f| f.0);
    let ms = |t: Instant| (t - t0).as_secs_f64() * 1000.0;
    w.iter().map(|&(b, e)| (ms(b), ms(e))).collect()
}

fn mean_ms(d: impl Iterator<Item = Duration>) -> f64 {
    let v: Vec<f64> = d.map(|d| d.as_secs_f64() * 1000.0).collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

#[test]
fn flush_commits_of_two_writers_never_overlap() {
    let started = Instant::now();
    let pg = Pg::start();
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = open(&pg, dir.path());
    let (b, _) = open(&pg, dir.path());
    // Uncontended first: what the lock costs a flush on its own (the first flush also opens the lock session).
    let mut alone = Vec::new();
    for round in 0..15 {
        append(&a, round * 100..round * 100 + 100);
        alone.push(a.writer().unwrap().flush().unwrap());
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let commit = |r: &FlushReport| r.commits.map(|(b, e)| e - b).unwrap();
    eprintln!(
        "100-row flushes of one writer: first {:.1} ms (lock {:.1} ms), then {:.1} ms (lock {:.1} ms, commits {:.1} ms)",
        ms(alone[0].elapsed),
        ms(alone[0].lock_wait),
        mean_ms(alone[1..].iter().map(|r| r.elapsed)),
        mean_ms(alone[1..].iter().map(|r| r.lock_wait)),
        mean_ms(alone[1..].iter().map(commit)),
    );
    // Then both writers flush at the same moment, round after round: one of them has to wait every time.
    const ROUNDS: i64 = 15;
    let go = Arc::new(Barrier::new(2));
    let run = |lake: &Arc<Lake>, base: i64| {
        let (lake, go) = (lake.clone(), go.clone());
        std::thread::spawn(move || {
            (0..ROUNDS)
                .map(|round| {
                    let from = base + round * 100;
                    append(&lake, from..from + 100);
                    go.wait();
                    lake.writer().unwrap().flush().unwrap()
                })
                .collect::<Vec<_>>()
        })
    };
    let (ta, tb) = (run(&a, 10_000), run(&b, 20_000));
    let (ra, rb) = (ta.join().unwrap(), tb.join().unwrap());
    let all: Vec<FlushReport> = ra.iter().chain(&rb).cloned().collect();
    assert!(all.iter().all(|r| r.rows_written == 100 && r.commits.is_some()));
    assert!(disjoint(&all), "commit windows overlap (ms from the first): {:?}", windows_ms(&all));
    // The test had teeth: in most rounds one writer's lock wait ended only after the other's commits did.
    let waited = |mine: &[FlushReport], theirs: &[FlushReport]| {
        mine.iter()
            .filter(|r| {
                let (begin, _) = r.commits.unwrap();
                theirs.iter().any(|o| o.commits.is_some_and(|(_, end)| end <= begin && end >= begin - r.lock_wait))
            })
            .count()
    };
    let contended = waited(&ra, &rb) + waited(&rb, &ra);
    assert!(contended as i64 >= ROUNDS / 2, "only {contended} of {ROUNDS} rounds waited for the other writer");
    let rows = ROUNDS * 100;
    let ids = (0..1500).chain(10_000..10_000 + rows).chain(20_000..20_000 + rows);
    let (n, d, s) = landed(&a);
    assert_eq!((n, d, s), (1500 + 2 * rows, 1500 + 2 * rows, ids.sum::<i64>()));
    eprintln!(
        "100-row flushes of both writers at once: {:.1} ms (lock wait {:.1} ms, commits {:.1} ms), \
         {contended}/{ROUNDS} rounds waited; test took {:?}",
        mean_ms(all.iter().map(|r| r.elapsed)),
        mean_ms(all.iter().map(|r| r.lock_wait)),
        mean_ms(all.iter().map(commit)),
        started.elapsed()
    );
    a.shutdown();
    b.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_waits_for_the_flush_lock() {
    let pg = Pg::start();
    let dir = tempfile::tempdir().unwrap();
    let (lake, _reg) = open(&pg, dir.path());
    append(&lake, 0..5); // few enough rows to be inlined: maintenance has some to move to Parquet
    lake.writer().unwrap().flush().unwrap();

    // A flush is in progress elsewhere: maintenance must not commit until it is over.
    let other = common::connect(&pg.conninfo()).await.unwrap();
    let key = flush_key("");
    other.execute("SELECT pg_advisory_lock($1)", &[&key]).await.unwrap();
    let l = lake.clone();
    let pass = tokio::task::spawn_blocking(move || pgbudget::lake::maintain(&l));
    let queued = "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
                  WHERE l.locktype = 'advisory' AND NOT l.granted AND a.application_name = 'pgbudget:lake-maintenance'";
    let deadline = Instant::now() + Duration::from_secs(5);
    while other.query_one(queued, &[]).await.unwrap().get::<_, i64>(0) < 1 {
        assert!(Instant::now() < deadline, "maintenance never queued for the flush lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pass.is_finished(), "maintenance ran while a flush held the lock");
    assert_eq!(landed(&lake), (5, 5, 10), "the data is unchanged meanwhile");

    other.execute("SELECT pg_advisory_unlock($1)", &[&key]).await.unwrap();
    let rep = tokio::time::timeout(Duration::from_secs(10), pass).await.unwrap().unwrap().unwrap();
    assert_eq!((rep.skipped.clone(), rep.rows_flushed), (None, 5), "{rep}");
    assert_eq!(landed(&lake), (5, 5, 10));
    lake.shutdown();
}
