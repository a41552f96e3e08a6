//! `pgbudget probe`: one HTTP GET against the admin listener, for container health checks and for entrypoints
//! that wait for `/ready` before starting the app (the runtime image has no curl).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Why a probe did not get a 200.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot resolve the admin address {0:?}")]
    Address(String),
    #[error("cannot reach the admin listener at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no HTTP answer from {addr}: {detail}")]
    Answer { addr: SocketAddr, detail: String },
    #[error("{path} answered HTTP {status}: {body}")]
    Status { path: String, status: u16, body: String },
}

/// Where to connect for a listener bound to `listen`: an unspecified address (`0.0.0.0`, `[::]`) is probed on
/// the loopback address of its family.
pub fn target(listen: &str) -> Result<SocketAddr, ProbeError> {
    let mut addr = listen
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ProbeError::Address(listen.to_owned()))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Ok(addr)
}

/// GET `path` once; `Ok(body)` on HTTP 200. The whole exchange is bounded by `timeout`.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, ProbeError> {
    let connect = |source| ProbeError::Connect { addr, source };
    let answer = |detail: String| ProbeError::Answer { addr, detail };
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(connect)?;
    s.set_read_timeout(Some(timeout)).map_err(connect)?;
    s.set_write_timeout(Some(timeout)).map_err(connect)?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).map_err(|e| answer(e.to_string()))?;
    // The endpoints answer a few hundred bytes; read at most 64 KiB.
    let mut raw = Vec::new();
    s.take(64 * 1024).read_to_end(&mut raw).map_err(|e| answer(e.to_string()))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| answer(format!("not an HTTP response ({} bytes)", raw.len())))?;
    let body = body.trim().to_owned();
    if status == 200 {
        Ok(body)
    } else {
        Err(ProbeError::Status { path: path.to_owned(), status, body })
    }
}

/// GET `path` until it answers 200 or `wait` has passed (one try when `wait` is zero); the last error otherwise.
pub fn wait_for(addr: SocketAddr, path: &str, wait: Duration) -> Result<String, ProbeError> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match get(addr, path, left.clamp(Duration::from_millis(500), Duration::from_secs(5))) {
            Ok(body) => return Ok(body),
            Err(e) if Instant::now() + Duration::from_millis(200) >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_addresses_are_probed_on_loopback() {
        assert_eq!(target("0.0.0.0:9187").unwrap(), "127.0.0.1:9187".parse().unwrap());
        assert_eq!(target("[::]:80").unwrap(), "[::1]:80".parse().unwrap());
        assert_eq!(target("127.0.0.1:1").unwrap(), "127.0.0.1:1".parse().unwrap());
        assert!(matches!(target("nonsense"), Err(ProbeError::Address(_))));
    }

    #[test]
    fn status_and_body_are_read() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            for answer in ["HTTP/1.1 200 OK\r\n\r\n{\"status\":\"ready\"}", "HTTP/1.1 503 X\r\n\r\nnot ready", "junk"] {
                let (mut c, _) = l.accept().unwrap();
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf).unwrap();
                c.write_all(answer.as_bytes()).unwrap();
            }
        });
        let t = Duration::from_secs(5);
        assert_eq!(get(addr, "/ready", t).unwrap(), "{\"status\":\"ready\"}");
        match get(addr, "/ready", t) {
            Err(ProbeError::Status { status: 503, body, .. }) => assert_eq!(body, "not ready"),
            other => panic!("expected 503, got {other:?}"),
        }
        assert!(matches!(get(addr, "/ready", t), Err(ProbeError::Answer { .. })));
        server.join().unwrap();
        // Nobody listens any more: a connect error, after waiting no longer than asked.
        let started = Instant::now();
        assert!(matches!(wait_for(addr, "/ready", Duration::from_millis(600)), Err(ProbeError::Connect { .. })));
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
