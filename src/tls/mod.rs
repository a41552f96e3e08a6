//! TLS on both sides with rustls: [`Stream`] is one socket, plain or TLS (from a client or to an upstream), that
//! the relay pump, the login code and the resets read and write alike; `upstream` makes the connector for a
//! server URL's `sslmode`/`sslrootcert`; `listener` the acceptor for clients (`[tls]`).

pub mod listener;
pub mod upstream;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A socket of the proxy, plain or TLS.
pub enum Stream {
    Plain(TcpStream),
    /// A Unix-socket upstream (`host=/dir`); never TLS, as libpq.
    Unix(tokio::net::UnixStream),
    /// A client that negotiated TLS with pgbudget.
    Accepted(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// pgbudget's TLS connection to an upstream.
    Connected(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// Taken apart for a TLS upgrade that failed: reads end, writes fail.
    Closed,
}

impl Stream {
    /// The TCP socket underneath (none once taken apart).
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Accepted(s) => Some(s.get_ref().0),
            Stream::Connected(s) => Some(s.get_ref().0),
            Stream::Unix(_) | Stream::Closed => None,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Accepted(_) | Stream::Connected(_))
    }

    /// The upstream's certificate (DER) on a connection to it, for `tls-server-end-point` channel binding.
    pub fn server_certificate(&self) -> Option<Vec<u8>> {
        match self {
            Stream::Connected(s) => s.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()),
            _ => None,
        }
    }

    /// Without blocking: is the socket open with nothing waiting on it? Peeks, so no TLS record is consumed.
    pub fn peek_alive(&self) -> bool {
        let sock = match self {
            Stream::Unix(u) => socket2::SockRef::from(u),
            other => match other.tcp() {
                Some(tcp) => socket2::SockRef::from(tcp),
                None => return false,
            },
        };
        let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        matches!(sock.peek(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Best effort, never blocking: write `bytes` (a Terminate) if the socket takes them at once. On TLS the
    /// bytes are sealed into a record and followed by close_notify.
    pub fn try_goodbye(&mut self, bytes: &[u8]) {
        match self {
            Stream::Plain(s) => {
                let _ = s.try_write(bytes);
            }
            Stream::Unix(s) => {
                let _ = s.try_write(bytes);
            }
            Stream::Accepted(s) => {
                let (tcp, conn) = s.get_mut();
                seal_and_send(tcp, conn, bytes);
            }
            Stream::Connected(s) => {
                let (tcp, conn) = s.get_mut();
                seal_and_send(tcp, conn, bytes);
            }
            Stream::Closed => {}
        }
    }
}

fn seal_and_send<D>(tcp: &TcpStream, conn: &mut rustls::ConnectionCommon<D>, bytes: &[u8]) {
    use std::io::Write;
    if conn.writer().write_all(bytes).is_err() {
        return;
    }
    conn.send_close_notify();
    struct Nonblocking<'a>(&'a TcpStream);
    impl Write for Nonblocking<'_> {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.try_write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut w = Nonblocking(tcp);
    while conn.wants_write() {
        if conn.write_tls(&mut w).is_err() {
            break;
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Accepted(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Connected(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Accepted(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Connected(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Closed => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Accepted(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Connected(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Closed => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
            Stream::Accepted(s) => s.is_write_vectored(),
            Stream::Connected(s) => s.is_write_vectored(),
            Stream::Closed => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Accepted(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Connected(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Accepted(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Connected(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }
}
