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

use super::frame::{self, ServerScanner};
use super::txstate::{TxState, MAX_OUTSTANDING};
use crate::read_only::filter::{RoFilter, Violation};
use bytes::{Buf, BytesMut};
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
    /// Server bytes for the client (already scanned).
    s2c: BytesMut,
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
    }

    /// Part of a client message has reached the server: it cannot be handed on.
    pub fn mid_message(&self) -> bool {
        self.body_left > 0
    }

    /// The server may go back to the pool now: nothing owed, nothing half-sent either way.
    pub fn releasable(&self) -> bool {
        self.tx.idle() && self.c2s.is_empty() && self.body_left == 0 && self.sscan.at_boundary()
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
        [&self.cin, &self.c2s, &self.s2c].iter().any(|b| b.is_empty() && b.capacity() > 0)
    }

    /// Give buffer memory back while the client is idle.
    pub fn shrink(&mut self) {
        for b in [&mut self.cin, &mut self.c2s, &mut self.s2c] {
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
            let held = matches!(kind, b'D' | b'X') || (self.ro.is_some() && matches!(kind, b'Q' | b'P' | b'B'));
            if !held {
                if matches!(kind, b'Q' | b'E' | b'F') {
                    self.queries += 1;
                }
                self.c2s.extend_from_slice(&self.cin[..5]);
                self.cin.advance(5);
                self.body_left = body;
                self.tx.client(kind, None);
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
            let first = self.cin.get(5).copied();
            match (&mut self.ro, kind) {
                (Some(f), b'Q' | b'P' | b'B') => f.message(&self.cin[..total], &mut self.c2s, &mut self.violations)?,
                _ => self.c2s.extend_from_slice(&self.cin[..total]),
            }
            if kind == b'Q' {
                self.queries += 1;
            }
            self.cin.advance(total);
            self.tx.client(kind, first);
            moved = true;
        }
    }

    /// Scan server bytes just read (the tail of `s2c` from `from`).
    fn scan_server(&mut self, from: usize) -> Result<(), PumpError> {
        scan(&mut self.sscan, &mut self.tx, &mut self.seen, &self.s2c[from..])
    }

    /// Scan server bytes that go to nobody (cleanup after the client left; fuzzing and tests).
    pub fn absorb_server(&mut self, bytes: &[u8]) -> Result<(), PumpError> {
        let mut seen = Seen::default();
        scan(&mut self.sscan, &mut self.tx, &mut seen, bytes)
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
            // Server → s2c, scanned as it arrives.
            if self.s2c.len() < BUF {
                let from = self.s2c.len();
                match poll_read_into(cx, server, &mut self.s2c) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Ok(Event::ServerClosed)),
                    Poll::Ready(Ok(n)) => {
                        self.bytes_out += n as u64;
                        if self.track_activity {
                            self.last_activity = Some(Instant::now());
                        }
                        self.scan_server(from)?;
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(PumpError::ServerIo(e))),
                    Poll::Pending => {}
                }
            }
            // s2c → client.
            progress |= poll_send(cx, client, &mut self.s2c).map_err(PumpError::ClientIo)?;
            if self.stop_at_idle && self.releasable() {
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
        loop {
            if self.client_eof || self.cin.len() >= 5 {
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

/// Walk server bytes: the transaction state follows every message; errors, idle ReadyForQuery and
/// ParameterStatus are noted for the report.
fn scan(sscan: &mut ServerScanner, tx: &mut TxState, seen: &mut Seen, bytes: &[u8]) -> Result<(), PumpError> {
    sscan.feed(bytes, |m| {
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
                if seen.errors.len() < MAX_ERRORS {
                    seen.errors.push((code.to_owned(), msg.to_owned()));
                }
            }
            b'S' if !m.truncated => {
                let mut parts = m.body.split(|c| *c == 0);
                if let (Some(k), Some(v)) = (parts.next(), parts.next()) {
                    if seen.params.len() < 64 {
                        seen.params
                            .push((String::from_utf8_lossy(k).into_owned(), String::from_utf8_lossy(v).into_owned()));
                    }
                }
            }
            _ => {}
        }
        tx.server(m.kind, m.first, fatal);
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
