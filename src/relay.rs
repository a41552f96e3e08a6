//! The message pump between one client and its (current) server connection.
//!
//! Bytes are forwarded in the chunks they were read in; a [`Scanner`] per direction walks message
//! headers to track what the proxy acts on: outstanding Query/Sync replies, the transaction status in
//! ReadyForQuery, COPY state, ParameterStatus and the client's Terminate. In transaction mode the server
//! goes back to the pool at the first point where nothing is outstanding and the status is idle.

use crate::admission::Hold;
use crate::app::App;
use crate::cancel::{ClientKey, ServerKey};
use crate::checkout::{Waiter, Who};
use crate::config::PoolMode;
use crate::error::ProxyError;
use crate::pool::{PooledConn, Route, ServicePool};
use crate::protocol::{self, Event, Scanner};
use crate::ro_filter::RoFilter;
use crate::server::{ServerConn, ServerError};
use crate::telemetry::{tables, Value};
use bytes::{Buf, BytesMut};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, warn};

mod report;

pub const BUF: usize = 16 * 1024;

/// What the relay knows about the server conversation.
#[derive(Debug, Clone, Copy)]
pub struct TxState {
    /// Replies (ReadyForQuery) still owed for Query/Sync/FunctionCall sent.
    pub pending: u32,
    /// Extended-protocol messages sent since the last Sync.
    pub ext_open: bool,
    /// Status byte of the last ReadyForQuery: I, T or E.
    pub status: u8,
    pub copy_in: bool,
}

impl TxState {
    const IDLE: TxState = TxState { pending: 0, ext_open: false, status: b'I', copy_in: false };
}

/// Why the relay stopped.
#[derive(Debug)]
pub enum Outcome {
    ClientDone,
    ShuttingDown,
}

/// One client's relay state, kept across server checkouts.
pub struct Relay {
    app: Arc<App>,
    pub pool: Arc<ServicePool>,
    pub key: ClientKey,
    pub desired: BTreeMap<String, String>,
    server: Option<PooledConn>,
    st: TxState,
    cscan: Scanner,
    sscan: Scanner,
    cbuf: BytesMut,
    sbuf: BytesMut,
    draining: bool,
    mode: PoolMode,
    /// When the current transaction's first message was relayed.
    tx_started: Option<Instant>,
    /// Read-only routes: the statement filter, and the client address for the audit log.
    ro: Option<RoFilter>,
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
}

/// What one client session did, for its `client_sessions` row.
#[derive(Debug, Default, Clone, Copy)]
pub struct SessionCounts {
    pub transactions: u64,
    pub queries: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// What a server chunk contained that the proxy reports on.
#[derive(Default)]
pub struct Seen {
    idle_ready: u32,
    /// (SQLSTATE, message) of each ErrorResponse.
    errors: Vec<(String, String)>,
}

enum Ev {
    Client(std::io::Result<usize>),
    Server(std::io::Result<usize>),
    Shutdown,
    /// The client stayed idle past a timeout: inside a transaction (true) or outside one.
    Idle(bool),
    /// An operator's `KILL`.
    Killed,
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
        let ro = (pool.route == Route::ReadOnly).then(|| RoFilter::new(&app.resolved().config.read_only.database));
        Relay {
            app,
            pool,
            key,
            desired,
            server: None,
            st: TxState::IDLE,
            cscan: Scanner::default(),
            sscan: Scanner::default(),
            cbuf: BytesMut::with_capacity(BUF),
            sbuf: BytesMut::with_capacity(BUF),
            draining: false,
            mode,
            tx_started: None,
            ro,
            peer,
            hold: None,
            exempt: false,
            greeted: false,
            user: String::new(),
            database: String::new(),
            counts: SessionCounts::default(),
        }
    }

    pub fn server_params(&self) -> Option<&HashMap<String, String>> {
        self.server.as_ref().map(|c| &c.params)
    }

    fn clean(&self) -> bool {
        let s = &self.st;
        s.pending == 0
            && !s.ext_open
            && !s.copy_in
            && s.status == b'I'
            && self.cscan.at_boundary()
            && self.sscan.at_boundary()
    }

    /// Check out a server, bring its session settings in line with this client's, and record it for cancels.
    pub async fn attach(&mut self, sock: &mut TcpStream) -> Result<(), ProxyError> {
        let started = Instant::now();
        let pool = self.pool.clone();
        let waiter = Waiter {
            sock,
            cbuf: &mut self.cbuf,
            key: &self.key,
            exempt: self.exempt,
            may_notice: self.greeted,
            who: Who { user: &self.user, database: &self.database, addr: self.peer, telemetry: &self.app.telemetry },
        };
        let checkout = crate::checkout::acquire(&pool, waiter).await;
        self.pool.metrics.checkout_wait.observe(started.elapsed().as_secs_f64());
        let (mut conn, hold) = match checkout {
            Ok(c) => c,
            Err(e) => {
                self.note_checkout_error(&e);
                return Err(e);
            }
        };
        self.hold = Some(hold);
        if let Some(sql) = crate::reset::settings_sql(&conn, &self.desired) {
            let timeout = self.pool.budget().settings.reset_timeout;
            if let Err(e) = conn.simple(&sql, timeout).await {
                conn.broken = true;
                return Err(match e {
                    ServerError::Postgres { code, message } => ProxyError::ServerRejected { code, message },
                    source => ProxyError::Upstream { upstream: self.pool.budget().upstream.clone(), source },
                });
            }
            conn.applied = self.desired.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        }
        self.key.attach(Some(ServerKey { addr: conn.addr, pid: conn.pid, secret: conn.secret }));
        self.st = TxState::IDLE;
        self.sscan = Scanner::default();
        self.server = Some(conn);
        Ok(())
    }

    /// Return a clean server to the pool.
    fn release(&mut self) {
        if let Some(mut c) = self.server.take() {
            c.last_checkin = Instant::now();
            self.key.attach(None);
        }
        self.hold = None;
    }

    /// The idle limit that applies now, if any: (timeout, inside a transaction).
    fn idle_limit(&self) -> Option<(Duration, bool)> {
        let s = &self.pool.budget().settings;
        let st = &self.st;
        if st.pending > 0 || st.copy_in || !self.cscan.at_boundary() || !self.cbuf.is_empty() {
            return None;
        }
        let (d, in_tx) = if st.status == b'I' && !st.ext_open {
            (s.client_idle_timeout, false)
        } else {
            (s.idle_in_transaction_timeout, true)
        };
        (!d.is_zero()).then_some((d, in_tx))
    }

    /// Pump messages until the client leaves, the proxy shuts down, or an error ends the session.
    pub async fn run(&mut self, sock: &mut TcpStream) -> Result<Outcome, ProxyError> {
        // One shutdown waiter for the whole session, not one registration per loop turn.
        let token = self.app.shutdown.clone();
        let cancelled = token.cancelled();
        tokio::pin!(cancelled);
        let kill = self.pool.control.kill_token();
        let killed = kill.cancelled();
        tokio::pin!(killed);
        loop {
            if self.server.is_none() {
                if self.draining || self.app.shutdown.is_cancelled() {
                    return Ok(Outcome::ShuttingDown);
                }
                if self.cbuf.is_empty() {
                    let idle = self.idle_limit();
                    let n = tokio::select! {
                        _ = &mut cancelled => return Ok(Outcome::ShuttingDown),
                        _ = &mut killed => return Err(ProxyError::Killed),
                        r = sock.read_buf(&mut self.cbuf) => r.map_err(ProxyError::ClientIo)?,
                        _ = idle_sleep(idle) => return Err(ProxyError::ClientIdle(idle.map(|i| i.0).unwrap_or_default())),
                    };
                    if n == 0 {
                        return Ok(Outcome::ClientDone);
                    }
                }
                if self.cscan.at_boundary() && self.cbuf[0] == b'X' {
                    return Ok(Outcome::ClientDone);
                }
                match self.attach(sock).await {
                    Ok(()) => {}
                    Err(
                        e @ (ProxyError::BudgetExhausted { .. }
                        | ProxyError::Shed { .. }
                        | ProxyError::QueuedCancel
                        | ProxyError::Paused { .. }
                        | ProxyError::Upstream { .. }
                        | ProxyError::ServerRejected { .. }),
                    ) => {
                        warn!(kind = e.kind(), cause = %e, "checkout failed; query rejected");
                        if crate::checkout::reject_batch(sock, &mut self.cbuf, &e).await? {
                            return Ok(Outcome::ClientDone);
                        }
                        continue;
                    }
                    Err(e) => return Err(e),
                }
                if self.forward_client().await? {
                    return Ok(Outcome::ClientDone);
                }
                continue;
            }
            let idle = self.idle_limit();
            let ev = {
                let conn = self.server.as_mut().expect("attached");
                tokio::select! {
                    r = sock.read_buf(&mut self.cbuf) => Ev::Client(r),
                    r = conn.stream.read_buf(&mut self.sbuf) => Ev::Server(r),
                    _ = &mut cancelled, if !self.draining => Ev::Shutdown,
                    _ = &mut killed => Ev::Killed,
                    _ = idle_sleep(idle) => Ev::Idle(idle.is_some_and(|i| i.1)),
                }
            };
            match ev {
                Ev::Client(r) => {
                    if r.map_err(ProxyError::ClientIo)? == 0 || self.forward_client().await? {
                        return Ok(Outcome::ClientDone);
                    }
                }
                Ev::Server(r) => {
                    let n = r.unwrap_or(0);
                    if n == 0 {
                        if let Some(c) = self.server.as_mut() {
                            c.broken = true;
                        }
                        let b = self.pool.budget();
                        let route = self.pool.route.as_str();
                        self.app.metrics.server_errors.with_label_values(&[&b.name, route, "server_error"]).inc();
                        let msg = "server closed the connection during a session";
                        self.app.journal.record(&b.name, route, &b.upstream, "server_error", "08006", msg);
                        return Err(ProxyError::Upstream {
                            upstream: self.pool.budget().upstream.clone(),
                            source: ServerError::Closed,
                        });
                    }
                    self.forward_server(sock).await?;
                    if self.clean() {
                        if self.draining {
                            return Ok(Outcome::ShuttingDown);
                        }
                        if self.mode == PoolMode::Transaction {
                            self.release();
                        }
                    }
                }
                Ev::Shutdown => {
                    self.draining = true;
                    if self.clean() {
                        return Ok(Outcome::ShuttingDown);
                    }
                }
                Ev::Killed => {
                    if let Some(c) = self.server.as_mut() {
                        c.broken = true;
                    }
                    return Err(ProxyError::Killed);
                }
                Ev::Idle(in_tx) => {
                    let d = idle.map(|i| i.0).unwrap_or_default();
                    return Err(if in_tx { ProxyError::IdleInTransaction(d) } else { ProxyError::ClientIdle(d) });
                }
            }
        }
    }

    /// Scan and forward buffered client bytes; true when the client sent Terminate.
    async fn forward_client(&mut self) -> Result<bool, ProxyError> {
        if self.tx_started.is_none() {
            self.tx_started = Some(Instant::now());
        }
        // Read-only routes pass whole messages through the policy filter; others forward the bytes as read.
        let (bytes, consumed) = match self.ro.as_mut() {
            Some(f) => {
                let mut violations = Vec::new();
                let consumed = f.filter(&self.cbuf, &mut violations)?;
                for v in violations {
                    let b = self.pool.budget();
                    self.app.metrics.ro_violations.with_label_values(&[&b.name, &f.route]).inc();
                    warn!(kind = "read_only_violation", service = %b.name, route = %f.route, client = %self.peer,
                        fingerprint = %v.fingerprint, reason = v.reason, "read-only route refused a statement");
                    self.app.telemetry.emit(tables::RO_VIOLATIONS, || {
                        vec![
                            Value::now(),
                            b.name.as_str().into(),
                            f.route.as_str().into(),
                            self.peer.to_string().into(),
                            v.reason.into(),
                            v.fingerprint.as_str().into(),
                        ]
                    });
                }
                (&f.out[..], consumed)
            }
            None => (&self.cbuf[..], self.cbuf.len()),
        };
        let st = &mut self.st;
        let mut terminate_at = None;
        let mut queries = 0u64;
        self.cscan.feed::<ProxyError>(
            bytes,
            |_| false,
            |ev| {
                if let Event::Start { kind, at, .. } = ev {
                    match kind {
                        b'Q' => {
                            st.pending += 1;
                            queries += 1;
                        }
                        b'F' => st.pending += 1,
                        b'S' => {
                            st.pending += 1;
                            st.ext_open = false;
                        }
                        b'E' => {
                            st.ext_open = true;
                            queries += 1;
                        }
                        b'P' | b'B' | b'D' | b'C' | b'H' => st.ext_open = true,
                        b'c' | b'f' => st.copy_in = false,
                        b'X' => terminate_at = Some(at.saturating_sub(5)),
                        _ => {}
                    }
                }
                Ok(())
            },
        )?;
        let end = terminate_at.unwrap_or(bytes.len());
        self.pool.metrics.queries.inc_by(queries);
        self.pool.metrics.bytes_from_client.inc_by(end as u64);
        self.counts.queries += queries;
        self.counts.bytes_in += end as u64;
        let conn = self.server.as_mut().expect("attached");
        if let Err(e) = conn.stream.write_all(&bytes[..end]).await {
            conn.broken = true;
            return Err(ProxyError::Upstream {
                upstream: self.pool.budget().upstream.clone(),
                source: ServerError::Connect(e),
            });
        }
        self.cbuf.advance(consumed);
        Ok(terminate_at.is_some())
    }

    /// Scan and forward buffered server bytes to the client.
    async fn forward_server(&mut self, sock: &mut TcpStream) -> Result<(), ProxyError> {
        let conn = self.server.as_mut().expect("attached");
        let mut seen = Seen::default();
        scan_server(&mut self.sscan, &mut self.st, conn, &self.sbuf, &mut seen)?;
        self.note_seen(&mut seen);
        self.pool.metrics.bytes_to_client.inc_by(self.sbuf.len() as u64);
        self.counts.bytes_out += self.sbuf.len() as u64;
        sock.write_all(&self.sbuf).await.map_err(ProxyError::ClientIo)?;
        self.sbuf.clear();
        Ok(())
    }

    /// End of session: check the server in clean, or clean it up (cancel, drain, roll back, reset) within
    /// the reset deadline, or discard it. Never hands a dirty connection to the next client.
    pub async fn finish(&mut self) {
        // Declared first so it is dropped last: the admission place is given back after the server.
        let _hold = self.hold.take();
        let Some(mut conn) = self.server.take() else {
            return;
        };
        self.key.attach(None);
        if conn.broken {
            drop(PooledConn::take(conn));
            return;
        }
        let deadline = self.pool.budget().settings.reset_timeout;
        let needs_reset = self.mode == PoolMode::Session;
        if self.clean() && !needs_reset {
            conn.last_checkin = Instant::now();
            return;
        }
        let st = self.st;
        let mut sscan = std::mem::take(&mut self.sscan);
        let result = tokio::time::timeout(
            deadline,
            crate::reset::cleanup(&mut conn, st, &mut sscan, needs_reset, self.ro.is_some()),
        )
        .await;
        match result {
            Ok(Ok(())) => {
                debug!("server connection reset and returned");
                conn.last_checkin = Instant::now();
            }
            Ok(Err(e)) => {
                warn!(kind = "server_reset", cause = %e, "server connection discarded after failed reset");
                conn.broken = true;
                drop(PooledConn::take(conn));
            }
            Err(_) => {
                warn!(
                    kind = "server_reset",
                    cause = "deadline",
                    ?deadline,
                    "server connection discarded: reset timed out"
                );
                conn.broken = true;
                drop(PooledConn::take(conn));
            }
        }
    }
}

/// Walk server bytes: count ReadyForQuery, record status, COPY-in start and ParameterStatus.
pub fn scan_server(
    sscan: &mut Scanner,
    st: &mut TxState,
    conn: &mut ServerConn,
    bytes: &[u8],
    seen: &mut Seen,
) -> Result<(), ProxyError> {
    sscan.feed::<ProxyError>(
        bytes,
        |k| k == b'Z' || k == b'S' || k == b'E',
        |ev| {
            match ev {
                Event::Start { kind: b'G' | b'W', .. } => st.copy_in = true,
                Event::Body { kind: b'Z', body } => {
                    st.pending = st.pending.saturating_sub(1);
                    st.status = body.first().copied().unwrap_or(b'I');
                    st.copy_in = false;
                    if st.status == b'I' {
                        seen.idle_ready += 1;
                    }
                }
                Event::Body { kind: b'E', body } => {
                    let (_, code, message) = protocol::parse_error_fields(body);
                    seen.errors.push((code, message));
                }
                Event::Body { kind: b'S', body } => {
                    if let Ok((k, v)) = protocol::parse_parameter_status(body) {
                        conn.params.insert(k, v);
                    }
                }
                _ => {}
            }
            Ok(())
        },
    )
}

/// Sleep for an idle limit, or forever when none applies (no timer is registered then).
async fn idle_sleep(limit: Option<(Duration, bool)>) {
    match limit {
        Some((d, _)) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}
