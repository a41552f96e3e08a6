//! Server errors that name a pool statement: Postgres names the statement a message used by its name on the
//! server (`bind message supplies 1 parameters, but prepared statement "pgbudget_7" requires 2`); the client
//! gets the error with the name it gave the statement, as from a direct connection.

use super::rewrite::TxnStatements;
use crate::relay::frame::{self, SERVER_CAPTURE};
use crate::server::statements::PREFIX;
use bytes::BytesMut;

/// Whether the ErrorResponse with header `h` is held back to its end to be rebuilt: the client has named
/// statements, and the error is small enough to be captured whole (any larger error goes on as it is).
pub(super) fn may_rename(h: &[u8; 5], stmts: Option<&TxnStatements>) -> bool {
    stmts.is_some_and(|s| !s.client.is_empty())
        && frame::body_len(h[0], [h[1], h[2], h[3], h[4]]).is_ok_and(|n| n <= SERVER_CAPTURE)
}

/// The client's name for the statement named `server` on servers: the naming a message used it by since the
/// server was last idle (the last such; a batch that used one statement by two names may get the other),
/// else any of its names (the least).
fn client_name<'a>(s: &'a TxnStatements, server: &str) -> Option<&'a str> {
    let used = s.bound.iter().rev().find(|(stmt, _)| stmt.name == server);
    used.and_then(|(_, gen)| s.client.name_of_gen(*gen)).or_else(|| s.client.name_of(server))
}

/// Write the ErrorResponse with `body` to `out`, each quoted server name of a statement the client named
/// replaced by the client's name for it.
pub(super) fn rebuild(body: &[u8], s: &TxnStatements, out: &mut BytesMut) {
    let at = out.len();
    out.extend_from_slice(&[b'E', 0, 0, 0, 0]);
    let mut rest = body;
    // Field by field: a type byte, a NUL-terminated value; a 0 ends them. A malformed tail is kept as is.
    while let [tag, tail @ ..] = rest {
        let Some(end) = tail.iter().position(|c| *c == 0).filter(|_| *tag != 0) else { break };
        out.extend_from_slice(&[*tag]);
        rename_in(&tail[..end], s, out);
        out.extend_from_slice(&[0]);
        rest = &tail[end + 1..];
    }
    out.extend_from_slice(rest);
    let len = (out.len() - at - 1) as i32;
    out[at + 1..at + 5].copy_from_slice(&len.to_be_bytes());
}

/// Copy `value` to `out` with each `"pgbudget_<digits>"` the client knows by another name renamed.
fn rename_in(value: &[u8], s: &TxnStatements, out: &mut BytesMut) {
    let quoted = [b"\"", PREFIX.as_bytes()].concat();
    let mut v = value;
    while let Some(i) = v.windows(quoted.len()).position(|w| w == &quoted[..]) {
        let digits = v[i + quoted.len()..].iter().take_while(|c| c.is_ascii_digit()).count();
        let close = i + quoted.len() + digits;
        let name = std::str::from_utf8(&v[i + 1..close]).ok();
        match name.filter(|_| digits > 0 && v.get(close) == Some(&b'"')).and_then(|n| client_name(s, n)) {
            Some(theirs) => {
                out.extend_from_slice(&v[..=i]);
                out.extend_from_slice(theirs.as_bytes());
                v = &v[close..];
            }
            None => {
                out.extend_from_slice(&v[..i + quoted.len()]);
                v = &v[i + quoted.len()..];
            }
        }
    }
    out.extend_from_slice(v);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::statements::Registry;
    use std::sync::Arc;

    fn error(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (t, v) in fields {
            b.push(*t);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        b
    }

    fn message(s: &TxnStatements, body: &[u8]) -> String {
        let mut out = BytesMut::new();
        rebuild(body, s, &mut out);
        assert_eq!(out[0], b'E');
        assert_eq!(i32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize, out.len() - 1);
        frame::error_fields(&out[5..]).2.to_owned()
    }

    #[test]
    fn a_statement_is_named_as_its_client_named_it() {
        let mut s = TxnStatements::detached(Arc::new(Registry::default()), 200);
        let a = s.registry.intern(b"select $1::int + $2::int\0\0\0", "");
        let other = s.registry.intern(b"select 2\0\0\0", "");
        s.client.insert("__asyncpg_stmt_1__".into(), a.clone());
        let m =
            format!("prepared statement \"{}\" requires 2; \"{}\" \"{}x\" \"{PREFIX}\"", a.name, other.name, a.name);
        let body = error(&[(b'S', "ERROR"), (b'C', "08P01"), (b'M', &m), (b'R', "exec_bind_message")]);
        assert_eq!(
            message(&s, &body),
            format!(
                "prepared statement \"__asyncpg_stmt_1__\" requires 2; \"{}\" \"{}x\" \"{PREFIX}\"",
                other.name, a.name
            ),
            "only whole quoted names of the client's statements change"
        );
        let mut out = BytesMut::new();
        rebuild(&body, &s, &mut out);
        assert!(out.ends_with(b"Rexec_bind_message\0\0"), "other fields are kept");
    }

    #[test]
    fn of_two_names_the_one_used_since_idle_is_given() {
        let mut s = TxnStatements::detached(Arc::new(Registry::default()), 200);
        let a = s.registry.intern(b"select $1::int\0\0\0", "");
        let first = s.client.insert("b_name".into(), a.clone());
        let second = s.client.insert("a_name".into(), a.clone());
        let body = error(&[(b'M', &format!("statement \"{}\"", a.name))]);
        assert_eq!(message(&s, &body), "statement \"a_name\"", "none used: the least name");
        s.bound.push((a.clone(), first));
        assert_eq!(message(&s, &body), "statement \"b_name\"");
        s.bound.push((a.clone(), second));
        assert_eq!(message(&s, &body), "statement \"a_name\"");
    }

    #[test]
    fn a_malformed_error_passes_unchanged() {
        let s = TxnStatements::detached(Arc::new(Registry::default()), 200);
        for body in [&b""[..], b"Mno terminator", b"\0", b"Mok\0\0trailing"] {
            let mut out = BytesMut::new();
            rebuild(body, &s, &mut out);
            assert_eq!(&out[5..], body);
        }
    }
}
