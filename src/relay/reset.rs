//! Server-side cleanup: bring a connection a client abandoned back to idle (finish what was framed, end COPY,
//! close the batch, cancel, drain, roll back, reset), and the settings diff that matches a server to a client.

use crate::relay::pump::{Pump, BUF};
use crate::server::settings::Settings;
use crate::server::{ServerConn, ServerError};
use bytes::BytesMut;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

/// How long an abandoned statement may run before it is cancelled.
const CANCEL_AFTER: Duration = Duration::from_millis(200);

/// Why a connection cannot be cleaned up and must be closed.
fn unprovable(what: &'static str) -> ServerError {
    ServerError::Protocol(crate::protocol::ProtocolError::Malformed(what))
}

/// What a cleaned-up server is good for.
#[derive(Debug, PartialEq, Eq)]
pub enum Cleaned {
    /// Idle and reset: the next client may have it.
    Reusable,
    /// Idle and reset, but it keeps a temporary namespace no reset removes: close it (with a Terminate).
    Retire,
}

/// Bring a server abandoned mid-conversation back to idle: send what was framed, end COPY, close the extended
/// batch, cancel what still runs, drain replies, roll back, and (session mode) reset session state. A server
/// whose state the relay cannot prove is refused (the caller discards it).
pub async fn cleanup(
    conn: &mut ServerConn,
    pump: &mut Pump,
    reset: bool,
    read_only: bool,
) -> Result<Cleaned, ServerError> {
    if pump.mid_message() {
        return Err(unprovable("client left in the middle of a message"));
    }
    let mut out = BytesMut::from(pump.unsent());
    if pump.tx.copy_in() {
        let at = crate::protocol::begin(&mut out, b'f');
        crate::protocol::put_cstr(&mut out, "client disconnected");
        crate::protocol::finish(&mut out, at);
        pump.tx.client(b'f', None);
        crate::protocol::sync(&mut out);
        pump.tx.client(b'S', None);
    } else if pump.tx.needs_sync() {
        crate::protocol::sync(&mut out);
        pump.tx.client(b'S', None);
    }
    pump.discard_unsent();
    if !out.is_empty() {
        conn.stream.write_all(&out).await.map_err(ServerError::Io)?;
    }
    let mut buf = BytesMut::with_capacity(BUF);
    let mut cancelled = false;
    let started = Instant::now();
    while !pump.tx.settled() {
        if pump.tx.uncertain() || pump.tx.fatal() {
            return Err(unprovable("server state cannot be proven idle"));
        }
        let wait = if cancelled { Duration::from_secs(3600) } else { CANCEL_AFTER };
        match tokio::time::timeout(wait, conn.stream.read_buf(&mut buf)).await {
            Ok(Ok(0)) => return Err(ServerError::Closed),
            Ok(Err(e)) => return Err(ServerError::Io(e)),
            Ok(Ok(_)) => {
                pump.absorb_server(&buf).map_err(|_| unprovable("server stream"))?;
                buf.clear();
            }
            Err(_) => {
                crate::server::send_cancel(&conn.cancel, conn.pid, conn.secret, Duration::from_secs(2))
                    .await
                    .map_err(ServerError::Connect)?;
                cancelled = true;
                debug!(waited = ?started.elapsed(), "cancelled abandoned query");
            }
        }
    }
    if !pump.server_at_boundary() {
        return Err(unprovable("server stopped in the middle of a message"));
    }
    let timeout = Duration::from_secs(5);
    if pump.tx.status() != b'I' {
        conn.simple("ROLLBACK", timeout).await?;
    }
    if reset {
        if conn.discard_all(timeout).await? {
            return Ok(Cleaned::Retire);
        }
        conn.applied = Settings::default();
        conn.statements.clear();
        if read_only {
            conn.enforce_read_only(timeout).await?;
        }
    }
    Ok(Cleaned::Reusable)
}

/// Whether `applied` already is `desired` (no allocation, and a pointer comparison when both are the pool's
/// shared set: the check of every checkout).
pub fn settings_match(applied: &Settings, desired: &Settings) -> bool {
    crate::server::settings::same(applied, desired)
}

/// What to change on a server so its proxy-applied settings equal the client's: (set, reset). The order the
/// server runs them in is [`crate::server::ServerConn::apply_settings`]'s.
pub fn settings_diff(
    applied: &BTreeMap<String, String>,
    desired: &BTreeMap<String, String>,
) -> (Vec<(String, String)>, Vec<String>) {
    let set = desired.iter().filter(|(k, v)| applied.get(*k) != Some(v)).map(|(k, v)| (k.clone(), v.clone())).collect();
    let reset = applied.keys().filter(|k| !desired.contains_key(*k)).cloned().collect();
    (set, reset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_sets_changed_and_resets_dropped() {
        let applied: BTreeMap<String, String> =
            [("TimeZone", "UTC"), ("search_path", "a")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let desired: BTreeMap<String, String> =
            [("TimeZone", "UTC"), ("DateStyle", "ISO")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let (set, reset) = settings_diff(&applied, &desired);
        assert_eq!(set, vec![("DateStyle".to_string(), "ISO".to_string())]);
        assert_eq!(reset, vec!["search_path"]);
        let (set, reset) = settings_diff(&desired.clone().into_iter().collect(), &desired);
        assert!(set.is_empty() && reset.is_empty());
    }
}
