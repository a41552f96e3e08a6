//! The DuckDB side of the lake: offline extension setup, the ATTACH statement for file and Postgres catalogs,
//! the S3 secret, creating tables (partitioned by `(year(ts), month(ts))`) and additive-only schema evolution.
//!
//! One in-memory DuckDB database per process holds the attached lake; the reader and the flush thread use
//! their own connections to it (`try_clone`), so they share one catalog pool (Postgres: at most
//! `pg_pool_max_connections`, acquire mode `wait`). Re-attaching is counted in a generation, so two
//! connections that fail together heal once, and it is exclusive: every use of the lake holds a read
//! guard ([`Catalog::using`]) and (re-)attaching takes the write side. A DETACH under another connection's
//! running query would make that query fail and, for a file catalog, make the re-ATTACH fail with
//! "Unique file handle conflict" until the query ends (seen in testing).

use super::config::{CatalogKind, LakeConfig, S3Config};
use super::registry::{Column, Registry, TableSpec};
use super::LakeError;
use duckdb::Connection;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use tracing::{debug, info, warn};

/// The name the lake is attached under.
pub const ALIAS: &str = "lake";
/// The DuckLake schema the tables live in.
pub const SCHEMA: &str = "main";
/// `application_name` of the lake's catalog connections, so `pg_stat_activity` shows who holds them.
pub const APPLICATION_NAME: &str = "pgbudget:lake";

/// A SQL string literal.
pub fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A quoted identifier (names are checked identifiers already; quoting keeps keywords like `database` usable).
pub fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `lake.main."table"`
pub fn qualified(table: &str) -> String {
    format!("{ALIAS}.{SCHEMA}.{}", ident(table))
}

/// Add `application_name` to a conninfo that does not set one (key=value form or URL form).
pub fn with_application_name(conninfo: &str) -> String {
    super::lock::conninfo_with_application_name(conninfo, APPLICATION_NAME)
}

/// The ATTACH statement for this config. `IF NOT EXISTS` makes a repeated attach a no-op; the same DATA_PATH
/// is passed every time (DuckLake refuses a different one).
pub fn attach_sql(cfg: &LakeConfig) -> Result<String, LakeError> {
    let target = match cfg.catalog_kind().map_err(LakeError::Config)? {
        CatalogKind::File(meta) => format!("ducklake:{}", meta.display()),
        CatalogKind::Postgres(conninfo) => format!("ducklake:postgres:{}", with_application_name(&conninfo)),
    };
    let mut opts = vec![format!("DATA_PATH {}", lit(&cfg.resolved_data_path()))];
    if !cfg.metadata_schema.is_empty() {
        opts.push(format!("METADATA_SCHEMA {}", lit(&cfg.metadata_schema)));
    }
    if let Some(n) = cfg.data_inlining_row_limit {
        opts.push(format!("DATA_INLINING_ROW_LIMIT {n}"));
    }
    if cfg.read_only {
        opts.push("READ_ONLY".into());
    }
    Ok(format!("ATTACH IF NOT EXISTS {} AS {ALIAS} ({})", lit(&target), opts.join(", ")))
}

/// A temporary (never persisted) S3 secret.
pub fn s3_secret_sql(s3: &S3Config) -> String {
    let mut parts = vec![
        "TYPE s3".to_owned(),
        format!("KEY_ID {}", lit(&s3.key_id)),
        format!("SECRET {}", lit(&s3.secret)),
        format!("REGION {}", lit(&s3.region)),
        format!("URL_STYLE {}", lit(&s3.url_style)),
        format!("USE_SSL {}", s3.use_ssl),
    ];
    if !s3.endpoint.is_empty() {
        parts.push(format!("ENDPOINT {}", lit(&s3.endpoint)));
    }
    if !s3.scope.is_empty() {
        parts.push(format!("SCOPE {}", lit(&s3.scope)));
    }
    format!("CREATE OR REPLACE TEMPORARY SECRET pgbudget_lake_s3 ({})", parts.join(", "))
}

/// Open the process's in-memory DuckDB with offline extension loading and load what the catalog needs.
pub fn open_database(cfg: &LakeConfig) -> Result<Connection, LakeError> {
    let ext = cfg.resolved_extension_dir().ok_or_else(|| {
        LakeError::Config("no DuckDB extension directory: set lake.extension_dir or run scripts/lake-deps".into())
    })?;
    let config = duckdb::Config::default()
        .with("extension_directory", ext.to_string_lossy())?
        .with("autoinstall_known_extensions", "false")?
        .with("autoload_known_extensions", "true")?
        .threads(i64::from(cfg.threads))?
        .max_memory(&cfg.memory_limit)?;
    let conn = Connection::open_in_memory_with_flags(config)?;
    let mut setup = vec!["LOAD ducklake;".to_owned()];
    if let CatalogKind::Postgres(_) = cfg.catalog_kind().map_err(LakeError::Config)? {
        // A real cap needs acquire mode `wait`: in the default `force` mode the limit only bounds idle connections.
        setup.push("LOAD postgres_scanner;".into());
        setup.push(format!("SET pg_pool_max_connections = {};", cfg.pg_pool_max_connections));
        setup.push("SET pg_pool_acquire_mode = 'wait';".into());
    }
    if let Some(s3) = &cfg.s3 {
        setup.push("LOAD httpfs;".into());
        setup.push(s3_secret_sql(s3) + ";");
    }
    conn.execute_batch(&setup.join("\n"))?;
    Ok(conn)
}

/// What to do to bring one lake table in line with its spec.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    Create,
    AddColumns(Vec<Column>),
}

/// Compare a spec with the table's existing `(column, type)` list: additions are planned, anything else
/// (a retyped column, a column the registry no longer lists) is refused.
pub fn plan(spec: &TableSpec, existing: &[(String, String)]) -> Result<Plan, LakeError> {
    if existing.is_empty() {
        return Ok(Plan::Create);
    }
    let refuse = |reason: String| Err(LakeError::Schema { table: spec.name.to_string(), reason });
    for (name, ty) in existing {
        match spec.columns.iter().find(|c| c.name == name.as_str()) {
            None => {
                return refuse(format!(
                    "column {name} ({ty}) exists in the lake but not in the registry; lake schemas are additive \
                     only, so columns are never removed (put it back in the registry)"
                ))
            }
            Some(c) if !c.ty.sql().eq_ignore_ascii_case(ty) => {
                return refuse(format!(
                    "column {name} is {ty} in the lake but {} in the registry; retyping is refused (add a new column)",
                    c.ty.sql()
                ))
            }
            Some(_) => {}
        }
    }
    let missing =
        spec.columns.iter().filter(|c| !existing.iter().any(|(n, _)| n.as_str() == c.name)).cloned().collect();
    Ok(Plan::AddColumns(missing))
}

fn create_sql(spec: &TableSpec) -> String {
    let cols: Vec<String> = spec.columns.iter().map(|c| format!("{} {}", ident(&c.name), c.ty.sql())).collect();
    let t = qualified(&spec.name);
    // One transaction: one snapshot, and no window where the table exists unpartitioned.
    format!(
        "BEGIN; CREATE TABLE IF NOT EXISTS {t} ({}); ALTER TABLE {t} SET PARTITIONED BY (year(\"ts\"), month(\"ts\")); COMMIT;",
        cols.join(", ")
    )
}

/// The table's columns as the lake has them, in order (empty: no such table).
pub fn existing_columns(conn: &Connection, table: &str) -> Result<Vec<(String, String)>, LakeError> {
    let mut stmt = conn.prepare(
        "SELECT column_name, data_type FROM duckdb_columns() \
         WHERE database_name = ? AND schema_name = ? AND table_name = ? ORDER BY column_index",
    )?;
    let rows = stmt.query_map([ALIAS, SCHEMA, table], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// End whatever transaction `conn` is in. Unconditional: after a failed commit DuckDB can leave the
/// connection in an aborted transaction ("please ROLLBACK") that `is_autocommit` does not show.
pub fn rollback(conn: &Connection) {
    if let Err(e) = conn.execute_batch("ROLLBACK") {
        if !e.to_string().contains("no transaction is active") {
            debug!(cause = %redact(&e.to_string()), "lake: rollback failed");
        }
    }
}

/// Hide passwords in text that may quote a conninfo (DuckDB's connection errors do): `password=...` and the
/// password of a `scheme://user:password@host` URL.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("password=") {
        out.push_str(&rest[..i + "password=".len()]);
        out.push_str("***");
        let after = &rest[i + "password=".len()..];
        let end = match after.strip_prefix('\'') {
            Some(q) => q.find('\'').map_or(after.len(), |j| j + 2),
            None => after.find(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '&').unwrap_or(after.len()),
        };
        rest = &after[end..];
    }
    out.push_str(rest);
    // scheme://user:secret@host
    let mut s = out;
    let mut from = 0;
    while let Some(i) = s[from..].find("://").map(|i| i + from + 3) {
        let tail = &s[i..];
        let stop = tail.find(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '/').unwrap_or(tail.len());
        if let Some(at) = tail[..stop].rfind('@') {
            if let Some(colon) = tail[..at].find(':') {
                s.replace_range(i + colon + 1..i + at, "***");
            }
        }
        from = i;
    }
    s
}

/// Create the table or add its missing columns. A concurrent creator (another process) makes the CREATE
/// conflict; then the table exists and one more pass evolves it.
pub fn ensure_table(conn: &Connection, spec: &TableSpec) -> Result<(), LakeError> {
    for attempt in 0..2 {
        let r = match plan(spec, &existing_columns(conn, &spec.name)?)? {
            Plan::Create => conn.execute_batch(&create_sql(spec)),
            Plan::AddColumns(cols) if cols.is_empty() => return Ok(()),
            Plan::AddColumns(cols) => {
                let t = qualified(&spec.name);
                let sql: Vec<String> = cols
                    .iter()
                    .map(|c| format!("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {} {};", ident(&c.name), c.ty.sql()))
                    .collect();
                info!(table = %spec.name, columns = ?cols.iter().map(|c| c.name.as_ref()).collect::<Vec<_>>(), "lake: adding columns");
                conn.execute_batch(&sql.join("\n"))
            }
        };
        match r {
            Ok(()) => return Ok(()),
            Err(e) if attempt == 0 && e.to_string().contains("onflict") => {
                rollback(conn);
                warn!(table = %spec.name, cause = %e, "lake: concurrent DDL, retrying");
            }
            Err(e) => {
                rollback(conn);
                return Err(e.into());
            }
        }
    }
    Ok(())
}

/// The attached lake shared by the reader and the writer of one process.
pub struct Catalog {
    cfg: LakeConfig,
    registry: Arc<Registry>,
    attach_sql: String,
    /// Read side: a connection is using the lake; write side: (re-)attaching.
    lock: RwLock<()>,
    attached: AtomicBool,
    generation: AtomicU64,
}

impl Catalog {
    pub fn new(cfg: LakeConfig, registry: Arc<Registry>) -> Result<Catalog, LakeError> {
        if let CatalogKind::File(meta) = cfg.catalog_kind().map_err(LakeError::Config)? {
            if let Some(parent) = meta.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)?;
            }
        }
        if !cfg.resolved_data_path().contains("://") {
            std::fs::create_dir_all(cfg.resolved_data_path())?;
        }
        let attach_sql = attach_sql(&cfg)?;
        Ok(Catalog {
            cfg,
            registry,
            attach_sql,
            lock: RwLock::new(()),
            attached: AtomicBool::new(false),
            generation: AtomicU64::new(0),
        })
    }

    pub fn config(&self) -> &LakeConfig {
        &self.cfg
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn is_attached(&self) -> bool {
        self.attached.load(Ordering::Acquire)
    }

    /// Hold while running statements against the lake; a re-attach waits for every holder.
    pub fn using(&self) -> RwLockReadGuard<'_, ()> {
        self.lock.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Bumped by every successful (re-)attach.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Attach on `conn` unless another connection re-attached after the caller saw generation `seen`; with
    /// `detach_first` the old attachment is dropped first (a fresh catalog pool). Then CREATE / ADD COLUMN for
    /// every registered table (not in read-only mode). Returns the generation now in force.
    pub fn attach(&self, conn: &Connection, seen: u64, detach_first: bool) -> Result<u64, LakeError> {
        let _exclusive = self.lock.write().unwrap_or_else(|e| e.into_inner());
        let now = self.generation();
        if now != seen && self.is_attached() {
            return Ok(now);
        }
        rollback(conn);
        if detach_first {
            self.attached.store(false, Ordering::Release);
            if let Err(e) = conn.execute_batch(&format!("DETACH DATABASE IF EXISTS {ALIAS}")) {
                warn!(cause = %e, "lake: detach failed");
            }
        }
        let r = conn.execute_batch(&self.attach_sql).map_err(LakeError::from).and_then(|()| {
            if self.cfg.read_only {
                return Ok(());
            }
            self.registry.tables().iter().try_for_each(|t| ensure_table(conn, t))
        });
        match r {
            Ok(()) => {
                self.attached.store(true, Ordering::Release);
                Ok(self.generation.fetch_add(1, Ordering::AcqRel) + 1)
            }
            Err(e) => {
                self.attached.store(false, Ordering::Release);
                Err(match e {
                    e @ LakeError::Schema { .. } => e,
                    e => LakeError::NotAttached(redact(&e.to_string())),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lake::registry::ColumnType;

    #[test]
    fn attach_strings() {
        let file = LakeConfig { dir: "/var/lake".into(), data_inlining_row_limit: Some(0), ..Default::default() };
        assert_eq!(
            attach_sql(&file).unwrap(),
            "ATTACH IF NOT EXISTS 'ducklake:/var/lake/meta.ducklake' AS lake (DATA_PATH '/var/lake/data/', DATA_INLINING_ROW_LIMIT 0)"
        );
        let pg = LakeConfig {
            catalog: "postgres:host=db password=it's".into(),
            data_path: "s3://b/p".into(),
            metadata_schema: "lake".into(),
            read_only: true,
            ..Default::default()
        };
        assert_eq!(
            attach_sql(&pg).unwrap(),
            "ATTACH IF NOT EXISTS 'ducklake:postgres:host=db password=it''s application_name=''pgbudget:lake''' AS lake \
             (DATA_PATH 's3://b/p/', METADATA_SCHEMA 'lake', READ_ONLY)"
        );
        assert_eq!(
            with_application_name("postgres://u@h/d?sslmode=disable"),
            "postgres://u@h/d?sslmode=disable&application_name=pgbudget%3Alake"
        );
        let s3 = S3Config {
            key_id: "k".into(),
            secret: "s".into(),
            region: "us-east-1".into(),
            endpoint: "127.0.0.1:9000".into(),
            url_style: "path".into(),
            use_ssl: false,
            scope: String::new(),
        };
        assert_eq!(
            s3_secret_sql(&s3),
            "CREATE OR REPLACE TEMPORARY SECRET pgbudget_lake_s3 (TYPE s3, KEY_ID 'k', SECRET 's', REGION 'us-east-1', \
             URL_STYLE 'path', USE_SSL false, ENDPOINT '127.0.0.1:9000')"
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("at \"host=h password=s3cr3t dbname=d\": refused; password='a b' x"),
            "at \"host=h password=*** dbname=d\": refused; password=*** x"
        );
        assert_eq!(redact("postgres://u:pw@h:5432/db and s3://b/p"), "postgres://u:***@h:5432/db and s3://b/p");
    }

    #[test]
    fn evolution_is_additive_only() {
        let spec = TableSpec::new("t", &[("a", ColumnType::BigInt), ("b", ColumnType::Varchar)]);
        let have = |cols: &[(&str, &str)]| cols.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
        assert_eq!(plan(&spec, &[]).unwrap(), Plan::Create);
        assert_eq!(
            plan(&spec, &have(&[("ts", "TIMESTAMP"), ("a", "BIGINT")])).unwrap(),
            Plan::AddColumns(vec![Column { name: "b".into(), ty: ColumnType::Varchar }])
        );
        let retype = plan(&spec, &have(&[("ts", "TIMESTAMP"), ("a", "VARCHAR")])).unwrap_err().to_string();
        assert!(retype.contains("retyping is refused"), "{retype}");
        let removed = plan(&spec, &have(&[("ts", "TIMESTAMP"), ("a", "BIGINT"), ("b", "VARCHAR"), ("c", "INTEGER")]))
            .unwrap_err();
        assert!(removed.to_string().contains("never removed"), "{removed}");
    }
}
