//! A transaction-mode checkout queued for the next released server as plain state, without a future of its
//! own: the relay loop polls its hand-off slot beside the client, the loop's timer serves as its deadline.
//! This is the common wait at a full share (every server busy, nothing to open, the pool not paused); any
//! other case — or a recheck, or a server that closed — continues in [`crate::budget::checkout::acquire`]
//! with the same admission hold and start.

use crate::budget::admission::Hold;
use crate::budget::cancel::{ClientKey, QueuedMark, QueuedWake};
use crate::budget::checkout::{decide, decide_handed, queue_notice, shed, Who};
use crate::budget::handoff::{HandOff, Place};
use crate::budget::pool::{PooledConn, ServicePool};
use crate::config::PoolMode;
use crate::error::ProxyError;
use crate::telemetry::labels::Decision;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// How long a queued checkout waits for a hand-off before it looks at the pool itself (a server dropped
/// without a word is found at the recheck).
const RECHECK: Duration = Duration::from_secs(1);

/// An admitted checkout in its pool's hand-off queue. Dropping it leaves the queue (a server handed over
/// meanwhile goes to the next waiter), the count of waiting clients and the cancel registry's mark.
pub struct QueuedCheckout {
    place: Place<Arc<ServicePool>>,
    hold: Option<Hold>,
    _mark: QueuedMark,
    pub started: Instant,
    deadline: Instant,
    /// When the client is told where it stands (`None`: told, or not to be told).
    notice_at: Option<Instant>,
    recheck_at: Instant,
}

/// How a queued checkout continues after the relay's timer fired.
pub enum Due {
    /// Not yet: wait on.
    Wait,
    /// Tell the client this (a NOTICE), then wait on.
    Notice(String),
    /// Look at the pool again: continue in `acquire` (with [`QueuedCheckout::resume`]).
    Recheck,
    /// `checkout_timeout` passed.
    TimedOut,
}

/// What a queued checkout carries into `acquire` when it continues there.
pub struct Resumed {
    pub hold: Hold,
    pub started: Instant,
    pub noticed: bool,
}

impl ServicePool {
    /// Queue a checkout for the next released server when that is the only way to get one now (transaction
    /// mode, every server this pool may hold is open and busy, not paused). `None`: take `acquire`'s path;
    /// `Some(Err)`: admission refused the client.
    pub fn queue_now(
        self: &Arc<Self>,
        key: &ClientKey,
        exempt: bool,
        may_notice: bool,
        who: &Who<'_>,
        hand: Arc<HandOff>,
        now: Instant,
    ) -> Option<Result<QueuedCheckout, ProxyError>> {
        let b = self.budget();
        if b.pool_mode() != PoolMode::Transaction || self.control.is_paused() {
            return None;
        }
        let st = self.full_status()?;
        let hold = match self.admission.admit(exempt, &b.name) {
            Ok(h) => h,
            Err(refusal) => return Some(Err(shed(self, who, &b.name, refusal))),
        };
        let (place, waiting) = Place::join(self.clone(), hand)?; // None: a server was parked meanwhile
        self.admission.native_waiting(true);
        self.metrics.high_water.clients_waiting((st.waiting + waiting) as u32);
        let s = &b.settings;
        let notice_at = (may_notice && !s.notice_after.is_zero()).then(|| now + s.notice_after);
        Some(Ok(QueuedCheckout {
            _mark: key.mark_queued(QueuedWake::Hand(place.hand.clone())),
            place,
            hold: Some(hold),
            started: now,
            deadline: now + s.checkout_timeout,
            notice_at,
            recheck_at: now + RECHECK,
        }))
    }
}

impl QueuedCheckout {
    /// Ready once a server was handed over, the checkout should look at the pool again (one closed), or
    /// the client cancelled ([`Self::cancelled`]).
    pub fn poll_handed(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.place.hand.poll_handed(cx)
    }

    /// A CancelRequest for the client arrived: the wait is abandoned.
    pub fn cancelled(&self) -> bool {
        self.place.hand.is_cancelled()
    }

    /// When the relay's timer should fire next for this checkout.
    pub fn next_due(&self) -> Instant {
        let at = self.deadline.min(self.recheck_at);
        self.notice_at.map_or(at, |n| n.min(at))
    }

    /// What to do now that the timer fired.
    pub fn due(&mut self, now: Instant) -> Due {
        if now >= self.deadline {
            return Due::TimedOut;
        }
        if self.notice_at.is_some_and(|n| now >= n) {
            self.notice_at = None;
            let pool = &self.place.pool;
            return Due::Notice(queue_notice(pool, pool.pool.manager().affinity.ahead_of(&self.place.hand)));
        }
        if now >= self.recheck_at {
            return Due::Recheck;
        }
        Due::Wait
    }

    /// The server handed over, with the admission hold, and the decision counted; `Err`: none was
    /// (the checkout was told to look again), continue with `acquire`. `now`: the caller's clock read.
    pub fn take(mut self, who: &Who<'_>, now: Instant) -> Result<(PooledConn, Hold), Resumed> {
        let Some(conn) = self.place.leave() else { return Err(self.resume()) };
        let hold = self.hold.take().expect("held until taken");
        let d = if hold.above_line { Decision::Exempt } else { Decision::Queued };
        self.place.pool.stamp_use_at(now);
        decide_handed(&self.place.pool, who, d, now.saturating_duration_since(self.started));
        Ok((conn, hold))
    }

    /// Stop waiting here and continue in `acquire` (a server handed over meanwhile goes to the next waiter).
    pub fn resume(mut self) -> Resumed {
        let hold = self.hold.take().expect("held until taken");
        Resumed { hold, started: self.started, noticed: self.notice_at.is_none() }
    }

    /// The wait ended without a server because the client left or cancelled it.
    pub fn abandon(self, who: &Who<'_>) {
        decide(&self.place.pool, who, Decision::Abandoned, self.started.elapsed());
    }

    /// The wait reached its deadline: its error, the decision counted.
    pub fn time_out(self, who: &Who<'_>) -> ProxyError {
        let waited = self.started.elapsed();
        let pool = &self.place.pool;
        decide(pool, who, Decision::TimedOut, waited);
        let b = pool.budget();
        ProxyError::BudgetExhausted { service: b.name.clone(), share: pool.share(), waited }
    }
}

impl Drop for QueuedCheckout {
    fn drop(&mut self) {
        self.place.give_up();
        self.place.pool.admission.native_waiting(false);
    }
}
