//! Rows into DuckDB: borrowed cells for the appender and query parameters, and one table's batch written in
//! one transaction (one DuckLake snapshot).

use super::super::catalog::{rollback, ALIAS, SCHEMA};
use super::super::registry::{ColumnType, Row, TableSpec, Value};
use super::super::LakeError;
use duckdb::types::{TimeUnit, ToSql, ToSqlOutput, ValueRef};
use duckdb::{appender_params_from_iter, Connection};
use std::collections::VecDeque;

/// Borrowed cell for the appender: no copy of text values.
struct Cell<'a>(&'a Value, ColumnType);

impl ToSql for Cell<'_> {
    fn to_sql(&self) -> duckdb::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match (self.0, self.1) {
            (Value::Null, _) => ValueRef::Null,
            (Value::Bool(b), _) => ValueRef::Boolean(*b),
            (Value::Int(i), ColumnType::Integer) => ValueRef::Int(*i as i32), // range checked at append
            (Value::Int(i), ColumnType::Double) => ValueRef::Double(*i as f64),
            (Value::Int(i), _) => ValueRef::BigInt(*i),
            (Value::Float(f), _) => ValueRef::Double(*f),
            (Value::Text(s), _) => ValueRef::Text(s.as_bytes()),
            (Value::Ts(us), _) => ValueRef::Timestamp(TimeUnit::Microsecond, *us),
        }))
    }
}

/// Bind a [`Value`] as a query parameter (its natural DuckDB type).
pub(crate) fn param(v: &Value) -> impl ToSql + '_ {
    let ty = match v {
        Value::Float(_) => ColumnType::Double,
        _ => ColumnType::BigInt,
    };
    Cell(v, ty)
}

/// Write `rows` into `spec`'s table in one transaction (one DuckLake snapshot). Naming the columns keeps
/// working after another process added columns; on any error the transaction is rolled back, so a partly
/// appended batch never lands.
pub(super) fn write_table(conn: &Connection, spec: &TableSpec, rows: &VecDeque<Row>) -> Result<(), LakeError> {
    conn.execute_batch("BEGIN TRANSACTION")?;
    let r = (|| {
        let cols = spec.column_names();
        let mut app = conn.appender_with_columns_to_catalog_and_db(&spec.name, ALIAS, SCHEMA, &cols)?;
        for row in rows {
            app.append_row(appender_params_from_iter(row.iter().zip(&spec.columns).map(|(v, c)| Cell(v, c.ty))))?;
        }
        app.flush()?;
        drop(app);
        conn.execute_batch("COMMIT")
    })();
    if r.is_err() {
        rollback(conn);
    }
    Ok(r?)
}
