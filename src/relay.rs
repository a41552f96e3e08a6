//! One client's conversation with its (current) server: check out, bring the server to the client's settings,
//! pump bytes ([`pump`]) while the transaction-state machine ([`txstate`]) follows the server, and give the
//! server back — in transaction mode at the first clean idle boundary, otherwise at the session's end,
//! cleaned up ([`crate::relay::reset`]) or discarded when its state cannot be proven.

use crate::budget::admission::Hold;
use crate::budget::cancel::ClientKey;
use crate::budget::pool::{PooledConn, Route, ServicePool};
use crate::config::{PinPolicy, PoolMode};
use crate::context::App;
use crate::error::ProxyError;
use crate::protocol::ProtocolError;
use crate::read_only::filter::RoFilter;
use crate::server::ServerError;

use between::{Signalled, Signals, Step, Watches};
use pump::{Event, Pump, PumpError, TxnStatements};
use std::collections::BTreeMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn};

mod attach;
mod between;
mod checkin;
pub mod classify;
pub mod frame;
pub mod gate;
mod idle;
pub mod pump;
mod report;
pub mod reset;
pub mod txstate;
pub mod waiting;

/// How long a client that holds no server may leave its replies unread before the session is ended.
const CLIENT_WRITE_STALL: Duration = Duration::from_secs(60);
/// How often a checkout that needs one particular server (see `attach::wanted_server`) looks whether it is idle.
const HOME_RECHECK: Duration = Duration::from_millis(5);
/// How long a detaching client waits for a cancel it sent to reach Postgres before its server is discarded.
const CANCEL_SETTLE: Duration = Duration::from_secs(6);

/// Why the relay stopped.
#[derive(Debug)]
pub enum Outcome {
    ClientDone,
    ShuttingDown,
    /// The server ended the session with FATAL (passed to the client as is).
    ServerEnded,
}

/// One client's relay state, kept across server checkouts.
pub struct Relay {
    app: Arc<App>,
    /// The read-only tripwire fired: what the server reported (the session ends at the next check).
    tripped: Option<String>,
    pub pool: Arc<ServicePool>,
    pub key: ClientKey,
    /// The session settings this client holds (shared with `startup` until it changes one).
    pub desired: Arc<BTreeMap<String, String>>,
    /// What the client's startup packet (and the proxy's `query_timeout`) set: what `RESET` returns to, as on
    /// a direct connection, where these are the session's reset values.
    startup: Arc<BTreeMap<String, String>>,
    server: Option<PooledConn>,
    pump: Pump,
    draining: bool,
    mode: PoolMode,
    /// When the current transaction's first message was relayed.
    tx_started: Option<Instant>,
    peer: SocketAddr,
    /// The admission place of the server held now.
    hold: Option<Hold>,
    /// Whether this client belongs to its service's exempt class.
    pub exempt: bool,
    /// Whether the client got its login greeting (NOTICEs may be sent).
    pub greeted: bool,
    /// Who the client is, for telemetry rows.
    pub user: String,
    pub database: String,
    /// This session's own counts (the pool metrics hold the totals).
    pub counts: SessionCounts,
    /// (client_idle_timeout, idle_in_transaction_timeout, pin_idle_timeout) as of the last checkout.
    idle_timeouts: (Duration, Duration, Duration),
    /// Transaction mode: why the server is pinned to this client now ([`crate::telemetry::labels::PIN_REASONS`]).
    pub pins: Vec<&'static str>,
    /// The same as bits, for `SHOW CLIENTS`.
    pub pin_bits: Arc<std::sync::atomic::AtomicU8>,
    /// Counts this client in its pool's pinned clients while pinned.
    pin_count: Option<crate::budget::pool::PinCount>,
    /// Transaction mode: the server whose pid the client was told, preferred at every checkout.
    pub home: Option<crate::budget::affinity::Home>,
    /// The server the next checkout takes if it can (one statement needs it, see `attach::wanted_server`).
    prefer: Option<i32>,
    /// The backend pid of the server this client held last.
    last_pid: i32,
    /// When the last transaction ended (read once, for its duration and the server's check-in).
    ended_at: Option<Instant>,
    /// When this client last gave a server back.
    released_at: Option<Instant>,
    /// The hand-off slot of this client's last queued checkout, reused by the next one.
    hand: Option<Arc<crate::budget::handoff::HandOff>>,
}

/// What one client session did, for its `client_sessions` row.
#[derive(Debug, Default, Clone, Copy)]
pub struct SessionCounts {
    pub transactions: u64,
    pub queries: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// What woke the relay.
enum Wake {
    Pump(Result<Event, PumpError>),
    Shutdown,
    Killed,
    HomeEnded,
    IdleCheck,
}

impl Relay {
    pub fn new(
        app: Arc<App>,
        pool: Arc<ServicePool>,
        key: ClientKey,
        desired: BTreeMap<String, String>,
        peer: SocketAddr,
    ) -> Relay {
        let mode = pool.budget().pool_mode();
        let resolved = app.resolved();
        let ro = (pool.route == Route::ReadOnly).then(|| {
            let mut f = RoFilter::new(&resolved.config.read_only.database);
            f.allow_procedures = resolved.config.read_only.allow_procedures;
            f
        });
        let mut pump = Pump::new(ro, resolved.config.proxy.max_query_size);
        if mode == PoolMode::Transaction {
            let b = pool.budget();
            let m = &pool.metrics;
            pump.stmts = Some(Box::new(TxnStatements {
                registry: pool.statements.clone(),
                client: Default::default(),
                server: Default::default(),
                max_per_server: b.settings.max_prepared_statements,
                search_path: desired.get("search_path").cloned().unwrap_or_default(),
                refuse_pins: b.settings.pin == PinPolicy::Refuse,
                service: b.name.clone(),
                hits: m.prepared_hits.clone(),
                misses: m.prepared_misses.clone(),
                evictions: m.prepared_evictions.clone(),
                bound: Vec::new(),
                unnamed: None,
                unnamed_here: false,
                unnamed_pending: Default::default(),
                unnamed_deallocates: false,
                portal_deallocates: false,
                holding: false,
                checked: None,
            }));
        }
        let startup = pool.settings.intern(desired);
        Relay {
            tripped: None,
            app,
            pool,
            key,
            desired: startup.clone(),
            startup,
            server: None,
            pump,
            draining: false,
            mode,
            tx_started: None,
            peer,
            hold: None,
            exempt: false,
            greeted: false,
            user: String::new(),
            database: String::new(),
            counts: SessionCounts::default(),
            idle_timeouts: (Duration::ZERO, Duration::ZERO, Duration::ZERO),
            pins: Vec::new(),
            pin_bits: Default::default(),
            pin_count: None,
            home: None,
            prefer: None,
            last_pid: 0,
            ended_at: None,
            released_at: None,
            hand: None,
        }
    }

    /// The backend pid of the server held now.
    pub fn server_pid(&self) -> Option<i32> {
        self.server.as_ref().map(|c| c.pid)
    }

    pub fn server_params(&self) -> Option<&crate::server::Params> {
        self.server.as_ref().map(|c| &c.params)
    }

    /// Give back a server checked out only to learn what it reports (the login of a transaction-mode client).
    pub async fn give_back(&mut self) {
        if self.pump.releasable() {
            self.release().await;
        }
    }

    /// Give the server up: no cancel can reach it any more, and one already sent has arrived. Returns it
    /// (to be dropped back into the pool) or `None` when a cancel did not settle (then it was discarded).
    async fn detach(&mut self) -> Option<PooledConn> {
        let mut conn = self.server.take()?;
        if let Some(s) = self.pump.stmts.as_mut() {
            std::mem::swap(&mut s.server, &mut conn.statements);
            s.server.clear();
        }
        if let Some(flights) = self.key.detach() {
            if !flights.settle(CANCEL_SETTLE).await {
                warn!(kind = "cancel", "a cancel for this server did not settle; server connection discarded");
                self.pool.discard(conn);
                return None;
            }
        }
        Some(conn)
    }

    /// Return a clean server to the pool (transaction mode, at an idle boundary).
    async fn release(&mut self) {
        // The transaction's end was just timed ([`Relay::report`]): the same reading is the check-in time.
        let now = self.ended_at.take().unwrap_or_else(Instant::now);
        self.released_at = Some(now);
        if let Some(c) = self.detach().await {
            self.pool.put_back_at(c, now);
        }
        self.hold = None;
    }

    /// Pump messages until the client leaves, the proxy shuts down, or an error ends the session.
    pub async fn run<C: AsyncRead + AsyncWrite + Unpin>(&mut self, sock: &mut C) -> Result<Outcome, ProxyError> {
        let stopping = self.app.stopping.listen();
        let kill = self.pool.control.kill_signal().listen();
        // Transaction mode: an administrator terminated the backend whose pid this client was told.
        let home = self.home.as_ref().map(|h| h.signal.clone());
        let idle_timer = tokio::time::sleep(Duration::from_secs(86_400));
        tokio::pin!(idle_timer);
        // Buffers go back only after the client has idled a while without a server, so a busy client does
        // not free and re-allocate them every transaction.
        let spare_timer = tokio::time::sleep(Duration::from_secs(86_400));
        tokio::pin!(spare_timer);
        let signals = Signals { stopping: &stopping, kill: &kill, home: home.as_deref(), registered: None };
        let mut w = Watches { signals, idle_timer, spare_timer, timed: false, queued: None };
        self.load_settings();
        self.pump.last_activity = Some(Instant::now());
        loop {
            // Arm the idle timer from the last activity; it is re-checked when it fires.
            // While the server is busy no limit applies, but the state may change inside the pump (a client that
            // stops in the middle of a batch): then the timer re-checks at the shortest configured timeout.
            let limit = self.idle_limit();
            w.timed = self.pump.track_activity;
            if w.timed {
                let at = match limit {
                    Some((d, _)) => self.pump.last_activity.unwrap_or_else(Instant::now) + d,
                    None => Instant::now() + self.shortest_idle_timeout(),
                };
                if w.idle_timer.deadline() != at.into() {
                    w.idle_timer.as_mut().reset(at.into());
                }
            }
            if self.server.is_none() {
                match self.between(sock, &mut w).await? {
                    Step::Attached => {}
                    Step::Again => continue,
                    Step::Done(outcome) => return Ok(outcome),
                }
            }
            self.pump.stop_at_idle = self.mode == PoolMode::Transaction || self.draining;
            let wake = {
                let conn = self.server.as_mut().expect("attached");
                let pump = &mut self.pump;
                // Biased (no random start drawn on every wake): the signals first, so a busy pump cannot starve them.
                tokio::select! {
                    biased;
                    s = poll_fn(|cx| w.signals.poll(cx, !self.draining)) => match s {
                        Signalled::Stopping => Wake::Shutdown,
                        Signalled::Killed => Wake::Killed,
                        Signalled::HomeEnded => Wake::HomeEnded,
                    },
                    r = poll_fn(|cx| pump.poll_pump(cx, sock, &mut conn.stream)) => Wake::Pump(r),
                    _ = w.idle_timer.as_mut(), if w.timed => Wake::IdleCheck,
                }
            };
            self.take_counts();
            match wake {
                Wake::Pump(Ok(Event::Report)) => {
                    self.report();
                    if let Some(e) = self.tripwire() {
                        let _ = self.flush_client(sock).await;
                        return Err(e);
                    }
                }
                Wake::Pump(Ok(Event::Idle)) => {
                    self.report();
                    if let Some(e) = self.tripwire() {
                        let _ = self.flush_client(sock).await;
                        return Err(e);
                    }
                    if self.draining {
                        return Ok(Outcome::ShuttingDown);
                    }
                    if self.pump.probe_due
                        && self.mode == PoolMode::Transaction
                        && Box::pin(self.probe_session()).await?
                    {
                        continue; // pinned: the server stays with this client
                    }
                    self.release().await;
                }
                Wake::Pump(Ok(Event::ClientClosed | Event::Terminate)) => {
                    self.report();
                    return Ok(Outcome::ClientDone);
                }
                Wake::Pump(Ok(Event::ServerClosed)) => {
                    self.report();
                    // What the server said before closing goes to the client first; if that was a FATAL
                    // (terminated by an administrator, a crash), it is the client's answer, as on a direct
                    // connection, and the proxy adds nothing.
                    let fatal = self.pump.tx.fatal();
                    let err = self.server_lost(ServerError::Closed);
                    let _ = self.flush_client(sock).await;
                    if fatal {
                        debug!("server ended the session with FATAL; passed to the client");
                        return Ok(Outcome::ServerEnded);
                    }
                    return Err(err);
                }
                Wake::Pump(Err(e)) => {
                    self.report();
                    return Err(self.pump_error(e));
                }
                Wake::Shutdown => {
                    self.draining = true;
                    self.pump.pinned = false; // a pinned client too is ended at its next idle boundary
                    if self.pump.releasable() {
                        return Ok(Outcome::ShuttingDown);
                    }
                }
                Wake::Killed | Wake::HomeEnded => {
                    if let Some(c) = self.server.as_mut() {
                        c.broken = true;
                    }
                    return Err(if matches!(wake, Wake::Killed) {
                        ProxyError::Killed
                    } else {
                        ProxyError::HomeTerminated
                    });
                }
                Wake::IdleCheck => {
                    if let Some(e) = self.idle_expired() {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Write what the server sent and the client has not taken yet (no server is held meanwhile), within
    /// [`CLIENT_WRITE_STALL`]: a client that stops reading is ended, not waited on forever.
    async fn flush_client<C: AsyncWrite + Unpin>(&mut self, sock: &mut C) -> Result<(), ProxyError> {
        if self.pump.unflushed().is_empty() {
            return Ok(());
        }
        let write = sock.write_all(self.pump.unflushed());
        match tokio::time::timeout(CLIENT_WRITE_STALL, write).await {
            Ok(r) => r.map_err(ProxyError::ClientIo)?,
            Err(_) => return Err(ProxyError::ClientIo(std::io::ErrorKind::TimedOut.into())),
        }
        let n = self.pump.unflushed().len();
        self.pump.consume_unflushed(n);
        Ok(())
    }

    /// The server went away under the client.
    fn server_lost(&mut self, source: ServerError) -> ProxyError {
        if let Some(c) = self.server.as_mut() {
            c.broken = true;
        }
        let b = self.pool.budget();
        let route = self.pool.route.as_str();
        self.app.metrics.server_errors.with_label_values(&[&b.name, route, "server_error"]).inc();
        let msg = "server closed the connection during a session";
        self.app.journal.record(
            &b.name,
            route,
            &b.upstream,
            "server_error",
            crate::protocol::sqlstate::CONNECTION_FAILURE,
            msg,
        );
        ProxyError::Upstream { upstream: b.upstream.clone(), source }
    }

    fn pump_error(&mut self, e: PumpError) -> ProxyError {
        match e {
            PumpError::ClientIo(e) => ProxyError::ClientIo(e),
            PumpError::ServerIo(e) => self.server_lost(ServerError::Io(e)),
            PumpError::Server(e) => {
                warn!(kind = "server_protocol", cause = %e, "server stream unreadable");
                self.server_lost(ServerError::Protocol(ProtocolError::Malformed("server message")))
            }
            PumpError::BadType(k) => {
                ProxyError::ClientProtocol(ProtocolError::Unexpected { expected: "frontend message", got: k })
            }
            PumpError::BadLength { kind, len } => {
                ProxyError::ClientProtocol(ProtocolError::Length { kind, len: len.max(0) as usize })
            }
            PumpError::TooLarge { kind, len, max } => ProxyError::MessageTooLarge { kind, len, max },
            PumpError::Filter(e) => ProxyError::ClientProtocol(e),
        }
    }
}

/// A relay dropped while it holds a server (its task panicked, or was dropped mid-await) never lets that
/// server go back to the pool in whatever state it is in: it is closed. The normal end, [`Relay::finish`],
/// has taken the server out by then.
impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(conn) = self.server.take() {
            self.pool.discard(conn);
        }
    }
}

#[cfg(test)]
mod pump_pacing_tests;
#[cfg(test)]
mod pump_tests;
