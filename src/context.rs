//! Process-wide shared state (passed as `Arc<App>`, no globals) that every session and operator command reads,
//! and the swap of it a reload makes; `app` runs the process around it (accept loop, background tasks, shutdown).

use crate::budget::cancel::CancelRegistry;
use crate::budget::pools::Pools;
use crate::config::reload::{ReloadError, ReloadSummary};
use crate::config::resolve::Resolved;
use crate::config::users::UserDb;
use crate::config::{Config, Env};
use crate::telemetry::journal::Journal;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::Telemetry;
use arc_swap::ArcSwap;
use dashmap::DashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// Everything a session or background task needs.
pub struct App {
    /// The configuration in force; a reload swaps it whole.
    resolved: ArcSwap<Resolved>,
    users: ArcSwap<UserDb>,
    pools: ArcSwap<Pools>,
    /// The process environment the configuration was resolved with (reloads use it again).
    pub env: Env,
    pub metrics: Metrics,
    pub journal: Journal,
    /// Rows for the lake (a no-op when it is off).
    pub telemetry: Telemetry,
    /// The lake, when it is enabled in this process (it is also where `telemetry` writes).
    #[cfg(feature = "lake")]
    lake: Option<Arc<crate::lake::Lake>>,
    pub cancels: Arc<CancelRegistry>,
    /// Fired once to start a graceful shutdown ([`App::begin_shutdown`]).
    pub shutdown: CancellationToken,
    /// The same for client sessions, which poll it on every wake (see [`crate::budget::signal`]).
    pub stopping: Arc<crate::budget::signal::Signal>,
    /// Every client session and background task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    next_session: AtomicU64,
    pub started: Instant,
    pub snapshot_started: AtomicBool,
    /// Logged-in clients, for `SHOW CLIENTS`.
    pub clients: DashMap<u64, ClientInfo>,
    /// The budgets.toml this process runs from (what `RELOAD` and SIGHUP re-read).
    pub config_path: std::sync::OnceLock<std::path::PathBuf>,
    /// Slots for clients that have connected but not finished logging in (`proxy.max_pending_logins`).
    pub login_slots: LoginSlots,
}

/// A bounded number of clients between accept and the end of authentication, so unauthenticated
/// connections cannot pile up without limit; sized once at startup (changing it needs a restart).
pub struct LoginSlots {
    sem: Arc<Semaphore>,
    max: u32,
    gauge: prometheus::IntGauge,
    /// When a refusal was last logged (ms since `epoch`), so a flood logs one line per 10 s.
    last_warn_ms: AtomicU64,
    epoch: Instant,
}

/// One client's login slot; freed (and the `pgbudget_clients_logging_in` gauge lowered) on Drop.
pub struct LoginPermit {
    _permit: OwnedSemaphorePermit,
    gauge: prometheus::IntGauge,
}

impl Drop for LoginPermit {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl LoginSlots {
    pub fn new(max: u32, gauge: prometheus::IntGauge) -> LoginSlots {
        LoginSlots {
            sem: Arc::new(Semaphore::new(max as usize)),
            max,
            gauge,
            last_warn_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// A free slot, or `None` when `max` clients are logging in already. Never waits.
    pub fn try_acquire(&self) -> Option<LoginPermit> {
        let permit = self.sem.clone().try_acquire_owned().ok()?;
        self.gauge.inc();
        Some(LoginPermit { _permit: permit, gauge: self.gauge.clone() })
    }

    pub fn max(&self) -> u32 {
        self.max
    }

    /// Slots in use right now.
    pub fn in_use(&self) -> usize {
        self.max as usize - self.sem.available_permits()
    }

    /// True at most once per 10 s: whether a refusal should be logged.
    pub fn should_warn(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64 + 10_000;
        let last = self.last_warn_ms.load(Ordering::Relaxed);
        now >= last + 10_000
            && self.last_warn_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

/// What the console shows of a client session.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub addr: SocketAddr,
    pub user: String,
    pub database: String,
    pub service: String,
    pub application_name: String,
    pub connected_at: SystemTime,
    /// The client's cancel key (pid, secret), which also tells whether the client holds a server now.
    pub key: (i32, i32),
    /// Its pool's startup settings (`PoolKey::settings_text`), to count it under the right pool.
    pub settings: String,
    /// Why its server is pinned to it (bits in [`crate::telemetry::labels::PIN_REASONS`] order; 0: not pinned).
    pub pins: Arc<std::sync::atomic::AtomicU8>,
}

/// A registered client; unregisters and decrements the active gauge on Drop.
pub struct ClientGuard {
    app: Arc<App>,
    id: u64,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.app.clients.remove(&self.id);
        self.app.metrics.clients_active.dec();
    }
}

impl App {
    pub fn new(resolved: Resolved, env: &Env) -> Arc<App> {
        Self::with_telemetry(resolved, env, Metrics::new(), Telemetry::default())
    }

    /// Build the app around metrics and a telemetry sink made beforehand.
    pub fn with_telemetry(resolved: Resolved, env: &Env, metrics: Metrics, telemetry: Telemetry) -> Arc<App> {
        Arc::new(Self::build(resolved, env, metrics, telemetry))
    }

    /// Build the app around metrics made beforehand and the lake opened with them (the lake registers its
    /// metrics); telemetry rows go to the lake.
    #[cfg(feature = "lake")]
    pub fn with_lake(
        resolved: Resolved,
        env: &Env,
        metrics: Metrics,
        lake: Option<Arc<crate::lake::Lake>>,
    ) -> Arc<App> {
        let telemetry = Telemetry::new(lake.clone().map(|l| l as Arc<dyn crate::telemetry::Sink>));
        Arc::new(App { lake, ..Self::build(resolved, env, metrics, telemetry) })
    }

    fn build(resolved: Resolved, env: &Env, metrics: Metrics, telemetry: Telemetry) -> App {
        let redact = resolved.config.admin.redact;
        let users = UserDb::build(&resolved, env);
        let pools = Pools::build(&resolved, &metrics);
        let login_slots = LoginSlots::new(resolved.config.proxy.max_pending_logins, metrics.clients_logging_in.clone());
        App {
            resolved: ArcSwap::from_pointee(resolved),
            users: ArcSwap::from_pointee(users),
            pools: ArcSwap::from_pointee(pools),
            env: env.clone(),
            metrics,
            journal: Journal::with_redaction(telemetry.clone(), redact),
            telemetry,
            #[cfg(feature = "lake")]
            lake: None,
            cancels: Arc::new(CancelRegistry::default()),
            shutdown: CancellationToken::new(),
            stopping: Default::default(),
            tasks: TaskTracker::new(),
            next_session: AtomicU64::new(1),
            started: Instant::now(),
            snapshot_started: AtomicBool::new(false),
            clients: DashMap::new(),
            config_path: std::sync::OnceLock::new(),
            login_slots,
        }
    }

    /// The lake, when it is enabled in this process.
    #[cfg(feature = "lake")]
    pub fn lake(&self) -> Option<&Arc<crate::lake::Lake>> {
        self.lake.as_ref()
    }

    /// Start a graceful shutdown: stop accepting, and let every session end at its next idle boundary.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
        self.stopping.fire();
    }

    pub fn resolved(&self) -> Arc<Resolved> {
        self.resolved.load_full()
    }

    pub fn users(&self) -> Arc<UserDb> {
        self.users.load_full()
    }

    pub fn pools(&self) -> Arc<Pools> {
        self.pools.load_full()
    }

    /// Reload from the file the process was started with.
    pub fn reload(&self) -> Result<ReloadSummary, ReloadError> {
        let Some(path) = self.config_path.get() else {
            let e = ReloadError::NoConfigFile;
            tracing::warn!(kind = "reload", cause = %e, "reload refused; the old configuration stays in force");
            return Err(e);
        };
        self.reload_from(path)
    }

    /// One `config_reloads` row: `startup`, `applied` or `refused`, a hash of the resolved table, the reason.
    pub fn record_config(&self, outcome: &'static str, detail: &str, violations: u32) {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.resolved().table().hash(&mut h);
        let hash = format!("{:016x}", h.finish());
        self.telemetry.emit(crate::telemetry::tables::CONFIG_RELOADS, || {
            use crate::telemetry::Value;
            vec![Value::now(), outcome.into(), hash.into(), violations.into(), detail.into()]
        });
    }

    /// Check every read-only route's `replica` or `role` tier once now (startup, reload) on a connection of its
    /// own, closed afterwards, and log the verdict. The same check runs on every new server connection of the
    /// route, so a failing route serves nothing meanwhile. (The `session` tier has nothing to check up front.)
    pub fn verify_read_only(&self) {
        let tier = self.resolved().config.read_only.enforce;
        let pools: Vec<_> =
            self.pools().all().into_iter().filter(|p| p.route == crate::budget::pool::Route::ReadOnly).collect();
        if pools.is_empty() || tier == crate::config::Enforce::Session {
            return;
        }
        let stop = self.shutdown.clone();
        self.tasks.spawn(async move {
            for p in pools {
                let service = p.key.service.clone();
                let checked = tokio::select! {
                    r = p.checkout_within(Duration::from_secs(10)) => r,
                    _ = stop.cancelled() => return,
                };
                match checked {
                    Ok(conn) => {
                        drop(deadpool::managed::Object::take(conn));
                        info!(%service, tier = tier.as_str(), "read-only route verified");
                    }
                    Err(e) => tracing::error!(%service, tier = tier.as_str(), cause = %e,
                        "read-only route is not served: its check failed"),
                }
            }
        });
    }

    /// Install a reloaded configuration (see `reload`); sessions already running keep what they hold.
    pub(crate) fn install(&self, resolved: Resolved, users: UserDb, pools: Pools) {
        self.pools.store(Arc::new(pools));
        self.users.store(Arc::new(users));
        self.resolved.store(Arc::new(resolved));
    }

    pub fn session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Register a logged-in client until the guard drops.
    pub fn register_client(self: &Arc<Self>, id: u64, info: ClientInfo) -> ClientGuard {
        self.clients.insert(id, info);
        self.metrics.clients_accepted.inc();
        self.metrics.clients_active.inc();
        ClientGuard { app: self.clone(), id }
    }
}

impl App {
    /// Re-read `path` and apply it, or explain why not (the old configuration then stays in force).
    pub fn reload_from(&self, path: &Path) -> Result<ReloadSummary, ReloadError> {
        let result = self.try_reload(path);
        match &result {
            Ok(s) => {
                info!(kind = "reload", %s, "configuration reloaded");
                self.verify_read_only();
                self.record_config("applied", &s.to_string(), 0);
            }
            Err(e) => {
                warn!(kind = "reload", cause = %e, "reload refused; the old configuration stays in force");
                self.record_config("refused", &e.to_string(), e.violations());
            }
        }
        result
    }

    fn try_reload(&self, path: &Path) -> Result<ReloadSummary, ReloadError> {
        let text = std::fs::read_to_string(path).map_err(|source| ReloadError::Io { path: path.to_owned(), source })?;
        let config = Config::parse(&text)?;
        let old = self.resolved();
        let mut new = Resolved::resolve(config, &self.env)?;
        // Listeners are bound once; what the command line chose stays.
        new.config.proxy.listen = old.config.proxy.listen.clone();
        new.config.admin.listen = old.config.admin.listen.clone();
        let blocked = crate::config::reload::restart_needed(&old, &new);
        if !blocked.is_empty() {
            return Err(ReloadError::RestartNeeded { reasons: blocked });
        }
        let mut summary = ReloadSummary::default();
        for (name, b) in &new.services {
            match old.services.get(name) {
                None => summary.added.push(name.clone()),
                Some(a) if a.share != b.share || a.ro_share != b.ro_share || a.settings != b.settings => {
                    summary.changed.push(name.clone())
                }
                Some(_) => {}
            }
        }
        summary.removed = old.services.keys().filter(|k| !new.services.contains_key(*k)).cloned().collect();
        let users = UserDb::build(&new, &self.env);
        let pools = Pools::rebuild(&self.pools(), &new, &self.metrics);
        for line in new.table().lines() {
            info!("budget: {line}");
        }
        self.install(new, users, pools);
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_slots_are_bounded_and_freed_on_drop() {
        let gauge = prometheus::IntGauge::new("t_logging_in", "t").unwrap();
        let slots = LoginSlots::new(2, gauge.clone());
        let a = slots.try_acquire().expect("first slot");
        let b = slots.try_acquire().expect("second slot");
        assert!(slots.try_acquire().is_none(), "a third client must be refused");
        assert_eq!((gauge.get(), slots.in_use()), (2, 2));
        drop(a);
        assert_eq!((gauge.get(), slots.in_use()), (1, 1));
        let c = slots.try_acquire().expect("a freed slot is reusable");
        drop((b, c));
        assert_eq!((gauge.get(), slots.in_use(), slots.max()), (0, 0, 2));
    }

    #[test]
    fn refusals_warn_at_most_every_ten_seconds() {
        let slots = LoginSlots::new(1, prometheus::IntGauge::new("t_warn", "t").unwrap());
        assert!(slots.should_warn());
        assert!(!slots.should_warn());
    }
}
