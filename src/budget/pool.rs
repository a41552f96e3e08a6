//! Per-service server pools: a deadpool `Manager` over raw server connections, bounded by the service's share
//! and by the upstream ceiling (a semaphore whose permits live inside each connection).

use crate::config::resolve::{Resolved, ServiceBudget, UpstreamTarget};
use crate::config::ReplicaDown;
use crate::error::ProxyError;
use crate::server::{ServerConn, ServerError};
use arc_swap::ArcSwap;
use deadpool::managed::{self, Metrics, PoolError, RecycleError, RecycleResult, TimeoutType, Timeouts};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tracing::warn;

/// Whether a pool serves read-write or read-only clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Route {
    ReadWrite,
    ReadOnly,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::ReadWrite => "rw",
            Route::ReadOnly => "ro",
        }
    }
}

/// One upstream's ceiling, shared by every pool that connects to it.
#[derive(Debug)]
pub struct UpstreamState {
    pub target: UpstreamTarget,
    /// Permits = ceiling − reserved; each live server connection holds one.
    pub permits: Arc<Semaphore>,
    pub servers: crate::server::ServerList,
}

impl UpstreamState {
    pub fn open_connections(&self) -> u32 {
        self.target.ceiling - self.target.reserved - self.permits.available_permits() as u32
    }
}

/// Creates and vets server connections for one (service, route).
#[derive(Debug)]
pub struct Manager {
    pub upstream: Arc<UpstreamState>,
    /// Swapped by a reload; read with `load()` (no lock).
    pub budget: ArcSwap<ServiceBudget>,
    pub application_name: String,
    pub route: Route,
    /// Read-only pools: the replica to try first, and what to do when it is down.
    pub replica: Option<Arc<UpstreamState>>,
    pub on_replica_down: ReplicaDown,
    routes_to: AtomicU8,
    /// ParameterStatus set of the first connection made; what clients see in transaction mode.
    pub template: RwLock<Option<Arc<HashMap<String, String>>>>,
    /// Bumped by `RECONNECT`: connections of older generations are not reused.
    pub generation: AtomicU64,
}

impl managed::Manager for Manager {
    type Type = ServerConn;
    type Error = ServerError;

    async fn create(&self) -> Result<ServerConn, ServerError> {
        if self.route == Route::ReadWrite {
            return self.connect_via(&self.upstream).await;
        }
        if let Some(replica) = &self.replica {
            match self.connect_via(replica).await {
                Ok(c) => {
                    self.routes_to.store(RO_REPLICA, Ordering::Relaxed);
                    return self.enforce_read_only(c).await;
                }
                Err(e) if self.on_replica_down == ReplicaDown::Refuse => return Err(e),
                Err(e) => {
                    warn!(kind = "replica", cause = %e, service = %self.budget.load().name, "replica unreachable; read-only route falls through to the primary with read-only enforced");
                    self.routes_to.store(RO_FALLTHROUGH, Ordering::Relaxed);
                }
            }
        }
        let c = self.connect_via(&self.upstream).await?;
        self.enforce_read_only(c).await
    }

    async fn recycle(&self, conn: &mut ServerConn, _: &Metrics) -> RecycleResult<ServerError> {
        let b = self.budget.load();
        let s = &b.settings;
        if self.route == Route::ReadOnly && conn.params.get(RO_GUC).is_some_and(|v| v != "on") {
            return Err(RecycleError::message("read-only no longer in force"));
        }
        let idle = conn.last_checkin.elapsed();
        if conn.broken {
            return Err(RecycleError::message("broken"));
        }
        if conn.generation < self.generation.load(Ordering::Acquire) {
            return Err(RecycleError::message("retired by RECONNECT"));
        }
        if idle > s.server_idle_timeout || conn.created.elapsed() > s.server_lifetime {
            return Err(RecycleError::message("expired"));
        }
        if !conn.peek_alive() {
            conn.broken = true;
            return Err(RecycleError::message("closed by server"));
        }
        if idle > s.server_check_delay {
            conn.ping(s.connect_timeout).await.map_err(RecycleError::Backend)?;
        }
        Ok(())
    }
}

impl Manager {
    /// Open a server connection to `up`, holding one of its ceiling permits.
    async fn connect_via(&self, up: &Arc<UpstreamState>) -> Result<ServerConn, ServerError> {
        let permit = up.permits.clone().try_acquire_owned().map_err(|_| ServerError::CeilingReached {
            upstream: up.target.name.clone(),
            ceiling: up.target.ceiling,
        })?;
        let b = self.budget.load();
        let s = &b.settings;
        let mut conn = ServerConn::connect(&up.target, &self.application_name, s.connect_timeout, permit).await?;
        conn.register(&up.servers, &b.name, self.route.as_str());
        conn.generation = self.generation.load(Ordering::Acquire);
        let mut t = self.template.write().unwrap_or_else(|e| e.into_inner());
        if t.is_none() {
            *t = Some(Arc::new(conn.params.clone()));
        }
        Ok(conn)
    }

    /// `SET SESSION default_transaction_read_only = on` and check the server reports it.
    async fn enforce_read_only(&self, mut conn: ServerConn) -> Result<ServerConn, ServerError> {
        enforce_read_only(&mut conn, self.budget.load().settings.reset_timeout).await?;
        let mut t = self.template.write().unwrap_or_else(|e| e.into_inner());
        if t.as_ref().is_some_and(|t| t.get(RO_GUC).is_some_and(|v| v != "on")) {
            *t = Some(Arc::new(conn.params.clone()));
        }
        Ok(conn)
    }

    /// Where this read-only pool sends clients now (1 replica, 2 primary_fallthrough, 3 disabled).
    pub fn routes_to(&self) -> u8 {
        self.routes_to.load(Ordering::Relaxed)
    }
}

/// The setting read-only routes force on every server connection.
pub const RO_GUC: &str = crate::server::READ_ONLY_SETTING;
pub const RO_REPLICA: u8 = 1;
pub const RO_FALLTHROUGH: u8 = 2;
pub const RO_DISABLED: u8 = 3;

pub fn routes_to_name(v: u8) -> &'static str {
    match v {
        RO_REPLICA => "replica",
        RO_FALLTHROUGH => "primary_fallthrough",
        _ => "disabled",
    }
}

/// Force and verify read-only on a server connection (also after any reset).
pub async fn enforce_read_only(conn: &mut ServerConn, timeout: Duration) -> Result<(), ServerError> {
    conn.enforce_read_only(timeout).await
}

/// Deadpool's deadlines for one checkout: wait up to `wait` for a free slot; opening a connection may take
/// two connect attempts (replica, then primary), vetting an idle one a single ping.
fn timeouts(s: &crate::config::ServiceConfig, wait: Duration) -> Timeouts {
    Timeouts {
        wait: Some(wait),
        create: Some(2 * s.connect_timeout + Duration::from_millis(100)),
        recycle: Some(s.connect_timeout + Duration::from_millis(100)),
    }
}

pub type Pool = managed::Pool<Manager>;
pub type PooledConn = managed::Object<Manager>;

/// A service's pool and what is needed to report on it.
pub struct ServicePool {
    pub pool: Pool,
    pub route: Route,
    pub metrics: crate::telemetry::metrics::PoolMetrics,
    pub admission: crate::budget::admission::Admission,
    pub control: crate::admin::control::PoolControl,
    /// Named statements of this pool's clients (transaction mode).
    pub statements: Arc<crate::server::statements::Registry>,
    /// Clients whose server is pinned to them now.
    pub pinned: Arc<AtomicU32>,
    /// (reported setting, value a client asked for) → the value the server reports for it (`German` →
    /// `German, DMY`), learned from a server once, for transaction-mode greetings.
    pub reported: std::sync::Mutex<HashMap<(String, String), String>>,
}

/// One pinned client, counted in its pool until dropped.
#[derive(Debug)]
pub struct PinCount(Arc<AtomicU32>);

impl PinCount {
    pub fn new(counter: &Arc<AtomicU32>) -> PinCount {
        counter.fetch_add(1, Ordering::AcqRel);
        PinCount(counter.clone())
    }
}

impl Drop for PinCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ServicePool {
    /// Most server connections this pool may hold (the route's share).
    pub fn share(&self) -> u32 {
        self.pool.status().max_size as u32
    }

    /// The pool's current budget (a reload may swap it).
    pub fn budget(&self) -> arc_swap::Guard<Arc<ServiceBudget>> {
        self.pool.manager().budget.load()
    }

    /// Check out a server connection within the service's `checkout_timeout`.
    pub async fn checkout(&self) -> Result<PooledConn, ProxyError> {
        self.checkout_within(self.budget().settings.checkout_timeout).await
    }

    /// Check out a server connection within `wait`; zero takes one only if it is idle or can be opened now.
    pub async fn checkout_within(&self, wait: Duration) -> Result<PooledConn, ProxyError> {
        let started = Instant::now();
        let b = self.budget();
        let up = || b.upstream.clone();
        match self.pool.timeout_get(&timeouts(&b.settings, wait)).await {
            Ok(c) => Ok(c),
            Err(PoolError::Timeout(TimeoutType::Wait)) => Err(ProxyError::BudgetExhausted {
                service: b.name.clone(),
                share: self.share(),
                waited: started.elapsed(),
            }),
            Err(PoolError::Backend(ServerError::CeilingReached { upstream, ceiling })) => {
                Err(ProxyError::CeilingReached {
                    upstream,
                    ceiling,
                    service: b.name.clone(),
                    holding: self.pool.status().size as u32,
                    share: self.share(),
                    waited: started.elapsed(),
                })
            }
            Err(PoolError::Timeout(_)) => {
                Err(ProxyError::Upstream { upstream: up(), source: ServerError::Timeout(b.settings.connect_timeout) })
            }
            Err(PoolError::Backend(e)) => Err(ProxyError::Upstream { upstream: up(), source: e }),
            Err(PoolError::Closed) => Err(ProxyError::ShuttingDown),
            Err(PoolError::NoRuntimeSpecified) | Err(PoolError::PostCreateHook(_)) => {
                Err(ProxyError::Upstream { upstream: up(), source: ServerError::Closed })
            }
        }
    }

    /// Wait up to `max` for a connection under `upstream`'s ceiling to close (nothing is taken: the next
    /// checkout competes for it like any other).
    pub async fn ceiling_freed(&self, upstream: &str, max: Duration) {
        let m = self.pool.manager();
        match std::iter::once(&m.upstream).chain(&m.replica).find(|u| u.target.name == upstream) {
            Some(up) => {
                let _ = tokio::time::timeout(max, up.permits.acquire()).await;
            }
            None => tokio::time::sleep(max).await,
        }
    }

    /// ParameterStatus values for clients; connects once if no connection was ever made.
    pub async fn template(&self) -> Result<Arc<HashMap<String, String>>, ProxyError> {
        if let Some(t) = self.pool.manager().template.read().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(t);
        }
        let conn = self.checkout().await?;
        let t = Arc::new(conn.params.clone());
        drop(conn);
        Ok(t)
    }

    /// Close idle connections past their idle timeout or lifetime, or retired by `RECONNECT` (never one in use).
    pub fn reap(&self) {
        let s = &self.budget().settings;
        let (idle, life) = (s.server_idle_timeout, s.server_lifetime);
        let generation = self.pool.manager().generation.load(Ordering::Acquire);
        self.pool.retain(|c, _| {
            !c.broken && c.last_checkin.elapsed() < idle && c.created.elapsed() < life && c.generation >= generation
        });
    }

    /// Server connections checked out by clients now.
    pub fn in_use(&self) -> u32 {
        let st = self.pool.status();
        st.size.saturating_sub(st.available) as u32
    }
}

/// Every pool of the process, built once from the resolved config.
pub struct Pools {
    pub upstreams: BTreeMap<String, Arc<UpstreamState>>,
    pub pools: BTreeMap<(String, Route), Arc<ServicePool>>,
}

impl Pools {
    pub fn build(r: &Resolved, metrics: &crate::telemetry::metrics::Metrics) -> Pools {
        let state = |t: &UpstreamTarget| {
            let permits = Arc::new(Semaphore::new((t.ceiling - t.reserved) as usize));
            Arc::new(UpstreamState { target: t.clone(), permits, servers: Default::default() })
        };
        let mut upstreams: BTreeMap<_, _> = r.upstreams.iter().map(|(n, t)| (n.clone(), state(t))).collect();
        if let Some(rep) = &r.replica {
            upstreams.insert(rep.name.clone(), state(rep));
        }
        let mut pools = Pools { upstreams, pools: BTreeMap::new() };
        pools.fill(r, metrics, None);
        pools
    }

    /// The pools for a reloaded configuration: same upstreams; a pool that exists in `old` for the same
    /// service, route and upstream is kept with its connections (budget swapped, resized to the new share).
    pub fn rebuild(old: &Pools, r: &Resolved, metrics: &crate::telemetry::metrics::Metrics) -> Pools {
        let mut pools = Pools { upstreams: old.upstreams.clone(), pools: BTreeMap::new() };
        pools.fill(r, metrics, Some(old));
        pools
    }

    fn fill(&mut self, r: &Resolved, metrics: &crate::telemetry::metrics::Metrics, old: Option<&Pools>) {
        let replica = r.replica.as_ref().and_then(|t| self.upstreams.get(&t.name).cloned());
        for (name, b) in &r.services {
            for (route, share) in [(Route::ReadWrite, b.share), (Route::ReadOnly, b.ro_share)] {
                if share == 0 {
                    continue;
                }
                let key = (name.clone(), route);
                if let Some(p) = old.and_then(|o| o.pools.get(&key)).filter(|p| p.budget().upstream == b.upstream) {
                    p.pool.manager().budget.store(Arc::new(b.clone()));
                    p.pool.resize(share as usize);
                    p.admission.reconfigure(b.settings.admission.clone(), share);
                    self.pools.insert(key, p.clone());
                    continue;
                }
                let s = &b.settings;
                let initial = if replica.is_some() { RO_REPLICA } else { RO_FALLTHROUGH };
                let mgr = Manager {
                    upstream: self.upstreams[&b.upstream].clone(),
                    budget: ArcSwap::from_pointee(b.clone()),
                    route,
                    replica: replica.clone(),
                    on_replica_down: r.config.read_only.on_replica_down,
                    routes_to: AtomicU8::new(if route == Route::ReadOnly { initial } else { RO_DISABLED }),
                    application_name: format!("{}:{}:{}", r.config.proxy.application_name_prefix, name, route.as_str()),
                    template: RwLock::new(None),
                    generation: AtomicU64::new(0),
                };
                let pool = managed::Pool::builder(mgr)
                    .max_size(share as usize)
                    .timeouts(timeouts(s, s.checkout_timeout))
                    .runtime(deadpool::Runtime::Tokio1)
                    .build()
                    .expect("runtime and timeouts are set");
                let admission = crate::budget::admission::Admission::new(
                    b.settings.admission.clone(),
                    share,
                    metrics.admission(name),
                );
                let metrics = metrics.pool(name, route.as_str());
                let control = Default::default();
                let (statements, pinned) = Default::default();
                let reported = Default::default();
                let sp = ServicePool { pool, route, metrics, admission, control, statements, pinned, reported };
                self.pools.insert(key, Arc::new(sp));
            }
        }
    }

    pub fn get(&self, service: &str, route: Route) -> Option<&Arc<ServicePool>> {
        self.pools.get(&(service.to_owned(), route))
    }

    pub fn close(&self) {
        for p in self.pools.values() {
            p.pool.close();
        }
    }
}
