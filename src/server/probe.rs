//! The probe: one round trip that reads what a session holds — settings set in it, role, and state only
//! this backend has (LISTEN, temp tables and other temp objects, advisory locks, holdable cursors, SQL-level prepared statements) —
//! so the relay can follow a client's session state and pin the server while such state exists.

use super::{ServerConn, ServerError};
use crate::protocol::{self, ProtocolError};
use crate::telemetry::labels::PIN_REASONS;
use bytes::{Buf, BytesMut};
use std::time::Duration;

/// One row per fact: kind (`s` setting, `r` role, `p` pin reason, `q` protocol statement, `t`/`d` the
/// session's and the default `statement_timeout`), name, value. Every operator is schema-qualified and every
/// object `pg_catalog.`, so no `search_path` a client set can change what the probe reads. The probe runs
/// with `statement_timeout` off (a client's own tiny timeout must not cancel it), so that one setting is read
/// first, by the cheapest statement there is (a scan of `pg_settings` outlasts a 1 ms timeout on a busy
/// machine), and counts as set in the session when it differs from its reset value.
const PROBE_SQL: &str = "\
SELECT 't', 'statement_timeout', pg_catalog.current_setting('statement_timeout'); \
BEGIN; SET LOCAL statement_timeout = 0; \
SELECT CASE WHEN name OPERATOR(pg_catalog.=) 'statement_timeout' THEN 'd' ELSE 's' END, name, \
  CASE WHEN name OPERATOR(pg_catalog.=) 'statement_timeout' THEN reset_val ELSE setting END \
  FROM pg_catalog.pg_settings WHERE name OPERATOR(pg_catalog.=) 'statement_timeout' \
  OR source OPERATOR(pg_catalog.=) 'session' \
UNION ALL SELECT 'r', 'role', pg_catalog.current_setting('role') \
UNION ALL SELECT 'r', 'session_authorization', pg_catalog.current_setting('session_authorization') \
UNION ALL SELECT 'p', 'listen', NULL WHERE EXISTS (SELECT FROM pg_catalog.pg_listening_channels()) \
UNION ALL SELECT 'p', 'temp_table', NULL WHERE EXISTS \
  (SELECT FROM pg_catalog.pg_class WHERE relnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema()) \
  OR EXISTS (SELECT FROM pg_catalog.pg_type WHERE typnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema()) \
  OR EXISTS (SELECT FROM pg_catalog.pg_proc WHERE pronamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema()) \
  OR EXISTS (SELECT FROM pg_catalog.pg_operator \
    WHERE oprnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema()) \
UNION ALL SELECT 'p', 'advisory_lock', NULL WHERE EXISTS (SELECT FROM pg_catalog.pg_locks \
  WHERE locktype OPERATOR(pg_catalog.=) 'advisory' AND pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()) \
UNION ALL SELECT 'p', 'cursor', NULL WHERE EXISTS (SELECT FROM pg_catalog.pg_cursors WHERE is_holdable) \
UNION ALL SELECT 'p', 'sql_prepare', NULL WHERE EXISTS \
  (SELECT FROM pg_catalog.pg_prepared_statements WHERE from_sql) \
UNION ALL SELECT 'q', name, NULL FROM pg_catalog.pg_prepared_statements WHERE NOT from_sql; \
COMMIT";

/// Tries of the probe when a client's own `statement_timeout` cancels its first, tiny statement.
const PROBE_TRIES: usize = 3;

/// What the probe found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SessionProbe {
    /// Settings set in the session (`SET`, `set_config(.., false)`, the proxy's own replay), plus `role` and
    /// `session_authorization` when not at their defaults.
    pub settings: Vec<(String, String)>,
    /// Backend-only state present, as [`PIN_REASONS`] entries.
    pub pins: Vec<&'static str>,
    /// Names of protocol-level prepared statements.
    pub statements: Vec<String>,
}

impl ServerConn {
    /// Read the session's state (must be idle, outside a transaction).
    pub async fn probe(&mut self, timeout: Duration) -> Result<SessionProbe, ServerError> {
        let mut tries = 0;
        let rows = loop {
            tries += 1;
            match self.rows(PROBE_SQL, timeout).await {
                // A cancel (the client's own tiny statement_timeout, or a CancelRequest the client sent just
                // after its last reply) may land inside the probe's transaction block: end it, then retry.
                Err(ServerError::Postgres { code, .. })
                    if code == crate::protocol::sqlstate::QUERY_CANCELED && tries < PROBE_TRIES =>
                {
                    self.simple("ROLLBACK", timeout).await?;
                }
                Err(e @ ServerError::Postgres { .. }) => {
                    // The server is idle or in the probe's failed transaction block: end that, then report.
                    self.simple("ROLLBACK", timeout).await?;
                    return Err(e);
                }
                r => break r?,
            }
        };
        let mut p = SessionProbe::default();
        let (mut timeout_now, mut timeout_default) = (None, None);
        for row in rows {
            let [kind, name, value] = <[Option<String>; 3]>::try_from(row)
                .map_err(|_| ServerError::Protocol(ProtocolError::Malformed("probe row")))?;
            let (Some(kind), Some(name)) = (kind, name) else { continue };
            match (kind.as_str(), value) {
                ("s", Some(v)) => p.settings.push((name, v)),
                ("r", Some(v)) => {
                    let default = if name == "role" { "none" } else { self.login_user.as_str() };
                    if v != default {
                        p.settings.push((name, v));
                    }
                }
                ("p", _) => {
                    if let Some(r) = PIN_REASONS.iter().find(|r| **r == name) {
                        p.pins.push(r);
                    }
                }
                ("q", _) => p.statements.push(name),
                ("t", v) => timeout_now = v,
                ("d", v) => timeout_default = v,
                _ => {}
            }
        }
        // In pg_settings' unit (ms), as the other settings read from there are.
        let now = timeout_now.as_deref().and_then(millis);
        if now.is_some() && now != timeout_default.as_deref().and_then(|d| d.parse().ok()) {
            p.settings.push(("statement_timeout".into(), now.unwrap_or_default().to_string()));
        }
        Ok(p)
    }

    /// `DISCARD ALL`, and whether the backend keeps a temporary namespace (asked first, in the same round
    /// trip: DISCARD drops temp objects but not the namespace, and a backend that has one behaves unlike a new
    /// one — `pg_my_temp_schema()` is set, and `current_schema()` under `search_path = pg_temp` no longer
    /// creates it, so `PREPARE TRANSACTION` is allowed where on a new backend it is refused).
    pub async fn discard_all(&mut self, timeout: Duration) -> Result<bool, ServerError> {
        let mut out = BytesMut::with_capacity(96);
        protocol::simple_query(&mut out, "SELECT pg_catalog.pg_my_temp_schema() OPERATOR(pg_catalog.<>) 0");
        protocol::simple_query(&mut out, "DISCARD ALL");
        let mut rows = Vec::new();
        let asked = self.round_trip_rows(&out, timeout, Some(&mut rows)).await;
        if matches!(&asked, Err(e) if !matches!(e, ServerError::Postgres { .. })) {
            return asked.map(|()| false); // the stream is gone: the DISCARD's reply will not come
        }
        self.round_trip_rows(&[], timeout, None).await?;
        asked?;
        Ok(rows.first().and_then(|r| r.first()).is_some_and(|v| v.as_deref() == Some("t")))
    }

    /// Run one simple-protocol query and return its rows as text (NULL as `None`), within `timeout`.
    pub async fn rows(&mut self, sql: &str, timeout: Duration) -> Result<Vec<Vec<Option<String>>>, ServerError> {
        let mut out = BytesMut::with_capacity(sql.len() + 8);
        protocol::simple_query(&mut out, sql);
        let mut rows = Vec::new();
        self.round_trip_rows(&out, timeout, Some(&mut rows)).await?;
        Ok(rows)
    }
}

/// A time setting as `current_setting` shows it (`0`, `250ms`, `30s`, `5min`, `1h`, `1d`) in milliseconds.
fn millis(shown: &str) -> Option<u64> {
    let split = shown.find(|c: char| !c.is_ascii_digit()).unwrap_or(shown.len());
    let n: u64 = shown[..split].parse().ok()?;
    let unit = match &shown[split..] {
        "" | "ms" => 1,
        "s" => 1_000,
        "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(unit)
}

#[cfg(test)]
#[test]
fn time_settings_are_read_in_milliseconds() {
    let got: Vec<_> = ["0", "1ms", "30s", "5min", "2h", "1d", "1.5s", "x"].iter().map(|s| millis(s)).collect();
    assert_eq!(got, [Some(0), Some(1), Some(30_000), Some(300_000), Some(7_200_000), Some(86_400_000), None, None]);
}

/// The text columns of a DataRow body.
pub(super) fn data_row(body: &[u8]) -> Result<Vec<Option<String>>, ServerError> {
    let bad = || ServerError::Protocol(ProtocolError::Malformed("DataRow"));
    let mut b = body;
    if b.len() < 2 {
        return Err(bad());
    }
    let n = b.get_i16();
    let mut cols = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        if b.len() < 4 {
            return Err(bad());
        }
        let len = b.get_i32();
        if len < 0 {
            cols.push(None);
            continue;
        }
        let len = len as usize;
        if b.len() < len {
            return Err(bad());
        }
        cols.push(Some(String::from_utf8_lossy(&b[..len]).into_owned()));
        b.advance(len);
    }
    Ok(cols)
}
