//! The byte pump between one client and its current server: one task, both directions, non-blocking.
//!
//! Design: a single `poll` drives four steps in turn — read the client, frame its bytes into the server
//! buffer, write the server, read the server (scanning it into the [`TxState`]), write the client — and
//! parks only when none of them can progress. A full destination stops reading from its own source
//! only, so a client that pipelines without reading its results fills its own buffers, never stalls
//! the server's replies (PgBouncer's model; two tasks would need a lock around the shared state). The
//! pump is generic over `AsyncRead + AsyncWrite`, so TLS streams and in-process duplex pipes use it as is.
//!
//! Client bytes are forwarded only from a complete 5-byte header on, so a server never sees part of a
//! header; a message whose body was partly forwarded marks the server as mid-message
//! ([`Pump::mid_message`]) and such a server is never given to anyone else. Messages the proxy must read
//! whole (Describe, Terminate, and Query/Parse/Bind on read-only routes) are held up to
//! `max_query_size`; nothing is allocated by a length the client declared.

use super::frame::{self, Scan, ServerScanner};
use super::txstate::{TxState, MAX_OUTSTANDING};
use crate::read_only::filter::{RoFilter, Violation};
use bytes::{Buf, BytesMut};
use rewrite::{Action, Actions};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite};

/// Buffer size per direction; buffers are allocated on demand and given back when idle.
pub const BUF: usize = 16 * 1024;
/// What an idle client's first read takes: its buffers are given back while it idles, and a short
/// statement fits here without a full [`BUF`].
const FIRST_READ: usize = 512;
/// Error records kept per report (more are counted, not kept).
const MAX_ERRORS: usize = 16;
/// Transaction mode reads a Query, Parse or Bind up to this size whole (to see what it does and rename
/// statements); a larger one streams, and the server is probed after it.
const HOLD_MAX: usize = 64 * 1024;
/// Most of a streamed Bind's head held to find its portal and statement names.
const BIND_HEAD: usize = 4096;

pub mod rewrite;
pub use rewrite::TxnStatements;

/// Errors of the pump.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    #[error("client i/o: {0}")]
    ClientIo(std::io::Error),
    #[error("server i/o: {0}")]
    ServerIo(std::io::Error),
    #[error("invalid frontend message type {0:?}")]
    BadType(char),
    #[error("invalid length {len} for frontend message {kind:?}")]
    BadLength { kind: char, len: i64 },
    #[error("message of type {kind:?} is {len} bytes, over max_query_size {max}")]
    TooLarge { kind: char, len: usize, max: usize },
    #[error("{0}")]
    Server(#[from] frame::BadServerFrame),
    #[error("read-only filter: {0}")]
    Filter(#[from] crate::protocol::ProtocolError),
}

/// Why the pump stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The server reached a clean idle boundary (reported only when `stop_at_idle`).
    Idle,
    /// Completed transactions, errors or settings to report (see [`Seen`]).
    Report,
    /// The client closed its socket.
    ClientClosed,
    /// The client sent Terminate (not forwarded).
    Terminate,
    /// The server closed its socket.
    ServerClosed,
}

/// What the server stream showed since the last report.
#[derive(Debug, Default)]
pub struct Seen {
    /// ReadyForQuery messages with status idle (completed transactions).
    pub idle_ready: u32,
    /// ReadyForQuery messages of any status (a point to report counts at).
    pub ready: u32,
    /// (SQLSTATE, message) of ErrorResponses, at most [`MAX_ERRORS`].
    pub errors: Vec<(String, String)>,
    /// ParameterStatus reports.
    pub params: Vec<(String, String)>,
}

impl Seen {
    pub fn is_empty(&self) -> bool {
        self.ready == 0 && self.errors.is_empty() && self.params.is_empty()
    }
}

/// One client's pump state, kept across server checkouts.
#[derive(Default)]
pub struct Pump {
    /// Client bytes read and not yet framed.
    pub cin: BytesMut,
    /// Framed client bytes for the server.
    c2s: BytesMut,
    /// Server bytes read and not yet scanned.
    sin: BytesMut,
    /// Server bytes for the client (scanned, edited).
    s2c: BytesMut,
    /// Output of the read-only filter, reused.
    scratch: BytesMut,
    /// What the proxy does with the replies to its tagged messages (transaction mode).
    actions: Actions,
    /// Transaction mode: the client's named statements and the attached server's.
    pub stmts: Option<TxnStatements>,
    /// Something ran that may have changed session state: probe the server before handing it on.
    pub probe_due: bool,
    /// The server holds state only it has: it stays with this client (transaction mode).
    pub pinned: bool,
    /// `LOAD` ran: the server can never be proven clean again.
    pub loaded: bool,
    /// The server's `standard_conforming_strings` is off (backslashes escape in plain strings).
    pub backslash_quotes: bool,
    /// Body bytes of the current pass-through client message still to come.
    body_left: usize,
    /// Bytes `cin` must hold to complete a held message.
    need: usize,
    pub tx: TxState,
    sscan: ServerScanner,
    pub seen: Seen,
    /// Report `Event::Idle` at a clean boundary.
    pub stop_at_idle: bool,
    client_eof: bool,
    /// Last byte read from either side (idle timeouts are measured from it), kept only when `track_activity`
    /// (a clock read per read is not free).
    pub last_activity: Option<Instant>,
    pub track_activity: bool,
    /// Read-only routes: the statement filter and what it refused.
    pub ro: Option<RoFilter>,
    pub violations: Vec<Violation>,
    pub max_query_size: usize,
    /// Counts for the session: messages that run statements, bytes each way.
    pub queries: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Pump {
    pub fn new(ro: Option<RoFilter>, max_query_size: usize) -> Pump {
        Pump { ro, max_query_size, ..Default::default() }
    }

    /// A new server: its conversation starts at a boundary.
    pub fn attach(&mut self) {
        self.tx = TxState::default();
        self.sscan = ServerScanner::default();
        self.actions.clear();
        self.sin.clear();
    }

    /// Part of a client message has reached the server: it cannot be handed on.
    pub fn mid_message(&self) -> bool {
        self.body_left > 0
    }

    /// The server may go back to the pool now: nothing owed, nothing half-sent either way.
    pub fn releasable(&self) -> bool {
        self.tx.idle() && self.c2s.is_empty() && self.body_left == 0 && self.sscan.at_boundary() && self.sin.is_empty()
    }

    /// At a clean boundary where the relay wants the server back: released, or probed (pinned clients keep
    /// theirs until a statement may have ended the pin).
    fn stops_here(&self) -> bool {
        self.stop_at_idle && (!self.pinned || self.probe_due) && self.releasable()
    }

    /// Framed client bytes not yet written to the server.
    pub fn unsent(&self) -> &[u8] {
        &self.c2s
    }

    pub fn server_at_boundary(&self) -> bool {
        self.sscan.at_boundary()
    }

    /// Server bytes not yet written to the client.
    pub fn unflushed(&self) -> &[u8] {
        &self.s2c
    }

    pub fn consume_unflushed(&mut self, n: usize) {
        self.s2c.advance(n);
    }

    pub fn client_eof(&self) -> bool {
        self.client_eof
    }

    /// Whether any buffer holds memory [`Pump::shrink`] could give back.
    pub fn holds_buffers(&self) -> bool {
        [&self.cin, &self.c2s, &self.sin, &self.s2c, &self.scratch].iter().any(|b| b.is_empty() && b.capacity() > 0)
    }

    /// Give buffer memory back while the client is idle.
    pub fn shrink(&mut self) {
        for b in [&mut self.cin, &mut self.c2s, &mut self.sin, &mut self.s2c, &mut self.scratch] {
            if b.is_empty() && b.capacity() > 0 {
                *b = BytesMut::new();
            }
        }
    }

    /// Frame `bytes` as if the client had sent them, without any I/O (fuzzing and tests): appends to the
    /// input, frames what it can, and returns the framed bytes, then forgets them as sent.
    pub fn frame_bytes(&mut self, bytes: &[u8]) -> Result<(Vec<u8>, Option<Event>), PumpError> {
        self.cin.extend_from_slice(bytes);
        let mut framed = Vec::new();
        loop {
            let (moved, ev) = self.frame_client()?;
            framed.extend_from_slice(&self.c2s);
            self.c2s.clear();
            if ev.is_some() || !moved {
                return Ok((framed, ev));
            }
        }
    }

    /// The client has at least one whole header buffered: the type byte of the next message.
    pub fn next_client_kind(&self) -> Option<u8> {
        (self.cin.len() >= 5 && self.body_left == 0).then(|| self.cin[0])
    }

    /// Move framed client messages from `cin` to `c2s`. Returns `Some(Terminate)` when the client ends.
    fn frame_client(&mut self) -> Result<(bool, Option<Event>), PumpError> {
        let mut moved = false;
        loop {
            if self.body_left > 0 {
                let n = self.body_left.min(self.cin.len()).min((BUF * 2).saturating_sub(self.c2s.len()));
                if n == 0 {
                    return Ok((moved, None));
                }
                self.c2s.extend_from_slice(&self.cin[..n]);
                self.cin.advance(n);
                self.body_left -= n;
                moved = true;
                continue;
            }
            if self.c2s.len() >= BUF || self.tx.outstanding() >= MAX_OUTSTANDING || self.cin.len() < 5 {
                return Ok((moved, None));
            }
            let kind = self.cin[0];
            let len = i32::from_be_bytes([self.cin[1], self.cin[2], self.cin[3], self.cin[4]]);
            let limit = frame::client_limit(kind).ok_or(PumpError::BadType(kind as char))?;
            if len < 4 || len as usize - 4 > limit {
                return Err(PumpError::BadLength { kind: kind as char, len: len as i64 });
            }
            let body = len as usize - 4;
            let txn = self.stmts.is_some();
            let ro = self.ro.is_some() && matches!(kind, b'Q' | b'P' | b'B');
            let held = matches!(kind, b'D' | b'X')
                || ro
                || (txn
                    && match kind {
                        b'C' => true,
                        b'Q' | b'B' => body <= HOLD_MAX,
                        // A Parse is read whole to rename it, unless it is large and unnamed.
                        b'P' if body > HOLD_MAX => {
                            if self.cin.len() < 6 {
                                self.need = 6;
                                return Ok((moved, None));
                            }
                            self.cin[5] != 0
                        }
                        b'P' => true,
                        _ => false,
                    });
            if !held {
                self.need = 0;
                if matches!(kind, b'Q' | b'E' | b'F') {
                    self.queries += 1;
                }
                let mut head = 0;
                if txn && matches!(kind, b'Q' | b'P') {
                    self.probe_due = true; // too large to read: whatever it did is read off the server
                } else if txn && kind == b'B' {
                    let want = 5 + body.min(BIND_HEAD);
                    if self.cin.len() < want {
                        self.need = want;
                        return Ok((moved, None));
                    }
                    self.need = 0;
                    let cin = std::mem::take(&mut self.cin);
                    let r = self.bind_head(&cin[5..want], body);
                    self.cin = cin;
                    head = r?.unwrap_or(0);
                }
                if head > 0 {
                    self.cin.advance(5 + head);
                    self.body_left = body - head;
                } else {
                    self.c2s.extend_from_slice(&self.cin[..5]);
                    self.cin.advance(5);
                    self.body_left = body;
                    self.tx.client(kind, None);
                    rewrite::settle(&mut self.tx, &mut self.actions, self.stmts.as_mut());
                }
                moved = true;
                continue;
            }
            if body > self.max_query_size {
                return Err(PumpError::TooLarge { kind: kind as char, len: body, max: self.max_query_size });
            }
            let total = 5 + body;
            if self.cin.len() < total {
                self.need = total;
                return Ok((moved, None));
            }
            self.need = 0;
            if kind == b'X' {
                self.cin.advance(total);
                return Ok((moved, Some(Event::Terminate)));
            }
            if kind == b'Q' {
                self.queries += 1;
            }
            let cin = std::mem::take(&mut self.cin);
            let r = self.forward_held(&cin[..total], ro, txn);
            self.cin = cin;
            r?;
            self.cin.advance(total);
            moved = true;
        }
    }

    /// Forward one whole client message: through the read-only filter, then transaction mode's edits.
    fn forward_held(&mut self, msg: &[u8], ro: bool, txn: bool) -> Result<(), PumpError> {
        if ro {
            let mut out = std::mem::take(&mut self.scratch);
            out.clear();
            let f = self.ro.as_mut().expect("read-only route");
            let r = f.message(msg, &mut out, &mut self.violations).map_err(PumpError::from);
            let r = r.and_then(|()| {
                if txn {
                    self.forward_txn(&out)
                } else {
                    self.forward_plain(&out);
                    Ok(())
                }
            });
            self.scratch = out;
            return r;
        }
        if txn {
            return self.forward_txn(msg);
        }
        self.forward_plain(msg);
        Ok(())
    }

    fn forward_plain(&mut self, msg: &[u8]) {
        self.c2s.extend_from_slice(msg);
        self.tx.client(msg[0], msg.get(5).copied());
    }

    /// Scan the server bytes just read into `sin`, moving them (edited) to `s2c`.
    fn scan_server(&mut self) -> Result<(), PumpError> {
        let sin = std::mem::take(&mut self.sin);
        let mut out = std::mem::take(&mut self.s2c);
        let r = scan(self.parts(), &sin, &mut out);
        self.s2c = out;
        self.sin = sin;
        self.sin.clear();
        r
    }

    fn parts(&mut self) -> Parts<'_> {
        Parts {
            sscan: &mut self.sscan,
            tx: &mut self.tx,
            seen: &mut self.seen,
            actions: &mut self.actions,
            stmts: self.stmts.as_mut(),
            probe_due: &mut self.probe_due,
            backslash_quotes: &mut self.backslash_quotes,
        }
    }

    /// Scan server bytes that go to nobody (cleanup after the client left; fuzzing and tests).
    pub fn absorb_server(&mut self, bytes: &[u8]) -> Result<(), PumpError> {
        let seen = std::mem::take(&mut self.seen);
        let mut out = BytesMut::new();
        let r = scan(self.parts(), bytes, &mut out);
        self.seen = seen;
        r
    }

    /// Scan server bytes as if read from the server and return what the client would get (fuzzing and tests).
    pub fn feed_server(&mut self, bytes: &[u8]) -> Result<Vec<u8>, PumpError> {
        let mut out = std::mem::take(&mut self.s2c);
        let r = scan(self.parts(), bytes, &mut out);
        let got = out.to_vec();
        out.clear();
        self.s2c = out;
        r.map(|()| got)
    }

    /// Forget framed bytes that were handed to the server outside the pump.
    pub fn discard_unsent(&mut self) {
        self.c2s.clear();
    }

    /// Drive both directions until one of the [`Event`]s happens.
    pub fn poll_pump<C, S>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
        server: &mut S,
    ) -> Poll<Result<Event, PumpError>>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        S: AsyncRead + AsyncWrite + Unpin,
    {
        loop {
            let mut progress = false;
            // Client → cin.
            if !self.client_eof && self.cin.len() < BUF.max(self.need) {
                match poll_read_into(cx, client, &mut self.cin) {
                    Poll::Ready(Ok(0)) => {
                        self.client_eof = true;
                        progress = true;
                    }
                    Poll::Ready(Ok(n)) => {
                        self.bytes_in += n as u64;
                        if self.track_activity {
                            self.last_activity = Some(Instant::now());
                        }
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(PumpError::ClientIo(e))),
                    Poll::Pending => {}
                }
            }
            // cin → c2s.
            let (moved, ev) = self.frame_client()?;
            progress |= moved;
            if let Some(ev) = ev {
                return Poll::Ready(Ok(ev));
            }
            // c2s → server.
            progress |= poll_send(cx, server, &mut self.c2s).map_err(PumpError::ServerIo)?;
            // Server → sin → s2c, scanned (and edited) as it arrives.
            if self.s2c.len() < BUF {
                match poll_read_into(cx, server, &mut self.sin) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Ok(Event::ServerClosed)),
                    Poll::Ready(Ok(n)) => {
                        self.bytes_out += n as u64;
                        if self.track_activity {
                            self.last_activity = Some(Instant::now());
                        }
                        self.scan_server()?;
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(PumpError::ServerIo(e))),
                    Poll::Pending => {}
                }
            }
            // s2c → client.
            progress |= poll_send(cx, client, &mut self.s2c).map_err(PumpError::ClientIo)?;
            if self.stops_here() {
                return Poll::Ready(Ok(Event::Idle));
            }
            if !self.seen.is_empty() {
                return Poll::Ready(Ok(Event::Report));
            }
            if self.client_eof
                && if self.body_left > 0 {
                    self.cin.is_empty()
                } else {
                    self.cin.len() < 5 || self.need > self.cin.len()
                }
            {
                return Poll::Ready(Ok(Event::ClientClosed));
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// Read the client while no server is attached: true once a whole header is buffered (or EOF).
    pub fn poll_client_header<C: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
    ) -> Poll<Result<(), PumpError>> {
        self.poll_client_fill(cx, client, 5)
    }

    /// Read the client while no server is attached until `cin` holds `want` bytes (or EOF).
    pub fn poll_client_fill<C: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
        want: usize,
    ) -> Poll<Result<(), PumpError>> {
        loop {
            if self.client_eof || self.cin.len() >= want {
                return Poll::Ready(Ok(()));
            }
            match poll_read_some(cx, client, &mut self.cin) {
                Poll::Ready(Ok(0)) => self.client_eof = true,
                Poll::Ready(Ok(n)) => {
                    self.bytes_in += n as u64;
                    if self.track_activity {
                        self.last_activity = Some(Instant::now());
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(PumpError::ClientIo(e))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Write what `buf` holds, as much as the destination takes now; true when some of it went.
fn poll_send<W: AsyncWrite + Unpin>(cx: &mut Context<'_>, w: &mut W, buf: &mut BytesMut) -> std::io::Result<bool> {
    if buf.is_empty() {
        return Ok(false);
    }
    match Pin::new(w).poll_write(cx, buf) {
        Poll::Ready(Ok(0)) => Err(std::io::ErrorKind::WriteZero.into()),
        Poll::Ready(Ok(n)) => {
            buf.advance(n);
            Ok(true)
        }
        Poll::Ready(Err(e)) => Err(e),
        Poll::Pending => Ok(false),
    }
}

/// The pump's parts the server scan works on.
struct Parts<'a> {
    sscan: &'a mut ServerScanner,
    tx: &'a mut TxState,
    seen: &'a mut Seen,
    actions: &'a mut Actions,
    stmts: Option<&'a mut TxnStatements>,
    probe_due: &'a mut bool,
    backslash_quotes: &'a mut bool,
}

/// Walk server bytes into `out`: the transaction state follows every message; replies to the proxy's own
/// tagged messages are swallowed, renamed or replaced at their header; errors, idle ReadyForQuery and
/// ParameterStatus are noted for the report.
fn scan(p: Parts<'_>, bytes: &[u8], out: &mut BytesMut) -> Result<(), PumpError> {
    let Parts { sscan, tx, seen, actions, mut stmts, probe_due, backslash_quotes } = p;
    let mut replaced = false;
    sscan.feed_into(bytes, out, |ev, out| match ev {
        Scan::Header(h) => {
            replaced = false;
            let kind = h[0];
            if !matches!(kind, b'N' | b'S' | b'A') {
                match (actions.head(tx), kind) {
                    (Some(Action::Swallow { .. } | Action::Evict(_)), b'1' | b'3') => return false,
                    (Some(Action::Refuse(e)), b'E') => {
                        out.extend_from_slice(e);
                        replaced = true;
                        return false;
                    }
                    _ => {}
                }
            }
            out.extend_from_slice(&h);
            true
        }
        Scan::Message(m) => {
            let mut fatal = false;
            match m.kind {
                b'Z' => {
                    seen.ready += 1;
                    if m.first == Some(b'I') {
                        seen.idle_ready += 1;
                    }
                }
                b'E' => {
                    let (sev, code, msg) = frame::error_fields(m.body);
                    fatal = frame::is_fatal(sev);
                    if !replaced && seen.errors.len() < MAX_ERRORS {
                        seen.errors.push((code.to_owned(), msg.to_owned()));
                    }
                    if code == crate::protocol::sqlstate::FEATURE_NOT_SUPPORTED
                        && msg.starts_with("cached plan must not change result type")
                    {
                        if let (Some(Action::Bind(stmt)), Some(s)) = (actions.head(tx), stmts.as_deref_mut()) {
                            // The server keeps the stale plan (and fails on it, as direct); new Parses of the
                            // text get a fresh statement.
                            s.registry.retire(stmt);
                        }
                    }
                }
                b'S' if !m.truncated => {
                    *probe_due = true;
                    let mut parts = m.body.split(|c| *c == 0);
                    if let (Some(k), Some(v)) = (parts.next(), parts.next()) {
                        if k == b"standard_conforming_strings" {
                            *backslash_quotes = v == b"off";
                        }
                        if seen.params.len() < 64 {
                            seen.params.push((
                                String::from_utf8_lossy(k).into_owned(),
                                String::from_utf8_lossy(v).into_owned(),
                            ));
                        }
                    }
                }
                _ => {}
            }
            tx.server(m.kind, m.first, fatal);
            rewrite::settle(tx, actions, stmts.as_deref_mut());
            false
        }
    })?;
    Ok(())
}

/// Read into the spare capacity of `buf`, reserving one [`BUF`] chunk when it has little room (so a buffer
/// grows only as bytes arrive).
fn poll_read_into<R: AsyncRead + Unpin>(
    cx: &mut Context<'_>,
    r: &mut R,
    buf: &mut BytesMut,
) -> Poll<std::io::Result<usize>> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(BUF);
    }
    poll_read_some(cx, r, buf)
}

/// Read into whatever spare capacity `buf` has (at least [`FIRST_READ`] bytes).
fn poll_read_some<R: AsyncRead + Unpin>(
    cx: &mut Context<'_>,
    r: &mut R,
    buf: &mut BytesMut,
) -> Poll<std::io::Result<usize>> {
    if buf.capacity() == buf.len() {
        buf.reserve(FIRST_READ);
    }
    tokio_util::io::poll_read_buf(Pin::new(r), cx, buf)
}
