//! A first look at statement text that lets most statements skip the full scan: text in which no word that
//! can carry an effect appears (not even inside a string or comment), and no quote, block comment, dollar
//! quote, backslash or `U&` escape that could hide one, has no effect. One pass of an automaton over the
//! bytes, instead of a comparison per word.

use aho_corasick::AhoCorasick;
use std::sync::LazyLock;

/// Every word the scan acts on contains one of these (`reset` and `set_config` contain `set`, `unlisten`
/// contains `listen`, `pg_temp` and `temporary` contain `temp`, the advisory lock functions contain
/// `advisory`); the rest start the constructs the scan reads differently from plain words.
const TRIGGERS: &[&str] = &[
    "set",
    "listen",
    "temp",
    "prepare",
    "load",
    "declare",
    "discard",
    "deallocate",
    "close",
    "drop",
    "advisory",
    "u&",
    "'",
    "\"",
    "/*",
    "\\",
];

/// Built once: immutable, shared by every client.
static AUTOMATON: LazyLock<AhoCorasick> = LazyLock::new(|| {
    AhoCorasick::builder().ascii_case_insensitive(true).build(TRIGGERS).expect("fixed patterns build")
});

/// Whether `sql` may have an effect: `false` only where the full scan finds none.
pub(super) fn may_have_effects(sql: &[u8]) -> bool {
    // A `$` not followed by a digit may open a dollar-quoted body (a parameter `$1` cannot).
    AUTOMATON.is_match(sql) || memchr::memchr_iter(b'$', sql).any(|i| !sql.get(i + 1).is_some_and(u8::is_ascii_digit))
}
