//! Cancel keys: each client gets a proxy-issued BackendKeyData that maps to whichever server backend
//! it holds right now, so a CancelRequest reaches exactly that backend and never another client's.
//!
//! A cancel is looked up while the client holds the server but reaches Postgres a little later. So that it
//! can never land on the next client's query, every forwarded cancel is an [`InFlight`] guard on the
//! checkout it was looked up in; the relay detaches a server only after the checkout's cancels are done
//! (Postgres has signalled the backend, which ignores a cancel that arrives while it is idle).

use crate::budget::handoff::HandOff;
use dashmap::DashMap;
use rand::Rng;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;

/// The server backend a client is attached to.
#[derive(Debug, Clone)]
pub struct ServerKey {
    pub route: Arc<crate::server::CancelRoute>,
    pub pid: i32,
    pub secret: i32,
}

impl PartialEq for ServerKey {
    fn eq(&self, o: &Self) -> bool {
        (self.pid, self.secret) == (o.pid, o.secret) && Arc::ptr_eq(&self.route, &o.route)
    }
}

/// Cancels in flight for one checkout.
#[derive(Debug, Default)]
pub struct Flights {
    count: AtomicU32,
    done: Notify,
}

impl Flights {
    /// Wait until no cancel for this checkout is in flight; false if `limit` passed first.
    pub async fn settle(&self, limit: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.done.notified();
                if self.count.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }

    pub fn in_flight(&self) -> u32 {
        self.count.load(Ordering::Acquire)
    }
}

/// One forwarded cancel; the checkout it belongs to is held until this is dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Flights>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.done.notify_waiters();
        }
    }
}

#[derive(Debug, Default)]
struct Entry {
    server: Option<(ServerKey, Arc<Flights>)>,
    /// The last checkout's flight count, kept for the next when no cancel held it (one allocation per client).
    spare: Option<Arc<Flights>>,
    /// Set while the client waits in a pool queue: a cancel wakes it instead of a backend.
    queued: Option<QueuedWake>,
}

/// One client's entry. The registry's map finds it for a CancelRequest; the client's own key holds it too, so
/// the attach, detach and queue marks of every transaction lock only this (uncontended) mutex, with no hash
/// lookup and no shard lock.
type Cell = Arc<Mutex<Entry>>;

fn lock(cell: &Mutex<Entry>) -> MutexGuard<'_, Entry> {
    // Nothing panics while holding it; a poisoned entry is still a consistent one.
    cell.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a cancel reaches a queued client: the notifier of a checkout future, or the hand-off slot the relay
/// loop waits on.
#[derive(Clone)]
pub enum QueuedWake {
    Notify(Arc<Notify>),
    Hand(Arc<HandOff>),
}

impl QueuedWake {
    /// The client's wait is abandoned.
    pub fn wake(&self) {
        match self {
            QueuedWake::Notify(n) => n.notify_one(),
            QueuedWake::Hand(h) => h.cancel(),
        }
    }
}

impl std::fmt::Debug for QueuedWake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QueuedWake::Notify(_) => "QueuedWake::Notify",
            QueuedWake::Hand(_) => "QueuedWake::Hand",
        })
    }
}

/// What a valid CancelRequest reaches.
#[derive(Debug)]
pub enum CancelTarget {
    /// The backend running the client's query; the guard holds that checkout until the cancel is sent.
    Server(ServerKey, InFlight),
    /// The client is queued for a server: its wait is abandoned.
    Queued(QueuedWake),
}

/// All live client keys of the process, by (pid, secret): in transaction mode clients homed on one server
/// share its pid, and only the secret tells them apart.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    map: DashMap<u64, Cell, foldhash::fast::RandomState>,
}

fn slot(pid: i32, secret: i32) -> u64 {
    (pid as u32 as u64) << 32 | secret as u32 as u64
}

/// A client's key; removed from the registry on Drop.
#[derive(Debug)]
pub struct ClientKey {
    registry: Arc<CancelRegistry>,
    cell: Cell,
    pub pid: i32,
    pub secret: i32,
}

impl CancelRegistry {
    /// Issue a fresh random key for a new client.
    pub fn issue(self: &Arc<Self>) -> ClientKey {
        let mut rng = rand::thread_rng();
        loop {
            let pid = rng.gen_range(1..i32::MAX);
            let secret = rng.gen();
            if let dashmap::Entry::Vacant(v) = self.map.entry(slot(pid, secret)) {
                let cell = Cell::default();
                v.insert(cell.clone());
                return ClientKey { registry: self.clone(), cell, pid, secret };
            }
        }
    }

    /// What to cancel for a client key, if the key is valid and the client holds a server or waits for one.
    pub fn lookup(&self, pid: i32, secret: i32) -> Option<CancelTarget> {
        let cell = self.map.get(&slot(pid, secret))?.clone();
        let e = lock(&cell);
        match (&e.server, &e.queued) {
            (Some((s, f)), _) => {
                // Counted under the entry's lock, so a detach after this sees the flight.
                f.count.fetch_add(1, Ordering::AcqRel);
                Some(CancelTarget::Server(s.clone(), InFlight(f.clone())))
            }
            (None, Some(n)) => Some(CancelTarget::Queued(n.clone())),
            (None, None) => None,
        }
    }

    /// Client key (pid, secret) → server backend pid, for every client that holds a server now.
    pub fn attached(&self) -> std::collections::HashMap<(i32, i32), i32> {
        let key = |k: u64| ((k >> 32) as u32 as i32, k as u32 as i32);
        self.map.iter().filter_map(|e| lock(e.value()).server.as_ref().map(|(s, _)| (key(*e.key()), s.pid))).collect()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl ClientKey {
    /// This key's place in the registry.
    fn slot(&self) -> u64 {
        slot(self.pid, self.secret)
    }

    /// Take `pid` as this key's pid (the client is told its server's real pid — in session mode the one it
    /// holds, in transaction mode its home — so `pg_backend_pid()`, NotificationResponse and
    /// `pg_terminate_backend` agree with what it was told). Keeps the old pid when another client's key
    /// already has this pid with the same secret.
    pub fn take_pid(&mut self, pid: i32) -> bool {
        if pid == self.pid {
            return true;
        }
        match self.registry.map.entry(slot(pid, self.secret)) {
            dashmap::Entry::Vacant(v) => {
                v.insert(self.cell.clone());
            }
            dashmap::Entry::Occupied(_) => return false,
        }
        // Never two shard locks at once (both keys may live in one shard): the old place goes after.
        self.registry.map.remove(&self.slot());
        self.pid = pid;
        true
    }

    /// Record which server this client holds from now on.
    pub fn attach(&self, server: ServerKey) {
        let mut e = lock(&self.cell);
        let flights = e.spare.take().unwrap_or_default();
        e.server = Some((server, flights));
    }

    /// The client gives its server up: no new cancel can reach it; returns the cancels still in flight for
    /// it, which the caller lets settle before the server goes to anyone else.
    pub fn detach(&self) -> Option<Arc<Flights>> {
        let mut e = lock(&self.cell);
        let (_, flights) = e.server.take()?;
        if Arc::strong_count(&flights) == 1 {
            // No cancel holds it (none in flight, none being looked up): the next checkout counts on it.
            e.spare = Some(flights);
            return None;
        }
        Some(flights).filter(|f| f.in_flight() > 0)
    }

    /// Mark the client as queued until the returned mark is dropped (a fresh notifier per wait).
    pub fn mark_queued(&self, wake: QueuedWake) -> QueuedMark {
        lock(&self.cell).queued = Some(wake);
        QueuedMark { cell: self.cell.clone() }
    }
}

/// A client marked as queued for cancel requests; the mark goes on Drop.
#[derive(Debug)]
pub struct QueuedMark {
    cell: Cell,
}

impl Drop for QueuedMark {
    fn drop(&mut self) {
        lock(&self.cell).queued = None;
    }
}

impl Drop for ClientKey {
    fn drop(&mut self) {
        self.registry.map.remove(&self.slot());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pid: i32) -> ServerKey {
        let route = crate::server::CancelRoute {
            endpoint: crate::server::Endpoint::Tcp("127.0.0.1:5432".parse().unwrap()),
            host: "127.0.0.1".into(),
            tls: Default::default(),
        };
        ServerKey { route: Arc::new(route), pid, secret: 7 }
    }

    #[test]
    fn lookup_needs_the_right_secret_and_an_attached_server() {
        let reg = Arc::new(CancelRegistry::default());
        let k = reg.issue();
        assert!(reg.lookup(k.pid, k.secret).is_none());
        let s = key(42);
        k.attach(s.clone());
        assert!(matches!(reg.lookup(k.pid, k.secret), Some(CancelTarget::Server(x, _)) if x == s));
        assert!(reg.lookup(k.pid, k.secret.wrapping_add(1)).is_none());
        assert!(k.detach().is_none(), "no cancel in flight");
        assert!(reg.lookup(k.pid, k.secret).is_none());
        let mark = k.mark_queued(QueuedWake::Notify(Arc::new(Notify::new())));
        assert!(matches!(reg.lookup(k.pid, k.secret), Some(CancelTarget::Queued(_))));
        drop(mark);
        assert!(reg.lookup(k.pid, k.secret).is_none());
        drop(k);
        assert!(reg.is_empty());
    }

    #[test]
    fn a_key_takes_its_servers_pid_and_clients_may_share_one() {
        let reg = Arc::new(CancelRegistry::default());
        let mut a = reg.issue();
        let mut b = reg.issue();
        let s = key(4242);
        a.attach(s.clone());
        assert!(a.take_pid(4242));
        assert_eq!(a.pid, 4242);
        assert!(matches!(reg.lookup(4242, a.secret), Some(CancelTarget::Server(x, _)) if x == s));
        // Another client may share the pid (a transaction-mode home): the secret tells them apart.
        let t = key(4243);
        b.attach(t.clone());
        assert!(b.take_pid(4242));
        assert!(matches!(reg.lookup(4242, b.secret), Some(CancelTarget::Server(x, _)) if x == t));
        assert!(matches!(reg.lookup(4242, a.secret), Some(CancelTarget::Server(x, _)) if x == s));
        drop(a);
        assert_eq!(reg.len(), 1);
        assert!(reg.lookup(4242, b.secret).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn detach_waits_for_a_cancel_looked_up_before_it() {
        let reg = Arc::new(CancelRegistry::default());
        let k = reg.issue();
        k.attach(key(42));
        let Some(CancelTarget::Server(_, flight)) = reg.lookup(k.pid, k.secret) else { panic!("attached") };
        let flights = k.detach().expect("one cancel in flight");
        assert!(reg.lookup(k.pid, k.secret).is_none(), "no new cancel after detach");
        // Not settled while the cancel is still being sent; settled once it is done.
        assert!(!flights.settle(Duration::from_millis(50)).await);
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            drop(flight);
        });
        assert!(flights.settle(Duration::from_secs(5)).await);
        sender.await.unwrap();
        assert_eq!(flights.in_flight(), 0);
    }
}
