//! A client's first packets, before it logs in: SSLRequest (TLS when `[tls]` has a certificate), direct TLS,
//! GSSENCRequest, NegotiateProtocolVersion, and a CancelRequest forwarded to the server its key is attached
//! to; and the settings its startup packet asks for.

use crate::budget::cancel::CancelTarget;
use crate::context::App;
use crate::error::ProxyError;
use crate::protocol::{self, ProtocolError, Startup, StartupPacket};
use crate::tls::Stream;
use bytes::BytesMut;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

/// What a client's first packets amounted to.
pub(crate) enum First {
    Startup(Startup),
    Cancel {
        pid: i32,
        secret: i32,
    },
    /// Closed before sending a startup packet (a port probe).
    Gone,
}

/// Read startup packets until a StartupMessage or CancelRequest. An SSLRequest is answered `S` and the socket
/// turned into TLS when `[tls]` has a certificate (`N` otherwise), a TLS ClientHello as the first bytes is
/// direct TLS (ALPN `postgresql` required), a GSSENCRequest is answered `N`; a 3.x StartupMessage asking for a
/// newer minor version or `_pq_.` options gets NegotiateProtocolVersion (the session goes on in 3.0). Under
/// `tls.mode = "require"` a plaintext StartupMessage is refused.
pub(crate) async fn read_startup(
    sock: &mut Stream,
    tls: Option<&crate::tls::listener::Listener>,
    mode: crate::config::TlsMode,
) -> Result<First, ProxyError> {
    let mut buf = BytesMut::new();
    // Direct TLS: the client starts with a TLS handshake record (0x16) instead of a length.
    if let Some(l) = tls {
        let mut first = [0u8; 1];
        let Some(tcp) = sock.tcp() else { return Ok(First::Gone) };
        let n = tcp.peek(&mut first).await.map_err(ProxyError::ClientIo)?;
        if n == 0 {
            return Ok(First::Gone);
        }
        if first[0] == 0x16 {
            upgrade(sock, l).await?;
            let alpn = match sock {
                Stream::Accepted(s) => s.get_ref().1.alpn_protocol() == Some(b"postgresql"),
                _ => false,
            };
            if !alpn {
                return Err(ProxyError::ClientProtocol(ProtocolError::Malformed("direct TLS without ALPN postgresql")));
            }
        }
    }
    loop {
        match protocol::read_startup_into(sock, &mut buf).await {
            Ok(StartupPacket::Ssl) => match tls {
                Some(l) if !sock.is_tls() => {
                    sock.write_all(b"S").await.map_err(ProxyError::ClientIo)?;
                    upgrade(sock, l).await?;
                }
                _ => sock.write_all(b"N").await.map_err(ProxyError::ClientIo)?,
            },
            Ok(StartupPacket::GssEnc) => sock.write_all(b"N").await.map_err(ProxyError::ClientIo)?,
            Ok(StartupPacket::Cancel { pid, secret }) => return Ok(First::Cancel { pid, secret }),
            Ok(StartupPacket::Startup { startup, minor }) => {
                if mode == crate::config::TlsMode::Require && !sock.is_tls() {
                    return Err(ProxyError::TlsRequired);
                }
                if let Some(msg) = protocol::negotiation(&startup, minor) {
                    sock.write_all(&msg).await.map_err(ProxyError::ClientIo)?;
                }
                return Ok(First::Startup(startup));
            }
            Err(ProtocolError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(First::Gone),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Turn a plain client socket into TLS with `l` (the handshake runs inside the caller's login deadline).
async fn upgrade(sock: &mut Stream, l: &crate::tls::listener::Listener) -> Result<(), ProxyError> {
    let Stream::Plain(tcp) = std::mem::replace(sock, Stream::Closed) else {
        return Err(ProxyError::ClientProtocol(ProtocolError::Malformed("a second TLS negotiation")));
    };
    let tls = l.acceptor.accept(tcp).await.map_err(|e| {
        debug!(cause = %e, "client TLS handshake failed");
        ProxyError::ClientIo(e)
    })?;
    *sock = Stream::Accepted(Box::new(tls));
    Ok(())
}

/// Over TLS, pgbudget's certificate: what SCRAM-SHA-256-PLUS binds to.
pub(crate) fn binding(app: &App, sock: &Stream) -> Option<Vec<u8>> {
    if !sock.is_tls() {
        return None;
    }
    app.resolved().tls.as_ref().map(|l| l.certificate.clone())
}

pub(crate) async fn forward_cancel(app: &App, pid: i32, secret: i32) {
    match app.cancels.lookup(pid, secret) {
        Some(CancelTarget::Server(k, in_flight)) => {
            // `in_flight` holds the client's checkout until Postgres has taken the cancel.
            match crate::server::send_cancel(&k.route, k.pid, k.secret, Duration::from_secs(5)).await {
                Ok(()) => info!(server_pid = k.pid, "cancel forwarded"),
                Err(e) => warn!(kind = "cancel", cause = %e, "cancel could not be forwarded"),
            }
            drop(in_flight);
        }
        Some(CancelTarget::Queued(wake)) => {
            wake.wake();
            info!("cancel request ended a queued client's wait");
        }
        None => debug!("cancel request for an unknown or idle key ignored"),
    }
}

/// Startup parameters the proxy handles itself instead of replaying on server connections.
const LOCAL_PARAMS: [&str; 3] = ["user", "database", "options"];

/// Settings the client asked for in its startup packet (including `options=-c k=v`), to replay on servers.
pub fn desired_settings(s: &Startup) -> Result<BTreeMap<String, String>, ProxyError> {
    let mut out = BTreeMap::new();
    for (k, v) in &s.params {
        if k == "replication" {
            return Err(ProxyError::BadParameter(k.clone()));
        }
        if LOCAL_PARAMS.contains(&k.as_str()) || k.starts_with("_pq_.") {
            continue;
        }
        out.insert(k.to_ascii_lowercase(), v.clone());
    }
    if let Some(opts) = s.get("options") {
        let mut words = opts.split_whitespace();
        while let Some(w) = words.next() {
            let kv = match w {
                "-c" => words.next().unwrap_or(""),
                w if w.starts_with("--") => &w[2..],
                w if w.starts_with("-c") => &w[2..],
                other => return Err(ProxyError::BadParameter(format!("options={other}"))),
            };
            let (k, v) = kv.split_once('=').ok_or_else(|| ProxyError::BadParameter(format!("options={kv}")))?;
            out.insert(k.replace('-', "_").to_ascii_lowercase(), v.to_owned());
        }
    }
    for k in out.keys() {
        let ok = k.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        if !ok {
            return Err(ProxyError::BadParameter(k.clone()));
        }
    }
    Ok(out)
}
