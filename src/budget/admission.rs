//! Admission control in front of each pool: graduated load shedding (`warn < shed < hard_reject`), an exempt
//! class that may use the headroom above the hard-reject line, a bounded arrival-order queue, queue positions
//! for the NOTICE waiting clients get, and one counted decision per checkout.

use crate::config::{hard_line, AdmissionConfig};
use crate::error::Refusal;
use crate::telemetry::labels::Decision;
use arc_swap::ArcSwap;
use prometheus::IntCounter;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tracing::warn;

/// The thresholds in force for one pool; a reload swaps them.
struct Params {
    cfg: Option<AdmissionConfig>,
    share: u32,
    line: u32,
    max_waiting: u32,
}

impl Params {
    fn new(cfg: Option<AdmissionConfig>, share: u32) -> Params {
        let line = cfg.as_ref().map_or(share, |c| hard_line(c.hard_reject, share));
        let max_waiting = cfg.as_ref().and_then(|c| c.max_waiting).unwrap_or(share);
        Params { cfg, share: share.max(1), line, max_waiting }
    }
}

/// One pool's admission state; cheap on the hot path (one compare-and-swap per checkout).
pub struct Admission {
    params: ArcSwap<Params>,
    holding: Arc<AtomicU32>,
    queue: Mutex<BTreeSet<u64>>,
    /// Checkouts waiting as the relay loop's own state ([`crate::budget::queued`]): counted, not ordered here
    /// (their order is the hand-off queue's).
    native: AtomicU32,
    next_ticket: AtomicU64,
    started: Instant,
    last_warn: AtomicU64,
    counters: [IntCounter; 7],
}

/// An admitted checkout; gives its place back on Drop (also on errors and cancellation).
#[derive(Debug)]
pub struct Hold {
    holding: Arc<AtomicU32>,
    /// An exempt client admitted at or above the hard-reject line.
    pub above_line: bool,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.holding.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A place in the wait queue; leaves the queue on Drop.
pub struct QueueTicket<'a> {
    adm: &'a Admission,
    pub id: u64,
}

impl Drop for QueueTicket<'_> {
    fn drop(&mut self) {
        self.adm.quit(self.id);
    }
}

impl Admission {
    /// `counters` are the `pgbudget_admission_total` handles in [`Decision::ALL`] order.
    pub fn new(cfg: Option<AdmissionConfig>, share: u32, counters: [IntCounter; 7]) -> Admission {
        Admission {
            params: ArcSwap::from_pointee(Params::new(cfg, share)),
            holding: Arc::new(AtomicU32::new(0)),
            queue: Mutex::new(BTreeSet::new()),
            native: AtomicU32::new(0),
            next_ticket: AtomicU64::new(0),
            started: Instant::now(),
            last_warn: AtomicU64::new(0),
            counters,
        }
    }

    /// Apply reloaded thresholds and share; places already held stay counted.
    pub fn reconfigure(&self, cfg: Option<AdmissionConfig>, share: u32) {
        self.params.store(Arc::new(Params::new(cfg, share)));
    }

    /// Whether a client with this `application_name` and user belongs to the exempt class.
    pub fn is_exempt(&self, application_name: &str, user: &str) -> bool {
        self.params.load().cfg.as_ref().is_some_and(|c| {
            c.exempt_application_names.iter().any(|a| a == application_name) || c.exempt_users.iter().any(|u| u == user)
        })
    }

    pub fn line(&self) -> u32 {
        self.params.load().line
    }

    /// The hard-reject line, when graduated shedding is configured.
    pub fn shed_line(&self) -> Option<u32> {
        let p = self.params.load();
        p.cfg.as_ref().map(|_| p.line)
    }

    pub fn holding(&self) -> u32 {
        self.holding.load(Ordering::Acquire)
    }

    pub fn waiting(&self) -> u32 {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).len() as u32 + self.native.load(Ordering::Relaxed)
    }

    /// A checkout queued in the relay loop joins (`true`) or leaves (`false`) the waiting clients.
    pub fn native_waiting(&self, joins: bool) {
        if joins {
            self.native.fetch_add(1, Ordering::Relaxed);
        } else {
            self.native.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn record(&self, d: Decision) {
        self.counters[d as usize].inc();
    }

    pub fn count(&self, d: Decision) -> u64 {
        self.counters[d as usize].get()
    }

    /// Decide whether a checkout may proceed (to a server or to the queue); records refusals.
    pub fn admit(&self, exempt: bool, service: &str) -> Result<Hold, Refusal> {
        let p = self.params.load();
        let mut h = self.holding.load(Ordering::Acquire);
        loop {
            if let Some(c) = &p.cfg {
                let u = h as f64 / p.share as f64;
                if !exempt && h >= p.line {
                    self.record(Decision::RejectedHard);
                    return Err(Refusal::Hard { holding: h, line: p.line });
                }
                if !exempt && u >= c.shed {
                    let waiting = self.waiting();
                    if waiting >= p.max_waiting {
                        self.record(Decision::RejectedQueueFull);
                        return Err(Refusal::QueueFull { waiting, max_waiting: p.max_waiting });
                    }
                }
                if u >= c.warn {
                    self.warn(&p, service, h);
                }
            }
            match self.holding.compare_exchange_weak(h, h + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(Hold { holding: self.holding.clone(), above_line: exempt && h >= p.line }),
                Err(now) => h = now,
            }
        }
    }

    /// At most one warning per pool every 10 s while utilisation is at or above `warn`.
    fn warn(&self, p: &Params, service: &str, holding: u32) {
        let now = self.started.elapsed().as_secs() + 10;
        let last = self.last_warn.load(Ordering::Relaxed);
        if now >= last + 10 && self.last_warn.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            let warn_at = p.cfg.as_ref().map_or(1.0, |c| c.warn);
            warn!(
                kind = "admission",
                service,
                holding,
                share = p.share,
                hard_line = p.line,
                warn_at,
                "pool utilisation at or above the warn threshold"
            );
        }
    }

    /// Join the wait queue (arrival order); the ticket leaves it on Drop.
    pub fn enqueue(&self) -> QueueTicket<'_> {
        QueueTicket { adm: self, id: self.join() }
    }

    fn join(&self) -> u64 {
        let id = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
        id
    }

    fn quit(&self, id: u64) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }

    /// Clients queued before this ticket and still waiting.
    pub fn ahead(&self, t: &QueueTicket<'_>) -> usize {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).range(..t.id).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters() -> [IntCounter; 7] {
        std::array::from_fn(|i| IntCounter::new(format!("c{i}"), "test").unwrap())
    }

    fn adm(share: u32, hard: f64, max_waiting: Option<u32>) -> Admission {
        let cfg = AdmissionConfig {
            hard_reject: hard,
            max_waiting,
            exempt_users: vec!["ops".into()],
            ..AdmissionConfig::default()
        };
        Admission::new(Some(cfg), share, counters())
    }

    #[test]
    fn decisions_index_their_counters() {
        for (i, d) in Decision::ALL.iter().enumerate() {
            assert_eq!(*d as usize, i, "{d:?}");
        }
    }

    #[test]
    fn hard_line_is_the_first_count_at_or_above_the_threshold() {
        assert_eq!(hard_line(0.88, 10), 9);
        assert_eq!(hard_line(0.9, 10), 9);
        assert_eq!(hard_line(1.0, 10), 10);
        assert_eq!(hard_line(0.88, 3), 3);
        assert_eq!(hard_line(0.05, 10), 1);
    }

    #[test]
    fn non_exempt_clients_stop_at_the_line_and_exempt_ones_use_the_headroom() {
        let a = adm(10, 0.88, Some(100));
        let holds: Vec<Hold> = (0..9).map(|_| a.admit(false, "s").expect("below the line")).collect();
        assert!(holds.iter().all(|h| !h.above_line));
        assert_eq!(a.admit(false, "s").unwrap_err(), Refusal::Hard { holding: 9, line: 9 });
        let e = a.admit(true, "s").expect("exempt may pass");
        assert!(e.above_line);
        assert_eq!(a.count(Decision::RejectedHard), 1);
        drop(holds);
        drop(e);
        assert_eq!(a.holding(), 0);
        assert!(a.admit(false, "s").is_ok());
    }

    #[test]
    fn queue_is_bounded_only_at_or_above_shed() {
        let a = adm(10, 0.95, Some(1));
        let _t = a.enqueue();
        let low: Vec<Hold> = (0..7).map(|_| a.admit(false, "s").unwrap()).collect();
        // 7/10 < shed 0.8: the queue bound does not apply yet.
        let _h8 = a.admit(false, "s").unwrap();
        // 8/10 >= shed and one client already waits: refused at once.
        assert_eq!(a.admit(false, "s").unwrap_err(), Refusal::QueueFull { waiting: 1, max_waiting: 1 });
        assert_eq!(a.count(Decision::RejectedQueueFull), 1);
        drop(low);
    }

    #[test]
    fn queue_positions_follow_arrival_and_departures() {
        let a = adm(4, 0.88, None);
        let t1 = a.enqueue();
        let t2 = a.enqueue();
        let t3 = a.enqueue();
        assert_eq!((a.ahead(&t1), a.ahead(&t2), a.ahead(&t3)), (0, 1, 2));
        drop(t1);
        assert_eq!(a.ahead(&t3), 1);
        assert_eq!(a.waiting(), 2);
    }

    #[test]
    fn without_a_config_everything_is_admitted() {
        let a = Admission::new(None, 2, counters());
        let hs: Vec<Hold> = (0..50).map(|_| a.admit(false, "s").unwrap()).collect();
        assert_eq!(a.holding(), 50);
        assert!(!a.is_exempt("x", "ops"));
        drop(hs);
        assert_eq!(a.holding(), 0);
    }
}
