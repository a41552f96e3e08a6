//! Unit tests of the read-only policy: bypass spellings refused, ordinary reads allowed.

use super::*;

#[test]
fn every_bypass_spelling_is_refused() {
    for sql in KNOWN_BYPASSES {
        assert!(check(sql).is_err(), "allowed: {sql}");
    }
    assert!(KNOWN_BYPASSES.len() >= 25);
}

#[test]
fn ordinary_statements_pass() {
    for sql in [
        "select 1",
        "SELECT * FROM t WHERE note = 'write me'",
        "SHOW default_transaction_read_only",
        "show transaction_read_only",
        "SELECT current_setting('transaction_read_only')",
        "SET default_transaction_read_only = on",
        "SET SESSION default_transaction_read_only TO true",
        "BEGIN READ ONLY",
        "BEGIN",
        "begin isolation level repeatable read",
        "SET statement_timeout = '5s'",
        "RESET statement_timeout",
        "DISCARD PLANS",
        "insert into t values (1)", // refused by Postgres itself with 25006
        "select set_config('search_path', 'app', false)",
        "",
    ] {
        assert_eq!(check(sql), Ok(()), "refused: {sql}");
    }
}

#[test]
fn fingerprints_drop_constants() {
    assert_eq!(fingerprint("SET  default_transaction_read_only = 'off' -- x"), "set default_transaction_read_only = ?");
    assert_eq!(
        fingerprint("select set_config('a', 'secret', false) where x = 42"),
        "select set_config(?, ?, false) where x = ?"
    );
}

#[test]
fn route_rules_refuse_procedures_prepared_transactions_and_bundled_control() {
    for sql in [
        "CALL p()",
        "call s.p(1)",
        "DO $$ BEGIN NULL; END $$",
        "COMMIT PREPARED 'x'",
        "rollback prepared 'x'",
        "PREPARE TRANSACTION 'x'",
        "select 1; commit; insert into t values (1)",
        "select 1; savepoint a",
        "select 1; begin; insert into t values (1)",
    ] {
        assert!(check_route(sql, false).is_err(), "{sql} passed");
    }
    for sql in
        ["BEGIN", "commit", "select 1; select 2", "PREPARE q AS SELECT 1", "savepoint a", "end", "begin; select 1"]
    {
        assert!(check_route(sql, false).is_ok(), "{sql} refused");
    }
    assert!(check_route("CALL p()", true).is_ok());
    assert!(check_route("DO $$ BEGIN NULL; END $$", true).is_ok());
    // allow_procedures does not let a DO body turn read-only off.
    assert!(check_route("DO $$ BEGIN PERFORM set_config('default_transaction_read_only','off',false); END $$", true)
        .is_err());
}
