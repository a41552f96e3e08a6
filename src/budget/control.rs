//! Per-pool operator state: whether `PAUSE` (or `KILL`) holds new checkouts, and the token `KILL` cancels to end
//! the pool's sessions; `admin::control` carries out the commands.

use std::sync::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Per-pool operator state.
pub struct PoolControl {
    paused: watch::Sender<bool>,
    /// Cancelled by `KILL`; replaced by a fresh token so later sessions are unaffected.
    kill: Mutex<CancellationToken>,
}

impl Default for PoolControl {
    fn default() -> Self {
        Self { paused: watch::Sender::new(false), kill: Mutex::new(CancellationToken::new()) }
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

    /// The token a session watches to learn it was killed.
    pub fn kill_token(&self) -> CancellationToken {
        self.kill.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn kill_sessions(&self) {
        let mut t = self.kill.lock().unwrap_or_else(|e| e.into_inner());
        t.cancel();
        *t = CancellationToken::new();
    }
}
