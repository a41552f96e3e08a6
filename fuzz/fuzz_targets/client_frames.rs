//! Client bytes through the pump's framer, split into arbitrary reads.
//!
//! Input: byte 0 is flags (bit 0: read-only filter; bits 1..=3: `k`, the number of split bytes that
//! follow), then `k` chunk sizes (each + 1, used in turn), then the client stream. Checked: nothing is
//! invented or lost (framed + still buffered == fed, without the filter the framed bytes are exactly a
//! prefix of the input), a header is never split, the message sequence the server sees has the client's
//! message types in order (the filter rewrites bodies, never counts), `mid_message` and
//! `next_client_kind` agree with the framed stream, and every error names a header that really is bad.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgbudget::read_only::filter::RoFilter;
use pgbudget::relay::frame::client_limit;
use pgbudget::relay::pump::{Event, Pump, PumpError};

const MAX_QUERY_SIZE: usize = 4096;

/// Walk `bytes` by 5-byte headers: the message types whose header is wholly inside, and where the walk
/// stopped: `Ok(body bytes still missing)` at the end, or `Err(offset)` if it ends inside a header.
fn headers(bytes: &[u8]) -> (Vec<u8>, Result<usize, usize>) {
    let mut kinds = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        if bytes.len() - at < 5 {
            return (kinds, Err(at));
        }
        let len = i32::from_be_bytes([bytes[at + 1], bytes[at + 2], bytes[at + 3], bytes[at + 4]]);
        assert!(len >= 4, "framed a header with length {len} at {at}");
        kinds.push(bytes[at]);
        let end = at + 1 + len as usize;
        if end > bytes.len() {
            return (kinds, Ok(end - bytes.len()));
        }
        at = end;
    }
    (kinds, Ok(0))
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let filtered = flags & 1 == 1;
    let k = usize::from((flags >> 1) & 7).min(rest.len());
    let (sizes, input) = rest.split_at(k);

    let ro = filtered.then(|| RoFilter::new("ro"));
    let mut pump = Pump::new(ro, MAX_QUERY_SIZE);
    let mut framed: Vec<u8> = Vec::new();
    let mut fed = 0usize;
    let mut terminated = false;
    let mut i = 0usize;
    while fed < input.len() {
        let n = if sizes.is_empty() { input.len() } else { usize::from(sizes[i % sizes.len()]) + 1 };
        i += 1;
        let chunk = &input[fed..(fed + n).min(input.len())];
        fed += chunk.len();
        match pump.frame_bytes(chunk) {
            Ok((bytes, ev)) => {
                framed.extend_from_slice(&bytes);
                match ev {
                    None => {}
                    Some(Event::Terminate) => {
                        terminated = true;
                        break;
                    }
                    Some(other) => panic!("frame_bytes returned event {other:?}"),
                }
            }
            Err(e) => {
                check_error(&pump, &e, filtered);
                return;
            }
        }
        check(&pump, &input[..fed], &framed, filtered);
    }
    if !terminated {
        check(&pump, &input[..fed], &framed, filtered);
    } else if !filtered {
        assert!(input[..fed].starts_with(&framed), "framed bytes before Terminate are not a prefix of the input");
    }
});

fn check(pump: &Pump, fed: &[u8], framed: &[u8], filtered: bool) {
    let cin = &pump.cin[..];
    let consumed = fed.len() - cin.len();
    assert!(fed.ends_with(cin), "the pump's input buffer is not the unframed tail of what was fed");
    if !filtered {
        assert!(framed.len() <= fed.len(), "framed {} bytes of {} fed", framed.len(), fed.len());
        assert_eq!(framed, &fed[..framed.len()], "framed bytes are not a prefix of the input");
        assert_eq!(framed.len(), consumed, "framed + buffered != fed");
    }
    // The server never sees part of a header, and the body it is owed is what the pump still forwards.
    let (out_kinds, out_end) = headers(framed);
    let owed = match out_end {
        Ok(owed) => owed,
        Err(at) => panic!("framed stream ends inside a header at {at} of {}", framed.len()),
    };
    assert_eq!(pump.mid_message(), owed > 0, "mid_message disagrees with the framed stream (owed {owed})");
    // Same message types, in order, as the client sent (held messages are framed whole or not at all).
    // A read-only route refuses a FunctionCall by a Query that raises (the same reply shape).
    let (in_kinds, _) = headers(&fed[..consumed]);
    let in_kinds: Vec<u8> = in_kinds.into_iter().map(|k| if filtered && k == b'F' { b'Q' } else { k }).collect();
    assert_eq!(out_kinds, in_kinds, "the server sees other message types than the client sent");
    assert_eq!(pump.next_client_kind(), (owed == 0 && cin.len() >= 5).then(|| cin[0]));
}

/// An error must be about the header at the front of the unframed input.
fn check_error(pump: &Pump, e: &PumpError, filtered: bool) {
    if pump.mid_message() {
        panic!("error {e:?} in the middle of a pass-through body");
    }
    let cin = &pump.cin[..];
    assert!(cin.len() >= 5, "error {e:?} without a whole header buffered");
    let kind = cin[0];
    let len = i32::from_be_bytes([cin[1], cin[2], cin[3], cin[4]]);
    match e {
        PumpError::BadType(c) => {
            assert_eq!(*c, kind as char);
            assert!(client_limit(kind).is_none(), "{kind:?} refused as a bad type");
        }
        PumpError::BadLength { kind: c, len: l } => {
            assert_eq!((*c, *l), (kind as char, len as i64));
            let limit = client_limit(kind).expect("BadLength for an unknown type");
            assert!(len < 4 || len as usize - 4 > limit, "length {len} of {kind:?} refused (limit {limit})");
        }
        PumpError::TooLarge { kind: c, len: l, max } => {
            assert_eq!(*c, kind as char);
            assert_eq!(*max, MAX_QUERY_SIZE);
            assert!(*l > MAX_QUERY_SIZE && *l == len as usize - 4);
            // A read-only route reads FunctionCall and Sync whole too (it refuses the one, looks between batches at
            // the other).
            let held = matches!(kind, b'D' | b'X') || (filtered && matches!(kind, b'Q' | b'P' | b'B' | b'F' | b'S'));
            assert!(held, "TooLarge for {kind:?}, which streams");
        }
        PumpError::Filter(_) => {
            assert!(filtered && matches!(kind, b'Q' | b'P' | b'B' | b'F'), "filter error for {kind:?}");
        }
        other => panic!("unexpected error from frame_bytes: {other:?}"),
    }
}
