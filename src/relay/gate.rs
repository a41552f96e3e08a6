//! A client socket whose reads are skipped while nothing can have arrived: once a read returned Pending, the
//! socket is not polled again until its own wake fired. The relay's loop polls the client on every wake of
//! the session's task (a server reply, a timer, a hand-off), and each of those looks is a trip through
//! tokio's readiness lock that can only return Pending again.
//!
//! The read is polled with a waker of the gate's own that notes the wake and passes it to the task, so the
//! gate knows whether the socket's registered waker fired. Every read of the socket must go through the
//! gate while it is wrapped (a read with another waker would replace the gate's registration unseen):
//! [`crate::relay::Relay::run`] takes the socket generic, so it can only read it through the gate.

use futures_util::task::AtomicWaker;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Set when the socket's read readiness changed; passes the wake on to the task that read last.
#[derive(Default)]
struct Flag {
    woke: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woke.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// `S` with its reads gated on their own wakes; writes pass straight through.
pub struct ReadGate<S> {
    inner: S,
    flag: Arc<Flag>,
    waker: Waker,
    /// The last read returned Pending with the gate's waker registered.
    waiting: bool,
}

impl<S> ReadGate<S> {
    pub fn new(inner: S) -> Self {
        let flag = Arc::new(Flag::default());
        let waker = Waker::from(flag.clone());
        ReadGate { inner, flag, waker, waiting: false }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadGate<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        me.flag.task.register(cx.waker());
        if me.waiting && !me.flag.woke.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let mut own = Context::from_waker(&me.waker);
        let r = Pin::new(&mut me.inner).poll_read(&mut own, buf);
        me.waiting = r.is_pending();
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadGate<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the reads that reach the socket.
    struct Counted<S>(S, Arc<AtomicUsize>);

    impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
        fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let me = self.get_mut();
            me.1.fetch_add(1, Ordering::Relaxed);
            Pin::new(&mut me.0).poll_read(cx, buf)
        }
    }

    fn poll_once<S: AsyncRead + Unpin>(g: &mut ReadGate<S>, cx: &mut Context<'_>) -> Poll<usize> {
        let mut b = [0u8; 16];
        let mut rb = ReadBuf::new(&mut b);
        Pin::new(g).poll_read(cx, &mut rb).map(|r| r.map(|()| rb.filled().len()).unwrap())
    }

    #[tokio::test]
    async fn a_waiting_read_is_skipped_until_its_wake_and_then_reads_the_bytes() {
        let (mut peer, ours) = tokio::io::duplex(64);
        let reads = Arc::new(AtomicUsize::new(0));
        let mut g = ReadGate::new(Counted(ours, reads.clone()));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(poll_once(&mut g, &mut cx).is_pending());
        assert!(poll_once(&mut g, &mut cx).is_pending());
        assert!(poll_once(&mut g, &mut cx).is_pending());
        assert_eq!(reads.load(Ordering::Relaxed), 1, "looked once; the others were skipped");
        peer.write_all(b"hello").await.unwrap();
        assert_eq!(poll_once(&mut g, &mut cx), Poll::Ready(5), "the wake let the read through");
        assert!(poll_once(&mut g, &mut cx).is_pending(), "after bytes, the next read looks again");
        assert_eq!(reads.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn the_task_that_reads_is_woken_when_bytes_arrive() {
        let (mut peer, ours) = tokio::io::duplex(64);
        let mut g = ReadGate::new(ours);
        let reader = tokio::spawn(async move {
            let mut b = [0u8; 8];
            let n = g.read(&mut b).await.unwrap();
            (n, b)
        });
        tokio::task::yield_now().await;
        peer.write_all(b"abc").await.unwrap();
        let (n, b) = tokio::time::timeout(std::time::Duration::from_secs(5), reader).await.unwrap().unwrap();
        assert_eq!(&b[..n], b"abc");
    }

    #[tokio::test]
    async fn end_of_input_after_a_wait_is_seen() {
        let (peer, ours) = tokio::io::duplex(64);
        let mut g = ReadGate::new(ours);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(poll_once(&mut g, &mut cx).is_pending());
        drop(peer);
        assert_eq!(poll_once(&mut g, &mut cx), Poll::Ready(0));
        let mut rest = Vec::new();
        assert_eq!(g.read_to_end(&mut rest).await.unwrap(), 0);
    }
}
