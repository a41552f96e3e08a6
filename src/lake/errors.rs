//! The error journal across restarts: the lake's `server_errors` rows of the last window read back into the
//! ring at startup, so `/errors` and `/errors/health` answer right after a deploy.

use super::registry::Value;
use super::{Lake, LakeError, LakeReader};
use crate::telemetry::journal::{self, ErrorRecord, Journal};
use serde_json::Value as Json;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Upstream-side rows since `?` (a UTC timestamp), newest first. Rows an older pgbudget wrote for refusals
/// or query errors are left out; `server_error` rows are classified again by their SQLSTATE.
pub const RECENT_SQL: &str = "\
SELECT epoch_us(ts) AS us, service, route, upstream, kind, sqlstate, message
FROM lake.main.server_errors
WHERE ts >= ? AND kind IN ('connect', 'server_error', 'reset')
ORDER BY ts DESC";

/// The `server_errors` rows of the last `window` as journal records (at most [`journal::CAPACITY`]).
pub fn recent(reader: &LakeReader, window: Duration) -> Result<Vec<ErrorRecord>, LakeError> {
    let since = Value::at(SystemTime::now().checked_sub(window).unwrap_or(SystemTime::UNIX_EPOCH));
    let r = reader.query(RECENT_SQL, &[since], journal::CAPACITY)?;
    Ok(r.rows.iter().filter_map(record).collect())
}

fn record(m: &serde_json::Map<String, Json>) -> Option<ErrorRecord> {
    let text = |c: &str| m.get(c).and_then(Json::as_str).unwrap_or_default().to_owned();
    let sqlstate = text("sqlstate");
    let kind = match journal::known_kind(m.get("kind")?.as_str()?)? {
        "server_error" => journal::kind_for_sqlstate(&sqlstate),
        k => k,
    };
    Some(ErrorRecord {
        time: m.get("us")?.as_i64()? as f64 / 1e6,
        service: text("service"),
        route: text("route"),
        upstream: text("upstream"),
        kind,
        sqlstate,
        message: text("message"),
    })
}

/// Refill `journal` from the lake within `deadline` (a slow catalog is interrupted, never waited on); returns
/// how many records were taken.
pub async fn refill(
    journal: &Journal,
    lake: Arc<Lake>,
    window: Duration,
    deadline: Duration,
) -> Result<usize, LakeError> {
    let reader = lake.clone();
    let read = tokio::task::spawn_blocking(move || recent(reader.reader(), window));
    match tokio::time::timeout(deadline, read).await {
        Ok(Ok(rows)) => Ok(journal.refill(rows?)),
        Ok(Err(join)) => Err(LakeError::NotAttached(format!("refill task failed: {join}"))),
        Err(_) => {
            lake.reader().interrupt();
            Err(LakeError::Timeout(deadline))
        }
    }
}
