//! Session settings as the proxy holds them: one shared map per distinct set, so the check of every
//! checkout ("does this server already have the client's settings?") is a pointer comparison whenever the
//! two sides hold the same set, which is the common case of a service whose clients all log in alike.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};

/// Setting name → value, shared: a client's settings, or what the proxy applied on a server.
pub type Settings = Arc<BTreeMap<String, String>>;

/// The distinct settings sets in use in one pool, each held once (weakly: a set nobody holds goes).
#[derive(Debug, Default)]
pub struct Interner {
    sets: Mutex<Sets>,
}

#[derive(Debug, Default)]
struct Sets {
    by_value: HashMap<BTreeMap<String, String>, Weak<BTreeMap<String, String>>, foldhash::fast::RandomState>,
    /// Dead entries are swept when the table reaches this size (then twice what stays, at least 64).
    sweep_at: usize,
}

impl Interner {
    /// The pool's shared copy of `set` (made from it when there is none alive). Called at login and when a
    /// client's settings change, never on a checkout.
    pub fn intern(&self, set: BTreeMap<String, String>) -> Settings {
        let mut s = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(live) = s.by_value.get(&set).and_then(Weak::upgrade) {
            return live;
        }
        if s.by_value.len() >= s.sweep_at {
            s.by_value.retain(|_, w| w.strong_count() > 0);
            s.sweep_at = (2 * s.by_value.len()).max(64);
        }
        let shared = Arc::new(set.clone());
        s.by_value.insert(set, Arc::downgrade(&shared));
        shared
    }

    /// Distinct sets the table holds now, live or not yet swept (tests).
    pub fn len(&self) -> usize {
        self.sets.lock().unwrap_or_else(|p| p.into_inner()).by_value.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether `applied` already is `desired`: the same shared set, or (a set made elsewhere) equal entries.
pub fn same(applied: &Settings, desired: &Settings) -> bool {
    Arc::ptr_eq(applied, desired) || applied == desired
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn equal_sets_share_one_map_and_unequal_ones_do_not() {
        let i = Interner::default();
        let a = i.intern(set(&[("application_name", "web"), ("TimeZone", "UTC")]));
        let b = i.intern(set(&[("TimeZone", "UTC"), ("application_name", "web")]));
        let c = i.intern(set(&[("application_name", "worker")]));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c) && !same(&a, &c));
        // Made outside the interner: equal by value still counts as the same.
        assert!(same(&Arc::new(set(&[("TimeZone", "UTC"), ("application_name", "web")])), &a));
    }

    #[test]
    fn a_set_nobody_holds_is_swept_and_made_afresh() {
        let i = Interner::default();
        for n in 0..200 {
            drop(i.intern(set(&[("application_name", &n.to_string())])));
        }
        assert!(i.len() <= 64, "dead sets are swept: {}", i.len());
        let kept = i.intern(set(&[("application_name", "kept")]));
        for n in 0..200 {
            drop(i.intern(set(&[("x", &n.to_string())])));
        }
        assert!(Arc::ptr_eq(&kept, &i.intern(set(&[("application_name", "kept")]))), "a live set survives sweeps");
    }
}
