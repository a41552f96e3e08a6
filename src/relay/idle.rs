//! The idle limits a relay enforces (`client_idle_timeout`, `idle_in_transaction_timeout`, `pin_idle_timeout`):
//! which applies now, and whether it has passed.

use super::Relay;
use crate::error::ProxyError;
use std::time::Duration;

/// Which idle limit applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Idle {
    Client,
    InTransaction,
    Pinned,
}

impl Relay {
    /// Read the settings the relay loop consults from the budget in force now.
    pub(super) fn load_settings(&mut self) {
        let pool = self.pool.clone();
        self.use_settings(&pool.budget());
    }

    /// Take the settings the relay loop consults from `b` (once per checkout, not per message: a reload
    /// applies from the next checkout on).
    pub(super) fn use_settings(&mut self, b: &crate::config::resolve::ServiceBudget) {
        let s = &b.settings;
        let pin = if self.pins.is_empty() { Duration::ZERO } else { s.pin_idle_timeout };
        self.idle_timeouts = (s.client_idle_timeout, s.idle_in_transaction_timeout, pin);
        self.pump.track_activity =
            !s.client_idle_timeout.is_zero() || !s.idle_in_transaction_timeout.is_zero() || !pin.is_zero();
    }

    /// The idle limit that applies now, if any.
    pub(super) fn idle_limit(&self) -> Option<(Duration, Idle)> {
        let tx = &self.pump.tx;
        if self.server.is_some() && (!tx.awaits_client() || !self.pump.unsent().is_empty()) {
            return None;
        }
        let (client, in_tx, pinned) = self.idle_timeouts;
        if self.server.is_some() && tx.in_transaction() {
            return (!in_tx.is_zero()).then_some((in_tx, Idle::InTransaction));
        }
        if self.server.is_some() && !self.pins.is_empty() && !pinned.is_zero() && (client.is_zero() || pinned < client)
        {
            return Some((pinned, Idle::Pinned));
        }
        (!client.is_zero()).then_some((client, Idle::Client))
    }

    /// The idle error to end the session with, if the limit that applies now has passed since the last
    /// activity (the timer may be stale or a periodic re-check).
    pub(super) fn idle_expired(&self) -> Option<ProxyError> {
        let (d, kind) = self.idle_limit()?;
        if self.pump.last_activity?.elapsed() < d {
            return None;
        }
        Some(match kind {
            Idle::InTransaction => ProxyError::IdleInTransaction(d),
            Idle::Pinned => ProxyError::PinIdle(d),
            Idle::Client => ProxyError::ClientIdle(d),
        })
    }

    pub(super) fn shortest_idle_timeout(&self) -> Duration {
        let (a, b, c) = self.idle_timeouts;
        [a, b, c].into_iter().filter(|d| !d.is_zero()).min().unwrap_or(Duration::from_secs(3600))
    }
}
