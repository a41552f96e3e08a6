//! The proxy's tagged messages in flight and what to do with each reply, and settling what the server
//! finished: a Parse that failed or was skipped created nothing, a Close that was skipped closed nothing.

use super::TxnStatements;
use crate::relay::txstate::{Done, TxState};
use crate::server::statements::Stmt;
use bytes::Bytes;
use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::Arc;

/// What the proxy does with the reply to a tagged message.
pub enum Action {
    /// A Parse or Close the proxy injected: its ParseComplete/CloseComplete is swallowed (an error goes to
    /// the client, as its own next message's). `prepared`: the statement to forget if the Parse fails.
    Swallow { prepared: Option<u64> },
    /// The proxy's Parse of the client's unnamed statement on a server that lacked it (or its Close of the
    /// server's, when the client has none): swallowed like [`Action::Swallow`]; failed or skipped, the
    /// server's unnamed statement is still not the client's (a failed Parse even dropped it), so its next
    /// use tries again.
    Unnamed,
    /// An injected Close of the least recently used statement: swallowed like [`Action::Swallow`]; skipped
    /// after an error, the server still has it.
    Evict(u64),
    /// A client's Parse of a named statement (naming generation `gen`), sent as a Parse of the pool's.
    Parse { id: u64, gen: u64, name: String },
    /// A stand-in that fails: the server's error is replaced by this one.
    Refuse(Bytes),
    /// A client's Describe of a pool statement: its RowDescription is the statement's shape.
    Describe { gen: u64 },
    /// A Describe the proxy injected after re-preparing a statement on another server, whose replies are
    /// swallowed and compared with the statement's shape; the client's Bind waits for it.
    Check { gen: u64 },
    /// A client Close of its statement: skipped after an error, the client still has the statement.
    /// `void`: the Parse that created it failed, so there is nothing to give back.
    /// `reply`: a SQL `DEALLOCATE` of it, sent as an empty query whose EmptyQueryResponse is replaced by this
    /// (the DEALLOCATE's CommandComplete).
    /// `closes`: the pool statement closed on this server with it (no other client held it), as direct the
    /// statement is gone at once; otherwise the pool keeps it and a Close of nobody (or the empty query)
    /// answers in order.
    Close { name: String, stmt: Arc<Stmt>, gen: u64, void: bool, reply: Option<Bytes>, closes: Option<u64> },
    /// The proxy's Close of its stand-in for a client's unnamed Parse of SQL `DEALLOCATE name` of a
    /// protocol-level statement ([`super::super::Pump::deallocate_parse`]): swallowed; the client's name is
    /// gone once it succeeds, and back if it was skipped after an error.
    Deallocate { name: String, stmt: Arc<Stmt>, gen: u64 },
    /// A client Query with `DEALLOCATE ALL` or `DISCARD ALL`: the client's statements go only if it ran
    /// without an error (refused in an aborted transaction, or `DISCARD ALL` in a transaction block, it
    /// deallocates nothing). `failed`: an ErrorResponse came for it.
    /// `extended`: the Execute of an unnamed statement of that text, which deallocates only if it completes
    /// (skipped after an earlier error, it did nothing either).
    DeallocateAll { failed: Cell<bool>, extended: bool },
}

/// The tag of a client's Parse or Close of its unnamed statement: no action of its own (its reply passes
/// untouched), only its outcome is settled ([`TxnStatements::settle_unnamed`]).
pub const UNNAMED_PARSE: u32 = u32::MAX;

#[derive(Default)]
pub struct Actions {
    queue: VecDeque<(u32, Action)>,
    next: u32,
}

impl Actions {
    pub(in crate::relay::pump) fn push(&mut self, action: Action) -> u32 {
        self.next = self.next.wrapping_add(1).max(1);
        if self.next == UNNAMED_PARSE {
            self.next = 1;
        }
        self.queue.push_back((self.next, action));
        self.next
    }

    /// The action of the message the next reply belongs to.
    pub fn head(&self, tx: &TxState) -> Option<&Action> {
        let tag = tx.head_tag();
        match self.queue.front() {
            Some((t, a)) if tag != 0 && *t == tag => Some(a),
            _ => None,
        }
    }

    pub fn clear(&mut self) {
        self.queue.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub(super) fn contains_check(&self) -> bool {
        self.queue.iter().any(|(_, a)| matches!(a, Action::Check { .. }))
    }
}

impl Action {
    /// What this message does to the server's statements if it succeeds: (statement, prepared or closed).
    pub(super) fn server_effect(&self) -> Option<(u64, bool)> {
        match self {
            Action::Swallow { prepared: Some(id) } | Action::Parse { id, .. } => Some((*id, true)),
            Action::Evict(id) | Action::Close { closes: Some(id), .. } => Some((*id, false)),
            _ => None,
        }
    }
}

/// Settle what the server finished: a Parse that failed or was skipped created nothing, a Close that was
/// skipped closed nothing; the server's statements are then rebuilt from what it confirmed.
pub fn settle(tx: &mut TxState, actions: &mut Actions, stmts: Option<&mut TxnStatements>) {
    if !tx.has_finished() {
        return;
    }
    let mut stmts = stmts;
    let mut failed = false;
    for (tag, done) in tx.take_finished() {
        if tag == UNNAMED_PARSE {
            if let Some(s) = stmts.as_deref_mut() {
                s.settle_unnamed(done);
            }
            continue;
        }
        let ok = done == Done::Ok;
        while let Some((t, action)) = actions.queue.pop_front() {
            if t != tag {
                continue; // its message was dropped from the model (it cannot be answered any more)
            }
            let Some(s) = stmts.as_deref_mut() else { break };
            if matches!(action, Action::Check { .. }) {
                s.holding = false; // compared at its RowDescription, or its Parse failed: the Bind goes on
            }
            if let Action::DeallocateAll { failed, extended } = &action {
                // A Query is answered (ReadyForQuery) even when a statement in it failed. The server's
                // statements are read back by the probe this Query set off either way.
                if !failed.get() && (ok || !extended) {
                    s.client.clear();
                    s.server.clear();
                }
                break;
            }
            if ok {
                if let Some((id, prepared)) = action.server_effect() {
                    s.server.confirm(id, prepared);
                }
                if let Action::Close { gen, .. } | Action::Deallocate { gen, .. } = action {
                    s.client.drop_gen(gen);
                }
                break;
            }
            failed = true;
            match action {
                Action::Parse { gen, name, .. } => {
                    s.client.forget(&name, gen);
                    // A Close of it sent after it closes nothing.
                    for (_, a) in actions.queue.iter_mut() {
                        if let Action::Close { gen: g, void, .. } = a {
                            if *g == gen {
                                *void = true;
                            }
                        }
                    }
                }
                Action::Close { name, stmt, gen, void: false, .. } | Action::Deallocate { name, stmt, gen } => {
                    s.client.restore(name, stmt, gen)
                }
                Action::Unnamed => s.unnamed_here = false,
                _ => {}
            }
            break;
        }
    }
    if let (true, Some(s)) = (failed, stmts) {
        s.server.rebuild(actions.queue.iter().filter_map(|(_, a)| a.server_effect()));
    }
}
