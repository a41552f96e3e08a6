//! Criterion benchmarks of the hot path: scanning server bytes and framing client messages by their 5-byte
//! headers without decoding bodies.

use bytes::{BufMut, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use pgbudget::protocol;
use pgbudget::relay::frame::ServerScanner;
use pgbudget::relay::pump::Pump;

/// A server reply like a 100-row SELECT: RowDescription, DataRows, CommandComplete, ReadyForQuery.
fn select_reply(rows: usize) -> BytesMut {
    let mut out = BytesMut::new();
    let at = protocol::begin(&mut out, b'T');
    out.put_slice(&[0u8; 30]);
    protocol::finish(&mut out, at);
    for i in 0..rows {
        let at = protocol::begin(&mut out, b'D');
        out.put_i16(2);
        let v = format!("{i:08}");
        out.put_i32(v.len() as i32);
        out.put_slice(v.as_bytes());
        out.put_i32(24);
        out.put_slice(b"some-text-value-of-bytes");
        protocol::finish(&mut out, at);
    }
    let at = protocol::begin(&mut out, b'C');
    protocol::put_cstr(&mut out, "SELECT 100");
    protocol::finish(&mut out, at);
    protocol::ready_for_query(&mut out, b'I');
    out
}

fn scan(c: &mut Criterion) {
    let reply = select_reply(100);
    let mut g = c.benchmark_group("server_scanner");
    g.throughput(Throughput::Bytes(reply.len() as u64));
    g.bench_function("select_100_rows_whole_chunk", |b| {
        let mut s = ServerScanner::default();
        b.iter(|| {
            let mut z = 0u32;
            s.feed(black_box(&reply), |m| z += u32::from(m.kind == b'Z')).unwrap();
            black_box(z)
        })
    });
    g.bench_function("select_100_rows_in_1460_byte_segments", |b| {
        let mut s = ServerScanner::default();
        b.iter(|| {
            for chunk in reply.chunks(1460) {
                s.feed(black_box(chunk), |_| {}).unwrap();
            }
        })
    });
    g.finish();
    let mut small = BytesMut::new();
    protocol::simple_query(&mut small, "select abalance from pgbench_accounts where aid = 42");
    let mut g = c.benchmark_group("client_framing");
    g.throughput(Throughput::Elements(1));
    g.bench_function("one_query_message", |b| {
        let mut p = Pump::new(None, 1 << 20);
        b.iter(|| black_box(p.frame_bytes(black_box(&small)).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, scan);
criterion_main!(benches);
