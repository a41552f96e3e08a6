//! The settings replay: a server brought to a client's session settings in one extended batch of the proxy's
//! own statements, values bound as parameters.

use super::{is_setting_name, ServerConn, ServerError};
use crate::protocol;
use crate::protocol::sqlstate::INVALID_PARAMETER_VALUE;
use bytes::BytesMut;
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
            protocol::parse(&mut out, OWN_STATEMENT, "SELECT pg_catalog.set_config($1, $2, false)");
            for (k, v) in set {
                protocol::bind_text(&mut out, OWN_STATEMENT, &[k, v]);
                protocol::execute(&mut out);
            }
            protocol::close_statement(&mut out, OWN_STATEMENT);
        }
        put_resets(&mut out, reset.iter().filter(|k| !identity(k)))?;
        protocol::sync(&mut out);
        self.round_trip(&out, timeout).await
    }

    /// Run `sql` as the proxy's own statement with `params` bound (text), and return its rows as text
    /// (NULL as `None`), within `timeout`. The client's unnamed statement is left alone.
    pub async fn rows_bound(
        &mut self,
        sql: &str,
        params: &[&str],
        timeout: Duration,
    ) -> Result<Vec<Vec<Option<String>>>, ServerError> {
        let mut out = BytesMut::with_capacity(sql.len() + 64);
        close_own(&mut out);
        protocol::parse(&mut out, OWN_STATEMENT, sql);
        protocol::bind_text(&mut out, OWN_STATEMENT, params);
        protocol::execute(&mut out);
        close_own(&mut out);
        protocol::sync(&mut out);
        let mut rows = Vec::new();
        self.round_trip_rows(&out, timeout, Some(&mut rows)).await?;
        Ok(rows)
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
        protocol::parse(out, OWN_STATEMENT, &format!("RESET {k}"));
        protocol::bind_text(out, OWN_STATEMENT, &[]);
        protocol::execute(out);
        close_own(out);
    }
    Ok(())
}

/// Close the proxy's own statement.
fn close_own(out: &mut BytesMut) {
    protocol::close_statement(out, OWN_STATEMENT);
}
