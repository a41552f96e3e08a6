//! The first look's memo for simple Queries: drivers that put values into the text (psycopg2, pgbench `-M
//! simple`) send statements that differ only in their numbers, and the first look's answer does not depend on
//! digits, so a text equal to the last one it cleared up to its runs of digits is cleared without a look.
//!
//! Why digits cannot matter ([`super::prefilter`]): no trigger word contains a digit, a digit is neither a
//! quote nor a backslash, folding leaves digits as they are, and the one rule that looks at a digit (`$`
//! before a digit is a parameter, not a dollar quote) asks only whether a digit follows. Two texts that are
//! the same bytes once each run of digits counts as one mark have the same runs of non-digit bytes, so the
//! same triggers, in the same places. Only a cleared text is kept: one the first look did not clear is
//! scanned in full every time (a dollar-quote tag such as `$a1$` does depend on its digits).

/// The last simple-Query text the first look cleared ([`super::plain`]).
#[derive(Debug, Default)]
pub struct PlainMemo {
    text: Vec<u8>,
}

impl PlainMemo {
    /// Texts longer than this are looked at each time (and not kept).
    const MAX: usize = 1024;

    /// [`super::plain`], answered from the memo when `sql` is the last cleared text up to its digits.
    pub fn plain(&mut self, sql: &[u8]) -> bool {
        if !self.text.is_empty() && same_but_digits(&self.text, sql) {
            return true;
        }
        let plain = super::plain(sql);
        if plain && sql.len() <= Self::MAX {
            self.text.clear();
            self.text.extend_from_slice(sql);
        }
        plain
    }

    /// Whether the memo holds memory ([`Self::shrink`] gives it back).
    pub fn holds_buffer(&self) -> bool {
        self.text.capacity() > 0
    }

    pub fn shrink(&mut self) {
        *self = PlainMemo::default();
    }
}

/// Whether `a` and `b` are the same bytes up to their runs of ASCII digits: a run in one stands for a run of
/// any length in the other, at the same place (`aid = 7;` and `aid = 123;`), never for no digit at all.
pub fn same_but_digits(mut a: &[u8], mut b: &[u8]) -> bool {
    loop {
        let n = common_prefix(a, b);
        if n == a.len() && n == b.len() {
            return true;
        }
        // The first difference must fall in a run of digits of both: back up to where the run began.
        let start = n - a[..n].iter().rev().take_while(|c| c.is_ascii_digit()).count();
        let (ra, rb) = (&a[start..], &b[start..]);
        let da = ra.iter().take_while(|c| c.is_ascii_digit()).count();
        let db = rb.iter().take_while(|c| c.is_ascii_digit()).count();
        if da == 0 || db == 0 {
            return false;
        }
        (a, b) = (&ra[da..], &rb[db..]);
    }
}

/// How many leading bytes `a` and `b` share, eight at a time.
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n {
        let x = u64::from_le_bytes(a[i..i + 8].try_into().expect("eight bytes"));
        let y = u64::from_le_bytes(b[i..i + 8].try_into().expect("eight bytes"));
        if x != y {
            return i + ((x ^ y).trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::super::prefilter::may_have_effects;
    use super::*;

    #[test]
    fn texts_equal_up_to_their_numbers_match_and_no_other() {
        let same = [
            (
                "SELECT abalance FROM pgbench_accounts WHERE aid = 7;",
                "SELECT abalance FROM pgbench_accounts WHERE aid = 123456;",
            ),
            ("x = 12;", "x = 13;"),
            ("x = 12;", "x = 1;"),
            ("t1x", "t12x"),
            ("1", "99"),
            ("", ""),
            ("select $1, $2", "select $3, $40"),
        ];
        for (a, b) in same {
            assert!(same_but_digits(a.as_bytes(), b.as_bytes()), "{a:?} / {b:?}");
            assert!(same_but_digits(b.as_bytes(), a.as_bytes()), "{b:?} / {a:?}");
        }
        let differ = [
            ("x = 1;", "x = a;"),
            ("ab1", "ab"),
            ("x = 1;", "x = 1 ;"),
            ("select 1", "SELECT 1"),
            ("select 1 from t", "select 1 from u"),
            ("$1", "$a"),
            ("a1b", "ab"),
        ];
        for (a, b) in differ {
            assert!(!same_but_digits(a.as_bytes(), b.as_bytes()), "{a:?} / {b:?}");
            assert!(!same_but_digits(b.as_bytes(), a.as_bytes()), "{b:?} / {a:?}");
        }
    }

    #[test]
    fn the_memo_clears_only_what_the_first_look_clears() {
        let mut m = PlainMemo::default();
        assert!(m.plain(b"SELECT abalance FROM pgbench_accounts WHERE aid = 1;"));
        assert!(m.plain(b"SELECT abalance FROM pgbench_accounts WHERE aid = 98765;"));
        // Same up to digits as nothing kept: a text the look did not clear is never kept.
        assert!(!m.plain(b"SET x = 1"));
        assert!(!m.plain(b"SET x = 2"));
        assert!(!m.plain(b"select $a1$ set $a1$"));
        assert!(!m.plain(b"select $a2$ set $a1$"));
        assert!(m.plain(b"SELECT abalance FROM pgbench_accounts WHERE aid = 3;"));
        assert!(!m.plain(b"SELECT abalance FROM pgbench_accounts WHERE aid = 3; set x = 1"));
        m.shrink();
        assert!(!m.holds_buffer());
    }

    proptest::proptest! {
        /// The first look gives two texts that are the same up to their digit runs the same answer, and the
        /// memo's match agrees with a definition by mapping every run to one mark.
        #[test]
        fn digits_never_change_the_first_look(parts in proptest::collection::vec(proptest::sample::select(vec![
            "s", "S", "e", "t", "set", "SeT", "listen", "load", "temp", "prepare", "dealloca", "drop", "close",
            "execute", "advisory", "u&", "/*", "'", "\"", "\\", "$", "_", " ", "x", "=", ";", "(", ")",
            "0", "1", "42", "987",
        ]), 0..14), runs in proptest::collection::vec(1usize..5, 14)) {
            let a = parts.concat();
            // `b`: every digit run of `a` replaced with a run of another length.
            let mut b = String::new();
            let mut run = 0;
            let mut chars = a.chars().peekable();
            while let Some(c) = chars.next() {
                if c.is_ascii_digit() {
                    while chars.peek().is_some_and(char::is_ascii_digit) {
                        chars.next();
                    }
                    b.push_str(&"5".repeat(runs[run % runs.len()]));
                    run += 1;
                } else {
                    b.push(c);
                }
            }
            proptest::prop_assert!(same_but_digits(a.as_bytes(), b.as_bytes()), "{:?} / {:?}", a, b);
            proptest::prop_assert_eq!(may_have_effects(a.as_bytes()), may_have_effects(b.as_bytes()), "{:?} / {:?}", a, b);
            let mark = |s: &str| {
                let mut out = String::new();
                for c in s.chars() {
                    if !(c.is_ascii_digit() && out.ends_with('#')) {
                        out.push(if c.is_ascii_digit() { '#' } else { c });
                    }
                }
                out
            };
            let c = parts.iter().rev().cloned().collect::<String>();
            proptest::prop_assert_eq!(same_but_digits(a.as_bytes(), c.as_bytes()), mark(&a) == mark(&c), "{:?} / {:?}", a, c);
        }
    }
}
