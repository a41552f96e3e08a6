//! Pool statistics read from live state: one source for the gauges, `/pools`, `SHOW POOLS` and the snapshot log.

use crate::budget::pool::{routes_to_name, Route, RO_DISABLED};
use crate::config::PoolMode;
use crate::context::App;
use crate::telemetry::{tables, Value};
use serde::Serialize;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tracing::info;

/// How often pool figures go to the lake (the history behind "when did this start?").
pub const LAKE_SNAPSHOT_EVERY: Duration = Duration::from_secs(10);
/// The final snapshot is written this long before the drain deadline at the latest (the lake flushes after).
const FINAL_SNAPSHOT_MARGIN: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Serialize)]
pub struct PoolRow {
    pub service: String,
    pub route: &'static str,
    /// The database its servers log in to, and as which role.
    pub database: String,
    pub role: String,
    /// Session mode: the startup settings its servers are opened with (empty: none).
    pub settings: String,
    pub upstream: String,
    pub pool_mode: &'static str,
    pub slice: u32,
    /// Most server connections this process may open for the pool.
    pub share: u32,
    pub size: u32,
    pub available: u32,
    pub in_use: u32,
    pub waiting: u32,
    pub checkout_timeouts: u64,
    pub transactions: u64,
    pub queries: u64,
    /// Read-only routes only: `replica`, `primary_fallthrough` or `disabled`.
    pub ro_routes_to: Option<&'static str>,
    /// Read-only routes only: the tier that makes the guarantee (`replica`, `role`, `session`).
    pub ro_enforcement: Option<&'static str>,
    pub ro_dsn_configured: bool,
    /// Checkouts held by an operator's PAUSE or KILL.
    pub paused: bool,
    /// Admission's hard-reject line (checkouts), when graduated shedding is configured.
    pub shed_line: Option<u32>,
    /// Checkouts refused by admission (hard line or full queue) since start.
    pub shed: u64,
    /// Clients whose server is pinned to them (transaction mode).
    pub pinned: u32,
    /// Named statements the pool's clients share (transaction mode).
    pub prepared_statements: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct UpstreamRow {
    pub upstream: String,
    pub ceiling: u32,
    pub reserved: u32,
    pub slices: u32,
    pub open: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub pools: Vec<PoolRow>,
    pub upstreams: Vec<UpstreamRow>,
    pub clients: i64,
}

impl App {
    /// Read every pool's live figures (and refresh the gauges from them).
    pub fn snapshot(&self) -> Snapshot {
        // One configuration for the whole snapshot, even if a reload lands meanwhile.
        let (all, resolved) = (self.pools(), self.resolved());
        let mut pools = Vec::new();
        let mut groups: std::collections::BTreeMap<(String, &'static str), [i64; 4]> = Default::default();
        for p in all.all() {
            let b = p.budget();
            let st = p.status();
            let route = p.route.as_str();
            let row = PoolRow {
                service: b.name.clone(),
                route,
                database: p.key.database.clone(),
                role: p.key.role.clone(),
                settings: p.key.settings_text(),
                upstream: b.upstream.clone(),
                pool_mode: match b.pool_mode() {
                    PoolMode::Session => "session",
                    PoolMode::Transaction => "transaction",
                },
                slice: b.slice,
                share: p.share(),
                size: st.size as u32,
                available: st.available as u32,
                in_use: (st.size - st.available) as u32,
                waiting: st.waiting as u32,
                checkout_timeouts: p.metrics.checkout_timeouts.get(),
                transactions: p.metrics.transactions.get(),
                queries: p.metrics.queries.get(),
                ro_routes_to: (p.route == Route::ReadOnly).then(|| routes_to_name(p.pool.manager().routes_to())),
                ro_enforcement: (p.route == Route::ReadOnly).then(|| resolved.config.read_only.enforce.as_str()),
                ro_dsn_configured: resolved.replica.is_some(),
                paused: p.control.is_paused(),
                shed_line: p.admission.shed_line(),
                shed: p.admission.count(crate::telemetry::labels::Decision::RejectedHard)
                    + p.admission.count(crate::telemetry::labels::Decision::RejectedQueueFull),
                pinned: p.pinned.load(Ordering::Relaxed),
                prepared_statements: p.statements.len(),
            };
            let g = groups.entry((row.service.clone(), route)).or_insert([0; 4]);
            g[0] += row.size as i64;
            g[1] += row.available as i64;
            g[2] += row.waiting as i64;
            g[3] = row.share as i64;
            let m = &self.metrics;
            m.pool_pinned.with_label_values(&[row.service.as_str(), route]).set(row.pinned as i64);
            if p.route == Route::ReadOnly {
                m.ro_routes_to
                    .with_label_values(&[row.service.as_str(), route])
                    .set(p.pool.manager().routes_to() as i64);
                let tier = resolved.config.read_only.enforce.gauge();
                m.ro_enforcement.with_label_values(&[row.service.as_str()]).set(tier);
            } else if all.get(&row.service, Route::ReadOnly).is_none() {
                m.ro_routes_to.with_label_values(&[row.service.as_str(), "ro"]).set(RO_DISABLED as i64);
            }
            pools.push(row);
        }
        // The gauges are per (service, route): every database's and role's pool of it together.
        for ((service, route), [size, available, waiting, share]) in &groups {
            let l = [service.as_str(), *route];
            let m = &self.metrics;
            m.pool_size.with_label_values(&l).set(*size);
            m.pool_available.with_label_values(&l).set(*available);
            m.pool_waiting.with_label_values(&l).set(*waiting);
            m.pool_max.with_label_values(&l).set(*share);
        }
        let upstreams = all
            .upstreams
            .values()
            .map(|u| {
                let t = &u.target;
                let slices = resolved.upstream_slices(&t.name);
                let row = UpstreamRow {
                    upstream: t.name.clone(),
                    ceiling: t.ceiling,
                    reserved: t.reserved,
                    slices,
                    open: u.open_connections(),
                };
                self.metrics.upstream_open.with_label_values(&[&row.upstream]).set(row.open as i64);
                self.metrics.upstream_ceiling.with_label_values(&[&row.upstream]).set(row.ceiling as i64);
                row
            })
            .collect();
        self.metrics.pools.set(all.len() as i64);
        Snapshot { pools, upstreams, clients: self.metrics.clients_active.get() }
    }

    /// Start the periodic snapshot log once; later calls do nothing. Stops with the process.
    pub fn start_snapshot_log(self: &std::sync::Arc<Self>) {
        let every = self.resolved().config.admin.pool_log_interval;
        if every.is_zero() || self.snapshot_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let app = self.clone();
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            let mut last_timeouts = std::collections::HashMap::new();
            let mut last_rejected = app.rejected_total();
            loop {
                tokio::select! {
                    _ = app.shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let snap = app.snapshot();
                let rejected = app.rejected_total();
                info!(target: "pgbudget::snapshot", interval = ?every, "pool snapshot {}",
                    snapshot_line(&snap, &mut last_timeouts, rejected - last_rejected));
                last_rejected = rejected;
            }
        });
    }

    /// Write every pool's figures to the lake's `pool_snapshots` every [`LAKE_SNAPSHOT_EVERY`], or at the
    /// snapshot log's interval when that is shorter (lake on only). At shutdown, once the sessions have ended
    /// (or just before the drain deadline), one final row per pool carries the marks of the last interval.
    pub fn start_lake_snapshots(self: &std::sync::Arc<Self>) {
        if !self.telemetry.enabled() {
            return;
        }
        let app = self.clone();
        self.tasks.spawn(async move {
            let log_every = app.resolved().config.admin.pool_log_interval;
            let every = if log_every.is_zero() { LAKE_SNAPSHOT_EVERY } else { log_every.min(LAKE_SNAPSHOT_EVERY) };
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = app.shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                app.write_lake_snapshot();
            }
            // The drain waits for this task with the sessions: wait for them, within the drain deadline.
            let deadline = tokio::time::Instant::now()
                + app.resolved().config.proxy.drain_timeout.saturating_sub(FINAL_SNAPSHOT_MARGIN);
            while app.metrics.clients_active.get() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + Duration::from_millis(50))).await;
            }
            app.write_lake_snapshot();
        });
    }

    /// One `pool_snapshots` row per pool: the live figures plus the high-water marks since the previous row
    /// (taken, so the next row starts from zero). Also callable at the end of a drain.
    pub fn write_lake_snapshot(&self) {
        if !self.telemetry.enabled() {
            return;
        }
        let snap = self.snapshot();
        let all = self.pools();
        // The marks are the service's (all its pools together): taken once, written on each of its rows.
        let mut taken = std::collections::HashMap::new();
        for p in &snap.pools {
            let route = if p.route == Route::ReadOnly.as_str() { Route::ReadOnly } else { Route::ReadWrite };
            let marks = *taken.entry((p.service.clone(), route)).or_insert_with(|| {
                all.get(&p.service, route).map(|sp| sp.metrics.high_water.take()).unwrap_or_default()
            });
            let up = snap.upstreams.iter().find(|u| u.upstream == p.upstream);
            self.telemetry.emit(tables::POOL_SNAPSHOTS, || {
                vec![
                    Value::now(),
                    p.service.as_str().into(),
                    p.route.into(),
                    p.upstream.as_str().into(),
                    p.pool_mode.into(),
                    p.share.into(),
                    p.size.into(),
                    p.available.into(),
                    p.in_use.into(),
                    p.waiting.into(),
                    p.checkout_timeouts.into(),
                    p.transactions.into(),
                    p.queries.into(),
                    up.map(|u| u.open).into(),
                    up.map(|u| u.ceiling).into(),
                    snap.clients.into(),
                    marks.max_in_use.max(p.in_use).into(),
                    marks.max_waiting.max(p.waiting).into(),
                    marks.max_wait_ms.into(),
                    marks.waited.into(),
                    p.database.as_str().into(),
                    p.role.as_str().into(),
                ]
            });
        }
    }

    fn rejected_total(&self) -> u64 {
        crate::telemetry::metrics::REJECT_REASONS
            .iter()
            .map(|r| self.metrics.clients_rejected.with_label_values(&[r]).get())
            .sum()
    }
}

/// `pool=web/rw size=3 idle=2 waiting=0 share=15 timeouts=0 ... upstream=primary open=3 ceiling=97 rejected=0`.
pub fn snapshot_line(
    snap: &Snapshot,
    last_timeouts: &mut std::collections::HashMap<String, u64>,
    rejected_since: u64,
) -> String {
    let mut line = String::new();
    for p in &snap.pools {
        let key = format!("{}/{}", p.service, p.route);
        let prev = last_timeouts.insert(key.clone(), p.checkout_timeouts).unwrap_or(0);
        let _ = write!(
            line,
            "pool={key} size={} idle={} waiting={} share={} timeouts={} db={} role={} ",
            p.size,
            p.available,
            p.waiting,
            p.share,
            p.checkout_timeouts - prev,
            p.database,
            p.role
        );
        if let Some(tier) = p.ro_enforcement {
            let _ = write!(line, "enforce={tier} ");
        }
    }
    for u in &snap.upstreams {
        let _ = write!(line, "upstream={} open={} ceiling={} ", u.upstream, u.open, u.ceiling);
    }
    let _ = write!(line, "clients={} rejected={rejected_since}", snap.clients);
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::resolve::Resolved;
    use crate::config::{Config, Env};

    fn app() -> std::sync::Arc<App> {
        let text = "[proxy]\nservice = \"web\"\n[admin]\npool_log_interval = \"1s\"\n\
                    [upstreams.primary]\nurl = \"postgres://u:p@127.0.0.1:1/db\"\nceiling = 10\n\
                    [services.web]\nslice = 3\n";
        let env = Env::default();
        App::new(Resolved::resolve(Config::parse(text).unwrap(), &env).unwrap(), &env)
    }

    #[tokio::test]
    async fn snapshot_log_starts_once() {
        let app = app();
        app.start_snapshot_log();
        app.start_snapshot_log();
        assert_eq!(app.tasks.len(), 1);
        app.shutdown.cancel();
        app.tasks.close();
        tokio::time::timeout(Duration::from_secs(2), app.tasks.wait()).await.expect("the task stops with the process");
    }

    #[test]
    fn snapshot_line_reports_deltas() {
        let app = app();
        let mut snap = app.snapshot();
        snap.pools[0].checkout_timeouts = 5;
        let mut last = std::collections::HashMap::new();
        let line = snapshot_line(&snap, &mut last, 2);
        assert!(line.contains("pool=web/rw size=0 idle=0 waiting=0 share=3 timeouts=5"), "{line}");
        assert!(line.ends_with("upstream=primary open=0 ceiling=10 clients=0 rejected=2"), "{line}");
        snap.pools[0].checkout_timeouts = 7;
        assert!(snapshot_line(&snap, &mut last, 0).contains("timeouts=2"));
    }
}
