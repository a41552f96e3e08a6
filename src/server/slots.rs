//! Counted slots a server connection holds while it lives (a service's share, counted across all of the
//! service's pools): taken without waiting, resized by a reload, given back by `Drop`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// A limit and how much of it is held.
#[derive(Debug)]
pub struct Slots {
    limit: AtomicU32,
    used: AtomicU32,
}

/// One held slot; dropping it gives the slot back.
#[derive(Debug)]
pub struct Slot(Arc<Slots>);

impl Slots {
    pub fn new(limit: u32) -> Arc<Slots> {
        Arc::new(Slots { limit: AtomicU32::new(limit), used: AtomicU32::new(0) })
    }

    /// A slot if one is free now.
    pub fn try_take(self: &Arc<Self>) -> Option<Slot> {
        let limit = self.limit.load(Ordering::Acquire);
        self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| (u < limit).then_some(u + 1)).ok()?;
        Some(Slot(self.clone()))
    }

    /// A new limit; slots held above it stay held until dropped (then no new one is given out).
    pub fn set_limit(&self, limit: u32) {
        self.limit.store(limit, Ordering::Release);
    }

    pub fn used(&self) -> u32 {
        self.used.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> u32 {
        self.limit.load(Ordering::Acquire)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_and_given_back_on_drop() {
        let s = Slots::new(2);
        let a = s.try_take().unwrap();
        let b = s.try_take().unwrap();
        assert!(s.try_take().is_none());
        assert_eq!(s.used(), 2);
        drop(a);
        let c = s.try_take().unwrap();
        s.set_limit(1);
        assert!(s.try_take().is_none(), "held above a lowered limit");
        drop(b);
        assert!(s.try_take().is_none(), "one held = the new limit");
        drop(c);
        assert!(s.try_take().is_some());
        assert_eq!(s.used(), 0);
    }
}
