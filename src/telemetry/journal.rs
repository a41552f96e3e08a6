//! The error journal: a bounded ring of recent server/upstream errors and a per-(upstream, service) health summary.

use crate::telemetry::{tables, Telemetry, Value};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

pub const CAPACITY: usize = 2000;
/// Upstream-side errors of one pool in the window that make it unhealthy; the client's own SQL failing
/// (`query_error`) and the proxy's own refusals (`budget`, `ceiling`, `load_shed`) never do.
pub const UNHEALTHY_AT: usize = 3;

/// Kinds that say what the upstream did (they go to the lake's `server_errors` and count for health).
pub const UPSTREAM_KINDS: [&str; 3] = ["connect", "server_error", "reset"];
/// The proxy's own refusals of a checkout (53300): visible in `/errors`, never in `server_errors`.
pub const REFUSAL_KINDS: [&str; 3] = ["budget", "ceiling", "load_shed"];
/// The client's own SQL (or session setting) failing.
pub const QUERY_ERROR: &str = "query_error";

#[derive(Debug, Clone, Serialize)]
pub struct ErrorRecord {
    /// Seconds since the Unix epoch (fractional).
    pub time: f64,
    pub service: String,
    pub route: String,
    pub upstream: String,
    /// One of [`UPSTREAM_KINDS`], [`REFUSAL_KINDS`] or [`QUERY_ERROR`].
    pub kind: &'static str,
    pub sqlstate: String,
    /// Redacted (see [`crate::telemetry::redact`]) unless the journal was built without redaction.
    pub message: String,
}

#[derive(Debug, Serialize)]
pub struct HealthRow {
    pub upstream: String,
    pub service: String,
    /// Upstream-side errors ([`UPSTREAM_KINDS`]).
    pub errors: usize,
    pub query_errors: usize,
    /// The proxy's own refusals ([`REFUSAL_KINDS`]).
    pub refusals: usize,
    pub last_error: Option<String>,
    pub healthy: bool,
}

pub struct Journal {
    ring: Mutex<VecDeque<ErrorRecord>>,
    /// Upstream-side records also go to the lake's `server_errors` table.
    telemetry: Telemetry,
    /// Messages are redacted before they are kept, logged or written (on unless built for development).
    redact: bool,
}

impl Default for Journal {
    fn default() -> Self {
        Journal::new(Telemetry::default())
    }
}

fn now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The journal kind of an error a server sent, by SQLSTATE class: connection (`08`), resources (`53`),
/// shutdown and crash (`57P0x`), system (`58`), internal (`XX`), authorization (`28`) and configuration files
/// (`F0`) say something about the server; everything else (`P0` RAISE, `22` data, `23` constraints, `42`
/// syntax and access, `40` rollbacks, `57014` cancel, ...) is the client's own SQL.
pub fn kind_for_sqlstate(code: &str) -> &'static str {
    let class = code.get(..2);
    if matches!(class, Some("08" | "53" | "58" | "XX" | "28" | "F0")) || code.starts_with("57P0") {
        "server_error"
    } else {
        QUERY_ERROR
    }
}

/// Whether a kind says what the upstream did (lake `server_errors`, health).
pub fn is_upstream(kind: &str) -> bool {
    UPSTREAM_KINDS.contains(&kind)
}

/// The journal's own name for a kind read back from the lake (`None`: not a kind this version knows).
pub fn known_kind(kind: &str) -> Option<&'static str> {
    UPSTREAM_KINDS.iter().chain(&REFUSAL_KINDS).chain(std::iter::once(&QUERY_ERROR)).find(|k| **k == kind).copied()
}

impl Journal {
    /// A journal that redacts messages.
    pub fn new(telemetry: Telemetry) -> Journal {
        Journal::with_redaction(telemetry, true)
    }

    /// `redact = false` keeps messages verbatim (development only: they may quote values and literals).
    pub fn with_redaction(telemetry: Telemetry, redact: bool) -> Journal {
        Journal { ring: Mutex::default(), telemetry, redact }
    }

    /// A message as this journal keeps and logs it.
    pub fn redacted<'a>(&self, message: &'a str) -> std::borrow::Cow<'a, str> {
        if self.redact {
            crate::telemetry::redact::redact(message)
        } else {
            std::borrow::Cow::Borrowed(message)
        }
    }

    pub fn record(
        &self,
        service: &str,
        route: &str,
        upstream: &str,
        kind: &'static str,
        sqlstate: &str,
        message: &str,
    ) {
        let message = self.redacted(message);
        if is_upstream(kind) {
            self.telemetry.emit(tables::SERVER_ERRORS, || {
                let cols: [Value; 7] = [
                    Value::now(),
                    service.into(),
                    route.into(),
                    upstream.into(),
                    kind.into(),
                    sqlstate.into(),
                    message.as_ref().into(),
                ];
                cols.into()
            });
        }
        let rec = ErrorRecord {
            time: now(),
            service: service.to_owned(),
            route: route.to_owned(),
            upstream: upstream.to_owned(),
            kind,
            sqlstate: sqlstate.to_owned(),
            message: if message.is_empty() { "(no message)".to_owned() } else { message.into_owned() },
        };
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() == CAPACITY {
            ring.pop_front();
        }
        ring.push_back(rec);
    }

    /// Put records from before this process started (the lake's `server_errors`) behind the ones recorded
    /// since: only those older than the oldest record in the ring are taken, newest kept when they do not all
    /// fit. Messages are redacted again (rows written before redaction existed). Returns how many were taken.
    pub fn refill(&self, rows: impl IntoIterator<Item = ErrorRecord>) -> usize {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = ring.front().map_or(f64::INFINITY, |r| r.time);
        let mut old: Vec<ErrorRecord> = rows.into_iter().filter(|r| r.time < oldest).collect();
        old.sort_by(|a, b| b.time.total_cmp(&a.time));
        old.truncate(CAPACITY - ring.len());
        let n = old.len();
        for mut r in old {
            if let std::borrow::Cow::Owned(m) = self.redacted(&r.message) {
                r.message = m;
            }
            ring.push_front(r);
        }
        n
    }

    /// The newest `n` records, newest first.
    pub fn recent(&self, n: usize) -> Vec<ErrorRecord> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter().rev().take(n).cloned().collect()
    }

    /// Per (upstream, service): errors in the last `window`, flagged unhealthy at [`UNHEALTHY_AT`].
    pub fn health(&self, window: Duration, pools: &[(String, String)]) -> Vec<HealthRow> {
        let since = now() - window.as_secs_f64();
        let mut rows: BTreeMap<(String, String), HealthRow> = pools
            .iter()
            .map(|(u, s)| {
                let row = HealthRow {
                    upstream: u.clone(),
                    service: s.clone(),
                    errors: 0,
                    query_errors: 0,
                    refusals: 0,
                    last_error: None,
                    healthy: true,
                };
                ((u.clone(), s.clone()), row)
            })
            .collect();
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        for r in ring.iter().filter(|r| r.time >= since) {
            let row = rows.entry((r.upstream.clone(), r.service.clone())).or_insert_with(|| HealthRow {
                upstream: r.upstream.clone(),
                service: r.service.clone(),
                errors: 0,
                query_errors: 0,
                refusals: 0,
                last_error: None,
                healthy: true,
            });
            if is_upstream(r.kind) {
                row.errors += 1;
                row.last_error = Some(format!("{} {}: {}", r.kind, r.sqlstate, r.message));
            } else if r.kind == QUERY_ERROR {
                row.query_errors += 1;
            } else {
                row.refusals += 1;
            }
        }
        rows.into_values()
            .map(|mut r| {
                r.healthy = r.errors < UNHEALTHY_AT;
                r
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_is_bounded_and_health_flags_three_upstream_errors() {
        let j = Journal::default();
        for i in 0..CAPACITY + 10 {
            j.record("web", "rw", "primary", "query_error", "22012", &format!("e{i}"));
        }
        assert_eq!(j.recent(usize::MAX).len(), CAPACITY);
        assert_eq!(j.recent(1)[0].message, format!("e{}", CAPACITY + 9));
        let pools = vec![("primary".to_owned(), "web".to_owned())];
        assert!(j.health(Duration::from_secs(60), &pools)[0].healthy, "query errors alone are not unhealthy");
        for kind in REFUSAL_KINDS {
            j.record("web", "rw", "primary", kind, "53300", "pgbudget: refused");
        }
        let h = j.health(Duration::from_secs(60), &pools);
        assert!(
            h[0].healthy && h[0].refusals == 3 && h[0].errors == 0,
            "the proxy's own refusals are not the upstream's"
        );
        for _ in 0..3 {
            j.record("web", "rw", "primary", "connect", "08006", "refused");
        }
        let h = j.health(Duration::from_secs(60), &pools);
        assert!(!h[0].healthy && h[0].errors == 3);
    }

    #[test]
    fn sqlstate_classes() {
        for code in
            ["08006", "08P01", "53300", "53200", "57P01", "57P02", "57P03", "58030", "XX000", "28P01", "28000", "F0000"]
        {
            assert_eq!(kind_for_sqlstate(code), "server_error", "{code}");
        }
        for code in [
            "P0001", "P0004", "22012", "22P02", "23505", "42P01", "42601", "40001", "40P01", "57014", "57000", "3D000",
            "25006", "0A000", "", "5", "\u{e9}x",
        ] {
            assert_eq!(kind_for_sqlstate(code), QUERY_ERROR, "{code}");
        }
    }

    #[test]
    fn messages_are_redacted_unless_switched_off() {
        let j = Journal::default();
        j.record("web", "rw", "primary", "query_error", "23505", "Key (email)=(bob@x.io) already exists.");
        assert_eq!(j.recent(1)[0].message, "Key (email)=(…) already exists.");
        let dev = Journal::with_redaction(Telemetry::default(), false);
        dev.record("web", "rw", "primary", "query_error", "23505", "Key (email)=(bob@x.io) already exists.");
        assert_eq!(dev.recent(1)[0].message, "Key (email)=(bob@x.io) already exists.");
    }

    #[test]
    fn refill_goes_behind_newer_records_and_respects_capacity() {
        let j = Journal::default();
        j.record("web", "rw", "primary", "connect", "08006", "new");
        let t = now();
        let rec = |dt: f64, msg: &str| ErrorRecord {
            time: t + dt,
            service: "web".into(),
            route: "rw".into(),
            upstream: "primary".into(),
            kind: "server_error",
            sqlstate: "57P01".into(),
            message: msg.into(),
        };
        let n = j.refill(vec![rec(-20.0, "older"), rec(-10.0, "old 'x'"), rec(10.0, "after the newest: skipped")]);
        assert_eq!(n, 2);
        let msgs: Vec<String> = j.recent(10).into_iter().map(|r| r.message).collect();
        assert_eq!(msgs, ["new", "old '…'", "older"]);
        let many = (0..CAPACITY + 5).map(|i| rec(-100.0 - i as f64, "m"));
        assert_eq!(j.refill(many), CAPACITY - 3);
        assert_eq!(j.recent(usize::MAX).len(), CAPACITY);
        assert_eq!(known_kind("server_error"), Some("server_error"));
        assert_eq!(known_kind("nonsense"), None);
    }
}
