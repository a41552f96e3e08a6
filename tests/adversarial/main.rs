//! Adversarial clients against the pgbudget binary and a real Postgres: stray bytes left for the next
//! client, pipelined bursts, extended-protocol error recovery, pre-auth memory, quoting of startup settings,
//! cancel races, odd startup packets and upstream errors, and a catalogue of malformed input.
//! Every read has a deadline: a broken proxy fails these tests, it never hangs them.

#[path = "../common/mod.rs"]
mod common;
mod edges;
#[path = "../common/raw.rs"]
mod raw;

use common::*;
use raw::{alive, error_fields, is_sqlstate, msg, params, read_msg, rss_kib, Raw, Reply};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_postgres::types::Type;

const TXN1: &str = "[services.app]\nslice = 1\npool_mode = \"transaction\"\ncheckout_timeout = \"3s\"\n";
const RO2: &str =
    "[services.app]\nslice = 2\nread_only_share = 1\npool_mode = \"transaction\"\ncheckout_timeout = \"3s\"\n";

/// budgets.toml for `services`, with `slice_floor = 1` and the `proxy_extra` lines in `[proxy]`.
fn cfg(pg: &Pg, proxy_extra: &str, services: &str) -> String {
    config(pg, services).replace("[proxy]\n", &format!("[proxy]\nslice_floor = 1\n{proxy_extra}"))
}

/// [`cfg`] with the read-only route `app_ro`.
fn ro_cfg(pg: &Pg, proxy_extra: &str, services: &str) -> String {
    cfg(pg, proxy_extra, services)
        .replace("[upstreams.primary]", "[read_only]\ndatabase = \"app_ro\"\n\n[upstreams.primary]")
}

fn code_of(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_owned()).unwrap_or_else(|| format!("no SQLSTATE: {e}"))
}

async fn login(port: u16, database: &str) -> Raw {
    Raw::login(port, &params(database), PG_PASSWORD).await.unwrap_or_else(|e| panic!("raw login: {e:?}"))
}

/// A tokio-postgres client runs `select 1` within `within` (retrying while the proxy recovers).
async fn normal_client_works(conninfo: &str, within: Duration) {
    let until = Instant::now() + within;
    loop {
        let r = timeout(Duration::from_secs(5), async {
            let c = connect(conninfo).await?;
            c.simple_query("select 1").await.map(|_| ())
        })
        .await;
        match r {
            Ok(Ok(())) => return,
            other if Instant::now() > until => panic!("a normal client does not work: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Server connections pgbudget opened so far, from Postgres's `log_connections` lines.
fn backends(pg: &Pg) -> usize {
    pg.log().lines().filter(|l| l.contains("connection authorized") && l.contains("application_name=pgbudget:")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_header_then_disconnect_never_reaches_next_client() {
    let pg = Pg::start();
    let admin = connect(&pg.conninfo()).await.unwrap();
    admin.batch_execute("create table victim(v bytea); create table hacked(x int)").await.unwrap();
    let proxy = Proxy::start(&cfg(&pg, "", TXN1));
    let sql = "insert into victim(v) values ($1) returning v";
    // tokio-postgres's query_typed batch: Parse('P', len, "", sql, 1 type oid) then Bind('B', len, portal "",
    // statement "", 1 format, 1 parameter, its length) and then the bytea's bytes.
    let parse_len = 4 + 1 + sql.len() + 1 + 2 + 4;
    let data_at = 1 + parse_len + (1 + 4 + 1 + 1 + 2 + 2 + 2 + 4);
    let mut victim_head = vec![b'P'];
    victim_head.extend_from_slice(&(parse_len as i32).to_be_bytes());
    let injected = raw::query("insert into hacked values (1)");
    let mut problems = Vec::new();
    for k in 1..=4usize {
        // A leaves the first k bytes of a Query header on its server. Postgres completes that header with
        // the victim's first 5-k bytes ('P' and the top of its Parse length), fails the "Query" (its text
        // is empty, bytes remain) without skipping to Sync, and reads the next message `len - 4` bytes
        // later: place a whole Query there, inside the victim's own bytea. (A Query header, not a Parse
        // one: a failed Parse makes Postgres skip to Sync, past the injected Query.) A's startup carries
        // client_encoding=UTF8 like tokio-postgres's, so no SET is sent between A's bytes and B's.
        let stray = &b"Q\0\0\0"[..k];
        let mut len = [0u8; 4];
        len[..k - 1].copy_from_slice(&stray[1..]);
        len[k - 1..].copy_from_slice(&victim_head[..5 - k]);
        let len = i32::from_be_bytes(len) as usize;
        let value = if len < (1 << 30) {
            let next = (5 - k) + len - 4;
            let mut v = vec![b'.'; next - data_at];
            v.extend_from_slice(&injected);
            v
        } else {
            b"k=1: Postgres drops a connection with this length; nothing to inject".to_vec()
        };

        let mut a = login(proxy.port, "postgres").await;
        let r = a.simple("SELECT 1").await.expect("A's query");
        assert!(r.error.is_none(), "{r:?}");
        a.s.write_all(stray).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(a);
        tokio::time::sleep(Duration::from_millis(300)).await;

        let b = connect(&proxy.conninfo()).await.unwrap();
        match timeout(Duration::from_secs(15), b.query_typed(sql, &[(&value, Type::BYTEA)])).await {
            Ok(Ok(rows)) if rows.len() == 1 && rows[0].get::<_, Vec<u8>>(0) == value => {}
            Ok(Ok(rows)) => problems.push(format!("k={k}: victim got {} row(s), not its own value", rows.len())),
            Ok(Err(e)) => problems.push(format!("k={k}: victim's statement failed: {}", code_of(&e))),
            Err(_) => problems.push(format!("k={k}: victim's statement hung for 15 s")),
        }
        tokio::time::sleep(Duration::from_millis(500)).await; // what Postgres ran after the victim's reply
        let hacked: i64 = admin.query_one("select count(*) from hacked", &[]).await.unwrap().get(0);
        if hacked != 0 {
            problems.push(format!("k={k}: hacked has {hacked} row(s): stray bytes + victim bytes ran as a Query"));
        }
    }
    assert!(
        problems.is_empty(),
        "{problems:#?}\n{}",
        proxy.log().lines().filter(|l| !l.contains("DEBUG")).rev().take(10).collect::<Vec<_>>().join("\n")
    );
}

/// 200 pipelined Queries of 100 kB each on one connection, written by one task while another counts
/// ReadyForQuery; returns how many arrived within 20 s.
async fn burst(port: u16) -> usize {
    let raw = login(port, "postgres").await;
    let (mut rd, mut wr) = raw.s.into_split();
    let q = raw::query(&format!("SELECT '{}'", "x".repeat(100_000)));
    let writer = tokio::spawn(async move {
        for _ in 0..200 {
            if wr.write_all(&q).await.is_err() {
                break;
            }
        }
        wr
    });
    let until = Instant::now() + Duration::from_secs(20);
    let mut ready = 0;
    while ready < 200 {
        match read_msg(&mut rd, until.saturating_duration_since(Instant::now())).await {
            Ok(Some((b'Z', _))) => ready += 1,
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    writer.abort();
    ready
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_burst_with_concurrent_reader_completes() {
    let pg = Pg::start();
    let proxy = Proxy::start(&cfg(&pg, "", TXN1));
    let t = Instant::now();
    assert_eq!(burst(pg.port).await, 200, "direct to Postgres (the test itself)");
    let direct = t.elapsed();
    let t = Instant::now();
    let via = burst(proxy.port).await;
    assert_eq!(
        via,
        200,
        "ReadyForQuery through the proxy within 20 s (direct took {direct:?}, proxy {:?})",
        t.elapsed()
    );
}

/// Parse("selec bad"), Query("select 1"), Sync in one write: Postgres answers 42601 and one ReadyForQuery
/// (the Query is skipped until Sync). Returns the client, idle.
async fn parse_error_batch(port: u16) -> Raw {
    let mut a = login(port, "postgres").await;
    let mut batch = raw::parse("", "selec bad");
    batch.extend(raw::query("select 1"));
    batch.extend(raw::sync());
    a.s.write_all(&batch).await.unwrap();
    let r = a.reply().await.expect("a reply to the batch");
    assert_eq!(r.error.as_ref().map(|e| e.code.as_str()), Some("42601"), "{r:?}");
    match read_msg(&mut a.s, Duration::from_millis(700)).await {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
        other => panic!("exactly one ReadyForQuery expected, then silence; got {other:?}"),
    }
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parse_error_then_query_then_sync_releases_server() {
    let pg = Pg::start();
    let proxy = Proxy::start(&cfg(&pg, "", TXN1));
    let idle = parse_error_batch(proxy.port).await;
    let c = connect(&proxy.conninfo()).await.unwrap();
    let t = Instant::now();
    match timeout(Duration::from_secs(6), c.simple_query("select 1")).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => panic!("second client got no server after {:?}: {}", t.elapsed(), code_of(&e)),
        Err(_) => panic!("second client hung"),
    }
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parse_error_then_query_then_sync_idle_client_gets_57p05() {
    let pg = Pg::start();
    let proxy = Proxy::start(&cfg(&pg, "", &format!("{TXN1}client_idle_timeout = \"1s\"\n")));
    let mut idle = parse_error_batch(proxy.port).await;
    let t = Instant::now();
    let got = loop {
        match read_msg(&mut idle.s, Duration::from_secs(4)).await {
            Ok(Some((b'E', body))) => break Ok(error_fields(&body)),
            Ok(Some(_)) => continue,
            other => break Err(format!("{other:?}")),
        }
    };
    let e = got.unwrap_or_else(|e| panic!("no FATAL 57P05 for the idle client within ~5 s: {e}"));
    assert_eq!((e.severity.as_str(), e.code.as_str()), ("FATAL", "57P05"), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(4), "57P05 only after {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stalled_mid_batch_or_mid_copy_is_idle_in_transaction() {
    // Only idle_in_transaction_timeout is set: a client that stops after Parse/Bind without Sync, or in the
    // middle of COPY FROM STDIN, holds a server that waits for it; it gets FATAL 25P03 and the server is reused.
    let pg = Pg::start();
    let setup = connect(&pg.conninfo()).await.unwrap();
    setup.batch_execute("create table stall(x int)").await.unwrap();
    let proxy = Proxy::start(&cfg(&pg, "", &format!("{TXN1}idle_in_transaction_timeout = \"1s\"\n")));
    for stall in [[raw::parse("", "select 1"), raw::bind("")].concat(), raw::query("copy stall from stdin")] {
        let mut a = login(proxy.port, "postgres").await;
        a.s.write_all(&stall).await.unwrap();
        let t = Instant::now();
        let got = loop {
            match read_msg(&mut a.s, Duration::from_secs(5)).await {
                Ok(Some((b'E', body))) => break Ok(error_fields(&body)),
                Ok(Some(_)) => continue,
                other => break Err(format!("{other:?}")),
            }
        };
        let e = got.unwrap_or_else(|e| panic!("no FATAL 25P03 for a stalled client: {e}"));
        assert_eq!((e.severity.as_str(), e.code.as_str()), ("FATAL", "25P03"), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(4), "25P03 only after {:?}", t.elapsed());
        // Slice 1: the next client gets that server, clean.
        let c = connect(&proxy.conninfo()).await.unwrap();
        let r = timeout(Duration::from_secs(5), c.simple_query("select 1")).await;
        assert!(matches!(r, Ok(Ok(_))), "the stalled client's server was not given back: {r:?}");
    }
    let n: i64 = setup.query_one("select count(*) from stall", &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "the abandoned COPY must not have committed rows");
}

/// Connect, send a startup and read AuthenticationSASL: the proxy now holds a login for this socket.
async fn in_sasl(port: u16) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    s.write_all(&raw::startup(raw::V3, &params("postgres"))).await.map_err(|e| e.to_string())?;
    match read_msg(&mut s, Duration::from_secs(5)).await {
        Ok(Some((b'R', body))) if body.starts_with(&10i32.to_be_bytes()) => Ok(s),
        other => Err(format!("expected AuthenticationSASL, got {other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preauth_flood_does_not_allocate_declared_lengths() {
    let pg = Pg::start();
    let proxy = Proxy::start(&cfg(&pg, "max_pending_logins = 1000\n", TXN1));
    normal_client_works(&proxy.conninfo(), Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(proxy.pid());
    let mut held = Vec::new();
    for _ in 0..10 {
        let batch = futures_util::future::join_all((0..50).map(|_| async {
            let mut s = in_sasl(proxy.port).await?;
            // A SASLInitialResponse header declaring 1 MiB, and nothing after it.
            s.write_all(&[b'p', 0x00, 0x10, 0x00, 0x00]).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(s)
        }))
        .await;
        held.extend(batch.into_iter().map(|r| r.expect("pending login")));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let growth = rss_kib(proxy.pid()).saturating_sub(before);
    assert!(growth < 40 * 1024, "500 pending logins grew the proxy by {} MiB", growth / 1024);
    drop(held);
    normal_client_works(&proxy.conninfo(), Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_logins_cap_refuses_with_53300() {
    let pg = Pg::start();
    let proxy = Proxy::start(&cfg(&pg, "max_pending_logins = 20\n", TXN1));
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(in_sasl(proxy.port).await.expect("pending login"));
    }
    let t = Instant::now();
    match timeout(Duration::from_secs(2), connect(&proxy.conninfo())).await {
        Ok(Err(e)) => assert_eq!(code_of(&e), "53300", "{e}"),
        Ok(Ok(_)) => panic!("the 21st login was served beyond max_pending_logins = 20"),
        Err(_) => panic!("the 21st login got no answer within {:?}", t.elapsed()),
    }
    drop(held);
    normal_client_works(&proxy.conninfo(), Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_route_caps_decoded_message_size() {
    let pg = Pg::start();
    let proxy = Proxy::start(&ro_cfg(&pg, "max_query_size = 1048576\n", RO2));
    let pid = proxy.pid();
    let mut a = login(proxy.port, "app_ro").await;
    assert!(a.simple("select 1").await.unwrap().error.is_none());
    let before = rss_kib(pid);
    let (mut rd, mut wr) = a.s.into_split();
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        loop {
            match read_msg(&mut rd, Duration::from_secs(30)).await {
                Ok(Some((b'E', body))) if error_fields(&body).code == "54000" => return Ok(error_fields(&body)),
                Ok(Some((kind, body))) => seen.push((kind as char, error_fields(&body).code)),
                end => return Err(format!("{end:?} after {seen:?}")),
            }
        }
    });
    let mut header = vec![b'Q'];
    header.extend_from_slice(&((300 << 20) + 4i32).to_be_bytes());
    let chunk = vec![b'x'; 1 << 20];
    let mut peak = before;
    let mut sent = 0;
    if wr.write_all(&header).await.is_ok() {
        while sent < 64 {
            match timeout(Duration::from_secs(5), wr.write_all(&chunk)).await {
                Ok(Ok(())) => sent += 1,
                _ => break,
            }
            peak = peak.max(rss_kib(pid));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    peak = peak.max(rss_kib(pid));
    let answer = timeout(Duration::from_secs(10), reader).await;
    let growth = peak.saturating_sub(before);
    assert!(growth < 32 * 1024, "proxy grew by {} MiB while {sent} MiB of one Query streamed in", growth / 1024);
    match answer {
        Ok(Ok(Ok(e))) => assert!(e.severity == "ERROR" || e.severity == "FATAL", "{e:?}"),
        other => panic!("no ErrorResponse 54000 for a 300 MiB Query ({sent} MiB sent): {other:?}"),
    }
    drop(wr);
    normal_client_works(&proxy.conninfo().replace("dbname=postgres", "dbname=app_ro"), Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_setting_with_backslash_quote_cannot_inject() {
    let pg = Pg::start();
    let admin = connect(&pg.conninfo()).await.unwrap();
    let proxy = Proxy::start(&ro_cfg(&pg, "", RO2));
    let ro = proxy.conninfo().replace("dbname=postgres", "dbname=app_ro");
    {
        // A leaves the route's one server with backslash escapes on in string literals.
        let a = connect(&ro).await.unwrap();
        let r = a.simple_query("SET standard_conforming_strings = off").await;
        eprintln!("A's SET standard_conforming_strings = off: {:?}", r.as_ref().map(|_| ()).map_err(code_of));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A valid search_path as written (no spaces, no commas); quoted by doubling quotes only and read with
    // backslash escapes, it is `'a\''` followed by `;set default_transaction_read_only=off;--...`.
    const V: &str = r"a\';set/**/default_transaction_read_only=off;--";
    let p = [("user", "postgres"), ("database", "app_ro"), ("client_encoding", "UTF8"), ("search_path", V)];
    let mut problems = Vec::new();
    match Raw::login(proxy.port, &p, PG_PASSWORD).await {
        Err(e) => assert!(is_sqlstate(&e.code), "B's login failed without a SQLSTATE: {e:?}"),
        Ok(mut b) => {
            let sql = "select current_setting('search_path'), current_setting('default_transaction_read_only'); \
                       create table public.inj(x int)";
            match b.simple(sql).await {
                Ok(r) if !r.rows.is_empty() => {
                    // `SET search_path = '...'` stores the value quoted as an identifier; set_config() as is.
                    let sp = r.rows[0][0].clone().unwrap_or_default();
                    let ro = r.rows[0][1].as_deref();
                    if (sp != V && sp != format!("\"{V}\"")) || ro != Some("on") {
                        let want = [V, "on"];
                        problems.push(format!("B's session: {:?}, expected {want:?}", r.rows[0]));
                    }
                    if r.error.as_ref().map(|e| e.code.as_str()) != Some("25006") {
                        problems.push(format!("create table on B's read-only session: {:?}", r.error));
                    }
                }
                Ok(Reply { error: Some(e), .. }) | Err(e) if is_sqlstate(&e.code) => {}
                other => problems.push(format!("B's first query: no rows and no clean error: {other:?}")),
            }
            if let Ok(r) = b.simple("show default_transaction_read_only").await {
                if let Some(row) = r.rows.first() {
                    if row[0].as_deref() != Some("on") {
                        problems.push(format!("show default_transaction_read_only on B: {row:?}"));
                    }
                }
            }
        }
    }
    let inj: Option<String> = admin.query_one("select to_regclass('public.inj')::text", &[]).await.unwrap().get(0);
    if inj.is_some() {
        problems.push("table inj was created through the read-only route".into());
    }
    let c = connect(&ro).await.unwrap();
    let v = c.simple_query("show default_transaction_read_only").await.unwrap();
    let v = v.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    if v.as_deref() != Some("on") {
        problems.push(format!("next read-only client: default_transaction_read_only = {v:?}"));
    }
    match c.simple_query("create table public.inj2(x int)").await {
        Err(e) if code_of(&e) == "25006" => {}
        other => problems
            .push(format!("next read-only client's create table: {:?}", other.map(|_| ()).map_err(|e| code_of(&e)))),
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_never_crosses_to_next_client() {
    let pg = Pg::start();
    let proxy = Proxy::start(&cfg(&pg, "", TXN1));
    let mut a = login(proxy.port, "postgres").await;
    let (pid, secret, port) = (a.pid, a.secret, proxy.port);
    let stop = Arc::new(AtomicBool::new(false));
    let cancels = Arc::new(AtomicUsize::new(0));
    let a_loop = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && a.simple("select 1").await.is_ok() {
                n += 1;
            }
            n
        }
    });
    let mut cancellers = Vec::new();
    for _ in 0..2 {
        let (stop, cancels) = (stop.clone(), cancels.clone());
        cancellers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await {
                    if s.write_all(&raw::cancel_request(pid, secret)).await.is_ok() {
                        cancels.fetch_add(1, Ordering::Relaxed);
                    }
                    // Like libpq: wait for the proxy to close the socket once the cancel is handled.
                    let _ = timeout(Duration::from_secs(1), s.read(&mut [0u8; 1])).await;
                }
            }
        }));
    }
    let b = connect(&proxy.conninfo()).await.unwrap();
    let run = async {
        let mut codes = Vec::new();
        for _ in 0..40 {
            if let Err(e) = b.simple_query("select pg_sleep(0.05)").await {
                codes.push(code_of(&e));
            }
        }
        codes
    };
    let codes = timeout(Duration::from_secs(8), run).await;
    stop.store(true, Ordering::Relaxed);
    let a_queries = timeout(Duration::from_secs(10), a_loop).await.ok().and_then(|r| r.ok()).unwrap_or(0);
    for c in cancellers {
        let _ = timeout(Duration::from_secs(5), c).await;
    }
    let sent = cancels.load(Ordering::Relaxed);
    let codes = codes.expect("B's 40 queries finish within 8 s");
    assert!(sent > 0, "no cancel request was sent");
    let crossed = codes.iter().filter(|c| *c == "57014").count();
    assert_eq!(
        crossed, 0,
        "B's queries cancelled by A's key: {crossed} of 40 ({sent} cancels, A ran {a_queries}); {codes:?}"
    );
}
