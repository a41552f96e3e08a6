//! A client's Parse in transaction mode: its name mapped to the pool's statement (prepared again in place
//! when the server has it, tried aside in a failed transaction), the unnamed statement noted for its
//! outcome, refusals answered in order.

use super::{name_str, put_close, put_parse, split_cstr, Action};
use crate::error::ProxyError;
use crate::protocol;
use crate::relay::pump::{Pump, PumpError};
use crate::server::statements::{MAX_CLIENT_BYTES, MAX_PER_CLIENT};
use bytes::BytesMut;

impl Pump {
    /// Forward a client's whole Parse `msg`. Returns whether the message was taken.
    pub(super) fn forward_parse(&mut self, msg: &[u8]) -> Result<bool, PumpError> {
        let body = &msg[5..];
        if let Some(renamed) = self.mapping().then(|| self.rewrite_execute_parse(body)).flatten() {
            // The text names the server's statement now, which no client name matches: no second pass.
            return self.forward_txn(&renamed);
        }
        let bad = || PumpError::Filter(protocol::ProtocolError::Malformed("Parse"));
        let (name, tail) = split_cstr(body).ok_or_else(bad)?;
        let text = split_cstr(tail).ok_or_else(bad)?.0;
        let effects = self.parse_memo.classify(text, self.backslash_quotes);
        if let Some(e) = self.note_effects(effects) {
            self.refuse(b'P', name.is_empty(), &e);
            return Ok(true);
        }
        if name.is_empty() && self.mapping() && self.deallocate_parse(tail) {
            return Ok(true);
        }
        if name.is_empty() {
            let all = effects.has(crate::relay::classify::DEALLOCATE_ALL);
            self.send_unnamed(msg, |s| s.parse_unnamed(tail, all));
            return Ok(true);
        }
        if !self.mapping() {
            self.send(msg, 0);
            return Ok(true);
        }
        let key = name_str(name);
        let s = self.stmts.as_ref().expect("mapping");
        if s.client.get(&key).is_some() {
            // Postgres checks the name last: a syntax error, an aborted transaction or a failed
            // analysis comes first. So the text is tried under a name of the proxy's (and closed at
            // once; both replies swallowed, an error reaching the client as its Parse's), and only if
            // it parses does the stand-in fail with 42P05.
            self.parse_held(tail, Action::Swallow { prepared: None });
            self.refuse(b'P', false, &ProxyError::StatementExists(key));
            return Ok(true);
        }
        if s.client.len() >= MAX_PER_CLIENT || s.client.bytes() + key.len() + tail.len() > MAX_CLIENT_BYTES {
            self.refuse(b'P', false, &ProxyError::TooManyStatements(MAX_PER_CLIENT));
            return Ok(true);
        }
        let aborted = self.tx.status() == b'E';
        let s = self.stmts.as_mut().expect("mapping");
        let stmt = s.registry.intern(tail, &s.search_path);
        let gen = s.client.insert(key.clone(), stmt.clone());
        let here = s.server.touch(stmt.id);
        if here {
            s.hits.inc();
        }
        if here && aborted {
            // In a failed transaction Postgres refuses every Parse but COMMIT's and ROLLBACK's: closed first,
            // the server's statement would be lost with the Parse. The text is tried under a name of the
            // proxy's (closed at once), whose reply is the client's Parse's.
            self.parse_held(tail, Action::Parse { id: stmt.id, gen, name: key });
            return Ok(true);
        }
        let mut out = BytesMut::with_capacity(tail.len() + 32);
        if here {
            // The server has the statement: it is prepared again in place (closed, then parsed), so a
            // Parse that would fail now (a dropped table) fails here, where the client expects it, and
            // a plan gone stale since (its result type changed) is replaced by the one the client is
            // about to be described.
            put_close(&mut out, &stmt.name);
            let tag = self.actions.push(Action::Evict(stmt.id));
            self.send(&out, tag);
            out.clear();
        } else {
            let victim = s.take_slot(&stmt);
            self.close_victim(victim);
        }
        put_parse(&mut out, &stmt.name, tail);
        let tag = self.actions.push(Action::Parse { id: stmt.id, gen, name: key });
        self.send(&out, tag);
        Ok(true)
    }

    /// An unnamed Parse (`tail`: text and parameter types) of SQL `DEALLOCATE name` of one of the client's
    /// protocol-level statements (psycopg 3 evicts its statements this way, with PQexecParams): the client's
    /// name goes, as with a Query of it ([`super::super::execute`]); the pool's statement is closed on this
    /// server when no other client holds it, else the pool keeps it.
    /// The text deallocates a stand-in of the proxy's instead, prepared ahead of it (after a Close of any
    /// left from a DEALLOCATE never executed), so the client's Bind and Execute get what direct they would:
    /// BindComplete and `DEALLOCATE`. In a failed transaction it goes as written (Postgres refuses the Parse).
    pub(super) fn deallocate_parse(&mut self, tail: &[u8]) -> bool {
        let Some((text, types)) = split_cstr(tail) else { return false };
        let Some(name) = crate::relay::pump::execute::deallocate_target(text) else { return false };
        if self.tx.status() == b'E' {
            return false;
        }
        let Some(s) = self.stmts.as_mut() else { return false };
        let Some((stmt, gen)) = s.client.remove(&name) else { return false };
        let mut out = BytesMut::with_capacity(64);
        // Held by no other client and prepared here: closed here too, so it is gone from the server at once,
        // as direct (skipped after an error earlier in the batch, the server still has it).
        if let Some(id) = s.server.closing_last(&stmt) {
            put_close(&mut out, &stmt.name);
            let tag = self.actions.push(Action::Evict(id));
            self.send(&out, tag);
            out.clear();
        }
        put_close(&mut out, STAND_IN);
        let tag = self.actions.push(Action::Deallocate { name, stmt, gen });
        self.send(&out, tag);
        out.clear();
        put_parse(&mut out, STAND_IN, b"SELECT\0\0\0");
        let tag = self.actions.push(Action::Swallow { prepared: None });
        self.send(&out, tag);
        out.clear();
        let text = [b"DEALLOCATE ", STAND_IN.as_bytes(), b"\0", types].concat();
        put_parse(&mut out, "", &text);
        self.send_unnamed(&out, |s| s.parse_unnamed(&text, false));
        true
    }
}

/// The statement a client's SQL `DEALLOCATE` by extended protocol deallocates in its place.
const STAND_IN: &str = "pgbudget__dealloc";
