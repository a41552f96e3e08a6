//! Transaction mode's edits of the conversation, in both directions and in order.
//!
//! Client side: named statements are renamed to the pool's statements (and prepared on the current server
//! first when it lacks them); a client Close of a statement or a Parse the server already has becomes a
//! Close of a name nobody has, whose CloseComplete arrives exactly where the client's reply is due; a
//! statement that must be refused is replaced by one that fails at once, whose error is replaced by the
//! proxy's. Every such message is tagged in the [`crate::relay::txstate::TxState`], so the server side knows, at each reply's
//! header, whether it is the proxy's to swallow, to rename or to replace — and errors, skips to Sync and
//! transaction aborts happen on the server exactly as they would have for the client's own messages.

use super::{Pump, PumpError};
use crate::error::ProxyError;
use crate::protocol::{self, Severity};
use crate::relay::classify::{self, Effects};
use crate::server::statements::{Stmt, NOBODY, PREFIX};
use bytes::{BufMut, Bytes, BytesMut};
use std::cell::Cell;
use std::sync::Arc;

mod actions;
mod local;
mod parse;
mod statements;
pub use actions::{settle, Action, Actions, UNNAMED_PARSE};
pub use statements::TxnStatements;

/// A statement name that never exists: a stand-in Parse of it fails without touching the unnamed statement.
const REFUSED: &str = "pgbudget__refused";
/// The name a Parse of a name the client already holds is tried under (and closed at once).
const HELD: &str = "pgbudget__held";
/// Text that fails in Parse and Query alike, before anything runs.
const FAILS: &str = ")";

/// What a Bind or Describe of a statement name becomes ([`Pump::target`]).
enum Target {
    Raw,
    Stmt(Arc<Stmt>, u64),
    Answered,
    Wait,
}

/// Which message names the statement: a Bind read whole, the head of a streamed one, or a Describe.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    Bind,
    BigBind,
    Describe,
}

/// Where a client message's C strings end: (first, rest).
pub(super) fn split_cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    // The unnamed statement and portal (an empty name) are the common case: no vector search set up for them.
    let end = if b.first() == Some(&0) { 0 } else { memchr::memchr(0, b)? };
    Some((&b[..end], &b[end + 1..]))
}

fn name_str(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn error_bytes(e: &ProxyError) -> Bytes {
    let (_, code, msg) = e.to_client();
    let mut b = BytesMut::with_capacity(msg.len() + 32);
    protocol::error_response(&mut b, Severity::Error, code, &msg, None);
    if matches!(e, ProxyError::PlanChanged) {
        // Drivers tell a stale statement by the routine Postgres raises it in (asyncpg re-prepares on it).
        b.truncate(b.len() - 1);
        b.put_u8(b'R');
        protocol::put_cstr(&mut b, "RevalidateCachedQuery");
        b.put_u8(0);
        let len = (b.len() - 1) as i32;
        b[1..5].copy_from_slice(&len.to_be_bytes());
    }
    b.freeze()
}

fn put_parse(out: &mut BytesMut, name: &str, tail: &[u8]) {
    let at = protocol::begin(out, b'P');
    protocol::put_cstr(out, name);
    out.put_slice(tail);
    protocol::finish(out, at);
}

fn put_close(out: &mut BytesMut, name: &str) {
    let at = protocol::begin(out, b'C');
    out.put_u8(b'S');
    protocol::put_cstr(out, name);
    protocol::finish(out, at);
}

impl Pump {
    /// Note a statement's effects; `Some(refusal)` when it must not run.
    fn note_effects(&mut self, fx: Effects) -> Option<ProxyError> {
        let stmts = self.stmts.as_mut()?;
        if stmts.refuse_pins && fx.has(classify::PINS) {
            let statement = fx.pin_statement().unwrap_or("this statement");
            return Some(ProxyError::PinRefused { statement, service: stmts.service.clone() });
        }
        // Ending backend-only state (`DROP`, `CLOSE`, `UNLISTEN`...) matters only to a pinned client: without
        // a pin there is none to end, and no probe round trip is owed after every `DROP TABLE`.
        let fx = if self.pinned { fx } else { classify::Effects(fx.0 & !classify::UNPIN) };
        if fx.needs_probe() {
            self.probe_due = true;
        }
        if fx.has(classify::LOAD) {
            self.loaded = true;
        }
        None
    }

    /// Queue one message for the server and tell the model, settling what that skipped.
    pub(super) fn send(&mut self, msg: &[u8], tag: u32) {
        self.c2s.extend_from_slice(msg);
        self.tx.client_tagged(msg[0], msg.get(5).copied(), tag);
        settle(&mut self.tx, &mut self.actions, self.stmts.as_deref_mut());
    }

    /// Send a client's Parse or Close of its unnamed statement, noted by `note` and tagged for its outcome
    /// only: what the client's unnamed statement is after it ([`TxnStatements::settle_unnamed`]).
    fn send_unnamed(&mut self, msg: &[u8], note: impl FnOnce(&mut TxnStatements)) {
        let tag = match self.stmts.as_deref_mut() {
            Some(s) => {
                note(s);
                UNNAMED_PARSE
            }
            None => 0,
        };
        self.send(msg, tag);
    }

    /// Send a message that fails at once in place of the client's, with `e` as the error the client sees.
    fn refuse(&mut self, kind: u8, unnamed: bool, e: &ProxyError) {
        let mut out = BytesMut::with_capacity(32);
        if kind == b'Q' {
            protocol::simple_query(&mut out, FAILS);
        } else {
            let at = protocol::begin(&mut out, b'P');
            protocol::put_cstr(&mut out, if unnamed { "" } else { REFUSED });
            protocol::put_cstr(&mut out, FAILS);
            out.put_i16(0);
            protocol::finish(&mut out, at);
        }
        let tag = self.actions.push(Action::Refuse(error_bytes(e)));
        self.send(&out, tag);
    }

    /// Make sure the attached server has `stmt`, preparing it (and closing the least recently used one)
    /// ahead of the client's message if not.
    fn ensure(&mut self, stmt: &Arc<Stmt>) {
        let Some(s) = self.stmts.as_mut() else { return };
        if s.server.touch(stmt.id) {
            s.hits.inc();
            return;
        }
        let victim = s.take_slot(stmt);
        self.close_victim(victim);
        let mut out = BytesMut::with_capacity(stmt.tail.len() + 64);
        put_parse(&mut out, &stmt.name, &stmt.tail);
        let tag = self.actions.push(Action::Swallow { prepared: Some(stmt.id) });
        self.send(&out, tag);
    }

    /// At a checkout: close the statements the attached server has that no client holds any more (a client
    /// that prepared them left), ahead of the client's messages; their replies are swallowed.
    pub fn close_gone(&mut self) {
        let Some(s) = self.stmts.as_mut() else { return };
        let deaths = s.registry.deaths();
        for id in s.server.gone(deaths) {
            self.close_victim(Some(id));
        }
    }

    /// Close an evicted statement on the server ahead of what needed its slot (its reply is swallowed).
    fn close_victim(&mut self, victim: Option<u64>) {
        let Some(v) = victim else { return };
        let mut out = BytesMut::with_capacity(32);
        put_close(&mut out, &format!("{}{v}", PREFIX));
        let tag = self.actions.push(Action::Evict(v));
        self.send(&out, tag);
    }

    /// Parse `tail` under a name of the proxy's and close it at once (that reply swallowed): the Parse, tagged
    /// `action`, fails or succeeds as the client's would, and the server's statements stay as they were.
    fn parse_held(&mut self, tail: &[u8], action: Action) {
        let mut out = BytesMut::with_capacity(tail.len() + 32);
        put_parse(&mut out, HELD, tail);
        let tag = self.actions.push(action);
        self.send(&out, tag);
        out.clear();
        put_close(&mut out, HELD);
        let tag = self.actions.push(Action::Swallow { prepared: None });
        self.send(&out, tag);
    }

    /// The client binds or describes its unnamed statement on a server whose unnamed statement is not (known
    /// to be) the client's: parse the client's here first (it was parsed in an earlier transaction, on
    /// whichever server that had), or, when the client has none, close the one the server may have (another
    /// client's), so the client's message fails as direct (26000) instead of running someone else's.
    fn ensure_unnamed(&mut self) {
        let Some(s) = self.stmts.as_mut() else { return };
        if s.unnamed_here {
            return;
        }
        s.unnamed_here = true;
        let mut out = BytesMut::with_capacity(32);
        match s.unnamed.clone() {
            Some(tail) => put_parse(&mut out, "", &tail),
            None => put_close(&mut out, ""),
        }
        let tag = self.actions.push(Action::Unnamed);
        self.send(&out, tag);
    }

    /// Before a Bind of `stmt` on a server that lacks it: when a client was told its shape, prepare it here and
    /// describe it (swallowed) so a changed shape fails like Postgres's 0A000 instead of changing under the
    /// client. Returns whether the Bind must wait for the answer.
    fn start_check(&mut self, stmt: &Arc<Stmt>, gen: u64) -> bool {
        let skipping = self.tx.skipping();
        let Some(s) = self.stmts.as_deref_mut() else { return false };
        // Not while the server skips to Sync (the Bind is skipped too), and once per statement and checkout
        // (a check whose Parse failed lets the Bind go on, to fail the same way).
        if s.holding
            || skipping
            || s.max_per_server == 0
            || s.client.shape(gen).is_none()
            || s.checked == Some(stmt.id)
            || s.server.touch(stmt.id)
        {
            return false;
        }
        s.checked = Some(stmt.id);
        self.ensure(stmt);
        let tag = self.actions.push(Action::Check { gen });
        self.send_describe(&stmt.name, tag);
        // The server holds its replies until a Flush (or Sync): the answer is needed now.
        self.send(&[b'H', 0, 0, 0, 4], 0);
        // A check the server skipped (an earlier error) settles at once: then nothing waits.
        if let Some(s) = self.stmts.as_deref_mut() {
            s.holding = self.actions.contains_check();
        }
        true
    }

    fn note_bound(&mut self, stmt: Arc<Stmt>, gen: u64) {
        if let Some(s) = self.stmts.as_mut() {
            if s.bound.len() < 256 {
                s.bound.push((stmt, gen));
            }
        }
    }

    /// Whether statement names are mapped now (transaction mode with `max_prepared_statements` > 0).
    fn mapping(&self) -> bool {
        self.stmts.as_ref().is_some_and(|s| s.max_per_server > 0)
    }

    /// One whole client message in transaction mode (Query, Parse, Bind, Describe, Close).
    pub(super) fn forward_txn(&mut self, msg: &[u8]) -> Result<bool, PumpError> {
        let kind = msg[0];
        let body = &msg[5..];
        match kind {
            b'Q' => {
                let text = split_cstr(body).map_or(body, |(t, _)| t);
                // A simple Query drops the unnamed statement (refused or not).
                if let Some(s) = self.stmts.as_mut() {
                    s.drop_unnamed();
                }
                // Most statements have nothing to note and name no statement: the first look alone tells (or
                // its memo, for a text that differs from the last cleared one only in its numbers).
                if self.query_memo.plain(text) {
                    self.send(msg, 0);
                    return Ok(true);
                }
                let fx = classify::scan(text, self.backslash_quotes);
                if let Some(e) = self.note_effects(fx) {
                    self.refuse(b'Q', true, &e);
                    return Ok(true);
                }
                if self.mapping() && self.deallocate_sql(body) {
                    return Ok(true);
                }
                let tag = if fx.has(classify::DEALLOCATE_ALL) && self.stmts.is_some() {
                    self.actions.push(Action::DeallocateAll { failed: Cell::new(false), extended: false })
                } else {
                    0
                };
                match self.mapping().then(|| self.rewrite_execute(body)).flatten() {
                    Some(renamed) => self.send(&renamed, tag),
                    None => self.send(msg, tag),
                }
            }
            b'P' => return self.forward_parse(msg),
            b'B' => {
                let bad = || PumpError::Filter(protocol::ProtocolError::Malformed("Bind"));
                let (portal, rest) = split_cstr(body).ok_or_else(bad)?;
                let (name, rest) = split_cstr(rest).ok_or_else(bad)?;
                if let Some(s) = self.stmts.as_deref_mut().filter(|_| portal.is_empty()) {
                    s.portal_deallocates = name.is_empty() && s.unnamed_deallocates;
                }
                match self.target(name, Use::Bind)? {
                    Target::Raw => self.send(msg, 0),
                    Target::Answered => {}
                    Target::Wait => return Ok(false), // the Bind waits for the shape check
                    Target::Stmt(stmt, gen) => {
                        // Built in place: no buffer per Bind.
                        let at = protocol::begin(&mut self.c2s, b'B');
                        self.c2s.put_slice(portal);
                        self.c2s.put_u8(0);
                        protocol::put_cstr(&mut self.c2s, &stmt.name);
                        self.c2s.put_slice(rest);
                        protocol::finish(&mut self.c2s, at);
                        self.tx.client(b'B', None);
                        settle(&mut self.tx, &mut self.actions, self.stmts.as_deref_mut());
                        self.note_bound(stmt, gen);
                    }
                }
            }
            b'D' if body == b"S\0" => {
                self.ensure_unnamed();
                self.send(msg, 0);
            }
            b'C' if body == b"S\0" => self.send_unnamed(msg, TxnStatements::close_unnamed),
            b'D' | b'C' if body.first() == Some(&b'S') && body.len() > 2 && self.mapping() => {
                let name = split_cstr(&body[1..]).map_or(&body[1..], |(n, _)| n);
                if kind == b'C' {
                    let own = self.stmts.as_ref().is_some_and(|s| s.client.get(&name_str(name)).is_some());
                    if name.starts_with(PREFIX.as_bytes()) && !own {
                        return Err(PumpError::Filter(protocol::ProtocolError::Malformed(
                            "statement name reserved by pgbudget",
                        )));
                    }
                    let s = self.stmts.as_mut().expect("mapping");
                    let key = name_str(name);
                    if let Some((stmt, gen)) = s.client.remove(&key) {
                        // The client's name is gone. Held by no other client and prepared here, the statement is
                        // closed here too (gone at once, as direct); otherwise the pool keeps it and a Close of
                        // nobody answers in order.
                        let closes = s.server.closing_last(&stmt);
                        let mut out = BytesMut::with_capacity(32);
                        put_close(&mut out, if closes.is_some() { &stmt.name } else { NOBODY });
                        let close = Action::Close { name: key, stmt, gen, void: false, reply: None, closes };
                        let tag = self.actions.push(close);
                        self.send(&out, tag);
                    } else {
                        self.send(msg, 0);
                    }
                    return Ok(true);
                }
                match self.target(name, Use::Describe)? {
                    Target::Raw => self.send(msg, 0),
                    Target::Answered | Target::Wait => {}
                    Target::Stmt(stmt, gen) => {
                        let tag = self.actions.push(Action::Describe { gen });
                        self.send_describe(&stmt.name, tag);
                        self.note_bound(stmt, gen);
                    }
                }
            }
            _ => self.send(msg, 0),
        }
        Ok(true)
    }

    /// How a Bind or Describe naming `name` goes to the server: unchanged (the unnamed statement, an SQL-level
    /// one, or one the server will say does not exist), renamed to the pool statement (prepared on this server
    /// first if needed), already answered, or waiting for a shape check (a Bind). A name with the proxy's own
    /// prefix that the client did not prepare ends the session.
    fn target(&mut self, name: &[u8], used: Use) -> Result<Target, PumpError> {
        if name.is_empty() {
            self.ensure_unnamed();
            return Ok(Target::Raw);
        }
        if !self.mapping() {
            return Ok(Target::Raw);
        }
        let s = self.stmts.as_deref().expect("mapping");
        let Some((old, gen)) = std::str::from_utf8(name).ok().and_then(|k| s.client.naming(k)) else {
            if name.starts_with(PREFIX.as_bytes()) {
                return Err(PumpError::Filter(protocol::ProtocolError::Malformed(
                    "statement name reserved by pgbudget",
                )));
            }
            return Ok(Target::Raw);
        };
        let (broken, known) = (s.client.is_broken(gen), s.client.shape(gen).is_some());
        match used {
            // A stale plan fails the client's statement as direct, unless the client was told a shape that a
            // fresh statement can be checked against (then only a changed one fails).
            Use::Bind if broken || (old.is_stale() && !known) => {
                self.refuse(b'P', false, &ProxyError::PlanChanged);
                return Ok(Target::Answered);
            }
            // The server that holds the stale plan answers as it would direct (its parameters, then 0A000);
            // elsewhere the proxy's stand-in fails in its place.
            Use::Describe if old.is_stale() => {
                if self.stmts.as_deref_mut().is_some_and(|s| s.server.touch(old.id)) {
                    self.send_describe(&old.name, 0);
                } else {
                    self.refuse(b'P', false, &ProxyError::PlanChanged);
                }
                return Ok(Target::Answered);
            }
            _ => {}
        }
        let stmt = if old.is_stale() {
            // A server's plan for it went stale (its result type changed): the naming moves to a fresh
            // statement of the same text, prepared anew on each server, and the shape check tells whether the
            // client may still use it.
            let s = self.stmts.as_deref_mut().expect("mapping");
            let fresh = s.registry.intern(&old.tail, &s.search_path);
            s.client.restore(name_str(name), fresh.clone(), gen);
            fresh
        } else {
            old
        };
        if used == Use::Bind && self.start_check(&stmt, gen) {
            return Ok(Target::Wait);
        }
        self.ensure(&stmt);
        Ok(Target::Stmt(stmt, gen))
    }

    /// Queue a Describe of statement `name` (with `tag`).
    fn send_describe(&mut self, name: &str, tag: u32) {
        let mut out = BytesMut::with_capacity(name.len() + 8);
        let at = protocol::begin(&mut out, b'D');
        out.put_u8(b'S');
        protocol::put_cstr(&mut out, name);
        protocol::finish(&mut out, at);
        self.send(&out, tag);
    }

    /// The head of a Bind too large to hold: its portal and statement names are in `prefix` (the body's first
    /// bytes). Queues what stands for them and returns how many body bytes that consumed, or `None` when the
    /// Bind needs no rewrite (then it streams as is).
    pub(super) fn bind_head(&mut self, prefix: &[u8], body_len: usize) -> Result<Option<usize>, PumpError> {
        let bad = || PumpError::Filter(protocol::ProtocolError::Malformed("Bind names"));
        let (portal, rest) = split_cstr(prefix).ok_or_else(bad)?;
        let (name, _) = split_cstr(rest).ok_or_else(bad)?;
        let consumed = portal.len() + name.len() + 2;
        let Target::Stmt(stmt, gen) = self.target(name, Use::BigBind)? else { return Ok(None) };
        let len = body_len - consumed + portal.len() + stmt.name.len() + 2 + 4;
        let len = i32::try_from(len).map_err(|_| bad())?;
        self.c2s.put_u8(b'B');
        self.c2s.put_i32(len);
        self.c2s.put_slice(portal);
        self.c2s.put_u8(0);
        protocol::put_cstr(&mut self.c2s, &stmt.name);
        self.tx.client(b'B', None);
        settle(&mut self.tx, &mut self.actions, self.stmts.as_deref_mut());
        self.note_bound(stmt, gen);
        Ok(Some(consumed))
    }
}

#[cfg(test)]
mod tests;
