//! TLS for clients (`[tls]`): a PEM certificate chain and key (RSA or ECDSA), TLS 1.2 and newer, offered on
//! SSLRequest and to direct TLS (ALPN `postgresql`, Postgres 17's `sslnegotiation=direct`). Loaded at startup
//! and again on reload, so a renewed certificate reaches new clients while running sessions keep theirs.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// A loaded certificate and key, ready to accept clients.
pub struct Listener {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// The end-entity certificate (DER): what SCRAM-SHA-256-PLUS binds to (`tls-server-end-point`).
    pub certificate: Vec<u8>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener").field("certificate_bytes", &self.certificate.len()).finish()
    }
}

impl Listener {
    /// Read `cert` (chain, end-entity first) and `key`; every problem is named with its file.
    pub fn load(cert: &Path, key: &Path) -> Result<Listener, String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| format!("tls.cert {}: {e}", cert.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("tls.cert {}: {e}", cert.display()))?;
        let Some(first) = chain.first() else {
            return Err(format!("tls.cert {}: no certificate in the file", cert.display()));
        };
        let certificate = first.to_vec();
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("tls.key {}: {e}", key.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| format!("tls.cert/tls.key: {e}"))?;
        // Direct TLS clients must ask for ALPN postgresql; SSLRequest clients send none (both are accepted).
        cfg.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(Listener { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)), certificate })
    }
}
