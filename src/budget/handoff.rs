//! The queue of transaction-mode checkouts waiting for a server: a released server goes straight to the
//! first waiter (no trip through deadpool's queue, no re-vetting: it was checked in clean a moment ago);
//! a closed one tells the first waiter to try again (a new server may be opened in its place).
//!
//! The queue lives under the same lock as the parked servers ([`crate::budget::affinity`]), so a server is
//! either parked or handed over, never both and never lost to a waiter that just enqueued.

use crate::budget::pool::{PooledConn, ServicePool};
use crate::error::ProxyError;
use futures_util::task::AtomicWaker;
use std::collections::VecDeque;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// One waiting checkout's slot: the server handed over, or the word to try again.
#[derive(Default)]
pub struct HandOff {
    server: Mutex<Option<PooledConn>>,
    /// Room was made (a server closed): try to open one.
    retry: AtomicBool,
    waker: AtomicWaker,
    /// Taken out of the queue by whoever delivered (changed under the queue's lock).
    popped: AtomicBool,
    /// A CancelRequest for the waiting client arrived: its wait is abandoned.
    cancelled: AtomicBool,
}

impl HandOff {
    /// A slot for the next wait of the same client: the one it used last when nobody else holds it any more
    /// (its queue place and cancel mark are gone), reset; else a new one. Saves an allocation per queued
    /// checkout.
    pub fn reuse(slot: &mut Option<Arc<HandOff>>) -> Arc<HandOff> {
        match slot.as_mut().and_then(Arc::get_mut) {
            Some(h) => *h = HandOff::default(),
            None => *slot = Some(Arc::default()),
        }
        slot.clone().expect("set above")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<PooledConn>> {
        self.server.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The waiting client sent a CancelRequest.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        self.waker.wake();
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Ready once a server was handed over, the waiter told to try again (see [`Waiters::leave`]) or
    /// cancelled.
    pub fn poll_handed(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        if self.retry.load(Ordering::Acquire) || self.is_cancelled() || self.lock().is_some() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// The waiting checkouts of one pool, oldest first.
#[derive(Default)]
pub struct Waiters {
    queue: VecDeque<Arc<HandOff>>,
}

impl Waiters {
    pub fn push(&mut self, w: Arc<HandOff>) {
        self.queue.push_back(w);
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// How many waiters are ahead of `w` (all of them when it is not queued).
    pub fn ahead_of(&self, w: &Arc<HandOff>) -> usize {
        self.queue.iter().position(|q| Arc::ptr_eq(q, w)).unwrap_or(self.queue.len())
    }

    fn pop(&mut self) -> Option<Arc<HandOff>> {
        let w = self.queue.pop_front()?;
        w.popped.store(true, Ordering::Relaxed);
        Some(w)
    }

    /// Give `conn` to the oldest waiter; `Some(conn)` back when nobody waits.
    pub fn deliver(&mut self, conn: PooledConn) -> Option<PooledConn> {
        let Some(w) = self.pop() else { return Some(conn) };
        *w.lock() = Some(conn);
        w.waker.wake();
        None
    }

    /// Tell the oldest waiter to try again (room was made).
    pub fn retry_one(&mut self) {
        if let Some(w) = self.pop() {
            w.retry.store(true, Ordering::Release);
            w.waker.wake();
        }
    }

    /// `w` stops waiting: out of the queue, with the server it was handed meanwhile, if any (it must be
    /// used or given back).
    pub fn leave(&mut self, w: &Arc<HandOff>) -> Option<PooledConn> {
        // Whoever delivered took it out of the queue already (the usual case: no scan).
        if !w.popped.load(Ordering::Relaxed) {
            if let Some(i) = self.queue.iter().rposition(|q| Arc::ptr_eq(q, w)) {
                self.queue.remove(i);
            }
        }
        w.retry.store(false, Ordering::Relaxed);
        w.lock().take()
    }
}

/// How often a checkout queued for a released server looks again on its own: a server that closed tells
/// the queue, so this only covers one dropped without a word (its slot is found free at the recheck).
const HANDOFF_RECHECK: Duration = Duration::from_secs(1);

/// A checkout's place in a pool's queue (the pool borrowed, or shared when the place outlives a call);
/// giving it up (also by being dropped: the client left, the wait timed out) gives a server handed over
/// meanwhile to the next waiter.
pub(super) struct Place<P: Deref<Target = ServicePool>> {
    pub pool: P,
    pub hand: Arc<HandOff>,
    left: bool,
}

impl<P: Deref<Target = ServicePool>> Place<P> {
    /// Join the pool's queue with the slot `hand`; `None` when a server is parked now (take it instead), else
    /// the place and how many checkouts wait in the queue now (this one included).
    pub fn join(pool: P, hand: Arc<HandOff>) -> Option<(Self, usize)> {
        let waiting = pool.pool.manager().affinity.enqueue(&hand)?;
        Some((Place { pool, hand, left: false }, waiting))
    }

    /// Leave the queue with the server handed over meanwhile, if any (it must be used or given back).
    pub fn leave(&mut self) -> Option<PooledConn> {
        self.left = true;
        self.pool.pool.manager().affinity.leave(&self.hand)
    }

    /// Leave the queue, unless left already; a server handed over meanwhile goes to the next waiter.
    pub fn give_up(&mut self) {
        if !self.left {
            if let Some(c) = self.leave() {
                self.pool.put_back(c);
            }
        }
    }
}

impl<P: Deref<Target = ServicePool>> Drop for Place<P> {
    fn drop(&mut self) {
        self.give_up();
    }
}

impl ServicePool {
    /// A server now if one is idle or can be opened at once; `None`: the checkout has to wait (the share or
    /// the upstream's ceiling is in use).
    pub async fn checkout_now(&self, home: Option<i32>) -> Result<Option<PooledConn>, ProxyError> {
        match self.checkout_near(Duration::ZERO, home).await {
            Ok(c) => Ok(Some(c)),
            Err(ProxyError::BudgetExhausted { .. } | ProxyError::CeilingReached { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether every server this pool may hold is open and none is idle in deadpool's queue (a checkout can
    /// only wait for one to be released).
    pub(super) fn is_full(&self) -> bool {
        self.full_status().is_some()
    }

    /// [`Self::is_full`], with the deadpool status it was read from when full.
    pub(super) fn full_status(&self) -> Option<deadpool::Status> {
        let st = self.pool.status();
        (st.size >= st.max_size && st.available == 0).then_some(st)
    }

    /// Wait in the pool's queue for a released server, until `deadline` or at most [`HANDOFF_RECHECK`];
    /// `None`: look again (a server was parked meanwhile, one closed, or the recheck is due).
    pub(super) async fn handed(&self, deadline: Instant) -> Option<PooledConn> {
        let (mut place, _) = Place::join(self, Arc::default())?;
        let until = deadline.min(Instant::now() + HANDOFF_RECHECK);
        let _ = tokio::time::timeout_at(until.into(), std::future::poll_fn(|cx| place.hand.poll_handed(cx))).await;
        place.leave()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn told_to_retry(w: &HandOff) -> bool {
        w.retry.load(Ordering::Acquire)
    }

    #[test]
    fn the_oldest_waiter_is_served_first_and_a_leaver_is_forgotten() {
        let mut q = Waiters::default();
        let (a, b, c) = (Arc::new(HandOff::default()), Arc::new(HandOff::default()), Arc::new(HandOff::default()));
        q.push(a.clone());
        q.push(b.clone());
        q.push(c.clone());
        assert!(q.leave(&a).is_none(), "nothing was delivered to a");
        assert_eq!(q.len(), 2, "a left the queue");
        q.retry_one();
        assert!(told_to_retry(&b) && !told_to_retry(&c), "b, now the oldest, is told to retry");
        assert_eq!(q.len(), 1);
        assert!(q.leave(&b).is_none());
        assert!(!told_to_retry(&b), "leaving consumes the word");
        q.retry_one();
        assert!(told_to_retry(&c));
        assert!(q.is_empty());
    }
}
