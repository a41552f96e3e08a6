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
/// Newest 3.x minor version the proxy speaks; a client asking for more is told so (NegotiateProtocolVersion).
pub const NEWEST_MINOR: i32 = 0;
/// Largest declared length (length word included) of any client message before authentication completes,
/// the startup packet included. Nothing an unauthenticated client sends may cost more memory than this.
pub const MAX_PREAUTH_LEN: usize = 8192;
/// Largest single server message (or post-login console message) we buffer whole when we must decode it.
pub const MAX_DECODED_LEN: usize = 1 << 20;
/// Most bytes one incremental read asks for, so a buffer grows only as bytes actually arrive.
const READ_CHUNK: usize = 1024;

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
    Cancel {
        pid: i32,
        secret: i32,
    },
    /// A StartupMessage of protocol 3.`minor` (any minor; the session goes on in 3.0).
    Startup {
        startup: Startup,
        minor: i32,
    },
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

/// Read one startup-layout packet (no type byte) from a client.
pub async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> Result<StartupPacket, ProtocolError> {
    let mut body = BytesMut::new();
    read_startup_into(r, &mut body).await
}

/// [`read_startup`] into a caller's buffer (cleared first), which grows only as the packet's bytes
/// arrive, never by the declared length; a declared length over [`MAX_PREAUTH_LEN`] is refused unread.
pub async fn read_startup_into<R: AsyncRead + Unpin>(
    r: &mut R,
    body: &mut BytesMut,
) -> Result<StartupPacket, ProtocolError> {
    let len = r.read_i32().await?;
    let len = usize::try_from(len).unwrap_or(0);
    if !(8..=MAX_PREAUTH_LEN).contains(&len) {
        return Err(ProtocolError::StartupLength(len));
    }
    body.clear();
    read_incremental(r, body, len - 4).await?;
    parse_startup(body)
}

/// Decode a startup-layout packet body (after the length word).
fn parse_startup(body: &[u8]) -> Result<StartupPacket, ProtocolError> {
    let mut b = body;
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
        v if v >> 16 == 3 => {
            let mut params = BTreeMap::new();
            let mut parts = b.split(|c| *c == 0);
            while let Some(k) = parts.next() {
                if k.is_empty() {
                    break;
                }
                let v = parts.next().ok_or(ProtocolError::Malformed("StartupMessage"))?;
                params.insert(utf8(k)?, utf8(v)?);
            }
            Ok(StartupPacket::Startup { startup: Startup { params }, minor: v & 0xffff })
        }
        v => Err(ProtocolError::Version { major: v >> 16, minor: v & 0xffff }),
    }
}

fn utf8(b: &[u8]) -> Result<String, ProtocolError> {
    String::from_utf8(b.to_vec()).map_err(|_| ProtocolError::Malformed("StartupMessage"))
}

/// Append exactly `n` bytes from `r` to `buf`, reading at most [`READ_CHUNK`] at a time, so the buffer
/// grows with the bytes that arrived rather than with what a peer declared it would send.
async fn read_incremental<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut, n: usize) -> std::io::Result<()> {
    let target = buf.len() + n;
    while buf.len() < target {
        let want = (target - buf.len()).min(READ_CHUNK);
        buf.reserve(want);
        if (&mut *r).take(want as u64).read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

/// The NegotiateProtocolVersion a client must get before anything else, if it asked for a minor version
/// newer than [`NEWEST_MINOR`] or sent `_pq_.` protocol options (none of which the proxy knows).
pub fn negotiation(startup: &Startup, minor: i32) -> Option<BytesMut> {
    let unknown: Vec<&str> = startup.params.keys().map(String::as_str).filter(|k| k.starts_with("_pq_.")).collect();
    if minor <= NEWEST_MINOR && unknown.is_empty() {
        return None;
    }
    let mut out = BytesMut::new();
    // Like Postgres (and as libpq 17+ checks), the field carries the whole version number 3.0, not the bare minor.
    negotiate_protocol_version(&mut out, PROTOCOL_V3 | NEWEST_MINOR, &unknown);
    Some(out)
}

/// NegotiateProtocolVersion: the newest version supported (major << 16 | minor), then the protocol options
/// not recognised.
pub fn negotiate_protocol_version(out: &mut BytesMut, newest: i32, unrecognized: &[&str]) {
    let at = begin(out, b'v');
    out.put_i32(newest);
    out.put_i32(unrecognized.len() as i32);
    for o in unrecognized {
        put_cstr(out, o);
    }
    finish(out, at);
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

    fn startup_bytes(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = BytesMut::new();
        body.put_i32(version);
        for (k, v) in params {
            put_cstr(&mut body, k);
            put_cstr(&mut body, v);
        }
        body.put_u8(0);
        let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        out
    }

    /// Capacity a buffer may reach while reading a message that never arrives in full.
    const SMALL: usize = 4 * READ_CHUNK;

    #[tokio::test]
    async fn a_declared_megabyte_allocates_nothing_before_it_arrives() {
        // Startup packet declaring 1 MiB: refused from the length word alone.
        let mut r: &[u8] = &[0, 0x10, 0, 4, 0, 3, 0, 0, b'u'];
        let mut buf = BytesMut::new();
        let e = read_startup_into(&mut r, &mut buf).await.unwrap_err();
        assert!(matches!(e, ProtocolError::StartupLength(n) if n == (1 << 20) + 4), "{e:?}");
        assert_eq!(buf.capacity(), 0);
        // A client message (password, SASL) declaring 1 MiB: refused from its 5-byte header.
        let mut r: &[u8] = &[b'p', 0, 0x10, 0, 0, b'x', b'y'];
        let e = read_client_message(&mut r, &mut buf).await.unwrap_err();
        assert!(matches!(e, ProtocolError::Length { kind: 'p', len } if len == 1 << 20), "{e:?}");
        assert_eq!(buf.capacity(), 0);
        // A server message under the 1 MiB cap whose body never comes: the buffer holds what arrived.
        let mut r: &[u8] = &[b'D', 0, 0x0f, 0xff, 0xff, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        let e = read_message(&mut r, &mut buf).await.unwrap_err();
        assert!(matches!(&e, ProtocolError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof), "{e:?}");
        assert_eq!(&buf[..], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert!(buf.capacity() <= SMALL, "capacity {} for 10 bytes received", buf.capacity());
    }

    #[tokio::test]
    async fn buffers_grow_with_the_bytes_that_arrive() {
        // 1000 bytes of a declared 8000-byte startup packet, then the client goes quiet.
        let (mut tx, mut rx) = tokio::io::duplex(64);
        let feed = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            tx.write_all(&8000i32.to_be_bytes()).await.unwrap();
            tx.write_all(&PROTOCOL_V3.to_be_bytes()).await.unwrap();
            tx.write_all(&[b'a'; 992]).await.unwrap();
            tx
        });
        let mut buf = BytesMut::new();
        let read = tokio::time::timeout(std::time::Duration::from_millis(200), read_startup_into(&mut rx, &mut buf));
        assert!(read.await.is_err(), "the packet is incomplete");
        let _tx = feed.await.unwrap();
        assert_eq!(buf.len(), 996);
        assert!(buf.capacity() <= 2 * READ_CHUNK, "capacity {} for 996 of 7996 bytes", buf.capacity());
    }

    #[tokio::test]
    async fn startup_split_byte_by_byte() {
        let bytes = startup_bytes(PROTOCOL_V3, &[("user", "app"), ("database", "railway"), ("TimeZone", "UTC")]);
        // A one-byte pipe hands the reader every byte separately.
        let (mut tx, mut rx) = tokio::io::duplex(1);
        let feed = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for b in bytes {
                tx.write_all(&[b]).await.unwrap();
            }
        });
        let p = read_startup(&mut rx).await.unwrap();
        feed.await.unwrap();
        let StartupPacket::Startup { startup, minor } = p else { panic!("{p:?}") };
        assert_eq!(minor, 0);
        assert_eq!((startup.user(), startup.database(), startup.get("TimeZone")), ("app", "railway", Some("UTC")));
        assert!(negotiation(&startup, minor).is_none(), "3.0 without _pq_ options needs no negotiation");
    }

    #[tokio::test]
    async fn preauth_cap_is_8192_bytes() {
        let filler = |total: usize| {
            // user, value; the value pads the packet to exactly `total` bytes.
            let base = startup_bytes(PROTOCOL_V3, &[("user", "")]).len();
            "x".repeat(total - base)
        };
        let at_cap = startup_bytes(PROTOCOL_V3, &[("user", &filler(MAX_PREAUTH_LEN))]);
        assert_eq!(at_cap.len(), MAX_PREAUTH_LEN);
        let p = read_startup(&mut &at_cap[..]).await.unwrap();
        assert!(matches!(p, StartupPacket::Startup { .. }), "{p:?}");
        let over = startup_bytes(PROTOCOL_V3, &[("user", &filler(MAX_PREAUTH_LEN + 1))]);
        let e = read_startup(&mut &over[..]).await.unwrap_err();
        assert!(matches!(e, ProtocolError::StartupLength(MAX_PREAUTH_LEN_PLUS_ONE)), "{e:?}");
        for bad in [0i32, 7, -1, i32::MIN] {
            let e = read_startup(&mut &bad.to_be_bytes()[..]).await.unwrap_err();
            assert!(matches!(e, ProtocolError::StartupLength(_)), "{bad}: {e:?}");
        }

        let message = |len: usize| {
            let mut m = vec![b'p'];
            m.extend_from_slice(&(len as i32).to_be_bytes());
            m.resize(len + 1, b'z');
            m
        };
        let mut buf = BytesMut::new();
        let m = message(MAX_PREAUTH_LEN);
        assert_eq!(read_client_message(&mut &m[..], &mut buf).await.unwrap(), b'p');
        assert_eq!(buf.len(), MAX_PREAUTH_LEN - 4);
        let m = message(MAX_PREAUTH_LEN + 1);
        let e = read_client_message(&mut &m[..], &mut buf).await.unwrap_err();
        assert!(matches!(e, ProtocolError::Length { len: MAX_PREAUTH_LEN_PLUS_ONE, .. }), "{e:?}");
        // Servers may send more than a client before login.
        assert_eq!(read_message(&mut &m[..], &mut buf).await.unwrap(), b'p');
        let e = read_client_message(&mut &[b'p', 0, 0, 0, 3][..], &mut buf).await.unwrap_err();
        assert!(matches!(e, ProtocolError::Length { len: 3, .. }), "{e:?}");
    }
    const MAX_PREAUTH_LEN_PLUS_ONE: usize = MAX_PREAUTH_LEN + 1;

    #[tokio::test]
    async fn protocol_3_2_is_negotiated_down_to_3_0() {
        let bytes = startup_bytes(PROTOCOL_V3 + 2, &[("user", "app")]);
        let p = read_startup(&mut &bytes[..]).await.unwrap();
        let StartupPacket::Startup { startup, minor } = p else { panic!("{p:?}") };
        assert_eq!((minor, startup.user()), (2, "app"));
        let msg = negotiation(&startup, minor).expect("3.2 needs NegotiateProtocolVersion");
        assert_eq!(&msg[..], &[b'v', 0, 0, 0, 12, 0, 3, 0, 0, 0, 0, 0, 0]);
        // Any major version but 3 is refused.
        for v in [2 << 16, 4 << 16, (1234 << 16) | 1] {
            let bytes = startup_bytes(v, &[("user", "app")]);
            let e = read_startup(&mut &bytes[..]).await.unwrap_err();
            assert!(matches!(e, ProtocolError::Version { major, .. } if major == v >> 16), "{e:?}");
        }
    }

    #[tokio::test]
    async fn pq_options_are_listed_as_unrecognized() {
        let bytes = startup_bytes(
            PROTOCOL_V3,
            &[("user", "app"), ("_pq_.test_protocol_negotiation", "x"), ("_pq_.a", "1"), ("TimeZone", "UTC")],
        );
        let StartupPacket::Startup { startup, minor } = read_startup(&mut &bytes[..]).await.unwrap() else {
            panic!("not a startup message")
        };
        let msg = negotiation(&startup, minor).expect("_pq_ options need NegotiateProtocolVersion");
        let mut want = vec![b'v'];
        let names = b"_pq_.a\0_pq_.test_protocol_negotiation\0";
        want.extend_from_slice(&((4 + 4 + 4 + names.len()) as i32).to_be_bytes());
        want.extend_from_slice(&[0, 3, 0, 0, 0, 0, 0, 2]);
        want.extend_from_slice(names);
        assert_eq!(&msg[..], &want[..]);
        // With 3.1 and an option, both are reported in one message.
        let msg = negotiation(&startup, 1).unwrap();
        assert_eq!(&msg[5..13], &[0, 3, 0, 0, 0, 0, 0, 2]);
    }
}
