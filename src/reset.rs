//! Server-side cleanup: bring a connection a client abandoned back to idle (end COPY, close the batch, cancel,
//! drain, roll back, reset), and the SET/RESET statements that match a server's settings to a client's.

use crate::protocol::{self, ProtocolError, Scanner};
use crate::relay::{scan_server, Seen, TxState, BUF};
use crate::server::{ServerConn, ServerError};
use bytes::BytesMut;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

/// Bring a server abandoned mid-conversation back to idle: end COPY, close the extended batch, cancel
/// what still runs, drain replies, roll back, and (session mode) reset session state.
pub async fn cleanup(
    conn: &mut ServerConn,
    mut st: TxState,
    sscan: &mut Scanner,
    reset: bool,
    read_only: bool,
) -> Result<(), ServerError> {
    let mut out = BytesMut::new();
    if st.copy_in {
        let at = protocol::begin(&mut out, b'f');
        protocol::put_cstr(&mut out, "client disconnected");
        protocol::finish(&mut out, at);
    }
    if st.ext_open || !sscan.at_boundary() && st.pending == 0 {
        out.extend_from_slice(&[b'S', 0, 0, 0, 4]);
        st.pending += 1;
    }
    if !out.is_empty() {
        conn.stream.write_all(&out).await.map_err(|_| ServerError::Closed)?;
    }
    let mut buf = BytesMut::with_capacity(BUF);
    let mut cancelled = false;
    let started = Instant::now();
    while st.pending > 0 {
        let wait = if cancelled { Duration::from_secs(3600) } else { Duration::from_millis(200) };
        match tokio::time::timeout(wait, conn.stream.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Err(ServerError::Closed),
            Ok(Ok(_)) => {
                scan_server(sscan, &mut st, conn, &buf, &mut Seen::default())
                    .map_err(|_| ServerError::Protocol(ProtocolError::Malformed("server stream")))?;
                buf.clear();
            }
            Err(_) => {
                crate::server::send_cancel(conn.addr, conn.pid, conn.secret, Duration::from_secs(2))
                    .await
                    .map_err(ServerError::Connect)?;
                cancelled = true;
                debug!(waited = ?started.elapsed(), "cancelled abandoned query");
            }
        }
    }
    let timeout = Duration::from_secs(5);
    if st.status != b'I' {
        conn.simple("ROLLBACK", timeout).await?;
    }
    if reset {
        conn.simple("DISCARD ALL", timeout).await?;
        conn.applied.clear();
        if read_only {
            crate::pool::enforce_read_only(conn, timeout).await?;
        }
    }
    Ok(())
}

/// `SET`/`RESET` statements that turn the server's applied settings into the client's desired ones.
pub fn settings_sql(conn: &ServerConn, desired: &BTreeMap<String, String>) -> Option<String> {
    let mut sql = String::new();
    for (k, v) in desired {
        if conn.applied.get(k) != Some(v) {
            sql.push_str(&format!("SET {k} = {};", protocol::quote_literal(v)));
        }
    }
    for k in conn.applied.keys() {
        if !desired.contains_key(k) {
            sql.push_str(&format!("RESET {k};"));
        }
    }
    (!sql.is_empty()).then_some(sql)
}
