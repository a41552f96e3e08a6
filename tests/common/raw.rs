//! A raw Postgres v3 client for adversarial tests: hand-built startup packets and frontend messages, a
//! SCRAM-SHA-256 (or md5) login, backend messages read by their 5-byte header — every read bounded by a
//! deadline, so a proxy that stops answering fails the test instead of hanging it.
#![allow(dead_code)]

use bytes::{BufMut, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use std::io;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const V3: i32 = 196_608;
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;
/// Deadline of one backend message unless a test says otherwise.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Fields of an ErrorResponse. Transport trouble is reported in the same shape with a code that is not a
/// SQLSTATE ("closed", "timeout", "io"), so assertions on `code` cover both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgError {
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl PgError {
    fn transport(code: &str, e: impl std::fmt::Display) -> PgError {
        PgError { severity: String::new(), code: code.into(), message: e.to_string() }
    }
    fn from_io(e: io::Error) -> PgError {
        match e.kind() {
            io::ErrorKind::TimedOut => Self::transport("timeout", e),
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                Self::transport("closed", e)
            }
            _ => Self::transport("io", e),
        }
    }
}

/// A five-character SQLSTATE (not one of our transport codes).
pub fn is_sqlstate(code: &str) -> bool {
    code.len() == 5 && code.chars().all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
}

pub fn error_fields(body: &[u8]) -> PgError {
    let mut e = PgError::default();
    for field in body.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let v = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'V' => e.severity = v,
            b'S' if e.severity.is_empty() => e.severity = v,
            b'C' => e.code = v,
            b'M' => e.message = v,
            _ => {}
        }
    }
    e
}

/// A startup-layout packet: length, `code`, then raw `body`.
pub fn packet(code: i32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(&((body.len() + 8) as i32).to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A StartupMessage for protocol `version` with `params`, properly terminated.
pub fn startup(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    packet(version, &body)
}

/// A typed frontend message.
pub fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

pub fn query(sql: &str) -> Vec<u8> {
    msg(b'Q', format!("{sql}\0").as_bytes())
}

/// Parse with no parameter types.
pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    msg(b'P', format!("{name}\0{sql}\0\0\0").as_bytes())
}

/// Bind of the unnamed portal to `stmt` with no parameters, text results.
pub fn bind(stmt: &str) -> Vec<u8> {
    msg(b'B', format!("\0{stmt}\0\0\0\0\0\0\0").as_bytes())
}

pub fn execute() -> Vec<u8> {
    msg(b'E', b"\0\0\0\0\0")
}

/// Execute of `portal`, at most `max_rows` rows (0: all).
pub fn execute_portal(portal: &str, max_rows: i32) -> Vec<u8> {
    let mut b = format!("{portal}\0").into_bytes();
    b.extend_from_slice(&max_rows.to_be_bytes());
    msg(b'E', &b)
}

/// Describe (`kind` b'S' statement or b'P' portal) of `name`.
pub fn describe(kind: u8, name: &str) -> Vec<u8> {
    msg(b'D', &[&[kind], format!("{name}\0").as_bytes()].concat())
}

/// Close (`kind` b'S' statement or b'P' portal) of `name`.
pub fn close(kind: u8, name: &str) -> Vec<u8> {
    msg(b'C', &[&[kind], format!("{name}\0").as_bytes()].concat())
}

pub fn flush() -> Vec<u8> {
    msg(b'H', b"")
}

pub fn sync() -> Vec<u8> {
    msg(b'S', b"")
}

/// Read one backend message within `d`; `Ok(None)` when the peer closed at a message boundary.
pub async fn read_msg<R: AsyncRead + Unpin>(r: &mut R, d: Duration) -> io::Result<Option<(u8, Vec<u8>)>> {
    let read = async {
        let mut h = [0u8; 5];
        if r.read(&mut h[..1]).await? == 0 {
            return Ok(None);
        }
        r.read_exact(&mut h[1..]).await?;
        let len = i32::from_be_bytes([h[1], h[2], h[3], h[4]]);
        if len < 4 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("backend message length {len}")));
        }
        let mut body = vec![0u8; len as usize - 4];
        r.read_exact(&mut body).await?;
        Ok(Some((h[0], body)))
    };
    tokio::time::timeout(d, read)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, format!("no backend message within {d:?}"))))
}

/// The reply to one Query (or Sync): text rows, the first ErrorResponse, the ReadyForQuery status.
#[derive(Debug, Default)]
pub struct Reply {
    pub rows: Vec<Vec<Option<String>>>,
    pub error: Option<PgError>,
    pub status: u8,
}

/// A logged-in raw client.
pub struct Raw {
    pub s: TcpStream,
    pub pid: i32,
    pub secret: i32,
    /// Body of a NegotiateProtocolVersion, if the server sent one, and the first message's type.
    pub negotiate: Option<Vec<u8>>,
    pub first: Option<u8>,
    /// (SQLSTATE, message) of each NoticeResponse during the login.
    pub notices: Vec<(String, String)>,
}

/// user postgres, the given database, client_encoding UTF8 (what tokio-postgres sends too).
pub fn params(database: &str) -> [(&'static str, &str); 3] {
    [("user", "postgres"), ("database", database), ("client_encoding", "UTF8")]
}

impl Raw {
    pub async fn login(port: u16, params: &[(&str, &str)], password: &str) -> Result<Raw, PgError> {
        Self::login_version(port, V3, params, password).await
    }

    /// Connect, send a StartupMessage for `version` and answer the authentication exchange.
    pub async fn login_version(port: u16, version: i32, params: &[(&str, &str)], pw: &str) -> Result<Raw, PgError> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.map_err(PgError::from_io)?;
        s.write_all(&startup(version, params)).await.map_err(PgError::from_io)?;
        let user = params.iter().find(|(k, _)| *k == "user").map(|(_, v)| *v).unwrap_or("");
        let mut raw = Raw { s, pid: 0, secret: 0, negotiate: None, first: None, notices: Vec::new() };
        raw.authenticate(user, pw).await?;
        Ok(raw)
    }

    /// Next backend message within [`DEADLINE`]; a close is an error.
    pub async fn recv(&mut self) -> Result<(u8, Vec<u8>), PgError> {
        match read_msg(&mut self.s, DEADLINE).await {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(PgError::transport("closed", "connection closed")),
            Err(e) => Err(PgError::from_io(e)),
        }
    }

    async fn authenticate(&mut self, user: &str, password: &str) -> Result<(), PgError> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (kind, body) = self.recv().await?;
            self.first.get_or_insert(kind);
            let mut out = BytesMut::new();
            match kind {
                b'R' => match i32::from_be_bytes(body[..4].try_into().unwrap()) {
                    0 => {}
                    3 => out.extend_from_slice(&msg(b'p', format!("{password}\0").as_bytes())),
                    5 => {
                        let salt: [u8; 4] = body[4..8].try_into().unwrap();
                        let hash =
                            postgres_protocol::authentication::md5_hash(user.as_bytes(), password.as_bytes(), salt);
                        out.extend_from_slice(&msg(b'p', format!("{hash}\0").as_bytes()));
                    }
                    10 => {
                        let sc = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                        let mut b = b"SCRAM-SHA-256\0".to_vec();
                        b.extend_from_slice(&(sc.message().len() as i32).to_be_bytes());
                        b.extend_from_slice(sc.message());
                        out.extend_from_slice(&msg(b'p', &b));
                        scram = Some(sc);
                    }
                    11 => {
                        let sc = scram.as_mut().expect("SASLContinue after SASL");
                        sc.update(&body[4..]).map_err(|e| PgError::transport("io", e))?;
                        out.extend_from_slice(&msg(b'p', sc.message()));
                    }
                    12 => {
                        let sc = scram.as_mut().expect("SASLFinal after SASL");
                        sc.finish(&body[4..]).map_err(|e| PgError::transport("io", e))?;
                    }
                    code => return Err(PgError::transport("io", format!("authentication request {code}"))),
                },
                b'E' => return Err(error_fields(&body)),
                b'v' => self.negotiate = Some(body),
                b'N' => {
                    let e = error_fields(&body);
                    self.notices.push((e.code, e.message));
                }
                b'K' => {
                    self.pid = i32::from_be_bytes(body[..4].try_into().unwrap());
                    self.secret = i32::from_be_bytes(body[4..8].try_into().unwrap());
                }
                b'Z' => return Ok(()),
                _ => {}
            }
            if !out.is_empty() {
                self.s.write_all(&out).await.map_err(PgError::from_io)?;
            }
        }
    }

    /// Read to the next ReadyForQuery. A close (e.g. after a FATAL) is an error: the FATAL's fields if one came.
    pub async fn reply(&mut self) -> Result<Reply, PgError> {
        let mut r = Reply::default();
        loop {
            let (kind, body) = match self.recv().await {
                Ok(m) => m,
                Err(e) => return Err(r.error.unwrap_or(e)),
            };
            match kind {
                b'D' => r.rows.push(data_row(&body)),
                b'E' if r.error.is_none() => r.error = Some(error_fields(&body)),
                b'Z' => {
                    r.status = body[0];
                    return Ok(r);
                }
                _ => {}
            }
        }
    }

    /// Send a simple Query and read its reply.
    pub async fn simple(&mut self, sql: &str) -> Result<Reply, PgError> {
        self.s.write_all(&query(sql)).await.map_err(PgError::from_io)?;
        self.reply().await
    }
}

fn data_row(body: &[u8]) -> Vec<Option<String>> {
    let n = u16::from_be_bytes([body[0], body[1]]) as usize;
    let mut at = 2;
    let mut row = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes(body[at..at + 4].try_into().unwrap());
        at += 4;
        if len < 0 {
            row.push(None);
        } else {
            row.push(Some(String::from_utf8_lossy(&body[at..at + len as usize]).into_owned()));
            at += len as usize;
        }
    }
    row
}

/// A CancelRequest packet.
pub fn cancel_request(pid: i32, secret: i32) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_i32(pid);
    b.put_i32(secret);
    packet(CANCEL_REQUEST, &b)
}

/// Resident set size of a process in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| s.lines().any(|l| l.starts_with("State:") && !l.contains("zombie")))
        .unwrap_or(false)
}
