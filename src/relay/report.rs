//! What the relay reports: checkout failures and server errors to the metrics, the error journal and the lake,
//! and completed transactions to the pool and session counters.

use super::pump::Seen;
use super::Relay;
use crate::budget::pool::Route;
use crate::error::ProxyError;
use crate::telemetry::{tables, Value};
use std::time::Instant;
use tracing::warn;

impl Relay {
    /// Count and journal a failed checkout (and write timeouts to the lake). The proxy's own refusals (`budget`,
    /// `ceiling`, `load_shed`) are journalled for `/errors` but never written to the lake's `server_errors`:
    /// they have their own tables (`checkout_timeouts`, `admission_decisions`).
    pub(super) fn note_checkout_error(&self, e: &ProxyError) {
        let b = self.pool.budget();
        let route = self.pool.route.as_str();
        let timeout_row = |waited: &std::time::Duration, share: u32| {
            self.pool.metrics.checkout_timeouts.inc();
            let st = self.pool.status();
            self.app.telemetry.emit(tables::CHECKOUT_TIMEOUTS, || {
                vec![
                    Value::now(),
                    b.name.as_str().into(),
                    route.into(),
                    b.upstream.as_str().into(),
                    (waited.as_secs_f64() * 1000.0).into(),
                    share.into(),
                    (st.size as u32).into(),
                    (st.waiting as u32).into(),
                ]
            });
        };
        let (kind, label) = match e {
            ProxyError::BudgetExhausted { waited, share, .. } => {
                timeout_row(waited, *share);
                ("budget", None)
            }
            // Waited out `checkout_timeout` at the upstream's ceiling: a checkout timeout as well.
            ProxyError::CeilingReached { waited, share, .. } => {
                timeout_row(waited, *share);
                ("ceiling", None)
            }
            ProxyError::Shed { .. } => ("load_shed", None),
            ProxyError::Upstream { .. } => ("connect", Some("connect")),
            // A session setting the client asked for, refused by the server: usually the client's own value.
            ProxyError::ServerRejected { code, .. } => {
                let kind = crate::telemetry::journal::kind_for_sqlstate(code);
                (kind, Some(kind))
            }
            _ => return,
        };
        if let Some(l) = label {
            self.app.metrics.server_errors.with_label_values(&[&b.name, route, l]).inc();
        }
        let (_, code, msg) = e.to_client();
        self.app.journal.record(&b.name, route, &b.upstream, kind, code, &msg);
    }

    /// Count what a server chunk completed and journal the errors it carried.
    pub(super) fn note_seen(&mut self, seen: &mut Seen) {
        let m = &self.pool.metrics;
        if seen.idle_ready > 0 {
            m.transactions.inc_by(seen.idle_ready as u64);
            self.counts.transactions += seen.idle_ready as u64;
            if let Some(t) = self.tx_started.take() {
                // The ReadyForQuery that ended it was just read (the pump read the clock then if it tracks
                // activity); the same reading stamps the server's check-in.
                let end = self.pump.last_activity.filter(|_| self.pump.track_activity).unwrap_or_else(Instant::now);
                m.tx_duration.observe(end.saturating_duration_since(t).as_secs_f64());
                self.ended_at = Some(end);
            }
        }
        if seen.errors.is_empty() {
            return;
        }
        let b = self.pool.budget();
        let route = self.pool.route.as_str();
        for (code, message) in seen.errors.drain(..) {
            let kind = crate::telemetry::journal::kind_for_sqlstate(&code);
            self.app.metrics.server_errors.with_label_values(&[&b.name, route, kind]).inc();
            self.app.journal.record(&b.name, route, &b.upstream, kind, &code, &message);
        }
    }

    /// Move the pump's session counts into the session and the pool metrics.
    pub(super) fn take_counts(&mut self) {
        let p = &mut self.pump;
        let m = &self.pool.metrics;
        if p.queries > 0 {
            m.queries.inc_by(p.queries);
            self.counts.queries += p.queries;
        }
        m.bytes_from_client.inc_by(p.bytes_in);
        m.bytes_to_client.inc_by(p.bytes_out);
        self.counts.bytes_in += p.bytes_in;
        self.counts.bytes_out += p.bytes_out;
        (p.queries, p.bytes_in, p.bytes_out) = (0, 0, 0);
    }

    /// Report what the pump saw: transactions, server errors, settings, read-only refusals.
    pub(super) fn report(&mut self) {
        let mut seen = std::mem::take(&mut self.pump.seen);
        if let Some(c) = self.server.as_mut() {
            for (k, v) in seen.params.drain(..) {
                // The tripwire: a read-only route's server says read-only is off (outside the proxy's own
                // statements, which never pass through the pump).
                let off = self.pool.route == Route::ReadOnly
                    && crate::read_only::policy::is_read_only_setting(&k)
                    && !v.eq_ignore_ascii_case("on");
                if off && self.tripped.is_none() {
                    self.tripped = Some(format!("{k} = {v}"));
                }
                c.set_param(k, v);
            }
        }
        self.note_seen(&mut seen);
        if !self.pump.violations.is_empty() {
            self.note_violations();
        }
    }

    fn note_violations(&mut self) {
        let route = self.pump.ro.as_ref().map(|f| f.route.clone()).unwrap_or_default();
        for v in std::mem::take(&mut self.pump.violations) {
            warn!(kind = "read_only_violation", service = %self.pool.budget().name, route = %route,
                client = %self.peer, fingerprint = %v.fingerprint, reason = v.reason,
                "read-only route refused a statement");
            self.count_violation(&route, v.reason, &v.fingerprint);
        }
    }

    /// One read-only violation: the counter and the lake's `ro_violations` row (`detail`: a fingerprint or what
    /// the tripwire saw, never a constant).
    fn count_violation(&self, route: &str, reason: &str, detail: &str) {
        let b = self.pool.budget();
        self.app.metrics.ro_violations.with_label_values(&[&b.name, route]).inc();
        self.app.telemetry.emit(tables::RO_VIOLATIONS, || {
            vec![
                Value::now(),
                b.name.as_str().into(),
                route.into(),
                self.peer.to_string().into(),
                reason.into(),
                detail.into(),
            ]
        });
    }

    /// After a report: the tripwire fired, so the session ends with FATAL 25006, its server is discarded (never
    /// back in the pool), and the violation is counted, logged and written to the lake.
    pub(super) fn tripwire(&mut self) -> Option<ProxyError> {
        let what = self.tripped.take()?;
        if let Some(c) = self.server.as_mut() {
            c.broken = true;
        }
        let route = self.pump.ro.as_ref().map(|f| f.route.clone()).unwrap_or_default();
        warn!(kind = "read_only_tripwire", service = %self.pool.budget().name, route = %route, client = %self.peer,
            setting = %what, "read-only route: the server reports read-only off; session ended, server discarded");
        self.count_violation(&route, "tripwire", &what);
        Some(ProxyError::ReadOnly { route, what: format!("a session whose server reports {what} (tripwire)") })
    }
}
