//! Read-only route filter: passes whole client messages through the [`readonly`](crate::read_only::policy) policy.
//!
//! A refused Query or Parse is not dropped but rewritten into a `DO` block that raises SQLSTATE 25006, so
//! Postgres itself answers in order and with the transaction semantics it always has (an open transaction
//! becomes aborted); Binds of a rewritten statement lose their parameters to match. Message counts stay the
//! same, so the relay's bookkeeping of outstanding replies is unchanged.

use crate::protocol::{self, cstr, ProtocolError};
use crate::read_only::normalize::normalize;
use crate::read_only::policy;
use bytes::{BufMut, BytesMut};
use std::collections::HashSet;

/// A refused statement: its fingerprint (no constants) and why.
pub struct Violation {
    pub fingerprint: String,
    pub reason: policy::Reason,
}

pub struct RoFilter {
    /// The route's alias database name, named in the error.
    pub route: String,
    /// `[read_only] allow_procedures`: serve CALL and DO.
    pub allow_procedures: bool,
    /// Statements parsed in the extended batch so far (since the last Sync): transaction control may only come
    /// first, as in a Query.
    batch_stmts: u32,
    /// Prepared statements that were rewritten, by name ("" is the unnamed one).
    poisoned: HashSet<String>,
    /// Filtered bytes ready to send to the server; reused across calls.
    pub out: BytesMut,
}

impl RoFilter {
    pub fn new(route: &str) -> RoFilter {
        RoFilter {
            route: route.to_owned(),
            allow_procedures: false,
            batch_stmts: 0,
            poisoned: HashSet::new(),
            out: BytesMut::new(),
        }
    }

    fn raise_sql(&self, reason: &str) -> String {
        let msg = format!("pgbudget: read-only route \"{}\" refuses this statement", self.route);
        format!(
            "DO $pgbudget$BEGIN RAISE EXCEPTION USING ERRCODE = '{}', MESSAGE = {}, DETAIL = {}; END$pgbudget$",
            crate::protocol::sqlstate::READ_ONLY_SQL_TRANSACTION,
            protocol::quote_literal(&msg),
            protocol::quote_literal(reason)
        )
    }

    /// Filter one whole Query, Parse or Bind message (`msg`, header included) into `out`; refused
    /// statements are rewritten, other messages are copied unchanged.
    /// `backslash_quotes`: the session runs with `standard_conforming_strings = off`.
    pub fn message(
        &mut self,
        msg: &[u8],
        out: &mut BytesMut,
        violations: &mut Vec<Violation>,
        backslash_quotes: bool,
    ) -> Result<(), ProtocolError> {
        let allow = self.allow_procedures;
        let kind = msg[0];
        let mut body = &msg[5..];
        match kind {
            b'Q' => {
                let sql = cstr(&mut body)?;
                match policy::check_route(&normalize(sql, backslash_quotes), allow) {
                    Ok(()) => out.extend_from_slice(msg),
                    Err(reason) => {
                        violations.push(Violation { fingerprint: policy::fingerprint(sql), reason });
                        let replacement = self.raise_sql(reason);
                        protocol::simple_query(out, &replacement);
                    }
                }
            }
            b'P' => {
                let name = cstr(&mut body)?;
                let sql = cstr(&mut body)?;
                // Read as the server reads it, once for both checks.
                let text = normalize(sql, backslash_quotes);
                // As in a Query: transaction control only as the batch's first statement.
                let late = self.batch_stmts > 0 && policy::is_transaction_control(&text);
                self.batch_stmts += 1;
                let verdict = if late {
                    Err("transaction control after another statement in the same batch")
                } else {
                    policy::check_route(&text, allow)
                };
                match verdict {
                    Ok(()) => {
                        self.poisoned.remove(name);
                        out.extend_from_slice(msg);
                    }
                    Err(reason) => {
                        violations.push(Violation { fingerprint: policy::fingerprint(sql), reason });
                        let replacement = self.raise_sql(reason);
                        let at = protocol::begin(out, b'P');
                        protocol::put_cstr(out, name);
                        protocol::put_cstr(out, &replacement);
                        out.put_i16(0);
                        protocol::finish(out, at);
                        self.poisoned.insert(name.to_owned());
                    }
                }
            }
            b'B' => {
                let portal = cstr(&mut body)?;
                let stmt = cstr(&mut body)?;
                if self.poisoned.contains(stmt) {
                    let at = protocol::begin(out, b'B');
                    protocol::put_cstr(out, portal);
                    protocol::put_cstr(out, stmt);
                    out.put_i16(0); // parameter formats
                    out.put_i16(0); // parameters
                    out.put_i16(0); // result formats
                    protocol::finish(out, at);
                } else {
                    out.extend_from_slice(msg);
                }
            }
            b'S' => {
                self.batch_stmts = 0;
                out.extend_from_slice(msg);
            }
            // A fastpath FunctionCall (e.g. set_config by oid) has no text to check: refused. A Query that
            // raises gets the same reply shape (ErrorResponse, ReadyForQuery).
            b'F' => {
                violations.push(Violation { fingerprint: "(fastpath function call)".into(), reason: "FunctionCall" });
                let replacement = self.raise_sql("FunctionCall message (fastpath)");
                protocol::simple_query(out, &replacement);
            }
            _ => out.extend_from_slice(msg),
        }
        Ok(())
    }

    /// Filter every whole message in `input` into `self.out` (cleared first); a trailing partial message is
    /// left out. Returns the bytes consumed (tests and tools; the pump filters message by message).
    pub fn filter(&mut self, input: &[u8], violations: &mut Vec<Violation>) -> Result<usize, ProtocolError> {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let mut pos = 0;
        let r = loop {
            if input.len() - pos < 5 {
                break Ok(pos);
            }
            let len = i32::from_be_bytes([input[pos + 1], input[pos + 2], input[pos + 3], input[pos + 4]]);
            if len < 4 {
                break Err(ProtocolError::Length { kind: input[pos] as char, len: 0 });
            }
            let end = pos + 1 + len as usize;
            if end > input.len() {
                break Ok(pos);
            }
            if let Err(e) = self.message(&input[pos..end], &mut out, violations, false) {
                break Err(e);
            }
            pos = end;
        };
        self.out = out;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_query_is_rewritten_and_partial_tail_kept() {
        let mut f = RoFilter::new("app_ro");
        let mut input = BytesMut::new();
        protocol::simple_query(&mut input, "select 1");
        protocol::simple_query(&mut input, "SET default_transaction_read_only = off");
        let full = input.len();
        protocol::simple_query(&mut input, "select 2");
        let cut = input.len() - 3;
        let mut v = Vec::new();
        let consumed = f.filter(&input[..cut], &mut v).unwrap();
        assert_eq!(consumed, full);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].fingerprint, "set default_transaction_read_only = off");
        let text = String::from_utf8_lossy(&f.out);
        assert!(text.contains("select 1") && text.contains("ERRCODE = '25006'") && !text.contains("= off"));
    }

    #[test]
    fn binds_of_a_rewritten_statement_lose_their_parameters() {
        let mut f = RoFilter::new("ro");
        let mut input = BytesMut::new();
        let at = protocol::begin(&mut input, b'P');
        protocol::put_cstr(&mut input, "s1");
        protocol::put_cstr(&mut input, "select set_config($1, $2, false)");
        input.put_i16(0);
        protocol::finish(&mut input, at);
        let at = protocol::begin(&mut input, b'B');
        protocol::put_cstr(&mut input, "");
        protocol::put_cstr(&mut input, "s1");
        input.put_slice(&[0, 0, 0, 2, 0, 0, 0, 1, b'x', 0, 0, 0, 1, b'y', 0, 0]);
        protocol::finish(&mut input, at);
        let mut v = Vec::new();
        assert_eq!(f.filter(&input, &mut v).unwrap(), input.len());
        assert_eq!(v.len(), 1);
        let bind_at = f.out.iter().rposition(|b| *b == b'B').unwrap();
        assert_eq!(&f.out[bind_at..], &[b'B', 0, 0, 0, 14, 0, b's', b'1', 0, 0, 0, 0, 0, 0, 0][..]);
    }
}
