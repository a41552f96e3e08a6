//! Framing for the pump: which client messages are valid and how long they may be, and an incremental
//! scanner over server bytes that reports each message once, with its first body byte and a bounded
//! prefix of the bodies the proxy reads (ReadyForQuery, ParameterStatus, ErrorResponse), copying it on message by
//! message with the edits the relay asks for.

use crate::protocol::LARGE_MESSAGE;
use bytes::BytesMut;

/// Limit for small control messages (`PQ_SMALL_MESSAGE_LIMIT`).
pub const SMALL_MESSAGE: usize = 10_000;
/// Most of a server message body the proxy keeps to decode (an ErrorResponse's fields come first).
pub const SERVER_CAPTURE: usize = 8 * 1024;

/// The body length limit of a frontend message type after login, or `None` for a type no client may send.
pub fn client_limit(kind: u8) -> Option<usize> {
    match kind {
        b'B' | b'P' | b'Q' | b'F' | b'd' | b'f' => Some(LARGE_MESSAGE),
        b'C' | b'D' | b'E' | b'H' | b'S' | b'X' | b'c' => Some(SMALL_MESSAGE),
        _ => None,
    }
}

/// One complete server message.
pub struct ServerMsg<'a> {
    pub kind: u8,
    /// First body byte (ReadyForQuery's status).
    pub first: Option<u8>,
    /// The captured body prefix (empty unless the type is captured).
    pub body: &'a [u8],
    /// The body was longer than the capture.
    pub truncated: bool,
    /// The body was copied out ([`ServerScanner::feed_into`]): false when its header was swallowed or
    /// replaced, whichever read that happened in.
    pub copied: bool,
}

/// Errors of the server byte stream.
#[derive(Debug, thiserror::Error)]
#[error("server sent a message of type {kind:?} with invalid length {len}")]
pub struct BadServerFrame {
    pub kind: char,
    pub len: i32,
}

/// Incremental scanner over server bytes; never copies a body it does not capture.
#[derive(Debug, Default)]
pub struct ServerScanner {
    header: [u8; 5],
    header_len: usize,
    remaining: usize,
    kind: u8,
    first: Option<u8>,
    in_body: bool,
    capture: Vec<u8>,
    truncated: bool,
    /// The body of the current message is copied out (`feed_into`).
    copy_body: bool,
    /// RowDescriptions are captured too (only while a Describe of the proxy's interest is owed).
    pub capture_rows: bool,
}

fn captured(kind: u8) -> bool {
    matches!(kind, b'E' | b'S' | b'Z' | b'A')
}

/// A capture buffer at most this large is kept for the next server (the ReadyForQuery and ParameterStatus
/// captures of every transaction fit).
const KEPT_CAPTURE: usize = 256;

impl ServerScanner {
    /// Start over at a boundary (a new server), keeping a small capture buffer.
    pub fn reset(&mut self) {
        let mut capture = std::mem::take(&mut self.capture);
        capture.clear();
        if capture.capacity() > KEPT_CAPTURE {
            capture = Vec::new();
        }
        *self = ServerScanner { capture, ..Default::default() };
    }

    /// Whether an empty capture buffer still holds memory ([`Self::shrink`] gives it back).
    pub fn holds_buffer(&self) -> bool {
        self.capture.is_empty() && self.capture.capacity() > 0
    }

    pub fn shrink(&mut self) {
        if self.capture.is_empty() {
            self.capture = Vec::new();
        }
    }

    /// At a message boundary.
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && !self.in_body
    }

    /// Bytes of the next header held here (a read ended inside it). [`Self::feed_into`] writes a header only
    /// once it is whole, so these bytes are nowhere else yet.
    pub fn partial_header(&self) -> usize {
        self.header_len
    }

    /// Body bytes of the message in progress still to come (0 at a boundary or inside a header).
    pub fn body_left(&self) -> usize {
        if self.in_body {
            self.remaining
        } else {
            0
        }
    }

    /// The body in progress is not copied out (its header was swallowed or replaced).
    pub fn dropping_body(&self) -> bool {
        self.in_body && !self.copy_body
    }

    /// Walk `chunk`, calling `on` once per completed message.
    pub fn feed(&mut self, chunk: &[u8], mut on: impl FnMut(ServerMsg<'_>)) -> Result<(), BadServerFrame> {
        self.walk(chunk, None, |ev, _| {
            if let Scan::Message(m) = ev {
                on(m);
            }
            false
        })
    }

    /// Walk `chunk` and copy it to `out` message by message as `on` decides: at each header, `on` gets
    /// [`Scan::Header`] and writes what should stand for it (the header as is, another one, a replacement
    /// message, or nothing), returning whether the body is copied; at each end it gets [`Scan::Message`].
    /// With `out` `None` nothing is copied (the bytes stay where they are) and `on`'s writes go nowhere.
    pub fn feed_into(
        &mut self,
        chunk: &[u8],
        out: Option<&mut BytesMut>,
        on: impl FnMut(Scan<'_>, &mut BytesMut) -> bool,
    ) -> Result<(), BadServerFrame> {
        self.walk(chunk, out, on)
    }

    fn walk(
        &mut self,
        mut chunk: &[u8],
        mut out: Option<&mut BytesMut>,
        mut on: impl FnMut(Scan<'_>, &mut BytesMut) -> bool,
    ) -> Result<(), BadServerFrame> {
        let mut none = BytesMut::new();
        while !chunk.is_empty() || (self.in_body && self.remaining == 0) {
            if self.in_body {
                let n = self.remaining.min(chunk.len());
                if n > 0 {
                    if self.first.is_none() {
                        self.first = Some(chunk[0]);
                    }
                    if captured(self.kind) || (self.kind == b'T' && self.capture_rows) {
                        let room = SERVER_CAPTURE - self.capture.len();
                        self.capture.extend_from_slice(&chunk[..n.min(room)]);
                        self.truncated |= n > room;
                    }
                    if self.copy_body {
                        if let Some(o) = out.as_deref_mut() {
                            o.extend_from_slice(&chunk[..n]);
                        }
                    }
                    self.remaining -= n;
                    chunk = &chunk[n..];
                }
                if self.remaining == 0 {
                    self.in_body = false;
                    let m = ServerMsg {
                        kind: self.kind,
                        first: self.first,
                        body: &self.capture,
                        truncated: self.truncated,
                        copied: self.copy_body,
                    };
                    on(Scan::Message(m), out.as_deref_mut().unwrap_or(&mut none));
                }
                continue;
            }
            let n = (5 - self.header_len).min(chunk.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&chunk[..n]);
            self.header_len += n;
            chunk = &chunk[n..];
            if self.header_len < 5 {
                break;
            }
            self.header_len = 0;
            self.kind = self.header[0];
            let [_, l0, l1, l2, l3] = self.header;
            self.remaining = body_len(self.kind, [l0, l1, l2, l3])?;
            self.first = None;
            self.capture.clear();
            self.truncated = false;
            self.in_body = true;
            self.copy_body = on(Scan::Header(self.header), out.as_deref_mut().unwrap_or(&mut none));
        }
        Ok(())
    }
}

/// The body length a server message header declares (its length field less its own 4 bytes).
pub fn body_len(kind: u8, len: [u8; 4]) -> Result<usize, BadServerFrame> {
    let len = i32::from_be_bytes(len);
    if len < 4 {
        return Err(BadServerFrame { kind: kind as char, len });
    }
    Ok(len as usize - 4)
}

/// What [`ServerScanner::feed_into`] reports.
pub enum Scan<'a> {
    /// A message's 5-byte header has arrived.
    Header([u8; 5]),
    /// A message is complete.
    Message(ServerMsg<'a>),
}

/// Fields of an ErrorResponse/NoticeResponse body prefix: (severity, SQLSTATE, message); missing fields are empty.
pub fn error_fields(body: &[u8]) -> (&str, &str, &str) {
    let (mut sev, mut code, mut msg) = ("", "", "");
    let mut b = body;
    while let Some((&tag, rest)) = b.split_first() {
        if tag == 0 {
            break;
        }
        let Some(end) = rest.iter().position(|c| *c == 0) else { break };
        let v = std::str::from_utf8(&rest[..end]).unwrap_or("");
        match tag {
            b'V' => sev = v,
            b'S' if sev.is_empty() => sev = v,
            b'C' => code = v,
            b'M' => msg = v,
            _ => {}
        }
        b = &rest[end + 1..];
    }
    (sev, code, msg)
}

/// Whether an ErrorResponse severity ends the connection.
pub fn is_fatal(severity: &str) -> bool {
    severity == "FATAL" || severity == "PANIC"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol;
    use bytes::BytesMut;

    fn collect(chunks: &[&[u8]]) -> Vec<(u8, Option<u8>, Vec<u8>)> {
        let mut s = ServerScanner::default();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, |m| out.push((m.kind, m.first, m.body.to_vec()))).unwrap();
        }
        assert!(s.at_boundary());
        out
    }

    #[test]
    fn any_split_gives_the_same_messages() {
        let mut b = BytesMut::new();
        protocol::simple_query(&mut b, "x");
        protocol::ready_for_query(&mut b, b'T');
        b.extend_from_slice(&[b'1', 0, 0, 0, 4]);
        protocol::error_response(&mut b, protocol::Severity::Error, "42601", "syntax", None);
        protocol::ready_for_query(&mut b, b'I');
        let whole = collect(&[&b]);
        assert_eq!(whole.len(), 5);
        assert_eq!(whole[1], (b'Z', Some(b'T'), vec![b'T']));
        assert_eq!(whole[2], (b'1', None, vec![]));
        assert_eq!(error_fields(&whole[3].2), ("ERROR", "42601", "syntax"));
        for i in 1..b.len() {
            for j in i..b.len() {
                assert_eq!(collect(&[&b[..i], &b[i..j], &b[j..]]), whole, "{i} {j}");
            }
        }
    }

    #[test]
    fn huge_error_is_truncated_not_refused() {
        let mut b = BytesMut::new();
        let long = "x".repeat(3 << 20);
        protocol::error_response(&mut b, protocol::Severity::Error, "P0001", &long, None);
        let mut s = ServerScanner::default();
        let mut seen = None;
        for c in b.chunks(16 * 1024) {
            s.feed(c, |m| seen = Some((m.body.len(), m.truncated, error_fields(m.body).1.to_owned()))).unwrap();
        }
        assert_eq!(seen, Some((SERVER_CAPTURE, true, "P0001".to_owned())));
    }

    #[test]
    fn bad_length_is_an_error() {
        let mut s = ServerScanner::default();
        assert!(s.feed(&[b'Z', 0, 0, 0, 3], |_| {}).is_err());
    }

    #[test]
    fn client_types() {
        assert_eq!(client_limit(b'Q'), Some(LARGE_MESSAGE));
        assert_eq!(client_limit(b'S'), Some(SMALL_MESSAGE));
        assert_eq!(client_limit(b'p'), None);
        assert_eq!(client_limit(0), None);
    }
}
