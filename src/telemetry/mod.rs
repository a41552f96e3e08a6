//! Telemetry rows for the lake: the cell and row types and the built-in table ids (compiled with or without the
//! `lake` feature), and the sink the proxy emits to ([`Sink`]). It writes to the DuckLake writer when the feature
//! is built and `[lake] enabled = true`; otherwise `emit` does nothing and never builds the row.
//! Submodules: `metrics` (the Prometheus registry and gauges), `labels` (their fixed label values), `journal`
//! (the ring of recent server errors), `redact` (literals out of error texts), `high_water` (a pool's peaks
//! between two lake snapshots) and, with the `lake` feature, `registry` (the lake's tables and their columns,
//! which `[lake]` validation also applies).

pub mod high_water;
pub mod journal;
pub mod labels;
pub mod metrics;
pub mod redact;
#[cfg(feature = "lake")]
pub mod registry;

use std::time::{SystemTime, UNIX_EPOCH};

/// One cell of a row. Timestamps are microseconds since the Unix epoch, UTC.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    Ts(i64),
}

/// One row, in the table's column order.
pub type Row = Vec<Value>;

impl Value {
    /// The current time as a `ts` value.
    pub fn now() -> Value {
        Value::at(SystemTime::now())
    }

    /// A point in time as a `ts` value (times before 1970 are negative microseconds).
    pub fn at(t: SystemTime) -> Value {
        Value::Ts(match t.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
        })
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Value::Int(v.into())
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(v.into())
    }
}
impl From<u64> for Value {
    /// Saturates at `i64::MAX` (counters never get there).
    fn from(v: u64) -> Self {
        Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}
impl From<SystemTime> for Value {
    fn from(v: SystemTime) -> Self {
        Value::at(v)
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// Index of a table in its lake registry; resolve once, append many times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TableId(pub u16);

/// The built-in pgbudget tables, in the lake's built-in registry order.
pub mod tables {
    use super::TableId;
    pub const POOL_SNAPSHOTS: TableId = TableId(0);
    pub const ADMISSION_DECISIONS: TableId = TableId(1);
    pub const CHECKOUT_TIMEOUTS: TableId = TableId(2);
    pub const RO_VIOLATIONS: TableId = TableId(3);
    pub const SERVER_ERRORS: TableId = TableId(4);
    pub const CONFIG_RELOADS: TableId = TableId(5);
    pub const CLIENT_SESSIONS: TableId = TableId(6);
}

/// Where [`Telemetry::emit`] writes rows: the lake's writer (`lake::Lake` implements it; telemetry, below the
/// lake, never names it).
pub trait Sink: Send + Sync {
    /// Whether rows are written in this process (a lake attached read-only writes none).
    fn writes(&self) -> bool;
    /// Append one row; never blocks, never fails.
    fn append(&self, table: TableId, row: Row);
}

/// Where the proxy's telemetry rows go (cheap to clone).
#[derive(Clone, Default)]
pub struct Telemetry {
    #[cfg(feature = "lake")]
    sink: Option<std::sync::Arc<dyn Sink>>,
}

impl Telemetry {
    #[cfg(feature = "lake")]
    pub fn new(sink: Option<std::sync::Arc<dyn Sink>>) -> Telemetry {
        Telemetry { sink }
    }

    pub fn enabled(&self) -> bool {
        #[cfg(feature = "lake")]
        return self.sink.as_ref().is_some_and(|s| s.writes());
        #[cfg(not(feature = "lake"))]
        false
    }

    /// Append one row (built only when the lake is on); never blocks, never fails.
    #[inline]
    pub fn emit(&self, table: TableId, row: impl FnOnce() -> Row) {
        #[cfg(feature = "lake")]
        if let Some(s) = self.sink.as_ref().filter(|s| s.writes()) {
            s.append(table, row());
        }
        #[cfg(not(feature = "lake"))]
        let _ = (table, row);
    }
}
