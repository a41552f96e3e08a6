//! The pump's socket steps: write what a buffer holds, read into a buffer that grows only as bytes arrive.

use super::{BUF, FIRST_READ, READ_MIN};
use bytes::{Buf, BytesMut};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite};

/// Write what `buf` holds; the bytes written (0: nothing to write, or the writer is full).
pub(super) fn poll_send<W: AsyncWrite + Unpin>(
    cx: &mut Context<'_>,
    w: &mut W,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    if buf.is_empty() {
        return Ok(0);
    }
    match Pin::new(w).poll_write(cx, buf) {
        Poll::Ready(Ok(0)) => Err(std::io::ErrorKind::WriteZero.into()),
        Poll::Ready(Ok(n)) => {
            buf.advance(n);
            Ok(n)
        }
        Poll::Ready(Err(e)) => Err(e),
        Poll::Pending => Ok(0),
    }
}

/// Read into the spare capacity of `buf`, reserving `chunk` bytes when it has little room (so a buffer grows
/// only as bytes arrive); a read that fills all the room it had doubles `chunk` for the next, up to [`BUF`].
pub(super) fn poll_read_into<R: AsyncRead + Unpin>(
    cx: &mut Context<'_>,
    r: &mut R,
    buf: &mut BytesMut,
    chunk: &mut usize,
) -> Poll<std::io::Result<usize>> {
    let want = (*chunk).max(READ_MIN);
    if buf.capacity() - buf.len() < READ_MIN / 2 {
        buf.reserve(want);
    }
    let room = buf.capacity() - buf.len();
    let read = poll_read_some(cx, r, buf);
    if matches!(read, Poll::Ready(Ok(n)) if n == room) {
        *chunk = (want * 2).min(BUF);
    }
    read
}

/// Read into whatever spare capacity `buf` has (at least [`FIRST_READ`] bytes).
pub(super) fn poll_read_some<R: AsyncRead + Unpin>(
    cx: &mut Context<'_>,
    r: &mut R,
    buf: &mut BytesMut,
) -> Poll<std::io::Result<usize>> {
    if buf.capacity() == buf.len() {
        buf.reserve(FIRST_READ);
    }
    tokio_util::io::poll_read_buf(Pin::new(r), cx, buf)
}
