//! One-shot signals every session waits on (shutdown, a pool's `KILL`), cheap to poll: a session's relay
//! polls them on every wake, and a `CancellationToken` poll takes two locks where this is an atomic load and
//! a waker compare.

use futures_util::task::AtomicWaker;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

/// A signal that fires once and wakes every listener.
#[derive(Debug, Default)]
pub struct Signal {
    fired: AtomicBool,
    listeners: Mutex<Vec<Weak<AtomicWaker>>>,
}

/// One waiter's registration on a [`Signal`]; it leaves the signal's list when dropped (lazily).
#[derive(Debug)]
pub struct Listener {
    signal: Arc<Signal>,
    waker: Arc<AtomicWaker>,
}

impl Signal {
    pub fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        let listeners = std::mem::take(&mut *self.listeners.lock().unwrap_or_else(|e| e.into_inner()));
        listeners.iter().filter_map(Weak::upgrade).for_each(|w| w.wake());
    }

    pub fn is_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// Register a waiter (once per session).
    pub fn listen(self: &Arc<Self>) -> Listener {
        let waker = Arc::new(AtomicWaker::new());
        let mut list = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        // Sessions that ended leave dead entries: drop them whenever the list doubled since the last sweep.
        if list.len() >= 64 && list.len().is_power_of_two() {
            list.retain(|w| w.strong_count() > 0);
        }
        list.push(Arc::downgrade(&waker));
        Listener { signal: self.clone(), waker }
    }
}

impl Listener {
    /// Resolves once the signal fired (at once if it already had).
    pub fn fired(&self) -> Fired<'_> {
        Fired(self)
    }

    pub fn is_fired(&self) -> bool {
        self.signal.is_fired()
    }

    /// Wake `waker` when the signal fires (it fires once: one registration is enough).
    pub fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }
}

/// [`Listener::fired`]: a future the size of a reference.
pub struct Fired<'a>(&'a Listener);

impl Future for Fired<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let l = self.0;
        if l.signal.is_fired() {
            return Poll::Ready(());
        }
        l.waker.register(cx.waker());
        if l.signal.is_fired() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_listener_wakes_once_the_signal_fires_and_late_ones_see_it_at_once() {
        let s = Arc::new(Signal::default());
        let (a, b) = (s.listen(), s.listen());
        let wait = tokio::spawn(async move { tokio::join!(a.fired(), b.fired()) });
        tokio::task::yield_now().await;
        assert!(!wait.is_finished());
        s.fire();
        tokio::time::timeout(std::time::Duration::from_secs(5), wait).await.unwrap().unwrap();
        let late = s.listen();
        late.fired().await;
        assert!(late.is_fired());
    }

    #[test]
    fn ended_listeners_are_swept_from_the_list() {
        let s = Arc::new(Signal::default());
        for _ in 0..1000 {
            drop(s.listen());
        }
        let kept = s.listeners.lock().unwrap().len();
        assert!(kept < 200, "{kept} registrations kept for 0 live listeners");
    }
}
