//! The relay loop between servers: the client holds none, so its next message is read (a batch of Parses
//! only is answered without one), then a server is taken — at once when one is parked, else by waiting in
//! the pool's hand-off queue as a state of this loop (the slot, the client, a cancel and one timer polled
//! together, no checkout future built), else through the full checkout (opening a server, a pause, the
//! upstream's ceiling).

use super::attach::Quick;
use super::pump::Event;
use super::{waiting, Outcome, Relay};
use crate::budget::affinity::HomeSignal;
use crate::budget::checkout::Who;
use crate::budget::handoff::HandOff;
use crate::budget::queued::{Due, QueuedCheckout};
use crate::budget::signal::Listener;
use crate::error::ProxyError;
use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Sleep;

/// How long a client idles without a server before its buffers are given back.
const SHRINK_AFTER: Duration = Duration::from_secs(1);

/// What the relay loop waits on besides its client and server, kept across its turns.
pub(super) struct Watches<'a> {
    pub signals: Signals<'a>,
    /// The idle limits; re-armed from the last activity on every turn.
    pub idle_timer: Pin<&'a mut Sleep>,
    /// Between servers: when an idle client's buffers go back, or when a queued checkout is due.
    pub spare_timer: Pin<&'a mut Sleep>,
    /// Whether the idle timer is armed.
    pub timed: bool,
    /// The checkout waiting in the pool's queue, if one is.
    pub queued: Option<QueuedCheckout>,
}

impl Watches<'_> {
    /// Have the spare timer fire by `at`. Lazily: one that fires sooner and has not fired yet is left as it
    /// is (the turn it wakes finds nothing due and arms it again), so a busy client does not move a timer in
    /// the runtime's wheel on every transaction, and no clock is read. Giving buffers back early (a busy
    /// client idles between two transactions when it fires) costs at most one re-allocation a second.
    fn arm_spare(&mut self, at: Instant) {
        let armed: Instant = self.spare_timer.deadline().into();
        if self.spare_timer.is_elapsed() || armed > at {
            self.spare_timer.as_mut().reset(at.into());
        }
    }
}

/// The one-shot signals that end or drain a session.
pub(super) struct Signals<'a> {
    pub stopping: &'a Listener,
    pub kill: &'a Listener,
    /// Transaction mode: the backend whose pid this client was told (an administrator may end it).
    pub home: Option<&'a HomeSignal>,
    /// The task waker the signals were given (each fires once, so it is registered only when it changes).
    pub registered: Option<Waker>,
}

/// Which signal fired.
pub(super) enum Signalled {
    Stopping,
    Killed,
    HomeEnded,
}

impl Signals<'_> {
    /// Ready once shutdown began (looked at only when `stopping`), the pool was killed, or the home backend
    /// ended. One branch of the loop's `select!` for all three, and no registration on an unchanged waker.
    pub fn poll(&mut self, cx: &mut Context<'_>, stopping: bool) -> Poll<Signalled> {
        if !self.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            self.stopping.register(cx.waker());
            self.kill.register(cx.waker());
            if let Some(h) = self.home {
                h.register(cx.waker());
            }
            self.registered = Some(cx.waker().clone());
        }
        if stopping && self.stopping.is_fired() {
            Poll::Ready(Signalled::Stopping)
        } else if self.kill.is_fired() {
            Poll::Ready(Signalled::Killed)
        } else if self.home.is_some_and(HomeSignal::is_ended) {
            Poll::Ready(Signalled::HomeEnded)
        } else {
            Poll::Pending
        }
    }
}

impl Signalled {
    /// How the loop ends for it, between servers.
    fn outcome(self) -> Result<Step, ProxyError> {
        match self {
            Signalled::Stopping => Ok(Step::Done(Outcome::ShuttingDown)),
            Signalled::Killed => Err(ProxyError::Killed),
            Signalled::HomeEnded => Err(ProxyError::HomeTerminated),
        }
    }
}

/// How one turn between servers ended.
pub(super) enum Step {
    /// A server is held: pump.
    Attached,
    /// Look again (something arrived, a timer fired, the checkout is still queued).
    Again,
    Done(Outcome),
}

impl Relay {
    /// One turn of the loop while the client holds no server.
    pub(super) async fn between<C: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        sock: &mut C,
        w: &mut Watches<'_>,
    ) -> Result<Step, ProxyError> {
        if self.draining || w.signals.stopping.is_fired() {
            return Ok(Step::Done(Outcome::ShuttingDown));
        }
        if let Some(q) = w.queued.take() {
            return self.wait_queued(sock, w, q).await;
        }
        self.flush_client(sock).await?;
        // A message the pump reads whole is all here before a server is taken for it (without, the pump
        // finds it incomplete, the server is released at once, and taken again: a spin while it comes).
        // A batch of Parses only is answered without a server; to tell, its Sync must be here.
        let mut want = self.pump.incomplete().unwrap_or(5);
        if self.pump.next_client_kind() == Some(b'P') {
            match self.pump.answer_parses() {
                Some(true) => return Ok(Step::Again),
                Some(false) => {}
                None => want = want.max(self.pump.cin.len() + 1),
            }
        }
        if (self.pump.next_client_kind().is_none() || want > 5) && !self.pump.client_eof() {
            let shrink = self.pump.holds_buffers();
            if shrink {
                // Counted from the server's release (read when the transaction ended), not from now.
                w.arm_spare(self.released_at.unwrap_or_else(Instant::now) + SHRINK_AFTER);
            }
            let timed = w.timed;
            let wake = tokio::select! {
                biased;
                s = poll_fn(|cx| w.signals.poll(cx, true)) => return s.outcome(),
                r = poll_fn(|cx| self.pump.poll_client_fill(cx, sock, want)) => r.map(|()| Event::Report),
                _ = w.spare_timer.as_mut(), if shrink => {
                    self.pump.shrink();
                    return Ok(Step::Again);
                }
                _ = w.idle_timer.as_mut(), if timed => {
                    return match self.idle_expired() {
                        Some(e) => Err(e),
                        None => Ok(Step::Again),
                    };
                }
            };
            wake.map_err(|e| self.pump_error(e))?;
            return Ok(Step::Again); // look at what arrived again
        }
        match self.pump.next_client_kind() {
            None => return Ok(Step::Done(Outcome::ClientDone)), // EOF, at most a partial header left
            Some(b'X') => return Ok(Step::Done(Outcome::ClientDone)),
            Some(k) if crate::relay::frame::client_limit(k).is_none() => {
                return Err(self.pump_error(super::pump::PumpError::BadType(k as char)));
            }
            Some(_) => {}
        }
        if let Some(pid) = self.wanted_server() {
            Box::pin(self.await_server(pid)).await;
        }
        // One clock read for every age the checkout looks at.
        let now = Instant::now();
        // Boxed: a checkout's state lives only while it runs, not in every idle session; the common
        // checkout (a parked server, nothing to wait for) builds no future at all.
        let attached = match self.attach_now(now) {
            Some(Quick::Attached) => Ok(()),
            Some(Quick::Failed(e)) => Err(e),
            Some(Quick::Install(c)) => Box::pin(self.install(c.0, c.1)).await,
            None => match self.queue_now(now) {
                Some(Ok(q)) => {
                    // The spare timer serves as the queued checkout's deadline, notice and recheck.
                    w.arm_spare(q.next_due());
                    w.queued = Some(q);
                    return Ok(Step::Again);
                }
                Some(Err(e)) => Err(e),
                None => Box::pin(self.attach(sock, None)).await,
            },
        };
        self.attached(sock, attached).await
    }

    /// Join the pool's hand-off queue when that is the only way to a server now (see
    /// [`crate::budget::pool::ServicePool::queue_now`]).
    fn queue_now(&mut self, now: Instant) -> Option<Result<QueuedCheckout, ProxyError>> {
        let who = Who { user: &self.user, database: &self.database, addr: self.peer, telemetry: &self.app.telemetry };
        let hand = HandOff::reuse(&mut self.hand);
        let r = self.pool.queue_now(&self.key, self.exempt, self.greeted, &who, hand, now)?;
        if let Err(e) = &r {
            self.note_checkout_error(e);
        }
        Some(r)
    }

    /// Wait in the pool's queue for a released server while watching the client (what it sends meanwhile is
    /// kept; leaving ends the wait), a cancel for it, and the checkout's deadline, notice and recheck.
    async fn wait_queued<C: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        sock: &mut C,
        w: &mut Watches<'_>,
        mut q: QueuedCheckout,
    ) -> Result<Step, ProxyError> {
        enum Wake {
            Handed,
            Client(Result<(), super::pump::PumpError>),
            Due,
        }
        let wake = {
            let pump = &mut self.pump;
            tokio::select! {
                biased;
                s = poll_fn(|cx| w.signals.poll(cx, true)) => return s.outcome(),
                _ = poll_fn(|cx| q.poll_handed(cx)) => Wake::Handed,
                r = poll_fn(|cx| pump.poll_client_watch(cx, sock)) => Wake::Client(r),
                _ = w.spare_timer.as_mut() => Wake::Due,
            }
        };
        let who = Who { user: &self.user, database: &self.database, addr: self.peer, telemetry: &self.app.telemetry };
        let attached = match wake {
            Wake::Handed if q.cancelled() => {
                q.abandon(&who);
                Err(ProxyError::QueuedCancel)
            }
            Wake::Handed => {
                // One clock read for the wait, the pool's last use and the transaction's start.
                let (started, now) = (q.started, Instant::now());
                match q.take(&who, now) {
                    Ok((conn, hold)) => {
                        self.pool.metrics.checkout_wait.observe(now.saturating_duration_since(started).as_secs_f64());
                        self.take_handed(conn, hold, now).await
                    }
                    Err(resumed) => Box::pin(self.attach(sock, Some(resumed))).await,
                }
            }
            Wake::Client(Err(e)) => {
                q.abandon(&who);
                return Err(self.pump_error(e));
            }
            Wake::Client(Ok(())) if self.pump.client_eof() => {
                q.abandon(&who);
                return Err(ProxyError::ClientIo(std::io::ErrorKind::UnexpectedEof.into()));
            }
            Wake::Client(Ok(())) => {
                w.queued = Some(q);
                return Ok(Step::Again);
            }
            Wake::Due => {
                let now = Instant::now();
                match q.due(now) {
                    Due::Wait => {
                        w.arm_spare(q.next_due());
                        w.queued = Some(q);
                        return Ok(Step::Again);
                    }
                    Due::Notice(text) => {
                        Box::pin(waiting::notice(sock, &text)).await?;
                        w.arm_spare(q.next_due());
                        w.queued = Some(q);
                        return Ok(Step::Again);
                    }
                    Due::Recheck => Box::pin(self.attach(sock, Some(q.resume()))).await,
                    Due::TimedOut => {
                        let e = q.time_out(&who);
                        self.note_checkout_error(&e);
                        Err(e)
                    }
                }
            }
        };
        self.attached(sock, attached).await
    }

    /// What a checkout's outcome means for the loop: a refused or failed checkout answers the client's batch
    /// with the error (the session goes on); a refused startup setting or a lost client ends it.
    async fn attached<C: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        sock: &mut C,
        attached: Result<(), ProxyError>,
    ) -> Result<Step, ProxyError> {
        match attached {
            Ok(()) => {}
            Err(
                e @ (ProxyError::BudgetExhausted { .. }
                | ProxyError::CeilingReached { .. }
                | ProxyError::Shed { .. }
                | ProxyError::QueuedCancel
                | ProxyError::Paused { .. }
                | ProxyError::Upstream { .. }),
            ) => {
                let cause = self.app.journal.redacted(&e.to_string()).into_owned();
                tracing::warn!(kind = e.kind(), %cause, "checkout failed; query rejected");
                if Box::pin(waiting::reject_batch(sock, &mut self.pump.cin, &e)).await? {
                    return Ok(Step::Done(Outcome::ClientDone));
                }
                return Ok(Step::Again);
            }
            Err(ProxyError::ServerRejected { code, message }) => {
                // The client's own startup setting was refused: like Postgres, end the session with it.
                return Err(ProxyError::SettingRejected { code, message });
            }
            Err(e) => return Err(e),
        }
        Ok(Step::Attached)
    }
}
