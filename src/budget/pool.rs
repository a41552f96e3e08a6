//! One server pool per (service, route, database, upstream role): a deadpool `Manager` over raw server
//! connections. Every connection holds a slot of its service's share (counted across all the service's
//! pools, see [`crate::budget::pools::ServiceGroup`]) and a permit of its upstream's ceiling; both live
//! inside the connection.

use crate::config::resolve::{ServiceBudget, UpstreamTarget};
use crate::config::ReplicaDown;
use crate::error::ProxyError;
use crate::server::slots::Slots;
use crate::server::{ServerConn, ServerError};
use arc_swap::ArcSwap;
use deadpool::managed::{self, Metrics, PoolError, RecycleError, RecycleResult, TimeoutType, Timeouts};
use std::collections::HashMap;
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

/// What one pool serves: a service's route, the database its servers log in to and the role they log in as,
/// and (session mode) the startup settings its servers are opened with.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    pub service: String,
    pub route: Route,
    pub database: String,
    pub role: String,
    pub settings: Vec<(String, String)>,
}

impl PoolKey {
    /// The startup settings as a display string (`DateStyle=Postgres, MDY;TimeZone=PST8PDT`), empty for none.
    pub fn settings_text(&self) -> String {
        self.settings.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(";")
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

/// Creates and vets server connections for one pool.
#[derive(Debug)]
pub struct Manager {
    pub key: PoolKey,
    pub upstream: Arc<UpstreamState>,
    /// The upstream (and replica) address with this pool's database and role.
    pub login: UpstreamTarget,
    pub replica_login: Option<UpstreamTarget>,
    /// The service's share, counted across all its pools of this route.
    pub slots: Arc<Slots>,
    /// The read-only route's tier, checked on every new connection of a read-only pool.
    pub enforce: crate::config::Enforce,
    /// Swapped by a reload; read with `load()` (no lock).
    pub budget: ArcSwap<ServiceBudget>,
    pub application_name: String,
    pub route: Route,
    /// Read-only pools: the replica to try first, and what to do when it is down.
    pub replica: Option<Arc<UpstreamState>>,
    pub on_replica_down: ReplicaDown,
    pub(super) routes_to: AtomicU8,
    /// ParameterStatus set of the first connection made; what clients see in transaction mode.
    pub template: RwLock<Option<Arc<crate::server::Params>>>,
    /// Bumped by `RECONNECT`: connections of older generations are not reused.
    pub generation: AtomicU64,
    /// Transaction mode: the idle servers a checkout may choose from, and the clients homed on servers.
    pub affinity: Arc<crate::budget::affinity::Affinity>,
}

impl managed::Manager for Manager {
    /// Boxed: a checked-out server moves through every layer of a checkout and release (queues, results,
    /// the relay), and a pointer moves for free where the connection's half a kilobyte would be copied.
    type Type = Box<ServerConn>;
    type Error = ServerError;

    async fn create(&self) -> Result<Box<ServerConn>, ServerError> {
        // Boxed: a login's state (TLS, SCRAM) is kilobytes, and every checkout's future would carry (and the
        // relay move) it even when an idle connection is taken.
        Box::pin(self.open()).await.map(Box::new)
    }

    async fn recycle(&self, conn: &mut Box<ServerConn>, _: &Metrics) -> RecycleResult<ServerError> {
        let b = self.budget.load();
        let idle = self.unusable(conn, Instant::now(), &b).map_err(RecycleError::message)?;
        let s = &b.settings;
        if idle > s.server_check_delay {
            // Boxed: the round trip is rare, and every checkout's future would carry its state.
            Box::pin(conn.ping(s.connect_timeout)).await.map_err(RecycleError::Backend)?;
        }
        Ok(())
    }
}

impl Manager {
    /// Open a server connection for this pool: the replica first for a read-only pool that has one.
    async fn open(&self) -> Result<ServerConn, ServerError> {
        if self.route == Route::ReadWrite {
            return self.connect_via(&self.upstream, &self.login).await;
        }
        if let (Some(replica), Some(login)) = (&self.replica, &self.replica_login) {
            match self.connect_via(replica, login).await {
                Ok(c) => {
                    self.routes_to.store(RO_REPLICA, Ordering::Relaxed);
                    return self.enforce_read_only(c).await;
                }
                Err(e @ ServerError::ShareReached) => return Err(e),
                Err(e) if self.on_replica_down == ReplicaDown::Refuse => return Err(e),
                Err(e) => {
                    warn!(kind = "replica", cause = %e, service = %self.budget.load().name, "replica unreachable; read-only route falls through to the primary with read-only enforced");
                    self.routes_to.store(RO_FALLTHROUGH, Ordering::Relaxed);
                }
            }
        }
        let c = self.connect_via(&self.upstream, &self.login).await?;
        self.enforce_read_only(c).await
    }

    /// Why an idle connection may not be handed out again, if it may not (checked without a round trip; a
    /// backend an administrator ended is reported to the clients homed on it). `Ok`: how long it was idle.
    pub(super) fn unusable(
        &self,
        conn: &mut ServerConn,
        now: Instant,
        b: &ServiceBudget,
    ) -> Result<Duration, &'static str> {
        let s = &b.settings;
        if self.route == Route::ReadOnly && conn.params.get(RO_GUC).is_some_and(|v| v != "on") {
            return Err("read-only no longer in force");
        }
        if conn.broken {
            return Err("broken");
        }
        if conn.generation < self.generation.load(Ordering::Acquire) {
            return Err("retired by RECONNECT");
        }
        // The caller's clock read for both ages (this runs on every checkout).
        let idle = now.saturating_duration_since(conn.last_checkin);
        if idle > s.server_idle_timeout || conn.outlived(s.server_lifetime, now) {
            return Err("expired");
        }
        if !self.affinity.still_quiet(conn) && self.affinity.gone(conn, std::task::Waker::noop(), s.terminate_window) {
            return Err("closed by server");
        }
        Ok(idle)
    }

    /// Open a server connection to `up` as `login`, holding a slot of the share and one of `up`'s ceiling permits.
    async fn connect_via(&self, up: &Arc<UpstreamState>, login: &UpstreamTarget) -> Result<ServerConn, ServerError> {
        let slot = self.slots.try_take().ok_or(ServerError::ShareReached)?;
        let permit = up.permits.clone().try_acquire_owned().map_err(|_| ServerError::CeilingReached {
            upstream: up.target.name.clone(),
            ceiling: up.target.ceiling,
        })?;
        let b = self.budget.load();
        let s = &b.settings;
        let timeout = login.connect_timeout.map_or(s.connect_timeout, |t| t.min(s.connect_timeout));
        let mut conn = ServerConn::connect(login, &self.application_name, timeout, permit).await?;
        conn.slot = Some(slot);
        conn.register(&up.servers, &b.name, self.route.as_str());
        conn.generation = self.generation.load(Ordering::Acquire);
        let mut t = self.template.write().unwrap_or_else(|e| e.into_inner());
        if t.is_none() {
            *t = Some(Arc::new(conn.params.clone()));
        }
        Ok(conn)
    }

    /// Check the route's tier (`[read_only] enforce`), then `SET SESSION default_transaction_read_only = on` and
    /// check the server reports it.
    async fn enforce_read_only(&self, mut conn: ServerConn) -> Result<ServerConn, ServerError> {
        let timeout = self.budget.load().settings.reset_timeout;
        if let Err(e) = crate::read_only::verify::verify(&mut conn, self.enforce, timeout).await {
            warn!(kind = "read_only_tier", service = %self.key.service, cause = %e, "read-only route refuses a server connection");
            return Err(e);
        }
        conn.enforce_read_only(timeout).await?;
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

/// Deadpool's deadlines for one checkout: wait up to `wait` for a free slot; opening a connection may take
/// two connect attempts (replica, then primary). Vetting an idle one has no deadline of deadpool's: its one
/// await, the ping, has its own (`connect_timeout`), and a timer per checkout costs more than the check.
pub(crate) fn timeouts(s: &crate::config::ServiceConfig, wait: Duration) -> Timeouts {
    Timeouts { wait: Some(wait), create: Some(2 * s.connect_timeout + Duration::from_millis(100)), recycle: None }
}

pub type Pool = managed::Pool<Manager>;
pub type PooledConn = managed::Object<Manager>;

/// How often a checkout whose share is held by the service's other pools looks again.
const SHARE_RECHECK: Duration = Duration::from_millis(25);
/// One pool and what is needed to report on it.
pub struct ServicePool {
    pub pool: Pool,
    pub route: Route,
    pub key: PoolKey,
    pub group: Arc<crate::budget::pools::ServiceGroup>,
    pub metrics: crate::telemetry::metrics::PoolMetrics,
    pub admission: Arc<crate::budget::admission::Admission>,
    pub control: Arc<crate::budget::control::PoolControl>,
    /// Named statements of this pool's clients (transaction mode).
    pub statements: Arc<crate::server::statements::Registry>,
    /// The distinct session-settings sets of its clients and servers, each shared.
    pub settings: crate::server::settings::Interner,
    /// Clients whose server is pinned to them now.
    pub pinned: Arc<AtomicU32>,
    /// (reported setting, value a client asked for) → the value the server reports for it (`German` →
    /// `German, DMY`), learned from a server once, for transaction-mode greetings.
    pub reported: std::sync::Mutex<HashMap<(String, String), String>>,
    /// When the pool was made, and when a client last checked a connection out of it (ms after that; a pool
    /// of a database nobody uses closes). An atomic: every checkout stamps it.
    pub made: Instant,
    pub last_used_ms: AtomicU64,
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
    /// When the service's share is held by its other pools, an idle connection of theirs is closed to make room,
    /// or the checkout waits for one to go idle.
    pub async fn checkout_within(&self, wait: Duration) -> Result<PooledConn, ProxyError> {
        self.checkout_near(wait, None).await
    }

    /// [`Self::checkout_within`], taking the idle server `home` when it is parked (else another parked one, else
    /// a new one; at the share, transaction mode waits for the next server released, session mode in
    /// deadpool's queue).
    pub async fn checkout_near(&self, wait: Duration, home: Option<i32>) -> Result<PooledConn, ProxyError> {
        let started = Instant::now();
        let handed = self.budget().pool_mode() == crate::config::PoolMode::Transaction;
        loop {
            if let Some(c) = self.take_parked(home, false).await {
                self.stamp_use();
                return Ok(c);
            }
            let left = wait.saturating_sub(started.elapsed());
            if handed && self.is_full() {
                if left.is_zero() {
                    // Every server is busy: only a release can help (the queued checkout's first try).
                    let b = self.budget();
                    let share = self.share();
                    return Err(ProxyError::BudgetExhausted {
                        service: b.name.clone(),
                        share,
                        waited: started.elapsed(),
                    });
                }
                if let Some(c) = self.handed(started + wait).await {
                    self.stamp_use();
                    return Ok(c);
                }
                continue;
            }
            // Boxed: opening a server (or deadpool's wait in session mode) is state a queued checkout in
            // transaction mode never needs.
            match Box::pin(self.checkout_once(if handed { Duration::ZERO } else { left }, started)).await {
                Err(None) => {
                    let slots = &self.group.slots;
                    let mut freed = std::pin::pin!(slots.freed());
                    freed.as_mut().enable();
                    // A closed connection's slot comes back once its backend has exited: wait for that rather
                    // than close another pool's idle server as well.
                    if slots.leaving() == 0 {
                        self.group.close_idle_other(&self.key);
                    }
                    let left = wait.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        let b = self.budget();
                        return Err(ProxyError::BudgetExhausted {
                            service: b.name.clone(),
                            share: self.share(),
                            waited: started.elapsed(),
                        });
                    }
                    if slots.used() >= slots.limit() {
                        let _ = tokio::time::timeout(left.min(SHARE_RECHECK), freed).await;
                    }
                }
                Ok(c) => {
                    self.stamp_use();
                    return Ok(c);
                }
                Err(Some(ProxyError::BudgetExhausted { .. })) if handed && !left.is_zero() => {
                    if let Some(c) = self.handed(started + wait).await {
                        self.stamp_use();
                        return Ok(c);
                    }
                }
                Err(Some(e)) => return Err(e),
            }
        }
    }

    /// One deadpool checkout; `Err(None)`: the share's slots are all held (by this or a sibling pool).
    async fn checkout_once(&self, wait: Duration, started: Instant) -> Result<PooledConn, Option<ProxyError>> {
        let b = self.budget();
        let r = self.pool.timeout_get(&timeouts(&b.settings, wait)).await;
        if matches!(r, Err(PoolError::Backend(ServerError::ShareReached))) {
            return Err(None);
        }
        r.map_err(|e| Some(self.checkout_error(e, &b, started, b.upstream.clone())))
    }

    fn checkout_error(&self, e: PoolError<ServerError>, b: &ServiceBudget, started: Instant, up: String) -> ProxyError {
        match e {
            PoolError::Timeout(TimeoutType::Wait) => {
                ProxyError::BudgetExhausted { service: b.name.clone(), share: self.share(), waited: started.elapsed() }
            }
            PoolError::Backend(ServerError::CeilingReached { upstream, ceiling }) => ProxyError::CeilingReached {
                upstream,
                ceiling,
                service: b.name.clone(),
                holding: self.group.slots.used(),
                share: self.share(),
                waited: started.elapsed(),
            },
            PoolError::Timeout(_) => {
                ProxyError::Upstream { upstream: up, source: ServerError::Timeout(b.settings.connect_timeout) }
            }
            PoolError::Backend(e) => ProxyError::Upstream { upstream: up, source: e },
            PoolError::Closed => ProxyError::ShuttingDown,
            PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_) => {
                ProxyError::Upstream { upstream: up, source: ServerError::Closed }
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
    pub async fn template(&self) -> Result<Arc<crate::server::Params>, ProxyError> {
        if let Some(t) = self.pool.manager().template.read().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(t);
        }
        let conn = self.checkout().await?;
        let t = Arc::new(conn.params.clone());
        self.put_back(conn);
        Ok(t)
    }

    /// Close idle connections past their idle timeout (or `max_idle` when shorter) or lifetime, or retired by
    /// `RECONNECT` (never one in use).
    pub fn reap(&self, max_idle: Option<Duration>) {
        let s = &self.budget().settings;
        let idle = max_idle.map_or(s.server_idle_timeout, |m| m.min(s.server_idle_timeout));
        let life = s.server_lifetime;
        let generation = self.pool.manager().generation.load(Ordering::Acquire);
        let keep = |c: &ServerConn| {
            !c.broken && c.last_checkin.elapsed() < idle && c.created.elapsed() < life && c.generation >= generation
        };
        self.pool.retain(|c, _| keep(c));
        let affinity = &self.pool.manager().affinity;
        // The watch stays registered on the servers kept (a noop waker here would silence it).
        let gone = affinity.take_if(|c| affinity.gone(c, affinity.watcher(), s.terminate_window) || !keep(c));
        gone.into_iter().for_each(|c| drop(PooledConn::take(c)));
    }

    /// A client checked a connection out of this pool now.
    pub fn stamp_use(&self) {
        self.stamp_use_at(Instant::now());
    }

    /// [`Self::stamp_use`] with the caller's clock read.
    pub fn stamp_use_at(&self, now: Instant) {
        self.last_used_ms.store(now.saturating_duration_since(self.made).as_millis() as u64, Ordering::Relaxed);
    }

    /// How long no client checked a connection out of this pool.
    pub fn unused_for(&self) -> Duration {
        self.made.elapsed().saturating_sub(Duration::from_millis(self.last_used_ms.load(Ordering::Relaxed)))
    }

    /// Server connections checked out by clients now.
    pub fn in_use(&self) -> u32 {
        let st = self.status();
        st.size.saturating_sub(st.available) as u32
    }

    /// deadpool's status with the parked servers counted as available (deadpool counts them in use).
    pub fn status(&self) -> deadpool::Status {
        let mut st = self.pool.status();
        let (parked, waiting) = self.pool.manager().affinity.counts();
        st.available += parked;
        st.waiting += waiting;
        st
    }

    /// Close a server connection instead of giving it back; a checkout waiting in the queue may open one in
    /// its place.
    pub fn discard(&self, mut conn: PooledConn) {
        conn.broken = true;
        self.retire(conn);
    }

    /// Close a healthy server connection (it says goodbye with a Terminate) instead of giving it back; a
    /// checkout waiting in the queue may open one in its place.
    pub fn retire(&self, conn: PooledConn) {
        drop(PooledConn::take(conn));
        self.pool.manager().affinity.retry_one();
    }

    /// Close every idle server connection now (parked or in deadpool's queue).
    pub fn close_idle(&self) {
        self.pool.retain(|_, _| false);
        let parked = self.pool.manager().affinity.take_if(|_| true);
        parked.into_iter().for_each(|c| drop(PooledConn::take(c)));
    }
}
