//! What a closed server connection still holds: its share slot and ceiling permit stay taken until Postgres
//! has closed the socket (the backend has exited and its connection slot is free), at most [`EXIT_WAIT`].
//! Postgres frees a backend's slot a moment after it reads Terminate; a pool that gave the slot back at once
//! could open a new connection meanwhile and briefly run one more backend than its share — over a hard
//! `max_connections`, a refused login for somebody.

use crate::tls::Stream;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;

use super::slots::Slot;

/// How long a closed connection's slot waits for its backend to exit (a backend busy in a long statement only
/// notices the close when it next reads or writes).
pub const EXIT_WAIT: Duration = Duration::from_secs(2);

/// A closed connection's socket (the Terminate sent, when it could be) with what it holds.
pub(super) struct Leaving {
    pub stream: Stream,
    pub permit: Option<OwnedSemaphorePermit>,
    pub slot: Option<Slot>,
}

impl Leaving {
    /// Give the slot and permit back once the server has closed the socket. Outside a runtime (nothing could
    /// wait) or for a socket already taken apart, at once.
    pub fn release_when_gone(mut self) {
        if matches!(self.stream, Stream::Closed) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        if let Some(slot) = &mut self.slot {
            slot.mark_leaving();
        }
        rt.spawn(self.wait_for_exit(EXIT_WAIT));
    }

    async fn wait_for_exit(mut self, wait: Duration) {
        let _ = tokio::time::timeout(wait, async {
            // Our side ends: a backend that got no Terminate (a broken connection) sees the end of its input.
            let _ = self.stream.shutdown().await;
            let mut sink = [0u8; 256];
            while matches!(self.stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
        // The permit first: a checkout woken by the slot finds the ceiling's room too.
        drop(self.permit.take());
        drop(self.slot.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::slots::Slots;
    use std::time::Instant;
    use tokio::net::{TcpListener, TcpStream};

    /// A connected pair: the proxy's end as a [`Stream`], the "backend's" end as a raw socket.
    async fn pair() -> (Stream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (theirs, _) = l.accept().await.unwrap();
        (Stream::Plain(ours), theirs)
    }

    #[tokio::test]
    async fn the_slot_is_held_until_the_backend_closes_its_socket() {
        let slots = Slots::new(1);
        let (stream, mut backend) = pair().await;
        let leaving = Leaving { stream, permit: None, slot: slots.try_take() };
        leaving.release_when_gone();
        assert_eq!((slots.used(), slots.leaving()), (1, 1));
        // The backend reads to the end of its input (our side shut down), lingers, then exits.
        let mut rest = Vec::new();
        backend.read_to_end(&mut rest).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(slots.used(), 1, "still held while the backend's socket is open");
        let mut freed = std::pin::pin!(slots.freed());
        freed.as_mut().enable();
        drop(backend);
        tokio::time::timeout(Duration::from_secs(5), freed).await.expect("given back when the backend closed");
        assert_eq!((slots.used(), slots.leaving()), (0, 0));
    }

    #[tokio::test]
    async fn a_backend_that_never_closes_holds_the_slot_only_until_the_wait_ends() {
        let slots = Slots::new(1);
        let (stream, _backend) = pair().await;
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
        let permit = sem.clone().try_acquire_owned().unwrap();
        let mut slot = slots.try_take();
        slot.as_mut().unwrap().mark_leaving();
        let started = Instant::now();
        Leaving { stream, permit: Some(permit), slot }.wait_for_exit(Duration::from_millis(200)).await;
        assert!(started.elapsed() >= Duration::from_millis(200), "waited for the exit");
        assert_eq!((slots.used(), slots.leaving(), sem.available_permits()), (0, 0, 1), "then given back");
    }

    #[test]
    fn outside_a_runtime_the_slot_is_given_back_at_once() {
        let slots = Slots::new(1);
        let std_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let stream = rt.block_on(async { TcpStream::connect(std_l.local_addr().unwrap()).await.unwrap() });
        Leaving { stream: Stream::Plain(stream), permit: None, slot: slots.try_take() }.release_when_gone();
        assert_eq!((slots.used(), slots.leaving()), (0, 0));
    }
}
