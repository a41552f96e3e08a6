//! What an idle server connection's socket holds, read without blocking (and without a system call while the
//! reactor has seen nothing arrive): the check of every parked server and every reuse.

use super::{backend, ServerConn};

/// What an idle server connection's socket holds ([`ServerConn::idle_state_in`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleState {
    Clean,
    /// Closed or unclean; `terminated`: an administrator ended the backend (FATAL 57P01).
    Gone {
        terminated: bool,
    },
}

/// The body length a message header in `got` declares (0 when the header is incomplete or bad).
fn frame_len(got: &[u8]) -> usize {
    match got.get(1..5) {
        Some(h) => (i32::from_be_bytes([h[0], h[1], h[2], h[3]]).max(4) - 4) as usize,
        None => 0,
    }
}

impl ServerConn {
    /// Without blocking or a system call while the reactor has seen nothing arrive: what an idle
    /// connection's socket holds. Anything readable means the connection is not clean any more (it is
    /// closed, or the server sent something unasked, such as the FATAL of `pg_terminate_backend`). `waker`
    /// stays registered for the socket's next readiness (a parked server's watcher is woken so; a caller
    /// about to use the connection passes `Waker::noop()`).
    pub fn idle_state_in(&mut self, waker: &std::task::Waker) -> IdleState {
        use std::task::{Context, Poll};
        let mut cx = Context::from_waker(waker);
        // Uninitialised: this runs twice per transaction-mode transaction, and nearly always reads nothing.
        let mut raw = [std::mem::MaybeUninit::<u8>::uninit(); 512];
        let mut buf = tokio::io::ReadBuf::uninit(&mut raw);
        match tokio::io::AsyncRead::poll_read(std::pin::Pin::new(&mut self.stream), &mut cx, &mut buf) {
            Poll::Pending => IdleState::Clean,
            Poll::Ready(Ok(())) => {
                let got = buf.filled();
                let admin = got.len() > 5
                    && got[0] == b'E'
                    && backend::error_fields(&got[5..got.len().min(5 + frame_len(got))])
                        .is_ok_and(|f| f.code == crate::protocol::sqlstate::ADMIN_SHUTDOWN);
                IdleState::Gone { terminated: admin }
            }
            Poll::Ready(Err(_)) => IdleState::Gone { terminated: false },
        }
    }
}
