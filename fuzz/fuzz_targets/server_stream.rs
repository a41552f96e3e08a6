//! Server bytes through the pump's scanner and the transaction-state machine.
//!
//! Input: byte 0 is `n`, then `n` (kind, first body byte) pairs given to `tx.client`, then one byte of
//! chunk size (+ 1), then the server stream, fed to `absorb_server` in chunks of that size. Must never
//! panic; the state's own queries must agree with each other after every chunk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgbudget::relay::pump::Pump;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else { return };
    let pairs = usize::from(n).min(rest.len() / 2);
    let (kinds, rest) = rest.split_at(pairs * 2);
    let (chunk, server) = match rest.split_first() {
        Some((&c, s)) => (usize::from(c) + 1, s),
        None => (1, &[][..]),
    };

    let mut pump = Pump::new(None, 4096);
    for p in kinds.chunks_exact(2) {
        pump.tx.client(p[0], Some(p[1]));
    }
    check(&pump, pairs, (false, false));
    let mut sticky = (pump.tx.uncertain(), pump.tx.fatal());
    for c in server.chunks(chunk) {
        if pump.absorb_server(c).is_err() {
            break;
        }
        check(&pump, pairs, sticky);
        sticky = (pump.tx.uncertain(), pump.tx.fatal());
    }
    check(&pump, pairs, sticky);
});

fn check(pump: &Pump, sent: usize, (was_uncertain, was_fatal): (bool, bool)) {
    let tx = &pump.tx;
    let (idle, settled) = (tx.idle(), tx.settled());
    let _ = (tx.in_transaction(), tx.awaits_client());
    if idle {
        assert!(settled && tx.status() == b'I', "idle but not settled in status I");
    }
    if settled {
        assert_eq!(tx.outstanding(), 0, "settled with replies owed");
        assert!(!tx.copy_in() && !tx.needs_sync() && !tx.uncertain() && !tx.fatal(), "settled but {tx:?}");
    }
    assert!(tx.outstanding() <= sent, "{} owed for {sent} client messages", tx.outstanding());
    assert!(tx.uncertain() || !was_uncertain, "uncertain was cleared");
    assert!(tx.fatal() || !was_fatal, "fatal was cleared");
    // Nothing was framed from a client here, so release depends on the server side alone.
    assert_eq!(pump.releasable(), idle && pump.server_at_boundary());
    assert!(!pump.mid_message() && pump.unsent().is_empty());
}
