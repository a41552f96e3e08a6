//! The user database: the logins the proxy accepts (from `[auth]`, or the upstreams' own credentials) and the
//! secrets they are checked against; `client::auth` runs the exchange against it.

use crate::config::resolve::Resolved;
use crate::config::AuthMethod;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::collections::HashMap;

type HmacSha256 = Hmac<Sha256>;

/// A parsed SCRAM-SHA-256 verifier.
#[derive(Debug, Clone)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl ScramVerifier {
    /// Parse `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(s: &str) -> Option<ScramVerifier> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iter, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(ScramVerifier {
            iterations: iter.parse().ok().filter(|i| *i > 0)?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }

    /// Derive a verifier from a plaintext password (held only in memory).
    pub fn from_password(password: &str, salt: Vec<u8>, iterations: u32) -> ScramVerifier {
        let salted = hi(password.as_bytes(), &salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        ScramVerifier { iterations, salt, stored_key, server_key: hmac(&salted, b"Server Key") }
    }
}

/// What a SCRAM-SHA-256 login as a role proves, without its password: the ClientKey (recovered from a
/// client's proof, checked against the role's StoredKey) and the role's ServerKey, salt and iteration count
/// (from its secret; the server's challenge must name the same, or the secret has changed since).
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    pub client_key: [u8; 32],
    pub server_key: [u8; 32],
    pub salt: Vec<u8>,
    pub iterations: u32,
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramKeys(redacted)")
    }
}

/// What a passthrough role's servers log in with, learned from its client's login: SCRAM keys, or the md5
/// secret of a role that has one (md5 authentication answers from the hash alone).
#[derive(Clone, PartialEq, Eq)]
pub enum RoleKeys {
    Scram(ScramKeys),
    Md5(String),
}

impl std::fmt::Debug for RoleKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RoleKeys::Scram(_) => "RoleKeys::Scram(redacted)",
            RoleKeys::Md5(_) => "RoleKeys::Md5(redacted)",
        })
    }
}

/// A passthrough pool's keys, replaced by each client that logs in as its role (the newest proof wins, so
/// a changed password takes effect with the first client that uses it).
pub type KeyCell = std::sync::Arc<arc_swap::ArcSwap<RoleKeys>>;

/// md5 authentication's answer to `salt` for an md5 secret (`md5` + hex of md5(password || user)):
/// `md5` + hex of md5(hex || salt), what libpq computes from the password.
pub(crate) fn md5_answer(secret: &str, salt: [u8; 4]) -> String {
    use md5::Digest;
    let mut h = md5::Md5::new();
    h.update(secret.strip_prefix("md5").unwrap_or(secret).as_bytes());
    h.update(salt);
    format!("md5{:x}", h.finalize())
}

/// The value of attribute `key` in a SCRAM message (`r=…,s=…,i=…`).
pub(crate) fn scram_attr(msg: &str, key: char) -> Option<&str> {
    msg.split(',').find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

pub(crate) fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("hmac accepts any key length");
    m.update(msg);
    m.finalize().into_bytes().into()
}

/// RFC 5802's Hi(): the salted password.
pub(crate) fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(password).expect("hmac accepts any key length");
    m.update(salt);
    m.update(&[0, 0, 0, 1]);
    let mut u: [u8; 32] = m.finalize().into_bytes().into();
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        for (o, x) in out.iter_mut().zip(u.iter()) {
            *o ^= x;
        }
    }
    out
}

/// What a user's login is checked against.
#[derive(Debug, Clone)]
pub enum Secret {
    /// A password from the environment, with its SCRAM verifier derived once at startup.
    Plain(String, ScramVerifier),
    Scram(ScramVerifier),
    /// `md5` + hex(md5(password || user)).
    Md5(String),
}

/// A login the proxy accepts.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub secret: Option<Secret>,
    pub service: Option<String>,
    /// Shared mode by `application_name`: the services this user may name.
    pub services: Vec<String>,
    /// The upstream role its server connections log in as (`None`: the URL's).
    pub upstream: Option<crate::config::databases::UpstreamLogin>,
}

/// All logins, keyed by user name, built once from the resolved config.
#[derive(Debug)]
pub struct UserDb {
    pub method: AuthMethod,
    pub(crate) users: HashMap<String, User>,
    /// Per-process random key for made-up salts of unknown users.
    pub(crate) mock_key: [u8; 32],
    /// `[auth] passthrough`: the query that reads an unlisted role's secret from the upstream.
    pub passthrough: Option<String>,
}

impl UserDb {
    /// Users from `[auth]`; with none declared, the primary upstream's own credentials log in.
    pub fn build(r: &Resolved, env: &crate::config::Env) -> UserDb {
        let mut users = HashMap::new();
        for u in &r.config.auth.users {
            let secret = if let Some(var) = &u.password_env {
                env.get(var).map(plain)
            } else if let Some(s) = &u.scram {
                ScramVerifier::parse(s).map(Secret::Scram)
            } else {
                u.md5.clone().map(Secret::Md5)
            };
            let user = User {
                name: u.name.clone(),
                secret,
                service: u.service.clone(),
                services: u.services.clone(),
                upstream: r.logins.get(&u.name).cloned(),
            };
            users.insert(u.name.clone(), user);
        }
        if users.is_empty() {
            for t in r.upstreams.values() {
                users.entry(t.user.clone()).or_insert_with(|| User {
                    name: t.user.clone(),
                    secret: t.password.as_deref().map(plain),
                    service: None,
                    services: Vec::new(),
                    upstream: None,
                });
            }
        }
        let mut mock_key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut mock_key);
        let passthrough = r.config.auth.passthrough.then(|| r.config.auth.auth_query.clone());
        UserDb { method: r.config.auth.method, users, mock_key, passthrough }
    }

    pub fn get(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }
}

/// Whether `s` is an md5 secret as Postgres stores one: `md5` followed by 32 lowercase hex digits.
pub fn is_md5_secret(s: &str) -> bool {
    s.strip_prefix("md5").is_some_and(|h| h.len() == 32 && h.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')))
}

/// A plaintext secret from the environment; its verifier (random salt) is derived here, once.
fn plain(password: &str) -> Secret {
    let mut salt = vec![0u8; 16];
    rand::thread_rng().fill_bytes(&mut salt);
    Secret::Plain(password.to_owned(), ScramVerifier::from_password(password, salt, 4096))
}
