//! Odd startups (bad settings, short md5 secrets, protocol 3.2), upstream errors (huge, starting up) and the catalogue of malformed input.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_startup_setting_is_refused_once_not_per_query() {
    let pg = Pg::start();
    let proxy = Proxy::start(&cfg(&pg, "", TXN1));
    normal_client_works(&proxy.conninfo(), Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = backends(&pg);
    let bad = format!("{} options='-c statement_timeout=bogus'", proxy.conninfo());
    match timeout(Duration::from_secs(10), connect(&bad)).await.expect("bad client's login answered") {
        Err(e) => assert_eq!(code_of(&e), "22023", "{e}"),
        Ok(c) => {
            let e = c.simple_query("select 1").await.expect_err("a bogus statement_timeout is refused");
            assert_eq!(code_of(&e), "22023", "{e}");
            // The client may retry; each retry must not cost a server connection.
            for _ in 0..5 {
                let _ = timeout(Duration::from_secs(5), c.simple_query("select 1")).await;
            }
        }
    }
    let good = connect(&proxy.conninfo()).await.unwrap();
    for i in 0..20 {
        let r = timeout(Duration::from_secs(5), good.simple_query("select 1")).await;
        assert!(matches!(r, Ok(Ok(_))), "good client's query {i}: {r:?}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let opened = backends(&pg) - before;
    assert!(opened <= 1, "{opened} new server connections for one bad client and one good one (slice 1)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_md5_secret_is_refused_at_startup_not_at_login() {
    // A malformed md5 secret used to panic every login as that user (`stored[3..]`); it is now refused when the
    // configuration is loaded, naming the user (the login path's own no-panic check is a unit test in auth.rs).
    use md5::{Digest, Md5};
    let pg = Pg::start();
    let good = format!("md5{:x}", Md5::digest(format!("{PG_PASSWORD}postgres")));
    let auth = format!(
        "[auth]\nmethod = \"md5\"\n\n[[auth.users]]\nname = \"postgres\"\nmd5 = \"{good}\"\n\n\
         [[auth.users]]\nname = \"shorty\"\nmd5 = \"ab\"\n\n[upstreams.primary]"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("budgets.toml");
    std::fs::write(&path, cfg(&pg, "", TXN1).replace("[upstreams.primary]", &auth)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgbudget"))
        .args(["check", "--config"])
        .arg(&path)
        .env_remove("RAILWAY_SERVICE_NAME")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("shorty") && text.contains("md5"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    // The valid user's configuration alone starts and serves md5 logins.
    let ok = cfg(&pg, "", TXN1).replace(
        "[upstreams.primary]",
        &format!(
            "[auth]\nmethod = \"md5\"\n\n[[auth.users]]\nname = \"postgres\"\nmd5 = \"{good}\"\n\n[upstreams.primary]"
        ),
    );
    let proxy = Proxy::start(&ok);
    normal_client_works(&proxy.conninfo(), Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_3_2_gets_negotiate_protocol_version() {
    let pg = Pg::start();
    let proxy = Proxy::start(&cfg(&pg, "", TXN1));
    let mut p = params("postgres").to_vec();
    p.push(("_pq_.test_option", "1"));
    let mut c = Raw::login_version(proxy.port, 196_610, &p, PG_PASSWORD)
        .await
        .unwrap_or_else(|e| panic!("a 3.2 startup must be negotiated down, not refused: {e:?}"));
    // Newest version supported: Postgres sends the whole version number 3.0 (0x00030000) there, and
    // libpq 18 refuses anything below 3.0 (so not a bare minor 0).
    let mut want = raw::V3.to_be_bytes().to_vec();
    want.extend_from_slice(&1i32.to_be_bytes());
    want.extend_from_slice(b"_pq_.test_option\0");
    assert_eq!(c.first, Some(b'v'), "NegotiateProtocolVersion first");
    assert_eq!(c.negotiate.as_deref(), Some(&want[..]));
    let r = c.simple("select 1").await.unwrap();
    assert_eq!(r.rows, vec![vec![Some("1".to_owned())]], "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_server_error_reaches_client() {
    let pg = Pg::start();
    let proxy = Proxy::start(&cfg(&pg, "", TXN1));
    let sql = "DO $$BEGIN RAISE EXCEPTION '%', repeat('x', 2000000); END$$";
    let direct = connect(&pg.conninfo()).await.unwrap();
    assert_eq!(code_of(&direct.batch_execute(sql).await.unwrap_err()), "P0001", "direct (the test itself)");
    let c = connect(&proxy.conninfo()).await.unwrap();
    let r = timeout(Duration::from_secs(15), c.batch_execute(sql)).await.expect("an answer");
    let e = r.expect_err("the DO block raises");
    assert_eq!(code_of(&e), "P0001", "{e}");
    let r = timeout(Duration::from_secs(5), c.simple_query("select 1")).await;
    assert!(matches!(r, Ok(Ok(_))), "the session goes on after the error: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_up_upstream_passes_57p03() {
    let port = free_port();
    let fake = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = fake.accept().await {
            tokio::spawn(async move {
                let Ok(len) = s.read_i32().await else { return };
                let mut rest = vec![0u8; (len.clamp(4, 10_000) - 4) as usize];
                if s.read_exact(&mut rest).await.is_ok() {
                    let body = b"SFATAL\0VFATAL\0C57P03\0Mthe database system is starting up\0\0";
                    let _ = s.write_all(&msg(b'E', body)).await;
                }
            });
        }
    });
    for mode in ["session", "transaction"] {
        let cfg = format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nmode = \"sidecar\"\nservice = \"app\"\nslice_floor = 1\n\n\
             [upstreams.primary]\nurl = \"postgres://postgres:{PG_PASSWORD}@127.0.0.1:{port}/postgres\"\n\
             ceiling = 90\nreserved = 2\n\n\
             [services.app]\nslice = 1\npool_mode = \"{mode}\"\ncheckout_timeout = \"3s\"\nconnect_timeout = \"2s\"\n"
        );
        let proxy = Proxy::start(&cfg);
        let r = timeout(Duration::from_secs(15), async {
            let c = connect(&proxy.conninfo()).await?;
            c.simple_query("select 1").await.map(|_| ())
        })
        .await
        .expect("an answer");
        let e = r.expect_err("the upstream is starting up");
        assert_eq!(code_of(&e), "57P03", "{mode} mode: {e}");
    }
}

/// What the proxy does within 3 s: its first ErrorResponse ("E:<code>"), a ReadyForQuery or
/// authentication request ("Z", "R"), "closed", or "timeout" (the one outcome that fails).
async fn answer(s: &mut TcpStream) -> String {
    let until = Instant::now() + Duration::from_secs(3);
    loop {
        match read_msg(s, until.saturating_duration_since(Instant::now())).await {
            Ok(Some((b'E', body))) => return format!("E:{}", error_fields(&body).code),
            Ok(Some((k @ (b'Z' | b'R'), _))) => return (k as char).to_string(),
            Ok(Some(_)) => {}
            Ok(None) => return "closed".into(),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return "timeout".into(),
            Err(_) => return "closed".into(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_never_crashes_the_proxy() {
    let pg = Pg::start();
    let proxy = Proxy::start(&cfg(&pg, "", TXN1));
    let port = proxy.port;
    let v3 = |body: &[u8]| raw::packet(raw::V3, body);
    let good = raw::startup(raw::V3, &params("postgres"));
    let mut outcomes: Vec<(String, String)> = Vec::new();
    let pre_auth: Vec<(&str, Vec<u8>)> = vec![
        ("startup length 0", vec![0, 0, 0, 0]),
        ("startup length 3", vec![0, 0, 0, 3]),
        ("startup length 7", vec![0, 0, 0, 7, 0, 3, 0]),
        ("startup length 2^31-1", vec![0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0]),
        ("startup length negative", vec![0xff, 0xff, 0xff, 0xf0, 0, 3, 0, 0]),
        ("protocol 2.0", raw::startup(2 << 16, &params("postgres"))),
        ("protocol 4.0", raw::startup(4 << 16, &params("postgres"))),
        ("short CancelRequest", raw::packet(raw::CANCEL_REQUEST, &[0, 0, 0, 1])),
        ("startup without terminating NUL", v3(b"user\0postgres\0database\0postgres")),
        ("non-UTF-8 parameter", v3(b"user\0\xff\xfe\0\0")),
        ("parameter key without value", v3(b"user\0postgres\0lonely_key\0")),
    ];
    for (name, bytes) in pre_auth {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let _ = s.write_all(&bytes).await;
        outcomes.push((name.into(), answer(&mut s).await));
    }
    // Request packets answered with a single 'N' before anything else.
    for (name, first, then) in [
        ("SSLRequest twice then garbage", raw::SSL_REQUEST, b"GARBAGE!GARBAGE!".to_vec()),
        ("GSSENCRequest then startup", raw::GSSENC_REQUEST, good.clone()),
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut got = String::new();
        for _ in 0..(if first == raw::SSL_REQUEST { 2 } else { 1 }) {
            s.write_all(&raw::packet(first, &[])).await.unwrap();
            let mut n = [0u8; 1];
            let r = timeout(Duration::from_secs(3), s.read_exact(&mut n)).await;
            got.push_str(&format!("{:?} ", r.map(|r| r.map(|_| n[0] as char))));
        }
        s.write_all(&then).await.unwrap();
        outcomes.push((name.into(), format!("{got}{}", answer(&mut s).await)));
    }
    // Inside the SCRAM exchange.
    let sasl = |mech: &str, declared: i32, data: &[u8]| {
        let mut b = format!("{mech}\0").into_bytes();
        b.extend_from_slice(&declared.to_be_bytes());
        b.extend_from_slice(data);
        msg(b'p', &b)
    };
    let client_first = b"n,,n=,r=abcdefghijkl";
    let in_auth: Vec<(&str, Vec<u8>)> = vec![
        ("password message length < 4", vec![b'p', 0, 0, 0, 2]),
        ("SASL wrong mechanism", sasl("SCRAM-SHA-1", client_first.len() as i32, client_first)),
        ("SASL length larger than body", sasl("SCRAM-SHA-256", 1000, client_first)),
    ];
    for (name, bytes) in in_auth {
        let mut s = in_sasl(port).await.expect("SASL request");
        let _ = s.write_all(&bytes).await;
        outcomes.push((name.into(), answer(&mut s).await));
    }
    // After login.
    let mut bind65535 = raw::parse("", "select 1");
    bind65535.extend(msg(b'B', &[0, 0, 0, 0, 0xff, 0xff]));
    bind65535.extend(raw::sync());
    let mut terminate_mid_batch = raw::parse("", "select 1");
    terminate_mid_batch.extend(raw::bind(""));
    terminate_mid_batch.extend(msg(b'X', b""));
    terminate_mid_batch.extend(raw::execute());
    terminate_mid_batch.extend(raw::sync());
    let mut execute_first = raw::execute();
    execute_first.extend(raw::sync());
    let mut post_auth: Vec<(String, Vec<u8>)> =
        (0..4u8).map(|n| (format!("message length {n}"), vec![b'Q', 0, 0, 0, n])).collect();
    post_auth.extend([
        ("negative message length".to_owned(), vec![b'Q', 0xff, 0xff, 0xff, 0xfe]),
        ("message type 'Z'".to_owned(), msg(b'Z', b"")),
        ("message type 0x00".to_owned(), msg(0, b"")),
        ("Bind with 65535 parameters and no data".to_owned(), bind65535),
        ("Execute before Parse".to_owned(), execute_first),
        ("Terminate inside an extended batch".to_owned(), terminate_mid_batch),
    ]);
    for (name, bytes) in post_auth {
        let mut c = login(port, "postgres").await;
        let _ = c.s.write_all(&bytes).await;
        outcomes.push((name, answer(&mut c.s).await));
    }
    {
        let mut c = login(port, "postgres").await;
        let mut head = vec![b'Q'];
        head.extend_from_slice(&((1 << 20) + 4i32).to_be_bytes());
        let _ = c.s.write_all(&head).await;
        let _ = c.s.write_all(&vec![b'x'; 512 << 10]).await;
        outcomes.push(("1 MiB Query, closed mid-body".into(), "(we closed)".into()));
    }
    eprintln!("{outcomes:#?}");
    assert!(alive(proxy.pid()), "the proxy died: {outcomes:#?}\n{}", proxy.log());
    normal_client_works(&proxy.conninfo(), Duration::from_secs(15)).await;
    let hung: Vec<_> = outcomes.iter().filter(|(_, o)| o.contains("timeout") || o.contains("Elapsed")).collect();
    let log = proxy.log();
    let tail: Vec<_> = log.lines().filter(|l| !l.contains("DEBUG")).rev().take(10).collect();
    assert!(hung.is_empty(), "no answer within 3 s: {hung:#?}\n{tail:#?}");
}

/// CPU seconds (user + system) process `pid` has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name: utime and stime are the 12th and 13th.
    let after = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// A client that sends a large statement (one the proxy reads whole, here an unnamed Parse of 200 kB)
/// slowly: while the rest has not come, the proxy waits for it without a server, and without spinning (it
/// used to take a server, find the message incomplete, give the server back and take it again, at full CPU,
/// starving the very clients it waited for). Sampled while the client pauses mid-message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_statement_sent_slowly_is_awaited_without_spinning() {
    let pg = Pg::start();
    let proxy = Proxy::start(&cfg(&pg, "", TXN1));
    let mut c = login(proxy.port, "postgres").await;
    let sql = format!("SELECT length('{}') AS n", "x".repeat(200_000));
    let mut batch = raw::parse("", &sql);
    batch.extend(raw::bind(""));
    batch.extend(raw::execute());
    batch.extend(raw::sync());
    let (head, rest) = batch.split_at(100_000);
    c.s.write_all(head).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = cpu_seconds(proxy.pid());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let used = cpu_seconds(proxy.pid()) - before;
    assert!(
        used < 0.3,
        "the proxy used {used:.2} s of CPU in 1.5 s while a client was between two halves of a message"
    );
    // Meanwhile the share (1) is free for anybody else.
    normal_client_works(&proxy.conninfo(), Duration::from_secs(5)).await;
    c.s.write_all(rest).await.unwrap();
    let mut got = Vec::new();
    loop {
        let (kind, body) = c.recv().await.expect("reply");
        got.push(kind);
        if kind == b'D' {
            assert_eq!(&body[6..], b"200000", "the statement ran whole");
        }
        if kind == b'Z' {
            break;
        }
    }
    assert_eq!(got, b"12DCZ", "ParseComplete, BindComplete, the row, CommandComplete, ReadyForQuery");
}
