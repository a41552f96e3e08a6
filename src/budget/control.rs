//! Per-pool operator state: whether `PAUSE` (or `KILL`) holds new checkouts, and the token `KILL` cancels to end
//! the pool's sessions; `admin::control` carries out the commands.

use crate::budget::signal::Signal;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Per-pool operator state.
pub struct PoolControl {
    paused: watch::Sender<bool>,
    /// Fired by `KILL`; replaced by a fresh signal so later sessions are unaffected.
    kill: Mutex<Arc<Signal>>,
}

impl Default for PoolControl {
    fn default() -> Self {
        Self { paused: watch::Sender::new(false), kill: Mutex::default() }
    }
}

impl PoolControl {
    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.paused.subscribe()
    }

    pub(crate) fn set_paused(&self, on: bool) {
        self.paused.send_replace(on);
    }

    /// The signal a session watches to learn it was killed.
    pub fn kill_signal(&self) -> Arc<Signal> {
        self.kill.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn kill_sessions(&self) {
        let mut k = self.kill.lock().unwrap_or_else(|e| e.into_inner());
        k.fire();
        *k = Arc::default();
    }
}
