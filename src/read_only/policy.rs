//! Read-only route policy: decide whether a statement could turn read-only off, and fingerprint it for audit.
//!
//! Two layers, both on a real SQL lexer/parser (sqlparser, Postgres dialect), failing closed:
//! - the parser recognises SET/RESET/DISCARD/BEGIN/SET TRANSACTION forms that change the access mode;
//! - a token pass catches what the parser cannot see: `set_config(...)` calls, the GUC names anywhere
//!   else (ALTER ... SET, dynamic SQL inside dollar-quoted bodies), and statements the parser rejects.
//!
//! Writes themselves (INSERT, DDL, nextval, FOR UPDATE) are left to Postgres, whose
//! `default_transaction_read_only = on` answers them with 25006 — the second line of defence.

use sqlparser::ast::{
    DiscardObject, Expr, ObjectName, Reset, ResetStatement, Set, Statement, TransactionAccessMode, TransactionMode,
    Value,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer, Whitespace};

const GUCS: [&str; 2] = ["default_transaction_read_only", "transaction_read_only"];

/// Why a statement was refused.
pub type Reason = &'static str;

/// `default_transaction_read_only` or `transaction_read_only` (any case).
pub fn is_read_only_setting(name: &str) -> bool {
    is_guc(name)
}

fn is_guc(name: &str) -> bool {
    GUCS.iter().any(|g| name.eq_ignore_ascii_case(g))
}

fn mentions_guc(text: &str) -> bool {
    text.to_ascii_lowercase().contains("transaction_read_only")
}

fn last_ident(n: &ObjectName) -> String {
    n.0.last().map(|p| p.to_string().trim_matches('"').to_ascii_lowercase()).unwrap_or_default()
}

/// True for a value that keeps read-only on: on, true, yes, 1 (quoted or not).
fn turns_on(values: &[Expr]) -> bool {
    let [v] = values else { return false };
    let text = match v {
        Expr::Identifier(i) => i.value.clone(),
        Expr::Value(v) => match &v.value {
            Value::Boolean(b) => return *b,
            Value::Number(n, _) => n.clone(),
            Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => s.clone(),
            _ => return false,
        },
        _ => return false,
    };
    matches!(text.to_ascii_lowercase().as_str(), "on" | "true" | "yes" | "1" | "t" | "y")
}

fn has_read_write(modes: &[TransactionMode]) -> bool {
    modes.iter().any(|m| matches!(m, TransactionMode::AccessMode(TransactionAccessMode::ReadWrite)))
}

fn check_statement(s: &Statement) -> Result<(), Reason> {
    match s {
        Statement::Set(set) => match set {
            Set::SingleAssignment { variable, values, .. } if is_guc(&last_ident(variable)) && !turns_on(values) => {
                Err("SET of a read-only setting to a value other than on")
            }
            Set::MultipleAssignments { assignments } => {
                if assignments.iter().any(|a| is_guc(&last_ident(&a.name)) && !turns_on(std::slice::from_ref(&a.value)))
                {
                    Err("SET of a read-only setting to a value other than on")
                } else {
                    Ok(())
                }
            }
            Set::ParenthesizedAssignments { variables, .. } if variables.iter().any(|v| is_guc(&last_ident(v))) => {
                Err("SET of a read-only setting")
            }
            Set::SetTransaction { modes, .. } if has_read_write(modes) => Err("SET TRANSACTION READ WRITE"),
            _ => Ok(()),
        },
        Statement::StartTransaction { modes, .. } if has_read_write(modes) => Err("BEGIN READ WRITE"),
        Statement::Reset(ResetStatement { reset: Reset::ALL }) => Err("RESET ALL"),
        Statement::Reset(ResetStatement { reset: Reset::ConfigurationParameter(n) }) if is_guc(&last_ident(n)) => {
            Err("RESET of a read-only setting")
        }
        Statement::Discard { object_type: DiscardObject::ALL } => Err("DISCARD ALL"),
        _ => Ok(()),
    }
}

/// Meaningful tokens of `sql` (no whitespace or comments), or None if it does not lex.
fn tokens(sql: &str) -> Option<Vec<Token>> {
    let all = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize().ok()?;
    Some(all.into_iter().filter(|t| !matches!(t, Token::Whitespace(_))).collect())
}

fn literal(t: &Token) -> Option<&str> {
    match t {
        Token::SingleQuotedString(s)
        | Token::EscapedStringLiteral(s)
        | Token::NationalStringLiteral(s)
        | Token::UnicodeStringLiteral(s) => Some(s),
        Token::DollarQuotedString(d) => Some(&d.value),
        _ => None,
    }
}

fn word(t: &Token) -> Option<String> {
    match t {
        Token::Word(w) => Some(w.value.to_ascii_lowercase()),
        _ => None,
    }
}

/// Token-level checks of one statement's tokens (between semicolons).
fn check_tokens(toks: &[Token]) -> Result<(), Reason> {
    let first = toks.first().and_then(word).unwrap_or_default();
    for (i, t) in toks.iter().enumerate() {
        if let Some(w) = word(t) {
            if w == "set_config" {
                // set_config(<name>, ...): the name must be a literal that is not a read-only setting.
                let name = toks.get(i + 2).and_then(literal);
                if toks.get(i + 1) != Some(&Token::LParen) || name.is_none_or(mentions_guc) {
                    return Err("set_config of a read-only setting (or of a name not given as a literal)");
                }
            }
            if is_guc(&w) && !matches!(first.as_str(), "show" | "set") {
                return Err("statement naming a read-only setting");
            }
        }
        if let Some(text) = literal(t) {
            let in_current_setting =
                i >= 2 && toks[i - 1] == Token::LParen && word(&toks[i - 2]).is_some_and(|w| w == "current_setting");
            if mentions_guc(text) && !in_current_setting {
                return Err("literal naming a read-only setting");
            }
            // Dynamic SQL in DO blocks and function bodies is checked like top-level SQL.
            if matches!(t, Token::DollarQuotedString(_)) {
                check(text)?;
            }
        }
    }
    Ok(())
}

/// Decide whether `sql` (one Query or Parse text, possibly several statements) may run on a read-only route.
pub fn check(sql: &str) -> Result<(), Reason> {
    let Some(toks) = tokens(sql) else {
        let lower = sql.to_ascii_lowercase();
        let risky = ["read_only", "write", "reset", "discard", "set_config", "characteristics"];
        return if risky.iter().any(|r| lower.contains(r)) { Err("statement that does not lex") } else { Ok(()) };
    };
    for stmt in toks.split(|t| *t == Token::SemiColon) {
        check_tokens(stmt)?;
    }
    match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(stmts) => stmts.iter().try_for_each(check_statement),
        Err(_) => {
            // Fail closed on what the parser cannot read but that touches the access mode.
            for stmt in toks.split(|t| *t == Token::SemiColon) {
                let words: Vec<String> = stmt.iter().filter_map(word).collect();
                let pairs = words.windows(2);
                let bad = words.iter().any(|w| is_guc(w))
                    || pairs.clone().any(|p| p[0] == "read" && p[1] == "write")
                    || pairs.clone().any(|p| p[0] == "reset" && p[1] == "all")
                    || pairs.clone().any(|p| p[0] == "discard" && p[1] == "all");
                if bad {
                    return Err("unparsed statement touching the access mode");
                }
            }
            Ok(())
        }
    }
}

/// Words that start or end a transaction (a write needs a new transaction after read-only was turned off).
const TX_CONTROL: [&str; 9] =
    ["begin", "start", "commit", "end", "rollback", "abort", "savepoint", "release", "prepare"];

/// One statement of transaction control (`BEGIN`, `COMMIT`, `SAVEPOINT` ...), as the batch rule counts them.
pub fn is_transaction_control(sql: &str) -> bool {
    let Some(toks) = tokens(sql) else { return false };
    toks.iter().find_map(word).is_some_and(|w| TX_CONTROL.contains(&w.as_str()))
}

/// The route's rules on top of [`check`]: `CALL` and `DO` (both can commit inside) only with
/// `allow_procedures`; `COMMIT PREPARED` / `ROLLBACK PREPARED` (they finish a write made elsewhere) and
/// `PREPARE TRANSACTION` never; transaction control only first in its Query, so no single message can both
/// change a setting and start the transaction that would use it.
pub fn check_route(sql: &str, allow_procedures: bool) -> Result<(), Reason> {
    if let Some(toks) = tokens(sql) {
        let stmts: Vec<&[Token]> = toks.split(|t| *t == Token::SemiColon).filter(|s| !s.is_empty()).collect();
        for (n, stmt) in stmts.iter().enumerate() {
            let w: Vec<String> = stmt.iter().take(2).filter_map(word).collect();
            let (first, second) = (w.first().map(String::as_str), w.get(1).map(String::as_str));
            match (first, second) {
                (Some("call"), _) if !allow_procedures => return Err("CALL (a procedure can commit inside)"),
                (Some("do"), _) if !allow_procedures => return Err("DO (a block can commit inside)"),
                (Some("commit" | "rollback"), Some("prepared")) => {
                    return Err("COMMIT/ROLLBACK PREPARED (finishes a write made elsewhere)")
                }
                (Some("prepare"), Some("transaction")) => return Err("PREPARE TRANSACTION"),
                // First is fine (the transaction it starts or ends is decided before anything else ran);
                // after another statement it could start a transaction with settings that statement changed.
                (Some(f), _) if n > 0 && TX_CONTROL.contains(&f) => {
                    return Err("transaction control after another statement in the same message")
                }
                _ => {}
            }
        }
    }
    check(sql)
}

/// Normalised statement text with every constant replaced by `?` (never logs the constants).
pub fn fingerprint(sql: &str) -> String {
    let Ok(all) = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize() else {
        return "(unlexable statement)".into();
    };
    let mut out = String::new();
    for t in all {
        let piece = match &t {
            Token::Whitespace(Whitespace::SingleLineComment { .. } | Whitespace::MultiLineComment(_)) => continue,
            Token::Whitespace(_) => {
                if !out.ends_with(' ') && !out.is_empty() {
                    out.push(' ');
                }
                continue;
            }
            Token::Number(..) => "?".to_owned(),
            t if literal(t).is_some() => "?".to_owned(),
            Token::Word(w) if w.quote_style.is_none() => w.value.to_ascii_lowercase(),
            other => other.to_string(),
        };
        out.push_str(&piece);
        if out.len() > 300 {
            out.truncate(300);
            out.push('…');
            break;
        }
    }
    out.trim().to_owned()
}

/// Spellings of read-only bypasses the policy refuses — the unit and integration tests send every one.
pub const KNOWN_BYPASSES: &[&str] = &[
    "SET default_transaction_read_only = off",
    "set default_transaction_read_only to false",
    "SET SESSION default_transaction_read_only = 0",
    "SET LOCAL default_transaction_read_only = 'off'",
    "SeT DeFaUlT_TrAnSaCtIoN_ReAd_OnLy = OFF",
    "SET default_transaction_read_only TO DEFAULT",
    "SET transaction_read_only = off",
    "set local transaction_read_only to 'no'",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
    "set session characteristics as transaction isolation level serializable, read write",
    "SET TRANSACTION READ WRITE",
    "BEGIN READ WRITE",
    "begin transaction isolation level read committed read write",
    "START TRANSACTION READ WRITE",
    "start transaction read /* sneaky */ write",
    "RESET default_transaction_read_only",
    "reset transaction_read_only",
    "RESET ALL",
    "DISCARD ALL",
    "discard all",
    "SELECT set_config('default_transaction_read_only', 'off', false)",
    "select pg_catalog.set_config('transaction_read_only', 'off', true)",
    "SELECT SET_CONFIG('DEFAULT_TRANSACTION_READ_ONLY','off',false)",
    "select set_config($1, $2, false)",
    "SELECT 1; SET default_transaction_read_only = off",
    "select 1; /* c */ discard all; select 2",
    "-- comment\nSET default_transaction_read_only=off",
    "DO $$ BEGIN PERFORM set_config('default_transaction_read_only', 'off', false); END $$",
    "DO $x$ BEGIN EXECUTE 'SET default_transaction_read_only = off'; END $x$",
    "ALTER ROLE postgres SET default_transaction_read_only = off",
    "ALTER DATABASE postgres SET default_transaction_read_only TO off",
    "SET \"default_transaction_read_only\" = off",
];

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
