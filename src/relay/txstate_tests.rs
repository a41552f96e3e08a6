//! The transaction-state machine's unit tests.

use super::*;

fn run(client: &[u8], server: &[(u8, u8)]) -> TxState {
    let mut t = TxState::default();
    for &k in client {
        t.client(k, Some(b'S'));
    }
    for &(k, b) in server {
        t.server(k, Some(b), false);
    }
    t
}

#[test]
fn simple_query_round_trip() {
    let t = run(b"Q", &[(b'T', 0), (b'D', 0), (b'C', 0), (b'Z', b'I')]);
    assert!(t.idle());
    let t = run(b"Q", &[(b'C', 0), (b'Z', b'T')]);
    assert!(t.settled() && !t.idle() && t.in_transaction());
}

#[test]
fn parse_error_skips_query_until_sync() {
    // Parse("bad"), Query, Sync: the server skips the Query and answers the Sync only.
    let t = run(b"PQS", &[(b'E', 0), (b'Z', b'I')]);
    assert!(t.idle(), "{t:?}");
}

#[test]
fn extended_batch_needs_its_sync() {
    let t = run(b"PBE", &[(b'1', 0), (b'2', 0), (b'C', 0)]);
    assert!(!t.idle() && t.needs_sync());
    let t = run(b"PBES", &[(b'1', 0), (b'2', 0), (b'C', 0), (b'Z', b'I')]);
    assert!(t.idle());
}

#[test]
fn sync_inside_copy_in_is_swallowed() {
    // Execute of COPY FROM STDIN, Sync, data..., CopyDone, Sync: one ReadyForQuery in all.
    let t = run(b"PBESdcS", &[(b'1', 0), (b'2', 0), (b'G', 0), (b'C', 0), (b'Z', b'I')]);
    assert!(t.idle(), "{t:?}");
}

#[test]
fn copy_fail_in_simple_query_then_ready() {
    let t = run(b"Qdf", &[(b'G', 0), (b'E', 0), (b'Z', b'I')]);
    assert!(t.idle(), "{t:?}");
    // CopyDone sent after the copy already failed on bad data is ignored at top level.
    let t = run(b"Qd", &[(b'G', 0), (b'E', 0), (b'Z', b'I')]);
    let mut t2 = t.clone();
    t2.client(b'c', None);
    assert!(t.idle() && t2.idle());
}

#[test]
fn copy_out_and_functioncall() {
    let t = run(b"Q", &[(b'H', 0), (b'd', 0), (b'c', 0), (b'C', 0), (b'Z', b'I')]);
    assert!(t.idle(), "{t:?}");
    let t = run(b"F", &[(b'V', 0), (b'Z', b'I')]);
    assert!(t.idle());
}

#[test]
fn unexpected_reply_is_uncertain() {
    let t = run(b"", &[(b'Z', b'I')]);
    assert!(t.uncertain() && !t.idle());
    let t = run(b"P", &[(b'2', 0)]);
    assert!(t.uncertain());
}

#[test]
fn a_client_that_stops_mid_batch_or_mid_copy_is_idle_in_transaction() {
    let t = run(b"PB", &[]);
    assert!(t.awaits_client() && t.in_transaction() && !t.settled());
    let t = run(b"PBE", &[]);
    assert!(!t.awaits_client(), "an Execute may still run");
    let t = run(b"Q", &[(b'G', 0)]);
    assert!(t.awaits_client() && t.in_transaction());
    let t = run(b"Q", &[(b'C', 0), (b'Z', b'I')]);
    assert!(t.awaits_client() && !t.in_transaction());
}

#[test]
fn a_sync_after_copy_data_in_a_failing_copy_cannot_be_placed() {
    // Bad data fails at once (the Sync is then read normally); a duplicate key fails at CopyDone (the Sync
    // was swallowed): Postgres's output is the same up to there, so the model must give up.
    let t = run(b"QdSc", &[(b'G', 0), (b'E', 0), (b'Z', b'I')]);
    assert!(t.uncertain() && !t.idle());
    // A Sync before any CopyData is always swallowed (libpq's Execute, Sync, then data).
    let t = run(b"PBESdcS", &[(b'1', 0), (b'2', 0), (b'G', 0), (b'E', 0), (b'Z', b'I')]);
    assert!(t.idle() && !t.uncertain(), "{t:?}");
    // And a copy that succeeds swallowed every Sync before its CopyDone.
    let t = run(b"QdSdc", &[(b'G', 0), (b'C', 0), (b'Z', b'I')]);
    assert!(t.idle(), "{t:?}");
}

#[test]
fn extended_messages_after_a_sync_keep_the_batch_open() {
    // Bind/Execute/Sync, then Bind/Execute/Flush: the first ReadyForQuery does not end the second batch.
    let t = run(b"BESBEH", &[(b'2', 0), (b'D', 0), (b'C', 0), (b'Z', b'I'), (b'2', 0), (b'D', 0), (b'C', 0)]);
    assert!(!t.idle() && t.needs_sync() && t.in_transaction(), "{t:?}");
    let t = run(b"QBEH", &[(b'C', 0), (b'Z', b'I'), (b'2', 0), (b'C', 0)]);
    assert!(!t.idle() && t.needs_sync(), "{t:?}");
}

#[test]
fn fatal_error_ends_it() {
    let mut t = TxState::default();
    t.server(b'E', None, true);
    assert!(t.fatal() && !t.idle());
}
