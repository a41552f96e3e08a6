//! The first look at statement text: a statement in which none of the words the full scan acts on occurs,
//! anywhere and in any case, and no quote, backslash or `U&` escape that could hide one, has no effect.
//! Sixteen places at a time: a branch-free test of each block (which the compiler vectorises) says whether a
//! trigger can start in it; only in such a block is each pair of bytes looked up in a bit table, and at a
//! candidate pair the next eight bytes, folded to lower case in one step, are compared with the triggers as
//! whole words (most statements are plain `SELECT`s, for which this is the whole classification).

/// The triggers. Every word the scan acts on contains one of them (`reset` and `set_config` contain `set`,
/// `unlisten` contains `listen`, `pg_temp` and `temporary` contain `temp`, the advisory lock functions
/// contain `advisory`, `deallocate` starts with `dealloca`; `execute` is there for the statement rewrite,
/// which renames the prepared statement an `EXECUTE` names); the rest start the constructs the scan reads
/// differently from plain words. Lower case; matched in any case.
const TRIGGERS: [&[u8]; 14] = [
    b"set",
    b"listen",
    b"load",
    b"temp",
    b"prepare",
    b"declare",
    b"discard",
    b"dealloca",
    b"drop",
    b"close",
    b"advisory",
    b"execute",
    b"u&",
    b"/*",
];

/// Setting bit 5 of every byte folds ASCII upper case to lower case. It changes no byte of a trigger; a byte
/// it changes into one is that letter in upper case or a control byte (at worst a spare full scan, since
/// every candidate is verified against the real bytes).
const FOLD: u64 = 0x2020_2020_2020_2020;
const FOLD8: u8 = 0x20;

/// One bit per pair of folded bytes (first << 8 | second) at which a trigger may start: the first two bytes
/// of a word trigger; any byte before a quote or a backslash (folded: `|`); `$` before any byte. The text is
/// walked as pairs, so most bytes cost one bit test; only the rare candidate pair is verified.
static PAIRS: [u64; 1024] = pairs();
/// The word triggers as (word, mask) pairs of up to eight little-endian bytes.
static WORDS: [(u64, u64); TRIGGERS.len()] = words();

const fn pairs() -> [u64; 1024] {
    const fn set(t: &mut [u64; 1024], first: u8, second: u8) {
        let pair = ((first | FOLD8) as usize) << 8 | (second | FOLD8) as usize;
        t[pair >> 6] |= 1 << (pair & 63);
    }
    let mut t = [0u64; 1024];
    let mut i = 0;
    while i < TRIGGERS.len() {
        set(&mut t, TRIGGERS[i][0], TRIGGERS[i][1]);
        i += 1;
    }
    let mut b = 0;
    while b < 256 {
        set(&mut t, b as u8, b'\'');
        set(&mut t, b as u8, b'"');
        set(&mut t, b as u8, b'\\');
        set(&mut t, b'$', b as u8);
        b += 1;
    }
    t
}

const fn words() -> [(u64, u64); TRIGGERS.len()] {
    let mut w = [(0, 0); TRIGGERS.len()];
    let mut t = 0;
    while t < TRIGGERS.len() {
        let word = TRIGGERS[t];
        let (mut value, mut mask, mut i) = (0u64, 0u64, 0);
        while i < word.len() {
            value |= (word[i] as u64) << (8 * i);
            mask |= 0xff << (8 * i);
            i += 1;
        }
        w[t] = (value, mask);
        t += 1;
    }
    w
}

/// Whether `sql` may have an effect: `false` only where the full scan finds none.
pub(super) fn may_have_effects(sql: &[u8]) -> bool {
    // The text's first byte pairs with a space before it.
    if sql.first().is_some_and(|b| candidate(b' ', *b)) && verify(sql, 0) {
        return true;
    }
    // Sixteen pairs at a time without a branch per byte (the compiler turns the block's test into vector
    // compares); only a block that holds a candidate is looked at pair by pair.
    let mut k = 1; // the pair (sql[k - 1], sql[k]) is next
    while k + 17 <= sql.len() {
        let block: &[u8; 18] = sql[k - 1..k + 17].try_into().expect("18 bytes");
        if block_has_candidate(block) && (k..k + 16).any(|i| candidate(sql[i - 1], sql[i]) && verify(sql, i)) {
            return true;
        }
        k += 16;
    }
    if (k..sql.len()).any(|i| candidate(sql[i - 1], sql[i]) && verify(sql, i)) {
        return true;
    }
    sql.last() == Some(&b'$')
}

/// Whether a trigger may start at the pair (`a`, `b`) (or at `b` itself, a quote or backslash).
#[inline]
fn candidate(a: u8, b: u8) -> bool {
    let pair = ((a | FOLD8) as usize) << 8 | (b | FOLD8) as usize;
    PAIRS[pair >> 6] >> (pair & 63) & 1 != 0
}

/// The first three bytes of each word trigger, folded (the third 0 for the two-byte ones).
static HEADS: [(u8, u8, u8); TRIGGERS.len()] = heads();

const fn heads() -> [(u8, u8, u8); TRIGGERS.len()] {
    let mut h = [(0, 0, 0); TRIGGERS.len()];
    let mut t = 0;
    while t < TRIGGERS.len() {
        let w = TRIGGERS[t];
        h[t] = (w[0] | FOLD8, w[1] | FOLD8, if w.len() > 2 { w[2] | FOLD8 } else { 0 });
        t += 1;
    }
    h
}

/// Whether a trigger may start at any of the 16 pairs (`w[j]`, `w[j + 1]`) (`w` holds a byte more): a word
/// trigger's first three bytes from `w[j]` (two for `u&` and `/*`), a quote or backslash at `w[j + 1]`, a
/// `$` at `w[j]`. Stricter than [`candidate`] (a `SELECT` is no candidate here) and written without branches
/// or table loads, so the compiler vectorises it.
#[inline]
fn block_has_candidate(w: &[u8; 18]) -> bool {
    let mut hit = 0u8;
    for j in 0..16 {
        let (a, b, c) = (w[j] | FOLD8, w[j + 1] | FOLD8, w[j + 2] | FOLD8);
        let mut h = (b == b'\'' | FOLD8) | (b == b'"' | FOLD8) | (b == b'\\' | FOLD8) | (a == b'$' | FOLD8);
        for &(x, y, z) in &HEADS {
            h |= (a == x) & (b == y) & ((c == z) | (z == 0));
        }
        hit |= h as u8;
    }
    hit != 0
}

/// A candidate pair ends at `sql[i]`: whether a trigger really is there.
#[cold]
fn verify(sql: &[u8], i: usize) -> bool {
    if matches!(sql[i], b'\'' | b'"' | b'\\') {
        return true;
    }
    // A `$` opens a dollar quote unless a digit follows (a parameter `$1` is none).
    if i > 0 && sql[i - 1] == b'$' && !sql[i].is_ascii_digit() {
        return true;
    }
    let w = word_at(sql, i.saturating_sub(1)) | FOLD;
    WORDS.iter().any(|&(v, m)| w & m == v)
}

/// The eight bytes of `sql` from `i` as a little-endian word (zeros past the end).
fn word_at(sql: &[u8], i: usize) -> u64 {
    match sql.get(i..i + 8) {
        Some(w) => u64::from_le_bytes(w.try_into().expect("eight bytes")),
        None => {
            let mut w = [0u8; 8];
            let rest = &sql[i..];
            w[..rest.len()].copy_from_slice(rest);
            u64::from_le_bytes(w)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition the table scan must agree with: a trigger occurs anywhere, in any case.
    fn naive(sql: &[u8]) -> bool {
        let lower = sql.to_ascii_lowercase();
        let has = |t: &[u8]| lower.windows(t.len()).any(|w| w == t);
        TRIGGERS.iter().any(|t| has(t))
            || sql.iter().any(|b| matches!(b, b'\'' | b'"' | b'\\'))
            || memchr::memchr_iter(b'$', sql).any(|i| !sql.get(i + 1).is_some_and(u8::is_ascii_digit))
    }

    #[test]
    fn each_trigger_is_found_in_any_case_and_position() {
        for t in TRIGGERS.iter().map(|t| std::str::from_utf8(t).unwrap()).chain(["'", "\"", "\\", "$$"]) {
            for form in [t.to_owned(), t.to_ascii_uppercase()] {
                for sql in [form.clone(), format!("select 1 from x{form}"), format!("{form}x")] {
                    assert!(may_have_effects(sql.as_bytes()), "{sql}");
                }
            }
        }
        // Every offset, across the sixteen-pair blocks and the tail.
        for t in TRIGGERS.iter().map(|t| std::str::from_utf8(t).unwrap()).chain(["'", "\"", "\\", "$x"]) {
            for at in 0..40 {
                let sql = format!("{}{t}{}", "x".repeat(at), "y".repeat(40 - at));
                assert!(may_have_effects(sql.as_bytes()), "{sql}");
            }
        }
        assert!(!may_have_effects(
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1; -- x1 y2".repeat(3).as_bytes()
        ));
        assert!(may_have_effects(b"DEALLOCATE ALL"));
        assert!(may_have_effects(b"select $"));
        assert!(!may_have_effects(b"select $1, $2"));
        assert!(!may_have_effects(b"SELECT abalance FROM pgbench_accounts WHERE aid = 1;"));
        assert!(!may_have_effects(b"se"));
        assert!(!may_have_effects(b""));
        assert!(!may_have_effects("ß select 1 ü".as_bytes()));
    }

    proptest::proptest! {
        /// The table scan says "maybe" wherever a trigger occurs (a spare "maybe" only costs a full scan, and
        /// happens only for control bytes folded into letters).
        #[test]
        fn the_table_scan_finds_every_trigger(parts in proptest::collection::vec(proptest::sample::select(vec![
            "s", "S", "e", "t", "T", "set", "sEt", "listen", "LOAD", "temp", "prepare", "declare", "discard",
            "deallocate", "drop", "close", "advisory", "u&", "U&", "/", "*", "/*", "'", "\"", "\\", "$", "$1", "1",
            " ", "x", "_", "\u{13}", "\u{0c}", "ü",
        ]), 0..16)) {
            let sql = parts.concat();
            let (fast, slow) = (may_have_effects(sql.as_bytes()), naive(sql.as_bytes()));
            proptest::prop_assert!(fast || !slow, "missed a trigger in {:?}", sql);
            if !sql.bytes().any(|b| b < 0x20) {
                proptest::prop_assert_eq!(fast, slow, "{:?}", sql);
            }
        }
    }
}
