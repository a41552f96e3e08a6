//! The proxy side of client authentication (SCRAM-SHA-256, md5, trust) against arbitrary client bytes.
//!
//! The `UserDb` is built through the public path, `Config::parse` → `Resolved::resolve` →
//! `UserDb::build`, with a SCRAM-verifier user, an md5-secret user, a password-from-env user (its verifier
//! derived at build) and, by name, an unknown one. Byte 0 picks the method (bits 0-1: SCRAM, md5, trust,
//! SCRAM), the user (bits 2-3), the mode (bit 4), `[auth] passthrough` (bit 5: the role's secret as the upstream
//! would hold it, through `authenticate_passthrough`) and a TLS certificate to bind to (bit 6, so -PLUS is
//! offered):
//! - raw: the rest is written to the client end of a `tokio::io::duplex`, which is then closed;
//! - structured: the rest is `first 0xFF second`. SCRAM: `first` is framed as the client-first message of
//!   a SASLInitialResponse; once the server-first arrives, `@N@` in `second` becomes the combined nonce and
//!   `@P@` the client proof for password `s3cret`, and `second` is framed as the SASLResponse. md5: `first`
//!   is the PasswordMessage text after the challenge, `@M@` in it the right answer. This reaches the
//!   checks after the (random) nonce, up to a successful login.
//!
//! `authenticate` must return, Ok or Err, without panicking, and its buffer must grow only with the bytes
//! that arrived and never past `MAX_PREAUTH_LEN` ("nothing an unauthenticated client sends may cost more
//! memory than this").
#![no_main]

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::BytesMut;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use md5::Digest as _;
use pgbudget::config::resolve::Resolved;
use pgbudget::config::users::{ScramVerifier, Secret, UserDb};
use pgbudget::config::{Config, Env};
use pgbudget::protocol::MAX_PREAUTH_LEN;
use sha2::Sha256;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const PASSWORD: &str = "s3cret";
/// `s3cret` with salt `pgbudget-fuzz-salt`, 4096 iterations.
const VERIFIER: &str = "SCRAM-SHA-256$4096:cGdidWRnZXQtZnV6ei1zYWx0$I1LCF83IpG7Y5vmETZy7+UdxXYpWdOH/vWu6vQwCNjs=:\
                        IRhV3U5S8LKjG8KVnNFeztSeNyQsh9X0cSHuT6I4u/M=";
const USERS: [&str; 4] = ["scram_user", "md5_user", "plain_user", "nobody"];
/// Headroom of the auth buffer over the bytes the client sent (reads are 1 KiB; growth at most doubles).
const SLACK: usize = 4 * 1024 + 1024;

struct World {
    rt: tokio::runtime::Runtime,
    dbs: [UserDb; 3],
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let md5 = format!("md5{:x}", md5::Md5::digest(format!("{PASSWORD}md5_user")));
        let env = Env { vars: [("FUZZ_PW".to_string(), PASSWORD.to_string())].into() };
        let db = |method: &str| {
            // The config refuses a SCRAM verifier for md5 logins: under md5, `scram_user` is unknown.
            let scram = match method {
                "md5" => String::new(),
                _ => format!("[[auth.users]]\nname = \"scram_user\"\nscram = \"{VERIFIER}\"\n"),
            };
            let text = format!(
                "[proxy]\nmode = \"sidecar\"\nservice = \"web\"\n\
                 [auth]\nmethod = \"{method}\"\n{scram}\
                 [[auth.users]]\nname = \"md5_user\"\nmd5 = \"{md5}\"\n\
                 [[auth.users]]\nname = \"plain_user\"\npassword_env = \"FUZZ_PW\"\n\
                 [upstreams.primary]\nurl = \"postgres://app:pw@127.0.0.1:5432/railway\"\nceiling = 97\nreserved = 2\n\
                 [services.web]\nslice = 15\n"
            );
            let config = Config::parse(&text).expect("fuzz config parses");
            let resolved = Resolved::resolve(config, &env).expect("fuzz config resolves");
            UserDb::build(&resolved, &env)
        };
        let dbs = [db("scram-sha-256"), db("md5"), db("trust")];
        for u in &USERS[..3] {
            assert!(dbs[0].get(u).and_then(|u| u.secret.as_ref()).is_some(), "{u} has no secret");
        }
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        World { rt, dbs }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let w = world();
    let method = usize::from(sel & 3) % 3;
    let user = USERS[usize::from((sel >> 2) & 3)];
    let structured = sel & 0x10 != 0;
    let passthrough = sel & 0x20 != 0;
    let binding = sel & 0x40 != 0;
    let db = &w.dbs[method];
    w.rt.block_on(async {
        let (client, mut server) = tokio::io::duplex(16 * 1024);
        // As `client::session::login` passes it (a fresh `BytesMut::new()` is what `read_startup` uses; the
        // `startup` target covers that growth path).
        let mut buf = BytesMut::with_capacity(512);
        let binding = binding.then_some(&b"fuzz certificate"[..]);
        let proxy = async {
            let r = if passthrough {
                // As `client::passthrough` has it: the secret the upstream holds for the role, if any.
                let secret = match user {
                    "scram_user" => ScramVerifier::parse(VERIFIER).map(Secret::Scram),
                    "md5_user" => {
                        Some(Secret::Md5(format!("md5{:x}", md5::Md5::digest(format!("{PASSWORD}md5_user")))))
                    }
                    _ => None,
                };
                db.authenticate_passthrough(&mut server, user, secret, &mut buf, binding).await.map(|_| ())
            } else {
                db.authenticate(&mut server, user, &mut buf, binding).await
            };
            drop(server); // the client's reads end here
            r
        };
        let peer = async {
            let (mut rd, mut wr) = tokio::io::split(client);
            if structured && method != 2 {
                // Under md5, a passthrough role with a SCRAM secret is asked for SCRAM (as Postgres does).
                let md5 = method == 1 && !(passthrough && user == "scram_user");
                structured_client(&mut rd, &mut wr, md5, user, rest).await
            } else {
                raw_client(&mut rd, &mut wr, rest).await
            }
        };
        let (_result, sent) = tokio::join!(proxy, peer);
        let cap = buf.capacity();
        assert!(cap <= sent + SLACK, "auth buffer capacity {cap} for {sent} bytes sent");
        assert!(cap <= MAX_PREAUTH_LEN, "auth buffer capacity {cap} over MAX_PREAUTH_LEN before login");
    });
});

/// Write everything, close, and drain what the proxy says. Returns the bytes written.
async fn raw_client<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(rd: &mut R, wr: &mut W, bytes: &[u8]) -> usize {
    let write = async {
        let _ = wr.write_all(bytes).await;
        let _ = wr.shutdown().await;
    };
    let drain = async {
        let mut sink = Vec::new();
        let _ = rd.read_to_end(&mut sink).await;
    };
    tokio::join!(write, drain);
    bytes.len()
}

async fn structured_client<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    rd: &mut R,
    wr: &mut W,
    md5: bool,
    user: &str,
    rest: &[u8],
) -> usize {
    let (first, second) = match rest.iter().position(|&b| b == 0xFF) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let mut sent = 0;
    if md5 {
        let Some(salt) = next_auth(rd, 5).await else { return drain(rd, sent).await };
        let mut answer = first.to_vec();
        if salt.len() == 4 {
            let inner = format!("{:x}", md5::Md5::digest(format!("{PASSWORD}{user}")));
            let mut h = md5::Md5::new();
            h.update(inner.as_bytes());
            h.update(&salt);
            answer = replace(&answer, b"@M@", format!("md5{:x}", h.finalize()).as_bytes());
        }
        answer.push(0);
        sent += send(wr, b'p', &[&answer]).await;
    } else {
        let mech = b"SCRAM-SHA-256\0";
        let n = (first.len() as i32).to_be_bytes();
        sent += send(wr, b'p', &[mech, &n, first]).await;
        let Some(server_first) = next_auth(rd, 11).await else { return drain(rd, sent).await };
        let mut fin = second.to_vec();
        if let Ok(sf) = std::str::from_utf8(&server_first) {
            if let Some(nonce) = attr(sf, 'r') {
                fin = replace(&fin, b"@N@", nonce.as_bytes());
            }
            if let Some(proof) = proof_for(sf, first, &fin) {
                fin = replace(&fin, b"@P@", B64.encode(proof).as_bytes());
            }
        }
        sent += send(wr, b'p', &[&fin]).await;
    }
    let _ = wr.shutdown().await;
    drain(rd, sent).await
}

async fn drain<R: AsyncRead + Unpin>(rd: &mut R, sent: usize) -> usize {
    let mut sink = Vec::new();
    let _ = rd.read_to_end(&mut sink).await;
    sent
}

/// Frame `parts` as one message of type `kind` and write it; returns the bytes written.
async fn send<W: AsyncWrite + Unpin>(wr: &mut W, kind: u8, parts: &[&[u8]]) -> usize {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut msg = Vec::with_capacity(5 + len);
    msg.push(kind);
    msg.extend_from_slice(&((len + 4) as i32).to_be_bytes());
    for p in parts {
        msg.extend_from_slice(p);
    }
    let _ = wr.write_all(&msg).await;
    msg.len()
}

/// Read server messages until an Authentication request with `code`; its payload, or None at EOF.
async fn next_auth<R: AsyncRead + Unpin>(rd: &mut R, code: i32) -> Option<Vec<u8>> {
    loop {
        let mut head = [0u8; 5];
        rd.read_exact(&mut head).await.ok()?;
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
        assert!((8..=16 * 1024).contains(&len), "proxy sent {:?} with length {len}", head[0] as char);
        let mut body = vec![0u8; len as usize - 4];
        rd.read_exact(&mut body).await.ok()?;
        assert_eq!(head[0], b'R', "proxy sent a {:?} during authentication", head[0] as char);
        if body.len() >= 4 && i32::from_be_bytes([body[0], body[1], body[2], body[3]]) == code {
            return Some(body[4..].to_vec());
        }
    }
}

fn replace(hay: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

fn attr(msg: &str, key: char) -> Option<&str> {
    msg.split(',').find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("any key length");
    m.update(msg);
    m.finalize().into_bytes().into()
}

/// ClientKey for [`PASSWORD`] under a salt and iteration count, cached (the proxy's salts are few).
fn client_key(salt: &[u8], iterations: u32) -> [u8; 32] {
    static CACHE: OnceLock<Mutex<HashMap<(Vec<u8>, u32), [u8; 32]>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(k) = cache.lock().unwrap().get(&(salt.to_vec(), iterations)) {
        return *k;
    }
    let mut u = {
        let mut m = HmacSha256::new_from_slice(PASSWORD.as_bytes()).unwrap();
        m.update(salt);
        m.update(&[0, 0, 0, 1]);
        <[u8; 32]>::from(m.finalize().into_bytes())
    };
    let mut salted = u;
    for _ in 1..iterations {
        u = hmac(PASSWORD.as_bytes(), &u);
        salted.iter_mut().zip(u.iter()).for_each(|(s, x)| *s ^= x);
    }
    let key = hmac(&salted, b"Client Key");
    let mut c = cache.lock().unwrap();
    if c.len() < 64 {
        c.insert((salt.to_vec(), iterations), key);
    }
    key
}

/// The client proof for `fin` (the client-final message, proof still a placeholder) as the proxy will
/// check it: over `bare,server-first,without-proof`.
fn proof_for(server_first: &str, first: &[u8], fin: &[u8]) -> Option<[u8; 32]> {
    let client_first = std::str::from_utf8(first).ok()?;
    let c1 = client_first.find(',')?;
    let c2 = c1 + 1 + client_first[c1 + 1..].find(',')?;
    let bare = &client_first[c2 + 1..];
    let (without_proof, _) = std::str::from_utf8(fin).ok()?.rsplit_once(",p=")?;
    let salt = B64.decode(attr(server_first, 's')?).ok()?;
    let iterations: u32 = attr(server_first, 'i')?.parse().ok().filter(|i| (1..=100_000).contains(i))?;
    let ck = client_key(&salt, iterations);
    let stored: [u8; 32] = Sha256::digest(ck).into();
    let sig = hmac(&stored, format!("{bare},{server_first},{without_proof}").as_bytes());
    let mut proof = [0u8; 32];
    for i in 0..32 {
        proof[i] = ck[i] ^ sig[i];
    }
    Some(proof)
}
