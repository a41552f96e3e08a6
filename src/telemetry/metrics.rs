//! Prometheus metrics: one registry per process (owned by `App`, not global), label values only from
//! configuration, and per-pool handles resolved once so the hot path only does atomic adds.

use crate::telemetry::high_water::HighWater;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Why a client connection was refused or ended at login (fixed set, never client text).
pub const REJECT_REASONS: [&str; 11] = [
    "auth",
    "unknown_service",
    "unknown_database",
    "bad_parameter",
    "read_only",
    "shutting_down",
    "budget",
    "upstream",
    "protocol",
    "pending_logins",
    "max_pools",
];

pub struct Metrics {
    pub registry: Registry,
    pub pool_size: IntGaugeVec,
    pub pool_available: IntGaugeVec,
    pub pool_waiting: IntGaugeVec,
    pub pool_max: IntGaugeVec,
    pub pool_pinned: IntGaugeVec,
    pub ro_routes_to: IntGaugeVec,
    /// How a service's read-only route is enforced: 1 replica, 2 role, 3 session.
    pub ro_enforcement: IntGaugeVec,
    pub upstream_open: IntGaugeVec,
    pub upstream_ceiling: IntGaugeVec,
    pub clients_accepted: IntCounter,
    pub clients_rejected: IntCounterVec,
    pub clients_active: IntGauge,
    /// Pools open now, one per (service, route, database, upstream role); at most `proxy.max_pools`.
    pub pools: IntGauge,
    /// Clients between accept and the end of authentication (login slots in use).
    pub clients_logging_in: IntGauge,
    checkout_timeouts: IntCounterVec,
    transactions: IntCounterVec,
    queries: IntCounterVec,
    pub server_errors: IntCounterVec,
    pub ro_violations: IntCounterVec,
    admission: IntCounterVec,
    bytes: IntCounterVec,
    checkout_wait: HistogramVec,
    tx_duration: HistogramVec,
    prepared: IntCounterVec,
    pinned: IntCounterVec,
    /// Per (service, route), kept across reloads (a rebuilt pool resolves the same marks).
    high_water: Mutex<HashMap<(String, String), Arc<HighWater>>>,
}

/// Counter handles for one (service, route), resolved at pool build.
#[derive(Clone)]
pub struct PoolMetrics {
    pub checkout_timeouts: IntCounter,
    pub transactions: IntCounter,
    pub queries: IntCounter,
    pub bytes_from_client: IntCounter,
    pub bytes_to_client: IntCounter,
    pub checkout_wait: Histogram,
    pub tx_duration: Histogram,
    /// Named statements: found on the server, prepared on it, closed to make room.
    pub prepared_hits: IntCounter,
    pub prepared_misses: IntCounter,
    pub prepared_evictions: IntCounter,
    /// Pins by reason, in [`crate::telemetry::labels::PIN_REASONS`] order.
    pub pinned: Vec<IntCounter>,
    /// Peaks since the last `pool_snapshots` row.
    pub high_water: Arc<HighWater>,
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &["service", "route"]).expect("valid");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let sr = ["service", "route"];
        let m = Metrics {
            pool_size: gauge(&r, "pgbudget_pool_size", "Server connections open in the pool", &sr),
            pool_available: gauge(&r, "pgbudget_pool_available", "Idle server connections in the pool", &sr),
            pool_waiting: gauge(&r, "pgbudget_pool_waiting", "Clients queued for a server connection", &sr),
            pool_max: gauge(&r, "pgbudget_pool_max", "The pool's share: most server connections it may open", &sr),
            pool_pinned: gauge(
                &r,
                "pgbudget_pool_pinned",
                "Clients whose server connection is pinned to them (transaction mode: LISTEN, temp tables, ...)",
                &sr,
            ),
            ro_routes_to: gauge(
                &r,
                "pgbudget_ro_routes_to",
                "Where a read-only route goes: 1 replica, 2 primary_fallthrough, 3 disabled",
                &sr,
            ),
            ro_enforcement: gauge(
                &r,
                "pgbudget_ro_enforcement",
                "How a read-only route's guarantee is made: 1 replica, 2 role, 3 session",
                &["service"],
            ),
            upstream_open: gauge(
                &r,
                "pgbudget_upstream_connections",
                "Server connections open to the upstream",
                &["upstream"],
            ),
            upstream_ceiling: gauge(
                &r,
                "pgbudget_upstream_ceiling",
                "Connection ceiling of the upstream",
                &["upstream"],
            ),
            clients_accepted: {
                let c = IntCounter::new("pgbudget_client_connections_accepted_total", "Client logins accepted")
                    .expect("valid");
                r.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            clients_rejected: counter(
                &r,
                "pgbudget_client_connections_rejected_total",
                "Client connections refused at login, by reason",
                &["reason"],
            ),
            clients_active: {
                let g = IntGauge::new("pgbudget_clients_active", "Client sessions currently open").expect("valid");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            pools: {
                let g = IntGauge::new(
                    "pgbudget_pools",
                    "Pools open, one per service, route, database and upstream role (at most proxy.max_pools)",
                )
                .expect("valid");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            clients_logging_in: {
                let g = IntGauge::new(
                    "pgbudget_clients_logging_in",
                    "Clients connected but not yet logged in (bounded by proxy.max_pending_logins)",
                )
                .expect("valid");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            checkout_timeouts: counter(
                &r,
                "pgbudget_checkout_timeouts_total",
                "Checkouts that found no server connection within checkout_timeout (answered 53300)",
                &sr,
            ),
            transactions: counter(
                &r,
                "pgbudget_transactions_total",
                "Transactions completed (ReadyForQuery idle)",
                &sr,
            ),
            queries: counter(&r, "pgbudget_queries_total", "Query and Execute messages relayed", &sr),
            server_errors: counter(
                &r,
                "pgbudget_server_errors_total",
                "Errors from or about server connections, by kind",
                &["service", "route", "kind"],
            ),
            ro_violations: counter(
                &r,
                "pgbudget_ro_violations_total",
                "Statements a read-only route refused (write or bypass attempts)",
                &["service", "route"],
            ),
            admission: counter(
                &r,
                "pgbudget_admission_total",
                "Admission decisions per checkout: admitted, queued, rejected_queue_full, rejected_hard, timed_out, \
                 exempt, abandoned",
                &["service", "decision"],
            ),
            bytes: counter(
                &r,
                "pgbudget_bytes_total",
                "Bytes relayed, by direction",
                &["service", "route", "direction"],
            ),
            checkout_wait: histogram(
                &r,
                "pgbudget_checkout_wait_seconds",
                "Time a client waited for a server connection",
                vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ],
            ),
            tx_duration: histogram(
                &r,
                "pgbudget_transaction_duration_seconds",
                "Time from a transaction's first message to its idle ReadyForQuery",
                vec![0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0],
            ),
            prepared: counter(
                &r,
                "pgbudget_prepared_statements_total",
                "Named statements of transaction-mode clients: hit (already on the server), miss (prepared on it), \
                 eviction (closed to make room under max_prepared_statements)",
                &["service", "route", "result"],
            ),
            pinned: counter(
                &r,
                "pgbudget_pinned_total",
                "Clients whose server was pinned to them in transaction mode, by the state that pinned it",
                &["service", "reason"],
            ),
            registry: r,
            high_water: Mutex::default(),
        };
        for reason in REJECT_REASONS {
            m.clients_rejected.with_label_values(&[reason]);
        }
        m
    }

    /// Resolve the hot-path handles of one pool (also makes its series visible at zero).
    pub fn pool(&self, service: &str, route: &str) -> PoolMetrics {
        let l = [service, route];
        for kind in ["connect", "query_error", "server_error", "reset"] {
            self.server_errors.with_label_values(&[service, route, kind]);
        }
        PoolMetrics {
            checkout_timeouts: self.checkout_timeouts.with_label_values(&l),
            transactions: self.transactions.with_label_values(&l),
            queries: self.queries.with_label_values(&l),
            bytes_from_client: self.bytes.with_label_values(&[service, route, "client_to_server"]),
            bytes_to_client: self.bytes.with_label_values(&[service, route, "server_to_client"]),
            checkout_wait: self.checkout_wait.with_label_values(&l),
            tx_duration: self.tx_duration.with_label_values(&l),
            prepared_hits: self.prepared.with_label_values(&[service, route, "hit"]),
            prepared_misses: self.prepared.with_label_values(&[service, route, "miss"]),
            prepared_evictions: self.prepared.with_label_values(&[service, route, "eviction"]),
            pinned: crate::telemetry::labels::PIN_REASONS
                .iter()
                .map(|r| self.pinned.with_label_values(&[service, r]))
                .collect(),
            high_water: self
                .high_water
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry((service.to_owned(), route.to_owned()))
                .or_default()
                .clone(),
        }
    }

    /// `pgbudget_admission_total` handles of one service, in [`crate::telemetry::labels::Decision::ALL`] order.
    pub fn admission(&self, service: &str) -> [IntCounter; 7] {
        crate::telemetry::labels::Decision::ALL.map(|d| self.admission.with_label_values(&[service, d.as_str()]))
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is utf-8")
    }
}
