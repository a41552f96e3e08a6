//! Per-service server pools: a deadpool `Manager` over raw server connections, bounded by the service's share
//! and by the upstream ceiling (a semaphore whose permits live inside each connection).

use crate::budget::{Resolved, ServiceBudget, UpstreamTarget};
use crate::error::ProxyError;
use crate::server::{ServerConn, ServerError};
use deadpool::managed::{self, Metrics, PoolError, RecycleError, RecycleResult, TimeoutType};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

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
    pub budget: ServiceBudget,
    pub application_name: String,
    pub route: Route,
    /// ParameterStatus set of the first connection made; what clients see in transaction mode.
    pub template: RwLock<Option<Arc<HashMap<String, String>>>>,
}

impl managed::Manager for Manager {
    type Type = ServerConn;
    type Error = ServerError;

    async fn create(&self) -> Result<ServerConn, ServerError> {
        let permit = self
            .upstream
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| ServerError::CeilingReached(self.upstream.target.ceiling))?;
        let s = &self.budget.settings;
        let mut conn =
            ServerConn::connect(&self.upstream.target, &self.application_name, s.connect_timeout, permit).await?;
        conn.register(&self.upstream.servers, &self.budget.name, self.route.as_str());
        let mut t = self.template.write().unwrap_or_else(|e| e.into_inner());
        if t.is_none() {
            *t = Some(Arc::new(conn.params.clone()));
        }
        Ok(conn)
    }

    async fn recycle(&self, conn: &mut ServerConn, _: &Metrics) -> RecycleResult<ServerError> {
        let s = &self.budget.settings;
        let idle = conn.last_checkin.elapsed();
        if conn.broken {
            return Err(RecycleError::message("broken"));
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

pub type Pool = managed::Pool<Manager>;
pub type PooledConn = managed::Object<Manager>;

/// A service's pool and what is needed to report on it.
pub struct ServicePool {
    pub pool: Pool,
    pub route: Route,
    pub metrics: crate::metrics::PoolMetrics,
}

impl ServicePool {
    pub fn budget(&self) -> &ServiceBudget {
        &self.pool.manager().budget
    }

    /// Check out a server connection within the service's `checkout_timeout`.
    pub async fn checkout(&self) -> Result<PooledConn, ProxyError> {
        let started = Instant::now();
        let b = self.budget();
        let up = || b.upstream.clone();
        match self.pool.get().await {
            Ok(c) => Ok(c),
            Err(PoolError::Timeout(TimeoutType::Wait)) | Err(PoolError::Backend(ServerError::CeilingReached(_))) => {
                Err(ProxyError::BudgetExhausted { service: b.name.clone(), share: b.share, waited: started.elapsed() })
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

    /// Close idle connections past their idle timeout or lifetime (never one in use).
    pub fn reap(&self) {
        let s = &self.budget().settings;
        let (idle, life) = (s.server_idle_timeout, s.server_lifetime);
        self.pool.retain(|c, _| !c.broken && c.last_checkin.elapsed() < idle && c.created.elapsed() < life);
    }
}

/// Every pool of the process, built once from the resolved config.
pub struct Pools {
    pub upstreams: BTreeMap<String, Arc<UpstreamState>>,
    pub pools: BTreeMap<(String, Route), Arc<ServicePool>>,
}

impl Pools {
    pub fn build(r: &Resolved, metrics: &crate::metrics::Metrics) -> Pools {
        let upstreams: BTreeMap<_, _> = r
            .upstreams
            .iter()
            .map(|(n, t)| {
                let permits = Arc::new(Semaphore::new((t.ceiling - t.reserved) as usize));
                (n.clone(), Arc::new(UpstreamState { target: t.clone(), permits, servers: Default::default() }))
            })
            .collect();
        let mut pools = BTreeMap::new();
        for (name, b) in &r.services {
            let route = Route::ReadWrite;
            let s = &b.settings;
            let mgr = Manager {
                upstream: upstreams[&b.upstream].clone(),
                budget: b.clone(),
                route,
                application_name: format!("{}:{}:{}", r.config.proxy.application_name_prefix, name, route.as_str()),
                template: RwLock::new(None),
            };
            let pool = managed::Pool::builder(mgr)
                .max_size(b.share as usize)
                .wait_timeout(Some(s.checkout_timeout))
                .create_timeout(Some(s.connect_timeout + Duration::from_millis(100)))
                .recycle_timeout(Some(s.connect_timeout + Duration::from_millis(100)))
                .runtime(deadpool::Runtime::Tokio1)
                .build()
                .expect("runtime and timeouts are set");
            let metrics = metrics.pool(name, route.as_str());
            pools.insert((name.clone(), route), Arc::new(ServicePool { pool, route, metrics }));
        }
        Pools { upstreams, pools }
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
