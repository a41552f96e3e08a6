//! The settings replay: a server brought to a client's session settings in one extended batch of the proxy's
//! own statements, values bound as parameters.

use super::{is_setting_name, ServerConn, ServerError};
use crate::protocol;
use crate::protocol::sqlstate::INVALID_PARAMETER_VALUE;
use bytes::{BufMut, BytesMut};
use std::time::Duration;

impl ServerConn {
    /// Bring session settings to the given values with `set_config($1, $2, false)` bound as parameters, and
    /// `RESET` the listed names, in one extended batch. Values are never spliced into SQL, so no setting of
    /// `standard_conforming_strings` (or anything else a client left behind) can turn a value into a
    /// statement; names are allow-listed identifiers. On a server error nothing is applied (the batch is
    /// one implicit transaction) and the connection stays usable.
    pub async fn apply_settings(
        &mut self,
        set: &[(String, String)],
        reset: &[String],
        timeout: Duration,
    ) -> Result<(), ServerError> {
        // Named statements of the proxy's own, closed in the same batch: the client's unnamed statement (which
        // it may bind in its next transaction) is left alone.
        let mut out = BytesMut::with_capacity(256);
        // One a failed batch left behind (its closing Close was skipped) goes first.
        close_own(&mut out);
        // Who the session is decides what it may set, so the batch runs in this order: resets of the session
        // user, then of the role (another client may have left the server under its own SESSION
        // AUTHORIZATION, which could not set this client's role); the sets, the session user first and the
        // role last; then the other resets.
        let rank = |k: &str| match k {
            "session_authorization" => 0,
            "role" => 2,
            _ => 1,
        };
        let identity = |k: &String| k == "session_authorization" || k == "role";
        let mut who: Vec<&String> = reset.iter().filter(|k| identity(k)).collect();
        who.sort_by_key(|k| rank(k));
        put_resets(&mut out, who)?;
        let mut set: Vec<&(String, String)> = set.iter().collect();
        set.sort_by_key(|(k, _)| rank(k));
        if !set.is_empty() {
            let at = protocol::begin(&mut out, b'P');
            protocol::put_cstr(&mut out, OWN_STATEMENT);
            protocol::put_cstr(&mut out, "SELECT pg_catalog.set_config($1, $2, false)");
            out.put_i16(0);
            protocol::finish(&mut out, at);
            for (k, v) in set {
                let at = protocol::begin(&mut out, b'B');
                out.put_u8(0); // portal ""
                protocol::put_cstr(&mut out, OWN_STATEMENT);
                out.put_i16(0); // text parameters
                out.put_i16(2);
                for p in [k.as_str(), v.as_str()] {
                    out.put_i32(p.len() as i32);
                    out.put_slice(p.as_bytes());
                }
                out.put_i16(0);
                protocol::finish(&mut out, at);
                out.extend_from_slice(&[b'E', 0, 0, 0, 9, 0, 0, 0, 0, 0]);
            }
            close_own(&mut out);
        }
        put_resets(&mut out, reset.iter().filter(|k| !identity(k)))?;
        out.extend_from_slice(&[b'S', 0, 0, 0, 4]);
        self.round_trip(&out, timeout).await
    }
}

/// The statement name the proxy's own extended-protocol statements use (never the unnamed one).
const OWN_STATEMENT: &str = "pgbudget__own";

/// `RESET` of each setting in `keys` (names checked first), each as the proxy's own statement.
fn put_resets<'a>(out: &mut BytesMut, keys: impl IntoIterator<Item = &'a String>) -> Result<(), ServerError> {
    for k in keys {
        if !is_setting_name(k) {
            return Err(ServerError::Postgres {
                code: INVALID_PARAMETER_VALUE.into(),
                message: format!("invalid setting name {k:?}"),
            });
        }
        let at = protocol::begin(out, b'P');
        protocol::put_cstr(out, OWN_STATEMENT);
        protocol::put_cstr(out, &format!("RESET {k}"));
        out.put_i16(0);
        protocol::finish(out, at);
        let at = protocol::begin(out, b'B');
        out.put_u8(0);
        protocol::put_cstr(out, OWN_STATEMENT);
        out.put_slice(&[0, 0, 0, 0, 0, 0]);
        protocol::finish(out, at);
        out.extend_from_slice(&[b'E', 0, 0, 0, 9, 0, 0, 0, 0, 0]);
        close_own(out);
    }
    Ok(())
}

/// Close the proxy's own statement.
fn close_own(out: &mut BytesMut) {
    let at = protocol::begin(out, b'C');
    out.put_u8(b'S');
    protocol::put_cstr(out, OWN_STATEMENT);
    protocol::finish(out, at);
}
