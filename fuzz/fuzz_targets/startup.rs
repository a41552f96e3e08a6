//! Startup packets: `read_startup_into` over the raw bytes, then `negotiation` for each StartupMessage.
//!
//! Packets are read one after another from the same input into one reused buffer, as a session does
//! after refusing SSL/GSSENC. Checked: the buffer grows with the bytes that arrived, never by a declared
//! length (capacity at most the input length + [`SLACK`]) and never past `MAX_PREAUTH_LEN`, and a
//! NegotiateProtocolVersion is one well-formed message. Run with `-max_len=16384` to reach packets of the
//! full 8 KiB after an SSL/GSSENC request.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgbudget::protocol::{negotiation, read_startup_into, StartupPacket, MAX_PREAUTH_LEN, NEWEST_MINOR};
use std::sync::OnceLock;

/// What the buffer may hold beyond the input: reads are 1 KiB at a time and a growing buffer at most
/// doubles, so a packet of `n` body bytes never needs more than `n` + 4 KiB; a declared length of up to
/// 8 KiB with nothing behind it must cost about 1 KiB.
const SLACK: usize = 4 * 1024 + 1024;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("runtime"))
}

fuzz_target!(|data: &[u8]| {
    let mut r: &[u8] = data;
    let mut buf = BytesMut::new();
    runtime().block_on(async {
        // At most a handful of packets: SSL, GSSENC, then the StartupMessage.
        for _ in 0..4 {
            let before = r.len();
            let res = read_startup_into(&mut r, &mut buf).await;
            assert!(
                buf.capacity() <= data.len() + SLACK,
                "buffer capacity {} for {} input bytes",
                buf.capacity(),
                data.len()
            );
            // MAX_PREAUTH_LEN: "nothing an unauthenticated client sends may cost more memory than this".
            assert!(buf.capacity() <= MAX_PREAUTH_LEN, "buffer capacity {} over MAX_PREAUTH_LEN", buf.capacity());
            match res {
                Ok(StartupPacket::Startup { startup, minor }) => {
                    let _ = (startup.user(), startup.database());
                    match negotiation(&startup, minor) {
                        Some(out) => {
                            assert_eq!(out[0], b'v');
                            let len = i32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
                            assert_eq!(len + 1, out.len(), "NegotiateProtocolVersion length");
                            let n = i32::from_be_bytes([out[9], out[10], out[11], out[12]]);
                            let unknown = startup.params.keys().filter(|k| k.starts_with("_pq_.")).count();
                            assert_eq!(n as usize, unknown);
                        }
                        None => {
                            assert!(minor <= NEWEST_MINOR);
                            assert!(!startup.params.keys().any(|k| k.starts_with("_pq_.")));
                        }
                    }
                    return;
                }
                Ok(StartupPacket::Ssl | StartupPacket::GssEnc) => {}
                Ok(StartupPacket::Cancel { .. }) | Err(_) => return,
            }
            assert!(r.len() < before, "a packet was read from no bytes");
        }
    });
});
