//! Cancel keys: each client gets a proxy-issued BackendKeyData that maps to whichever server backend
//! it holds right now, so a CancelRequest reaches exactly that backend and never another client's.

use dashmap::DashMap;
use rand::Rng;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::Notify;

/// The server backend a client is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerKey {
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
}

#[derive(Debug)]
struct Entry {
    secret: i32,
    server: Option<ServerKey>,
    /// Set while the client waits in a pool queue: a cancel wakes it instead of a backend.
    queued: Option<Arc<Notify>>,
}

/// What a valid CancelRequest reaches.
#[derive(Debug, Clone)]
pub enum CancelTarget {
    /// The backend running the client's query.
    Server(ServerKey),
    /// The client is queued for a server: its wait is abandoned.
    Queued(Arc<Notify>),
}

/// All live client keys of the process.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    map: DashMap<i32, Entry>,
}

/// A client's key; removed from the registry on Drop.
#[derive(Debug)]
pub struct ClientKey {
    registry: Arc<CancelRegistry>,
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
            if let dashmap::Entry::Vacant(v) = self.map.entry(pid) {
                v.insert(Entry { secret, server: None, queued: None });
                return ClientKey { registry: self.clone(), pid, secret };
            }
        }
    }

    /// What to cancel for a client key, if the key is valid and the client holds a server or waits for one.
    pub fn lookup(&self, pid: i32, secret: i32) -> Option<CancelTarget> {
        let e = self.map.get(&pid)?;
        if e.secret != secret {
            return None;
        }
        match (&e.server, &e.queued) {
            (Some(s), _) => Some(CancelTarget::Server(*s)),
            (None, Some(n)) => Some(CancelTarget::Queued(n.clone())),
            (None, None) => None,
        }
    }

    /// Client pid → server backend pid, for every client that holds a server now.
    pub fn attached(&self) -> std::collections::HashMap<i32, i32> {
        self.map.iter().filter_map(|e| e.server.map(|s| (*e.key(), s.pid))).collect()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl ClientKey {
    /// Record which server this client holds (or `None` when it holds none).
    pub fn attach(&self, server: Option<ServerKey>) {
        if let Some(mut e) = self.registry.map.get_mut(&self.pid) {
            e.server = server;
        }
    }

    /// Mark the client as queued (a fresh notifier per wait) or, with `None`, as no longer queued.
    pub fn queued(&self, wake: Option<Arc<Notify>>) {
        if let Some(mut e) = self.registry.map.get_mut(&self.pid) {
            e.queued = wake;
        }
    }
}

impl Drop for ClientKey {
    fn drop(&mut self) {
        self.registry.map.remove(&self.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_needs_the_right_secret_and_an_attached_server() {
        let reg = Arc::new(CancelRegistry::default());
        let k = reg.issue();
        assert!(reg.lookup(k.pid, k.secret).is_none());
        let s = ServerKey { addr: "127.0.0.1:5432".parse().unwrap(), pid: 42, secret: 7 };
        k.attach(Some(s));
        assert!(matches!(reg.lookup(k.pid, k.secret), Some(CancelTarget::Server(x)) if x == s));
        assert!(reg.lookup(k.pid, k.secret.wrapping_add(1)).is_none());
        k.attach(None);
        assert!(reg.lookup(k.pid, k.secret).is_none());
        k.queued(Some(Arc::new(Notify::new())));
        assert!(matches!(reg.lookup(k.pid, k.secret), Some(CancelTarget::Queued(_))));
        k.queued(None);
        assert!(reg.lookup(k.pid, k.secret).is_none());
        drop(k);
        assert!(reg.is_empty());
    }
}
