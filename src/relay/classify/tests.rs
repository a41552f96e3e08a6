//! The statement scan's unit and property tests.

use super::*;

fn fx(sql: &str) -> u16 {
    classify(sql.as_bytes(), false).0
}

#[test]
fn plain_statements_have_no_effect() {
    for s in [
        "SELECT 1",
        "select abalance from pgbench_accounts where aid = $1",
        "UPDATE t SET x = 1 WHERE id = $2",
        "INSERT INTO t VALUES ('SET search_path = x')",
        "BEGIN; SET LOCAL search_path = a; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; COMMIT",
        "SELECT temp FROM weather -- LISTEN x",
        "/* SET x /* nested */ = 1 */ SELECT 1",
        "SELECT $1::text, 'it''s'",
        "SELECT E'a\\'b; SET x = 1'",
        "SELECT pg_advisory_xact_lock(1)",
        "NOTIFY chan, 'x'",
    ] {
        assert_eq!(fx(s), 0, "{s}");
    }
}

#[test]
fn settings_changes_are_seen() {
    for s in [
        "SET search_path = a",
        "set session statement_timeout to 5",
        "SET ROLE app",
        "SET SESSION AUTHORIZATION bob",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        "SET TIME ZONE 'UTC'",
        "RESET ALL",
        "select 1; SET x.y = 1",
        "SELECT pg_catalog.set_config('search_path', 'a', false)",
        "SELECT \"set_config\"('a', 'b', false)",
        "DO $$BEGIN PERFORM set_config('a','b',false); END$$",
        "DO $body$ BEGIN EXECUTE 'SET search_path = x'; END $body$",
        "/**/SET/**/search_path=x",
    ] {
        assert!(fx(s) & SETTINGS != 0, "{s}");
    }
}

#[test]
fn pins_and_unpins() {
    assert_eq!(fx("LISTEN chan"), LISTEN);
    assert_eq!(fx("CREATE TEMP TABLE t (x int)"), TEMP);
    assert_eq!(fx("create global temporary table t (x int)"), TEMP);
    assert_eq!(fx("CREATE TABLE pg_temp.t (x int)"), TEMP);
    assert_eq!(fx("SELECT * INTO TEMP t FROM x"), TEMP);
    assert_eq!(fx("SELECT pg_advisory_lock(1)"), ADVISORY);
    assert_eq!(fx("select pg_catalog.pg_try_advisory_lock_shared(1, 2)"), ADVISORY);
    assert_eq!(fx("DECLARE c CURSOR WITH HOLD FOR SELECT 1"), CURSOR);
    assert_eq!(fx("PREPARE p AS SELECT 1"), PREPARE);
    assert_eq!(fx("LOAD 'auto_explain'"), LOAD);
    assert_eq!(fx("UNLISTEN *"), UNPIN);
    assert_eq!(fx("DISCARD TEMP"), UNPIN);
    assert_eq!(fx("DISCARD ALL"), UNPIN | SETTINGS | DEALLOCATE_ALL);
    assert_eq!(fx("DEALLOCATE ALL"), UNPIN | DEALLOCATE_ALL);
    assert_eq!(fx("DEALLOCATE PREPARE ALL"), UNPIN | DEALLOCATE_ALL);
    assert_eq!(fx("DEALLOCATE p"), UNPIN | DEALLOCATE);
    assert_eq!(fx("SELECT pg_advisory_unlock_all()"), UNPIN);
    assert_eq!(fx("CLOSE c"), UNPIN);
    assert_eq!(fx("DROP TABLE t"), UNPIN);
    assert_eq!(fx("CREATE TABLE t (temp int)"), 0);
    assert_eq!(fx("CREATE TEMP TABLE t (x int) ON COMMIT DROP"), 0, "dropped at commit");
    assert_eq!(fx("CREATE TEMP TABLE t (x int) ON COMMIT DELETE ROWS; SELECT 1"), TEMP);
}

#[test]
fn unreadable_text_is_unknown() {
    for s in [
        "SELECT 'a\\''; SET search_path = evil; --'",
        "SELECT date'a\\'; SET search_path = evil; --'",
        "SELECT U&\"\\0073et_config\"()",
        "SELECT 'open",
        "/* open",
    ] {
        assert!(fx(s) & UNKNOWN != 0, "{s}");
    }
    // With standard_conforming_strings off the same text is read the server's way.
    assert!(classify(b"SELECT 'a\\''; SET search_path = evil; --'", true).has(SETTINGS));
}

#[test]
fn the_memo_answers_only_the_same_text_under_the_same_quoting() {
    let mut m = Memo::default();
    let plain = b"select * from t where a = $1";
    assert_eq!(m.classify(plain, false), Effects(0));
    assert_eq!(m.classify(plain, false), Effects(0), "answered from the memo");
    // A text that differs in its last byte only, or the same text under other quoting, is scanned.
    assert!(m.classify(b"select * from t where a = $1; set role x", false).has(SETTINGS));
    let quoted = b"select 'a\\'; set role x; select '";
    let (on, off) = (classify(quoted, false), classify(quoted, true));
    assert_ne!(on, off, "the test text must read differently under the two quotings");
    assert_eq!(m.classify(quoted, false), on);
    assert_eq!(m.classify(quoted, true), off);
    // A text longer than the memo keeps is classified each time, and correctly.
    let long = format!("select {} ; set search_path = x", "1,".repeat(600));
    assert!(m.classify(long.as_bytes(), false).has(SETTINGS));
    assert!(m.classify(long.as_bytes(), false).has(SETTINGS));
    m.shrink();
    assert!(!m.holds_buffer());
}

proptest::proptest! {
    #[test]
    fn any_bytes_are_scanned_without_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
        let _ = classify(&bytes, false);
        let _ = classify(&bytes, true);
    }

    /// The first look never hides an effect the full scan finds (texts built from the words, quotes,
    /// comments and escapes the scan acts on).
    #[test]
    fn the_first_look_skips_only_text_without_effects(parts in proptest::collection::vec(proptest::sample::select(vec![
        "select", "SET", "reset", "set_config", "listen", "UNLISTEN", "temp", "temporary", "pg_temp", "into",
        "create", "prepare", "load", "declare", "discard", "all", "deallocate", "close", "drop", "on", "commit",
        "pg_advisory_lock", "pg_try_advisory_lock", "pg_advisory_unlock_all", "local", "x", "1", "$1", "$$",
        "$a$", "'", "''", "\"", "--", "\n", "/*", "*/", "\\", "U&", "E", ";", "(", ")", " ", ",",
    ]), 0..24)) {
        let sql = parts.concat();
        for quotes in [false, true] {
            let full = scan(sql.as_bytes(), quotes);
            if !prefilter::may_have_effects(sql.as_bytes()) {
                proptest::prop_assert_eq!(full.0, 0, "{}", sql);
            }
            proptest::prop_assert_eq!(classify(sql.as_bytes(), quotes).0, full.0, "{}", sql);
        }
    }

    #[test]
    fn a_set_after_any_harmless_prefix_is_seen(prefix in "[a-z0-9 ,()=]{0,40}") {
        let sql = format!("SELECT {prefix}; SET search_path = x");
        proptest::prop_assert!(classify(sql.as_bytes(), false).has(SETTINGS));
    }
}
