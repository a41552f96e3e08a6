//! Logging in to an upstream: only the authentication the URL allows (SCRAM or none by default; cleartext and
//! md5 only when `allow_cleartext_upstream` or `require_auth` say so), SCRAM-SHA-256-PLUS over TLS when the
//! server offers it (`channel_binding`), no `AuthenticationOk` before a started SCRAM exchange has verified
//! the server, and `target_session_attrs` checked once logged in.

use super::scram_keys::{Binding as KeyBinding, KeyedScram};
use super::{ServerConn, ServerError};
use crate::config::upstream_url::{AuthPolicy, ChannelBinding, SessionAttrs, UpstreamTarget};
use crate::config::users::{md5_answer, RoleKeys};
use crate::protocol::sqlstate::{INVALID_AUTHORIZATION_SPECIFICATION, INVALID_PASSWORD};
use crate::protocol::{self, backend, ProtocolError};
use bytes::{Buf, BufMut, BytesMut};
use postgres_protocol::authentication::sasl::{self, ChannelBinding as Binding, ScramSha256};
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// How long the `target_session_attrs` check may take.
const ATTRS_TIMEOUT: Duration = Duration::from_secs(5);

fn refuse(policy: &AuthPolicy, what: &str) -> ServerError {
    ServerError::Auth(format!("the server asks for {what}, which this upstream does not allow ({})", policy.source))
}

fn password_message(out: &mut BytesMut, pw: &[u8]) {
    let at = protocol::begin(out, b'p');
    out.put_slice(pw);
    out.put_u8(0);
    protocol::finish(out, at);
}

/// A SCRAM exchange from the URL's password, or from a passthrough role's keys.
enum Scram {
    Password(ScramSha256),
    Keys(KeyedScram),
}

impl Scram {
    fn message(&self) -> &[u8] {
        match self {
            Scram::Password(s) => s.message(),
            Scram::Keys(s) => s.message(),
        }
    }

    fn update(&mut self, b: &[u8]) -> Result<(), ServerError> {
        match self {
            Scram::Password(s) => s.update(b).map_err(|e| ServerError::Auth(e.to_string())),
            Scram::Keys(s) => s.update(b),
        }
    }

    fn finish(&mut self, b: &[u8]) -> Result<(), ServerError> {
        match self {
            Scram::Password(s) => s.finish(b).map_err(|e| ServerError::Auth(e.to_string())),
            Scram::Keys(s) => s.finish(b),
        }
    }
}

impl From<KeyBinding> for Binding {
    fn from(b: KeyBinding) -> Binding {
        match b {
            KeyBinding::Unsupported => Binding::unsupported(),
            KeyBinding::Unrequested => Binding::unrequested(),
            KeyBinding::EndPoint(hash) => Binding::tls_server_end_point(hash),
        }
    }
}

impl ServerConn {
    pub(super) async fn login(&mut self, target: &UpstreamTarget) -> Result<(), ServerError> {
        let policy = &target.auth;
        let mut buf = BytesMut::with_capacity(512);
        let mut out = BytesMut::with_capacity(256);
        let mut scram: Option<Scram> = None;
        let mut scram_done = false;
        let mut authenticated = false;
        let password = || {
            target.password.clone().ok_or_else(|| {
                ServerError::Auth(if target.passthrough.is_some() {
                    "the server asks for a password, which a passthrough role does not have (it answers SCRAM from \
                     its keys, or md5 from its md5 secret)"
                        .into()
                } else {
                    "server asks for a password but the upstream URL has none".into()
                })
            })
        };
        loop {
            let kind = protocol::read_message(&mut self.stream, &mut buf).await?;
            out.clear();
            match kind {
                b'R' => {
                    let mut b = &buf[..];
                    if b.len() < 4 {
                        return Err(ProtocolError::Malformed("Authentication").into());
                    }
                    match b.get_i32() {
                        0 => {
                            // An Ok in the middle of SCRAM would skip the server's proof: refuse it.
                            if scram.is_some() && !scram_done {
                                return Err(ServerError::Auth(
                                    "the server said AuthenticationOk before completing SCRAM (it never proved it knows the password)"
                                        .into(),
                                ));
                            }
                            if !authenticated && !policy.none {
                                return Err(refuse(policy, "no authentication"));
                            }
                            if policy.channel_binding == ChannelBinding::Require && !scram_done {
                                return Err(ServerError::Auth("channel_binding=require, but the server did not authenticate with SCRAM-SHA-256-PLUS".into()));
                            }
                        }
                        3 => {
                            // A passthrough role has no password to send, whatever the policy says.
                            let pw = password()?;
                            if !policy.password {
                                return Err(refuse(policy, "a cleartext password"));
                            }
                            password_message(&mut out, pw.as_bytes());
                            authenticated = true;
                        }
                        5 => {
                            let keys = target.passthrough.as_ref().map(|c| c.load_full());
                            // A passthrough role whose own secret is md5 answers from it: nothing stronger exists
                            // for it to be downgraded from, and no password is at stake.
                            let from_secret = keys.as_deref().and_then(|k| match k {
                                RoleKeys::Md5(h) => Some(h.clone()),
                                RoleKeys::Scram(_) => None,
                            });
                            if !policy.md5 && from_secret.is_none() {
                                return Err(refuse(policy, "an md5 password"));
                            }
                            let salt: [u8; 4] = b
                                .get(..4)
                                .and_then(|s| s.try_into().ok())
                                .ok_or(ProtocolError::Malformed("md5 salt"))?;
                            let hash = match from_secret {
                                Some(h) => md5_answer(&h, salt),
                                None => postgres_protocol::authentication::md5_hash(
                                    target.user.as_bytes(),
                                    password()?.as_bytes(),
                                    salt,
                                ),
                            };
                            password_message(&mut out, hash.as_bytes());
                            authenticated = true;
                        }
                        10 => {
                            if !policy.scram {
                                return Err(refuse(policy, "SCRAM-SHA-256"));
                            }
                            let mechs: Vec<&[u8]> = b.split(|c| *c == 0).collect();
                            let plus = mechs.contains(&sasl::SCRAM_SHA_256_PLUS.as_bytes());
                            let cert = self.stream.server_certificate();
                            let (mech, binding) = match (policy.channel_binding, plus, cert) {
                                (ChannelBinding::Disable, _, _) | (_, false, _) | (_, _, None) => {
                                    if policy.channel_binding == ChannelBinding::Require {
                                        return Err(ServerError::Auth("channel_binding=require, but the server offers no SCRAM-SHA-256-PLUS over TLS".into()));
                                    }
                                    // "n": this client does not support binding; "y": it does, the server did not offer it.
                                    let b = if self.stream.is_tls() && policy.channel_binding != ChannelBinding::Disable
                                    {
                                        KeyBinding::Unrequested
                                    } else {
                                        KeyBinding::Unsupported
                                    };
                                    (sasl::SCRAM_SHA_256, b)
                                }
                                (_, true, Some(der)) => {
                                    (sasl::SCRAM_SHA_256_PLUS, KeyBinding::EndPoint(Sha256::digest(der).to_vec()))
                                }
                            };
                            if !mechs.contains(&mech.as_bytes()) {
                                return Err(ServerError::Auth("server offers no SCRAM-SHA-256".into()));
                            }
                            let s =
                                match target.passthrough.as_ref().map(|c| c.load_full()).as_deref() {
                                    Some(RoleKeys::Scram(keys)) => Scram::Keys(KeyedScram::new(keys.clone(), binding)),
                                    Some(RoleKeys::Md5(_)) => return Err(ServerError::Auth(
                                        "the server asks for SCRAM-SHA-256, but this passthrough role's secret is md5"
                                            .into(),
                                    )),
                                    None => Scram::Password(ScramSha256::new(password()?.as_bytes(), binding.into())),
                                };
                            let at = protocol::begin(&mut out, b'p');
                            protocol::put_cstr(&mut out, mech);
                            out.put_i32(s.message().len() as i32);
                            out.put_slice(s.message());
                            protocol::finish(&mut out, at);
                            scram = Some(s);
                            scram_done = false;
                            authenticated = true;
                        }
                        11 => {
                            let s = scram.as_mut().ok_or(ProtocolError::Malformed("SASLContinue"))?;
                            s.update(b)?;
                            let at = protocol::begin(&mut out, b'p');
                            out.put_slice(s.message());
                            protocol::finish(&mut out, at);
                        }
                        12 => {
                            let s = scram.as_mut().ok_or(ProtocolError::Malformed("SASLFinal"))?;
                            // Verifies the server's signature: a server that does not know the verifier fails here.
                            s.finish(b)?;
                            scram_done = true;
                        }
                        code @ (2 | 7 | 9) => {
                            let method = match code {
                                2 => "Kerberos V5",
                                7 => "GSSAPI",
                                _ => "SSPI",
                            };
                            return Err(ServerError::Auth(format!(
                                "the server asks for {method} authentication (request {code}), which pgbudget does not \
                                 support upstream: give its role a SCRAM-SHA-256, md5 or password line in pg_hba.conf"
                            )));
                        }
                        code => return Err(ServerError::Auth(format!("unsupported authentication request {code}"))),
                    }
                    if !out.is_empty() {
                        self.stream.write_all(&out).await.map_err(ServerError::Connect)?;
                    }
                }
                b'S' => {
                    let (k, v) = backend::parameter_status(&buf)?;
                    self.set_param(k, v);
                }
                b'K' => (self.pid, self.secret) = backend::backend_key_data(&buf)?,
                b'E' => {
                    let backend::ErrorFields { code, message, .. } = backend::error_fields(&buf)?;
                    return Err(if [INVALID_PASSWORD, INVALID_AUTHORIZATION_SPECIFICATION].contains(&code.as_str()) {
                        ServerError::Auth(message)
                    } else {
                        ServerError::Postgres { code, message }
                    });
                }
                b'N' => {}
                b'Z' => return Ok(()),
                other => {
                    return Err(ProtocolError::Unexpected { expected: "login response", got: other as char }.into())
                }
            }
        }
    }

    /// `target_session_attrs=read-write|primary`: refuse a server that is read-only or in recovery.
    pub(super) async fn check_session_attrs(&mut self, target: &UpstreamTarget) -> Result<(), ServerError> {
        let (sql, want, what) = match target.session_attrs {
            SessionAttrs::Any => return Ok(()),
            SessionAttrs::ReadWrite => ("SHOW transaction_read_only", "off", "read-write"),
            SessionAttrs::Primary => ("SELECT pg_is_in_recovery()", "f", "primary"),
        };
        let got = self.simple_column(sql, ATTRS_TIMEOUT).await?.into_iter().next().unwrap_or_default();
        if got != want {
            return Err(ServerError::Auth(format!(
                "target_session_attrs={what}: the server is not ({sql} says {got:?})"
            )));
        }
        Ok(())
    }
}
