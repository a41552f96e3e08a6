//! The lake writer: `append` never fails and never blocks (a bounded queue and `try_send`); one flush thread
//! writes batches through the DuckDB appender when `flush_rows` rows are buffered, `flush_interval` has
//! passed, or at shutdown. A failed flush keeps its rows (within `buffer_rows`) and re-attaches before the
//! next attempt. Every dropped row is counted by table and reason, every flush error by kind.
//!
//! ## The flush lock (Postgres catalog)
//! DuckLake 1.5.5 is not safe with several processes committing to one Postgres catalog at once: concurrent
//! inserts overwrite each other's global min/max stats (later filtered queries prune live rows) and conflict
//! checks can miss commits. So every flush holds a cross-process lock: `pg_advisory_xact_lock(`
//! [`lock::flush_key`]`(metadata_schema))`, a key of its own (maintenance uses another one and is not held up
//! by flushes). How:
//! - Taken before the flush's first `BEGIN` and held until its last table is committed. Locking only around
//!   `COMMIT` would not do: DuckLake's Postgres transaction is REPEATABLE READ and starts with the first
//!   metadata read, so a snapshot taken before another process's commit would still merge stale stats.
//! - Blocking, with a deadline: Postgres `lock_timeout` of [`FLUSH_LOCK_TIMEOUT`] (5 s, see
//!   [`LakeWriter::set_flush_lock_timeout`]; at the final flush at most `shutdown_timeout`). Flushes take tens
//!   of milliseconds, so waiting that long means another process is stuck or the catalog is slow. Past it the
//!   flush fails like any failed flush (rows kept within `buffer_rows`, retried after `retry_interval`),
//!   counted as kind `lock`. A DuckDB interrupt does not cut the wait short; the deadline does.
//! - On a dedicated plain-Postgres attachment the flush thread keeps ([`LockConn`], alias
//!   `pgbudget_flush_lock`, `application_name = pgbudget:lake-flush`): no connect and authentication per flush.
//!   The pool closes the idle session after `pg_pool_idle_timeout_millis` (60 s) and the next flush opens it
//!   again; after an error it is detached and attached afresh. Uncontended the lock costs one round trip for
//!   `BEGIN; SET LOCAL lock_timeout; pg_advisory_xact_lock`, and one for the `ROLLBACK` that releases it.
//! - Catalog connections per process: the lake pool (`pg_pool_max_connections`, 2: reader and flush thread),
//!   this lock session (1) and, while maintenance runs, the maintenance lock session (1): 4 =
//!   `pg_pool_max_connections + 2` to reserve on the catalog's upstream.
//! - File catalogs take no lock: DuckDB's file lock admits one process.
//! - Maintenance holds this flush lock too, for its whole pass: `ducklake_flush_inlined_data` rewrites the
//!   table's global stats rows the way an insert does (seen on 1.5.5: new row versions, `file_size_bytes`
//!   grows), so a pass racing a flush could lose that flush's stats update.

use super::catalog::{redact, Catalog};
use super::config::CatalogKind;
use super::lock::{self, LockConn, LockError};
use super::registry::{Registry, Row, TableId};
use super::LakeError;
use duckdb::{Connection, InterruptHandle};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

mod metrics;
mod rows;
use metrics::WriterMetrics;
pub(crate) use rows::param;
use rows::write_table;

/// Why a row did not reach the lake (the `reason` label), indexed by the `DROP_*` constants.
pub const DROP_REASONS: [&str; 4] = ["buffer_full", "retry_overflow", "invalid_row", "shutdown"];
/// The queue was full (the flush thread is behind or stuck in a slow flush).
const DROP_FULL: usize = 0;
/// Flushes kept failing and the retained rows passed `buffer_rows`: the oldest go.
const DROP_OVERFLOW: usize = 1;
/// Wrong arity or a value that does not fit its column.
const DROP_INVALID: usize = 2;
/// Appended after shutdown, or still buffered when the final flush failed.
const DROP_SHUTDOWN: usize = 3;
/// Kinds of flush errors (the `kind` label); see [`error_kind`].
pub const ERROR_KINDS: [&str; 7] = ["attach", "connection", "conflict", "schema", "duckdb", "lock", "other"];
/// How long a flush waits for the flush lock by default (Postgres catalog).
pub const FLUSH_LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// Alias of the flush lock's plain-Postgres attachment.
const FLUSH_LOCK_ALIAS: &str = "pgbudget_flush_lock";
/// `application_name` of its connection.
pub const FLUSH_LOCK_APPLICATION_NAME: &str = "pgbudget:lake-flush";
/// How the error of a flush that did not get the flush lock in time begins.
const LOCK_TIMEOUT_TEXT: &str = "flush lock not granted within";

/// The `kind` label of a flush error: [`LakeError::kind`], or `lock` when the flush did not get the flush lock
/// in time (another process held it past the deadline).
pub fn error_kind(e: &LakeError) -> &'static str {
    match e {
        LakeError::Io(io)
            if io.kind() == std::io::ErrorKind::TimedOut && io.to_string().starts_with(LOCK_TIMEOUT_TEXT) =>
        {
            "lock"
        }
        e => e.kind(),
    }
}

fn lock_timeout_error(waited: Duration) -> LakeError {
    LakeError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{LOCK_TIMEOUT_TEXT} {waited:?}: another pgbudget process is committing to this lake"),
    ))
}

enum Msg {
    Row(TableId, Row),
    /// Wakes the flush thread to look at its control channel.
    Wake,
}

enum Ctl {
    Flush(Sender<Result<FlushReport, LakeError>>),
    Shutdown,
}

/// What one flush did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushReport {
    pub rows_written: u64,
    pub tables: usize,
    /// The whole flush, lock wait included.
    pub elapsed: Duration,
    /// Time spent getting the flush lock (zero with a file catalog or when nothing was buffered).
    pub lock_wait: Duration,
    /// From the first table's `BEGIN` to the end of the last table's `COMMIT` (`None`: nothing was written).
    /// With a Postgres catalog the flush lock is held throughout.
    pub commits: Option<(Instant, Instant)>,
}

struct Shared {
    tx: SyncSender<Msg>,
    ctl: Sender<Ctl>,
    registry: Arc<Registry>,
    metrics: Arc<WriterMetrics>,
    interrupt: Arc<InterruptHandle>,
    thread: Mutex<Option<(JoinHandle<()>, Receiver<()>)>>,
    shutdown_timeout: Duration,
    /// The flush lock deadline in milliseconds, read at every flush.
    lock_timeout_ms: Arc<AtomicU64>,
}

/// A cheap, cloneable handle; the flush thread stops (after a final flush) at [`LakeWriter::shutdown`] or
/// when the last handle is dropped.
#[derive(Clone)]
pub struct LakeWriter {
    shared: Arc<Shared>,
}

impl LakeWriter {
    /// Start the flush thread on `conn` (a connection to the database `catalog` attaches to).
    pub fn start(
        conn: Connection,
        catalog: Arc<Catalog>,
        metrics: &prometheus::Registry,
    ) -> Result<LakeWriter, LakeError> {
        let cfg = catalog.config().clone();
        let registry = catalog.registry().clone();
        let (tx, rx) = mpsc::sync_channel(cfg.buffer_rows);
        let (ctl, ctl_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let interrupt = conn.interrupt_handle();
        let m = Arc::new(WriterMetrics::new(metrics, &registry)?);
        let lock = match cfg.catalog_kind().map_err(LakeError::Config)? {
            CatalogKind::File(_) => None,
            CatalogKind::Postgres(conninfo) => {
                Some(LockConn::new(conn.try_clone()?, &conninfo, FLUSH_LOCK_ALIAS, FLUSH_LOCK_APPLICATION_NAME))
            }
        };
        let lock_timeout_ms = Arc::new(AtomicU64::new(FLUSH_LOCK_TIMEOUT.as_millis() as u64));
        let shared = Arc::new(Shared {
            tx,
            ctl,
            registry: registry.clone(),
            metrics: m.clone(),
            interrupt,
            thread: Mutex::new(None),
            shutdown_timeout: cfg.shutdown_timeout,
            lock_timeout_ms: lock_timeout_ms.clone(),
        });
        let pending = registry.tables().iter().map(|_| VecDeque::new()).collect();
        let mut flusher = Flusher {
            conn,
            seen_generation: catalog.generation(),
            catalog,
            rx,
            ctl: ctl_rx,
            pending,
            total: 0,
            retry_at: None,
            needs_attach: false,
            flush_rows: cfg.flush_rows,
            bound: cfg.buffer_rows,
            interval: cfg.flush_interval,
            retry: cfg.retry_interval,
            lock,
            lock_key: lock::flush_key(&cfg.metadata_schema),
            lock_timeout_ms,
            final_cap: None,
            shutdown_timeout: cfg.shutdown_timeout,
        };
        let handle = std::thread::Builder::new().name("lake-flush".into()).spawn(move || {
            flusher.run(&m);
            // Dropping the queue's receiver here makes later appends count as dropped at shutdown.
            drop(flusher);
            let _ = done_tx.send(());
        })?;
        *shared.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some((handle, done_rx));
        Ok(LakeWriter { shared })
    }

    /// Queue one row for `table`. Never blocks and never fails: a row that does not fit the table, or finds
    /// the queue full, is dropped and counted.
    #[inline]
    pub fn append(&self, table: TableId, row: Row) {
        let s = &*self.shared;
        let Some(spec) = s.registry.get(table) else {
            debug!(table = table.0, "lake: append to an unknown table id");
            return;
        };
        if !spec.accepts(&row) {
            s.metrics.drop_row(table, DROP_INVALID);
            return;
        }
        match s.tx.try_send(Msg::Row(table, row)) {
            Ok(()) => s.metrics.accepted[usize::from(table.0)].inc(),
            Err(TrySendError::Full(_)) => s.metrics.drop_row(table, DROP_FULL),
            Err(TrySendError::Disconnected(_)) => s.metrics.drop_row(table, DROP_SHUTDOWN),
        }
    }

    /// Look a table up by name (resolve once, then [`append`](Self::append) by id).
    pub fn table(&self, name: &str) -> Option<TableId> {
        self.shared.registry.id(name)
    }

    /// Flush now and wait for the result (tests, admin). Rows of a failed flush are kept for the next one.
    pub fn flush(&self) -> Result<FlushReport, LakeError> {
        let (tx, rx) = mpsc::channel();
        self.shared.ctl.send(Ctl::Flush(tx)).map_err(|_| LakeError::Closed)?;
        let _ = self.shared.tx.try_send(Msg::Wake);
        rx.recv().map_err(|_| LakeError::Closed)?
    }

    /// How long later flushes wait for the flush lock (Postgres catalog; default [`FLUSH_LOCK_TIMEOUT`], at
    /// least 1 ms). Takes effect at the next flush.
    pub fn set_flush_lock_timeout(&self, timeout: Duration) {
        self.shared.lock_timeout_ms.store((timeout.as_millis() as u64).max(1), Ordering::Relaxed);
    }

    /// Final flush and stop, waiting at most `shutdown_timeout`; past it the running statement is interrupted.
    /// Later appends are dropped (`reason="shutdown"`). Idempotent.
    pub fn shutdown(&self) {
        let Some((handle, done)) = self.shared.thread.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let _ = self.shared.ctl.send(Ctl::Shutdown);
        let _ = self.shared.tx.try_send(Msg::Wake);
        if done.recv_timeout(self.shared.shutdown_timeout).is_err() {
            warn!(timeout = ?self.shared.shutdown_timeout, "lake: final flush did not finish in time, interrupting it");
            self.shared.interrupt.interrupt();
        }
        let _ = handle.join();
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some((handle, done)) = self.thread.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = self.ctl.send(Ctl::Shutdown);
            let _ = self.tx.try_send(Msg::Wake);
            if done.recv_timeout(self.shutdown_timeout).is_err() {
                self.interrupt.interrupt();
            }
            let _ = handle.join();
        }
    }
}

struct Flusher {
    conn: Connection,
    catalog: Arc<Catalog>,
    rx: Receiver<Msg>,
    ctl: Receiver<Ctl>,
    /// Rows drained from the queue, per table, oldest first.
    pending: Vec<VecDeque<Row>>,
    total: usize,
    /// Set after a failed flush: no attempt before this instant (size trigger included).
    retry_at: Option<Instant>,
    needs_attach: bool,
    seen_generation: u64,
    flush_rows: usize,
    bound: usize,
    interval: Duration,
    retry: Duration,
    /// The flush lock's connection (Postgres catalog only).
    lock: Option<LockConn>,
    lock_key: i64,
    lock_timeout_ms: Arc<AtomicU64>,
    /// Set for the final flush: its lock wait is capped by `shutdown_timeout`.
    final_cap: Option<Duration>,
    shutdown_timeout: Duration,
}

impl Flusher {
    fn run(&mut self, m: &WriterMetrics) {
        let mut next = Instant::now() + self.interval;
        loop {
            loop {
                match self.ctl.try_recv() {
                    Ok(Ctl::Flush(reply)) => {
                        self.drain(m);
                        let r = self.flush(m);
                        next = Instant::now() + self.interval;
                        let _ = reply.send(r);
                    }
                    Ok(Ctl::Shutdown) | Err(TryRecvError::Disconnected) => return self.finish(m),
                    Err(TryRecvError::Empty) => break,
                }
            }
            let now = Instant::now();
            if self.total == 0 {
                self.retry_at = None;
            }
            let due = self.retry_at.unwrap_or(next);
            let by_size = self.retry_at.is_none() && self.total >= self.flush_rows;
            if self.total > 0 && (by_size || now >= due) {
                let _ = self.flush(m);
                next = Instant::now() + self.interval;
                continue;
            }
            if now >= due {
                next = now + self.interval;
                continue;
            }
            match self.rx.recv_timeout(due - now) {
                Ok(msg) => {
                    self.take(msg, m);
                    self.drain(m);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return self.finish(m),
            }
        }
    }

    fn take(&mut self, msg: Msg, m: &WriterMetrics) {
        let Msg::Row(t, row) = msg else { return };
        let i = usize::from(t.0);
        self.pending[i].push_back(row);
        self.total += 1;
        // Over the bound only while flushes fail: keep the newest rows.
        while self.total > self.bound {
            let Some((j, _)) = self.pending.iter().enumerate().max_by_key(|(_, q)| q.len()) else { break };
            self.pending[j].pop_front();
            self.total -= 1;
            m.drop_row(TableId(j as u16), DROP_OVERFLOW);
        }
    }

    /// Move what is queued into `pending`, at most one queue's worth, so producers that outrun the flush
    /// thread cannot keep it from flushing.
    fn drain(&mut self, m: &WriterMetrics) {
        for _ in 0..self.bound {
            match self.rx.try_recv() {
                Ok(msg) => self.take(msg, m),
                Err(_) => break,
            }
        }
        m.buffered.set(self.total as i64);
    }

    fn flush(&mut self, m: &WriterMetrics) -> Result<FlushReport, LakeError> {
        let started = Instant::now();
        let mut report = FlushReport::default();
        let r = self.try_flush(m, &mut report);
        report.elapsed = started.elapsed();
        m.buffered.set(self.total as i64);
        match r {
            Ok(()) => {
                self.retry_at = None;
                if report.rows_written > 0 {
                    m.flushes.inc();
                    m.flush_seconds.observe(report.elapsed.as_secs_f64());
                }
                Ok(report)
            }
            Err(e) => {
                m.errors.with_label_values(&[error_kind(&e)]).inc();
                warn!(kind = error_kind(&e), cause = %e, buffered = self.total, "lake: flush failed, rows kept for the next attempt");
                self.retry_at = Some(Instant::now() + self.retry);
                Err(e)
            }
        }
    }

    fn try_flush(&mut self, m: &WriterMetrics, report: &mut FlushReport) -> Result<(), LakeError> {
        if self.total == 0 {
            return Ok(());
        }
        // The flush lock first, so that the whole DuckLake transaction (and a re-attach's DDL) runs under it.
        let _held = match self.lock.as_mut() {
            None => None,
            Some(l) => {
                let mut timeout = Duration::from_millis(self.lock_timeout_ms.load(Ordering::Relaxed));
                if let Some(cap) = self.final_cap {
                    timeout = timeout.min(cap);
                }
                let asked = Instant::now();
                let r = l.lock(self.lock_key, timeout);
                report.lock_wait = asked.elapsed();
                m.lock_wait_seconds.observe(report.lock_wait.as_secs_f64());
                match r {
                    Ok(held) => Some(held),
                    Err(LockError::Timeout(t)) => return Err(lock_timeout_error(t)),
                    Err(LockError::Failed(e)) => {
                        return Err(LakeError::NotAttached(format!("flush lock: {}", redact(&e.to_string()))))
                    }
                }
            }
        };
        if self.needs_attach || !self.catalog.is_attached() {
            // After an error: a fresh attachment (new catalog pool), unless another connection re-attached
            // since this one last saw the lake work.
            let detach = self.catalog.is_attached();
            self.seen_generation = self.catalog.attach(&self.conn, self.seen_generation, detach)?;
            self.needs_attach = false;
        }
        let registry = self.catalog.registry().clone();
        let catalog = self.catalog.clone();
        let _using = catalog.using();
        let mut first_err = None;
        for (i, spec) in registry.tables().iter().enumerate() {
            if self.pending[i].is_empty() {
                continue;
            }
            let begin = Instant::now();
            let r = write_table(&self.conn, spec, &self.pending[i]);
            report.commits = Some((report.commits.map_or(begin, |(b, _)| b), Instant::now()));
            match r {
                Ok(()) => {
                    self.seen_generation = self.seen_generation.max(self.catalog.generation());
                    let n = self.pending[i].len();
                    m.written[i].inc_by(n as u64);
                    report.rows_written += n as u64;
                    report.tables += 1;
                    self.total -= n;
                    self.pending[i].clear();
                }
                Err(e) => {
                    self.needs_attach = true;
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn finish(&mut self, m: &WriterMetrics) {
        self.drain(m);
        if self.total > 0 {
            self.retry_at = None;
            self.final_cap = Some(self.shutdown_timeout);
            match self.flush(m) {
                Ok(r) => info!(rows = r.rows_written, "lake: final flush done"),
                Err(_) => {
                    for (i, q) in self.pending.iter_mut().enumerate() {
                        if let Some(c) = m.dropped.get(i) {
                            c[DROP_SHUTDOWN].inc_by(q.len() as u64);
                        }
                        q.clear();
                    }
                    self.total = 0;
                }
            }
        }
        m.buffered.set(0);
    }
}
