//! Before the read-only policy reads a statement, spell it the way the server reads it: `U&"..."` identifiers
//! and `U&'...'` strings (with `UESCAPE`) decoded into plain ones, and — when the session runs with
//! `standard_conforming_strings = off`, where a backslash escapes in every string — plain strings turned
//! into `E'...'`, so the lexer ends each string where the server does. Comments, dollar quotes and quoted
//! identifiers are copied as they are. Text that does not scan (an unterminated quote) is returned unchanged:
//! the policy then fails closed on it.

use std::borrow::Cow;

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// `sql` as the server reads it (see the module doc); borrowed when nothing needed changing.
pub fn normalize(sql: &str, backslash_quotes: bool) -> Cow<'_, str> {
    let b = sql.as_bytes();
    let needs_unicode = b.windows(2).any(|w| w[0].eq_ignore_ascii_case(&b'u') && w[1] == b'&');
    if !(needs_unicode || (backslash_quotes && b.contains(&b'\\'))) {
        return Cow::Borrowed(sql);
    }
    scan(sql, backslash_quotes).map_or(Cow::Borrowed(sql), Cow::Owned)
}

/// The end (exclusive) of a quoted run starting after its opening `q` at `i`, with `qq` doubling and, when
/// `escapes`, backslash escapes; None if it never ends.
fn quoted_end(b: &[u8], mut i: usize, q: u8, escapes: bool) -> Option<usize> {
    while i < b.len() {
        match b[i] {
            b'\\' if escapes => i += 2,
            c if c == q && b.get(i + 1) == Some(&q) => i += 2,
            c if c == q => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

fn scan(sql: &str, backslash_quotes: bool) -> Option<String> {
    let b = sql.as_bytes();
    let mut out = String::with_capacity(sql.len() + 8);
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let prev_word = i > 0 && is_word(b[i - 1]);
        match c {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                let end = b[i..].iter().position(|&x| x == b'\n').map_or(b.len(), |p| i + p);
                out.push_str(&sql[i..end]);
                i = end;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let (mut depth, mut j) = (0usize, i);
                loop {
                    match (b.get(j), b.get(j + 1)) {
                        (Some(b'/'), Some(b'*')) => (depth, j) = (depth + 1, j + 2),
                        (Some(b'*'), Some(b'/')) => {
                            (depth, j) = (depth - 1, j + 2);
                            if depth == 0 {
                                break;
                            }
                        }
                        (Some(_), _) => j += 1,
                        (None, _) => return None,
                    }
                }
                out.push_str(&sql[i..j]);
                i = j;
            }
            b'$' if !prev_word => {
                let tag_end = b[i + 1..].iter().position(|&x| !(x.is_ascii_alphanumeric() || x == b'_'));
                match tag_end.map(|p| i + 1 + p) {
                    Some(t) if b[t] == b'$' => {
                        let tag = &sql[i..=t];
                        let close = sql[t + 1..].find(tag)? + t + 1 + tag.len();
                        out.push_str(&sql[i..close]);
                        i = close;
                    }
                    _ => {
                        out.push('$');
                        i += 1;
                    }
                }
            }
            b'u' | b'U' if !prev_word && b.get(i + 1) == Some(&b'&') && matches!(b.get(i + 2), Some(b'\'' | b'"')) => {
                let q = b[i + 2];
                let end = quoted_end(b, i + 3, q, false)?;
                let body = sql[i + 3..end - 1].replace(if q == b'"' { "\"\"" } else { "''" }, &(q as char).to_string());
                let (esc, next) = uescape(sql, end)?;
                let text = decode(&body, esc)?;
                if q == b'"' {
                    out.push('"');
                    out.push_str(&text.replace('"', "\"\""));
                    out.push('"');
                } else {
                    out.push_str("E'");
                    out.push_str(&text.replace('\\', "\\\\").replace('\'', "\\'"));
                    out.push('\'');
                }
                i = next;
            }
            b'"' => {
                let end = quoted_end(b, i + 1, b'"', false)?;
                out.push_str(&sql[i..end]);
                i = end;
            }
            b'\'' => {
                let e_prefix = prev_word && b[i - 1].eq_ignore_ascii_case(&b'e') && (i < 2 || !is_word(b[i - 2]));
                let escapes = e_prefix || backslash_quotes;
                let end = quoted_end(b, i + 1, b'\'', escapes)?;
                if backslash_quotes && !e_prefix && !prev_word {
                    out.push('E');
                }
                out.push_str(&sql[i..end]);
                i = end;
            }
            _ => {
                let ch = sql[i..].chars().next()?;
                out.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    Some(out)
}

/// An optional `UESCAPE 'c'` after a U& literal ending at `at`: (escape character, where scanning goes on).
fn uescape(sql: &str, at: usize) -> Option<(char, usize)> {
    let rest = &sql[at..];
    let trimmed = rest.trim_start();
    let skipped = rest.len() - trimmed.len();
    // Compared as bytes: the text after the literal may start with a multi-byte character.
    if trimmed.as_bytes().get(..7).is_some_and(|w| w.eq_ignore_ascii_case(b"uescape")) {
        let after = trimmed[7..].trim_start();
        let pos = at + skipped + 7 + (trimmed.len() - 7 - after.len());
        let mut chars = after.chars();
        if chars.next()? != '\'' {
            return None;
        }
        let esc = chars.next()?;
        if chars.next()? != '\'' || esc.is_ascii_hexdigit() || matches!(esc, '+' | '\'' | '"') || esc.is_whitespace() {
            return None;
        }
        return Some((esc, pos + 2 + esc.len_utf8()));
    }
    Some(('\\', at))
}

/// Decode `esc`XXXX, `esc`+XXXXXX and `esc esc`; None on a malformed escape (Postgres refuses those too).
fn decode(body: &str, esc: char) -> Option<String> {
    let mut out = String::with_capacity(body.len());
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        if c != esc {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&esc) {
            chars.next();
            out.push(esc);
            continue;
        }
        let n = if chars.peek() == Some(&'+') {
            chars.next();
            6
        } else {
            4
        };
        let hex: String = (0..n).filter_map(|_| chars.next()).collect();
        if hex.len() != n {
            return None;
        }
        out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing: the look for `UESCAPE` after a U& literal sliced the text at byte 7, inside a
    /// multi-byte character there.
    #[test]
    fn text_after_a_unicode_literal_may_start_with_any_character() {
        assert_eq!(normalize("select U&'a' abcdef\u{2319}x", false), "select E'a' abcdef\u{2319}x");
        assert_eq!(
            normalize("select U&\"a\" \u{2319}\u{2319}\u{2319}", false),
            "select \"a\" \u{2319}\u{2319}\u{2319}"
        );
    }

    #[test]
    fn unicode_identifiers_and_strings_are_spelled_out() {
        assert_eq!(normalize(r#"SET U&"d\0065fault_x" = off"#, false), r#"SET "default_x" = off"#);
        assert_eq!(normalize(r#"set u&"d!0065f" UESCAPE '!' = 1"#, false), r#"set "def" = 1"#);
        assert_eq!(normalize(r"select U&'a\005fb'", false), r"select E'a_b'");
        assert_eq!(normalize(r"select U&'\+01F600'", false), "select E'\u{1F600}'");
        assert_eq!(normalize(r"select u&'it''s'", false), r"select E'it\'s'");
        // Not a U& literal: a word ending in u, and text inside other quotes and comments.
        assert_eq!(normalize("select menu&'x'", false), "select menu&'x'");
        assert_eq!(normalize("select $$ U&'x' $$ -- u&'y'", false), "select $$ U&'x' $$ -- u&'y'");
        assert!(matches!(normalize("select 1", false), Cow::Borrowed(_)));
    }

    #[test]
    fn strings_read_with_backslash_escapes_when_standard_conforming_strings_is_off() {
        let sql = r"SELECT 'a\''; RESET ALL; --'";
        assert_eq!(normalize(sql, true), r"SELECT E'a\''; RESET ALL; --'");
        assert_eq!(normalize(sql, false), sql);
        assert_eq!(normalize(r"select e'x\n', 'y\\'", true), r"select e'x\n', E'y\\'");
    }

    #[test]
    fn malformed_text_is_left_for_the_policy() {
        for sql in [r"select U&'\00'", r"select U&'x' UESCAPE 'a'", "select 'open", r"select U&'\zzzz'"] {
            assert_eq!(normalize(sql, false), sql, "{sql}");
        }
    }
}
