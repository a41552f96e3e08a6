//! One server connection: connect and log in to Postgres, run the proxy's own statements, check liveness,
//! and say goodbye with a Terminate whenever it is dropped.

use crate::config::resolve::UpstreamTarget;
use crate::protocol::sqlstate::ACTIVE_SQL_TRANSACTION;
use crate::protocol::{self, backend, ProtocolError};
use bytes::{BufMut, BytesMut};
use dashmap::DashMap;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// What the server reported in ParameterStatus (looked up on every checkout: hashed with foldhash).
pub type Params = HashMap<String, String, foldhash::fast::RandomState>;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

mod exit;
mod idle;
mod login;
pub use idle::IdleState;
mod probe;
mod replay;
mod scram_keys;
pub mod settings;
pub mod slots;
pub mod statements;

pub use probe::SessionProbe;

/// Errors of the server side.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("server error {code}: {message}")]
    Postgres { code: String, message: String },
    #[error("server closed the connection")]
    Closed,
    #[error("server connection failed during a session: {0}")]
    Io(std::io::Error),
    #[error("upstream {upstream} is at its ceiling of {ceiling} connections")]
    CeilingReached { upstream: String, ceiling: u32 },
    /// Every slot of the service's share is held, by this or another of its pools (another database or role).
    #[error("the service's share is held by its connections")]
    ShareReached,
    #[error("TLS: {0}")]
    Tls(String),
    /// A read-only route's tier check failed on this connection (what was found).
    #[error("read-only route not verified: {0}")]
    ReadOnlyUnverified(String),
}

/// A logged-in server connection. Counts against the upstream ceiling while it lives.
pub struct ServerConn {
    pub stream: crate::tls::Stream,
    pub addr: SocketAddr,
    /// Where a CancelRequest for this backend goes (the same endpoint and TLS).
    pub cancel: Arc<CancelRoute>,
    /// Parameters the server reported (ParameterStatus), kept current by the relay ([`Self::set_param`]).
    pub params: Params,
    /// The server reported `standard_conforming_strings = off` (backslashes escape in plain strings): read
    /// at every checkout, so kept apart from the map.
    pub backslash_quotes: bool,
    /// Session settings in force on this connection since its last reset (set by the proxy or by clients,
    /// as the last probe read them).
    pub applied: settings::Settings,
    /// Named statements of the pool prepared here.
    pub statements: statements::ServerStatements,
    /// The user the connection logged in as (its default `session_authorization`).
    pub login_user: String,
    /// NotificationResponses that arrived during the proxy's own statements, for the client that holds the
    /// connection (a LISTEN's notification must not be lost to a probe).
    pub notifications: BytesMut,
    pub pid: i32,
    pub secret: i32,
    pub created: Instant,
    pub last_checkin: Instant,
    /// `created` + the lifetime it was computed for (`None`: never), so a checkout compares two instants
    /// instead of subtracting them; recomputed when the setting changes (a reload).
    lifetime_end: (Duration, Option<Instant>),
    /// Set when the connection must not be reused.
    pub broken: bool,
    /// The pool generation it was opened in; `RECONNECT` retires older generations.
    pub generation: u64,
    /// Parked (transaction mode): how often the pool's parked-socket watcher had been woken when this server
    /// was parked and its socket found quiet. Unchanged at the checkout, the socket is still quiet and is
    /// not polled again. Set only while the watch is the socket's registered waker (parked, or taken from
    /// the parked list and not yet used), and taken by the checkout's look.
    pub parked_wakes: Option<u64>,
    /// The client pid last written to this server's `SHOW SERVERS` entry (a client that gets its home back
    /// does not write it again).
    noted_client: i32,
    /// One of the upstream's ceiling permits (taken by the Drop, which hands it on to wait for the exit).
    permit: Option<OwnedSemaphorePermit>,
    /// The service's share slot it holds (every pool of the service counts against one share).
    pub slot: Option<slots::Slot>,
    /// Entry in the upstream's server list (for `SHOW SERVERS`), removed on Drop.
    registration: Option<Registration>,
}

/// What `SHOW SERVERS` shows of a server connection.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub service: String,
    pub route: &'static str,
    pub addr: SocketAddr,
    pub pid: i32,
    pub connected_at: std::time::SystemTime,
    /// The cancel-key pid of the client that holds (or last held) it: what that client knows as its
    /// backend's pid, so a NotificationResponse from this backend can name it.
    pub client_pid: i32,
}

/// The live server connections of one upstream, keyed by backend pid.
pub type ServerList = Arc<DashMap<i32, ServerInfo, foldhash::fast::RandomState>>;

#[derive(Debug)]
struct Registration {
    list: ServerList,
    pid: i32,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.list.remove(&self.pid);
    }
}

impl std::fmt::Debug for ServerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConn").field("addr", &self.addr).field("pid", &self.pid).finish()
    }
}

impl Drop for ServerConn {
    fn drop(&mut self) {
        // Best effort, never blocking: an empty socket buffer takes these 5 bytes at once,
        // so Postgres sees a clean Terminate instead of a reset.
        if !self.broken {
            self.stream.try_goodbye(&protocol::TERMINATE);
        }
        // The slot and permit are free once the backend has exited.
        exit::Leaving {
            stream: std::mem::replace(&mut self.stream, crate::tls::Stream::Closed),
            permit: self.permit.take(),
            slot: self.slot.take(),
        }
        .release_when_gone();
    }
}

fn keepalive(stream: &TcpStream) {
    let sock = socket2::SockRef::from(stream);
    let ka = socket2::TcpKeepalive::new().with_time(Duration::from_secs(30)).with_interval(Duration::from_secs(10));
    let _ = sock.set_tcp_keepalive(&ka);
    let _ = stream.set_nodelay(true);
}

/// Apply TCP keepalive and nodelay to a client socket too.
pub fn tune_socket(stream: &TcpStream) {
    keepalive(stream)
}

impl ServerConn {
    /// Record a parameter the server reported.
    pub fn set_param(&mut self, k: String, v: String) {
        if k == "standard_conforming_strings" {
            self.backslash_quotes = v == "off";
        }
        self.params.insert(k, v);
    }

    /// Whether the connection has lived longer than `lifetime` at `now`.
    pub fn outlived(&mut self, lifetime: Duration, now: Instant) -> bool {
        if self.lifetime_end.0 != lifetime {
            self.lifetime_end = (lifetime, self.created.checked_add(lifetime));
        }
        self.lifetime_end.1.is_some_and(|end| now > end)
    }

    /// Connect, log in as the upstream's user and wait for ReadyForQuery, all within `timeout`.
    pub async fn connect(
        target: &UpstreamTarget,
        application_name: &str,
        timeout: Duration,
        permit: OwnedSemaphorePermit,
    ) -> Result<ServerConn, ServerError> {
        tokio::time::timeout(timeout, Self::connect_inner(target, application_name, permit))
            .await
            .map_err(|_| ServerError::Timeout(timeout))?
    }

    async fn connect_inner(
        target: &UpstreamTarget,
        application_name: &str,
        permit: OwnedSemaphorePermit,
    ) -> Result<ServerConn, ServerError> {
        let (stream, endpoint) = open(target).await?;
        let addr = match &endpoint {
            Endpoint::Tcp(a) => *a,
            // SHOW SERVERS shows the port; the socket's path is in the configuration.
            Endpoint::Unix(_) => SocketAddr::from(([0, 0, 0, 0], target.port)),
        };
        let cancel = Arc::new(CancelRoute { endpoint, host: target.host.clone(), tls: target.tls.clone() });
        let mut conn = ServerConn {
            stream,
            addr,
            cancel,
            params: Params::default(),
            backslash_quotes: false,
            applied: Default::default(),
            statements: Default::default(),
            login_user: target.user.clone(),
            notifications: BytesMut::new(),
            pid: 0,
            secret: 0,
            created: Instant::now(),
            last_checkin: Instant::now(),
            lifetime_end: (Duration::MAX, None),
            broken: true, // until the login completes
            permit: Some(permit),
            slot: None,
            registration: None,
            generation: 0,
            parked_wakes: None,
            noted_client: 0,
        };
        let mut out = BytesMut::with_capacity(256);
        out.put_i32(0);
        out.put_i32(protocol::PROTOCOL_V3);
        let options = target.options.as_deref().map(|o| ("options", o));
        let params =
            [("user", target.user.as_str()), ("database", &target.database), ("application_name", application_name)];
        let startup = target.startup.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        for (k, v) in params.into_iter().chain(options).chain(startup) {
            protocol::put_cstr(&mut out, k);
            protocol::put_cstr(&mut out, v);
        }
        out.put_u8(0);
        let len = out.len() as i32;
        out[..4].copy_from_slice(&len.to_be_bytes());
        conn.stream.write_all(&out).await.map_err(ServerError::Connect)?;
        conn.login(target).await?;
        conn.check_session_attrs(target).await?;
        conn.broken = false;
        Ok(conn)
    }

    /// List this connection in `list` until it is dropped.
    pub fn register(&mut self, list: &ServerList, service: &str, route: &'static str) {
        let info = ServerInfo {
            service: service.to_owned(),
            route,
            addr: self.addr,
            pid: self.pid,
            connected_at: std::time::SystemTime::now(),
            client_pid: 0,
        };
        list.insert(self.pid, info);
        self.registration = Some(Registration { list: list.clone(), pid: self.pid });
    }

    /// Record which client (by its cancel-key pid) holds this connection now.
    pub fn note_client(&mut self, client_pid: i32) {
        if self.noted_client == client_pid {
            return;
        }
        self.noted_client = client_pid;
        if let Some(r) = &self.registration {
            if let Some(mut info) = r.list.get_mut(&r.pid) {
                info.client_pid = client_pid;
            }
        }
    }

    /// The upstream's list of server connections this one is registered in.
    pub fn server_list(&self) -> Option<&ServerList> {
        self.registration.as_ref().map(|r| &r.list)
    }

    /// Run one simple-protocol statement and consume its whole reply up to ReadyForQuery.
    /// Returns the server's error, if any, after the reply has been drained.
    pub async fn simple(&mut self, sql: &str, timeout: Duration) -> Result<(), ServerError> {
        let mut out = BytesMut::with_capacity(sql.len() + 8);
        protocol::simple_query(&mut out, sql);
        self.round_trip(&out, timeout).await
    }

    /// [`ServerConn::simple`], returning the first column of every row (NULLs left out).
    pub(crate) async fn simple_column(&mut self, sql: &str, timeout: Duration) -> Result<Vec<String>, ServerError> {
        let mut out = BytesMut::with_capacity(sql.len() + 8);
        protocol::simple_query(&mut out, sql);
        let mut rows = Vec::new();
        self.round_trip_rows(&out, timeout, Some(&mut rows)).await?;
        Ok(rows.into_iter().filter_map(|r| r.into_iter().next().flatten()).collect())
    }

    /// Send the proxy's own messages and read the reply up to ReadyForQuery within `timeout`. Anything but
    /// the server's own error (a timeout, a closed or garbled stream) leaves the connection broken.
    async fn round_trip(&mut self, out: &[u8], timeout: Duration) -> Result<(), ServerError> {
        self.round_trip_rows(out, timeout, None).await
    }

    /// [`ServerConn::round_trip`], keeping the DataRows (as text columns) in `rows` when given.
    pub(crate) async fn round_trip_rows(
        &mut self,
        out: &[u8],
        timeout: Duration,
        rows: Option<&mut Vec<Vec<Option<String>>>>,
    ) -> Result<(), ServerError> {
        let fut = async {
            self.stream.write_all(out).await.map_err(|_| ServerError::Closed)?;
            self.drain_until_ready(rows).await
        };
        let r = tokio::time::timeout(timeout, fut).await.unwrap_or(Err(ServerError::Timeout(timeout)));
        if !matches!(r, Ok(()) | Err(ServerError::Postgres { .. })) {
            self.broken = true;
        }
        r
    }

    /// Read messages until ReadyForQuery with status `I` (after our own statement), keeping DataRows in `rows`
    /// when given and discarding the rest.
    async fn drain_until_ready(&mut self, mut rows: Option<&mut Vec<Vec<Option<String>>>>) -> Result<(), ServerError> {
        let mut buf = BytesMut::with_capacity(256);
        let mut err = None;
        loop {
            let kind = protocol::read_message(&mut self.stream, &mut buf).await.map_err(|e| match e {
                ProtocolError::Io(_) => ServerError::Closed,
                e => ServerError::Protocol(e),
            })?;
            match kind {
                b'D' => {
                    if let Some(rows) = rows.as_deref_mut() {
                        rows.push(probe::data_row(&buf)?);
                    }
                }
                b'S' => {
                    let (k, v) = backend::parameter_status(&buf)?;
                    self.set_param(k, v);
                }
                b'E' => {
                    let backend::ErrorFields { code, message, .. } = backend::error_fields(&buf)?;
                    err = Some(ServerError::Postgres { code, message });
                }
                b'A' => self.keep_notification(&buf),
                b'Z' => {
                    return match err {
                        Some(e) => Err(e),
                        None if buf.first() == Some(&b'I') => Ok(()),
                        None => Err(ServerError::Postgres {
                            code: ACTIVE_SQL_TRANSACTION.into(),
                            message: "still in a transaction".into(),
                        }),
                    };
                }
                _ => {}
            }
        }
    }

    /// Keep a NotificationResponse body for the client (at most 1 MiB of them; more are dropped, as a client
    /// that does not read its socket would lose them too).
    fn keep_notification(&mut self, body: &[u8]) {
        if self.notifications.len() + body.len() + 5 <= 1 << 20 {
            self.notifications.put_u8(b'A');
            self.notifications.put_i32(body.len() as i32 + 4);
            self.notifications.put_slice(body);
        }
    }

    /// Without blocking: is the socket still open with nothing unexpected waiting on it?
    pub fn peek_alive(&self) -> bool {
        self.stream.peek_alive()
    }

    /// `SET SESSION default_transaction_read_only = on`, then check the server reports it (Postgres 14+ does;
    /// older servers accept the SET without a report). A connection that says otherwise is marked broken.
    pub async fn enforce_read_only(&mut self, timeout: Duration) -> Result<(), ServerError> {
        self.simple("SET SESSION default_transaction_read_only = on", timeout).await?;
        match self.params.get(READ_ONLY_SETTING).map(String::as_str) {
            Some("on") | None => Ok(()),
            Some(other) => {
                self.broken = true;
                Err(ServerError::Postgres {
                    code: crate::protocol::sqlstate::READ_ONLY_SQL_TRANSACTION.into(),
                    message: format!("read-only not in force ({READ_ONLY_SETTING} = {other})"),
                })
            }
        }
    }

    /// Cheap round trip: an empty query.
    pub async fn ping(&mut self, timeout: Duration) -> Result<(), ServerError> {
        self.simple("", timeout).await
    }
}

/// The setting read-only routes force on every server connection.
pub const READ_ONLY_SETTING: &str = "default_transaction_read_only";

/// A setting name the proxy may put into SQL: an identifier or `prefix.name`, ASCII only.
pub fn is_setting_name(k: &str) -> bool {
    k.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && k.len() <= 63
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// How a server connection is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(std::path::PathBuf),
}

/// Where cancels for one server connection go: its endpoint, negotiated like the connection itself (so an
/// upstream that takes only TLS gets its cancels over TLS).
#[derive(Debug)]
pub struct CancelRoute {
    pub endpoint: Endpoint,
    pub host: String,
    pub tls: crate::tls::upstream::UpstreamTls,
}

/// Connect to the upstream of `target` (TCP with the URL's TLS, or its Unix socket).
async fn open(target: &UpstreamTarget) -> Result<(crate::tls::Stream, Endpoint), ServerError> {
    if let Some(dir) = &target.socket_dir {
        let path = std::path::Path::new(dir).join(format!(".s.PGSQL.{}", target.port));
        let s = tokio::net::UnixStream::connect(&path).await.map_err(ServerError::Connect)?;
        return Ok((crate::tls::Stream::Unix(s), Endpoint::Unix(path)));
    }
    let tcp = TcpStream::connect((target.host.as_str(), target.port)).await.map_err(ServerError::Connect)?;
    keepalive(&tcp);
    let addr = tcp.peer_addr().map_err(ServerError::Connect)?;
    Ok((negotiate(&target.tls, tcp, &target.host).await?, Endpoint::Tcp(addr)))
}

async fn negotiate(
    tls: &crate::tls::upstream::UpstreamTls,
    tcp: TcpStream,
    host: &str,
) -> Result<crate::tls::Stream, ServerError> {
    tls.negotiate(tcp, host).await.map_err(|e| match e {
        crate::tls::upstream::Refused::Tls(why) => ServerError::Tls(why),
        crate::tls::upstream::Refused::Server { code, message } => ServerError::Postgres { code, message },
    })
}

/// Send a CancelRequest for server backend (pid, secret) along `route`.
pub async fn send_cancel(route: &CancelRoute, pid: i32, secret: i32, timeout: Duration) -> std::io::Result<()> {
    let fut = async {
        let mut s = match &route.endpoint {
            Endpoint::Unix(p) => crate::tls::Stream::Unix(tokio::net::UnixStream::connect(p).await?),
            Endpoint::Tcp(a) => {
                let tcp = TcpStream::connect(a).await?;
                negotiate(&route.tls, tcp, &route.host).await.map_err(std::io::Error::other)?
            }
        };
        let mut out = BytesMut::with_capacity(16);
        out.put_i32(16);
        out.put_i32(protocol::CANCEL_REQUEST);
        out.put_i32(pid);
        out.put_i32(secret);
        s.write_all(&out).await?;
        // Postgres closes the socket when done; wait for that so the cancel has been read.
        let mut b = [0u8; 1];
        let _ = tokio::io::AsyncReadExt::read(&mut s, &mut b).await;
        Ok(())
    };
    tokio::time::timeout(timeout, fut).await.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}
