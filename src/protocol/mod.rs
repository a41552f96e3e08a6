//! The Postgres v3 wire format off the hot path: constants, the few messages the proxy builds itself, whole-message
//! reads for logins and the proxy's own statements, client startup packets (`startup`), and decoding of the
//! server messages the proxy acts on (`backend`, with the `pgwire` crate's message types).
//!
//! The hot path does not come through here: the relay frames client bytes by their 5-byte header and scans
//! server bytes incrementally (`relay::frame`), decoding only a bounded prefix of the bodies it acts on.

pub mod backend;
pub mod sqlstate;
pub mod startup;

pub use startup::{negotiate_protocol_version, negotiation, read_startup, read_startup_into, Startup, StartupPacket};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Protocol version 3.0 as sent in a StartupMessage.
pub const PROTOCOL_V3: i32 = 196_608;
/// Request codes that share the startup packet layout.
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;
/// Newest 3.x minor version the proxy speaks; a client asking for more is told so (NegotiateProtocolVersion).
pub const NEWEST_MINOR: i32 = 0;
/// Largest declared length (length word included) of any client message before authentication completes,
/// the startup packet included. Nothing an unauthenticated client sends may cost more memory than this.
pub const MAX_PREAUTH_LEN: usize = 8192;
/// Largest message Postgres accepts from a client (`PQ_LARGE_MESSAGE_LIMIT`).
pub const LARGE_MESSAGE: usize = (1 << 30) - 1;
/// Largest single server message (or post-login console message) we buffer whole when we must decode it.
pub const MAX_DECODED_LEN: usize = 1 << 20;
/// Most bytes one incremental read asks for, so a buffer grows only as bytes actually arrive.
pub(crate) const READ_CHUNK: usize = 1024;

/// Errors while framing or decoding protocol messages.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid startup packet length {0}")]
    StartupLength(usize),
    #[error("unsupported protocol version {major}.{minor}")]
    Version { major: i32, minor: i32 },
    #[error("invalid message length {len} for message type {kind:?}")]
    Length { kind: char, len: usize },
    #[error("malformed {0} message")]
    Malformed(&'static str),
    #[error("expected {expected} message, got {got:?}")]
    Unexpected { expected: &'static str, got: char },
}

/// Append exactly `n` bytes from `r` to `buf`, reading at most [`READ_CHUNK`] at a time, so the buffer
/// grows with the bytes that arrived rather than with what a peer declared it would send.
pub(crate) async fn read_incremental<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    n: usize,
) -> std::io::Result<()> {
    let target = buf.len() + n;
    while buf.len() < target {
        let want = (target - buf.len()).min(READ_CHUNK);
        if buf.capacity() - buf.len() < want {
            // Grow by doubling but never past the message's own end: `BytesMut::reserve` may double beyond
            // it (a reused buffer of odd capacity reached twice MAX_PREAUTH_LEN; found by the auth fuzz target).
            let cap = (buf.capacity() * 2).max(buf.len() + want).min(target.max(buf.len() + want));
            let mut grown = BytesMut::with_capacity(cap);
            grown.extend_from_slice(buf);
            *buf = grown;
        }
        if (&mut *r).take(want as u64).read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

/// Read one whole typed message from a server into `buf` (cleared first); returns its type byte.
/// Used only off the hot path (server startup, reset, the logged-in console); bodies up to
/// [`MAX_DECODED_LEN`], buffered as they arrive.
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut) -> Result<u8, ProtocolError> {
    read_message_capped(r, buf, MAX_DECODED_LEN).await
}

/// Read one whole typed message from a client that has not authenticated yet (password, SASL):
/// a declared length over [`MAX_PREAUTH_LEN`] is refused unread; the body is buffered as it arrives.
pub async fn read_client_message<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut) -> Result<u8, ProtocolError> {
    read_message_capped(r, buf, MAX_PREAUTH_LEN).await
}

async fn read_message_capped<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    cap: usize,
) -> Result<u8, ProtocolError> {
    let kind = r.read_u8().await?;
    let len = usize::try_from(r.read_i32().await?).unwrap_or(0);
    if len < 4 || len > cap {
        return Err(ProtocolError::Length { kind: kind as char, len });
    }
    buf.clear();
    read_incremental(r, buf, len - 4).await?;
    Ok(kind)
}

/// Read a NUL-terminated string from the front of `b`.
pub fn cstr<'a>(b: &mut &'a [u8]) -> Result<&'a str, ProtocolError> {
    let end = b.iter().position(|c| *c == 0).ok_or(ProtocolError::Malformed("string"))?;
    let s = std::str::from_utf8(&b[..end]).map_err(|_| ProtocolError::Malformed("string"))?;
    *b = &b[end + 1..];
    Ok(s)
}

/// Start a typed message; returns the offset of its length field for [`finish`].
pub fn begin(out: &mut BytesMut, kind: u8) -> usize {
    out.put_u8(kind);
    let at = out.len();
    out.put_i32(0);
    at
}

/// Patch the length of a message started with [`begin`].
pub fn finish(out: &mut BytesMut, at: usize) {
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn put_cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

/// Severity of an ErrorResponse / NoticeResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
    Notice,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Notice => "NOTICE",
        }
    }
}

/// Append an ErrorResponse (or NoticeResponse for [`Severity::Notice`]).
pub fn error_response(out: &mut BytesMut, severity: Severity, code: &str, message: &str, detail: Option<&str>) {
    let kind = if severity == Severity::Notice { b'N' } else { b'E' };
    let at = begin(out, kind);
    for tag in [b'S', b'V'] {
        out.put_u8(tag);
        put_cstr(out, severity.as_str());
    }
    out.put_u8(b'C');
    put_cstr(out, code);
    out.put_u8(b'M');
    put_cstr(out, message);
    if let Some(d) = detail {
        out.put_u8(b'D');
        put_cstr(out, d);
    }
    out.put_u8(0);
    finish(out, at);
}

/// Append a CommandComplete with `tag`.
pub fn command_complete(out: &mut BytesMut, tag: &str) {
    let at = begin(out, b'C');
    put_cstr(out, tag);
    finish(out, at);
}

pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    out.put_slice(&[b'Z', 0, 0, 0, 5, status]);
}

pub fn parameter_status(out: &mut BytesMut, key: &str, value: &str) {
    let at = begin(out, b'S');
    put_cstr(out, key);
    put_cstr(out, value);
    finish(out, at);
}

pub fn backend_key_data(out: &mut BytesMut, pid: i32, secret: i32) {
    let at = begin(out, b'K');
    out.put_i32(pid);
    out.put_i32(secret);
    finish(out, at);
}

/// Authentication request: `code` plus an optional payload (salt, SASL data).
pub fn auth_request(out: &mut BytesMut, code: i32, payload: &[u8]) {
    let at = begin(out, b'R');
    out.put_i32(code);
    out.put_slice(payload);
    finish(out, at);
}

pub fn simple_query(out: &mut BytesMut, sql: &str) {
    let at = begin(out, b'Q');
    put_cstr(out, sql);
    finish(out, at);
}

pub const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

/// Parse of statement `name` (`""`: the unnamed one), parameter types left to the server.
pub fn parse(out: &mut BytesMut, name: &str, sql: &str) {
    let at = begin(out, b'P');
    put_cstr(out, name);
    put_cstr(out, sql);
    out.put_i16(0);
    finish(out, at);
}

/// Bind of the unnamed portal to statement `name`, `params` in text, results in text.
pub fn bind_text(out: &mut BytesMut, name: &str, params: &[&str]) {
    let at = begin(out, b'B');
    out.put_u8(0); // portal ""
    put_cstr(out, name);
    out.put_i16(0); // text parameters
    out.put_i16(params.len() as i16);
    for p in params {
        out.put_i32(p.len() as i32);
        out.put_slice(p.as_bytes());
    }
    out.put_i16(0); // text results
    finish(out, at);
}

/// Execute of the unnamed portal, every row.
pub fn execute(out: &mut BytesMut) {
    out.put_slice(&[b'E', 0, 0, 0, 9, 0, 0, 0, 0, 0]);
}

/// Close of statement `name`.
pub fn close_statement(out: &mut BytesMut, name: &str) {
    let at = begin(out, b'C');
    out.put_u8(b'S');
    put_cstr(out, name);
    finish(out, at);
}

pub fn sync(out: &mut BytesMut) {
    out.put_slice(&[b'S', 0, 0, 0, 4]);
}

/// Quote a string as an SQL literal that reads the same whatever `standard_conforming_strings` is: an `E'...'`
/// escape string with `\\` and `''` doubled, so no session setting a client left behind can end it early.
pub fn quote_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 3);
    out.push_str("E'");
    for c in s.chars() {
        if c == '\'' || c == '\\' {
            out.push(c);
        }
        out.push(c);
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_literal("it's"), "E'it''s'");
        assert_eq!(quote_literal("a\\'b"), "E'a\\\\''b'");
    }
}
