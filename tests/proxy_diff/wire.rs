//! Connections of the logical clients and the transcript of one round's replies.

use super::*;

/// Deadline of every backend message: a reply that does not come is a failure, not a hang. Longer than the
/// proxy's `checkout_timeout` (1 s), so a client left waiting for a server shows the proxy's 53300.
pub(crate) const DEADLINE: Duration = Duration::from_secs(3);

/// One logical client's connection (direct or through the proxy), `None` once it was closed.
pub(crate) struct Client {
    pub(crate) conn: Option<Raw>,
    /// The status of the last ReadyForQuery.
    pub(crate) status: u8,
    /// Whether the client holds an SQL-level prepared statement (the proxy pins its server for it).
    pub(crate) pinned: bool,
    /// Its protocol-level statements, as the direct replies tell (see `model::update`).
    pub(crate) stmts: model::Stmts,
}

impl Client {
    pub(crate) async fn login(port: u16) -> Client {
        let raw = Raw::login(port, &raw::params("postgres"), PG_PASSWORD)
            .await
            .unwrap_or_else(|e| panic!("login on port {port}: {e:?}"));
        Client { conn: Some(raw), status: b'I', pinned: false, stmts: model::Stmts::default() }
    }

    /// Whether this client holds a server of the proxy between its rounds.
    pub(crate) fn holds(&self) -> bool {
        self.conn.is_some() && (self.status != b'I' || self.pinned)
    }

    /// Write one round and read its replies up to the ReadyForQuery: the transcript (see [`show_msg`]).
    pub(crate) async fn round(&mut self, bytes: &[u8], stats: &mut Stats) -> Vec<String> {
        let Some(c) = self.conn.as_mut() else {
            return vec!["(connection closed earlier)".into()];
        };
        let mut t = Vec::new();
        if let Err(e) = c.s.write_all(bytes).await {
            self.conn = None;
            return vec![format!("write failed: {}", e.kind())];
        }
        loop {
            match raw::read_msg(&mut c.s, DEADLINE).await {
                Ok(Some((kind, body))) => {
                    *stats.server_msgs.entry(kind as char).or_default() += 1;
                    if kind == b'Z' {
                        self.status = body[0];
                    }
                    if let Some(line) = show_msg(kind, &body) {
                        t.push(line);
                    }
                    if kind == b'Z' {
                        return t;
                    }
                }
                Ok(None) => {
                    t.push("closed".into());
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    t.push(format!("timeout: no reply within {DEADLINE:?}"));
                    break;
                }
                Err(e) => {
                    t.push(format!("read failed: {}", e.kind()));
                    break;
                }
            }
        }
        self.conn = None;
        t
    }
}

fn i16_at(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}

fn i32_at(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// The compared form of one backend message, `None` for what is left out of the comparison:
/// ParameterStatus (the proxy replays settings, a direct server reports them at other moments),
/// NoticeResponse (the proxy's queue notices), NotificationResponse and BackendKeyData (pids).
pub(crate) fn show_msg(kind: u8, body: &[u8]) -> Option<String> {
    Some(match kind {
        b'S' | b'N' | b'A' | b'K' => return None,
        b'1' => "ParseComplete".into(),
        b'2' => "BindComplete".into(),
        b'3' => "CloseComplete".into(),
        b'n' => "NoData".into(),
        b's' => "PortalSuspended".into(),
        b'I' => "EmptyQueryResponse".into(),
        b'C' => format!("CommandComplete {}", fidelity::cstr(body)),
        b'D' => format!("DataRow {}", fidelity::row(body)),
        b'Z' => format!("ReadyForQuery {}", body[0] as char),
        b't' => {
            let n = i16_at(body, 0) as usize;
            let oids: Vec<String> = (0..n).map(|i| i32_at(body, 2 + 4 * i).to_string()).collect();
            format!("ParameterDescription [{}]", oids.join(","))
        }
        b'T' => {
            let n = i16_at(body, 0) as usize;
            let mut at = 2;
            let mut cols = Vec::new();
            for _ in 0..n {
                let name = fidelity::cstr(&body[at..]);
                at += name.len() + 1;
                // table oid (4), attnum (2), type oid (4), type size (2), typmod (4), format (2)
                let ty = i32_at(body, at + 6);
                let format = i16_at(body, at + 16);
                at += 18;
                cols.push(format!("{name}:{ty}:{format}"));
            }
            format!("RowDescription [{}]", cols.join(","))
        }
        b'E' => {
            let e = raw::error_fields(body);
            let severity = if e.severity == "ERROR" { String::new() } else { format!("{} ", e.severity) };
            format!("ErrorResponse {severity}{} {}", e.code, e.message)
        }
        other => format!("message {:?}", other as char),
    })
}
