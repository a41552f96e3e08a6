//! Where a server goes after a client's transaction or session: the session-state probe (settings become the
//! client's, backend-only state pins the server), the clean check-in, the cleanup, or the close.

use super::{PinPolicy, PoolMode, Relay};
use crate::budget::pool::Route;
use crate::error::ProxyError;
use crate::relay::reset::Cleaned;
use std::collections::BTreeMap;
use std::time::Instant;
use tracing::{debug, warn};

impl Relay {
    /// Read the server's session state after the client changed it (transaction mode, at an idle boundary):
    /// the settings become the client's (and the server's known state), its protocol statements are
    /// re-listed, and state only this backend holds pins it to the client. Returns whether it is pinned.
    pub(super) async fn probe_session(&mut self) -> Result<bool, ProxyError> {
        self.pump.probe_due = false;
        let timeout = self.pool.budget().settings.reset_timeout;
        let Some(conn) = self.server.as_mut() else { return Ok(false) };
        let probe = match conn.probe(timeout).await {
            Ok(p) => p,
            Err(source) => {
                conn.broken = true;
                return Err(ProxyError::Upstream { upstream: self.pool.budget().upstream.clone(), source });
            }
        };
        let ro = self.pool.route == Route::ReadOnly;
        let mut settings: BTreeMap<String, String> = probe
            .settings
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .filter(|(k, _)| !(ro && k == crate::server::READ_ONLY_SETTING))
            .collect();
        conn.applied = self.pool.settings.intern(settings.clone());
        if !conn.notifications.is_empty() {
            if let Some(list) = conn.server_list().cloned() {
                crate::relay::pump::name_senders(&mut conn.notifications, &list);
            }
            self.pump.queue_for_client(&conn.notifications);
            conn.notifications.clear();
        }
        // A setting the client RESET (or SET TO DEFAULT, RESET ALL, DISCARD ALL) returns to its startup value,
        // as it does direct: the probe then finds it at the server's default, so the next checkout sets it.
        for (k, v) in self.startup.iter() {
            settings.entry(k.clone()).or_insert_with(|| v.clone());
        }
        self.desired =
            if settings == *self.startup { self.startup.clone() } else { self.pool.settings.intern(settings) };
        if let Some(s) = self.pump.stmts.as_mut() {
            s.unnamed_here = false; // the probe, a simple Query, dropped the server's unnamed statement
            s.search_path = self.desired.get("search_path").cloned().unwrap_or_default();
            s.server.resync(probe.statements.iter().map(String::as_str));
        }
        let mut pins = probe.pins;
        if self.pump.loaded {
            pins.push("load");
        }
        for (i, reason) in crate::telemetry::labels::PIN_REASONS.iter().enumerate() {
            if pins.contains(reason) && !self.pins.contains(reason) {
                self.pool.metrics.pinned[i].inc();
                debug!(reason, "server pinned to its client");
            }
        }
        if !pins.is_empty() && self.pool.budget().settings.pin == PinPolicy::Refuse {
            warn!(kind = "pin", reasons = ?pins, "state the statement scan did not see pins a server under pin = refuse");
        }
        self.pump.listening = pins.contains(&"listen");
        let was_pinned = !self.pins.is_empty();
        self.pins = pins;
        self.pump.pinned = !self.pins.is_empty();
        let bits = crate::telemetry::labels::PIN_REASONS
            .iter()
            .enumerate()
            .filter(|(_, r)| self.pins.contains(r))
            .fold(0u8, |b, (i, _)| b | 1 << i);
        self.pin_bits.store(bits, std::sync::atomic::Ordering::Relaxed);
        if self.pump.pinned && self.pin_count.is_none() {
            self.pin_count = Some(crate::budget::pool::PinCount::new(&self.pool.pinned));
        } else if !self.pump.pinned {
            self.pin_count = None;
        }
        if self.pump.pinned != was_pinned {
            self.load_settings();
            if self.pump.last_activity.is_none() {
                self.pump.last_activity = Some(Instant::now());
            }
        }
        // A pinned server stays, so no checkout brings it to the client's settings: a RESET that returned a
        // setting to the server connection's own startup value (its application_name label, the upstream's
        // datestyle) is set to the client's here, as a direct RESET returns to the client's startup value.
        if let (true, Some(conn)) = (self.pump.pinned, self.server.as_mut()) {
            super::attach::bring_to(conn, &self.desired, &self.pool).await?;
        }
        Ok(self.pump.pinned)
    }

    /// End of session: check the server in clean, or clean it up (cancel, drain, roll back, reset) within
    /// the reset deadline, or discard it. Never hands a connection in an unproven state to the next client.
    pub async fn finish(&mut self) {
        // Declared first so it is dropped last: the admission place is given back after the server.
        let _hold = self.hold.take();
        let _pinned = self.pin_count.take();
        let txn = self.mode == PoolMode::Transaction;
        if txn && self.pump.probe_due && self.pump.releasable() && !self.pump.loaded {
            if let Err(e) = Box::pin(self.probe_session()).await {
                debug!(cause = %e, "probe at session end failed");
            }
        }
        let Some(mut conn) = self.detach().await else {
            return;
        };
        if conn.broken || self.pump.loaded {
            return self.pool.discard(conn);
        }
        let deadline = self.pool.budget().settings.reset_timeout;
        // Session mode always resets; transaction mode when the server holds the client's backend-only state
        // or a change the probe could not read.
        let needs_reset = !txn || !self.pins.is_empty() || self.pump.probe_due;
        if self.pump.releasable() && !needs_reset {
            return self.pool.put_back(conn);
        }
        let ro = self.pump.ro.is_some();
        let result =
            tokio::time::timeout(deadline, crate::relay::reset::cleanup(&mut conn, &mut self.pump, needs_reset, ro))
                .await;
        match result {
            Ok(Ok(Cleaned::Reusable)) => {
                debug!("server connection reset and returned");
                self.pool.put_back(conn);
            }
            Ok(Ok(Cleaned::Retire)) => {
                debug!("server connection closed: it keeps a temporary namespace");
                self.pool.retire(conn);
            }
            Ok(Err(e)) => {
                // A failed reset can quote the server's error text: redacted like the journal's.
                let cause = self.app.journal.redacted(&e.to_string()).into_owned();
                warn!(kind = "server_reset", %cause, "server connection discarded after failed reset");
                self.pool.discard(conn);
            }
            Err(_) => {
                warn!(
                    kind = "server_reset",
                    cause = "deadline",
                    ?deadline,
                    "server connection discarded: reset timed out"
                );
                self.pool.discard(conn);
            }
        }
    }
}
