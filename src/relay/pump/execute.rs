//! SQL `EXECUTE name` of a statement the client prepared at the protocol level (transaction mode): on a
//! direct connection both live in one namespace, so the simple Query is sent with the server's name of the
//! statement when the attached server has it (normally: the client's home, where its Parse went). On a
//! server that lacks it the Query goes as written and fails as Postgres fails it (26000): preparing it
//! there first would need a Sync inside the client's Query, which the model does not do.

use super::rewrite::split_cstr;
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
    let (end, name) = if text[at] == b'"' {
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
    match text.get(end) {
        None | Some(b'(' | b';') => {}
        Some(c) if c.is_ascii_whitespace() => {}
        Some(_) => return None,
    }
    (!name.is_empty()).then_some((at..end, name))
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

/// `text` with `range` replaced by `name`.
fn splice(out: &mut BytesMut, text: &[u8], range: Range<usize>, name: &str) {
    out.put_slice(&text[..range.start]);
    out.put_slice(name.as_bytes());
    out.put_slice(&text[range.end..]);
}

#[cfg(test)]
mod tests {
    use super::execute_target;

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
