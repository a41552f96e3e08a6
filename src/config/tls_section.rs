//! `[tls]`: whether clients may or must use TLS, and the certificate they see.

use serde::Deserialize;

/// Whether clients may or must use TLS.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// SSLRequest is answered `N`.
    Disable,
    /// TLS for clients that ask; plaintext for the rest.
    Allow,
    /// Plaintext clients get FATAL 28000.
    Require,
}

/// `[tls]`: the certificate clients see. Reloaded with the rest of the file (SIGHUP, `RELOAD`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct TlsSection {
    /// Default: `allow` when `cert` is set, else `disable`.
    pub mode: Option<TlsMode>,
    /// PEM certificate chain, end-entity first (RSA or ECDSA).
    pub cert: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
}

impl TlsSection {
    pub fn mode(&self) -> TlsMode {
        self.mode.unwrap_or(if self.cert.is_empty() { TlsMode::Disable } else { TlsMode::Allow })
    }
}
