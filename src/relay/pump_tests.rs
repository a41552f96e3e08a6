//! In-process tests of the pump over tokio duplex pipes: a scripted server stands in for Postgres.

use super::pump::{Event, Pump, PumpError};
use crate::protocol;
use bytes::BytesMut;
use std::future::poll_fn;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

fn query(sql: &str) -> BytesMut {
    let mut b = BytesMut::new();
    protocol::simple_query(&mut b, sql);
    b
}

/// Read one whole message from a pipe: (type, body).
async fn read_msg(s: &mut DuplexStream) -> Option<(u8, Vec<u8>)> {
    let mut h = [0u8; 5];
    s.read_exact(&mut h).await.ok()?;
    let len = i32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).await.ok()?;
    Some((h[0], body))
}

/// A server like Postgres in one respect: it answers each Query (a DataRow of `row` bytes, CommandComplete,
/// ReadyForQuery) and writes the whole reply before it reads the next message.
async fn blocking_server(mut s: DuplexStream, row: usize) {
    while let Some((kind, _)) = read_msg(&mut s).await {
        if kind != b'Q' {
            continue;
        }
        let mut out = BytesMut::new();
        let at = protocol::begin(&mut out, b'D');
        out.extend_from_slice(&vec![b'r'; row]);
        protocol::finish(&mut out, at);
        protocol::command_complete(&mut out, "SELECT 1");
        protocol::ready_for_query(&mut out, b'I');
        if s.write_all(&out).await.is_err() {
            return;
        }
    }
}

async fn pump_until(pump: &mut Pump, client: &mut DuplexStream, server: &mut DuplexStream) -> Result<Event, PumpError> {
    loop {
        match poll_fn(|cx| pump.poll_pump(cx, client, server)).await? {
            Event::Report => {
                pump.seen = Default::default();
            }
            ev => return Ok(ev),
        }
    }
}

#[tokio::test]
async fn pipelined_burst_with_a_concurrent_reader_never_deadlocks() {
    // Small pipes: the burst (20 MB each way) is far larger than every buffer on the path.
    let (mut app_side, mut client) = tokio::io::duplex(64 * 1024);
    let (mut server, pg_side) = tokio::io::duplex(64 * 1024);
    tokio::spawn(blocking_server(pg_side, 100_000));
    let (mut app_read, mut app_write) = tokio::io::split(app_side_take(&mut app_side));
    let writer = tokio::spawn(async move {
        let big = query(&format!("select '{}'", "x".repeat(100_000)));
        for _ in 0..200 {
            app_write.write_all(&big).await.unwrap();
        }
        app_write
    });
    let reader = tokio::spawn(async move {
        let mut ready = 0;
        let mut sc = crate::relay::frame::ServerScanner::default();
        let mut buf = vec![0u8; 64 * 1024];
        while ready < 200 {
            let n = app_read.read(&mut buf).await.unwrap();
            assert!(n > 0, "pipe closed after {ready} replies");
            sc.feed(&buf[..n], |m| ready += u32::from(m.kind == b'Z')).unwrap();
        }
        ready
    });
    let mut pump = Pump::new(None, 1 << 20);
    pump.attach();
    let pumping = async {
        loop {
            let ev = pump_until(&mut pump, &mut client, &mut server).await;
            if !matches!(ev, Ok(Event::Idle)) {
                return ev;
            }
        }
    };
    let done = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::select! {
            r = reader => r.unwrap(),
            ev = pumping => panic!("pump stopped: {ev:?}"),
        }
    })
    .await
    .expect("200 pipelined replies within 20 s");
    assert_eq!(done, 200);
    writer.await.unwrap();
}

/// Move the app's end of a duplex out of its slot (split needs ownership).
fn app_side_take(s: &mut DuplexStream) -> DuplexStream {
    std::mem::replace(s, tokio::io::duplex(1).0)
}

#[tokio::test]
async fn a_partial_header_stays_with_the_client_and_the_server_is_releasable() {
    let (mut app, mut client) = tokio::io::duplex(64 * 1024);
    let (mut server, mut pg) = tokio::io::duplex(64 * 1024);
    let mut bytes = query("select 1");
    let q_len = bytes.len();
    bytes.extend_from_slice(&[b'P', 0, 0]);
    app.write_all(&bytes).await.unwrap();
    let mut pump = Pump::new(None, 1 << 20);
    pump.attach();
    pump.stop_at_idle = true;
    let pg_task = tokio::spawn(async move {
        let mut got = vec![0u8; q_len];
        pg.read_exact(&mut got).await.unwrap();
        let mut out = BytesMut::new();
        protocol::ready_for_query(&mut out, b'I');
        pg.write_all(&out).await.unwrap();
        // Nothing more may arrive: the 3 header bytes are the client's, not this server's.
        let mut more = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_millis(200), pg.read(&mut more)).await;
        assert!(r.is_err(), "the server received bytes of a header: {r:?}");
        got
    });
    let ev = pump_until(&mut pump, &mut client, &mut server).await.unwrap();
    assert_eq!(ev, Event::Idle);
    assert!(pump.releasable() && !pump.mid_message());
    assert_eq!(&pump.cin[..], &[b'P', 0, 0]);
    assert_eq!(pg_task.await.unwrap(), &bytes[..q_len]);
}

#[tokio::test]
async fn a_client_gone_mid_body_leaves_the_server_mid_message() {
    let (mut app, mut client) = tokio::io::duplex(64 * 1024);
    let (mut server, _pg) = tokio::io::duplex(64 * 1024);
    app.write_all(&[b'Q', 0, 0, 0, 104]).await.unwrap();
    app.write_all(&[b'x'; 10]).await.unwrap();
    drop(app);
    let mut pump = Pump::new(None, 1 << 20);
    pump.attach();
    let ev = pump_until(&mut pump, &mut client, &mut server).await.unwrap();
    assert_eq!(ev, Event::ClientClosed);
    assert!(pump.mid_message() && !pump.releasable());
}

#[tokio::test]
async fn terminate_is_not_forwarded() {
    let (mut app, mut client) = tokio::io::duplex(1024);
    let (mut server, mut pg) = tokio::io::duplex(1024);
    app.write_all(&protocol::TERMINATE).await.unwrap();
    let mut pump = Pump::new(None, 1 << 20);
    pump.attach();
    assert_eq!(pump_until(&mut pump, &mut client, &mut server).await.unwrap(), Event::Terminate);
    let mut b = [0u8; 1];
    assert!(tokio::time::timeout(Duration::from_millis(50), pg.read(&mut b)).await.is_err());
}

#[tokio::test]
async fn held_messages_are_capped_without_allocating_the_declared_length() {
    let (mut app, mut client) = tokio::io::duplex(64 * 1024);
    let (mut server, _pg) = tokio::io::duplex(1024);
    // A Query declaring 300 MiB on a read-only route (Queries are read whole there).
    app.write_all(&[b'Q', 0x12, 0xC0, 0, 0]).await.unwrap();
    app.write_all(&[b'x'; 4096]).await.unwrap();
    let mut pump = Pump::new(Some(crate::read_only::filter::RoFilter::new("app_ro")), 1 << 20);
    pump.attach();
    let r = pump_until(&mut pump, &mut client, &mut server).await;
    assert!(matches!(r, Err(PumpError::TooLarge { kind: 'Q', max: 1048576, .. })), "{r:?}");
    assert!(pump.cin.capacity() <= 64 * 1024, "capacity {}", pump.cin.capacity());
}

#[tokio::test]
async fn invalid_message_types_and_lengths_are_refused_before_forwarding() {
    for bad in [&[b'Z', 0, 0, 0, 4][..], &[b'Q', 0, 0, 0, 3], &[b'Q', 0xff, 0xff, 0xff, 0xff], &[b'S', 0, 1, 0, 0]] {
        let (mut app, mut client) = tokio::io::duplex(1024);
        let (mut server, mut pg) = tokio::io::duplex(1024);
        app.write_all(bad).await.unwrap();
        let mut pump = Pump::new(None, 1 << 20);
        pump.attach();
        let r = pump_until(&mut pump, &mut client, &mut server).await;
        assert!(matches!(r, Err(PumpError::BadType(_) | PumpError::BadLength { .. })), "{bad:?}: {r:?}");
        let mut b = [0u8; 1];
        assert!(tokio::time::timeout(Duration::from_millis(20), pg.read(&mut b)).await.is_err(), "{bad:?} forwarded");
    }
}

mod props {
    use super::super::pump::Pump;
    use crate::protocol;
    use bytes::BytesMut;
    use proptest::prelude::*;

    /// A valid frontend message of a pass-through or held type.
    fn message() -> impl Strategy<Value = Vec<u8>> {
        let kinds = prop::sample::select(vec![b'Q', b'P', b'B', b'E', b'S', b'H', b'd', b'c', b'F', b'C', b'D']);
        (kinds, prop::collection::vec(any::<u8>(), 0..300)).prop_map(|(k, mut body)| {
            if k == b'D' || k == b'C' {
                body.insert(0, b'S');
            }
            if k == b'c' || k == b'S' || k == b'H' {
                body.clear();
            }
            let mut b = BytesMut::new();
            let at = protocol::begin(&mut b, k);
            b.extend_from_slice(&body);
            protocol::finish(&mut b, at);
            b.to_vec()
        })
    }

    /// A server message the client gets as is: rows, completions, notices, notifications, settings, ready.
    fn server_message() -> impl Strategy<Value = Vec<u8>> {
        let kinds = prop::sample::select(vec![b'D', b'd', b'C', b'N', b'A', b'S', b'Z', b'T', b'2']);
        (kinds, prop::collection::vec(any::<u8>(), 0..300)).prop_map(|(k, mut body)| {
            match k {
                b'Z' => body = vec![b'I'],
                b'2' => body.clear(),
                b'S' => body = b"application_name\0x\0".to_vec(),
                b'A' => body = [&7i32.to_be_bytes()[..], b"ch\0payload\0"].concat(),
                _ => {}
            }
            let mut b = BytesMut::new();
            let at = protocol::begin(&mut b, k);
            b.extend_from_slice(&body);
            protocol::finish(&mut b, at);
            b.to_vec()
        })
    }

    /// Offsets at which a header is incomplete (inside bytes 1..5 of a message).
    fn inside_header(msgs: &[Vec<u8>], at: usize) -> bool {
        let mut pos = 0;
        for m in msgs {
            if at > pos && at < pos + 5 {
                return true;
            }
            pos += m.len();
        }
        false
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Whatever the split, valid messages come out byte for byte, and a server never gets part of a header.
        #[test]
        fn framing_is_lossless_and_never_splits_a_header(
            msgs in prop::collection::vec(message(), 1..20),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let all: Vec<u8> = msgs.concat();
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(all.len() + 1)).collect();
            points.push(all.len());
            points.sort_unstable();
            let mut pump = Pump::new(None, 1 << 20);
            let (mut out, mut prev) = (Vec::new(), 0);
            for p in points {
                let (framed, ev) = pump.frame_bytes(&all[prev..p]).unwrap();
                prop_assert!(ev.is_none());
                out.extend_from_slice(&framed);
                prop_assert!(!inside_header(&msgs, out.len()), "forwarded part of a header at {}", out.len());
                prev = p;
            }
            prop_assert_eq!(out, all);
        }

        /// Arbitrary bytes: framing answers (bytes or an error), never panics, and never emits more than it got.
        #[test]
        fn arbitrary_client_bytes_never_panic(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 1..16), ro in any::<bool>()) {
            let filter = ro.then(|| crate::read_only::filter::RoFilter::new("ro"));
            let mut pump = Pump::new(filter, 4096);
            let mut fed = 0usize;
            let mut emitted = 0usize;
            for c in &chunks {
                fed += c.len();
                match pump.frame_bytes(c) {
                    Ok((framed, _)) => emitted += framed.len(),
                    Err(_) => break,
                }
                if !ro {
                    prop_assert!(emitted <= fed);
                }
            }
        }

        /// Whatever the reads' split and however each read is scanned (in place, or copied because edits
        /// became due or stopped being due between two reads), server bytes reach the client byte for byte.
        /// A read that ended inside a header and was scanned the other way next duplicated the header's
        /// first bytes (a COPY OUT read by tokio-postgres, which pipelines a Close meanwhile, hung on it).
        #[test]
        fn server_bytes_pass_whole_whichever_way_each_read_is_scanned(
            msgs in prop::collection::vec(server_message(), 1..24),
            reads in prop::collection::vec((any::<prop::sample::Index>(), any::<bool>(), any::<bool>()), 0..12),
        ) {
            let all: Vec<u8> = msgs.concat();
            let mut reads: Vec<(usize, bool, bool)> = reads.iter().map(|(c, l, p)| (c.index(all.len() + 1), *l, *p)).collect();
            reads.push((all.len(), false, false));
            reads.sort_unstable_by_key(|r| r.0);
            let mut pump = Pump::new(None, 1 << 20);
            pump.attach();
            pump.servers = Some(crate::server::ServerList::default());
            let (mut out, mut prev) = (Vec::new(), 0);
            for (at, listening, probe) in reads {
                pump.listening = listening;
                pump.probe_due = probe;
                pump.read_server(&all[prev..at]).unwrap();
                out.extend_from_slice(&pump.take_for_client());
                prev = at;
            }
            prop_assert_eq!(out, all);
        }

        /// With named statements, server errors that name one reach the client with the client's name for it,
        /// and everything else byte for byte, whatever the reads' split and however each read is scanned
        /// (the in-place scan stops at such an error and copies the rest, also after a body split across reads).
        #[test]
        fn errors_name_client_statements_whichever_way_each_read_is_scanned(
            msgs in prop::collection::vec(prop_oneof![server_message(), Just(Vec::new())], 1..24),
            reads in prop::collection::vec((any::<prop::sample::Index>(), any::<bool>()), 0..12),
        ) {
            use crate::relay::pump::rewrite::TxnStatements;
            let mut stmts = TxnStatements::detached(std::sync::Arc::new(crate::server::statements::Registry::default()), 200);
            let stmt = stmts.registry.intern(b"select $1::int\0\0\0", "");
            stmts.client.insert("mine".into(), stmt.clone());
            let error = |name: &str| {
                let mut b = BytesMut::new();
                let at = protocol::begin(&mut b, b'E');
                b.extend_from_slice(format!("SERROR\0C08P01\0Mprepared statement \"{name}\" requires 2\0\0").as_bytes());
                protocol::finish(&mut b, at);
                b.to_vec()
            };
            // An empty message stands for an error naming the statement.
            let all: Vec<u8> = msgs.iter().map(|m| if m.is_empty() { error(&stmt.name) } else { m.clone() }).collect::<Vec<_>>().concat();
            let want: Vec<u8> = msgs.iter().map(|m| if m.is_empty() { error("mine") } else { m.clone() }).collect::<Vec<_>>().concat();
            let mut reads: Vec<(usize, bool)> = reads.iter().map(|(c, p)| (c.index(all.len() + 1), *p)).collect();
            reads.push((all.len(), false));
            reads.sort_unstable_by_key(|r| r.0);
            let mut pump = Pump::new(None, 1 << 20);
            pump.attach();
            pump.stmts = Some(Box::new(stmts));
            pump.servers = Some(crate::server::ServerList::default());
            let (mut out, mut prev) = (Vec::new(), 0);
            for (at, probe) in reads {
                pump.probe_due = probe;
                pump.read_server(&all[prev..at]).unwrap();
                out.extend_from_slice(&pump.take_for_client());
                prev = at;
            }
            prop_assert_eq!(out, want);
        }

        /// The in-place scan's shortcut for plain messages leaves the transaction state and the report
        /// exactly as the general walk does (the copying scan never takes it), whatever the client has
        /// outstanding, the server answers and the reads' split.
        #[test]
        fn the_plain_message_shortcut_follows_the_state_as_the_walk_does(
            client in prop::collection::vec(prop::sample::select(vec![b'Q', b'P', b'B', b'E', b'S', b'D', b'C', b'H', b'F', b'd', b'c']), 0..12),
            server in prop::collection::vec((prop::sample::select(vec![b'1', b'2', b'3', b'C', b'D', b'E', b'G', b'I', b'N', b'S', b'T', b'n', b's', b't', b'Z', b'H', b'c', b'd']), any::<u8>()), 0..24),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let mut all = BytesMut::new();
            for (k, b) in &server {
                let at = protocol::begin(&mut all, *k);
                match k {
                    b'Z' => all.extend_from_slice(&[[b'I', b'T', b'E'][*b as usize % 3]]),
                    b'E' => all.extend_from_slice(b"SERROR\0C42601\0Mx\0\0"),
                    b'S' => all.extend_from_slice(b"application_name\0x\0"),
                    _ => all.extend_from_slice(&vec![*b; *b as usize % 7]),
                }
                protocol::finish(&mut all, at);
            }
            let (mut shortcut, mut walk) = (Pump::new(None, 1 << 20), Pump::new(None, 1 << 20));
            for p in [&mut shortcut, &mut walk] {
                p.attach();
                for k in &client {
                    p.tx.client(*k, Some(b'S'));
                }
            }
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(all.len() + 1)).collect();
            cuts.push(all.len());
            cuts.sort_unstable();
            let (mut prev, mut fed, mut walked) = (0, Vec::new(), Vec::new());
            for at in cuts {
                let a = shortcut.read_server(&all[prev..at]);
                let b = walk.feed_server(&all[prev..at]);
                prop_assert_eq!(a.is_ok(), b.is_ok());
                fed.extend_from_slice(&shortcut.take_for_client());
                walked.extend_from_slice(&b.unwrap_or_default());
                prev = at;
            }
            prop_assert_eq!(&walked[..], &all[..]);
            prop_assert_eq!(format!("{:?}", shortcut.tx), format!("{:?}", walk.tx));
            prop_assert_eq!((shortcut.seen.ready, shortcut.seen.idle_ready), (walk.seen.ready, walk.seen.idle_ready));
            prop_assert_eq!(&fed[..], &all[..]);
        }

        /// Arbitrary server bytes never panic the scanner or the transaction-state machine.
        #[test]
        fn arbitrary_server_bytes_never_panic(client in prop::collection::vec(any::<u8>(), 0..32), server in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut pump = Pump::new(None, 1 << 20);
            for k in client {
                pump.tx.client(k, Some(b'S'));
            }
            let _ = pump.absorb_server(&server);
            let _ = (pump.tx.idle(), pump.tx.outstanding());
        }
    }
}

/// Run `n` queries one after another through `pump`, each answered by `blocking_server` with a `row`-byte
/// DataRow; returns the largest buffer capacity the pump held after any of them.
async fn round_trips(pump: &mut Pump, n: usize, row: usize) -> usize {
    let (mut app, mut client) = tokio::io::duplex(256 * 1024);
    let (mut server, pg_side) = tokio::io::duplex(256 * 1024);
    tokio::spawn(blocking_server(pg_side, row));
    pump.attach();
    let mut peak = 0;
    for i in 0..n {
        app.write_all(&query(&format!("select {i}"))).await.unwrap();
        let reply = async {
            let mut sc = crate::relay::frame::ServerScanner::default();
            let mut buf = vec![0u8; 64 * 1024];
            let mut ready = false;
            while !ready {
                let n = app.read(&mut buf).await.unwrap();
                assert!(n > 0, "pipe closed");
                sc.feed(&buf[..n], |m| ready |= m.kind == b'Z').unwrap();
            }
        };
        let pumping = async {
            match pump_until(pump, &mut client, &mut server).await {
                Ok(Event::Idle) => {}
                ev => panic!("pump stopped: {ev:?}"),
            }
        };
        tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(reply, pumping) })
            .await
            .expect("a reply within 10 s");
        peak = peak.max(pump.buffer_capacity());
    }
    peak
}

#[tokio::test]
async fn short_replies_never_grow_buffers_to_full_chunks() {
    let mut pump = Pump::new(None, 1 << 20);
    pump.stop_at_idle = true;
    let peak = round_trips(&mut pump, 200, 100).await;
    // Two directions of short messages: a first chunk each (the old reservation was 16 KiB a side).
    assert!(peak <= 3 * super::pump::BUF / 4, "buffers held {peak} bytes for 100-byte replies");
}

#[tokio::test]
async fn a_large_reply_stream_reaches_full_size_reads() {
    let mut pump = Pump::new(None, 1 << 20);
    pump.stop_at_idle = true;
    let peak = round_trips(&mut pump, 5, 400_000).await;
    assert!(peak >= super::pump::BUF, "a 400 kB reply was read in chunks of at most {peak} bytes");
    // Given back when idle; the next short exchange starts small again.
    pump.shrink();
    assert_eq!(pump.buffer_capacity(), 0);
    let again = round_trips(&mut pump, 20, 100).await;
    assert!(again <= 3 * super::pump::BUF / 4, "after shrink: {again} bytes");
}
