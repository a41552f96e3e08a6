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
use super::txstate::TxState;
use crate::read_only::filter::{RoFilter, Violation};
use bytes::{Buf, BytesMut};
use rewrite::Actions;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite};

/// Buffer size per direction; buffers are allocated on demand and given back when idle.
pub const BUF: usize = 16 * 1024;
/// What a read reserves at first; each read that fills what it was given doubles it, up to [`BUF`]: short
/// statements and replies (most transactions) never hold a full chunk per direction, a stream reaches full
/// reads after a few.
const READ_MIN: usize = 2 * 1024;
/// What an idle client's first read takes: its buffers are given back while it idles, and a short
/// statement fits here without a full [`BUF`].
const FIRST_READ: usize = 512;
/// Bytes written one way after which the other way's source is read again in the same poll, though it was
/// found empty earlier in it.
const FAIR: usize = BUF;
/// Client bytes a server may be sent while it owes replies and has sent nothing since the last: past it
/// (at a message boundary) the client is read no further until the server answers, so a client streaming
/// a batch is held back by a busy server about as a direct connection would hold it (a driver then sees an
/// early error while it still sends, and stops). Halfway, a Flush asks for replies Postgres holds back in
/// an extended batch; the window never applies where nothing will answer (COPY FROM STDIN, a skip to
/// Sync) or inside one message.
const WINDOW: usize = 256 * 1024;
/// The Flush the window sends: a message without a reply of its own.
const FLUSH: [u8; 5] = [b'H', 0, 0, 0, 4];
/// Error records kept per report (more are counted, not kept).
const MAX_ERRORS: usize = 16;
/// Transaction mode reads a Query, Parse or Bind up to this size whole (to see what it does and rename
/// statements); a larger one streams, and the server is probed after it.
const HOLD_MAX: usize = 64 * 1024;
/// Most of a streamed Bind's head held to find its portal and statement names.
const BIND_HEAD: usize = 4096;

mod errors;
mod execute;
mod framing;
mod io;
use io::{poll_read_into, poll_read_some, poll_send};
pub mod rewrite;
mod scan;
pub use rewrite::TxnStatements;
pub use scan::name_senders;

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
    /// (SQLSTATE, message) of ErrorResponses, at most `MAX_ERRORS`.
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
    /// What the next read from each side reserves when its buffer has little room (0: [`READ_MIN`]).
    client_chunk: usize,
    server_chunk: usize,
    /// Output of the read-only filter, reused.
    scratch: BytesMut,
    /// What the proxy does with the replies to its tagged messages (transaction mode).
    actions: Actions,
    /// Transaction mode: the client's named statements and the attached server's.
    pub stmts: Option<Box<TxnStatements>>,
    /// Something ran that may have changed session state: probe the server before handing it on.
    pub probe_due: bool,
    /// The server holds state only it has: it stays with this client (transaction mode).
    pub pinned: bool,
    /// `LOAD` ran: the server can never be proven clean again.
    pub loaded: bool,
    /// The server's `standard_conforming_strings` is off (backslashes escape in plain strings).
    pub backslash_quotes: bool,
    /// The last Parse text classified, and the last simple-Query text the first look cleared (transaction
    /// mode).
    pub(super) parse_memo: crate::relay::classify::Memo,
    pub(super) query_memo: crate::relay::classify::PlainMemo,
    /// Transaction mode: the client listens (or may have just started to), so NotificationResponses may
    /// come; their sender's pid is rewritten to the cancel-key pid its client knows (`servers`).
    pub listening: bool,
    pub servers: Option<crate::server::ServerList>,
    /// A server ErrorResponse is being held back to its end, to name the client's statements ([`errors`]).
    error_held: bool,
    /// Body bytes of the current pass-through client message still to come.
    body_left: usize,
    /// Client bytes written to the server since its last bytes came, and whether a Flush went since
    /// ([`WINDOW`]).
    unanswered: usize,
    flush_asked: bool,
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
        self.tx.reset();
        self.sscan.reset();
        self.actions.clear();
        self.sin.clear();
        self.error_held = false;
        self.unanswered = 0;
        self.flush_asked = false;
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

    /// Whether the client is held back for the server's answer ([`WINDOW`]); asks for it with a Flush once.
    /// Where nothing will answer, the window starts over instead.
    fn held_for_answer(&mut self) -> bool {
        let tx = &self.tx;
        if tx.copy_in() || tx.skipping() || tx.uncertain() || tx.outstanding() == 0 {
            self.unanswered = 0;
            return false;
        }
        if !self.flush_asked {
            self.c2s.extend_from_slice(&FLUSH);
            self.flush_asked = true;
        }
        self.unanswered >= WINDOW
    }

    /// Server bytes not yet written to the client.
    pub fn unflushed(&self) -> &[u8] {
        &self.s2c
    }

    /// Bytes for the client from outside the pump (notifications that arrived during the proxy's own
    /// statements), queued at a message boundary.
    pub fn queue_for_client(&mut self, bytes: &[u8]) {
        self.s2c.extend_from_slice(bytes);
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
            || self.tx.holds_buffers()
            || self.sscan.holds_buffer()
            || self.parse_memo.holds_buffer()
            || self.query_memo.holds_buffer()
    }

    /// The memory the pump's byte buffers hold now (their capacities).
    pub fn buffer_capacity(&self) -> usize {
        [&self.cin, &self.c2s, &self.sin, &self.s2c, &self.scratch].iter().map(|b| b.capacity()).sum()
    }

    /// Give buffer memory back while the client is idle.
    pub fn shrink(&mut self) {
        for b in [&mut self.cin, &mut self.c2s, &mut self.sin, &mut self.s2c, &mut self.scratch] {
            if b.is_empty() && b.capacity() > 0 {
                *b = BytesMut::new();
            }
        }
        self.client_chunk = 0;
        self.server_chunk = 0;
        self.tx.shrink();
        self.sscan.shrink();
        self.parse_memo.shrink();
        self.query_memo.shrink();
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

    /// The bytes `cin` must hold before the pump can take the next message, when it has begun one it reads
    /// whole and not all of it is here.
    pub fn incomplete(&self) -> Option<usize> {
        (self.body_left == 0 && self.need > self.cin.len()).then_some(self.need)
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
        // A socket that returned Pending in this call has this task's waker registered: polled again before
        // the wake it would return Pending again (each such poll is a trip through tokio's readiness lock).
        // So it is skipped for the rest of the call, but only until [`FAIR`] bytes went the other way since:
        // a stream one way (a client streaming a large batch) must not hold back what has arrived the other
        // way meanwhile (the server's error that would stop the batch early).
        let (mut client_waits, mut server_waits) = (false, false);
        let (mut to_server, mut to_client) = (0usize, 0usize);
        loop {
            if server_waits && to_server >= FAIR {
                server_waits = false;
            }
            if client_waits && to_client >= FAIR {
                client_waits = false;
            }
            let mut progress = false;
            // Client → cin.
            if !self.client_eof && !client_waits && self.cin.len() < BUF.max(self.need) {
                match poll_read_into(cx, client, &mut self.cin, &mut self.client_chunk) {
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
                    Poll::Pending => {
                        client_waits = true;
                        to_client = 0;
                    }
                }
            }
            // cin → c2s.
            let (moved, ev) = self.frame_client()?;
            progress |= moved;
            if let Some(ev) = ev {
                return Poll::Ready(Ok(ev));
            }
            // c2s → server.
            let sent = poll_send(cx, server, &mut self.c2s).map_err(PumpError::ServerIo)?;
            self.unanswered += sent;
            to_server += sent;
            progress |= sent > 0;
            // Server → s2c, scanned as it arrives; through sin (and edited) while replies to the proxy's own
            // messages are owed.
            if !server_waits && self.s2c.len() < BUF {
                let copies = self.scan_copies();
                let from = self.s2c.len();
                let into = if copies { &mut self.sin } else { &mut self.s2c };
                match poll_read_into(cx, server, into, &mut self.server_chunk) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Ok(Event::ServerClosed)),
                    Poll::Ready(Ok(n)) => {
                        self.bytes_out += n as u64;
                        self.unanswered = 0;
                        self.flush_asked = false;
                        if self.track_activity {
                            self.last_activity = Some(Instant::now());
                        }
                        self.scan_read(copies, from)?;
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(PumpError::ServerIo(e))),
                    Poll::Pending => {
                        server_waits = true;
                        to_server = 0;
                    }
                }
            }
            // s2c → client.
            let sent = poll_send(cx, client, &mut self.s2c).map_err(PumpError::ClientIo)?;
            to_client += sent;
            progress |= sent > 0;
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

    /// While a checkout waits for a server: read what the client sends meanwhile (kept for later, up to
    /// [`BUF`] bytes; past that it waits in the client's socket). Ready after each read and at EOF.
    pub fn poll_client_watch<C: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
    ) -> Poll<Result<(), PumpError>> {
        if self.client_eof || self.cin.len() >= BUF {
            return Poll::Pending;
        }
        match poll_read_some(cx, client, &mut self.cin) {
            Poll::Ready(Ok(0)) => self.client_eof = true,
            Poll::Ready(Ok(n)) => self.bytes_in += n as u64,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(PumpError::ClientIo(e))),
            Poll::Pending => return Poll::Pending,
        }
        Poll::Ready(Ok(()))
    }
}
