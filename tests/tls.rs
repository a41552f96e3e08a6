//! TLS on both sides, against a Postgres started with `ssl = on` and a throwaway CA made with openssl:
//! upstream `sslmode` (require, verify-ca, verify-full with the right and the wrong name, disable), clients
//! with libpq's `sslmode=verify-full` and `channel_binding=require` (SCRAM-SHA-256-PLUS), `tls.mode =
//! "require"` refusing plaintext, a certificate renewed by SIGHUP while an older session goes on, direct TLS
//! (ALPN postgresql), and fake upstreams that try to skip SCRAM or ask for a cleartext password.

mod common;
#[path = "common/raw.rs"]
mod raw;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA and certificates signed by it, in a directory the `postgres` user can read.
struct Pki {
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out =
        Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs (apt-get install openssl)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::Builder::new().prefix("pgbudget-pki-").tempdir_in("/tmp").unwrap();
        let d = dir.path().to_owned();
        openssl(
            &d,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=pgbudget test CA",
            ],
        );
        let pki = Pki { dir };
        pki.issue("pg", "rsa", "localhost");
        pki.issue("proxy", "ec", "localhost");
        let _ = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&d).status();
        let _ = Command::new("chmod").args(["755"]).arg(&d).status();
        pki
    }

    /// `<name>.pem` / `<name>.key` for `dns` (RSA or ECDSA P-256), signed by the CA.
    fn issue(&self, name: &str, kind: &str, dns: &str) {
        let d = self.dir.path();
        let key = format!("{name}.key");
        let newkey = if kind == "ec" {
            vec!["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        } else {
            vec!["-newkey", "rsa:2048"]
        };
        let mut req = vec!["req", "-nodes", "-keyout", &key, "-out", "req.csr", "-subj"];
        let subj = format!("/CN={dns}");
        req.push(&subj);
        req.extend(newkey);
        openssl(d, &req);
        let ext = format!("subjectAltName=DNS:{dns}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n");
        std::fs::write(d.join("ext.cnf"), ext).unwrap();
        let pem = format!("{name}.pem");
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "req.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        );
        let _ = Command::new("chmod").arg("600").arg(d.join(&key)).status();
        let _ = Command::new("chown").args(["postgres:postgres"]).arg(d.join(&key)).arg(d.join(&pem)).status();
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    fn pg(&self) -> Pg {
        let cert = format!("ssl_cert_file={}", self.path("pg.pem").display());
        let key = format!("ssl_key_file={}", self.path("pg.key").display());
        Pg::start_with(&["ssl=on", &cert, &key])
    }

    /// The proxy's certificate and key, readable by the test process (it runs as root or the owner).
    fn proxy_tls(&self, mode: &str) -> String {
        format!(
            "[tls]\nmode = \"{mode}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            self.path("proxy.pem").display(),
            self.path("proxy.key").display()
        )
    }
}

/// A config whose upstream URL is `url_tail` appended to `postgres://postgres:secret@HOST:PORT/postgres`.
fn cfg_with(pg: &Pg, host: &str, query: &str, extra: &str) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nservice = \"app\"\n{extra}\n\
         [upstreams.primary]\nurl = \"postgres://postgres:{PG_PASSWORD}@{host}:{}/postgres{query}\"\nceiling = 20\n\n\
         [services.app]\nslice = 3\npool_mode = \"session\"\nconnect_timeout = \"3s\"\ncheckout_timeout = \"3s\"\n",
        pg.port
    )
}

/// Whether the proxy's server connection for this session is TLS (asked on that connection).
async fn upstream_ssl(proxy: &Proxy) -> Result<bool, String> {
    let text =
        |e: tokio_postgres::Error| e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_else(|| e.to_string());
    let c = connect(&proxy.conninfo()).await.map_err(text)?;
    let r = c.query_one("select ssl from pg_stat_ssl where pid = pg_backend_pid()", &[]).await.map_err(text)?;
    Ok(r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sslmodes() {
    let pki = Pki::new();
    let pg = pki.pg();
    let root = format!("&sslrootcert={}", pki.path("ca.pem").display());
    for (host, query, tls) in [
        ("localhost", "?sslmode=require".to_owned(), true),
        ("localhost", format!("?sslmode=verify-full{root}"), true),
        ("127.0.0.1", format!("?sslmode=verify-ca{root}"), true),
        ("127.0.0.1", "?sslmode=disable".to_owned(), false),
        ("127.0.0.1", "".to_owned(), true), // libpq's default, prefer: TLS when the server has it
        // SCRAM-SHA-256-PLUS to Postgres (it offers it over TLS): refused unless the channel is bound.
        ("localhost", "?sslmode=require&channel_binding=require".to_owned(), true),
    ] {
        let proxy = Proxy::start(&cfg_with(&pg, host, &query, ""));
        assert_eq!(upstream_ssl(&proxy).await, Ok(tls), "{host}{query}: {}", proxy.log());
    }
    // verify-full with a name the certificate does not carry: refused, with the reason.
    let proxy = Proxy::start(&cfg_with(&pg, "127.0.0.1", &format!("?sslmode=verify-full{root}"), ""));
    let err = upstream_ssl(&proxy).await.unwrap_err();
    assert!(err.contains("TLS") && err.to_lowercase().contains("not valid for"), "{err}");
    // A root that did not sign the server's certificate: refused under verify-ca too.
    let other = tempfile::tempdir().unwrap();
    openssl(
        other.path(),
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "o.key",
            "-out",
            "o.pem",
            "-days",
            "1",
            "-subj",
            "/CN=other",
        ],
    );
    let q = format!("?sslmode=verify-ca&sslrootcert={}", other.path().join("o.pem").display());
    let proxy = Proxy::start(&cfg_with(&pg, "localhost", &q, ""));
    let err = upstream_ssl(&proxy).await.unwrap_err();
    assert!(err.contains("TLS"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_refuses_tls_fails_under_require() {
    let pg = Pg::start(); // ssl off
    let proxy = Proxy::start(&cfg_with(&pg, "127.0.0.1", "?sslmode=require", ""));
    let err = upstream_ssl(&proxy).await.unwrap_err();
    assert!(err.contains("does not accept TLS"), "{err}");
    let proxy = Proxy::start(&cfg_with(&pg, "127.0.0.1", "?sslmode=prefer", ""));
    assert_eq!(upstream_ssl(&proxy).await, Ok(false), "prefer falls back to plaintext");
}

fn psql_at(proxy_port: u16, extra: &str) -> std::process::Output {
    let conninfo = format!("host=localhost port={proxy_port} user=postgres dbname=postgres {extra}");
    Command::new("psql")
        .args([conninfo.as_str(), "-XAtc", "select 'ok'"])
        .env("PGPASSWORD", PG_PASSWORD)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_verify_full_channel_binding_and_require() {
    let pki = Pki::new();
    let pg = Pg::start();
    let root = pki.path("ca.pem");
    let proxy = Proxy::start(&cfg_with(&pg, "127.0.0.1", "", &pki.proxy_tls("require")));
    let ok = |out: std::process::Output| {
        assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stderr), proxy.log());
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    };
    ok(psql_at(proxy.port, &format!("sslmode=verify-full sslrootcert={}", root.display())));
    // SCRAM-SHA-256-PLUS: libpq refuses to log in unless the server binds the channel.
    ok(psql_at(proxy.port, &format!("sslmode=verify-full sslrootcert={} channel_binding=require", root.display())));
    // A wrong password is still wrong with channel binding.
    let out = Command::new("psql")
        .args([
            format!(
                "host=localhost port={} user=postgres dbname=postgres sslmode=require channel_binding=require",
                proxy.port
            )
            .as_str(),
            "-XAtc",
            "select 1",
        ])
        .env("PGPASSWORD", "wrong")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("password authentication failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Plaintext under mode = require: FATAL 28000 naming the setting.
    let err = connect(&proxy.conninfo()).await.unwrap_err();
    let db = err.as_db_error().unwrap_or_else(|| panic!("{err}"));
    assert_eq!((db.severity(), db.code().code()), ("FATAL", "28000"));
    assert!(db.message().contains("tls.mode"), "{}", db.message());
}

/// The subject CN of the certificate pgbudget presents now (openssl's own STARTTLS for postgres).
fn presented_cn(port: u16) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-starttls", "postgres", "-connect", &format!("127.0.0.1:{port}")])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().find_map(|l| l.trim().strip_prefix("subject=").map(str::to_owned)).unwrap_or_else(|| panic!("{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_serves_a_new_certificate_to_new_clients_while_sessions_go_on() {
    let pki = Pki::new();
    let pg = Pg::start();
    let cfg = cfg_with(&pg, "127.0.0.1", "", &pki.proxy_tls("allow"));
    let proxy = Proxy::start(&cfg);
    assert!(presented_cn(proxy.port).contains("localhost"));
    let old = connect(&proxy.conninfo()).await.unwrap();
    old.simple_query("select 1").await.unwrap();
    pki.issue("proxy", "ec", "renewed.example");
    let st = Command::new("kill").args(["-HUP", &proxy.pid().to_string()]).status().unwrap();
    assert!(st.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !presented_cn(proxy.port).contains("renewed.example") {
        assert!(std::time::Instant::now() < deadline, "the new certificate was not served: {}", proxy.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    old.simple_query("select 2").await.expect("the older session goes on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_needs_alpn_postgresql() {
    let pki = Pki::new();
    let pg = Pg::start();
    let proxy = Proxy::start(&cfg_with(&pg, "127.0.0.1", "", &pki.proxy_tls("require")));
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_file_iter(pki.path("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let client = |alpn: bool| {
        let mut cfg =
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
        if alpn {
            cfg.alpn_protocols = vec![b"postgresql".to_vec()];
        }
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
    };
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    // With ALPN: a StartupMessage over TLS from the first byte gets the authentication request.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    let mut tls = client(true).connect(name.clone(), tcp).await.unwrap();
    tls.write_all(&raw::startup(196_608, &raw::params("postgres"))).await.unwrap();
    let kind = tls.read_u8().await.unwrap();
    assert_eq!(kind, b'R', "an authentication request");
    // Without ALPN: refused (Postgres 17's rule for direct TLS).
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    let mut tls = client(false).connect(name, tcp).await.unwrap();
    let _ = tls.write_all(&raw::startup(196_608, &raw::params("postgres"))).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut got)).await;
    assert_ne!(got.first(), Some(&b'R'), "no login without ALPN");
}

/// A fake upstream that answers the SSLRequest with N, then follows `script` for the login.
async fn fake_upstream(script: &'static str) -> u16 {
    let port = free_port();
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = [0u8; 8];
                if s.read_exact(&mut head).await.is_err() {
                    return;
                }
                if head[4..] == 80_877_103i32.to_be_bytes() {
                    let _ = s.write_all(b"N").await;
                    let Ok(len) = s.read_i32().await else { return };
                    let mut rest = vec![0u8; (len.clamp(8, 10_000) - 4) as usize];
                    if s.read_exact(&mut rest).await.is_err() {
                        return;
                    }
                }
                let auth = |code: i32, body: &[u8]| {
                    let mut b = code.to_be_bytes().to_vec();
                    b.extend_from_slice(body);
                    raw::msg(b'R', &b)
                };
                match script {
                    "ok-mid-scram" => {
                        let _ = s.write_all(&auth(10, b"SCRAM-SHA-256\0\0")).await;
                        let mut buf = [0u8; 512];
                        let _ = s.read(&mut buf).await;
                        let mut out = auth(0, b"");
                        out.extend(raw::msg(b'Z', b"I"));
                        let _ = s.write_all(&out).await;
                    }
                    _ => {
                        let _ = s.write_all(&auth(3, b"")).await;
                    }
                }
                let mut sink = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_upstreams_cannot_skip_scram_or_get_a_cleartext_password() {
    for (script, needle) in [("ok-mid-scram", "before completing SCRAM"), ("cleartext", "allow_cleartext_upstream")] {
        let port = fake_upstream(script).await;
        let cfg = format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nservice = \"app\"\n\
             [upstreams.primary]\nurl = \"postgres://postgres:{PG_PASSWORD}@127.0.0.1:{port}/postgres\"\nceiling = 20\n\
             [services.app]\nslice = 2\npool_mode = \"session\"\nconnect_timeout = \"2s\"\ncheckout_timeout = \"2s\"\n"
        );
        let proxy = Proxy::start(&cfg);
        let err = connect(&proxy.conninfo()).await.unwrap_err();
        let msg = err.as_db_error().map(|d| d.message().to_owned()).unwrap_or_else(|| err.to_string());
        assert!(msg.contains(needle), "{script}: {msg}");
    }
}

/// `host=/dir`: a Unix-socket upstream (no TLS there), and a cancel that reaches the backend the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_upstream_and_its_cancels() {
    let pg = Pg::start();
    let dir = pg.dir.path().display().to_string();
    let cfg = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nservice = \"app\"\n\
         [upstreams.primary]\nurl = \"postgresql://postgres:{PG_PASSWORD}@/postgres?host={dir}&port={}\"\nceiling = 20\n\n\
         [services.app]\nslice = 2\n",
        pg.port
    );
    let proxy = Proxy::start(&cfg);
    let c = connect(&proxy.conninfo()).await.unwrap_or_else(|e| panic!("{e}: {}", proxy.log()));
    let row = c.query_one("select inet_server_addr() is null, current_database()::text", &[]).await.unwrap();
    assert_eq!((row.get::<_, bool>(0), row.get::<_, String>(1)), (true, "postgres".into()), "served over the socket");
    let token = c.cancel_token();
    let started = std::time::Instant::now();
    let slow = tokio::spawn(async move { c.simple_query("select pg_sleep(20)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = slow.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// `[auth] passthrough` over TLS both ways, with SCRAM-SHA-256-PLUS on both: the key the client's bound proof
/// yields logs in a server that binds its own channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passthrough_role_binds_both_channels() {
    let pki = Pki::new();
    let pg = pki.pg();
    let sql = |conninfo: String, password: &str, sql: &str| {
        Command::new("psql")
            .args([conninfo.as_str(), "-XAtc", sql])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .unwrap()
    };
    let direct = format!("host=127.0.0.1 port={} user=postgres dbname=postgres", pg.port);
    let out = sql(direct, PG_PASSWORD, "create role dave login password 'dave-pw'");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let extra = format!("{}[auth]\nmethod = \"scram-sha-256\"\npassthrough = true\n", pki.proxy_tls("require"));
    let proxy = Proxy::start(&cfg_with(&pg, "localhost", "?sslmode=require&channel_binding=require", &extra));
    let client =
        format!("host=localhost port={} user=dave dbname=postgres sslmode=require channel_binding=require", proxy.port);
    let probe = "select current_user || ':' || ssl from pg_stat_ssl where pid = pg_backend_pid()";
    let out = sql(client.clone(), "dave-pw", probe);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stderr), proxy.log());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "dave:true");
    let out = sql(client, "wrong", probe);
    assert!(String::from_utf8_lossy(&out.stderr).contains("password authentication failed for user \"dave\""));
}
