//! In-process tests of the pump's pacing toward a server that has not answered: a client streaming a
//! batch is held back about as much as a direct connection would hold it (so a driver sees an early error
//! while it still sends), and never where the server owes nothing or answers only at the end.

use super::pump::{Event, Pump, PumpError};
use crate::protocol::{self, Severity};
use bytes::BytesMut;
use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Rows of the batch and the size of each (asyncpg's `executemany` test: 128 rows of 32 KiB).
const ROWS: usize = 128;
const ROW: usize = 32 * 1024;

fn msg(kind: u8, body_len: usize) -> BytesMut {
    let mut b = BytesMut::new();
    let at = protocol::begin(&mut b, kind);
    b.extend_from_slice(&vec![b'x'; body_len]);
    protocol::finish(&mut b, at);
    b
}

async fn read_msg(s: &mut DuplexStream) -> Option<(u8, usize)> {
    let mut h = [0u8; 5];
    s.read_exact(&mut h).await.ok()?;
    let len = i32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).await.ok()?;
    Some((h[0], body.len()))
}

/// Pump until the client side ends (or an error), answering reports.
async fn pump_all(mut pump: Pump, mut client: DuplexStream, mut server: DuplexStream) -> Result<Event, PumpError> {
    loop {
        match poll_fn(|cx| pump.poll_pump(cx, &mut client, &mut server)).await? {
            Event::Report | Event::Idle => pump.seen = Default::default(),
            ev => return Ok(ev),
        }
    }
}

/// The client of the test: writes the batch (one Bind of [`ROW`] bytes per row, then Sync), counting the
/// bytes its writes have handed over, while it reads concurrently; returns the bytes written when the
/// first ErrorResponse came in, and the replies up to ReadyForQuery.
async fn stream_batch(app: DuplexStream, written: Arc<AtomicUsize>) -> (Option<usize>, Vec<u8>) {
    let (mut rd, mut wr) = tokio::io::split(app);
    let w = written.clone();
    let writer = tokio::spawn(async move {
        for _ in 0..ROWS {
            let m = msg(b'B', ROW);
            wr.write_all(&m).await.unwrap();
            w.fetch_add(m.len(), Ordering::SeqCst);
        }
        wr.write_all(&msg(b'S', 0)).await.unwrap();
        wr
    });
    let mut sc = crate::relay::frame::ServerScanner::default();
    let (mut kinds, mut at_error, mut done) = (Vec::new(), None, false);
    let mut buf = vec![0u8; 64 * 1024];
    while !done {
        let n = rd.read(&mut buf).await.unwrap();
        assert!(n > 0, "the proxy closed the client");
        sc.feed(&buf[..n], |m| {
            if m.kind == b'E' && at_error.is_none() {
                at_error = Some(written.load(Ordering::SeqCst));
            }
            done |= m.kind == b'Z';
            kinds.push(m.kind);
        })
        .unwrap();
    }
    let _wr = writer.await.unwrap();
    (at_error, kinds)
}

#[tokio::test]
async fn a_batch_to_a_server_that_has_not_answered_is_held_back_until_it_does() {
    // The server side has room for the whole batch (an old pooled connection whose socket buffers grew);
    // the client's is small, as a new connection's is.
    let (app, client) = tokio::io::duplex(64 * 1024);
    let (server, mut pg) = tokio::io::duplex(8 << 20);
    let written = Arc::new(AtomicUsize::new(0));
    let w = written.clone();
    // Like Postgres on `INSERT` of a duplicate key: the first row takes a while, then fails; the rest of the
    // batch is read and skipped up to Sync.
    let pg_task = tokio::spawn(async move {
        let first = read_msg(&mut pg).await.expect("first row");
        assert_eq!(first.0, b'B');
        tokio::time::sleep(Duration::from_millis(200)).await;
        let sent_meanwhile = w.load(Ordering::SeqCst);
        let mut out = BytesMut::new();
        protocol::error_response(&mut out, Severity::Error, "23505", "duplicate key value", None);
        pg.write_all(&out).await.unwrap();
        while let Some((kind, _)) = read_msg(&mut pg).await {
            if kind == b'S' {
                let mut z = BytesMut::new();
                protocol::ready_for_query(&mut z, b'I');
                pg.write_all(&z).await.unwrap();
                break;
            }
        }
        sent_meanwhile
    });
    let mut pump = Pump::new(None, 1 << 20);
    pump.attach();
    let pumping = tokio::spawn(pump_all(pump, client, server));
    let (at_error, kinds) =
        tokio::time::timeout(Duration::from_secs(20), stream_batch(app, written)).await.expect("batch ends in 20 s");
    let meanwhile = pg_task.await.unwrap();
    pumping.abort();
    assert_eq!(kinds, b"EZ", "the error, then ReadyForQuery");
    let total = ROWS * (ROW + 5);
    // Direct, the client is held by its own socket while Postgres works on the first row; through the proxy
    // it may get the proxy's window (256 KiB) and buffers ahead, never the whole batch into an idle server.
    assert!(meanwhile <= 640 * 1024, "{meanwhile} of {total} bytes went out while the server had not answered");
    let at_error = at_error.expect("an error");
    assert!(at_error < total, "the error came only after the whole batch ({at_error} bytes) was written");
}

#[tokio::test]
async fn a_server_that_answers_only_at_flush_or_sync_still_gets_the_whole_batch() {
    // Postgres buffers the replies of an extended batch (8 KiB) until Flush or Sync: a window waiting for
    // replies without asking for them would stall this batch for good.
    let (app, client) = tokio::io::duplex(64 * 1024);
    let (server, mut pg) = tokio::io::duplex(8 << 20);
    let pg_task = tokio::spawn(async move {
        let (mut owed, mut flushes) = (BytesMut::new(), 0);
        while let Some((kind, _)) = read_msg(&mut pg).await {
            match kind {
                b'B' => owed.extend_from_slice(&[b'2', 0, 0, 0, 4]),
                b'H' | b'S' => {
                    if kind == b'S' {
                        protocol::ready_for_query(&mut owed, b'I');
                    } else {
                        flushes += 1;
                    }
                    pg.write_all(&owed).await.unwrap();
                    owed.clear();
                    if kind == b'S' {
                        return flushes;
                    }
                }
                _ => {}
            }
        }
        flushes
    });
    let mut pump = Pump::new(None, 1 << 20);
    pump.attach();
    let pumping = tokio::spawn(pump_all(pump, client, server));
    let (at_error, kinds) = tokio::time::timeout(Duration::from_secs(20), stream_batch(app, Arc::default()))
        .await
        .expect("the batch is answered within 20 s");
    let flushes = pg_task.await.unwrap();
    pumping.abort();
    assert_eq!(at_error, None);
    assert_eq!(kinds.iter().filter(|k| **k == b'2').count(), ROWS, "a BindComplete per row");
    assert_eq!(kinds.last(), Some(&b'Z'));
    assert!(flushes > 0, "the proxy asked for the held replies while it held the client back");
}

#[tokio::test]
async fn copy_data_is_never_held_back_for_replies() {
    // COPY FROM STDIN: the server answers nothing until CopyDone.
    let (mut app, client) = tokio::io::duplex(64 * 1024);
    let (server, mut pg) = tokio::io::duplex(8 << 20);
    let pg_task = tokio::spawn(async move {
        let (mut data, mut out) = (0usize, BytesMut::new());
        while let Some((kind, len)) = read_msg(&mut pg).await {
            match kind {
                b'Q' => {
                    let at = protocol::begin(&mut out, b'G');
                    out.extend_from_slice(&[0, 0, 0]);
                    protocol::finish(&mut out, at);
                    pg.write_all(&out).await.unwrap();
                    out.clear();
                }
                b'd' => data += len,
                b'c' => {
                    protocol::command_complete(&mut out, "COPY 1");
                    protocol::ready_for_query(&mut out, b'I');
                    pg.write_all(&out).await.unwrap();
                    return data;
                }
                _ => {}
            }
        }
        data
    });
    let mut pump = Pump::new(None, 1 << 20);
    pump.attach();
    let pumping = tokio::spawn(pump_all(pump, client, server));
    let run = async {
        let mut q = BytesMut::new();
        protocol::simple_query(&mut q, "copy t from stdin");
        app.write_all(&q).await.unwrap();
        let mut g = [0u8; 8];
        app.read_exact(&mut g).await.unwrap();
        assert_eq!(g[0], b'G');
        for _ in 0..ROWS {
            app.write_all(&msg(b'd', ROW)).await.unwrap();
        }
        app.write_all(&msg(b'c', 0)).await.unwrap();
        let mut tail = vec![0u8; 64];
        let n = app.read(&mut tail).await.unwrap();
        tail.truncate(n);
        tail
    };
    let tail = tokio::time::timeout(Duration::from_secs(20), run).await.expect("COPY ends within 20 s");
    assert_eq!(pg_task.await.unwrap(), ROWS * ROW, "all copy data reached the server");
    pumping.abort();
    assert_eq!(tail.first(), Some(&b'C'));
}
