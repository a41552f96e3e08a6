//! The error journal: a bounded ring of recent server/upstream errors and a per-(upstream, service) health summary.

use crate::telemetry::{tables, Telemetry, Value};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

pub const CAPACITY: usize = 2000;
/// Errors of these kinds in the window make a pool unhealthy; `query_error` (the client's own SQL failing) does not.
pub const UNHEALTHY_AT: usize = 3;

#[derive(Debug, Clone, Serialize)]
pub struct ErrorRecord {
    /// Seconds since the Unix epoch (fractional).
    pub time: f64,
    pub service: String,
    pub route: String,
    pub upstream: String,
    /// `connect`, `server_error`, `query_error`, `reset`, `budget`.
    pub kind: &'static str,
    pub sqlstate: String,
    pub message: String,
}

#[derive(Debug, Serialize)]
pub struct HealthRow {
    pub upstream: String,
    pub service: String,
    pub errors: usize,
    pub query_errors: usize,
    pub last_error: Option<String>,
    pub healthy: bool,
}

#[derive(Default)]
pub struct Journal {
    ring: Mutex<VecDeque<ErrorRecord>>,
    /// Every recorded error also goes to the lake's `server_errors` table.
    telemetry: Telemetry,
}

fn now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Server SQLSTATE classes that say something about the server, not the client's query.
pub fn kind_for_sqlstate(code: &str) -> &'static str {
    match code.get(..2) {
        Some("08" | "53" | "57" | "58" | "XX" | "F0" | "P0") => "server_error",
        _ => "query_error",
    }
}

impl Journal {
    pub fn new(telemetry: Telemetry) -> Journal {
        Journal { ring: Mutex::default(), telemetry }
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
        self.telemetry.emit(tables::SERVER_ERRORS, || {
            let cols: [Value; 7] = [
                Value::now(),
                service.into(),
                route.into(),
                upstream.into(),
                kind.into(),
                sqlstate.into(),
                message.into(),
            ];
            cols.into()
        });
        let rec = ErrorRecord {
            time: now(),
            service: service.to_owned(),
            route: route.to_owned(),
            upstream: upstream.to_owned(),
            kind,
            sqlstate: sqlstate.to_owned(),
            message: if message.is_empty() { "(no message)".to_owned() } else { message.to_owned() },
        };
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() == CAPACITY {
            ring.pop_front();
        }
        ring.push_back(rec);
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
                last_error: None,
                healthy: true,
            });
            if r.kind == "query_error" {
                row.query_errors += 1;
            } else {
                row.errors += 1;
                row.last_error = Some(format!("{} {}: {}", r.kind, r.sqlstate, r.message));
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
    fn ring_is_bounded_and_health_flags_three_errors() {
        let j = Journal::default();
        for i in 0..CAPACITY + 10 {
            j.record("web", "rw", "primary", "query_error", "22012", &format!("e{i}"));
        }
        assert_eq!(j.recent(usize::MAX).len(), CAPACITY);
        assert_eq!(j.recent(1)[0].message, format!("e{}", CAPACITY + 9));
        let pools = vec![("primary".to_owned(), "web".to_owned())];
        assert!(j.health(Duration::from_secs(60), &pools)[0].healthy, "query errors alone are not unhealthy");
        for _ in 0..3 {
            j.record("web", "rw", "primary", "connect", "08006", "refused");
        }
        let h = j.health(Duration::from_secs(60), &pools);
        assert!(!h[0].healthy && h[0].errors == 3);
        assert_eq!(kind_for_sqlstate("57P01"), "server_error");
        assert_eq!(kind_for_sqlstate("22012"), "query_error");
    }
}
