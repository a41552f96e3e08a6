//! Transaction mode's statement state of one client: its statement names, the attached server's
//! statements, the unnamed statement and the counters.

use crate::server::statements::{ClientStatements, Registry, ServerStatements, Stmt};
use bytes::Bytes;
use prometheus::IntCounter;
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
    /// retires them).
    pub bound: Vec<Arc<Stmt>>,
    /// The client's unnamed statement (Parse body after the name), which it may bind in a later transaction
    /// on another server, and whether the attached server has it.
    pub unnamed: Option<Bytes>,
    pub unnamed_here: bool,
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
            holding: false,
            checked: None,
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
