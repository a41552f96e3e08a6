//! What each logical client holds on its direct connection (its prepared statements, its SQL-level
//! statement), read back from the direct replies after each round, and the exclusions of known proxy bugs
//! that depend on it: decided while the case runs direct, so both runs send the same bytes.

use super::*;

/// A client's protocol-level statements: name -> text, and the unnamed statement's text.
#[derive(Clone, Default)]
pub(crate) struct Stmts {
    pub(crate) named: HashMap<&'static str, &'static str>,
    pub(crate) unnamed: Option<&'static str>,
    /// A Parse of the unnamed statement was skipped (an earlier message of its round failed) since it was
    /// last set or dropped: the proxy takes a skipped one for the client's (see `exclude_now`).
    pub(crate) tainted: bool,
}

impl Stmts {
    pub(crate) fn get(&self, name: &str) -> Option<&'static str> {
        if name.is_empty() {
            self.unnamed
        } else {
            self.named.get(name).copied()
        }
    }

    /// A Parse of `name` as if it succeeded.
    pub(crate) fn parsed(&mut self, name: &'static str, text: &'static str) {
        if name.is_empty() {
            (self.unnamed, self.tainted) = (Some(text), false);
        } else {
            self.named.insert(name, text);
        }
    }

    pub(crate) fn closed(&mut self, name: &str) {
        if name.is_empty() {
            (self.unnamed, self.tainted) = (None, false);
        } else {
            self.named.remove(name);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Outcome {
    Done,
    Failed,
    /// Skipped to the Sync after an earlier error (or never answered).
    Skipped,
}

/// What became of each message of an extended round, by its replies: each message is answered in order,
/// and an ErrorResponse fails the message it answers and skips the rest to the Sync.
pub(crate) fn outcomes(ms: &[M], t: &[String]) -> Vec<Outcome> {
    let mut out = vec![Outcome::Skipped; ms.len()];
    let mut at = 0;
    let next = |at: &mut usize| {
        while *at < ms.len() && ms[*at] == M::Flush {
            *at += 1;
        }
    };
    next(&mut at);
    for line in t {
        if at >= ms.len() {
            break;
        }
        let kind = line.split(' ').next().unwrap_or("");
        match kind {
            "ErrorResponse" => {
                out[at] = Outcome::Failed;
                break;
            }
            "ParseComplete" | "BindComplete" | "RowDescription" | "NoData" | "CommandComplete" | "PortalSuspended"
            | "EmptyQueryResponse" | "CloseComplete" => {
                out[at] = Outcome::Done;
                at += 1;
                next(&mut at);
            }
            _ => {}
        }
    }
    out
}

/// After a round: the client's statements and whether it holds an SQL-level prepared statement (`q1`, the
/// only one, which pins its server).
pub(crate) fn update(c: &mut Client, r: &Round, t: &[String]) {
    let done = |tag: &str| t.iter().any(|l| *l == format!("CommandComplete {tag}"));
    match r {
        Round::Query(q) => {
            // A simple Query drops the unnamed statement.
            c.stmts.closed("");
            match *q {
                "prepare q1 as select 2" if done("PREPARE") => c.pinned = true,
                "deallocate q1" if done("DEALLOCATE") => c.pinned = false,
                "deallocate s1" if done("DEALLOCATE") => c.stmts.closed("s1"),
                "deallocate all" if done("DEALLOCATE ALL") => (c.pinned, c.stmts) = (false, Stmts::default()),
                "discard all" if done("DISCARD ALL") => (c.pinned, c.stmts) = (false, Stmts::default()),
                _ => {}
            }
        }
        Round::Ext(ms) => {
            for (m, o) in ms.iter().zip(outcomes(ms, t)) {
                match (m, o) {
                    (M::Parse(n, q), Outcome::Done) => c.stmts.parsed(n, q),
                    // A Parse of the unnamed statement drops the old one first, even when it fails.
                    (M::Parse("", _), Outcome::Failed) => c.stmts.closed(""),
                    (M::Parse("", _), Outcome::Skipped) => c.stmts.tainted = true,
                    (M::Close(b'S', n), Outcome::Done) => c.stmts.closed(n),
                    _ => {}
                }
            }
        }
    }
}

/// Rounds rewritten so that they keep clear of known proxy bugs (each pattern points to its ignored
/// reproducer in `repro.rs`); the rest of the round is kept.
pub(crate) fn exclude_now(r: &Round, c: &Client) -> Round {
    let ms = match r {
        Round::Query(_) => return r.clone(),
        Round::Ext(ms) => ms,
    };
    // Documented, not a bug (README, transaction pooling): a batch of named Parses and a Sync only, from a
    // client that holds no server, is answered by the proxy without a server, so a statement that does not
    // parse fails at its first Bind instead of at its Parse. Such batches get statements that parse.
    let local = ms.iter().all(|m| matches!(m, M::Parse(n, _) if !n.is_empty())) && c.status == b'I' && !c.pinned;
    if local {
        let ms = ms.iter().map(|m| match *m {
            M::Parse(n, "selec bad") => M::Parse(n, "select 'a'::text as t"),
            _ => m.clone(),
        });
        return Round::Ext(ms.collect());
    }
    // repro::statement_the_server_lacks_in_a_failed_transaction: in a failed transaction a statement the
    // server lacks cannot be prepared there, so neither a wrong parameter count (08P01, checked before the
    // aborted state) nor a Describe of a statement without rows (answered direct) is generated then.
    let failed = c.status == b'E';
    let mut held = c.stmts.clone();
    let ms = ms
        .iter()
        .map(|m| match *m {
            M::Parse(n, q) => {
                held.parsed(n, q);
                m.clone()
            }
            M::Close(b'S', n) => {
                held.closed(n);
                m.clone()
            }
            M::Bind(p, s, true) if failed => M::Bind(p, s, false),
            M::Describe(b'S', _) if failed => M::Describe(b'P', ""),
            _ => m.clone(),
        })
        .collect();
    Round::Ext(ms)
}
