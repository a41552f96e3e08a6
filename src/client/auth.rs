//! Client authentication: the proxy side of SCRAM-SHA-256 and md5, checked against the user database
//! (`config::users`).
//!
//! An unknown user runs the same exchange against a made-up secret, so the reply never tells an
//! unknown user from a wrong password.

use crate::config::users::{
    hmac, is_md5_secret, md5_answer, scram_attr, RoleKeys, ScramKeys, ScramVerifier, Secret, User, UserDb,
};
use crate::config::AuthMethod;
use crate::error::AuthError;
use crate::protocol::{self, cstr, ProtocolError};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::{Buf, BytesMut};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

impl UserDb {
    /// Run the configured exchange on a client socket. On success the client has not yet been sent AuthenticationOk.
    /// `binding`: over TLS, pgbudget's certificate (DER), so SCRAM-SHA-256-PLUS is offered and checked.
    pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        sock: &mut S,
        user: &str,
        buf: &mut BytesMut,
        binding: Option<&[u8]>,
    ) -> Result<(), AuthError> {
        let known = self.users.get(user);
        match self.method {
            AuthMethod::Trust => {
                if known.is_some() || self.users.is_empty() {
                    Ok(())
                } else {
                    Err(AuthError::Failed { user: user.into(), reason: "unknown user" })
                }
            }
            AuthMethod::Md5 => self.md5(sock, user, known, buf).await,
            AuthMethod::Scram => self.scram(sock, user, known, buf, binding).await,
        }
    }

    async fn md5<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        sock: &mut S,
        user: &str,
        known: Option<&User>,
        buf: &mut BytesMut,
    ) -> Result<(), AuthError> {
        let stored = match known.and_then(|u| u.secret.as_ref()) {
            Some(Secret::Plain(p, _)) => Some(format!("md5{:x}", md5::Md5::digest(format!("{p}{user}")))),
            Some(Secret::Md5(h)) => Some(h.clone()),
            Some(Secret::Scram(_)) | None => None,
        };
        md5_exchange(sock, user, stored.as_deref(), buf).await
    }

    fn verifier_for(&self, user: &str, known: Option<&User>) -> (ScramVerifier, bool) {
        match known.and_then(|u| u.secret.as_ref()) {
            Some(Secret::Scram(v)) | Some(Secret::Plain(_, v)) => (v.clone(), true),
            _ => {
                // A made-up verifier that no password matches; the salt is stable per user.
                let salt = hmac(&self.mock_key, format!("salt:{user}").as_bytes())[..16].to_vec();
                let stored_key = hmac(&self.mock_key, format!("stored:{user}").as_bytes());
                (ScramVerifier { iterations: 4096, salt, stored_key, server_key: stored_key }, false)
            }
        }
    }

    async fn scram<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        sock: &mut S,
        user: &str,
        known: Option<&User>,
        buf: &mut BytesMut,
        binding: Option<&[u8]>,
    ) -> Result<(), AuthError> {
        let (verifier, real) = self.verifier_for(user, known);
        scram_exchange(sock, user, &verifier, real, buf, binding).await.map(|_| ())
    }

    /// `[auth] passthrough`: check a role not listed under `[[auth.users]]` against `secret`, the secret the
    /// upstream holds for it, as Postgres would: SCRAM for a SCRAM secret; under `method = "md5"`, md5 for an
    /// md5 one (Postgres's `md5` method does the same). `None` (no such role, no secret) or a secret the
    /// method cannot use runs the exchange against a made-up one and fails like a wrong password. On
    /// success, what its servers log in with.
    pub async fn authenticate_passthrough<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        sock: &mut S,
        user: &str,
        secret: Option<Secret>,
        buf: &mut BytesMut,
        binding: Option<&[u8]>,
    ) -> Result<RoleKeys, AuthError> {
        let verifier = match (self.method, secret) {
            (_, Some(Secret::Scram(v))) => v,
            (AuthMethod::Md5, Some(Secret::Md5(h))) => {
                md5_exchange(sock, user, Some(&h), buf).await?;
                return Ok(RoleKeys::Md5(h));
            }
            (AuthMethod::Md5, _) => {
                md5_exchange(sock, user, None, buf).await?; // fails: there is no secret to match
                return Err(AuthError::Failed { user: user.into(), reason: "no md5-capable secret" });
            }
            _ => {
                let (mock, _) = self.verifier_for(user, None);
                scram_exchange(sock, user, &mock, false, buf, binding).await?; // fails: the secret is made up
                return Err(AuthError::Failed { user: user.into(), reason: "unknown user" });
            }
        };
        let client_key = scram_exchange(sock, user, &verifier, true, buf, binding).await?;
        Ok(RoleKeys::Scram(ScramKeys {
            client_key,
            server_key: verifier.server_key,
            salt: verifier.salt,
            iterations: verifier.iterations,
        }))
    }
}

/// The server side of md5 against `stored` (`md5` + hex of md5(password || user)); `None`: every answer fails.
async fn md5_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    sock: &mut S,
    user: &str,
    stored: Option<&str>,
    buf: &mut BytesMut,
) -> Result<(), AuthError> {
    let mut salt = [0u8; 4];
    rand::thread_rng().fill_bytes(&mut salt);
    let mut out = BytesMut::new();
    protocol::auth_request(&mut out, 5, &salt);
    sock.write_all(&out).await.map_err(ProtocolError::from)?;
    let got = read_password(sock, buf).await?;
    let Some(stored) = stored else {
        return Err(AuthError::Failed { user: user.into(), reason: "no md5-capable secret" });
    };
    // Config load refuses a malformed secret; should one get here anyway, it fails like a wrong password.
    if !is_md5_secret(stored) {
        return Err(AuthError::Failed { user: user.into(), reason: "malformed md5 secret" });
    }
    let expected = md5_answer(stored, salt);
    if constant_eq(expected.as_bytes(), got.as_bytes()) {
        Ok(())
    } else {
        Err(AuthError::Failed { user: user.into(), reason: "wrong password" })
    }
}

/// The server side of SCRAM-SHA-256 (-PLUS over TLS) against `verifier`; `real`: a verifier of the user's
/// (else every proof fails). Returns the ClientKey the proof yields.
async fn scram_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    sock: &mut S,
    user: &str,
    verifier: &ScramVerifier,
    real: bool,
    buf: &mut BytesMut,
    binding: Option<&[u8]>,
) -> Result<[u8; 32], AuthError> {
    let mut out = BytesMut::new();
    let mechanisms: &[u8] =
        if binding.is_some() { b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0" } else { b"SCRAM-SHA-256\0\0" };
    protocol::auth_request(&mut out, 10, mechanisms);
    sock.write_all(&out).await.map_err(ProtocolError::from)?;

    // SASLInitialResponse: mechanism, length, client-first-message.
    let kind = protocol::read_client_message(sock, buf).await?;
    if kind != b'p' {
        return Err(ProtocolError::Unexpected { expected: "SASLInitialResponse", got: kind as char }.into());
    }
    let mut b = &buf[..];
    let mech = cstr(&mut b)?;
    let plus = match mech {
        "SCRAM-SHA-256" => false,
        "SCRAM-SHA-256-PLUS" if binding.is_some() => true,
        _ => return Err(ProtocolError::Malformed("SASLInitialResponse").into()),
    };
    if b.len() < 4 {
        return Err(ProtocolError::Malformed("SASLInitialResponse").into());
    }
    let n = b.get_i32();
    if n < 0 || n as usize != b.len() {
        return Err(ProtocolError::Malformed("SASLInitialResponse").into());
    }
    let client_first = std::str::from_utf8(b).map_err(|_| ProtocolError::Malformed("SCRAM client-first"))?;
    let (gs2, bare) = split_gs2(client_first).ok_or(ProtocolError::Malformed("SCRAM client-first"))?;
    let (gs2, bare) = (gs2.to_owned(), bare.to_owned());
    // The gs2 header must match the mechanism: "p=tls-server-end-point" with -PLUS; "n" or "y" without it,
    // and "y" (the client could bind but thinks we cannot) while we offered -PLUS is a downgrade.
    let expected_c = match (plus, gs2.as_bytes().first(), binding) {
        (true, Some(b'p'), Some(cert)) if gs2.starts_with("p=tls-server-end-point,") => {
            let mut c = gs2.clone().into_bytes();
            c.extend_from_slice(&Sha256::digest(cert));
            B64.encode(c)
        }
        (false, Some(b'n'), _) | (false, Some(b'y'), None) => B64.encode(&gs2),
        (false, Some(b'y'), Some(_)) => {
            return Err(AuthError::Failed { user: user.into(), reason: "channel binding downgrade" })
        }
        _ => return Err(ProtocolError::Malformed("SCRAM gs2 header").into()),
    };
    let client_nonce = scram_attr(&bare, 'r').ok_or(ProtocolError::Malformed("SCRAM client-first"))?;
    let mut nonce_bytes = [0u8; 18];
    rand::thread_rng().fill_bytes(&mut nonce_bytes);
    let nonce = format!("{client_nonce}{}", B64.encode(nonce_bytes));
    let server_first = format!("r={nonce},s={},i={}", B64.encode(&verifier.salt), verifier.iterations);
    out.clear();
    protocol::auth_request(&mut out, 11, server_first.as_bytes());
    sock.write_all(&out).await.map_err(ProtocolError::from)?;

    // SASLResponse: client-final-message.
    let kind = protocol::read_client_message(sock, buf).await?;
    if kind != b'p' {
        return Err(ProtocolError::Unexpected { expected: "SASLResponse", got: kind as char }.into());
    }
    let client_final = std::str::from_utf8(buf).map_err(|_| ProtocolError::Malformed("SCRAM client-final"))?;
    let (without_proof, proof_b64) =
        client_final.rsplit_once(",p=").ok_or(ProtocolError::Malformed("SCRAM client-final"))?;
    let fail = |reason| AuthError::Failed { user: user.into(), reason };
    if scram_attr(without_proof, 'r') != Some(nonce.as_str()) {
        return Err(fail("nonce mismatch"));
    }
    if scram_attr(without_proof, 'c') != Some(expected_c.as_str()) {
        return Err(fail("channel binding mismatch"));
    }
    let proof: [u8; 32] = B64.decode(proof_b64).ok().and_then(|p| p.try_into().ok()).ok_or(fail("malformed proof"))?;
    let auth_message = format!("{bare},{server_first},{without_proof}");
    let client_signature = hmac(&verifier.stored_key, auth_message.as_bytes());
    let mut client_key = [0u8; 32];
    for i in 0..32 {
        client_key[i] = proof[i] ^ client_signature[i];
    }
    let check: [u8; 32] = Sha256::digest(client_key).into();
    if !real || !constant_eq(&check, &verifier.stored_key) {
        return Err(fail(if real { "wrong password" } else { "unknown user" }));
    }
    let server_signature = hmac(&verifier.server_key, auth_message.as_bytes());
    out.clear();
    protocol::auth_request(&mut out, 12, format!("v={}", B64.encode(server_signature)).as_bytes());
    sock.write_all(&out).await.map_err(ProtocolError::from)?;
    Ok(client_key)
}

/// Split `n,,n=user,r=nonce` into the GS2 header (`n,,`) and the bare message.
fn split_gs2(msg: &str) -> Option<(&str, &str)> {
    let first = msg.find(',')?;
    let second = first + 1 + msg[first + 1..].find(',')?;
    let gs2 = &msg[..second + 1];
    if !(gs2.starts_with("n,") || gs2.starts_with("y,") || gs2.starts_with("p=")) {
        return None;
    }
    Some((gs2, &msg[second + 1..]))
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn read_password<S: AsyncRead + Unpin>(sock: &mut S, buf: &mut BytesMut) -> Result<String, AuthError> {
    let kind = protocol::read_client_message(sock, buf).await?;
    if kind != b'p' {
        return Err(ProtocolError::Unexpected { expected: "PasswordMessage", got: kind as char }.into());
    }
    let mut b = &buf[..];
    Ok(cstr(&mut b)?.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn verifier_from_postgres_protocol_parses_and_matches() {
        let v = postgres_protocol::password::scram_sha_256(b"s3cret");
        let parsed = ScramVerifier::parse(&v).expect("parse");
        let again = ScramVerifier::from_password("s3cret", parsed.salt.clone(), parsed.iterations);
        assert_eq!(again.stored_key, parsed.stored_key);
        assert_eq!(again.server_key, parsed.server_key);
        assert!(ScramVerifier::parse("SCRAM-SHA-256$x:y$z").is_none());
    }

    fn md5_db(secret: &str) -> UserDb {
        let user = User {
            name: "app".into(),
            secret: Some(Secret::Md5(secret.into())),
            service: None,
            services: Vec::new(),
            upstream: None,
        };
        UserDb {
            method: AuthMethod::Md5,
            users: HashMap::from([("app".into(), user)]),
            mock_key: [7; 32],
            passthrough: None,
        }
    }

    /// Run an md5 login for `app` over an in-memory pipe; the client answers with `password`.
    async fn md5_login(db: &UserDb, password: &str) -> Result<(), AuthError> {
        use tokio::io::AsyncReadExt;
        let (mut client, mut server) = tokio::io::duplex(1024);
        let proxy = async move {
            let mut buf = BytesMut::new();
            db.authenticate(&mut server, "app", &mut buf, None).await
        };
        let client = async move {
            let mut req = [0u8; 13]; // 'R', length 12, code 5, salt
            client.read_exact(&mut req).await.unwrap();
            assert_eq!(&req[..9], &[b'R', 0, 0, 0, 12, 0, 0, 0, 5]);
            let salt = [req[9], req[10], req[11], req[12]];
            let answer = postgres_protocol::authentication::md5_hash(b"app", password.as_bytes(), salt);
            let mut out = BytesMut::new();
            let at = protocol::begin(&mut out, b'p');
            protocol::put_cstr(&mut out, &answer);
            protocol::finish(&mut out, at);
            client.write_all(&out).await.unwrap();
        };
        tokio::join!(proxy, client).0
    }

    #[tokio::test]
    async fn md5_login_checks_the_stored_secret() {
        let secret = format!("md5{:x}", md5::Md5::digest("s3cretapp"));
        assert!(is_md5_secret(&secret));
        let db = md5_db(&secret);
        md5_login(&db, "s3cret").await.expect("right password");
        let e = md5_login(&db, "wrong").await.unwrap_err();
        assert!(matches!(e, AuthError::Failed { reason: "wrong password", .. }), "{e:?}");
    }

    #[tokio::test]
    async fn a_malformed_md5_secret_fails_the_login_without_panicking() {
        let good = format!("md5{:x}", md5::Md5::digest("s3cretapp"));
        let bads = ["", "md", "md5", "md5abc", "xyz"].map(String::from);
        for bad in bads.into_iter().chain([good.to_uppercase(), good[..34].to_owned(), format!("{good}0")]) {
            assert!(!is_md5_secret(&bad), "{bad:?}");
            let e = md5_login(&md5_db(&bad), "s3cret").await.unwrap_err();
            assert!(matches!(e, AuthError::Failed { reason: "malformed md5 secret", .. }), "{bad:?}: {e:?}");
            // The client sees the same text as for a wrong password.
            let e = crate::error::ProxyError::Auth(e);
            let (_, code, msg) = e.to_client();
            assert_eq!((code, msg.as_str()), ("28P01", "password authentication failed for user \"app\""));
        }
    }

    #[tokio::test]
    async fn oversized_password_messages_are_refused_unread() {
        let db = md5_db(&format!("md5{:x}", md5::Md5::digest("s3cretapp")));
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(&[b'p', 0, 0x10, 0, 0]).await.unwrap(); // declares 1 MiB
        let mut buf = BytesMut::new();
        let e = db.authenticate(&mut server, "app", &mut buf, None).await.unwrap_err();
        assert!(matches!(e, AuthError::Protocol(ProtocolError::Length { .. })), "{e:?}");
        assert_eq!(buf.capacity(), 0);
    }

    #[test]
    fn gs2_split() {
        assert_eq!(split_gs2("n,,n=,r=abc"), Some(("n,,", "n=,r=abc")));
        // Split here; whether "p=" fits the mechanism and the connection is decided by the exchange.
        assert_eq!(split_gs2("p=tls-server-end-point,,n=,r=abc"), Some(("p=tls-server-end-point,,", "n=,r=abc")));
        assert_eq!(split_gs2("x,,n=,r=abc"), None);
        assert_eq!(scram_attr("n=,r=abc", 'r'), Some("abc"));
    }
}
