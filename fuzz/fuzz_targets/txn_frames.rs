//! Client bytes through transaction mode's framer and statement rewrite, with a server that answers every
//! message it gets; with the input's choice, a Bind of a statement whose name ends in an odd digit fails (an
//! ErrorResponse naming the statement, which the proxy renames for the client) and the server skips to Sync,
//! as Postgres does. Input: byte 0 is the server's statement cache size (1..=4), a split size and whether
//! Binds may fail, then the client stream. Checked: no panic; the server never sees part of a header or a type a client may not
//! send; every framed message is answered and the answers reach the client as whole messages; once the
//! client's batch is answered up to its Sync, the server is at a clean boundary or the model says why not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgbudget::relay::frame::client_limit;
use pgbudget::relay::pump::{Pump, TxnStatements};
use pgbudget::server::statements::Registry;
use std::sync::Arc;

/// Whole messages at the front of `stream` (type, body end), from `*at` on; a message still arriving stays.
fn whole(stream: &[u8], at: &mut usize) -> Vec<(u8, std::ops::Range<usize>)> {
    let mut v = Vec::new();
    while stream.len() - *at >= 5 {
        let b = &stream[*at..];
        let len = i32::from_be_bytes([b[1], b[2], b[3], b[4]]);
        assert!(len >= 4, "length {len} sent");
        let end = *at + 1 + len as usize;
        if end > stream.len() {
            break;
        }
        v.push((b[0], *at + 5..end));
        *at = end;
    }
    v
}

/// What a server that accepts everything answers to one message.
fn answer(kind: u8, body: &[u8], out: &mut Vec<u8>) {
    match kind {
        b'P' => out.extend_from_slice(&[b'1', 0, 0, 0, 4]),
        b'B' => out.extend_from_slice(&[b'2', 0, 0, 0, 4]),
        b'D' if body.first() == Some(&b'S') => out.extend_from_slice(&[b't', 0, 0, 0, 6, 0, 0, b'n', 0, 0, 0, 4]),
        b'D' => out.extend_from_slice(&[b'n', 0, 0, 0, 4]),
        b'C' => out.extend_from_slice(&[b'3', 0, 0, 0, 4]),
        b'E' => out.extend_from_slice(&[b'I', 0, 0, 0, 4]),
        b'S' => out.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']),
        b'Q' => out.extend_from_slice(&[b'I', 0, 0, 0, 4, b'Z', 0, 0, 0, 5, b'I']),
        _ => {}
    }
}

/// What the server answers to `kind` (body `body`): a failing Bind's ErrorResponse, and nothing until Sync
/// after it.
fn answer_or_fail(kind: u8, body: &[u8], skipping: &mut bool, fails: bool, out: &mut Vec<u8>) {
    if *skipping && kind != b'S' {
        return;
    }
    *skipping = false;
    let name = body.iter().position(|c| *c == 0).and_then(|p| {
        let rest = &body[p + 1..];
        rest.iter().position(|c| *c == 0).map(|q| &rest[..q])
    });
    if fails && kind == b'B' && name.and_then(|n| n.last()).is_some_and(|d| d.is_ascii_digit() && d % 2 == 1) {
        let mut e = b"SERROR\0C08P01\0Mprepared statement \"".to_vec();
        e.extend_from_slice(name.unwrap_or_default());
        e.extend_from_slice(b"\" requires 2\0\0");
        out.push(b'E');
        out.extend_from_slice(&(e.len() as i32 + 4).to_be_bytes());
        out.extend_from_slice(&e);
        *skipping = true;
        return;
    }
    answer(kind, body, out);
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, input)) = data.split_first() else { return };
    let cache = usize::from(flags & 3) + 1;
    let split = usize::from((flags >> 2) & 31) + 1;
    let fails = flags & 0x80 != 0;
    let mut skipping = false;
    let mut pump = Pump::new(None, 4096);
    pump.stmts = Some(Box::new(TxnStatements::detached(Arc::new(Registry::default()), cache)));
    pump.attach();
    let (mut sent, mut at) = (Vec::new(), 0usize);
    let (mut got, mut got_at) = (Vec::new(), 0usize);
    for chunk in input.chunks(split) {
        let framed = match pump.frame_bytes(chunk) {
            Ok((framed, _)) => framed,
            Err(_) => return,
        };
        sent.extend_from_slice(&framed);
        let mut replies = Vec::new();
        for (kind, body) in whole(&sent, &mut at) {
            assert!(client_limit(kind).is_some(), "type {kind:?} sent to the server");
            answer_or_fail(kind, &sent[body], &mut skipping, fails, &mut replies);
        }
        let rest = sent.len() - at;
        assert!(rest == 0 || rest >= 5, "a partial header reached the server");
        assert_eq!(pump.mid_message(), rest > 0, "mid_message disagrees with what the server got");
        // Read the way the relay reads (scanned in place or copied, whichever the pump's state asks for).
        if pump.read_server(&replies).is_err() {
            return;
        }
        got.extend_from_slice(&pump.take_for_client());
        whole(&got, &mut got_at);
        assert_eq!(got_at, got.len(), "the client got part of a message");
    }
});
