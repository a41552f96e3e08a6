//! TLS to an upstream, as its URL asks (libpq's meanings): `sslmode` `disable` | `prefer` | `require` |
//! `verify-ca` | `verify-full`, `sslrootcert` (a PEM file or `system`), `sslsni`, `sslnegotiation=direct`,
//! `ssl_min_protocol_version` / `ssl_max_protocol_version`. The handshake runs inside the caller's connect
//! deadline; a server that answers the SSLRequest with anything but one byte is refused.

use super::Stream;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error as TlsError, RootCertStore, SignatureScheme};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `sslmode` of an upstream URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => {
                return Err(
                    "sslmode=allow (plaintext first, TLS on refusal) is not supported: use prefer or disable".into()
                )
            }
            other => {
                return Err(format!("sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"))
            }
        })
    }
}

/// How one upstream's connections negotiate TLS.
#[derive(Clone)]
pub struct UpstreamTls {
    pub mode: SslMode,
    /// `sslnegotiation=direct`: TLS from the first byte (ALPN `postgresql`, Postgres 17+), no SSLRequest.
    pub direct: bool,
    connector: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls").field("mode", &self.mode).field("direct", &self.direct).finish()
    }
}

impl Default for UpstreamTls {
    /// libpq's default, `prefer`, without certificate checks.
    fn default() -> Self {
        UpstreamTls::build(&TlsParams::default()).expect("the default TLS parameters are valid")
    }
}

/// The TLS parameters of an upstream URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsParams {
    pub mode: SslMode,
    pub rootcert: Option<String>,
    pub sni: bool,
    pub direct: bool,
    /// Only TLS 1.3 (`ssl_min_protocol_version=TLSv1.3`) / only TLS 1.2 (`ssl_max_protocol_version=TLSv1.2`).
    pub only13: bool,
    pub only12: bool,
}

impl Default for TlsParams {
    fn default() -> Self {
        TlsParams { mode: SslMode::Prefer, rootcert: None, sni: true, direct: false, only13: false, only12: false }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Roots from `sslrootcert`: a PEM file of one or more certificates, or `system` (the platform's store).
fn roots(rootcert: &str) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    if rootcert == "system" {
        let found = rustls_native_certs::load_native_certs();
        for c in found.certs {
            let _ = store.add(c);
        }
        if store.is_empty() {
            return Err("sslrootcert=system: the platform's certificate store is empty or unreadable".into());
        }
        return Ok(store);
    }
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_file_iter(rootcert).map_err(|e| format!("sslrootcert={rootcert}: {e}"))?;
    for c in certs {
        let c = c.map_err(|e| format!("sslrootcert={rootcert}: {e}"))?;
        store.add(c).map_err(|e| format!("sslrootcert={rootcert}: {e}"))?;
    }
    if store.is_empty() {
        return Err(format!("sslrootcert={rootcert}: no certificate in the file"));
    }
    Ok(store)
}

impl UpstreamTls {
    /// Check the parameters and build the connector (root files are read here, once).
    pub fn build(p: &TlsParams) -> Result<UpstreamTls, String> {
        if p.mode == SslMode::Disable {
            if p.direct {
                return Err("sslnegotiation=direct needs TLS: it cannot go with sslmode=disable".into());
            }
            return Ok(UpstreamTls { mode: p.mode, direct: false, connector: None });
        }
        if p.direct && matches!(p.mode, SslMode::Prefer) {
            return Err("sslnegotiation=direct needs sslmode=require or stricter (libpq's rule)".into());
        }
        // libpq: with a root certificate given, `require` verifies the chain like `verify-ca`.
        let verify = match (p.mode, &p.rootcert) {
            (SslMode::VerifyFull, _) => Verify::Full,
            (SslMode::VerifyCa, _) | (SslMode::Require, Some(_)) => Verify::Ca,
            _ => Verify::None,
        };
        let rootcert = match (&p.rootcert, verify) {
            (Some(r), _) => Some(r.clone()),
            (None, Verify::None) => None,
            (None, _) => {
                let home = std::env::var_os("HOME").map(std::path::PathBuf::from).unwrap_or_default();
                let default = home.join(".postgresql/root.crt");
                if !default.is_file() {
                    return Err(format!(
                        "sslmode={} needs sslrootcert (a PEM file, or system); {} does not exist",
                        if verify == Verify::Full { "verify-full" } else { "verify-ca" },
                        default.display()
                    ));
                }
                Some(default.to_string_lossy().into_owned())
            }
        };
        let versions: &[&rustls::SupportedProtocolVersion] = match (p.only13, p.only12) {
            (true, true) => return Err("ssl_min_protocol_version=TLSv1.3 with ssl_max_protocol_version=TLSv1.2".into()),
            (true, false) => &[&rustls::version::TLS13],
            (false, true) => &[&rustls::version::TLS12],
            (false, false) => rustls::DEFAULT_VERSIONS,
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(|e| e.to_string())?;
        let verifier: Arc<dyn ServerCertVerifier> = match (verify, rootcert) {
            (Verify::None, _) => Arc::new(NoVerify(provider())),
            (v, Some(r)) => {
                let web = WebPkiServerVerifier::builder_with_provider(Arc::new(roots(&r)?), provider())
                    .build()
                    .map_err(|e| format!("sslrootcert={r}: {e}"))?;
                if v == Verify::Full {
                    web
                } else {
                    Arc::new(ChainOnly(web))
                }
            }
            (_, None) => unreachable!("a verifying mode has roots"),
        };
        let mut cfg = builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth();
        cfg.enable_sni = p.sni;
        if p.direct {
            cfg.alpn_protocols = vec![b"postgresql".to_vec()];
        }
        let connector = Some(tokio_rustls::TlsConnector::from(Arc::new(cfg)));
        Ok(UpstreamTls { mode: p.mode, direct: p.direct, connector })
    }

    /// Negotiate on a fresh connection to `host`: plaintext, or TLS per the mode. `Err` names why not.
    pub async fn negotiate(&self, mut tcp: TcpStream, host: &str) -> Result<Stream, Refused> {
        let Some(connector) = &self.connector else { return Ok(Stream::Plain(tcp)) };
        let name = ServerName::try_from(host.to_owned()).map_err(|e| Refused::Tls(format!("host {host:?}: {e}")))?;
        if !self.direct {
            let mut req = [0u8; 8];
            req[..4].copy_from_slice(&8i32.to_be_bytes());
            req[4..].copy_from_slice(&crate::protocol::SSL_REQUEST.to_be_bytes());
            tcp.write_all(&req).await.map_err(|e| Refused::Tls(format!("sending SSLRequest: {e}")))?;
            let answer =
                tcp.read_u8().await.map_err(|e| Refused::Tls(format!("reading the SSLRequest answer: {e}")))?;
            match answer {
                b'S' => {}
                b'N' if self.mode == SslMode::Prefer => return Ok(Stream::Plain(tcp)),
                b'N' => return Err("the server does not accept TLS (it answered the SSLRequest with N)".into()),
                // A server that cannot take connections now (starting up, too many clients) may answer with
                // its ErrorResponse: that error is what the client should see.
                b'E' => {
                    let len = tcp.read_i32().await.map_err(|e| format!("reading the server's error: {e}"))?;
                    let mut body = vec![0u8; len.clamp(4, 8192) as usize - 4];
                    tcp.read_exact(&mut body).await.map_err(|e| format!("reading the server's error: {e}"))?;
                    let f = crate::protocol::backend::error_fields(&body).map_err(|e| e.to_string())?;
                    return Err(Refused::Server { code: f.code, message: f.message });
                }
                other => return Err(format!("the server answered the SSLRequest with {:?}", other as char).into()),
            }
        }
        let tls = connector.connect(name, tcp).await.map_err(|e| Refused::Tls(format!("TLS handshake: {e}")))?;
        if self.direct && tls.get_ref().1.alpn_protocol() != Some(b"postgresql") {
            return Err("the server did not select ALPN postgresql for direct TLS".into());
        }
        Ok(Stream::Connected(Box::new(tls)))
    }
}

/// Why a connection did not get the TLS its URL asks for.
#[derive(Debug)]
pub enum Refused {
    Tls(String),
    /// The server answered the SSLRequest with its own ErrorResponse.
    Server {
        code: String,
        message: String,
    },
}

impl From<String> for Refused {
    fn from(s: String) -> Self {
        Refused::Tls(s)
    }
}

impl From<&str> for Refused {
    fn from(s: &str) -> Self {
        Refused::Tls(s.to_owned())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verify {
    None,
    Ca,
    Full,
}

/// `sslmode=prefer|require` without a root certificate: encryption, no identity (libpq's meaning). The
/// handshake signatures are still checked.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to a trusted root; the name in it is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end: &CertificateDer<'_>,
        inter: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        match self.0.verify_server_cert(end, inter, name, ocsp, now) {
            Err(TlsError::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
