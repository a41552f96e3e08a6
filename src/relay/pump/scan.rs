//! Server bytes to client bytes: the transaction state follows every message, and the replies to the proxy's
//! own tagged messages are swallowed or replaced at their header.

use super::errors;
use super::rewrite::{self, Action, Actions, TxnStatements};
use super::{Pump, PumpError, Seen, MAX_ERRORS};
use crate::relay::frame::{self, Scan, ServerScanner};
use crate::relay::txstate::TxState;
use bytes::BytesMut;

impl Pump {
    /// Whether server bytes may need edits: some reply still owed belongs to a message of the proxy's own.
    /// Without, they are read straight into `s2c` and scanned where they are.
    pub(super) fn edits_pending(&self) -> bool {
        !self.actions.is_empty() || ((self.listening || self.probe_due) && self.servers.is_some())
    }

    /// Whether the next server read goes into `sin` and is copied (edited) to `s2c`, rather than read into
    /// `s2c` and scanned where it lands. Besides edits pending, two states of the scanner need the copy, so
    /// that switching ways between two reads never duplicates or loses a byte: a header split across reads
    /// is held in the scanner only (the in-place scan takes its bytes back out of `s2c`, see
    /// [`Pump::scan_read`]) and only the copying scan writes it, whole; and a body being dropped (its
    /// header swallowed or replaced) must go on being dropped.
    pub(super) fn scan_copies(&self) -> bool {
        self.edits_pending() || self.sscan.partial_header() > 0 || self.sscan.dropping_body()
    }

    /// Scan the server bytes just read: from `sin` (`copies`, as [`Pump::scan_copies`] chose) or from `s2c`
    /// at `from`. An in-place read that ends inside a header leaves those bytes to the scanner alone: they
    /// are the tail of `s2c` (the read began at a boundary, else it would copy) and are taken out of it.
    pub(super) fn scan_read(&mut self, copies: bool, from: usize) -> Result<(), PumpError> {
        if copies {
            return self.scan_server();
        }
        let end = from + self.scan_in_place(from)?;
        if end < self.s2c.len() {
            // The scan stopped at an error to rebuild: the rest of the read goes the copying way.
            self.sin.extend_from_slice(&self.s2c[end..]);
            self.s2c.truncate(end);
            return self.scan_server();
        }
        let held = self.sscan.partial_header();
        self.s2c.truncate(self.s2c.len() - held);
        Ok(())
    }

    /// Take `bytes` as one read from the server, the way [`Pump::poll_pump`] does (fuzzing and tests).
    pub fn read_server(&mut self, bytes: &[u8]) -> Result<(), PumpError> {
        let copies = self.scan_copies();
        let from = self.s2c.len();
        if copies {
            self.sin.extend_from_slice(bytes);
        } else {
            self.s2c.extend_from_slice(bytes);
        }
        self.scan_read(copies, from)
    }

    /// Take what the client would be sent so far (fuzzing and tests).
    pub fn take_for_client(&mut self) -> Vec<u8> {
        let got = self.s2c.to_vec();
        self.s2c.clear();
        got
    }

    /// Scan the server bytes just read into `sin`, moving them (edited) to `s2c`.
    fn scan_server(&mut self) -> Result<(), PumpError> {
        let sin = std::mem::take(&mut self.sin);
        let mut out = std::mem::take(&mut self.s2c);
        let r = scan(self.parts(), &sin, Some(&mut out));
        self.s2c = out;
        self.sin = sin;
        self.sin.clear();
        r.map(|_| ())
    }

    /// Scan the server bytes just read straight into `s2c` (from `from` on), where they stay.
    fn scan_in_place(&mut self, from: usize) -> Result<usize, PumpError> {
        let s2c = std::mem::take(&mut self.s2c);
        let r = scan(self.parts(), &s2c[from..], None);
        self.s2c = s2c;
        r
    }

    fn parts(&mut self) -> Parts<'_> {
        Parts {
            sscan: &mut self.sscan,
            cx: Cx {
                tx: &mut self.tx,
                seen: &mut self.seen,
                actions: &mut self.actions,
                stmts: self.stmts.as_deref_mut(),
                probe_due: &mut self.probe_due,
                backslash_quotes: &mut self.backslash_quotes,
                servers: self.servers.as_ref(),
                error_held: &mut self.error_held,
                copy: false,
            },
        }
    }

    /// Scan server bytes that go to nobody (cleanup after the client left; fuzzing and tests).
    pub fn absorb_server(&mut self, bytes: &[u8]) -> Result<(), PumpError> {
        let seen = std::mem::take(&mut self.seen);
        let mut out = BytesMut::new();
        let r = scan(self.parts(), bytes, Some(&mut out));
        self.seen = seen;
        r.map(|_| ())
    }

    /// Scan server bytes as if read from the server and return what the client would get (fuzzing and tests).
    pub fn feed_server(&mut self, bytes: &[u8]) -> Result<Vec<u8>, PumpError> {
        let mut out = std::mem::take(&mut self.s2c);
        let r = scan(self.parts(), bytes, Some(&mut out));
        let got = out.to_vec();
        out.clear();
        self.s2c = out;
        r.map(|_| got)
    }
}

/// The cancel-key pid a client knows for server backend `pid` (the pid itself when no client is known).
fn client_pid(servers: &crate::server::ServerList, pid: i32) -> i32 {
    servers.get(&pid).map(|i| i.client_pid).filter(|p| *p != 0).unwrap_or(pid)
}

/// Rewrite the sender pid of whole NotificationResponses in `bytes` to the pid its client knows.
pub fn name_senders(bytes: &mut [u8], servers: &crate::server::ServerList) {
    let mut at = 0;
    while bytes.len() >= at + 9 {
        let len = i32::from_be_bytes([bytes[at + 1], bytes[at + 2], bytes[at + 3], bytes[at + 4]]) as usize;
        if bytes[at] == b'A' && len >= 8 {
            let pid = i32::from_be_bytes([bytes[at + 5], bytes[at + 6], bytes[at + 7], bytes[at + 8]]);
            bytes[at + 5..at + 9].copy_from_slice(&client_pid(servers, pid).to_be_bytes());
        }
        at += 1 + len;
    }
}

/// The pump's parts the server scan works on: its scanner, and what the walk over messages works on.
struct Parts<'a> {
    sscan: &'a mut ServerScanner,
    cx: Cx<'a>,
}

/// Walk server bytes into `out` (`None`: scan them where they are): the transaction state follows every
/// message; replies to the proxy's own tagged messages are swallowed, renamed or replaced at their header;
/// errors, idle ReadyForQuery and ParameterStatus are noted for the report. Returns the bytes taken: all of
/// them, except that a scan in place stops at an ErrorResponse that may name a pool statement (the caller
/// scans the rest with a copy, in which the error is rebuilt with the client's names, [`errors`]).
fn scan(p: Parts<'_>, bytes: &[u8], out: Option<&mut BytesMut>) -> Result<usize, PumpError> {
    let Parts { sscan, mut cx } = p;
    cx.copy = out.is_some();
    let total = bytes.len();
    let mut bytes = bytes;
    // A RowDescription is read only for a Describe the proxy tagged (a client's of a pool statement, or a
    // shape check); untagged ones, the bulk of all replies, are not copied aside.
    sscan.capture_rows = !cx.actions.is_empty();
    if cx.copy || !cx.actions.is_empty() {
        sscan.feed_into(bytes, out, |ev, o| cx.on(ev, o))?;
        return Ok(total);
    }
    let names = cx.stmts.as_deref().is_some_and(|s| !s.client.is_empty());
    loop {
        if sscan.at_boundary() {
            bytes = plain_messages(bytes, cx.tx, cx.seen, cx.actions, cx.stmts.as_deref_mut())?;
            match bytes {
                [] => return Ok(total),
                [b'E', ..] if names => return Ok(total - bytes.len()),
                _ if !names => {
                    sscan.feed_into(bytes, None, |ev, o| cx.on(ev, o))?;
                    return Ok(total);
                }
                _ => {}
            }
        }
        // One message (or the rest of the one in progress) at a time, so that the walk stops at an error.
        let n = match (sscan.body_left(), bytes) {
            (0, [_, l0, l1, l2, l3, ..]) if sscan.partial_header() == 0 => {
                5 + frame::body_len(bytes[0], [*l0, *l1, *l2, *l3])?
            }
            (0, _) => bytes.len(),
            (left, _) => left,
        };
        let (now, rest) = bytes.split_at(n.min(bytes.len()));
        sscan.feed_into(now, None, |ev, o| cx.on(ev, o))?;
        bytes = rest;
        if bytes.is_empty() {
            return Ok(total);
        }
    }
}

/// What the walk over server messages works on.
struct Cx<'a> {
    tx: &'a mut TxState,
    seen: &'a mut Seen,
    actions: &'a mut Actions,
    stmts: Option<&'a mut TxnStatements>,
    probe_due: &'a mut bool,
    backslash_quotes: &'a mut bool,
    servers: Option<&'a crate::server::ServerList>,
    /// An ErrorResponse is held back to its end, to be rebuilt with the client's statement names.
    error_held: &'a mut bool,
    /// The scan copies (edits) into an output, rather than scanning bytes where they are.
    copy: bool,
}

impl Cx<'_> {
    fn on(&mut self, ev: Scan<'_>, out: &mut BytesMut) -> bool {
        let (tx, seen, actions) = (&mut *self.tx, &mut *self.seen, &mut *self.actions);
        let (copy, servers) = (self.copy, self.servers);
        match ev {
            Scan::Header(h) => {
                let kind = h[0];
                // A notification is rebuilt at its end with the sender's pid as its client knows it (its body
                // is not copied: that is how its end knows, in whichever read it comes).
                if copy && kind == b'A' && servers.is_some() {
                    return false;
                }
                if !matches!(kind, b'N' | b'S' | b'A') {
                    match (actions.head(tx), kind) {
                        (
                            Some(
                                Action::Swallow { .. } | Action::Unnamed | Action::Evict(_) | Action::Deallocate { .. },
                            ),
                            b'1' | b'3',
                        ) => return false,
                        (Some(Action::Check { .. }), b't' | b'T' | b'n') => return false,
                        (Some(Action::Refuse(e)), b'E') | (Some(Action::Close { reply: Some(e), .. }), b'I') => {
                            out.extend_from_slice(e);
                            return false;
                        }
                        (Some(Action::DeallocateAll { failed, .. }), b'E') => failed.set(true),
                        _ => {}
                    }
                }
                if copy && kind == b'E' && errors::may_rename(&h, self.stmts.as_deref()) {
                    *self.error_held = true;
                    return false;
                }
                if copy {
                    out.extend_from_slice(&h);
                }
                true
            }
            Scan::Message(m) => {
                let mut fatal = false;
                match m.kind {
                    b'E' => {
                        let (sev, code, msg) = frame::error_fields(m.body);
                        fatal = frame::is_fatal(sev);
                        let held = std::mem::take(self.error_held);
                        if (m.copied || held) && seen.errors.len() < MAX_ERRORS {
                            seen.errors.push((code.to_owned(), msg.to_owned()));
                        }
                        if held {
                            if let Some(s) = self.stmts.as_deref() {
                                errors::rebuild(m.body, s, out);
                            }
                        }
                        if code == crate::protocol::sqlstate::FEATURE_NOT_SUPPORTED
                            && msg.starts_with("cached plan must not change result type")
                        {
                            // That server's plan stays stale for good: the statement is retired, new Parses of
                            // the text get a fresh one, and namings of it move to the fresh one (checked against
                            // the shape each client was told). Binds are not tagged (that would cost every Bind
                            // a copy of its replies): everything bound or described since the server was last
                            // idle is retired, and a spare retirement only costs a fresh Parse.
                            if let Some(s) = self.stmts.as_deref_mut() {
                                for (stmt, _) in s.bound.drain(..) {
                                    s.registry.retire(&stmt);
                                }
                            }
                        }
                    }
                    b'T' | b'n' => {
                        let shape = if m.kind == b'n' { &[][..] } else { m.body };
                        match (actions.head(tx), self.stmts.as_deref_mut()) {
                            (Some(Action::Describe { gen }), Some(s)) if !m.truncated => {
                                s.client.set_shape(*gen, bytes::Bytes::copy_from_slice(shape));
                            }
                            (Some(Action::Check { gen }), Some(s))
                                if (m.truncated || s.client.shape(*gen).is_none_or(|k| k[..] != *shape)) =>
                            {
                                // Prepared afresh, it returns rows of another shape than the client was told:
                                // like Postgres, the client's statement fails until it prepares it again.
                                s.client.set_broken(*gen);
                            }
                            _ => {}
                        }
                    }
                    b'A' if !m.copied => {
                        let body = m.body;
                        if body.len() >= 4 && !m.truncated {
                            let pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                            let known = servers.map_or(pid, |l| client_pid(l, pid));
                            out.extend_from_slice(b"A");
                            out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
                            out.extend_from_slice(&known.to_be_bytes());
                            out.extend_from_slice(&body[4..]);
                        }
                    }
                    b'S' if !m.truncated => {
                        *self.probe_due = true;
                        let mut parts = m.body.split(|c| *c == 0);
                        if let (Some(k), Some(v)) = (parts.next(), parts.next()) {
                            if k == b"standard_conforming_strings" {
                                *self.backslash_quotes = v == b"off";
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
                follow(m.kind, m.first, fatal, tx, seen, actions, self.stmts.as_deref_mut());
                false
            }
        }
    }
}

/// The common case of an in-place scan, ahead of the general walk: while no reply of the proxy's own is owed
/// and the scanner is at a boundary, whole messages that need nothing but the transaction state (every kind
/// but ErrorResponse, ParameterStatus and NotificationResponse) are followed straight from their headers,
/// exactly as the walk would follow them. Returns the bytes from the first message it leaves to the walk.
fn plain_messages<'b>(
    mut bytes: &'b [u8],
    tx: &mut TxState,
    seen: &mut Seen,
    actions: &mut Actions,
    mut stmts: Option<&mut TxnStatements>,
) -> Result<&'b [u8], PumpError> {
    while let [kind, l0, l1, l2, l3, body @ ..] = bytes {
        let kind = *kind;
        let n = frame::body_len(kind, [*l0, *l1, *l2, *l3])?;
        if matches!(kind, b'E' | b'S' | b'A') || body.len() < n {
            break;
        }
        follow(kind, (n > 0).then(|| body[0]), false, tx, seen, actions, stmts.as_deref_mut());
        bytes = &body[n..];
    }
    Ok(bytes)
}

/// What every complete server message does, in the walk and in its shortcut alike: a ReadyForQuery is
/// counted for the report, the transaction state follows the message, the statements bound since the last
/// idle point are forgotten at one, and the proxy's owed replies are settled.
fn follow(
    kind: u8,
    first: Option<u8>,
    fatal: bool,
    tx: &mut TxState,
    seen: &mut Seen,
    actions: &mut Actions,
    mut stmts: Option<&mut TxnStatements>,
) {
    if kind == b'Z' {
        seen.ready += 1;
        if first == Some(b'I') {
            seen.idle_ready += 1;
        }
    }
    tx.server(kind, first, fatal);
    if kind == b'Z' && tx.outstanding() == 0 {
        if let Some(s) = stmts.as_deref_mut() {
            s.bound.clear();
        }
    }
    rewrite::settle(tx, actions, stmts);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_notifications_name_the_senders_client() {
        let servers = crate::server::ServerList::default();
        servers.insert(
            42,
            crate::server::ServerInfo {
                service: "app".into(),
                route: "rw",
                addr: "127.0.0.1:5432".parse().unwrap(),
                pid: 42,
                connected_at: std::time::SystemTime::now(),
                client_pid: 777,
            },
        );
        let mut b = Vec::new();
        for pid in [42i32, 43] {
            let body: Vec<u8> = pid.to_be_bytes().iter().copied().chain(*b"ch\0hi\0").collect();
            b.push(b'A');
            b.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
            b.extend_from_slice(&body);
        }
        name_senders(&mut b, &servers);
        assert_eq!(&b[5..9], &777i32.to_be_bytes(), "a known server names its client");
        assert_eq!(&b[20..24], &43i32.to_be_bytes(), "an unknown one is left as is");
    }
}
