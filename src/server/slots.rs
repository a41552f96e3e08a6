//! Counted slots a server connection holds while it lives (a service's share, counted across all of the
//! service's pools): taken without waiting, resized by a reload, given back by `Drop` — for a closed
//! connection once its backend has exited, and whoever waits for one is woken then.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

/// A limit and how much of it is held.
#[derive(Debug)]
pub struct Slots {
    limit: AtomicU32,
    used: AtomicU32,
    /// Held by connections that were closed and whose backends have not exited yet.
    leaving: AtomicU32,
    /// Told whenever a slot is given back.
    freed: Notify,
}

/// One held slot; dropping it gives the slot back.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    leaving: bool,
}

impl Slots {
    pub fn new(limit: u32) -> Arc<Slots> {
        Arc::new(Slots {
            limit: AtomicU32::new(limit),
            used: AtomicU32::new(0),
            leaving: AtomicU32::new(0),
            freed: Notify::new(),
        })
    }

    /// A slot if one is free now.
    pub fn try_take(self: &Arc<Self>) -> Option<Slot> {
        let limit = self.limit.load(Ordering::Acquire);
        self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| (u < limit).then_some(u + 1)).ok()?;
        Some(Slot { slots: self.clone(), leaving: false })
    }

    /// Slots held by closed connections whose backends are still exiting (each is given back soon).
    pub fn leaving(&self) -> u32 {
        self.leaving.load(Ordering::Acquire)
    }

    /// Resolves when a slot is given back (bound it with a timeout). Register before looking (`std::pin::pin!` the
    /// future and `enable` it) when a slot freed between the look and the wait must not be missed.
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
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

impl Slot {
    /// Its connection was closed: the slot is given back once the backend has exited.
    pub fn mark_leaving(&mut self) {
        if !std::mem::replace(&mut self.leaving, true) {
            self.slots.leaving.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.leaving {
            self.slots.leaving.fetch_sub(1, Ordering::AcqRel);
        }
        self.slots.used.fetch_sub(1, Ordering::AcqRel);
        self.slots.freed.notify_waiters();
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

    #[tokio::test]
    async fn a_leaving_slot_is_counted_until_dropped_and_its_drop_wakes_a_waiter() {
        let s = Slots::new(1);
        let mut a = s.try_take().unwrap();
        a.mark_leaving();
        a.mark_leaving();
        assert_eq!((s.used(), s.leaving()), (1, 1), "marked once however often it is told");
        let mut freed = std::pin::pin!(s.freed());
        freed.as_mut().enable();
        let waiter = tokio::time::timeout(std::time::Duration::from_secs(5), freed);
        drop(a);
        waiter.await.expect("the waiter registered before the drop is woken");
        assert_eq!((s.used(), s.leaving()), (0, 0));
    }
}
