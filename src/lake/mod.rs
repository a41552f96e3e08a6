//! The embedded DuckLake telemetry warehouse (cargo feature `lake`): pgbudget's events as partitioned
//! Parquet tables in a DuckLake, catalog in a local DuckDB file (embedded default) or in Postgres.
//!
//! - `registry` — tables and columns, the one source of truth; `Value`/`Row` (`telemetry::registry`, re-exported;
//!   `config` likewise re-exports `config::lake_section`, the `[lake]` settings).
//! - `catalog`  — DuckDB setup (offline extensions), ATTACH, S3 secret, create/evolve tables, re-attach.
//! - `writer`   — `LakeWriter::append` (never fails, never blocks) and the flush thread.
//! - `reader`   — lock-guarded query connection returning JSON rows; heals on error.
//! - `maintain` — flush inlined rows, merge files, expire snapshots, clean up (one process at a time).
//! - `timeline` — per-service daily budget-trouble figures and the lake CLI's text tables.
//! - `errors`   — the error journal's history: `server_errors` rows read back into the ring at startup.
//! - `remote`   — the lake CLI asking a running proxy's admin listener while it holds an embedded catalog.
//!
//! One in-memory DuckDB per process; the writer and the reader are two connections to it (at most
//! `pg_pool_max_connections`, 2, catalog connections), plus the flush-lock session the flush thread keeps and,
//! during maintenance, a short-lived maintenance-lock session: 4 catalog connections at most per process.

pub mod catalog;
pub mod errors;
pub mod lock;
pub mod maintain;
pub mod reader;
pub mod remote;
pub mod timeline;
pub mod writer;

pub use crate::config::lake_section as config;
pub use crate::telemetry::registry;
pub use config::LakeConfig;
pub use maintain::{maintain, spawn_maintenance, MaintenanceReport};
pub use reader::{LakeReader, QueryResult};
pub use registry::{tables, ColumnType, Registry, Row, TableId, TableSpec, Value};
pub use writer::{FlushReport, LakeWriter};

use catalog::Catalog;
use std::sync::Arc;
use tracing::{info, warn};

/// Errors of the lake layer. None of them reaches a client session: appends cannot fail.
#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error("lake registry: {0}")]
    Registry(String),
    #[error("lake config: {0}")]
    Config(String),
    #[error("lake table {table}: {reason}")]
    Schema { table: String, reason: String },
    #[error("lake not attached: {0}")]
    NotAttached(String),
    #[error("lake is read-only")]
    ReadOnly,
    #[error("lake writer is shut down")]
    Closed,
    #[error("duckdb: {}", catalog::redact(&.0.to_string()))]
    DuckDb(#[from] duckdb::Error),
    #[error("lake metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("lake io: {0}")]
    Io(#[from] std::io::Error),
    #[error("lake read did not finish within {0:?}")]
    Timeout(std::time::Duration),
    #[error("lake via the running pgbudget: {0}")]
    Remote(String),
}

impl From<registry::RegistryError> for LakeError {
    fn from(e: registry::RegistryError) -> Self {
        LakeError::Registry(e.0)
    }
}

impl LakeError {
    /// Fixed-cardinality label for `pgbudget_lake_flush_errors_total{kind}` (see `writer::ERROR_KINDS`).
    pub fn kind(&self) -> &'static str {
        match self {
            LakeError::NotAttached(_) => "attach",
            LakeError::Schema { .. } => "schema",
            LakeError::DuckDb(e) => {
                let m = e.to_string().to_ascii_lowercase();
                if m.contains("conflict") {
                    "conflict"
                } else if ["connect", "connection", "server closed", "timeout", "terminat", "broken pipe"]
                    .iter()
                    .any(|k| m.contains(k))
                {
                    "connection"
                } else {
                    "duckdb"
                }
            }
            _ => "other",
        }
    }
}

/// The lake of one process: the shared catalog, a writer (none when read-only) and a reader.
pub struct Lake {
    catalog: Arc<Catalog>,
    writer: Option<LakeWriter>,
    reader: LakeReader,
}

/// The lake as the telemetry sink: rows go to its writer (none when it is attached read-only).
impl crate::telemetry::Sink for Lake {
    fn writes(&self) -> bool {
        self.writer.is_some()
    }

    fn append(&self, table: TableId, row: Row) {
        if let Some(w) = &self.writer {
            w.append(table, row);
        }
    }
}

impl Lake {
    /// Open DuckDB, load the extensions and attach. Bad configuration or missing extensions fail here; an
    /// unreachable catalog does not (the writer keeps rows and retries, the reader re-attaches on use).
    pub fn open(cfg: &LakeConfig, registry: Registry, metrics: &prometheus::Registry) -> Result<Lake, LakeError> {
        let problems = cfg.validate();
        if !problems.is_empty() {
            return Err(LakeError::Config(problems.join("; ")));
        }
        let mut cfg = cfg.clone();
        let env = crate::config::Env::from_process();
        cfg.catalog = crate::config::expand_env(&cfg.catalog, &env).map_err(LakeError::Config)?;
        let base = catalog::open_database(&cfg)?;
        let catalog = Arc::new(Catalog::new(cfg.clone(), Arc::new(registry))?);
        match catalog.attach(&base, 0, false) {
            Ok(_) => info!(
                catalog = if cfg.catalog.is_empty() { "file" } else { "postgres" },
                read_only = cfg.read_only,
                "lake attached"
            ),
            Err(e @ LakeError::Schema { .. }) => return Err(e),
            Err(e) => warn!(cause = %e, "lake: catalog not reachable yet; rows are kept and the attach retried"),
        }
        let writer =
            if cfg.read_only { None } else { Some(LakeWriter::start(base.try_clone()?, catalog.clone(), metrics)?) };
        let reader = LakeReader::new(base, catalog.clone());
        Ok(Lake { catalog, writer, reader })
    }

    /// `None` when the lake is attached read-only.
    pub fn writer(&self) -> Option<&LakeWriter> {
        self.writer.as_ref()
    }

    pub fn reader(&self) -> &LakeReader {
        &self.reader
    }

    pub fn registry(&self) -> &Registry {
        self.catalog.registry()
    }

    pub fn is_attached(&self) -> bool {
        self.catalog.is_attached()
    }

    /// Final flush (bounded by `shutdown_timeout`) and stop the flush thread.
    pub fn shutdown(&self) {
        if let Some(w) = &self.writer {
            w.shutdown();
        }
    }
}
