//! The client side of SCRAM-SHA-256 answered from keys instead of a password (`[auth] passthrough`): a role's
//! ClientKey (recovered from its own client's proof) and ServerKey (from its secret) are all a SCRAM login
//! needs, so pgbudget logs its servers in as that role without ever knowing the password.

use super::ServerError;
use crate::config::users::{hmac, scram_attr, ScramKeys};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// The channel binding a login uses (RFC 5802's GS2 header and, for `p=`, the certificate hash).
pub enum Binding {
    /// `n`: this side cannot bind.
    Unsupported,
    /// `y`: it could, the server did not offer it.
    Unrequested,
    /// `p=tls-server-end-point` with the hash of the server's certificate.
    EndPoint(Vec<u8>),
}

/// One exchange, message by message, as postgres-protocol's `ScramSha256` runs one from a password.
pub struct KeyedScram {
    keys: ScramKeys,
    /// The GS2 header and binding data, as the final message's `c=` carries them.
    cbind: Vec<u8>,
    nonce: String,
    client_first_bare: String,
    auth_message: String,
    message: Vec<u8>,
}

fn bad(what: &str) -> ServerError {
    ServerError::Auth(format!("invalid SCRAM exchange: {what}"))
}

impl KeyedScram {
    pub fn new(keys: ScramKeys, binding: Binding) -> KeyedScram {
        let (header, data) = match binding {
            Binding::Unsupported => ("n,,", Vec::new()),
            Binding::Unrequested => ("y,,", Vec::new()),
            Binding::EndPoint(hash) => ("p=tls-server-end-point,,", hash),
        };
        let mut raw = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut raw);
        let nonce = B64.encode(raw);
        let client_first_bare = format!("n=,r={nonce}");
        let message = format!("{header}{client_first_bare}").into_bytes();
        let mut cbind = header.as_bytes().to_vec();
        cbind.extend_from_slice(&data);
        KeyedScram { keys, cbind, nonce, client_first_bare, auth_message: String::new(), message }
    }

    /// The message to send next.
    pub fn message(&self) -> &[u8] {
        &self.message
    }

    /// Take the server-first message (`r=`, `s=`, `i=`) and make the client-final one with the proof.
    pub fn update(&mut self, server_first: &[u8]) -> Result<(), ServerError> {
        let text = std::str::from_utf8(server_first).map_err(|_| bad("server-first is not UTF-8"))?;
        let nonce = scram_attr(text, 'r').ok_or_else(|| bad("no nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(bad("the server's nonce does not extend ours"));
        }
        let salt = scram_attr(text, 's').and_then(|s| B64.decode(s).ok()).ok_or_else(|| bad("no salt"))?;
        let iterations: u32 = scram_attr(text, 'i').and_then(|i| i.parse().ok()).ok_or_else(|| bad("no iterations"))?;
        if salt != self.keys.salt || iterations != self.keys.iterations {
            return Err(ServerError::Auth(
                "the role's password changed since its client logged in (the server's salt differs)".into(),
            ));
        }
        let without_proof = format!("c={},r={nonce}", B64.encode(&self.cbind));
        self.auth_message = format!("{},{text},{without_proof}", self.client_first_bare);
        let stored_key: [u8; 32] = Sha256::digest(self.keys.client_key).into();
        let signature = hmac(&stored_key, self.auth_message.as_bytes());
        let proof: Vec<u8> = self.keys.client_key.iter().zip(signature).map(|(k, s)| k ^ s).collect();
        self.message = format!("{without_proof},p={}", B64.encode(proof)).into_bytes();
        Ok(())
    }

    /// Check the server-final message: the server proves it holds the role's ServerKey.
    pub fn finish(&mut self, server_final: &[u8]) -> Result<(), ServerError> {
        let text = std::str::from_utf8(server_final).map_err(|_| bad("server-final is not UTF-8"))?;
        if let Some(e) = scram_attr(text, 'e') {
            return Err(ServerError::Auth(format!("the server refused the SCRAM proof: {e}")));
        }
        let got = scram_attr(text, 'v').and_then(|v| B64.decode(v).ok()).ok_or_else(|| bad("no server signature"))?;
        let want = hmac(&self.keys.server_key, self.auth_message.as_bytes());
        if got != want {
            return Err(ServerError::Auth("the server's SCRAM signature is wrong (it does not know the role)".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::users::{hi, ScramVerifier};

    /// The keys a client's proof of `password` yields.
    fn keys_of(password: &str, salt: &[u8], iterations: u32) -> ScramKeys {
        let v = ScramVerifier::from_password(password, salt.to_vec(), iterations);
        let client_key = client_key(password, salt, iterations);
        assert_eq!(<[u8; 32]>::from(Sha256::digest(client_key)), v.stored_key);
        ScramKeys { client_key, server_key: v.server_key, salt: salt.to_vec(), iterations }
    }

    fn client_key(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
        hmac(&hi(password.as_bytes(), salt, iterations), b"Client Key")
    }

    /// The keyed client's proof passes the check a server makes against the password's verifier, and it
    /// accepts only the server signature made with the role's ServerKey.
    #[test]
    fn a_keyed_login_proves_what_the_password_proves() {
        let salt = b"0123456789abcdef";
        let keys = keys_of("s3cret", salt, 4096);
        let mut keyed = KeyedScram::new(keys.clone(), Binding::Unsupported);
        let first = String::from_utf8(keyed.message().to_vec()).unwrap();
        let nonce = first.strip_prefix("n,,n=,r=").unwrap().to_owned();
        let server_first = format!("r={nonce}SERVER,s={},i=4096", B64.encode(salt));
        keyed.update(server_first.as_bytes()).unwrap();
        let fin = String::from_utf8(keyed.message().to_vec()).unwrap();
        let (without, proof) = fin.rsplit_once(",p=").unwrap();
        // The server's check: ClientKey = proof XOR HMAC(StoredKey, AuthMessage), and H(ClientKey) = StoredKey.
        let v = ScramVerifier::from_password("s3cret", salt.to_vec(), 4096);
        let auth = format!("n=,r={nonce},{server_first},{without}");
        let sig = hmac(&v.stored_key, auth.as_bytes());
        let proof = B64.decode(proof).unwrap();
        let key: Vec<u8> = proof.iter().zip(sig).map(|(p, s)| p ^ s).collect();
        assert_eq!(<[u8; 32]>::from(Sha256::digest(&key)), v.stored_key);
        let server_final = format!("v={}", B64.encode(hmac(&v.server_key, auth.as_bytes())));
        keyed.finish(server_final.as_bytes()).unwrap();
        let e = keyed.finish(b"v=AAAA").unwrap_err();
        assert!(e.to_string().contains("signature is wrong"), "{e}");
    }

    #[test]
    fn a_changed_salt_or_a_foreign_nonce_is_refused() {
        let salt = b"0123456789abcdef";
        let keys = keys_of("s3cret", salt, 4096);
        let mut keyed = KeyedScram::new(keys.clone(), Binding::Unsupported);
        let nonce = String::from_utf8(keyed.message()[8..].to_vec()).unwrap();
        let e = keyed.update(format!("r={nonce}X,s={},i=4096", B64.encode(b"another salt....")).as_bytes());
        assert!(e.unwrap_err().to_string().contains("password changed"));
        let e = keyed.update(format!("r=other{nonce},s={},i=4096", B64.encode(salt)).as_bytes());
        assert!(e.unwrap_err().to_string().contains("nonce"));
        let e = keyed.update(format!("r={nonce},s={},i=4096", B64.encode(salt)).as_bytes());
        assert!(e.unwrap_err().to_string().contains("nonce"), "the server must add to the nonce");
    }
}
