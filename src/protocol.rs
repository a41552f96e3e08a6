//! Postgres v3 wire framing: startup packets, 5-byte-header message reading, and the few messages the proxy builds itself.
//!
//! The hot path never decodes a message body it does not act on: [`Scanner`] walks a byte chunk by
//! message headers and reports only the message types, so chunks are forwarded as they were read.

use bytes::{Buf, BufMut, BytesMut};
use std::collections::BTreeMap;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Protocol version 3.0 as sent in a StartupMessage.
pub const PROTOCOL_V3: i32 = 196_608;
/// Request codes that share the startup packet layout.
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;
/// Largest startup packet we accept (Postgres uses 10000 too).
pub const MAX_STARTUP_LEN: usize = 10_000;
/// Largest single message we buffer whole when we must decode it (auth exchanges, ParameterStatus).
pub const MAX_DECODED_LEN: usize = 1 << 20;

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

/// The first packet a client sends.
#[derive(Debug)]
pub enum StartupPacket {
    Ssl,
    GssEnc,
    Cancel { pid: i32, secret: i32 },
    Startup(Startup),
}

/// A decoded StartupMessage: its parameters in the order given.
#[derive(Debug, Clone, Default)]
pub struct Startup {
    pub params: BTreeMap<String, String>,
}

impl Startup {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }
    pub fn user(&self) -> &str {
        self.get("user").unwrap_or("")
    }
    /// Database defaults to the user name, as in Postgres.
    pub fn database(&self) -> &str {
        self.get("database").unwrap_or_else(|| self.user())
    }
}

/// Read one startup-layout packet (no type byte).
pub async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> Result<StartupPacket, ProtocolError> {
    let len = r.read_i32().await? as usize;
    if !(8..=MAX_STARTUP_LEN).contains(&len) {
        return Err(ProtocolError::StartupLength(len));
    }
    let mut body = vec![0u8; len - 4];
    r.read_exact(&mut body).await?;
    let mut b = &body[..];
    let code = b.get_i32();
    match code {
        SSL_REQUEST => Ok(StartupPacket::Ssl),
        GSSENC_REQUEST => Ok(StartupPacket::GssEnc),
        CANCEL_REQUEST if b.len() >= 8 => {
            let pid = b.get_i32();
            let secret = b.get_i32();
            Ok(StartupPacket::Cancel { pid, secret })
        }
        CANCEL_REQUEST => Err(ProtocolError::Malformed("CancelRequest")),
        PROTOCOL_V3 => {
            let mut params = BTreeMap::new();
            let mut parts = b.split(|c| *c == 0);
            while let Some(k) = parts.next() {
                if k.is_empty() {
                    break;
                }
                let v = parts.next().ok_or(ProtocolError::Malformed("StartupMessage"))?;
                params.insert(utf8(k)?, utf8(v)?);
            }
            Ok(StartupPacket::Startup(Startup { params }))
        }
        v => Err(ProtocolError::Version { major: v >> 16, minor: v & 0xffff }),
    }
}

fn utf8(b: &[u8]) -> Result<String, ProtocolError> {
    String::from_utf8(b.to_vec()).map_err(|_| ProtocolError::Malformed("StartupMessage"))
}

/// Read one whole typed message into `buf` (cleared first); returns its type byte.
/// Used only off the hot path (authentication, server startup, reset).
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut) -> Result<u8, ProtocolError> {
    let kind = r.read_u8().await?;
    let len = r.read_i32().await?;
    if len < 4 || len as usize > MAX_DECODED_LEN {
        return Err(ProtocolError::Length { kind: kind as char, len: len.max(0) as usize });
    }
    buf.clear();
    buf.resize(len as usize - 4, 0);
    r.read_exact(&mut buf[..]).await?;
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

/// Parse a ParameterStatus body into (name, value).
pub fn parse_parameter_status(body: &[u8]) -> Result<(String, String), ProtocolError> {
    let mut b = body;
    let k = cstr(&mut b)?.to_owned();
    let v = cstr(&mut b)?.to_owned();
    Ok((k, v))
}

/// Fields of an ErrorResponse/NoticeResponse body: (severity, code, message).
pub fn parse_error_fields(body: &[u8]) -> (String, String, String) {
    let (mut sev, mut code, mut msg) = (String::new(), String::new(), String::new());
    let mut b = body;
    while let Some((&tag, rest)) = b.split_first() {
        if tag == 0 {
            break;
        }
        b = rest;
        let Ok(v) = cstr(&mut b) else { break };
        match tag {
            b'V' => sev = v.to_owned(),
            b'S' if sev.is_empty() => sev = v.to_owned(),
            b'C' => code = v.to_owned(),
            b'M' => msg = v.to_owned(),
            _ => {}
        }
    }
    (sev, code, msg)
}

/// Incremental header scanner over a byte stream: reports each message's type byte and, for
/// the types the caller asks to see, its whole body. Bodies of other messages are skipped
/// without copying, however they are split across reads.
#[derive(Debug, Default)]
pub struct Scanner {
    header: [u8; 5],
    header_len: usize,
    /// Bytes of the current message body not yet seen.
    remaining: usize,
    kind: u8,
    /// Whether the current body is being captured into `body`.
    capturing: bool,
    body: Vec<u8>,
}

/// What the scanner found in a chunk.
pub enum Event<'a> {
    /// A message header was completed; `kind` is its type byte, `at` the chunk offset just past the header.
    Start { kind: u8, len: usize, at: usize },
    /// A captured message is complete.
    Body { kind: u8, body: &'a [u8] },
}

impl Scanner {
    /// True when the stream is at a message boundary.
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.remaining == 0 && !self.capturing
    }

    /// Walk `chunk`, calling `on` for each event. `capture(kind)` selects bodies to decode.
    pub fn feed<E>(
        &mut self,
        chunk_in: &[u8],
        capture: impl Fn(u8) -> bool,
        mut on: impl FnMut(Event<'_>) -> Result<(), E>,
    ) -> Result<(), E>
    where
        E: From<ProtocolError>,
    {
        let mut chunk = chunk_in;
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(chunk.len());
                if self.capturing {
                    self.body.extend_from_slice(&chunk[..n]);
                }
                self.remaining -= n;
                chunk = &chunk[n..];
                if self.remaining == 0 && self.capturing {
                    self.capturing = false;
                    on(Event::Body { kind: self.kind, body: &self.body })?;
                }
                continue;
            }
            let need = 5 - self.header_len;
            let n = need.min(chunk.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&chunk[..n]);
            self.header_len += n;
            chunk = &chunk[n..];
            if self.header_len < 5 {
                break;
            }
            self.header_len = 0;
            self.kind = self.header[0];
            let len = i32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]);
            if len < 4 {
                return Err(ProtocolError::Length { kind: self.kind as char, len: len.max(0) as usize }.into());
            }
            let body_len = len as usize - 4;
            on(Event::Start { kind: self.kind, len: body_len, at: chunk_in.len() - chunk.len() })?;
            self.remaining = body_len;
            if capture(self.kind) {
                if body_len > MAX_DECODED_LEN {
                    return Err(ProtocolError::Length { kind: self.kind as char, len: body_len }.into());
                }
                self.body.clear();
                self.capturing = true;
                if body_len == 0 {
                    self.capturing = false;
                    on(Event::Body { kind: self.kind, body: &[] })?;
                }
            }
        }
        Ok(())
    }
}

/// Quote a string as an SQL literal (standard_conforming_strings on).
pub fn quote_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push('\'');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(chunks: &[&[u8]]) -> Vec<(u8, Option<Vec<u8>>)> {
        let mut s = Scanner::default();
        let mut out = Vec::new();
        for c in chunks {
            s.feed::<ProtocolError>(
                c,
                |k| k == b'Z',
                |e| {
                    match e {
                        Event::Start { kind, .. } => out.push((kind, None)),
                        Event::Body { body, .. } => out.last_mut().unwrap().1 = Some(body.to_vec()),
                    }
                    Ok(())
                },
            )
            .unwrap();
        }
        assert!(s.at_boundary());
        out
    }

    #[test]
    fn scanner_handles_any_split() {
        let mut stream = BytesMut::new();
        simple_query(&mut stream, "select 1");
        ready_for_query(&mut stream, b'T');
        parameter_status(&mut stream, "TimeZone", "UTC");
        ready_for_query(&mut stream, b'I');
        let whole = frames(&[&stream]);
        assert_eq!(whole.len(), 4);
        assert_eq!(whole[1], (b'Z', Some(vec![b'T'])));
        assert_eq!(whole[3], (b'Z', Some(vec![b'I'])));
        for cut in 1..stream.len() {
            for cut2 in cut..stream.len() {
                let parts = frames(&[&stream[..cut], &stream[cut..cut2], &stream[cut2..]]);
                assert_eq!(parts, whole, "split at {cut},{cut2}");
            }
        }
    }

    #[test]
    fn scanner_rejects_bad_length() {
        let mut s = Scanner::default();
        let r = s.feed::<ProtocolError>(&[b'Q', 0, 0, 0, 2], |_| false, |_| Ok(()));
        assert!(matches!(r, Err(ProtocolError::Length { .. })));
    }

    #[test]
    fn error_fields_round_trip() {
        let mut b = BytesMut::new();
        error_response(&mut b, Severity::Fatal, "53300", "too many", Some("d"));
        assert_eq!(b[0], b'E');
        let (sev, code, msg) = parse_error_fields(&b[5..]);
        assert_eq!((sev.as_str(), code.as_str(), msg.as_str()), ("FATAL", "53300", "too many"));
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
