//! The client's side of a checkout, done by the relay: watching a queued client (a disconnect ends its wait,
//! what it sends meanwhile is kept, bounded), telling it where it stands, and answering a batch that could not
//! get a server with the error and a ReadyForQuery.

use crate::budget::checkout::Watch;
use crate::error::ProxyError;
use crate::protocol::sqlstate::SUCCESSFUL_COMPLETION;
use crate::protocol::{self, ProtocolError, Severity};
use bytes::{Buf, BytesMut};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How long a client may take to finish a message batch we are rejecting.
const REJECT_READ_TIMEOUT: Duration = Duration::from_secs(15);
/// Client bytes buffered while queued beyond this are left in the socket until a server is found.
const MAX_BUFFERED_WHILE_QUEUED: usize = super::pump::BUF;

/// A queued client: its socket and the relay's input buffer.
pub struct ClientWatch<'a, C> {
    pub sock: &'a mut C,
    pub cin: &'a mut BytesMut,
}

impl<C: AsyncRead + AsyncWrite + Unpin> Watch for ClientWatch<'_, C> {
    async fn gone(&mut self) {
        loop {
            if self.cin.len() >= MAX_BUFFERED_WHILE_QUEUED {
                // Past the bound, the client's bytes wait in its socket; it is watched no more.
                return std::future::pending().await;
            }
            match self.sock.read_buf(self.cin).await {
                Ok(n) if n > 0 => continue,
                _ => return,
            }
        }
    }

    async fn notice(&mut self, text: &str) -> Result<(), ProxyError> {
        notice(self.sock, text).await
    }
}

/// Tell a queued client something (a NOTICE).
pub async fn notice<C: AsyncWrite + Unpin>(sock: &mut C, text: &str) -> Result<(), ProxyError> {
    let mut out = BytesMut::new();
    protocol::error_response(&mut out, Severity::Notice, SUCCESSFUL_COMPLETION, text, None);
    sock.write_all(&out).await.map_err(ProxyError::ClientIo)
}

/// Answer a batch we cannot run (no server): ErrorResponse, then skip to its Query or Sync and say ReadyForQuery.
/// Returns true if the client terminated meanwhile.
pub async fn reject_batch<C: AsyncRead + AsyncWrite + Unpin>(
    sock: &mut C,
    cbuf: &mut BytesMut,
    e: &ProxyError,
) -> Result<bool, ProxyError> {
    let (_, code, msg) = e.to_client();
    let mut out = BytesMut::new();
    protocol::error_response(&mut out, Severity::Error, code, &msg, None);
    sock.write_all(&out).await.map_err(ProxyError::ClientIo)?;
    // Bodies are skipped as they arrive, never buffered whole.
    let mut skip = 0usize;
    let mut ends_batch = None;
    loop {
        loop {
            if skip > 0 {
                let n = skip.min(cbuf.len());
                cbuf.advance(n);
                skip -= n;
                if skip > 0 {
                    break;
                }
            }
            if let Some(kind) = ends_batch.take() {
                if kind == b'X' {
                    return Ok(true);
                }
                out.clear();
                protocol::ready_for_query(&mut out, b'I');
                sock.write_all(&out).await.map_err(ProxyError::ClientIo)?;
                return Ok(false);
            }
            if cbuf.len() < 5 {
                break;
            }
            let kind = cbuf[0];
            let len = i32::from_be_bytes([cbuf[1], cbuf[2], cbuf[3], cbuf[4]]);
            if len < 4 || crate::relay::frame::client_limit(kind).is_none() {
                return Err(ProtocolError::Length { kind: kind as char, len: len.max(0) as usize }.into());
            }
            cbuf.advance(5);
            skip = len as usize - 4;
            if matches!(kind, b'Q' | b'S' | b'X') {
                ends_batch = Some(kind);
            }
        }
        match tokio::time::timeout(REJECT_READ_TIMEOUT, sock.read_buf(cbuf)).await {
            Ok(Ok(0)) | Err(_) => return Ok(true),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(ProxyError::ClientIo(e)),
        }
    }
}
