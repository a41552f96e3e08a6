//! Lake maintenance: fold inlined rows into Parquet, merge small adjacent files, expire old snapshots and
//! delete the files no snapshot references any more. Run by `pgbudget lake maintain` and, every
//! `lake.maintenance_interval`, by the proxy ([`spawn_maintenance`]).
//!
//! - Connections: the statements run on the reader's connection, under its lock ([`super::reader::LakeReader::with_conn`]), so
//!   reader + flush thread + maintenance stay within the process's 2 catalog connections (acquire mode `wait`:
//!   the flush thread waits for a free one instead of opening a third). Reader queries wait while it runs.
//! - One process at a time: with a Postgres catalog shared by several processes, maintenance first takes
//!   `pg_try_advisory_xact_lock(key)` ([`lock_key`]) in a transaction of its own on a short-lived plain-Postgres
//!   attachment of the catalog database ([`LockConn`]: one extra connection,
//!   `application_name = pgbudget:lake-maintenance`, closed by DETACH at the end). Another holder means
//!   *skipped*, not failed. Being a transaction lock, it goes away with the transaction or with the connection,
//!   so a crashed process cannot leave it behind. An embedded file catalog needs no lock: DuckDB's file lock
//!   already keeps other processes out.
//! - `ducklake_expire_snapshots` without `older_than` is a silent no-op, so `older_than` is always passed;
//!   `now() - INTERVAL` needs ICU, which the official libduckdb.so has built in.

use super::catalog::{lit, redact, rollback, ALIAS};
use super::config::CatalogKind;
use super::lock::{self, LockConn};
use super::{Lake, LakeError};
use duckdb::{Connection, InterruptHandle};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// The alias of the short-lived plain-Postgres attachment that holds the advisory lock.
const LOCK_ALIAS: &str = "pgbudget_maintenance_lock";
/// `application_name` of that connection.
const LOCK_APPLICATION_NAME: &str = "pgbudget:lake-maintenance";

/// What one maintenance run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaintenanceReport {
    /// Set when the run did nothing because another process (or task) was maintaining the lake.
    pub skipped: Option<String>,
    /// Inlined rows moved from the catalog into Parquet files.
    pub rows_flushed: u64,
    /// Data files read by merges ...
    pub files_merged: u64,
    /// ... and the files they were merged into.
    pub files_created: u64,
    pub snapshots_expired: u64,
    /// Files deleted because no remaining snapshot references them.
    pub files_cleaned: u64,
    pub elapsed: Duration,
}

impl fmt::Display for MaintenanceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(why) = &self.skipped {
            return write!(f, "skipped: {why}");
        }
        write!(
            f,
            "{} inlined rows flushed, {} files merged into {}, {} snapshots expired, {} files cleaned up in {:.2} s",
            self.rows_flushed,
            self.files_merged,
            self.files_created,
            self.snapshots_expired,
            self.files_cleaned,
            self.elapsed.as_secs_f64()
        )
    }
}

/// The maintenance lock key of a lake: FNV-1a of `pgbudget:lake:maintenance:<metadata schema>` ([`lock::key`]).
pub fn lock_key(metadata_schema: &str) -> i64 {
    lock::key(lock::MAINTENANCE, metadata_schema)
}

/// The lakes (by catalog address) being maintained in this process: one run at a time per lake (the proxy's
/// job and an admin call, say).
static RUNNING: Mutex<Vec<usize>> = Mutex::new(Vec::new());

struct Running(usize);

impl Running {
    fn start(lake: &Lake) -> Option<Running> {
        let id = Arc::as_ptr(&lake.catalog) as usize;
        let mut r = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        if r.contains(&id) {
            return None;
        }
        r.push(id);
        Some(Running(id))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.lock().unwrap_or_else(|e| e.into_inner()).retain(|&i| i != self.0);
    }
}

/// Stop a running maintenance from another thread: between steps, and by interrupting the running statement.
#[derive(Default)]
pub struct Cancel {
    stop: AtomicBool,
    running: Mutex<Option<Arc<InterruptHandle>>>,
}

impl Cancel {
    pub fn cancel(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.running.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            h.interrupt();
        }
    }

    fn check(&self) -> Result<(), LakeError> {
        if self.stop.load(Ordering::Acquire) {
            Err(LakeError::Closed)
        } else {
            Ok(())
        }
    }
}

/// How long maintenance waits for running flushes (other processes' and this one's) to let go of the flush lock.
const FLUSH_LOCK_WAIT: Duration = Duration::from_secs(30);

/// Run maintenance once (blocking: call it from `spawn_blocking` in async code).
pub fn maintain(lake: &Lake) -> Result<MaintenanceReport, LakeError> {
    maintain_with(lake, &Cancel::default())
}

/// [`maintain`] that stops early when `cancel` fires (the run then fails with [`LakeError::Closed`] or an
/// interrupted statement; whatever step was running is rolled back).
pub fn maintain_with(lake: &Lake, cancel: &Cancel) -> Result<MaintenanceReport, LakeError> {
    let started = Instant::now();
    let cfg = lake.catalog.config().clone();
    if cfg.read_only {
        return Err(LakeError::ReadOnly);
    }
    let Some(_one) = Running::start(lake) else {
        return Ok(skipped("maintenance of this lake is already running in this process", started));
    };
    if !lake.is_attached() {
        lake.reader().reattach()?;
    }
    // The lock transaction lives on its own connection to the same DuckDB, outside the reader's lock.
    let mut lock_conn = match cfg.catalog_kind().map_err(LakeError::Config)? {
        CatalogKind::File(_) => None,
        CatalogKind::Postgres(conninfo) => {
            let conn = lake.reader().with_conn(|c| Ok(c.try_clone()?))?;
            Some(LockConn::new(conn, &conninfo, LOCK_ALIAS, LOCK_APPLICATION_NAME))
        }
    };
    let mut held = match lock_conn.as_mut().map(|l| l.try_lock(lock_key(&cfg.metadata_schema))) {
        None => None,
        Some(Ok(Some(held))) => Some(held),
        Some(Ok(None)) => return Ok(skipped("another process holds the lake maintenance lock", started)),
        Some(Err(e)) => return Err(LakeError::NotAttached(format!("maintenance lock: {}", redact(&e.to_string())))),
    };
    // Maintenance rewrites the catalog's table statistics (flush_inlined_data) like a flush does: it must not
    // commit while any process flushes, so it also holds the flush lock for the pass.
    if let Some(h) = held.as_mut() {
        match h.and_lock(lock::flush_key(&cfg.metadata_schema), FLUSH_LOCK_WAIT) {
            Ok(()) => {}
            Err(lock::LockError::Timeout(_)) => {
                return Ok(skipped("flushes held the lake flush lock past the wait", started))
            }
            Err(lock::LockError::Failed(e)) => {
                return Err(LakeError::NotAttached(format!("flush lock: {}", redact(&e.to_string()))))
            }
        }
    }
    cancel.check()?;
    let name = lit(ALIAS);
    let older = |d: Duration| format!("older_than => now() - INTERVAL '{} seconds'", d.as_secs());
    let r = lake.reader().with_conn(|conn| {
        *cancel.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.interrupt_handle());
        let r = (|| {
            let mut rep = MaintenanceReport::default();
            cancel.check()?;
            let (_, s) = call(conn, &format!("CALL ducklake_flush_inlined_data({name})"), &["rows_flushed"])?;
            rep.rows_flushed = s[0];
            cancel.check()?;
            let merge = format!("CALL ducklake_merge_adjacent_files({name})");
            let (_, s) = call(conn, &merge, &["files_processed", "files_created"])?;
            (rep.files_merged, rep.files_created) = (s[0], s[1]);
            cancel.check()?;
            let expire = format!("CALL ducklake_expire_snapshots({name}, {})", older(cfg.expire_older_than));
            rep.snapshots_expired = call(conn, &expire, &[])?.0;
            cancel.check()?;
            let cleanup = format!("CALL ducklake_cleanup_old_files({name}, {})", older(cfg.cleanup_older_than));
            rep.files_cleaned = call(conn, &cleanup, &[])?.0;
            Ok(rep)
        })();
        *cancel.running.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if r.is_err() {
            rollback(conn);
        }
        r
    });
    drop(held); // ends the lock transaction ...
    drop(lock_conn); // ... and detaches
    let mut rep = r?;
    rep.elapsed = started.elapsed();
    Ok(rep)
}

fn skipped(why: &str, started: Instant) -> MaintenanceReport {
    MaintenanceReport { skipped: Some(why.to_owned()), elapsed: started.elapsed(), ..Default::default() }
}

/// Run a maintenance CALL: its row count and the sums of the named (integer) result columns.
fn call(conn: &Connection, sql: &str, sum: &[&str]) -> Result<(u64, Vec<u64>), LakeError> {
    let mut stmt = conn.prepare(sql)?;
    let mut rows = stmt.query([])?;
    let names: Vec<String> = rows.as_ref().map(|s| s.column_names()).unwrap_or_default();
    let idx: Vec<usize> = sum
        .iter()
        .map(|c| {
            names.iter().position(|n| n == c).ok_or_else(|| LakeError::Schema {
                table: sql.to_owned(),
                reason: format!("no column {c} in the result ({names:?})"),
            })
        })
        .collect::<Result<_, _>>()?;
    let (mut n, mut sums) = (0u64, vec![0u64; sum.len()]);
    while let Some(row) = rows.next()? {
        n += 1;
        for (s, &i) in sums.iter_mut().zip(&idx) {
            *s += row.get::<_, Option<i64>>(i)?.unwrap_or(0).max(0) as u64;
        }
    }
    Ok((n, sums))
}

/// Run [`maintain`] every `interval` on a blocking thread and log the report; failures are logged, never
/// fatal. The first run comes `min(interval, 10 min)` after the start plus up to a minute of jitter (processes
/// restarted more often than `interval` still maintain; processes started together do not collide), then
/// every `interval`. `interval = 0` spawns nothing. Shutdown stops the wait, or interrupts a running
/// maintenance (its step is rolled back), so the task ends promptly.
pub fn spawn_maintenance(
    lake: Arc<Lake>,
    interval: Duration,
    shutdown: tokio_util::sync::CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) {
    if interval.is_zero() {
        return;
    }
    let jitter_cap = (interval / 10).min(Duration::from_secs(60));
    let jitter = Duration::from_millis(rand::random::<u64>() % (jitter_cap.as_millis() as u64).max(1));
    let mut wait = interval.min(Duration::from_secs(600)) + jitter;
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = interval;
            let cancel = Arc::new(Cancel::default());
            let (l, c) = (lake.clone(), cancel.clone());
            let mut job = tokio::task::spawn_blocking(move || maintain_with(&l, &c));
            let done = tokio::select! {
                _ = shutdown.cancelled() => {
                    cancel.cancel();
                    let _ = (&mut job).await;
                    return;
                }
                r = &mut job => r,
            };
            match done {
                Ok(Ok(rep)) if rep.skipped.is_some() => info!(report = %rep, "lake maintenance skipped"),
                Ok(Ok(rep)) => info!(
                    rows_flushed = rep.rows_flushed,
                    files_merged = rep.files_merged,
                    files_created = rep.files_created,
                    snapshots_expired = rep.snapshots_expired,
                    files_cleaned = rep.files_cleaned,
                    elapsed_ms = rep.elapsed.as_millis() as u64,
                    "lake maintenance done"
                ),
                Ok(Err(e)) => {
                    warn!(kind = e.kind(), cause = %e, "lake maintenance failed; next attempt in {interval:?}")
                }
                Err(e) => warn!(cause = %e, "lake maintenance task panicked"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_are_stable_per_schema() {
        assert_eq!(lock_key(""), lock_key("public"));
        assert_ne!(lock_key("public"), lock_key("lake2"));
        // Fixed forever: processes of different versions must agree on it.
        assert_eq!(lock_key("public"), -74_993_432_007_230_486);
        let app = |c: &str| lock::conninfo_with_application_name(c, LOCK_APPLICATION_NAME);
        assert_eq!(app("host=h dbname=d"), "host=h dbname=d application_name='pgbudget:lake-maintenance'");
        assert_eq!(app("postgres://u@h/d"), "postgres://u@h/d?application_name=pgbudget%3Alake-maintenance");
    }

    #[test]
    fn report_text() {
        let r = MaintenanceReport {
            rows_flushed: 15,
            files_merged: 4,
            files_created: 1,
            snapshots_expired: 11,
            files_cleaned: 4,
            elapsed: Duration::from_millis(250),
            ..Default::default()
        };
        assert_eq!(
            r.to_string(),
            "15 inlined rows flushed, 4 files merged into 1, 11 snapshots expired, 4 files cleaned up in 0.25 s"
        );
        assert_eq!(skipped("busy", Instant::now()).to_string(), "skipped: busy");
    }
}
