//! Named prepared statements in transaction mode: client statement names map to pool-wide statements keyed
//! by their text, parameter types and `search_path` ([`Registry`], [`ClientStatements`]); each server
//! remembers which of them it has prepared ([`ServerStatements`], an LRU of `max_prepared_statements`).

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// Prefix of the names the proxy gives statements on servers. A client name with this prefix that the
/// client did not prepare itself is refused, so no client can run a statement it did not prepare.
pub const PREFIX: &str = "pgbudget_";

/// A statement name no statement ever has (closed to get a CloseComplete from the server in order).
pub const NOBODY: &str = "pgbudget__none";
/// Most statements one client session may keep prepared.
pub const MAX_PER_CLIENT: usize = 10_000;
/// Most bytes of statement text and kept row shapes one client session's names may hold.
pub const MAX_CLIENT_BYTES: usize = 32 << 20;

/// One statement shared by every client of a pool that prepared the same text.
#[derive(Debug)]
pub struct Stmt {
    pub id: u64,
    /// The name on servers: `pgbudget_<id>`.
    pub name: String,
    /// The Parse body after the statement name: query text, NUL, parameter types.
    pub tail: Bytes,
    key: Bytes,
    /// Postgres said "cached plan must not change result type": the next Parse gets a new statement.
    stale: AtomicBool,
    /// The registry's count of statements gone, bumped when this one goes.
    deaths: Arc<AtomicU64>,
}

impl Drop for Stmt {
    fn drop(&mut self) {
        // No client holds it any more: servers that prepared it close it at their next checkout.
        self.deaths.fetch_add(1, Ordering::Relaxed);
    }
}

impl Stmt {
    /// The statement text (without its NUL and types).
    pub fn query(&self) -> &[u8] {
        let end = self.tail.iter().position(|c| *c == 0).unwrap_or(self.tail.len());
        &self.tail[..end]
    }

    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }
}

/// The pool's statements. Entries live while a client or a lookup holds them (weak here).
#[derive(Debug, Default)]
pub struct Registry {
    map: Mutex<HashMap<Bytes, Weak<Stmt>>>,
    next: AtomicU64,
    /// Map size at which dead entries are swept next.
    sweep_at: AtomicU64,
    /// How many statements went (no client held them any more).
    deaths: Arc<AtomicU64>,
}

impl Registry {
    /// The statement for a Parse body tail under `search_path`, shared with every other client that
    /// prepared the same.
    pub fn intern(&self, tail: &[u8], search_path: &str) -> Arc<Stmt> {
        let mut key = Vec::with_capacity(tail.len() + search_path.len() + 1);
        key.extend_from_slice(tail);
        key.push(0);
        key.extend_from_slice(search_path.as_bytes());
        let key = Bytes::from(key);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get(&key).and_then(Weak::upgrade) {
            if !s.is_stale() {
                return s;
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let stmt = Arc::new(Stmt {
            id,
            name: format!("{PREFIX}{id}"),
            tail: Bytes::copy_from_slice(tail),
            key: key.clone(),
            stale: AtomicBool::new(false),
            deaths: self.deaths.clone(),
        });
        map.insert(key, Arc::downgrade(&stmt));
        let sweep_at = self.sweep_at.load(Ordering::Relaxed).max(1024);
        if map.len() as u64 >= sweep_at {
            map.retain(|_, w| w.strong_count() > 0);
            self.sweep_at.store((map.len() as u64 * 2).max(1024), Ordering::Relaxed);
        }
        stmt
    }

    /// Retire a statement whose plan the server refuses to reuse: clients re-prepare under a new name.
    pub fn retire(&self, stmt: &Stmt) {
        stmt.stale.store(true, Ordering::Relaxed);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&stmt.key).is_some_and(|w| std::ptr::eq(w.as_ptr(), stmt)) {
            map.remove(&stmt.key);
        }
    }

    /// How many statements went so far: a server whose count differs has some to close.
    pub fn deaths(&self) -> u64 {
        self.deaths.load(Ordering::Relaxed)
    }

    /// Statements known (some may be unused, awaiting a sweep).
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Live statements and how many client sessions use each, for `SHOW PREPARED`.
    pub fn list(&self) -> Vec<(Arc<Stmt>, usize)> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(Arc<Stmt>, usize)> =
            map.values().filter_map(Weak::upgrade).map(|s| (s.clone(), Arc::strong_count(&s) - 2)).collect();
        v.sort_by_key(|(s, _)| s.id);
        v
    }
}

/// One client's statements: its names to the pool's statements.
#[derive(Debug, Default)]
pub struct ClientStatements {
    /// Name → statement and the generation of the Parse that named it.
    map: HashMap<String, (Arc<Stmt>, u64)>,
    next_gen: u64,
    /// Per naming (generation): the RowDescription body (empty: NoData) the client was last told; a server
    /// that prepares the statement later must describe it the same, or the client would decode rows of
    /// another shape.
    shapes: HashMap<u64, Bytes>,
    /// Namings whose statement changed shape under them: they fail (0A000) until prepared again.
    broken: std::collections::HashSet<u64>,
    /// Bytes of names, statement texts and shapes held ([`MAX_CLIENT_BYTES`] bounds them).
    bytes: usize,
}

impl ClientStatements {
    pub fn get(&self, name: &str) -> Option<&Arc<Stmt>> {
        self.map.get(name).map(|(s, _)| s)
    }

    /// The client's name for the statement named `server_name` on servers (the least, when it gave the
    /// same statement several names).
    pub fn name_of(&self, server_name: &str) -> Option<&str> {
        self.map.iter().filter(|(_, (s, _))| s.name == server_name).map(|(n, _)| n.as_str()).min()
    }

    /// The name of naming `gen`, while it lasts.
    pub fn name_of_gen(&self, gen: u64) -> Option<&str> {
        self.map.iter().find(|(_, (_, g))| *g == gen).map(|(n, _)| n.as_str())
    }

    /// The statement and the generation of `name`'s naming.
    pub fn naming(&self, name: &str) -> Option<(Arc<Stmt>, u64)> {
        self.map.get(name).cloned()
    }

    /// Keep the shape a client was told for naming `gen` (not past [`MAX_CLIENT_BYTES`]: then no check).
    pub fn set_shape(&mut self, gen: u64, shape: Bytes) {
        if self.bytes + shape.len() > MAX_CLIENT_BYTES {
            return;
        }
        self.bytes += shape.len();
        if let Some(old) = self.shapes.insert(gen, shape) {
            self.bytes -= old.len();
        }
    }

    pub fn shape(&self, gen: u64) -> Option<&Bytes> {
        self.shapes.get(&gen)
    }

    pub fn set_broken(&mut self, gen: u64) {
        self.broken.insert(gen);
    }

    pub fn is_broken(&self, gen: u64) -> bool {
        self.broken.contains(&gen)
    }

    /// A naming is gone for good: forget what was kept about it.
    pub fn drop_gen(&mut self, gen: u64) {
        if let Some(old) = self.shapes.remove(&gen) {
            self.bytes -= old.len();
        }
        self.broken.remove(&gen);
    }

    /// Bytes the names, their statement texts and kept shapes hold.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn put(&mut self, name: String, stmt: Arc<Stmt>, gen: u64) {
        let name_len = name.len();
        self.bytes += name_len + stmt.tail.len();
        if let Some((old, _)) = self.map.insert(name, (stmt, gen)) {
            self.bytes -= name_len + old.tail.len();
        }
    }

    fn take(&mut self, name: &str) -> Option<(Arc<Stmt>, u64)> {
        let (stmt, gen) = self.map.remove(name)?;
        self.bytes -= name.len() + stmt.tail.len();
        Some((stmt, gen))
    }

    /// Name a statement; returns the generation of this naming.
    pub fn insert(&mut self, name: String, stmt: Arc<Stmt>) -> u64 {
        self.next_gen += 1;
        self.put(name, stmt, self.next_gen);
        self.next_gen
    }

    /// Put a naming back as it was (a Close that the server skipped: so was everything up to the next
    /// Sync, including any later Parse of the same name, whose failure then forgets nothing).
    pub fn restore(&mut self, name: String, stmt: Arc<Stmt>, gen: u64) {
        self.put(name, stmt, gen);
    }

    pub fn remove(&mut self, name: &str) -> Option<(Arc<Stmt>, u64)> {
        self.take(name)
    }

    /// Forget `name` if it is still the naming of generation `gen` (a Parse that failed).
    pub fn forget(&mut self, name: &str, gen: u64) {
        if self.map.get(name).is_some_and(|(_, g)| *g == gen) {
            self.take(name);
        }
        self.drop_gen(gen);
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.shapes.clear();
        self.broken.clear();
        self.bytes = 0;
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Which pool statements one server has prepared, least recently used first out.
#[derive(Debug, Default)]
pub struct ServerStatements {
    /// Statement id → last use (a tick of this server's clock): what the server has once the messages
    /// already sent are answered as hoped.
    used: HashMap<u64, u64>,
    /// What the server's answers have confirmed.
    confirmed: HashMap<u64, u64>,
    tick: u64,
    /// The tick the current checkout began at: statements used since are not evicted under it.
    checkout_at: u64,
    /// The statements prepared here by the proxy, to tell when no client holds one any more.
    refs: HashMap<u64, Weak<Stmt>>,
    /// The registry's death count when this server was last cleared of gone statements.
    pruned_at: u64,
}

impl ServerStatements {
    /// A new checkout begins.
    pub fn begin(&mut self) {
        self.tick += 1;
        self.checkout_at = self.tick;
    }

    /// Whether statement `id` is prepared here; a hit also counts as use.
    pub fn touch(&mut self, id: u64) -> bool {
        self.tick += 1;
        match self.used.get_mut(&id) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// Record `id` as prepared; returns the statement to close first if that makes more than `max`
    /// (never one used in the current checkout: a portal may still depend on it).
    pub fn insert(&mut self, id: u64, max: usize) -> Option<u64> {
        self.tick += 1;
        self.used.insert(id, self.tick);
        if self.used.len() <= max.max(1) {
            return None;
        }
        let (&victim, &at) = self.used.iter().filter(|(&k, _)| k != id).min_by_key(|(_, &t)| t)?;
        if at >= self.checkout_at {
            return None;
        }
        self.used.remove(&victim);
        self.refs.remove(&victim);
        Some(victim)
    }

    /// Remember which statement `stmt.id` is (see [`Self::gone`]).
    pub fn remember(&mut self, stmt: &Arc<Stmt>) {
        self.refs.insert(stmt.id, Arc::downgrade(stmt));
    }

    /// The statements prepared here that no client holds any more (each forgotten here; the caller closes
    /// them on the server). `deaths`: the registry's count, looked at only when it moved.
    pub fn gone(&mut self, deaths: u64) -> Vec<u64> {
        if deaths == self.pruned_at {
            return Vec::new();
        }
        self.pruned_at = deaths;
        let gone: Vec<u64> = self.refs.iter().filter(|(_, w)| w.strong_count() == 0).map(|(&id, _)| id).collect();
        gone.iter().for_each(|&id| self.remove(id));
        gone
    }

    /// A client closes `stmt` (its handle the only one left): when it is prepared here, it counts as closed
    /// from now on (what the server confirmed stays until the Close is answered) and its id is returned —
    /// the caller closes it on the server. `None`: another client holds it, or this server never had it.
    pub fn closing_last(&mut self, stmt: &Arc<Stmt>) -> Option<u64> {
        if Arc::strong_count(stmt) != 1 || self.used.remove(&stmt.id).is_none() {
            return None;
        }
        Some(stmt.id)
    }

    pub fn remove(&mut self, id: u64) {
        self.used.remove(&id);
        self.confirmed.remove(&id);
        self.refs.remove(&id);
    }

    /// The server answered a Parse (`true`) or a Close (`false`) of `id`.
    pub fn confirm(&mut self, id: u64, prepared: bool) {
        if prepared {
            self.confirmed.insert(id, self.tick);
        } else {
            self.confirmed.remove(&id);
        }
    }

    /// A message failed or was skipped: what the server has is what it confirmed, then what the messages
    /// still pending do (`(id, prepared)` in the order they were sent).
    pub fn rebuild(&mut self, pending: impl Iterator<Item = (u64, bool)>) {
        let old = std::mem::replace(&mut self.used, self.confirmed.clone());
        for (id, t) in self.used.iter_mut() {
            *t = old.get(id).copied().unwrap_or(*t);
        }
        for (id, prepared) in pending {
            if prepared {
                self.used.insert(id, self.tick);
            } else {
                self.used.remove(&id);
            }
        }
    }

    pub fn clear(&mut self) {
        self.used.clear();
        self.confirmed.clear();
        self.refs.clear();
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }

    /// Replace what is known with the statement names the server itself lists.
    pub fn resync<'a>(&mut self, names: impl Iterator<Item = &'a str>) {
        let old = std::mem::take(&mut self.used);
        for id in names.filter_map(id_of) {
            self.used.insert(id, old.get(&id).copied().unwrap_or(0));
        }
        self.confirmed = self.used.clone();
        let used = &self.used;
        self.refs.retain(|id, _| used.contains_key(id));
    }
}

/// The statement id in a server-side name of ours.
pub fn id_of(name: &str) -> Option<u64> {
    name.strip_prefix(PREFIX)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_names_count_their_bytes() {
        let r = Registry::default();
        let mut c = ClientStatements::default();
        let a = r.intern(b"SELECT 1\0\0\0", "");
        let g = c.insert("s1".into(), a.clone());
        assert_eq!(c.bytes(), 2 + a.tail.len());
        c.set_shape(g, Bytes::from_static(b"row"));
        assert_eq!(c.bytes(), 2 + a.tail.len() + 3);
        c.insert("s1".into(), a.clone());
        c.forget("s1", g + 1);
        c.drop_gen(g);
        assert_eq!((c.bytes(), c.len()), (0, 0));
        c.set_shape(9, Bytes::from(vec![0u8; MAX_CLIENT_BYTES + 1]));
        assert_eq!(c.bytes(), 0, "a shape over the budget is not kept");
    }

    #[test]
    fn same_text_same_statement_until_retired() {
        let r = Registry::default();
        let a = r.intern(b"SELECT 1\0\0\0", "public");
        let b = r.intern(b"SELECT 1\0\0\0", "public");
        assert_eq!(a.id, b.id);
        assert_eq!(a.query(), b"SELECT 1");
        let c = r.intern(b"SELECT 1\0\0\0", "other");
        assert_ne!(a.id, c.id, "search_path is part of the key");
        r.retire(&a);
        let d = r.intern(b"SELECT 1\0\0\0", "public");
        assert_ne!(a.id, d.id);
        assert_eq!(r.list().len(), 2);
    }

    #[test]
    fn lru_spares_the_current_checkout() {
        let mut s = ServerStatements::default();
        s.begin();
        assert_eq!(s.insert(1, 2), None);
        assert_eq!(s.insert(2, 2), None);
        assert_eq!(s.insert(3, 2), None, "all used in this checkout");
        s.begin();
        assert!(s.touch(1));
        assert_eq!(s.insert(4, 2), Some(2));
        assert!(!s.touch(2));
        s.resync(["pgbudget_4", "pgbudget_9", "other"].into_iter());
        assert!(s.touch(4) && s.touch(9) && !s.touch(1));
    }

    #[test]
    fn a_statement_no_client_holds_is_named_once_for_closing() {
        let r = Registry::default();
        let mut server = ServerStatements::default();
        let (a, b) = (r.intern(b"SELECT 1\0\0\0", ""), r.intern(b"SELECT 2\0\0\0", ""));
        for s in [&a, &b] {
            server.insert(s.id, 10);
            server.remember(s);
        }
        assert!(server.gone(r.deaths()).is_empty(), "both are held");
        let id = a.id;
        drop(a);
        assert_eq!(server.gone(r.deaths()), vec![id]);
        assert!(!server.touch(id) && server.touch(b.id));
        assert!(server.gone(r.deaths()).is_empty(), "told once");
    }
}
