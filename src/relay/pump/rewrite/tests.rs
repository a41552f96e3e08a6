//! The rewrite is invisible: for any sequence of client messages, what the client gets back from a server
//! that answers every message it receives is what a server would have answered the client's own messages,
//! whichever statements the server already had and however small its statement cache is.
//!
//! Each batch ends at its Sync and is answered before the next is sent. (A client that pipelines past a
//! Sync a Parse reusing the name of a Parse that fails before it gets 42P05 where Postgres would accept
//! it: names are decided when messages are forwarded, outcomes arrive later.)

use super::super::{Pump, PumpError};
use super::TxnStatements;
use crate::protocol;
use crate::server::statements::Registry;
use bytes::{BufMut, BytesMut};
use proptest::prelude::*;
use std::collections::HashSet;
use std::sync::Arc;

/// A client message of the generated conversations.
#[derive(Debug, Clone)]
enum Msg {
    Parse(u8, u8),
    Bind(u8),
    Describe(u8),
    Close(u8),
    Execute,
    Query(u8),
}

fn name(n: u8) -> String {
    if n == 0 {
        String::new()
    } else {
        format!("s{n}")
    }
}

fn encode(m: &Msg, out: &mut BytesMut) {
    let put = |out: &mut BytesMut, kind: u8, f: &dyn Fn(&mut BytesMut)| {
        let at = protocol::begin(out, kind);
        f(out);
        protocol::finish(out, at);
    };
    match m {
        Msg::Parse(n, q) => put(out, b'P', &|o| {
            protocol::put_cstr(o, &name(*n));
            protocol::put_cstr(o, &format!("SELECT {q}"));
            o.put_i16(0);
        }),
        Msg::Bind(n) => put(out, b'B', &|o| {
            protocol::put_cstr(o, "");
            protocol::put_cstr(o, &name(*n));
            o.put_slice(&[0, 0, 0, 0, 0, 0]);
        }),
        Msg::Describe(n) => put(out, b'D', &|o| {
            o.put_u8(b'S');
            protocol::put_cstr(o, &name(*n));
        }),
        Msg::Close(n) => put(out, b'C', &|o| {
            o.put_u8(b'S');
            protocol::put_cstr(o, &name(*n));
        }),
        Msg::Execute => put(out, b'E', &|o| {
            protocol::put_cstr(o, "");
            o.put_i32(0);
        }),
        Msg::Query(q) => protocol::simple_query(out, &format!("SELECT {q}")),
    }
}

/// A server that knows statement names: answers what it is sent, errors on a missing or duplicate
/// statement (and on the proxy's stand-in text), skipping to Sync after an error.
#[derive(Default)]
struct Server {
    names: HashSet<String>,
    skipping: bool,
}

fn split(b: &[u8]) -> (&[u8], &[u8]) {
    let end = b.iter().position(|c| *c == 0).unwrap();
    (&b[..end], &b[end + 1..])
}

impl Server {
    fn error(&mut self, out: &mut BytesMut, code: &str) {
        protocol::error_response(out, protocol::Severity::Error, code, "x", None);
        self.skipping = true;
    }

    /// Answer one message (whole, header included) into `out`.
    fn answer(&mut self, msg: &[u8], out: &mut BytesMut) {
        let (kind, body) = (msg[0], &msg[5..]);
        if self.skipping && kind != b'S' {
            return;
        }
        match kind {
            b'P' => {
                let (n, rest) = split(body);
                let n = String::from_utf8_lossy(n).into_owned();
                if split(rest).0 == b")" || (!n.is_empty() && self.names.contains(&n)) {
                    return self.error(out, "42P05");
                }
                if !n.is_empty() {
                    self.names.insert(n);
                }
                out.extend_from_slice(&[b'1', 0, 0, 0, 4]);
            }
            b'B' | b'D' => {
                let named = if kind == b'B' { split(split(body).1).0 } else { split(&body[1..]).0 };
                if !named.is_empty() && !self.names.contains(&*String::from_utf8_lossy(named)) {
                    return self.error(out, "26000");
                }
                if kind == b'B' {
                    out.extend_from_slice(&[b'2', 0, 0, 0, 4]);
                } else {
                    out.extend_from_slice(&[b't', 0, 0, 0, 6, 0, 0, b'n', 0, 0, 0, 4]);
                }
            }
            b'C' => {
                self.names.remove(&*String::from_utf8_lossy(split(&body[1..]).0));
                out.extend_from_slice(&[b'3', 0, 0, 0, 4]);
            }
            b'E' => out.extend_from_slice(&[b'I', 0, 0, 0, 4]),
            b'S' => {
                self.skipping = false;
                protocol::ready_for_query(out, b'I');
            }
            b'Q' => {
                out.extend_from_slice(&[b'I', 0, 0, 0, 4]);
                protocol::ready_for_query(out, b'I');
            }
            _ => {}
        }
    }

    fn answer_all(&mut self, mut bytes: &[u8], out: &mut BytesMut) {
        while !bytes.is_empty() {
            let len = i32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
            self.answer(&bytes[..1 + len], out);
            bytes = &bytes[1 + len..];
        }
    }
}

/// Message types and SQLSTATEs of a reply stream.
fn shape(mut b: &[u8]) -> Vec<String> {
    let mut v = Vec::new();
    while !b.is_empty() {
        let len = i32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        let kind = b[0] as char;
        if kind == 'E' {
            v.push(format!("E{}", crate::relay::frame::error_fields(&b[5..1 + len]).1));
        } else {
            v.push(kind.to_string());
        }
        b = &b[1 + len..];
    }
    v
}

fn msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        (0..4u8, 0..3u8).prop_map(|(n, q)| Msg::Parse(n, q)),
        (0..4u8).prop_map(Msg::Bind),
        (0..4u8).prop_map(Msg::Describe),
        (1..4u8).prop_map(Msg::Close),
        Just(Msg::Execute),
        (0..3u8).prop_map(Msg::Query),
    ]
}

#[test]
fn statement_text_a_client_keeps_is_bounded() {
    // 40 distinct statements of 1 MiB each: past 32 MiB the proxy refuses (53400) instead of keeping them.
    let mut pump = Pump::new(None, 2 << 20);
    pump.stmts = Some(Box::new(TxnStatements::detached(Arc::new(Registry::default()), 200)));
    pump.attach();
    let mut refused = 0;
    for i in 0..40 {
        let mut b = BytesMut::new();
        let at = protocol::begin(&mut b, b'P');
        protocol::put_cstr(&mut b, &format!("s{i}"));
        protocol::put_cstr(&mut b, &format!("SELECT '{}{i}'", "x".repeat(1 << 20)));
        b.put_i16(0);
        protocol::finish(&mut b, at);
        let (framed, _) = pump.frame_bytes(&b).unwrap();
        refused += usize::from(framed.windows(17).any(|w| w == b"pgbudget__refused"));
    }
    let kept = pump.stmts.as_ref().unwrap().client.bytes();
    assert!(kept <= crate::server::statements::MAX_CLIENT_BYTES, "{kept} bytes kept");
    assert!(refused >= 8, "{refused} refused");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(400), ..ProptestConfig::default() })]
    #[test]
    fn the_rewrite_is_invisible_to_the_client(
        batches in proptest::collection::vec(proptest::collection::vec(msg(), 1..8), 1..8),
        cache in 1..4usize,
        servers in 1..3usize,
    ) {
        // Direct: one server that sees the client's own messages.
        let mut direct = Server::default();
        // Through the proxy: a fresh server (of `servers`) for every batch, each with its statement cache.
        let registry = Arc::new(Registry::default());
        let mut pump = Pump::new(None, 1 << 20);
        pump.stmts = Some(Box::new(TxnStatements::detached(registry, cache)));
        let mut pool: Vec<(Server, crate::server::statements::ServerStatements)> =
            (0..servers).map(|_| Default::default()).collect();
        for (i, batch) in batches.iter().enumerate() {
            let mut bytes = BytesMut::new();
            for m in batch {
                encode(m, &mut bytes);
            }
            bytes.extend_from_slice(&[b'S', 0, 0, 0, 4]);
            let mut want = BytesMut::new();
            direct.answer_all(&bytes, &mut want);

            let (server, known) = &mut pool[i % servers];
            pump.attach();
            let s = pump.stmts.as_mut().unwrap();
            std::mem::swap(&mut s.server, known);
            s.server.begin();
            // What waits for an answer (a shape check holds a Bind) is framed once the answer is in.
            let (mut input, mut got) = (&bytes[..], Vec::new());
            loop {
                let framed = match pump.frame_bytes(input) {
                    Ok((framed, _)) => framed,
                    Err(PumpError::Filter(_)) => return Ok(()), // a reserved name: the session ends
                    Err(e) => panic!("{e}"),
                };
                input = &[];
                if framed.is_empty() {
                    break;
                }
                let mut replies = BytesMut::new();
                server.answer_all(&framed, &mut replies);
                got.extend_from_slice(&pump.feed_server(&replies).unwrap());
            }
            prop_assert_eq!(shape(&got), shape(&want), "batch {} of {:?}", i, batches);
            prop_assert!(pump.releasable(), "server not at a clean boundary after the batch");
            let s = pump.stmts.as_mut().unwrap();
            std::mem::swap(&mut s.server, known);
        }
    }
}

proptest! {
    /// The short-name look and the vector search split every byte string where the first NUL is.
    #[test]
    fn split_cstr_splits_at_the_first_nul(b in proptest::collection::vec(prop_oneof![Just(0u8), 1u8..=255], 0..48)) {
        let want = b.iter().position(|&c| c == 0).map(|i| (&b[..i], &b[i + 1..]));
        prop_assert_eq!(super::split_cstr(&b), want);
    }
}
