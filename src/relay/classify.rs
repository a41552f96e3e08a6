//! What a statement may do to its server's session, read off its text without allocating: whether it may
//! change settings, create state that lives only in the backend (and so pins the server to the client),
//! or end such state. The scan only decides whether the relay asks the server afterwards
//! ([`crate::server::ServerConn::probe`] is the exact answer), so it errs towards "maybe": strings and
//! comments are skipped the way Postgres lexes them, and text it cannot read with certainty says
//! [`UNKNOWN`].

mod digits;
mod prefilter;
pub use digits::PlainMemo;

/// Effects a statement may have (a bit set).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Effects(pub u16);

/// May change session settings (`SET`, `RESET`, `set_config`, `SET ROLE`, `DISCARD ALL`...).
pub const SETTINGS: u16 = 1;
/// `LISTEN`.
pub const LISTEN: u16 = 1 << 1;
/// Temporary tables (`CREATE TEMP`, `SELECT INTO TEMP`, `pg_temp.`).
pub const TEMP: u16 = 1 << 2;
/// Session-level advisory locks.
pub const ADVISORY: u16 = 1 << 3;
/// Cursors (`DECLARE`; only `WITH HOLD` ones outlive the transaction).
pub const CURSOR: u16 = 1 << 4;
/// SQL-level `PREPARE`.
pub const PREPARE: u16 = 1 << 5;
/// `LOAD` of a library: it stays in the backend for good.
pub const LOAD: u16 = 1 << 6;
/// May end backend-only state (`UNLISTEN`, `DISCARD`, `CLOSE`, `DEALLOCATE`, `DROP`, advisory unlocks).
pub const UNPIN: u16 = 1 << 7;
/// `DEALLOCATE ALL` or `DISCARD ALL`: every prepared statement of the session is gone.
pub const DEALLOCATE_ALL: u16 = 1 << 8;
/// The text could not be read with certainty (unterminated quote, Unicode escapes, backslashes).
pub const UNKNOWN: u16 = 1 << 9;
/// `DEALLOCATE` of one statement: which statements the server has is read back after it.
pub const DEALLOCATE: u16 = 1 << 10;

/// Effects that create state only the backend holds.
pub const PINS: u16 = LISTEN | TEMP | ADVISORY | CURSOR | PREPARE | LOAD;

impl Effects {
    pub fn has(self, bits: u16) -> bool {
        self.0 & bits != 0
    }

    /// Whether the relay must look at the server (settings or backend state) before handing it on.
    pub fn needs_probe(self) -> bool {
        self.0 != 0
    }

    /// The statement keyword that creates backend-only state, for messages (`LISTEN`, `CREATE TEMP`...).
    pub fn pin_statement(self) -> Option<&'static str> {
        [
            (LISTEN, "LISTEN"),
            (TEMP, "CREATE TEMP"),
            (ADVISORY, "pg_advisory_lock"),
            (CURSOR, "DECLARE CURSOR"),
            (PREPARE, "PREPARE"),
            (LOAD, "LOAD"),
        ]
        .into_iter()
        .find(|(b, _)| self.has(*b))
        .map(|(_, s)| s)
    }
}

fn is_word_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

fn eq(a: &[u8], b: &str) -> bool {
    a.eq_ignore_ascii_case(b.as_bytes())
}

/// Effects of a function or object name seen anywhere in the text.
fn name_effect(w: &[u8]) -> u16 {
    if w.len() < 7 || w.len() > 27 {
        return 0;
    }
    if eq(w, "set_config") {
        SETTINGS
    } else if eq(w, "pg_temp") {
        TEMP
    } else if w[..3].eq_ignore_ascii_case(b"pg_") {
        let lower: &[u8] = &w[3..];
        let is = |s: &str| eq(lower, s);
        if is("advisory_lock")
            || is("advisory_lock_shared")
            || is("try_advisory_lock")
            || is("try_advisory_lock_shared")
        {
            ADVISORY
        } else if is("advisory_unlock") || is("advisory_unlock_shared") || is("advisory_unlock_all") {
            UNPIN
        } else {
            0
        }
    } else {
        0
    }
}

/// Effects of a word inside a dollar-quoted body (function bodies, `DO` blocks): strings are not told apart
/// there, so dynamic SQL (`EXECUTE 'SET ...'`) is seen too.
fn body_effect(w: &[u8]) -> u16 {
    if eq(w, "set") || eq(w, "reset") {
        SETTINGS
    } else if eq(w, "listen") {
        LISTEN
    } else if eq(w, "temp") || eq(w, "temporary") {
        TEMP
    } else if eq(w, "prepare") {
        PREPARE
    } else if eq(w, "load") {
        LOAD
    } else {
        name_effect(w)
    }
}

/// Where a statement's leading keywords have got to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lead {
    /// No word yet in this statement.
    Start,
    Set,
    Discard,
    Deallocate,
    Create,
    /// Past the words that decide.
    Done,
}

/// The first words of each statement decide most effects.
struct Statements {
    lead: Lead,
    prev_into: bool,
    effects: u16,
    /// This statement creates a temporary table; `on_commit` follows `ON COMMIT DROP` (0..=3 words matched):
    /// a table dropped at commit never outlives the transaction.
    temp: bool,
    on_commit: u8,
}

impl Statements {
    fn word(&mut self, w: &[u8]) {
        self.effects |= name_effect(w);
        let temp = eq(w, "temp") || eq(w, "temporary");
        if self.prev_into && temp {
            self.temp = true;
        }
        self.on_commit = match (self.on_commit, w) {
            (_, w) if eq(w, "on") => 1,
            (1, w) if eq(w, "commit") => 2,
            (2, w) if eq(w, "drop") => 3,
            (3, _) => 3,
            _ => 0,
        };
        self.prev_into = eq(w, "into");
        self.lead = match self.lead {
            Lead::Start => {
                if eq(w, "set") {
                    Lead::Set
                } else if eq(w, "discard") {
                    Lead::Discard
                } else if eq(w, "deallocate") {
                    Lead::Deallocate
                } else if eq(w, "create") {
                    Lead::Create
                } else {
                    self.effects |= if eq(w, "reset") {
                        SETTINGS
                    } else if eq(w, "listen") {
                        LISTEN
                    } else if eq(w, "unlisten") || eq(w, "close") || eq(w, "drop") {
                        UNPIN
                    } else if eq(w, "declare") {
                        CURSOR
                    } else if eq(w, "prepare") {
                        PREPARE
                    } else if eq(w, "load") {
                        LOAD
                    } else {
                        0
                    };
                    Lead::Done
                }
            }
            Lead::Set => {
                // SET LOCAL, SET TRANSACTION and SET CONSTRAINTS last only as long as the transaction.
                if !(eq(w, "local") || eq(w, "transaction") || eq(w, "constraints")) {
                    self.effects |= SETTINGS;
                }
                Lead::Done
            }
            Lead::Discard => {
                self.effects |= UNPIN;
                if eq(w, "all") {
                    self.effects |= SETTINGS | DEALLOCATE_ALL;
                }
                Lead::Done
            }
            Lead::Deallocate => {
                self.effects |= UNPIN;
                if eq(w, "prepare") {
                    Lead::Deallocate
                } else {
                    self.effects |= if eq(w, "all") { DEALLOCATE_ALL } else { DEALLOCATE };
                    Lead::Done
                }
            }
            Lead::Create if temp => {
                self.temp = true;
                Lead::Done
            }
            Lead::Create if ["global", "local", "or", "replace", "unlogged"].iter().any(|k| eq(w, k)) => Lead::Create,
            _ => Lead::Done,
        };
    }

    /// Text that cannot be read further: what was seen, and that it is unknown.
    fn unknown(&mut self) -> Effects {
        self.end();
        Effects(self.effects | UNKNOWN)
    }

    /// A `;` or the end: the next word starts a statement.
    fn end(&mut self) {
        if self.lead == Lead::Deallocate {
            self.effects |= UNPIN;
        }
        if self.temp && self.on_commit < 3 {
            self.effects |= TEMP;
        }
        self.lead = Lead::Start;
        self.prev_into = false;
        self.temp = false;
        self.on_commit = 0;
    }
}

/// Scan statement text (one simple Query or one Parse). `backslash_quotes` is the server's
/// `standard_conforming_strings = off`, where `\` escapes in plain strings too.
pub fn classify(sql: &[u8], backslash_quotes: bool) -> Effects {
    if plain(sql) {
        return Effects(0);
    }
    scan(sql, backslash_quotes)
}

/// Whether the first look alone clears `sql`: no word the scan acts on, and no `EXECUTE` or `DEALLOCATE`
/// either (in any case, anywhere), nor a quote, comment or escape that could hide one. Such a text has no
/// effect and names no prepared statement.
pub fn plain(sql: &[u8]) -> bool {
    !prefilter::may_have_effects(sql)
}

/// The last statement text [`classify`]d and its effects. Drivers that send every statement as an unnamed
/// Parse (libpq, JDBC, psycopg, node-postgres) parse the same text transaction after transaction; the whole
/// text is compared (never a hash: a text made to collide could hide a `SET` from the proxy).
#[derive(Debug, Default)]
pub struct Memo {
    text: Vec<u8>,
    quotes: bool,
    effects: Effects,
}

impl Memo {
    /// Texts longer than this are classified each time (and not kept).
    const MAX: usize = 1024;

    /// [`classify`], answered from the memo when `sql` is the text classified last.
    pub fn classify(&mut self, sql: &[u8], backslash_quotes: bool) -> Effects {
        if !self.text.is_empty() && self.quotes == backslash_quotes && self.text == sql {
            return self.effects;
        }
        let effects = classify(sql, backslash_quotes);
        if sql.len() <= Self::MAX {
            self.text.clear();
            self.text.extend_from_slice(sql);
            (self.quotes, self.effects) = (backslash_quotes, effects);
        }
        effects
    }

    /// Whether the memo holds memory ([`Self::shrink`] gives it back).
    pub fn holds_buffer(&self) -> bool {
        self.text.capacity() > 0
    }

    pub fn shrink(&mut self) {
        *self = Memo::default();
    }
}

/// [`classify`] without the first look (for a caller that has just taken it, see [`plain`]).
pub fn scan(sql: &[u8], backslash_quotes: bool) -> Effects {
    let mut st = Statements { lead: Lead::Start, prev_into: false, effects: 0, temp: false, on_commit: 0 };
    let mut i = 0;
    let n = sql.len();
    while i < n {
        let c = sql[i];
        match c {
            b';' => {
                st.end();
                i += 1;
            }
            b'-' if sql.get(i + 1) == Some(&b'-') => {
                i = sql[i..].iter().position(|&b| b == b'\n').map_or(n, |p| i + p + 1);
            }
            b'/' if sql.get(i + 1) == Some(&b'*') => {
                let mut depth = 0usize;
                let mut j = i;
                loop {
                    if j + 1 >= n {
                        return st.unknown();
                    }
                    match (sql[j], sql[j + 1]) {
                        (b'/', b'*') => {
                            depth += 1;
                            j += 2;
                        }
                        (b'*', b'/') => {
                            depth -= 1;
                            j += 2;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => j += 1,
                    }
                }
                i = j;
            }
            b'\'' => {
                // E'...' strings (the E was read as a word just before) and, with
                // standard_conforming_strings off, plain ones take backslash escapes.
                let e_prefix = i > 0 && sql[i - 1].eq_ignore_ascii_case(&b'e') && (i < 2 || !is_word_byte(sql[i - 2]));
                let escapes = backslash_quotes || e_prefix;
                match skip_string(sql, i + 1, escapes) {
                    Some((end, saw_backslash)) => {
                        if saw_backslash && !escapes {
                            // Which way the server reads it depends on a setting the client may have changed.
                            st.effects |= UNKNOWN;
                        }
                        i = end;
                    }
                    None => return Effects(st.effects | UNKNOWN),
                }
            }
            b'"' => {
                let start = i + 1;
                let mut j = start;
                loop {
                    match sql.get(j) {
                        None => return Effects(st.effects | UNKNOWN),
                        Some(b'"') if sql.get(j + 1) == Some(&b'"') => j += 2,
                        Some(b'"') => break,
                        Some(_) => j += 1,
                    }
                }
                st.effects |= name_effect(&sql[start..j]);
                if st.lead == Lead::Start {
                    st.lead = Lead::Done;
                }
                i = j + 1;
            }
            b'$' => match dollar_tag(sql, i) {
                Some(tag_end) => {
                    let tag = &sql[i..tag_end];
                    let body = tag_end;
                    let Some(close) = find(&sql[body..], tag) else {
                        return st.unknown();
                    };
                    st.effects |= words_effect(&sql[body..body + close]);
                    i = body + close + tag.len();
                }
                None => i += 1, // a parameter ($1)
            },
            c if is_word_byte(c) => {
                let start = i;
                while i < n && is_word_byte(sql[i]) {
                    i += 1;
                }
                let w = &sql[start..i];
                // U&'...' and U&"..." take Unicode escapes that could spell anything.
                if w.eq_ignore_ascii_case(b"u") && sql.get(i) == Some(&b'&') {
                    return st.unknown();
                }
                st.word(w);
            }
            _ => i += 1,
        }
    }
    st.end();
    Effects(st.effects)
}

/// Past a quoted string whose opening quote is just before `i`: (index after it, saw a backslash).
fn skip_string(sql: &[u8], mut i: usize, escapes: bool) -> Option<(usize, bool)> {
    let mut backslash = false;
    while i < sql.len() {
        match sql[i] {
            b'\\' => {
                backslash = true;
                i += if escapes { 2 } else { 1 };
            }
            b'\'' if sql.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return Some((i + 1, backslash)),
            _ => i += 1,
        }
    }
    None
}

/// A dollar-quote opening tag at `i` (`$$` or `$name$`, not after a word character): the index after it.
fn dollar_tag(sql: &[u8], i: usize) -> Option<usize> {
    if i > 0 && is_word_byte(sql[i - 1]) {
        return None;
    }
    let mut j = i + 1;
    if sql.get(j).is_some_and(|c| c.is_ascii_digit()) {
        return None;
    }
    while let Some(&c) = sql.get(j) {
        if c == b'$' {
            return Some(j + 1);
        }
        if !(c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80) {
            return None;
        }
        j += 1;
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Effects of every word in a dollar-quoted body.
fn words_effect(body: &[u8]) -> u16 {
    let mut effects = 0;
    let mut i = 0;
    while i < body.len() {
        if is_word_byte(body[i]) && body[i] != b'$' {
            let start = i;
            while i < body.len() && is_word_byte(body[i]) && body[i] != b'$' {
                i += 1;
            }
            effects |= body_effect(&body[start..i]);
        } else {
            i += 1;
        }
    }
    effects
}

#[cfg(test)]
mod tests;
