//! SQL `EXECUTE name` and `DEALLOCATE name` of a statement the client prepared at the protocol level
//! (transaction mode): on a direct connection both kinds live in one namespace.
//!
//! `EXECUTE`: the simple Query is sent with the server's name of the statement when the attached server has
//! it (normally: the client's home, where its Parse went). On a server that lacks it the Query goes as
//! written and fails as Postgres fails it (26000): preparing it there first would need a Sync inside the
//! client's Query, which the model does not do.
//!
//! `DEALLOCATE` (the whole Query; psycopg 3 sends it by extended protocol, `rewrite/parse.rs`): the client's name
//! goes, as with a protocol Close (the pool keeps the statement for its other users), and the server runs an
//! empty query in its place, whose EmptyQueryResponse becomes the `DEALLOCATE`'s CommandComplete — in order,
//! with the transaction status the server reports. In a failed transaction it goes as written: Postgres
//! refuses it there (25P02) without looking at the name.

use super::rewrite::{split_cstr, Action};
use super::Pump;
use crate::protocol;
use bytes::{BufMut, BytesMut};
use std::ops::Range;

/// The statement name of a Query that starts with `EXECUTE name`: where it is in `text`, and the name as the
/// server resolves it (unquoted: folded to lower case; quoted: as written, `""` an escaped quote).
pub(super) fn execute_target(text: &[u8]) -> Option<(Range<usize>, String)> {
    let start = text.iter().position(|c| !c.is_ascii_whitespace())?;
    let rest = &text[start..];
    if rest.len() < 8 || !rest[..7].eq_ignore_ascii_case(b"execute") || !rest[7].is_ascii_whitespace() {
        return None;
    }
    let at = start + 7 + rest[7..].iter().position(|c| !c.is_ascii_whitespace())?;
    let (end, name) = name_at(text, at)?;
    match text.get(end) {
        None | Some(b'(' | b';') => {}
        Some(c) if c.is_ascii_whitespace() => {}
        Some(_) => return None,
    }
    Some((at..end, name))
}

/// The statement name of a Query that is exactly `DEALLOCATE [PREPARE] name` (and an optional `;`), as the
/// server resolves it; not `ALL`.
pub(super) fn deallocate_target(text: &[u8]) -> Option<String> {
    let word = |t: &[u8], at: usize, w: &[u8]| {
        t.get(at..at + w.len()).is_some_and(|s| s.eq_ignore_ascii_case(w))
            && t.get(at + w.len()).is_some_and(u8::is_ascii_whitespace)
    };
    let skip_ws = |t: &[u8], at: usize| at + t[at..].iter().take_while(|c| c.is_ascii_whitespace()).count();
    let mut at = skip_ws(text, 0);
    if !word(text, at, b"deallocate") {
        return None;
    }
    at = skip_ws(text, at + 10);
    if word(text, at, b"prepare") {
        at = skip_ws(text, at + 7);
    }
    let quoted = text.get(at) == Some(&b'"');
    let (end, name) = name_at(text, at)?;
    let mut rest = skip_ws(text, end);
    if text.get(rest) == Some(&b';') {
        rest = skip_ws(text, rest + 1);
    }
    (rest == text.len() && (quoted || name != "all")).then_some(name)
}

/// The identifier at `text[at..]` (unquoted: folded to lower case; quoted: as written, `""` an escaped
/// quote) and where it ends.
fn name_at(text: &[u8], at: usize) -> Option<(usize, String)> {
    let (end, name) = if *text.get(at)? == b'"' {
        let mut name = Vec::new();
        let mut i = at + 1;
        loop {
            match (text.get(i)?, text.get(i + 1)) {
                (b'"', Some(b'"')) => {
                    name.push(b'"');
                    i += 2;
                }
                (b'"', _) => break (i + 1, String::from_utf8(name).ok()?),
                (&c, _) => {
                    name.push(c);
                    i += 1;
                }
            }
        }
    } else {
        let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80;
        if !(text[at].is_ascii_alphabetic() || text[at] == b'_' || text[at] >= 0x80) {
            return None;
        }
        let end = at + text[at..].iter().position(|&c| !ident(c)).unwrap_or(text.len() - at);
        (end, std::str::from_utf8(&text[at..end]).ok()?.to_ascii_lowercase())
    };
    (!name.is_empty()).then_some((end, name))
}

impl Pump {
    /// The name of the statement a Query or Parse text executes, as the server knows it, when the client
    /// prepared it at the protocol level and the attached server has it.
    fn executed_here(&mut self, text: &[u8]) -> Option<(Range<usize>, String)> {
        let (range, name) = execute_target(text)?;
        let s = self.stmts.as_mut()?;
        let stmt = s.client.get(&name)?.clone();
        if !s.server.touch(stmt.id) {
            return None;
        }
        s.hits.inc();
        Some((range, stmt.name.clone()))
    }

    /// A client Query (`body`: its text and NUL) that executes a protocol-level statement, with the
    /// server's name for it.
    pub(super) fn rewrite_execute(&mut self, body: &[u8]) -> Option<BytesMut> {
        let (text, _) = split_cstr(body)?;
        let (range, name) = self.executed_here(text)?;
        let mut out = BytesMut::with_capacity(body.len() + name.len() + 8);
        let at = protocol::begin(&mut out, b'Q');
        splice(&mut out, text, range, &name);
        out.put_u8(0);
        protocol::finish(&mut out, at);
        Some(out)
    }

    /// The same for a Parse (`body`: statement name, text, parameter types), as drivers that send every
    /// statement extended (asyncpg's `fetchval("EXECUTE s")`) do.
    pub(super) fn rewrite_execute_parse(&mut self, body: &[u8]) -> Option<BytesMut> {
        let (statement, tail) = split_cstr(body)?;
        let (text, types) = split_cstr(tail)?;
        let (range, name) = self.executed_here(text)?;
        let mut out = BytesMut::with_capacity(body.len() + name.len() + 8);
        let at = protocol::begin(&mut out, b'P');
        out.put_slice(statement);
        out.put_u8(0);
        splice(&mut out, text, range, &name);
        out.put_u8(0);
        out.put_slice(types);
        protocol::finish(&mut out, at);
        Some(out)
    }
}

impl Pump {
    /// A Query that is SQL `DEALLOCATE` of one of the client's protocol-level statements: answered as the
    /// module doc says. `false`: not such a Query (it goes on as any other).
    pub(super) fn deallocate_sql(&mut self, body: &[u8]) -> bool {
        let Some(name) = split_cstr(body).and_then(|(text, _)| deallocate_target(text)) else { return false };
        if self.tx.status() == b'E' {
            return false;
        }
        let Some(s) = self.stmts.as_mut() else { return false };
        let Some((stmt, gen)) = s.client.remove(&name) else { return false };
        // Held by no other client and prepared here: deallocated here (its own CommandComplete answers).
        let closes = s.server.closing_last(&stmt);
        let mut out = BytesMut::with_capacity(32);
        let reply = if closes.is_some() {
            protocol::simple_query(&mut out, &format!("DEALLOCATE {}", stmt.name));
            None
        } else {
            protocol::simple_query(&mut out, ";");
            let mut reply = BytesMut::with_capacity(16);
            protocol::command_complete(&mut reply, "DEALLOCATE");
            Some(reply.freeze())
        };
        let tag = self.actions.push(Action::Close { name, stmt, gen, void: false, reply, closes });
        self.send(&out, tag);
        true
    }
}

/// `text` with `range` replaced by `name`.
fn splice(out: &mut BytesMut, text: &[u8], range: Range<usize>, name: &str) {
    out.put_slice(&text[..range.start]);
    out.put_slice(name.as_bytes());
    out.put_slice(&text[range.end..]);
}

#[cfg(test)]
mod tests {
    use super::{deallocate_target, execute_target};

    #[test]
    fn a_deallocate_of_one_name_is_found_as_the_server_folds_it() {
        let t = |q: &str, name: &str| assert_eq!(deallocate_target(q.as_bytes()).as_deref(), Some(name), "{q}");
        t("DEALLOCATE _pg3_5", "_pg3_5");
        t("  deallocate prepare FooBar ;  ", "foobar");
        t("DEALLOCATE \"All\"", "All");
        t("DEALLOCATE \"all\"", "all");
        t("deallocate\n\"a\"\"b\";", "a\"b");
        for q in ["DEALLOCATE ALL", "deallocate prepare all;", "DEALLOCATE", "DEALLOCATE a; select 1", "DEALLOCATE a b"]
        {
            assert_eq!(deallocate_target(q.as_bytes()), None, "{q}");
        }
    }

    fn target(q: &str) -> Option<(String, String)> {
        execute_target(q.as_bytes()).map(|(r, n)| (q[r].to_owned(), n))
    }

    #[test]
    fn the_executed_name_is_found_as_the_server_folds_it() {
        let t = |q, raw: &str, name: &str| assert_eq!(target(q), Some((raw.into(), name.into())), "{q}");
        t("EXECUTE foobar", "foobar", "foobar");
        t("  execute FooBar(1, 'x');", "FooBar", "foobar");
        t("Execute\n\"Mixed\"\"Case\" (2)", "\"Mixed\"\"Case\"", "Mixed\"Case");
        t("execute s_1$x;select 1", "s_1$x", "s_1$x");
        for q in ["EXECUTE", "EXECUTE ", "executed foo", "select 1", "EXECUTE 'foo'", "EXECUTE \"open", "EXECUTE a.b"] {
            assert_eq!(target(q), None, "{q}");
        }
    }
}
