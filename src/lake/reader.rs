//! The lake reader: one connection behind a lock, parameter-bound SELECTs returned as JSON rows (timestamps as
//! ISO-8601 UTC strings) with a row limit. When a query fails and a cheap catalog probe fails too, it
//! re-attaches (CREATE TABLE IF NOT EXISTS for every registered table) and runs the query once more.

use super::catalog::{rollback, Catalog, ALIAS};
use super::registry::Value;
use super::writer::param;
use super::LakeError;
use duckdb::types::{TimeUnit, ValueRef};
use duckdb::{params_from_iter, Connection};
use serde::Serialize;
use serde_json::{Map, Value as Json};
use std::sync::{Arc, Mutex};
use tracing::warn;

/// Rows of one query; `truncated` when the limit cut it short.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QueryResult {
    pub columns: Vec<String>,
    pub rows: Vec<Map<String, Json>>,
    pub truncated: bool,
}

struct State {
    conn: Connection,
    /// The catalog generation this connection last worked under.
    seen: u64,
}

pub struct LakeReader {
    state: Mutex<State>,
    /// Stops the statement running on the reader's connection (a query past its deadline).
    interrupt: Arc<duckdb::InterruptHandle>,
    catalog: Arc<Catalog>,
    max_rows: usize,
}

impl LakeReader {
    pub fn new(conn: Connection, catalog: Arc<Catalog>) -> LakeReader {
        let max_rows = catalog.config().max_rows;
        let interrupt = conn.interrupt_handle();
        LakeReader { state: Mutex::new(State { conn, seen: catalog.generation() }), interrupt, catalog, max_rows }
    }

    /// Interrupt what runs on the reader's connection now (it fails with an interrupt error and lets go of
    /// the lock); a no-op when nothing runs.
    pub fn interrupt(&self) {
        self.interrupt.interrupt();
    }

    /// The row limit (capped by `max_rows`) and `sql` wrapped as a subquery fetching one row more, so a cut is
    /// seen.
    fn wrap(&self, sql: &str, limit: usize) -> (usize, String) {
        let limit = limit.clamp(1, self.max_rows);
        let body = sql.trim().trim_end_matches(';');
        (limit, format!("SELECT * FROM ({body}\n) AS q LIMIT {}", limit + 1))
    }

    /// The reader's state with the catalog attached (re-attached first if it was not).
    fn attached_state(&self) -> Result<std::sync::MutexGuard<'_, State>, LakeError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !self.catalog.is_attached() {
            self.heal(&mut st)?;
        }
        Ok(st)
    }

    /// Run one SELECT (`?` placeholders bound to `params`) and return at most `limit` rows (capped by
    /// `max_rows`). The query is wrapped as a subquery, so only a single query statement is accepted.
    pub fn query(&self, sql: &str, params: &[Value], limit: usize) -> Result<QueryResult, LakeError> {
        let (limit, wrapped) = self.wrap(sql, limit);
        let mut st = self.attached_state()?;
        let first = {
            let _using = self.catalog.using();
            match run(&st.conn, &wrapped, params, limit) {
                Ok(r) => return Ok(r),
                Err(e) if self.probe(&st.conn) => return Err(e), // the catalog answers: the query itself is wrong
                Err(e) => e,
            }
        };
        warn!(cause = %first, "lake reader: query failed and the catalog does not answer, re-attaching");
        self.heal(&mut st)?;
        let _using = self.catalog.using();
        run(&st.conn, &wrapped, params, limit)
    }

    /// [`query`](Self::query) with bare table names resolving in the lake (as `pgbudget lake query` has them):
    /// the connection's default database is the lake for this one statement. A failure is returned as it is
    /// (no re-attach while the lake is the default database).
    pub fn query_in_lake(&self, sql: &str, params: &[Value], limit: usize) -> Result<QueryResult, LakeError> {
        let (limit, wrapped) = self.wrap(sql, limit);
        let st = self.attached_state()?;
        let _using = self.catalog.using();
        let home: String = st.conn.query_row("SELECT current_database()", [], |r| r.get(0))?;
        st.conn.execute_batch(&format!("USE {ALIAS}"))?;
        let r = run(&st.conn, &wrapped, params, limit);
        rollback(&st.conn);
        st.conn.execute_batch(&format!("USE {}", super::catalog::ident(&home)))?;
        r
    }

    /// Run `f` on the reader's connection under its lock: maintenance (`CHECKPOINT lake`) and tests. With a
    /// read-only lake, writes through it fail (the catalog is attached READ_ONLY).
    pub fn with_conn<T>(&self, f: impl FnOnce(&Connection) -> Result<T, LakeError>) -> Result<T, LakeError> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let _using = self.catalog.using();
        f(&st.conn)
    }

    /// Re-attach now (e.g. after the catalog database came back).
    pub fn reattach(&self) -> Result<(), LakeError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.heal(&mut st)
    }

    fn heal(&self, st: &mut State) -> Result<(), LakeError> {
        let detach = self.catalog.is_attached();
        st.seen = self.catalog.attach(&st.conn, st.seen, detach)?;
        Ok(())
    }

    /// Does the catalog answer a metadata read?
    fn probe(&self, conn: &Connection) -> bool {
        rollback(conn);
        conn.query_row("SELECT count(*) FROM duckdb_tables() WHERE database_name = ?", [ALIAS], |r| r.get::<_, i64>(0))
            .is_ok()
    }
}

fn run(conn: &Connection, sql: &str, params: &[Value], limit: usize) -> Result<QueryResult, LakeError> {
    let mut stmt = conn.prepare(sql)?;
    let mut rows = stmt.query(params_from_iter(params.iter().map(param)))?;
    let columns: Vec<String> = rows.as_ref().map(|s| s.column_names()).unwrap_or_default();
    let mut out = Vec::new();
    let mut truncated = false;
    while let Some(row) = rows.next()? {
        if out.len() == limit {
            truncated = true;
            break;
        }
        let mut obj = Map::with_capacity(columns.len());
        for (i, name) in columns.iter().enumerate() {
            obj.insert(name.clone(), to_json(row.get_ref(i)?));
        }
        out.push(obj);
    }
    Ok(QueryResult { columns, rows: out, truncated })
}

fn num(f: f64) -> Json {
    serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number)
}

/// One DuckDB value as JSON; types without a natural JSON form become strings.
pub fn to_json(v: ValueRef<'_>) -> Json {
    match v {
        ValueRef::Null => Json::Null,
        ValueRef::Boolean(b) => Json::Bool(b),
        ValueRef::TinyInt(i) => i.into(),
        ValueRef::SmallInt(i) => i.into(),
        ValueRef::Int(i) => i.into(),
        ValueRef::BigInt(i) => i.into(),
        ValueRef::UTinyInt(i) => i.into(),
        ValueRef::USmallInt(i) => i.into(),
        ValueRef::UInt(i) => i.into(),
        ValueRef::UBigInt(i) => i.into(),
        ValueRef::HugeInt(i) => i64::try_from(i).map_or_else(|_| Json::String(i.to_string()), Json::from),
        ValueRef::UHugeInt(i) => u64::try_from(i).map_or_else(|_| Json::String(i.to_string()), Json::from),
        ValueRef::Float(f) => num(f.into()),
        ValueRef::Double(f) => num(f),
        ValueRef::Decimal(d) => d.to_string().parse::<f64>().map_or(Json::Null, num),
        ValueRef::Timestamp(unit, t) => Json::String(iso_micros(unit.to_micros(t))),
        ValueRef::Date32(days) => Json::String(date(i64::from(days))),
        ValueRef::Time64(unit, t) => Json::String(time_of_day(unit.to_micros(t))),
        ValueRef::Text(b) => Json::String(String::from_utf8_lossy(b).into_owned()),
        ValueRef::Blob(b) | ValueRef::Geometry(b) => Json::String(b.iter().map(|x| format!("{x:02x}")).collect()),
        ValueRef::Interval { months, days, nanos } => {
            Json::String(format!("P{months}M{days}DT{}S", nanos as f64 / 1e9))
        }
        other => Json::String(format!("<{:?}>", other.data_type())),
    }
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm; proleptic Gregorian).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn date(days: i64) -> String {
    let (y, m, d) = civil(days);
    format!("{y:04}-{m:02}-{d:02}")
}

fn time_of_day(micros: i64) -> String {
    let s = micros.div_euclid(1_000_000);
    let us = micros.rem_euclid(1_000_000);
    format!("{:02}:{:02}:{:02}.{us:06}", s / 3600 % 24, s / 60 % 60, s % 60)
}

/// `2026-01-31T23:59:59.123456Z` from microseconds since the epoch (UTC).
pub fn iso_micros(micros: i64) -> String {
    let day = micros.div_euclid(86_400_000_000);
    format!("{}T{}Z", date(day), time_of_day(micros.rem_euclid(86_400_000_000)))
}

/// Kept for callers that hold a [`TimeUnit`] and a raw value.
pub fn iso(unit: TimeUnit, value: i64) -> String {
    iso_micros(unit.to_micros(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_timestamps() {
        assert_eq!(iso_micros(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(iso_micros(1_767_225_599_123_456), "2025-12-31T23:59:59.123456Z");
        assert_eq!(iso_micros(951_782_400_000_000), "2000-02-29T00:00:00.000000Z");
        assert_eq!(iso_micros(-1), "1969-12-31T23:59:59.999999Z");
        assert_eq!(iso(TimeUnit::Second, 1_798_761_600), "2027-01-01T00:00:00.000000Z");
    }
}
