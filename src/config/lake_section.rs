//! `[lake]` settings: where the catalog and the Parquet data live, flush cadence and bounds, DuckDB resources.
//! Unknown keys are caught the way `budgets.toml` catches them (serde_ignored); `validate` names every problem,
//! the service tables' against the lake's registry rules (`telemetry::registry`).

use crate::telemetry::registry::{Column, ColumnType, Registry, RegistryError, TableSpec};
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct LakeConfig {
    /// Off by default: the proxy writes no telemetry files unless asked to.
    pub enabled: bool,
    /// `""`: embedded DuckDB-file catalog `<dir>/meta.ducklake` (one process only);
    /// `"postgres:<libpq conninfo or URL>"`: a Postgres catalog (`${ENV}` expanded), shared by processes.
    pub catalog: String,
    /// Home of the embedded catalog and of local Parquet data.
    pub dir: PathBuf,
    /// Where Parquet files go: `""` = `<dir>/data/`, or `s3://bucket/prefix/`. Fixed at lake creation.
    pub data_path: String,
    /// Postgres schema of the catalog tables (`""` = the connection's default, `public`).
    pub metadata_schema: String,
    /// Extension directory laid out `v1.5.5/linux_amd64/*.duckdb_extension` (`""`: `$PGBUDGET_DUCKDB_HOME/extensions`,
    /// else the `scripts/lake-deps` cache the binary was built against).
    pub extension_dir: String,
    /// Attach READ_ONLY: queries only, no writer, no table creation (the lake must exist).
    pub read_only: bool,
    /// Flush when this many rows are buffered ...
    pub flush_rows: usize,
    /// ... or this long after the last flush.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// After a failed flush, the next attempt comes this much later (rows are kept meanwhile).
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
    /// Bound of the append queue; rows retained after failed flushes have the same bound. Past it rows are dropped
    /// and counted in `pgbudget_lake_rows_dropped_total`.
    pub buffer_rows: usize,
    /// Postgres catalog only: the most catalog connections this process opens (reader + flush thread = 2).
    pub pg_pool_max_connections: u32,
    /// DuckLake data inlining: inserts of at most this many rows go into the catalog instead of Parquet
    /// (DuckLake's default is 10). `None` keeps the lake's setting.
    pub data_inlining_row_limit: Option<u32>,
    /// DuckDB worker threads.
    pub threads: u32,
    /// DuckDB memory limit (`memory_limit` syntax, e.g. `256MB`).
    pub memory_limit: String,
    /// Deadline of the final flush at shutdown; past it the flush is interrupted and its rows dropped.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Most rows a reader query returns.
    pub max_rows: usize,
    /// `POST /lake/query` stops (interrupts) a query that runs longer than this.
    #[serde(with = "humantime_serde")]
    pub query_timeout: Duration,
    /// S3-compatible object storage for `data_path = "s3://..."`.
    pub s3: Option<S3Config>,
    /// How often the proxy runs lake maintenance (flush inlined rows, merge small files, expire snapshots,
    /// delete unreferenced files); `0s` turns the scheduled job off (`pgbudget lake maintain` still works).
    #[serde(with = "humantime_serde")]
    pub maintenance_interval: Duration,
    /// Maintenance expires snapshots older than this (time travel reaches back this far).
    #[serde(with = "humantime_serde")]
    pub expire_older_than: Duration,
    /// Maintenance deletes files no snapshot references any more once they have been unreferenced this long
    /// (a query still reading an old snapshot needs them meanwhile).
    #[serde(with = "humantime_serde")]
    pub cleanup_older_than: Duration,
    /// Tables the services behind the proxy declare (written through `POST /lake/{table}`), under the same rules
    /// as pgbudget's own: a leading `ts TIMESTAMP` is implied, columns are only ever added.
    pub tables: Vec<ServiceTable>,
}

/// A service-declared table: `[[lake.tables]] name = "signups"  columns = ["plan VARCHAR", "amount DOUBLE"]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceTable {
    pub name: String,
    /// `"<name> <TYPE>"`, TYPE one of TIMESTAMP, BIGINT, INTEGER, DOUBLE, BOOLEAN, VARCHAR.
    pub columns: Vec<String>,
}

impl Default for LakeConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            catalog: String::new(),
            dir: PathBuf::from("pgbudget-lake"),
            data_path: String::new(),
            metadata_schema: String::new(),
            extension_dir: String::new(),
            read_only: false,
            flush_rows: 100,
            flush_interval: Duration::from_secs(30),
            retry_interval: Duration::from_secs(5),
            buffer_rows: 10_000,
            pg_pool_max_connections: 2,
            data_inlining_row_limit: None,
            threads: 1,
            memory_limit: "256MB".into(),
            shutdown_timeout: Duration::from_secs(10),
            max_rows: 10_000,
            s3: None,
            tables: Vec::new(),
            query_timeout: Duration::from_secs(10),
            maintenance_interval: Duration::from_secs(24 * 3600),
            expire_older_than: Duration::from_secs(7 * 24 * 3600),
            cleanup_older_than: Duration::from_secs(2 * 24 * 3600),
        }
    }
}

/// An S3 secret (kept in memory only, never persisted by DuckDB).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct S3Config {
    pub key_id: String,
    pub secret: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// `host:port`, no scheme (`""` = AWS).
    #[serde(default)]
    pub endpoint: String,
    /// `path` for MinIO-style servers, `vhost` for AWS.
    #[serde(default = "default_url_style")]
    pub url_style: String,
    #[serde(default = "default_true")]
    pub use_ssl: bool,
    /// Limit the secret to one bucket/prefix, e.g. `s3://bucket`.
    #[serde(default)]
    pub scope: String,
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_url_style() -> String {
    "vhost".into()
}
fn default_true() -> bool {
    true
}

/// Where the catalog lives, resolved from [`LakeConfig::catalog`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogKind {
    File(PathBuf),
    Postgres(String),
}

impl LakeConfig {
    pub fn catalog_kind(&self) -> Result<CatalogKind, String> {
        let c = self.catalog.trim();
        if c.is_empty() {
            Ok(CatalogKind::File(self.dir.join("meta.ducklake")))
        } else if let Some(conninfo) = c.strip_prefix("postgres:") {
            if conninfo.trim().is_empty() {
                return Err("lake.catalog: `postgres:` needs a conninfo, e.g. `postgres:host=db dbname=lake`".into());
            }
            Ok(CatalogKind::Postgres(conninfo.trim().to_owned()))
        } else {
            Err(format!("lake.catalog: expected \"\" (embedded file) or \"postgres:<conninfo>\", got {c:?}"))
        }
    }

    /// The DATA_PATH given at ATTACH (with a trailing slash, as DuckLake stores it).
    pub fn resolved_data_path(&self) -> String {
        let p = if self.data_path.is_empty() {
            self.dir.join("data").to_string_lossy().into_owned()
        } else {
            self.data_path.clone()
        };
        if p.ends_with('/') {
            p
        } else {
            p + "/"
        }
    }

    /// The extension directory: config, then `$PGBUDGET_DUCKDB_HOME/extensions`, then the build's lake-deps cache.
    pub fn resolved_extension_dir(&self) -> Option<PathBuf> {
        if !self.extension_dir.is_empty() {
            return Some(PathBuf::from(&self.extension_dir));
        }
        if let Some(home) = std::env::var_os("PGBUDGET_DUCKDB_HOME").filter(|v| !v.is_empty()) {
            return Some(PathBuf::from(home).join("extensions"));
        }
        option_env!("PGBUDGET_DUCKDB_HOME_BUILT").map(|h| PathBuf::from(h).join("extensions"))
    }

    /// Every violated rule (empty when the section is usable).
    pub fn validate(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Err(e) = self.catalog_kind() {
            v.push(e);
        }
        if self.flush_rows == 0 {
            v.push("lake.flush_rows must be at least 1".into());
        }
        if self.buffer_rows < self.flush_rows {
            v.push(format!(
                "lake.buffer_rows ({}) must be at least flush_rows ({})",
                self.buffer_rows, self.flush_rows
            ));
        }
        if self.flush_interval.is_zero() || self.retry_interval.is_zero() {
            v.push("lake.flush_interval and lake.retry_interval must be above 0".into());
        }
        let need = if self.read_only { 1 } else { 2 };
        if self.pg_pool_max_connections < need {
            v.push(format!("lake.pg_pool_max_connections must be at least {need} (reader + flush thread)"));
        }
        if self.threads == 0 {
            v.push("lake.threads must be at least 1".into());
        }
        if self.query_timeout < Duration::from_millis(100) || self.query_timeout > Duration::from_secs(3600) {
            v.push("lake.query_timeout must be between 100ms and 1h".into());
        }
        if self.max_rows == 0 {
            v.push("lake.max_rows must be at least 1".into());
        }
        if self.s3.is_some() && !self.data_path.starts_with("s3://") {
            v.push("lake.s3 is set but lake.data_path is not an s3:// path".into());
        }
        if !self.maintenance_interval.is_zero() && self.maintenance_interval < Duration::from_secs(60) {
            v.push("lake.maintenance_interval must be 0s (off) or at least 1m".into());
        }
        // Both become `now() - INTERVAL 'N seconds'`; a century is plenty and keeps the arithmetic in range.
        const CENTURY: Duration = Duration::from_secs(100 * 366 * 24 * 3600);
        if self.expire_older_than > CENTURY || self.cleanup_older_than > CENTURY {
            v.push("lake.expire_older_than and lake.cleanup_older_than must be at most 100 years".into());
        }
        if let Err(e) = Registry::for_config(self) {
            v.push(format!("lake.tables: {e}"));
        }
        if self.resolved_extension_dir().is_none() {
            v.push("lake.extension_dir is not set and PGBUDGET_DUCKDB_HOME is unknown: run scripts/lake-deps".into());
        }
        v
    }
}

impl Registry {
    /// The built-in tables followed by the services' `[[lake.tables]]`; names, types and clashes are checked.
    pub fn for_config(cfg: &LakeConfig) -> Result<Registry, RegistryError> {
        let mut tables = Registry::builtin().tables;
        for t in &cfg.tables {
            let mut cols = vec![Column { name: "ts".into(), ty: ColumnType::Timestamp }];
            for c in &t.columns {
                let mut words = c.split_whitespace();
                let (Some(name), Some(ty), None) = (words.next(), words.next(), words.next()) else {
                    return Err(RegistryError(format!("table {}: column {c:?} is not \"<name> <TYPE>\"", t.name)));
                };
                let ty = ColumnType::parse(ty).ok_or_else(|| {
                    RegistryError(format!(
                        "table {}: column {name} has type {ty}; use TIMESTAMP, BIGINT, INTEGER, DOUBLE, BOOLEAN or VARCHAR",
                        t.name
                    ))
                })?;
                if name == "ts" {
                    return Err(RegistryError(format!("table {}: `ts TIMESTAMP` is implied; do not list it", t.name)));
                }
                cols.push(Column { name: name.to_owned().into(), ty });
            }
            tables.push(TableSpec { name: t.name.clone().into(), columns: cols });
        }
        Registry::new(tables)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Result<LakeConfig, toml::de::Error>, Vec<String>) {
        let mut unknown = Vec::new();
        let r = serde_ignored::deserialize(toml::Deserializer::new(text), |p| unknown.push(p.to_string()));
        (r, unknown)
    }

    #[test]
    fn defaults_parse_and_validate() {
        let (c, unknown) = parse("enabled = true\nflush_interval = \"5s\"\n");
        let c = c.unwrap();
        assert!(unknown.is_empty());
        assert_eq!(c.flush_interval, Duration::from_secs(5));
        assert_eq!(c.catalog_kind(), Ok(CatalogKind::File(PathBuf::from("pgbudget-lake/meta.ducklake"))));
        assert_eq!(c.resolved_data_path(), "pgbudget-lake/data/");
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        assert_eq!(c.maintenance_interval, Duration::from_secs(86_400));
        assert_eq!(c.expire_older_than, Duration::from_secs(7 * 86_400));
        assert_eq!(c.cleanup_older_than, Duration::from_secs(2 * 86_400));
        let (m, _) = parse("maintenance_interval = \"0s\"\nexpire_older_than = \"0s\"\ncleanup_older_than = \"1h\"\n");
        let m = m.unwrap();
        assert!(m.maintenance_interval.is_zero() && m.expire_older_than.is_zero());
        assert!(m.validate().is_empty(), "{:?}", m.validate());
        let (bad, _) = parse("maintenance_interval = \"10s\"\nexpire_older_than = \"1000years\"\n");
        let v = bad.unwrap().validate();
        assert!(v.iter().any(|e| e.contains("maintenance_interval")), "{v:?}");
        assert!(v.iter().any(|e| e.contains("100 years")), "{v:?}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let (c, unknown) =
            parse("flush_row = 5\ncatalog = \"mysql:x\"\nbuffer_rows = 10\n[s3]\nkey_id=\"k\"\nsecret=\"s\"\n");
        assert_eq!(unknown, vec!["flush_row".to_string()]);
        let v = c.unwrap().validate();
        assert!(v.iter().any(|e| e.contains("mysql")), "{v:?}");
        assert!(v.iter().any(|e| e.contains("buffer_rows")), "{v:?}");
        assert!(v.iter().any(|e| e.contains("s3://")), "{v:?}");
        let pg = LakeConfig { catalog: "postgres: host=h dbname=d".into(), ..Default::default() };
        assert_eq!(pg.catalog_kind(), Ok(CatalogKind::Postgres("host=h dbname=d".into())));
    }

    #[test]
    fn service_tables_are_checked() {
        let mut cfg = LakeConfig::default();
        cfg.tables.push(ServiceTable { name: "signups".into(), columns: vec!["plan VARCHAR".into()] });
        assert!(Registry::for_config(&cfg).is_ok());
        for (name, col, why) in [
            ("signups2", "plan TEXT", "has type TEXT"),
            ("signups3", "plan", "is not"),
            ("pool_snapshots", "x INTEGER", "twice"),
            ("Bad-Name", "x INTEGER", "lower-case"),
            ("signups4", "ts TIMESTAMP", "implied"),
        ] {
            let mut c = LakeConfig::default();
            c.tables.push(ServiceTable { name: name.into(), columns: vec![col.into()] });
            let e = Registry::for_config(&c).unwrap_err().to_string();
            assert!(e.contains(why), "{name} {col}: {e}");
        }
    }
}
