//! Transaction mode's statement state of one client: its statement names, the attached server's
//! statements, the unnamed statement and the counters.

use crate::relay::txstate::Done;
use crate::server::statements::{ClientStatements, Registry, ServerStatements, Stmt};
use bytes::Bytes;
use prometheus::IntCounter;
use std::collections::VecDeque;
use std::sync::Arc;

/// Transaction mode's statement state of one client.
pub struct TxnStatements {
    pub registry: Arc<Registry>,
    pub client: ClientStatements,
    /// The attached server's statements (moved in at checkout, back at release).
    pub server: ServerStatements,
    /// `max_prepared_statements` (0: names pass through unmapped).
    pub max_per_server: usize,
    /// The client's `search_path` (part of a statement's identity).
    pub search_path: String,
    /// `pin = "refuse"`, and the service to name in the refusal.
    pub refuse_pins: bool,
    pub service: String,
    pub hits: IntCounter,
    pub misses: IntCounter,
    pub evictions: IntCounter,
    /// Statements bound since the server last had nothing owed ("cached plan must not change result type"
    /// retires them), each with the generation of the client's naming it was used by (which names it in an
    /// error of the server, [`super::super::errors`]).
    pub bound: Vec<(Arc<Stmt>, u64)>,
    /// The client's unnamed statement (Parse body after the name) as of its last Parse or Close of it the
    /// server finished, which it may bind in a later transaction on another server, and whether the attached
    /// server's unnamed statement is the client's (or, with none, that the server has none either).
    pub unnamed: Option<Bytes>,
    pub unnamed_here: bool,
    /// The client's Parses (`Some(text)`) and Closes (`None`) of its unnamed statement the server has not
    /// finished, in order, each with `unnamed_here` as it was before it: a Parse that fails leaves none, a
    /// message skipped (after an error earlier in its batch) leaves the one before, on the server too.
    pub unnamed_pending: VecDeque<(Option<Bytes>, bool)>,
    /// The client's latest unnamed Parse is of `DEALLOCATE ALL` or `DISCARD ALL`, and its last Bind of the
    /// unnamed portal bound that: an Execute of that portal drops the client's statements if it completes.
    pub unnamed_deallocates: bool,
    pub portal_deallocates: bool,
    /// A shape check is running: client messages wait for it.
    pub holding: bool,
    /// The statement last checked in this checkout.
    pub checked: Option<u64>,
}

impl TxnStatements {
    /// Statement state with counters registered nowhere (tests, fuzzing, benchmarks).
    pub fn detached(registry: Arc<Registry>, max_per_server: usize) -> TxnStatements {
        let counter = |n: &str| IntCounter::new(n, n).expect("valid counter");
        TxnStatements {
            registry,
            client: Default::default(),
            server: Default::default(),
            max_per_server,
            search_path: String::new(),
            refuse_pins: false,
            service: "test".into(),
            hits: counter("hits"),
            misses: counter("misses"),
            evictions: counter("evictions"),
            bound: Vec::new(),
            unnamed: None,
            unnamed_here: false,
            unnamed_pending: VecDeque::new(),
            unnamed_deallocates: false,
            portal_deallocates: false,
            holding: false,
            checked: None,
        }
    }

    /// The client sends a Parse of its unnamed statement (`tail`: the body after the name; `deallocates_all`:
    /// its text is `DEALLOCATE ALL` or `DISCARD ALL`).
    pub(super) fn parse_unnamed(&mut self, tail: &[u8], deallocates_all: bool) {
        self.unnamed_deallocates = deallocates_all;
        // Drivers parse the same text again and again: then the text already held is shared, not copied.
        let latest = match self.unnamed_pending.back() {
            Some((parsed, _)) => parsed.as_ref(),
            None => self.unnamed.as_ref(),
        };
        let text = match latest {
            Some(t) if t[..] == *tail => t.clone(),
            _ => Bytes::copy_from_slice(tail),
        };
        self.unnamed_pending.push_back((Some(text), self.unnamed_here));
        self.unnamed_here = true;
    }

    /// The client sends a Close of its unnamed statement.
    pub(in crate::relay::pump) fn close_unnamed(&mut self) {
        self.unnamed_pending.push_back((None, self.unnamed_here));
        self.unnamed_here = true;
        self.unnamed_deallocates = false;
    }

    /// The client's unnamed statement is gone (a simple Query drops it), whatever Parses of it are still on
    /// their way.
    pub(super) fn drop_unnamed(&mut self) {
        self.unnamed = None;
        self.unnamed_pending.clear();
        self.unnamed_deallocates = false;
    }

    /// The oldest unfinished Parse or Close of the unnamed statement finished.
    pub(super) fn settle_unnamed(&mut self, done: Done) {
        let Some((parsed, here_before)) = self.unnamed_pending.pop_front() else { return };
        match (done, parsed) {
            (Done::Ok, text) => self.unnamed = text,
            (Done::Failed, Some(_)) => self.unnamed = None,
            (Done::Failed, None) => {}
            // The server's unnamed statement is the one before, which may be another client's: then the next
            // use prepares the client's (or closes the server's) first.
            (Done::Skipped, _) => self.unnamed_here &= here_before,
        }
    }

    /// Record `stmt` as prepared on the server (a miss); returns the statement to close to make room.
    pub(super) fn take_slot(&mut self, stmt: &Arc<Stmt>) -> Option<u64> {
        self.misses.inc();
        self.server.remember(stmt);
        let victim = self.server.insert(stmt.id, self.max_per_server);
        if victim.is_some() {
            self.evictions.inc();
        }
        victim
    }
}
