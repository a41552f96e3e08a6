//! Redaction of error texts before they reach `/errors`, the journal, the lake or the logs: every quoted span
//! (`"..."`, `'...'`) and every value list (`Key (email)=(...)`, `Failing row contains (...)`) becomes `…`,
//! so the message keeps its shape (and the SQLSTATE, service and route travel beside it) but no literal.

use std::borrow::Cow;

/// What a redacted span reads as.
pub const MASK: char = '…';

/// `msg` with every quoted span and value list replaced by [`MASK`]. Borrows when there is nothing to hide;
/// never panics (quotes and parentheses are ASCII, so every cut falls on a character boundary). An opening
/// quote or parenthesis that is never closed hides everything after it.
pub fn redact(msg: &str) -> Cow<'_, str> {
    let b = msg.as_bytes();
    if !b.iter().any(|&c| matches!(c, b'"' | b'\'' | b'(')) {
        return Cow::Borrowed(msg);
    }
    let mut out = String::with_capacity(msg.len());
    let (mut i, mut copied) = (0, 0);
    while i < b.len() {
        let close = match b[i] {
            q @ (b'"' | b'\'') => Some((q, close_quote(b, i + 1, q))),
            b'(' if is_value_list(msg, i) => Some((b')', close_paren(b, i + 1))),
            _ => None,
        };
        let Some((closer, end)) = close else {
            i += 1;
            continue;
        };
        out.push_str(&msg[copied..=i]);
        out.push(MASK);
        match end {
            Some(j) => {
                out.push(char::from(closer));
                i = j + 1;
            }
            None => i = b.len(),
        }
        copied = i;
    }
    out.push_str(&msg[copied..]);
    Cow::Owned(out)
}

/// `Key (a, b)=(` and `=(` in general, and `Failing row contains (`: a parenthesis that opens values.
fn is_value_list(msg: &str, i: usize) -> bool {
    let before = &msg[..i];
    before.ends_with('=') || before.ends_with("contains ")
}

/// Index of the quote closing a span opened just before `from` (a doubled quote is an escaped one).
fn close_quote(b: &[u8], from: usize, q: u8) -> Option<usize> {
    let mut j = from;
    while j < b.len() {
        if b[j] == q {
            if b.get(j + 1) == Some(&q) {
                j += 2;
                continue;
            }
            return Some(j);
        }
        j += 1;
    }
    None
}

/// Index of the parenthesis closing one opened just before `from` (nested ones and quoted spans skipped).
fn close_paren(b: &[u8], from: usize) -> Option<usize> {
    let (mut depth, mut j) = (1usize, from);
    while j < b.len() {
        match b[j] {
            b'(' => depth += 1,
            b')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(j);
                }
            }
            q @ (b'"' | b'\'') => j = close_quote(b, j + 1, q)?,
            _ => {}
        }
        j += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn postgres_messages_keep_their_shape() {
        for (input, want) in [
            (
                r#"invalid input syntax for type integer: "alice@example.com:hunter2""#,
                r#"invalid input syntax for type integer: "…""#,
            ),
            ("Key (email)=(bob@x.io) already exists.", "Key (email)=(…) already exists."),
            ("Key (a, b)=(1, f(x)) is not present in table \"t\".", "Key (a, b)=(…) is not present in table \"…\"."),
            ("Failing row contains (7, null, secret).", "Failing row contains (…)."),
            (r#"value "123456" is out of range for type integer"#, r#"value "…" is out of range for type integer"#),
            ("select 'it''s a secret' failed", "select '…' failed"),
            (r#"column "a""b" does not exist"#, r#"column "…" does not exist"#),
            ("unterminated 'tail with secret", "unterminated '…"),
            ("Key (x)=(open forever", "Key (x)=(…"),
            ("division by zero", "division by zero"),
            ("function f(integer) does not exist", "function f(integer) does not exist"),
            ("", ""),
        ] {
            assert_eq!(redact(input), want, "{input}");
        }
        assert!(matches!(redact("canceling statement due to user request"), Cow::Borrowed(_)));
    }

    /// Every quote in `out` opens exactly `…` and then closes (or ends the text).
    fn only_masks_are_quoted(out: &str) -> bool {
        let b = out.as_bytes();
        let mask = MASK.to_string();
        let mut i = 0;
        while i < b.len() {
            if let q @ (b'"' | b'\'') = b[i] {
                let rest = &out[i + 1..];
                if !rest.starts_with(&mask) {
                    return false;
                }
                let after = i + 1 + mask.len();
                if after < b.len() && b[after] != q {
                    return false;
                }
                i = after + 1;
            } else {
                i += 1;
            }
        }
        true
    }

    /// A message made of plain words (lower case) and secrets (never lower case) in the shapes Postgres uses.
    fn message() -> impl Strategy<Value = (String, Vec<String>)> {
        let plain = "[a-z ,.:;]{0,12}";
        // No F, K, X or Y: the output's own text ("Key", "Failing", the replacements below) never matches a secret.
        let secret = "[A-EG-JL-WZ0-9@#%&*+/!?$ ()\"'\u{e9}\u{1F600}]{4,16}";
        proptest::collection::vec((plain, secret, 0..4u8), 1..6).prop_map(|parts| {
            let mut msg = String::new();
            let mut secrets = Vec::new();
            for (words, s, shape) in parts {
                msg.push_str(&words);
                match shape {
                    0 => msg.push_str(&format!("\"{}\"", s.replace('"', "\"\""))),
                    1 => msg.push_str(&format!("'{}'", s.replace('\'', "''"))),
                    2 => msg.push_str(&format!(" Key (col)=({}) ", s.replace(['(', ')', '"', '\''], "X"))),
                    _ => msg.push_str(&format!(" Failing row contains ({}).", s.replace(['(', ')', '"', '\''], "Y"))),
                }
                secrets.push(s);
            }
            (msg, secrets)
        })
    }

    proptest! {
        #[test]
        fn never_panics_and_quotes_only_masks(s in "\\PC{0,64}", raw in proptest::collection::vec(any::<u8>(), 0..64)) {
            let out = redact(&s);
            prop_assert!(only_masks_are_quoted(&out), "{s:?} -> {out:?}");
            let lossy = String::from_utf8_lossy(&raw);
            prop_assert!(only_masks_are_quoted(&redact(&lossy)));
        }

        #[test]
        fn no_quoted_substring_longer_than_3_survives((msg, secrets) in message()) {
            let out = redact(&msg);
            for s in &secrets {
                // Any 4-character window of a secret (that is not lower-case plain text) must be gone.
                let chars: Vec<char> = s.chars().collect();
                for w in chars.windows(4) {
                    let w: String = w.iter().collect();
                    if w.chars().any(|c| !" ()\"'".contains(c)) {
                        prop_assert!(!out.contains(&w), "{msg:?} -> {out:?} leaks {w:?}");
                    }
                }
            }
            prop_assert!(only_masks_are_quoted(&out));
        }
    }
}
