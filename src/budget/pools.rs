//! Every pool of the process: one group per (service, route) holding the share, and in it one pool per
//! database and upstream role, made on first use (the URL's own database and role at startup), capped by
//! `proxy.max_pools`, and dropped again once its database went unused for `other_database_idle_timeout`.

use super::pool::{timeouts, UpstreamState};
use super::pool::{Manager, Pool, PoolKey, PooledConn, Route, ServicePool, RO_DISABLED, RO_FALLTHROUGH, RO_REPLICA};
use crate::config::databases::UpstreamLogin;
use crate::config::resolve::{Resolved, UpstreamTarget};
use crate::error::ProxyError;
use crate::server::slots::Slots;
use arc_swap::ArcSwap;
use deadpool::managed;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;
use tokio::sync::Semaphore;

/// Every pool of the process.
pub struct Pools {
    pub upstreams: BTreeMap<String, Arc<UpstreamState>>,
    groups: BTreeMap<(String, Route), Arc<ServiceGroup>>,
    pools: RwLock<BTreeMap<PoolKey, Arc<ServicePool>>>,
    /// The configuration pools are made from (a reload brings a new one).
    resolved: Arc<Resolved>,
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
        Self::assemble(upstreams, r, metrics, None)
    }

    /// The pools for a reloaded configuration: same upstreams; a group whose service and upstream stay keeps
    /// its pools and their connections (budget swapped, resized to the new share); a pool whose database the
    /// upstream no longer serves is dropped (its connections close once their clients are done).
    pub fn rebuild(old: &Pools, r: &Resolved, metrics: &crate::telemetry::metrics::Metrics) -> Pools {
        Self::assemble(old.upstreams.clone(), r, metrics, Some(old))
    }

    fn assemble(
        upstreams: BTreeMap<String, Arc<UpstreamState>>,
        r: &Resolved,
        metrics: &crate::telemetry::metrics::Metrics,
        old: Option<&Pools>,
    ) -> Pools {
        let mut groups = BTreeMap::new();
        let mut pools = BTreeMap::new();
        for (name, b) in &r.services {
            for (route, share) in [(Route::ReadWrite, b.share), (Route::ReadOnly, b.ro_share)] {
                if share == 0 {
                    continue;
                }
                let gkey = (name.clone(), route);
                // The group's old pools, read once: kept when they all reach the same upstream.
                let kept = old.and_then(|o| o.groups.get(&gkey).map(|g| (o.of_group(name, route), g.clone())));
                let kept = kept.filter(|(members, _)| members.iter().all(|p| p.budget().upstream == b.upstream));
                let group = match kept {
                    Some((members, g)) => {
                        g.slots.set_limit(share);
                        g.admission.reconfigure(b.settings.admission.clone(), share);
                        let served = &r.upstreams[&b.upstream].databases;
                        let ro_db = &r.upstreams[&b.upstream].database;
                        for p in members {
                            let still = route == Route::ReadOnly && &p.key.database == ro_db
                                || served.real_targets_include(&p.key.database);
                            if still {
                                p.pool.manager().budget.store(Arc::new(b.clone()));
                                p.pool.resize(share as usize);
                                pools.insert(p.key.clone(), p);
                            }
                        }
                        g
                    }
                    None => {
                        let admission = crate::budget::admission::Admission::new(
                            b.settings.admission.clone(),
                            share,
                            metrics.admission(name),
                        );
                        Arc::new(ServiceGroup::new(share, metrics.pool(name, route.as_str()), admission))
                    }
                };
                groups.insert(gkey, group);
            }
        }
        let all = Pools { upstreams, groups, pools: RwLock::new(pools), resolved: Arc::new(r.clone()) };
        // The URL's own database and role: always there, never closed for disuse.
        let defaults: Vec<(String, Route)> = all.groups.keys().cloned().collect();
        for (service, route) in defaults {
            let _ = all.pool_for(&service, route, None, None, &[]);
        }
        all
    }

    /// The pool of `service`'s `route` for the URL's own database and role.
    pub fn get(&self, service: &str, route: Route) -> Option<Arc<ServicePool>> {
        let b = self.resolved.services.get(service)?;
        let t = &self.resolved.upstreams[&b.upstream];
        let key = PoolKey {
            service: service.to_owned(),
            route,
            database: t.database.clone(),
            role: t.user.clone(),
            settings: Vec::new(),
        };
        self.read().get(&key).cloned()
    }

    /// The pool of `service`'s `route` for `database` (the real name; `None`: the URL's) as `login` (`None`: the
    /// URL's role), made now if it is new. `Ok(None)`: the route is not served for this service.
    pub fn pool_for(
        &self,
        service: &str,
        route: Route,
        database: Option<&str>,
        login: Option<&UpstreamLogin>,
        settings: &[(String, String)],
    ) -> Result<Option<Arc<ServicePool>>, ProxyError> {
        let Some(group) = self.groups.get(&(service.to_owned(), route)) else { return Ok(None) };
        // The read-only route logs in as its own role when `[read_only] user` names one.
        let login = if route == Route::ReadOnly { self.resolved.ro_login.as_ref().or(login) } else { login };
        let b = &self.resolved.services[service];
        let t = &self.resolved.upstreams[&b.upstream];
        let key = PoolKey {
            service: service.to_owned(),
            route,
            database: database.unwrap_or(&t.database).to_owned(),
            role: login.map_or(&t.user, |l| &l.user).clone(),
            settings: settings.to_vec(),
        };
        let keys = login.and_then(|l| l.keys.as_ref());
        if let Some(p) = self.read().get(&key) {
            p.take_keys(keys);
            return Ok(Some(p.clone()));
        }
        let mut map = self.pools.write().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = map.get(&key) {
            p.take_keys(keys);
            return Ok(Some(p.clone()));
        }
        let max = self.resolved.config.proxy.max_pools as usize;
        if map.len() >= max {
            return Err(ProxyError::TooManyPools { max: max as u32 });
        }
        let p = Arc::new(self.make(key.clone(), group, login));
        map.insert(key, p.clone());
        Ok(Some(p))
    }

    fn make(&self, key: PoolKey, group: &Arc<ServiceGroup>, login: Option<&UpstreamLogin>) -> ServicePool {
        let r = &self.resolved;
        let b = &r.services[&key.service];
        let share = if key.route == Route::ReadWrite { b.share } else { b.ro_share };
        let keys = login.and_then(|l| l.keys.clone()).map(|k| std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(k)));
        let relogin = |t: &UpstreamTarget| {
            let mut t = t.clone();
            t.database = key.database.clone();
            t.startup = key.settings.clone();
            if let Some(l) = login {
                t.user = l.user.clone();
                t.password = l.password.clone();
                t.passthrough = keys.clone();
            }
            t
        };
        let upstream = self.upstreams[&b.upstream].clone();
        let replica = r.replica.as_ref().and_then(|t| self.upstreams.get(&t.name).cloned());
        let initial = if replica.is_some() { RO_REPLICA } else { RO_FALLTHROUGH };
        let mgr = Manager {
            key: key.clone(),
            login: relogin(&upstream.target),
            replica_login: replica.as_ref().map(|u| relogin(&u.target)),
            slots: group.slots.clone(),
            enforce: r.config.read_only.enforce,
            upstream,
            budget: ArcSwap::from_pointee(b.clone()),
            route: key.route,
            replica,
            on_replica_down: r.config.read_only.on_replica_down,
            routes_to: AtomicU8::new(if key.route == Route::ReadOnly { initial } else { RO_DISABLED }),
            application_name: format!(
                "{}:{}:{}",
                r.config.proxy.application_name_prefix,
                key.service,
                key.route.as_str()
            ),
            template: RwLock::new(None),
            generation: AtomicU64::new(0),
            affinity: Default::default(),
        };
        let s = &b.settings;
        let pool: Pool = managed::Pool::builder(mgr)
            .max_size(share as usize)
            .timeouts(timeouts(s, s.checkout_timeout))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .expect("runtime and timeouts are set");
        group.join(&pool);
        ServicePool {
            pool,
            route: key.route,
            key,
            group: group.clone(),
            metrics: group.metrics.clone(),
            admission: group.admission.clone(),
            control: group.control.clone(),
            statements: Default::default(),
            settings: Default::default(),
            pinned: group.pinned.clone(),
            reported: Default::default(),
            made: Instant::now(),
            last_used_ms: AtomicU64::new(0),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<PoolKey, Arc<ServicePool>>> {
        self.pools.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Every pool, in key order.
    pub fn all(&self) -> Vec<Arc<ServicePool>> {
        self.read().values().cloned().collect()
    }

    /// The pools of one (service, route).
    pub fn of_group(&self, service: &str, route: Route) -> Vec<Arc<ServicePool>> {
        self.read().values().filter(|p| p.key.service == service && p.key.route == route).cloned().collect()
    }

    /// The pools of one service (both routes), or all.
    pub fn of_service(&self, service: Option<&str>) -> Vec<Arc<ServicePool>> {
        self.read().values().filter(|p| service.is_none_or(|s| s == p.key.service)).cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Close idle connections past their time, then drop the pools of databases and roles other than the
    /// URL's that hold no connection and no client and were not used for `other_database_idle_timeout` (a
    /// name that does not exist holds a place under `max_pools` only that long).
    pub fn reap(&self) {
        let all = self.all();
        let other_idle = self.resolved.config.proxy.other_database_idle_timeout;
        for p in &all {
            // Idle connections to databases other than the URL's go soon: `DROP DATABASE`, `CREATE DATABASE ...
            // TEMPLATE` and `ALTER DATABASE ... RENAME` wait (5 s) for every other session of it to end.
            let other = p.key.database != self.resolved.upstreams[&p.budget().upstream].database;
            p.reap(other.then_some(other_idle));
        }
        let unused = |p: &Arc<ServicePool>| {
            let t = &self.resolved.upstreams[&p.budget().upstream];
            let default = p.key.database == t.database && p.key.role == t.user;
            let idle_for = p.unused_for();
            !default && p.status().size == 0 && idle_for >= other_idle.min(p.budget().settings.server_idle_timeout)
        };
        if !all.iter().any(unused) {
            return;
        }
        drop(all);
        let mut map = self.pools.write().unwrap_or_else(|e| e.into_inner());
        // Only the map holds it: no relay, checkout or snapshot has it now.
        map.retain(|_, p| !(unused(p) && Arc::strong_count(p) == 1));
    }

    pub fn close(&self) {
        for p in self.all() {
            p.close_idle();
            p.pool.close();
        }
    }
}

/// What all pools of one (service, route) share: the share's slots, admission, operator control, counters.
pub struct ServiceGroup {
    pub slots: Arc<Slots>,
    pub metrics: crate::telemetry::metrics::PoolMetrics,
    pub admission: Arc<crate::budget::admission::Admission>,
    pub control: Arc<crate::budget::control::PoolControl>,
    pub pinned: Arc<AtomicU32>,
    /// Every pool of the group, to close an idle connection of one when another needs the slot.
    members: Mutex<Vec<managed::WeakPool<Manager>>>,
}

impl ServiceGroup {
    pub fn new(
        share: u32,
        metrics: crate::telemetry::metrics::PoolMetrics,
        admission: crate::budget::admission::Admission,
    ) -> ServiceGroup {
        ServiceGroup {
            slots: Slots::new(share),
            metrics,
            admission: Arc::new(admission),
            control: Default::default(),
            pinned: Default::default(),
            members: Mutex::default(),
        }
    }

    pub(crate) fn join(&self, pool: &Pool) {
        let mut m = self.members.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|w| w.upgrade().is_some());
        m.push(pool.weak());
    }

    /// Close one idle connection of a pool of this group other than `except` (its slot frees once its backend has
    /// exited); nothing when none is idle.
    pub(super) fn close_idle_other(&self, except: &PoolKey) {
        let pools: Vec<Pool> = {
            let m = self.members.lock().unwrap_or_else(|e| e.into_inner());
            m.iter().filter_map(|w| w.upgrade()).collect()
        };
        for p in pools.iter().filter(|p| &p.manager().key != except) {
            if let Some(c) = p.manager().affinity.take(None, false) {
                drop(PooledConn::take(c));
                return;
            }
            if p.status().available == 0 {
                continue;
            }
            let mut closed = false;
            let removed = p.retain(|_, _| std::mem::replace(&mut closed, true));
            if !removed.removed.is_empty() {
                return;
            }
        }
    }
}

impl ServicePool {
    /// A passthrough role's pool: the keys its newest client proved log its next servers in (a changed
    /// password takes effect with the first client that uses it).
    pub fn take_keys(&self, keys: Option<&crate::config::users::RoleKeys>) {
        let m = self.pool.manager();
        if let (Some(k), Some(cell)) = (keys, &m.login.passthrough) {
            if **cell.load() != *k {
                cell.store(Arc::new(k.clone())); // the replica's login shares the cell
            }
        }
    }
}
