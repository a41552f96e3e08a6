//! The lake's tables and their columns: the one source of truth for CREATE TABLE, ADD COLUMN, appends and
//! row validation. Every table starts with `ts TIMESTAMP` (UTC) and is partitioned by `(year(ts), month(ts))`.

use std::borrow::Cow;

/// A table list that breaks the registry's rules (the lake reports it as `LakeError::Registry`).
#[derive(Debug, thiserror::Error)]
#[error("lake registry: {0}")]
pub struct RegistryError(pub String);

/// The DuckDB types a lake column may have (all nullable; evolution is additive only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// UTC timestamp, microsecond precision.
    Timestamp,
    BigInt,
    Integer,
    Double,
    Boolean,
    Varchar,
}

impl ColumnType {
    /// Parse a type name as written in `[[lake.tables]]` (case-insensitive).
    pub fn parse(s: &str) -> Option<ColumnType> {
        Some(match s.to_ascii_uppercase().as_str() {
            "TIMESTAMP" => ColumnType::Timestamp,
            "BIGINT" => ColumnType::BigInt,
            "INTEGER" => ColumnType::Integer,
            "DOUBLE" => ColumnType::Double,
            "BOOLEAN" => ColumnType::Boolean,
            "VARCHAR" => ColumnType::Varchar,
            _ => return None,
        })
    }

    /// The DuckDB type name, as written in DDL and as `duckdb_columns().data_type` reports it.
    pub fn sql(self) -> &'static str {
        match self {
            ColumnType::Timestamp => "TIMESTAMP",
            ColumnType::BigInt => "BIGINT",
            ColumnType::Integer => "INTEGER",
            ColumnType::Double => "DOUBLE",
            ColumnType::Boolean => "BOOLEAN",
            ColumnType::Varchar => "VARCHAR",
        }
    }

    /// Whether `v` can be stored in a column of this type without loss (NULL fits everywhere).
    pub fn accepts(self, v: &Value) -> bool {
        match (self, v) {
            (_, Value::Null) => true,
            (ColumnType::Timestamp, Value::Ts(_)) => true,
            (ColumnType::BigInt, Value::Int(_)) => true,
            (ColumnType::Integer, Value::Int(i)) => i32::try_from(*i).is_ok(),
            (ColumnType::Double, Value::Float(_) | Value::Int(_)) => true,
            (ColumnType::Boolean, Value::Bool(_)) => true,
            (ColumnType::Varchar, Value::Text(_)) => true,
            _ => false,
        }
    }
}

pub use crate::telemetry::{tables, Row, TableId, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: Cow<'static, str>,
    pub ty: ColumnType,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    pub name: Cow<'static, str>,
    pub columns: Vec<Column>,
}

impl TableSpec {
    /// A table whose first column is `ts TIMESTAMP`, followed by `columns`.
    pub fn new(name: impl Into<Cow<'static, str>>, columns: &[(&'static str, ColumnType)]) -> TableSpec {
        let mut cols = vec![Column { name: "ts".into(), ty: ColumnType::Timestamp }];
        cols.extend(columns.iter().map(|&(n, ty)| Column { name: n.into(), ty }));
        TableSpec { name: name.into(), columns: cols }
    }

    pub fn column_names(&self) -> Vec<&str> {
        self.columns.iter().map(|c| c.name.as_ref()).collect()
    }

    /// Whether `row` has this table's arity and every value fits its column.
    pub fn accepts(&self, row: &[Value]) -> bool {
        row.len() == self.columns.len() && self.columns.iter().zip(row).all(|(c, v)| c.ty.accepts(v))
    }
}

/// Column names DuckLake rejects while data inlining is on (`ducklake_util.cpp`), plus its internal prefix.
const RESERVED: [&str; 3] = ["row_id", "begin_snapshot", "end_snapshot"];

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
        && s.len() <= 63
}

#[derive(Debug, Clone)]
pub struct Registry {
    pub(crate) tables: Vec<TableSpec>,
}

impl Registry {
    /// Check names (lower-case identifiers, unique, not reserved) and the leading `ts TIMESTAMP` column.
    pub fn new(tables: Vec<TableSpec>) -> Result<Registry, RegistryError> {
        let bad = |why: String| Err(RegistryError(why));
        if tables.len() > usize::from(u16::MAX) {
            return bad("too many tables".into());
        }
        for (i, t) in tables.iter().enumerate() {
            if !is_identifier(&t.name) {
                return bad(format!("table name {:?} is not a lower-case identifier", t.name));
            }
            if tables[..i].iter().any(|o| o.name == t.name) {
                return bad(format!("table {} is listed twice", t.name));
            }
            match t.columns.first() {
                Some(c) if c.name == "ts" && c.ty == ColumnType::Timestamp => {}
                _ => return bad(format!("table {}: the first column must be `ts TIMESTAMP`", t.name)),
            }
            for (j, c) in t.columns.iter().enumerate() {
                if !is_identifier(&c.name) || RESERVED.contains(&c.name.as_ref()) || c.name.starts_with("_ducklake") {
                    return bad(format!("table {}: column name {:?} is not allowed", t.name, c.name));
                }
                if t.columns[..j].iter().any(|o| o.name == c.name) {
                    return bad(format!("table {}: column {} is listed twice", t.name, c.name));
                }
            }
        }
        Ok(Registry { tables })
    }

    /// The pgbudget tables (see [`tables`] for their ids).
    pub fn builtin() -> Registry {
        use ColumnType::*;
        let t = |name: &'static str, cols: &[(&'static str, ColumnType)]| TableSpec::new(name, cols);
        let tables = vec![
            t(
                "pool_snapshots",
                &[
                    ("service", Varchar),
                    ("route", Varchar),
                    ("upstream", Varchar),
                    ("pool_mode", Varchar),
                    ("share", Integer),
                    ("size", Integer),
                    ("available", Integer),
                    ("in_use", Integer),
                    ("waiting", Integer),
                    ("checkout_timeouts", BigInt),
                    ("transactions", BigInt),
                    ("queries", BigInt),
                    ("upstream_open", Integer),
                    ("upstream_ceiling", Integer),
                    ("clients", Integer),
                    // High-water marks since the previous row (added later: NULL in older rows).
                    ("max_in_use", Integer),
                    ("max_waiting", Integer),
                    ("max_wait_ms", Double),
                    ("waited_checkouts", BigInt),
                    // One row per pool: the database its servers log in to and as which role (added later).
                    ("database", Varchar),
                    ("role", Varchar),
                ],
            ),
            t(
                "admission_decisions",
                &[
                    ("service", Varchar),
                    ("route", Varchar),
                    ("user_name", Varchar),
                    ("database", Varchar),
                    ("client_addr", Varchar),
                    ("accepted", Boolean),
                    ("reason", Varchar),
                    ("wait_ms", Double),
                ],
            ),
            t(
                "checkout_timeouts",
                &[
                    ("service", Varchar),
                    ("route", Varchar),
                    ("upstream", Varchar),
                    ("waited_ms", Double),
                    ("share", Integer),
                    ("size", Integer),
                    ("waiting", Integer),
                ],
            ),
            t(
                "ro_violations",
                &[
                    ("service", Varchar),
                    ("route", Varchar),
                    ("client_addr", Varchar),
                    ("reason", Varchar),
                    ("fingerprint", Varchar),
                ],
            ),
            t(
                "server_errors",
                &[
                    ("service", Varchar),
                    ("route", Varchar),
                    ("upstream", Varchar),
                    ("kind", Varchar),
                    ("sqlstate", Varchar),
                    ("message", Varchar),
                ],
            ),
            t(
                "config_reloads",
                &[("outcome", Varchar), ("config_hash", Varchar), ("violations", Integer), ("message", Varchar)],
            ),
            t(
                "client_sessions",
                &[
                    ("session_id", BigInt),
                    ("service", Varchar),
                    ("user_name", Varchar),
                    ("database", Varchar),
                    ("application_name", Varchar),
                    ("client_addr", Varchar),
                    ("started_at", Timestamp),
                    ("duration_ms", Double),
                    ("transactions", BigInt),
                    ("queries", BigInt),
                    ("bytes_in", BigInt),
                    ("bytes_out", BigInt),
                    ("end_reason", Varchar),
                ],
            ),
        ];
        Registry::new(tables).expect("the built-in registry is valid")
    }

    pub fn tables(&self) -> &[TableSpec] {
        &self.tables
    }

    pub fn id(&self, name: &str) -> Option<TableId> {
        self.tables.iter().position(|t| t.name == name).map(|i| TableId(i as u16))
    }

    pub fn get(&self, id: TableId) -> Option<&TableSpec> {
        self.tables.get(usize::from(id.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_ids_match_names_and_validate_rows() {
        let r = Registry::builtin();
        for (id, name) in [
            (tables::POOL_SNAPSHOTS, "pool_snapshots"),
            (tables::ADMISSION_DECISIONS, "admission_decisions"),
            (tables::CHECKOUT_TIMEOUTS, "checkout_timeouts"),
            (tables::RO_VIOLATIONS, "ro_violations"),
            (tables::SERVER_ERRORS, "server_errors"),
            (tables::CONFIG_RELOADS, "config_reloads"),
            (tables::CLIENT_SESSIONS, "client_sessions"),
        ] {
            assert_eq!(r.get(id).map(|t| t.name.as_ref()), Some(name));
            assert_eq!(r.id(name), Some(id));
        }
        let t = r.get(tables::CONFIG_RELOADS).unwrap();
        assert!(t.accepts(&[Value::now(), "ok".into(), Value::Null, 0i64.into(), "".into()]));
        assert!(!t.accepts(&[Value::now(), "ok".into(), Value::Null, 0i64.into()]), "arity");
        assert!(!t.accepts(&[Value::now(), 1i64.into(), Value::Null, 0i64.into(), "".into()]), "type");
        assert!(!t.accepts(&[Value::now(), "ok".into(), Value::Null, (1i64 << 40).into(), "".into()]), "INTEGER range");
    }

    #[test]
    fn registry_refuses_bad_names_and_missing_ts() {
        let ok = TableSpec::new("t", &[("a", ColumnType::BigInt)]);
        assert!(Registry::new(vec![ok.clone()]).is_ok());
        assert!(Registry::new(vec![ok.clone(), ok.clone()]).is_err(), "duplicate table");
        assert!(Registry::new(vec![TableSpec::new("T", &[])]).is_err(), "upper case");
        assert!(Registry::new(vec![TableSpec::new("t", &[("row_id", ColumnType::BigInt)])]).is_err(), "reserved");
        assert!(Registry::new(vec![TableSpec::new("t", &[("ts", ColumnType::BigInt)])]).is_err(), "twice");
        let no_ts = TableSpec { name: "t".into(), columns: vec![] };
        assert!(Registry::new(vec![no_ts]).is_err());
    }

    #[test]
    fn timestamps_are_utc_micros() {
        assert_eq!(Value::at(std::time::UNIX_EPOCH + std::time::Duration::from_millis(1500)), Value::Ts(1_500_000));
        assert_eq!(Value::at(std::time::UNIX_EPOCH - std::time::Duration::from_secs(1)), Value::Ts(-1_000_000));
    }
}
