//! Client startup packets: SSLRequest, GSSENCRequest, CancelRequest and StartupMessage, read incrementally under
//! the pre-authentication cap and decoded strictly; NegotiateProtocolVersion for 3.x minors and `_pq_` options.

use super::{begin, finish, put_cstr};
use super::{
    cstr, read_incremental, ProtocolError, CANCEL_REQUEST, GSSENC_REQUEST, MAX_PREAUTH_LEN, NEWEST_MINOR, PROTOCOL_V3,
    SSL_REQUEST,
};
use bytes::{Buf, BufMut, BytesMut};
use std::collections::BTreeMap;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The first packet a client sends.
#[derive(Debug)]
pub enum StartupPacket {
    Ssl,
    GssEnc,
    Cancel {
        pid: i32,
        secret: i32,
    },
    /// A StartupMessage of protocol 3.`minor` (any minor; the session goes on in 3.0).
    Startup {
        startup: Startup,
        minor: i32,
    },
}

/// A decoded StartupMessage: its parameters in the order given.
#[derive(Debug, Clone, Default)]
pub struct Startup {
    pub params: BTreeMap<String, String>,
}

impl Startup {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }
    pub fn user(&self) -> &str {
        self.get("user").unwrap_or("")
    }
    /// Database defaults to the user name, as in Postgres.
    pub fn database(&self) -> &str {
        self.get("database").unwrap_or_else(|| self.user())
    }
}

/// Read one startup-layout packet (no type byte) from a client.
pub async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> Result<StartupPacket, ProtocolError> {
    let mut body = BytesMut::new();
    read_startup_into(r, &mut body).await
}

/// [`read_startup`] into a caller's buffer (cleared first), which grows only as the packet's bytes
/// arrive, never by the declared length; a declared length over [`MAX_PREAUTH_LEN`] is refused unread.
pub async fn read_startup_into<R: AsyncRead + Unpin>(
    r: &mut R,
    body: &mut BytesMut,
) -> Result<StartupPacket, ProtocolError> {
    let len = r.read_i32().await?;
    let len = usize::try_from(len).unwrap_or(0);
    if !(8..=MAX_PREAUTH_LEN).contains(&len) {
        return Err(ProtocolError::StartupLength(len));
    }
    body.clear();
    read_incremental(r, body, len - 4).await?;
    parse_startup(body)
}

/// Decode a startup-layout packet body (after the length word), strictly as Postgres does: every key has a
/// NUL-terminated value, the list ends with an empty key that is the packet's last byte, and names and values
/// are UTF-8. (pgwire's `Startup` decoder accepts a missing value, a missing terminator and invalid UTF-8, and
/// reads past the declared length when the buffer holds more: see the tests.)
fn parse_startup(body: &[u8]) -> Result<StartupPacket, ProtocolError> {
    let mut b = body;
    let code = b.get_i32();
    match code {
        SSL_REQUEST => Ok(StartupPacket::Ssl),
        GSSENC_REQUEST => Ok(StartupPacket::GssEnc),
        CANCEL_REQUEST if b.len() == 8 => {
            let pid = b.get_i32();
            let secret = b.get_i32();
            Ok(StartupPacket::Cancel { pid, secret })
        }
        CANCEL_REQUEST => Err(ProtocolError::Malformed("CancelRequest")),
        v if v >> 16 == 3 => {
            let bad = || ProtocolError::Malformed("StartupMessage");
            let mut params = BTreeMap::new();
            loop {
                let key = cstr(&mut b).map_err(|_| bad())?;
                if key.is_empty() {
                    break;
                }
                let value = cstr(&mut b).map_err(|_| bad())?;
                params.insert(key.to_owned(), value.to_owned());
            }
            if !b.is_empty() {
                return Err(bad());
            }
            Ok(StartupPacket::Startup { startup: Startup { params }, minor: v & 0xffff })
        }
        v => Err(ProtocolError::Version { major: v >> 16, minor: v & 0xffff }),
    }
}

/// The NegotiateProtocolVersion a client must get before anything else, if it asked for a minor version
/// newer than [`NEWEST_MINOR`] or sent `_pq_.` protocol options (none of which the proxy knows).
pub fn negotiation(startup: &Startup, minor: i32) -> Option<BytesMut> {
    let unknown: Vec<&str> = startup.params.keys().map(String::as_str).filter(|k| k.starts_with("_pq_.")).collect();
    if minor <= NEWEST_MINOR && unknown.is_empty() {
        return None;
    }
    let mut out = BytesMut::new();
    // Like Postgres (and as libpq 17+ checks), the field carries the whole version number 3.0, not the bare minor.
    negotiate_protocol_version(&mut out, PROTOCOL_V3 | NEWEST_MINOR, &unknown);
    Some(out)
}

/// NegotiateProtocolVersion: the newest version supported (major << 16 | minor), then the protocol options
/// not recognised.
pub fn negotiate_protocol_version(out: &mut BytesMut, newest: i32, unrecognized: &[&str]) {
    let at = begin(out, b'v');
    out.put_i32(newest);
    out.put_i32(unrecognized.len() as i32);
    for o in unrecognized {
        put_cstr(out, o);
    }
    finish(out, at);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{read_client_message, read_message, READ_CHUNK};

    fn startup_bytes(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = BytesMut::new();
        body.put_i32(version);
        for (k, v) in params {
            put_cstr(&mut body, k);
            put_cstr(&mut body, v);
        }
        body.put_u8(0);
        let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        out
    }

    /// Capacity a buffer may reach while reading a message that never arrives in full.
    const SMALL: usize = 4 * READ_CHUNK;

    #[tokio::test]
    async fn a_declared_megabyte_allocates_nothing_before_it_arrives() {
        // Startup packet declaring 1 MiB: refused from the length word alone.
        let mut r: &[u8] = &[0, 0x10, 0, 4, 0, 3, 0, 0, b'u'];
        let mut buf = BytesMut::new();
        let e = read_startup_into(&mut r, &mut buf).await.unwrap_err();
        assert!(matches!(e, ProtocolError::StartupLength(n) if n == (1 << 20) + 4), "{e:?}");
        assert_eq!(buf.capacity(), 0);
        // A client message (password, SASL) declaring 1 MiB: refused from its 5-byte header.
        let mut r: &[u8] = &[b'p', 0, 0x10, 0, 0, b'x', b'y'];
        let e = read_client_message(&mut r, &mut buf).await.unwrap_err();
        assert!(matches!(e, ProtocolError::Length { kind: 'p', len } if len == 1 << 20), "{e:?}");
        assert_eq!(buf.capacity(), 0);
        // A server message under the 1 MiB cap whose body never comes: the buffer holds what arrived.
        let mut r: &[u8] = &[b'D', 0, 0x0f, 0xff, 0xff, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        let e = read_message(&mut r, &mut buf).await.unwrap_err();
        assert!(matches!(&e, ProtocolError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof), "{e:?}");
        assert_eq!(&buf[..], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert!(buf.capacity() <= SMALL, "capacity {} for 10 bytes received", buf.capacity());
    }

    #[tokio::test]
    async fn buffers_grow_with_the_bytes_that_arrive() {
        // 1000 bytes of a declared 8000-byte startup packet, then the client goes quiet.
        let (mut tx, mut rx) = tokio::io::duplex(64);
        let feed = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            tx.write_all(&8000i32.to_be_bytes()).await.unwrap();
            tx.write_all(&PROTOCOL_V3.to_be_bytes()).await.unwrap();
            tx.write_all(&[b'a'; 992]).await.unwrap();
            tx
        });
        let mut buf = BytesMut::new();
        let read = tokio::time::timeout(std::time::Duration::from_millis(200), read_startup_into(&mut rx, &mut buf));
        assert!(read.await.is_err(), "the packet is incomplete");
        let _tx = feed.await.unwrap();
        assert_eq!(buf.len(), 996);
        assert!(buf.capacity() <= 2 * READ_CHUNK, "capacity {} for 996 of 7996 bytes", buf.capacity());
    }

    #[tokio::test]
    async fn startup_split_byte_by_byte() {
        let bytes = startup_bytes(PROTOCOL_V3, &[("user", "app"), ("database", "railway"), ("TimeZone", "UTC")]);
        // A one-byte pipe hands the reader every byte separately.
        let (mut tx, mut rx) = tokio::io::duplex(1);
        let feed = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for b in bytes {
                tx.write_all(&[b]).await.unwrap();
            }
        });
        let p = read_startup(&mut rx).await.unwrap();
        feed.await.unwrap();
        let StartupPacket::Startup { startup, minor } = p else { panic!("{p:?}") };
        assert_eq!(minor, 0);
        assert_eq!((startup.user(), startup.database(), startup.get("TimeZone")), ("app", "railway", Some("UTC")));
        assert!(negotiation(&startup, minor).is_none(), "3.0 without _pq_ options needs no negotiation");
    }

    #[tokio::test]
    async fn preauth_cap_is_8192_bytes() {
        let filler = |total: usize| {
            // user, value; the value pads the packet to exactly `total` bytes.
            let base = startup_bytes(PROTOCOL_V3, &[("user", "")]).len();
            "x".repeat(total - base)
        };
        let at_cap = startup_bytes(PROTOCOL_V3, &[("user", &filler(MAX_PREAUTH_LEN))]);
        assert_eq!(at_cap.len(), MAX_PREAUTH_LEN);
        let p = read_startup(&mut &at_cap[..]).await.unwrap();
        assert!(matches!(p, StartupPacket::Startup { .. }), "{p:?}");
        let over = startup_bytes(PROTOCOL_V3, &[("user", &filler(MAX_PREAUTH_LEN + 1))]);
        let e = read_startup(&mut &over[..]).await.unwrap_err();
        assert!(matches!(e, ProtocolError::StartupLength(MAX_PREAUTH_LEN_PLUS_ONE)), "{e:?}");
        for bad in [0i32, 7, -1, i32::MIN] {
            let e = read_startup(&mut &bad.to_be_bytes()[..]).await.unwrap_err();
            assert!(matches!(e, ProtocolError::StartupLength(_)), "{bad}: {e:?}");
        }

        let message = |len: usize| {
            let mut m = vec![b'p'];
            m.extend_from_slice(&(len as i32).to_be_bytes());
            m.resize(len + 1, b'z');
            m
        };
        let mut buf = BytesMut::new();
        let m = message(MAX_PREAUTH_LEN);
        assert_eq!(read_client_message(&mut &m[..], &mut buf).await.unwrap(), b'p');
        assert_eq!(buf.len(), MAX_PREAUTH_LEN - 4);
        let m = message(MAX_PREAUTH_LEN + 1);
        let e = read_client_message(&mut &m[..], &mut buf).await.unwrap_err();
        assert!(matches!(e, ProtocolError::Length { len: MAX_PREAUTH_LEN_PLUS_ONE, .. }), "{e:?}");
        // Servers may send more than a client before login.
        assert_eq!(read_message(&mut &m[..], &mut buf).await.unwrap(), b'p');
        let e = read_client_message(&mut &[b'p', 0, 0, 0, 3][..], &mut buf).await.unwrap_err();
        assert!(matches!(e, ProtocolError::Length { len: 3, .. }), "{e:?}");
    }
    const MAX_PREAUTH_LEN_PLUS_ONE: usize = MAX_PREAUTH_LEN + 1;

    #[tokio::test]
    async fn protocol_3_2_is_negotiated_down_to_3_0() {
        let bytes = startup_bytes(PROTOCOL_V3 + 2, &[("user", "app")]);
        let p = read_startup(&mut &bytes[..]).await.unwrap();
        let StartupPacket::Startup { startup, minor } = p else { panic!("{p:?}") };
        assert_eq!((minor, startup.user()), (2, "app"));
        let msg = negotiation(&startup, minor).expect("3.2 needs NegotiateProtocolVersion");
        assert_eq!(&msg[..], &[b'v', 0, 0, 0, 12, 0, 3, 0, 0, 0, 0, 0, 0]);
        // Any major version but 3 is refused.
        for v in [2 << 16, 4 << 16, (1234 << 16) | 1] {
            let bytes = startup_bytes(v, &[("user", "app")]);
            let e = read_startup(&mut &bytes[..]).await.unwrap_err();
            assert!(matches!(e, ProtocolError::Version { major, .. } if major == v >> 16), "{e:?}");
        }
    }

    #[tokio::test]
    async fn pq_options_are_listed_as_unrecognized() {
        let bytes = startup_bytes(
            PROTOCOL_V3,
            &[("user", "app"), ("_pq_.test_protocol_negotiation", "x"), ("_pq_.a", "1"), ("TimeZone", "UTC")],
        );
        let StartupPacket::Startup { startup, minor } = read_startup(&mut &bytes[..]).await.unwrap() else {
            panic!("not a startup message")
        };
        let msg = negotiation(&startup, minor).expect("_pq_ options need NegotiateProtocolVersion");
        let mut want = vec![b'v'];
        let names = b"_pq_.a\0_pq_.test_protocol_negotiation\0";
        want.extend_from_slice(&((4 + 4 + 4 + names.len()) as i32).to_be_bytes());
        want.extend_from_slice(&[0, 3, 0, 0, 0, 0, 0, 2]);
        want.extend_from_slice(names);
        assert_eq!(&msg[..], &want[..]);
        // With 3.1 and an option, both are reported in one message.
        let msg = negotiation(&startup, 1).unwrap();
        assert_eq!(&msg[5..13], &[0, 3, 0, 0, 0, 0, 0, 2]);
    }

    #[tokio::test]
    async fn malformed_startup_layouts_are_refused_where_pgwire_is_lenient() {
        use pgwire::messages::{startup::Startup as PgwStartup, DecodeContext, Message, ProtocolVersion};
        let v3 = PROTOCOL_V3.to_be_bytes();
        let cases: [&[u8]; 4] = [
            b"user\0postgres",         // no terminators at all
            b"user\0postgres\0",       // no final empty key
            b"user\0postgres\0\0junk", // bytes after the terminator
            b"user\0\xff\xfe\0\0",     // a value that is not UTF-8
        ];
        for body in cases {
            let mut pkt = Vec::new();
            pkt.extend_from_slice(&((8 + body.len()) as i32).to_be_bytes());
            pkt.extend_from_slice(&v3);
            pkt.extend_from_slice(body);
            let r = read_startup(&mut &pkt[..]).await;
            assert!(matches!(r, Err(ProtocolError::Malformed("StartupMessage"))), "{body:?}: {r:?}");
            // pgwire's decoder takes each of these as a valid startup message.
            let ctx = DecodeContext::new(ProtocolVersion::PROTOCOL3_0);
            let lenient = PgwStartup::decode(&mut BytesMut::from(&pkt[..]), &ctx);
            assert!(matches!(lenient, Ok(Some(_))), "{body:?}: pgwire now refuses it too: {lenient:?}");
        }
        // An empty value is legal (Postgres accepts it too).
        let mut pkt = Vec::new();
        let body = b"user\0u\0options\0\0\0";
        pkt.extend_from_slice(&((8 + body.len()) as i32).to_be_bytes());
        pkt.extend_from_slice(&v3);
        pkt.extend_from_slice(body);
        let Ok(StartupPacket::Startup { startup, .. }) = read_startup(&mut &pkt[..]).await else { panic!("valid") };
        assert_eq!(startup.get("options"), Some(""));
    }

    #[tokio::test]
    async fn a_reused_buffer_never_grows_past_the_preauth_cap() {
        // Found by fuzzing: an odd capacity left by a first packet used to double to 16144 bytes.
        let mut input = Vec::new();
        input.extend_from_slice(&1013i32.to_be_bytes());
        input.extend_from_slice(&SSL_REQUEST.to_be_bytes());
        input.extend_from_slice(&[0u8; 1005]);
        let body_len = 8192 - 8;
        input.extend_from_slice(&8192i32.to_be_bytes());
        input.extend_from_slice(&PROTOCOL_V3.to_be_bytes());
        input.extend_from_slice(b"user\0");
        input.extend_from_slice(&vec![b'u'; body_len - 5 - 2]);
        input.extend_from_slice(&[0, 0]);
        let mut r = &input[..];
        let mut buf = BytesMut::new();
        let _ = read_startup_into(&mut r, &mut buf).await;
        let _ = read_startup_into(&mut r, &mut buf).await;
        assert!(buf.capacity() <= MAX_PREAUTH_LEN, "capacity {}", buf.capacity());
    }
}
