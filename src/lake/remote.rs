//! The lake CLI asking a running pgbudget: while a proxy holds the embedded catalog file (DuckDB admits one
//! process), `pgbudget lake timeline|query` POST to its admin listener (`/lake/timeline`, `/lake/query`) with
//! the admin token and print the same output. One blocking HTTP/1.1 exchange, bounded by a deadline.

use super::reader::QueryResult;
use super::timeline::{Timeline, TimelineOptions};
use super::LakeError;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Most bytes of one answer (a timeline or query of `lake.max_rows` rows fits well within).
const MAX_ANSWER: u64 = 256 * 1024 * 1024;

/// Where and how to ask.
pub struct Remote {
    pub addr: SocketAddr,
    pub token: String,
    /// The whole exchange (the proxy stops a query at `lake.query_timeout`; give it more).
    pub timeout: Duration,
}

impl Remote {
    pub fn timeline(&self, o: &TimelineOptions) -> Result<Timeline, LakeError> {
        let body = serde_json::to_string(o).map_err(|e| LakeError::Remote(e.to_string()))?;
        parse(&self.post("/lake/timeline", &body)?)
    }

    /// One query, bare table names resolving in the lake.
    pub fn query(&self, sql: &str, limit: usize) -> Result<QueryResult, LakeError> {
        let body = serde_json::json!({ "sql": sql, "limit": limit, "in_lake": true }).to_string();
        let v: serde_json::Value = parse(&self.post("/lake/query", &body)?)?;
        let columns = serde_json::from_value(v["columns"].clone()).map_err(|e| LakeError::Remote(e.to_string()))?;
        let rows = serde_json::from_value(v["rows"].clone()).map_err(|e| LakeError::Remote(e.to_string()))?;
        Ok(QueryResult { columns, rows, truncated: v["truncated"].as_bool().unwrap_or(false) })
    }

    /// POST `body` (JSON) to `path`; the body of a 200 answer, else the answer's `error`.
    pub fn post(&self, path: &str, body: &str) -> Result<String, LakeError> {
        let fail = |what: &str, e: std::io::Error| LakeError::Remote(format!("{what} {}: {e}", self.addr));
        let mut s = TcpStream::connect_timeout(&self.addr, self.timeout).map_err(|e| fail("cannot reach", e))?;
        s.set_read_timeout(Some(self.timeout)).map_err(|e| fail("socket", e))?;
        s.set_write_timeout(Some(self.timeout)).map_err(|e| fail("socket", e))?;
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n\
             Authorization: Bearer {}\r\nContent-Length: {}\r\n\r\n{body}",
            self.token,
            body.len()
        );
        s.write_all(request.as_bytes()).map_err(|e| fail("cannot write to", e))?;
        let mut raw = Vec::new();
        s.take(MAX_ANSWER).read_to_end(&mut raw).map_err(|e| fail("no answer from", e))?;
        let (status, body) = split_answer(&raw)
            .ok_or_else(|| LakeError::Remote(format!("not an HTTP answer from {} ({} bytes)", self.addr, raw.len())))?;
        if status == 200 {
            return Ok(body);
        }
        let why = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or(body);
        Err(LakeError::Remote(format!("{path} answered HTTP {status}: {why}")))
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, LakeError> {
    serde_json::from_str(body).map_err(|e| LakeError::Remote(format!("unexpected answer: {e}")))
}

/// Status and body of an HTTP/1.1 answer (a chunked body is put back together).
fn split_answer(raw: &[u8]) -> Option<(u16, String)> {
    let at = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..at]).ok()?;
    let status = head.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
    let mut body = &raw[at + 4..];
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Some((status, String::from_utf8_lossy(body).into_owned()));
    }
    let mut out = Vec::new();
    loop {
        let eol = body.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&body[..eol]).ok()?.split(';').next()?.trim(), 16).ok()?;
        body = &body[eol + 2..];
        if size == 0 {
            return Some((status, String::from_utf8_lossy(&out).into_owned()));
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_plain_and_chunked() {
        assert_eq!(split_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"), Some((200, "{}".into())));
        let chunked = b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n";
        assert_eq!(split_answer(chunked), Some((400, "{\"a\":1}".into())));
        assert_eq!(split_answer(b"junk"), None);
        assert_eq!(split_answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"), None);
    }

    #[test]
    fn errors_name_the_answer() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let n = c.read(&mut buf).unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).into_owned();
            c.write_all(b"HTTP/1.1 401 Unauthorized\r\n\r\n{\"error\":\"missing or wrong bearer token\"}").unwrap();
            req
        });
        let r = Remote { addr, token: "tok".into(), timeout: Duration::from_secs(5) };
        let e = r.post("/lake/timeline", "{}").unwrap_err().to_string();
        assert!(e.contains("HTTP 401") && e.contains("wrong bearer token"), "{e}");
        let req = server.join().unwrap();
        assert!(req.starts_with("POST /lake/timeline HTTP/1.1\r\n") && req.contains("Authorization: Bearer tok\r\n"));
        assert!(req.ends_with("Content-Length: 2\r\n\r\n{}"), "{req}");
    }
}
