//! The queue of transaction-mode checkouts waiting for a server: a released server goes straight to the
//! first waiter (no trip through deadpool's queue, no re-vetting: it was checked in clean a moment ago);
//! a closed one tells the first waiter to try again (a new server may be opened in its place).
//!
//! The queue lives under the same lock as the parked servers ([`crate::budget::affinity`]), so a server is
//! either parked or handed over, never both and never lost to a waiter that just enqueued.

use crate::budget::pool::PooledConn;
use futures_util::task::AtomicWaker;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// One waiting checkout's slot: the server handed over, or the word to try again.
#[derive(Default)]
pub struct HandOff {
    server: Mutex<Option<PooledConn>>,
    /// Room was made (a server closed): try to open one.
    retry: AtomicBool,
    waker: AtomicWaker,
    /// Taken out of the queue by whoever delivered (changed under the queue's lock).
    popped: AtomicBool,
}

impl HandOff {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<PooledConn>> {
        self.server.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ready once a server was handed over or the waiter told to try again (see [`Waiters::leave`]).
    pub fn poll_handed(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        if self.retry.load(Ordering::Acquire) || self.lock().is_some() {
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
