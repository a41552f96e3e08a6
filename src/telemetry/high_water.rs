//! High-water marks of one pool between two `pool_snapshots` rows: the most servers in use, the most clients
//! waiting, the longest checkout wait and how many checkouts waited. Lock-free: one `fetch_max` (or add) per
//! event on the checkout path, swapped to zero when a snapshot row is written, so a burst between two rows is
//! never lost.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct HighWater {
    in_use: AtomicU32,
    waiting: AtomicU32,
    wait_us: AtomicU64,
    waited: AtomicU64,
}

/// The marks since the previous row.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Marks {
    pub max_in_use: u32,
    pub max_waiting: u32,
    /// Longest checkout wait, milliseconds.
    pub max_wait_ms: f64,
    /// Checkouts that had to queue (served, timed out or abandoned).
    pub waited: u64,
}

impl HighWater {
    /// Servers of the pool in use right after a checkout.
    pub fn servers_in_use(&self, n: u32) {
        self.in_use.fetch_max(n, Relaxed);
    }

    /// Clients queued for the pool at a checkout.
    pub fn clients_waiting(&self, n: u32) {
        self.waiting.fetch_max(n, Relaxed);
    }

    /// A checkout that queued for `d` (whatever its outcome).
    pub fn checkout_waited(&self, d: Duration) {
        self.wait_us.fetch_max(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Relaxed);
        self.waited.fetch_add(1, Relaxed);
    }

    /// The marks since the last take, and start over from zero.
    pub fn take(&self) -> Marks {
        Marks {
            max_in_use: self.in_use.swap(0, Relaxed),
            max_waiting: self.waiting.swap(0, Relaxed),
            max_wait_ms: self.wait_us.swap(0, Relaxed) as f64 / 1000.0,
            waited: self.waited.swap(0, Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_keep_the_peak_and_reset_on_take() {
        let h = std::sync::Arc::new(HighWater::default());
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for i in 0..1000u32 {
                        h.servers_in_use((i * 7 + t) % 50);
                        h.clients_waiting(i % 30);
                        h.checkout_waited(Duration::from_micros(u64::from(i)));
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let m = h.take();
        assert_eq!((m.max_in_use, m.max_waiting, m.waited), (49, 29, 4000));
        assert!((m.max_wait_ms - 0.999).abs() < 1e-9, "{m:?}");
        assert_eq!(h.take(), Marks::default());
    }
}
