//! Cross-process locks for a lake with a Postgres catalog: transaction-level advisory locks
//! (`pg_advisory_xact_lock`) held on a plain-Postgres attachment (`TYPE postgres`) of the catalog database,
//! one DuckDB connection and one Postgres session per [`LockConn`].
//!
//! - Keys ([`key`]): FNV-1a of `pgbudget:lake:<purpose>:<metadata schema>`. Advisory locks are per database,
//!   and two lakes in one database live in different schemas; every purpose ([`MAINTENANCE`], [`FLUSH`]) has
//!   its own key, so holding one never blocks the other. The keys are fixed forever: processes of different
//!   versions must agree on them.
//! - Transaction locks only: the lock goes away with the transaction ([`Held`] ends it on drop) or with the
//!   session, so a crashed or killed process cannot leave one behind.
//! - Waiting: [`LockConn::lock`] waits in Postgres under `SET LOCAL lock_timeout`. A DuckDB interrupt does not
//!   cut that wait short (seen in testing: it takes effect only when Postgres answers), so the timeout is the
//!   only bound.
//! - Inside one DuckDB transaction, `postgres_execute` and `postgres_query` on the attachment run on the same
//!   Postgres connection and transaction (verified with `pg_backend_pid()` and `pg_locks`).

use super::catalog::{lit, redact, rollback};
use duckdb::{Connection, InterruptHandle};
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// Key purpose of the maintenance lock (`pg_try_advisory_xact_lock`: another holder means *skipped*).
pub const MAINTENANCE: &str = "maintenance";
/// Key purpose of the flush lock (`pg_advisory_xact_lock` with a deadline: at most one committing process).
pub const FLUSH: &str = "flush";

/// The advisory-lock key of `purpose` for the lake whose catalog lives in `metadata_schema` (`""` = `public`).
pub fn key(purpose: &str, metadata_schema: &str) -> i64 {
    let schema = if metadata_schema.is_empty() { "public" } else { metadata_schema };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in "pgbudget:lake:".bytes().chain(purpose.bytes()).chain(":".bytes()).chain(schema.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

/// The lake's flush lock key.
pub fn flush_key(metadata_schema: &str) -> i64 {
    key(FLUSH, metadata_schema)
}

/// The catalog conninfo with `application_name` set to `name` (unless the conninfo sets one).
pub fn conninfo_with_application_name(conninfo: &str, name: &str) -> String {
    if conninfo.contains("application_name") {
        conninfo.to_owned()
    } else if conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://") {
        let sep = if conninfo.contains('?') { '&' } else { '?' };
        format!("{conninfo}{sep}application_name={}", name.replace(':', "%3A"))
    } else {
        format!("{conninfo} application_name='{name}'")
    }
}

/// Why [`LockConn::lock`] failed.
#[derive(Debug)]
pub enum LockError {
    /// Another session held the lock for the whole deadline.
    Timeout(Duration),
    /// The attachment or a statement failed (the catalog database is unreachable, say); the attachment is
    /// dropped and made again on the next attempt.
    Failed(duckdb::Error),
}

/// A plain-Postgres attachment of the catalog database (alias `alias`, its own connection pool, one session
/// in use at a time) that holds advisory locks. Attaches on first use; [`close`](Self::close) or drop detaches,
/// which closes the Postgres connection.
pub struct LockConn {
    conn: Connection,
    alias: &'static str,
    target: String,
    attached: bool,
}

impl LockConn {
    /// No I/O: the attachment is made by the first lock attempt. `conn` must be a connection of its own (a
    /// `try_clone`): its transaction is the lock's.
    pub fn new(conn: Connection, conninfo: &str, alias: &'static str, application_name: &str) -> LockConn {
        LockConn { conn, alias, target: conninfo_with_application_name(conninfo, application_name), attached: false }
    }

    pub fn interrupt_handle(&self) -> Arc<InterruptHandle> {
        self.conn.interrupt_handle()
    }

    fn attach(&mut self) -> duckdb::Result<()> {
        if !self.attached {
            rollback(&self.conn);
            self.conn.execute_batch(&format!("DETACH DATABASE IF EXISTS {}", self.alias))?;
            self.conn.execute_batch(&format!("ATTACH {} AS {} (TYPE postgres)", lit(&self.target), self.alias))?;
            self.attached = true;
        }
        Ok(())
    }

    fn select_bool(&self, sql: &str) -> duckdb::Result<bool> {
        let q = format!("SELECT ok FROM postgres_query({}, {})", lit(self.alias), lit(sql));
        self.conn.query_row(&q, [], |r| r.get(0))
    }

    /// `pg_try_advisory_xact_lock(key)` in a new transaction: `None` when another session holds the lock.
    pub fn try_lock(&mut self, key: i64) -> duckdb::Result<Option<Held<'_>>> {
        let r = (|| {
            self.attach()?;
            self.conn.execute_batch("BEGIN TRANSACTION")?;
            self.select_bool(&format!("SELECT pg_try_advisory_xact_lock({key}) AS ok"))
        })();
        match r {
            Ok(true) => Ok(Some(Held { lock: self })),
            Ok(false) => {
                rollback(&self.conn);
                Ok(None)
            }
            Err(e) => {
                self.failed();
                Err(e)
            }
        }
    }

    /// `pg_advisory_xact_lock(key)` in a new transaction, waiting at most `timeout` (Postgres `lock_timeout`,
    /// at least 1 ms: 0 would mean no limit).
    pub fn lock(&mut self, key: i64, timeout: Duration) -> Result<Held<'_>, LockError> {
        let ms = timeout.as_millis().clamp(1, u128::from(u32::MAX >> 1));
        let r = (|| {
            self.attach()?;
            self.conn.execute_batch("BEGIN TRANSACTION")?;
            let set = format!("SET LOCAL lock_timeout = {ms}");
            self.conn.execute_batch(&format!("CALL postgres_execute({}, {})", lit(self.alias), lit(&set)))?;
            self.select_bool(&format!("SELECT pg_advisory_xact_lock({key}) IS NOT NULL AS ok"))
        })();
        match r {
            Ok(_) => Ok(Held { lock: self }),
            // `canceling statement due to lock timeout` (55P03): the session is fine, only the wait ended.
            Err(e) if e.to_string().contains("lock timeout") => {
                rollback(&self.conn);
                Err(LockError::Timeout(Duration::from_millis(ms as u64)))
            }
            Err(e) => {
                self.failed();
                Err(LockError::Failed(e))
            }
        }
    }

    /// After an error the session may be gone or stuck: end the transaction and drop the attachment (its pool
    /// and connection); the next attempt attaches afresh.
    fn failed(&mut self) {
        rollback(&self.conn);
        self.close();
    }

    /// Detach (closes the Postgres connection). Idempotent; the next lock attempt attaches again.
    pub fn close(&mut self) {
        rollback(&self.conn);
        if self.attached {
            self.attached = false;
            if let Err(e) = self.conn.execute_batch(&format!("DETACH DATABASE IF EXISTS {}", self.alias)) {
                warn!(alias = self.alias, cause = %redact(&e.to_string()), "lake: detach of a lock connection failed");
            }
        }
    }
}

impl Drop for LockConn {
    fn drop(&mut self) {
        self.close();
    }
}

/// A held lock: dropping it ends the transaction, which releases the lock (the connection stays attached).
pub struct Held<'a> {
    lock: &'a mut LockConn,
}

impl Held<'_> {
    /// Also take `key` in the same transaction, waiting at most `timeout`; it is released with the transaction.
    pub fn and_lock(&mut self, key: i64, timeout: Duration) -> Result<(), LockError> {
        let ms = timeout.as_millis().clamp(1, u128::from(u32::MAX >> 1));
        let l = &self.lock;
        let set = format!("SET LOCAL lock_timeout = {ms}");
        let r = l
            .conn
            .execute_batch(&format!("CALL postgres_execute({}, {})", lit(l.alias), lit(&set)))
            .and_then(|_| l.select_bool(&format!("SELECT pg_advisory_xact_lock({key}) IS NOT NULL AS ok")));
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("lock timeout") => {
                Err(LockError::Timeout(Duration::from_millis(ms as u64)))
            }
            Err(e) => Err(LockError::Failed(e)),
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        rollback(&self.lock.conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_distinct() {
        assert_eq!(key(MAINTENANCE, ""), key(MAINTENANCE, "public"));
        assert_ne!(key(MAINTENANCE, "public"), key(MAINTENANCE, "lake2"));
        assert_ne!(key(MAINTENANCE, "public"), key(FLUSH, "public"));
        // Fixed forever: processes of different versions must agree on them.
        assert_eq!(key(MAINTENANCE, "public"), -74_993_432_007_230_486);
        assert_eq!(flush_key(""), -2_166_361_464_298_372_435);
    }

    #[test]
    fn application_names() {
        let n = "pgbudget:lake-flush";
        assert_eq!(
            conninfo_with_application_name("host=h dbname=d", n),
            "host=h dbname=d application_name='pgbudget:lake-flush'"
        );
        assert_eq!(
            conninfo_with_application_name("postgres://u@h/d", n),
            "postgres://u@h/d?application_name=pgbudget%3Alake-flush"
        );
        assert_eq!(conninfo_with_application_name("host=h application_name=x", n), "host=h application_name=x");
    }
}
