//! Home backends for transaction mode: a client is told the pid of a real server of its pool at login (its
//! home) and gets that server back whenever it is idle, so BackendKeyData, `pg_backend_pid()` and
//! `pg_terminate_backend()` agree as they do on a direct connection.
//!
//! Idle servers of a transaction-mode pool wait here (parked), outside deadpool's queue, so a checkout can
//! choose one: its own home first, else one nobody calls home, else the one home to fewest clients. A server
//! goes to deadpool's queue instead only while checkouts wait there.
//!
//! A home ended by an administrator (`pg_terminate_backend`, FATAL 57P01) ends the clients that used it
//! within `terminate_window` (default 10 s), as it would end their direct connections. A client idle for
//! longer is shielded, as a pooler should shield it: scripts that terminate idle backends, and a platform
//! that kills idle connections, hit the pool's idle servers, not the sessions of its clients. A home the
//! proxy closed (idle timeout, lifetime, `RECONNECT`) just stops being preferred.

use crate::budget::handoff::{HandOff, Waiters};
use crate::budget::pool::PooledConn;
use crate::config::resolve::ServiceBudget;
use crate::server::{IdleState, ServerConn};
use futures_util::task::AtomicWaker;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Wakes the watcher of a pool's parked servers when one of their sockets becomes readable.
#[derive(Debug, Default)]
struct Watch {
    notify: tokio::sync::Notify,
    started: AtomicBool,
    /// How often it was woken (some parked socket became readable since a server parked at a lower count).
    wakes: AtomicU64,
}

impl std::task::Wake for Watch {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.wakes.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_one();
    }
}

/// The parked servers of one pool and the clients homed on its servers.
pub struct Affinity {
    watch: Arc<Watch>,
    /// Registered on every parked server's socket: a backend that sends something while parked (closed, or
    /// terminated by an administrator) is seen at once, not at the next checkout or reaper tick.
    waker: std::task::Waker,
    /// The parked servers and the checkouts waiting for one (one lock: a server is parked or handed over).
    idle: Mutex<Idle>,
    /// Server pid → every client homed there.
    homes: Mutex<HashMap<i32, Vec<Homed>>>,
    next_id: AtomicU64,
    /// What `Homed::used_ms` counts from.
    epoch: Instant,
}

impl Default for Affinity {
    fn default() -> Self {
        let watch = Arc::new(Watch::default());
        Affinity {
            waker: std::task::Waker::from(watch.clone()),
            watch,
            idle: Mutex::default(),
            homes: Mutex::default(),
            next_id: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

/// A pool's idle servers and its waiting checkouts.
#[derive(Default)]
struct Idle {
    servers: Vec<PooledConn>,
    waiters: Waiters,
}

/// One client homed on a server.
struct Homed {
    id: u64,
    signal: Arc<HomeSignal>,
}

/// What a client and its pool share about its home: one small allocation per client.
#[derive(Debug, Default)]
pub struct HomeSignal {
    /// When the client last had its home (ms after [`Affinity::epoch`]).
    used_ms: AtomicU64,
    ended: AtomicBool,
    waker: AtomicWaker,
}

impl HomeSignal {
    fn end(&self) {
        self.ended.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Whether an administrator ended the home backend.
    pub fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Wake `waker` when the home backend is ended (it fires once: one registration is enough).
    pub fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }
}

impl std::fmt::Debug for Affinity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Affinity").field("parked", &self.parked()).field("homes", &lock(&self.homes).len()).finish()
    }
}

/// A client's home; leaves the pool's books when dropped.
pub struct Home {
    pub pid: i32,
    id: u64,
    pub signal: Arc<HomeSignal>,
    affinity: Arc<Affinity>,
}

impl Home {
    /// The client has its home now (a checkout got it at `now`).
    pub fn touch_at(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.affinity.epoch).as_millis() as u64;
        self.signal.used_ms.store(ms, Ordering::Relaxed);
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let mut homes = lock(&self.affinity.homes);
        if let Some(v) = homes.get_mut(&self.pid) {
            v.retain(|h| h.id != self.id);
            if v.is_empty() {
                homes.remove(&self.pid);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Affinity {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Home a client on the server `pid`.
    pub fn home(self: &Arc<Self>, pid: i32) -> Home {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let signal = Arc::new(HomeSignal { used_ms: AtomicU64::new(self.now_ms()), ..Default::default() });
        lock(&self.homes).entry(pid).or_default().push(Homed { id, signal: signal.clone() });
        Home { pid, id, signal, affinity: self.clone() }
    }

    /// How many clients call server `pid` home.
    pub fn homed(&self, pid: i32) -> usize {
        lock(&self.homes).get(&pid).map_or(0, Vec::len)
    }

    /// An administrator ended server `pid`: end the sessions of the clients homed there that used it within
    /// `window`; the others stay, without a home. Returns how many sessions end.
    pub fn terminated(&self, pid: i32, window: Duration) -> usize {
        let gone = lock(&self.homes).remove(&pid).unwrap_or_default();
        if window.is_zero() {
            return 0; // `terminate_window = 0`: every client is shielded
        }
        let now = self.now_ms();
        let recent = gone
            .iter()
            .filter(|h| now.saturating_sub(h.signal.used_ms.load(Ordering::Relaxed)) <= window.as_millis() as u64);
        recent.map(|h| h.signal.end()).count()
    }

    /// Whether a server parked and found quiet is quiet still: no parked socket became readable since (the
    /// watch registered on it would have been woken). Spares the checkout a poll of the socket.
    pub fn still_quiet(&self, conn: &mut ServerConn) -> bool {
        conn.parked_wakes.take() == Some(self.watch.wakes.load(Ordering::Acquire))
    }

    /// The waker registered on parked servers' sockets.
    pub fn watcher(&self) -> &std::task::Waker {
        &self.waker
    }

    /// Whether an idle server's socket says it is gone (closed, or it sent something unasked), leaving `waker`
    /// registered on it otherwise. A gone one is marked broken; one an administrator terminated ends the
    /// clients homed on it that used it within `window` (the service's `terminate_window`).
    pub fn gone(&self, conn: &mut ServerConn, waker: &std::task::Waker, window: Duration) -> bool {
        let IdleState::Gone { terminated } = conn.idle_state_in(waker) else { return false };
        conn.broken = true;
        if terminated {
            self.terminated(conn.pid, window);
        }
        true
    }

    /// Hand an idle server to the oldest waiting checkout, else park it, its socket watched; one that already
    /// went away is closed instead (and a waiter told to open another).
    pub fn park(&self, mut conn: PooledConn, window: Duration) {
        // Counted before the look: a wake that comes after it (data arriving once the watch is registered)
        // moves the count past the one recorded.
        let wakes = self.watch.wakes.load(Ordering::Acquire);
        conn.parked_wakes = None;
        if self.gone(&mut conn, &self.waker, window) {
            drop(PooledConn::take(conn));
            return self.retry_one();
        }
        let mut idle = lock(&self.idle);
        // Recorded only for a server that stays parked: one handed to a waiter is read by that client's task
        // next, and the watch no longer speaks for its socket.
        if let Some(mut conn) = idle.waiters.deliver(conn) {
            conn.parked_wakes = Some(wakes);
            idle.servers.push(conn);
        }
    }

    /// A server of this pool closed: the oldest waiting checkout may open one in its place.
    pub fn retry_one(&self) {
        lock(&self.idle).waiters.retry_one();
    }

    /// Queue a checkout for the next idle server: how many wait now, this one included; `None` (not queued)
    /// when one is parked now.
    pub fn enqueue(&self, w: &Arc<HandOff>) -> Option<usize> {
        let mut idle = lock(&self.idle);
        if !idle.servers.is_empty() {
            return None;
        }
        idle.waiters.push(w.clone());
        Some(idle.waiters.len())
    }

    /// A queued checkout stops waiting; the server it was handed meanwhile, if any.
    pub fn leave(&self, w: &Arc<HandOff>) -> Option<PooledConn> {
        lock(&self.idle).waiters.leave(w)
    }

    /// How many checkouts wait for a server ahead of `w`.
    pub fn ahead_of(&self, w: &Arc<HandOff>) -> usize {
        lock(&self.idle).waiters.ahead_of(w)
    }

    /// Close the parked servers whose sockets became readable; the watch stays on the others.
    fn sweep(&self, window: Duration) {
        let gone = self.take_if(|c| self.gone(c, &self.waker, window));
        gone.into_iter().for_each(|c| {
            drop(PooledConn::take(c));
            self.retry_one();
        });
    }

    pub fn parked(&self) -> usize {
        lock(&self.idle).servers.len()
    }

    /// (parked servers, waiting checkouts) in one look.
    pub fn counts(&self) -> (usize, usize) {
        let idle = lock(&self.idle);
        (idle.servers.len(), idle.waiters.len())
    }

    pub fn is_parked(&self, pid: i32) -> bool {
        lock(&self.idle).servers.iter().any(|c| c.pid == pid)
    }

    /// Take a parked server: `home` if it is parked, else (unless `exact`) the one home to fewest clients.
    pub fn take(&self, home: Option<i32>, exact: bool) -> Option<PooledConn> {
        let parked = &mut lock(&self.idle).servers;
        let at = match home.and_then(|pid| parked.iter().position(|c| c.pid == pid)) {
            Some(i) => i,
            None if exact || parked.is_empty() => return None,
            None => {
                let homes = lock(&self.homes);
                let load = |c: &PooledConn| homes.get(&c.pid).map_or(0, Vec::len);
                // The most recently parked among the least loaded: its socket and plan cache are warm.
                (0..parked.len()).rev().min_by_key(|&i| load(&parked[i]))?
            }
        };
        Some(parked.swap_remove(at))
    }

    /// The pid of a parked server no client calls home, if any.
    pub fn unhomed(&self) -> Option<i32> {
        let idle = lock(&self.idle);
        let homes = lock(&self.homes);
        idle.servers.iter().rev().map(|c| c.pid).find(|pid| !homes.contains_key(pid))
    }

    /// The pid of the parked server home to fewest clients, if any is parked.
    pub fn least_homed(&self) -> Option<i32> {
        let idle = lock(&self.idle);
        let homes = lock(&self.homes);
        idle.servers.iter().map(|c| c.pid).min_by_key(|pid| homes.get(pid).map_or(0, Vec::len))
    }

    /// Remove the parked servers `drop_it` picks (the caller closes or returns them).
    pub fn take_if(&self, mut drop_it: impl FnMut(&mut PooledConn) -> bool) -> Vec<PooledConn> {
        let parked = &mut lock(&self.idle).servers;
        let mut out = Vec::new();
        let mut i = 0;
        while i < parked.len() {
            if drop_it(&mut parked[i]) {
                out.push(parked.swap_remove(i));
            } else {
                i += 1;
            }
        }
        out
    }
}

impl Drop for Affinity {
    fn drop(&mut self) {
        // The watcher holds only a weak pool: woken, it finds the pool gone and ends.
        self.watch.notify.notify_one();
    }
}

/// The task that watches a pool's parked servers while the pool lives.
async fn watch_parked(pool: deadpool::managed::WeakPool<crate::budget::pool::Manager>, watch: Arc<Watch>) {
    loop {
        watch.notify.notified().await;
        let Some(pool) = pool.upgrade() else { return };
        let m = pool.manager();
        m.affinity.sweep(m.budget.load().settings.terminate_window);
    }
}

impl crate::budget::pool::ServicePool {
    /// Take a parked server that is still usable: `home` when it is parked, else (unless `exact`) the one
    /// home to fewest clients. Unusable ones met on the way are closed.
    pub async fn take_parked(&self, home: Option<i32>, exact: bool) -> Option<PooledConn> {
        loop {
            let b = self.budget();
            let (mut c, idle) = self.take_usable(home, exact, Instant::now(), &b)?;
            let s = &b.settings;
            // Boxed: the round trip is rare, and every checkout's future would carry its state.
            if idle > s.server_check_delay && Box::pin(c.ping(s.connect_timeout)).await.is_err() {
                c.broken = true;
                drop(PooledConn::take(c));
                continue;
            }
            return Some(c);
        }
    }

    /// [`Self::take_parked`] without an await: `None` also when the server it would take needs a liveness
    /// round trip first (it stays parked for the async path).
    pub fn take_parked_now(&self, home: Option<i32>, now: Instant, b: &ServiceBudget) -> Option<PooledConn> {
        let (c, idle) = self.take_usable(home, false, now, b)?;
        let s = &b.settings;
        if idle > s.server_check_delay {
            self.pool.manager().affinity.park(c, s.terminate_window);
            return None;
        }
        Some(c)
    }

    /// A parked server that passes the checks without a round trip (the unusable ones met are closed), and
    /// how long it was idle.
    fn take_usable(
        &self,
        home: Option<i32>,
        exact: bool,
        now: Instant,
        b: &ServiceBudget,
    ) -> Option<(PooledConn, Duration)> {
        let m = self.pool.manager();
        loop {
            let mut c = m.affinity.take(home, exact)?;
            if let Ok(idle) = m.unusable(&mut c, now, b) {
                return Some((c, idle));
            }
            drop(PooledConn::take(c));
        }
    }

    /// Give a clean, idle server back: parked in transaction mode (where a checkout can choose it), straight
    /// to deadpool's queue when checkouts wait there or in session mode.
    pub fn put_back(&self, conn: PooledConn) {
        self.put_back_at(conn, Instant::now());
    }

    /// [`Self::put_back`] with the caller's clock read as the check-in time.
    pub fn put_back_at(&self, mut conn: PooledConn, now: Instant) {
        conn.last_checkin = now;
        let b = self.budget();
        // Session mode: deadpool's queue.
        if b.pool_mode() != crate::config::PoolMode::Transaction {
            return drop(conn);
        }
        let affinity = &self.pool.manager().affinity;
        if !affinity.watch.started.swap(true, Ordering::AcqRel) {
            tokio::spawn(watch_parked(self.pool.weak(), affinity.watch.clone()));
        }
        affinity.park(conn, b.settings.terminate_window);
        // Looked at once, after the server is parked (or handed to a queued checkout): a checkout waiting in
        // deadpool's queue (also one that began meanwhile, on another thread) must not miss a server, and more
        // servers than a lowered share allows go to deadpool, which closes the excess.
        let st = self.pool.status();
        if st.waiting > 0 || st.size > st.max_size {
            drop(affinity.take(None, false));
        }
    }

    /// Choose a transaction-mode client's home at login: a parked server nobody calls home, else a new
    /// server when the share has room now, else the parked server home to fewest. `None` when every server
    /// is busy and the share is full (the client then keeps a proxy-issued pid).
    pub async fn choose_home(&self) -> Option<Home> {
        let affinity = &self.pool.manager().affinity;
        if let Some(home) = self.home_on_parked(Affinity::unhomed) {
            return Some(home);
        }
        let st = self.pool.status();
        let room = st.size < self.share() as usize && self.group.slots.used() < self.group.slots.limit();
        if st.available > 0 || room {
            if let Ok(c) = self.fresh().await {
                let home = affinity.home(c.pid);
                self.put_back(c);
                return Some(home);
            }
        }
        self.home_on_parked(Affinity::least_homed)
    }

    /// A home on the parked server `pick` names, checked first without a round trip: one that died since it
    /// was parked is closed and the next pick tried (homing a client on it would end the client).
    fn home_on_parked(&self, pick: fn(&Affinity) -> Option<i32>) -> Option<Home> {
        let m = self.pool.manager();
        while let Some(pid) = pick(&m.affinity) {
            let b = self.budget();
            let Some((c, _)) = self.take_usable(Some(pid), true, Instant::now(), &b) else { continue };
            m.affinity.park(c, b.settings.terminate_window);
            return Some(m.affinity.home(pid));
        }
        None
    }

    /// A new server connection now (no wait), bypassing the parked ones.
    async fn fresh(&self) -> Result<PooledConn, deadpool::managed::PoolError<crate::server::ServerError>> {
        let b = self.budget();
        self.pool.timeout_get(&crate::budget::pool::timeouts(&b.settings, std::time::Duration::ZERO)).await
    }
}

#[cfg(test)]
#[path = "affinity_tests.rs"]
mod tests;
