//! The message vocabulary, the proptest generators of cases and their encoding.

use super::*;

/// Statement texts of Parse: deterministic results, one with a parameter, one failing at Execute, one at Parse.
pub(crate) const TEXTS: &[&str] = &[
    "select $1::int + 1",
    "select 'a'::text as t",
    "select 1/0",
    "selec bad",
    "select * from generate_series(1,3) g",
    "begin",
    "commit",
];

/// Simple Queries. `discard all` is only sent outside a transaction block (see `model::exclude_now`).
pub(crate) const QUERIES: &[&str] = &[
    "select 1",
    "begin",
    "commit",
    "rollback",
    "select 1/0",
    "deallocate s1",
    "deallocate all",
    "set search_path = public",
    "reset all",
    "prepare q1 as select 2",
    "execute q1",
    "deallocate q1",
    "discard all",
    // Session settings, set and read back (what one client sets must never reach another).
    "set statement_timeout = '5s'",
    "set local statement_timeout = '7s'",
    "reset statement_timeout",
    "show statement_timeout",
    "set search_path = pg_catalog, public",
    "show search_path",
    "select set_config('datestyle', 'German', false)",
    "select set_config('datestyle', 'SQL', true)",
    "show datestyle",
    "set role pg_monitor",
    "reset role",
    "select current_user, session_user",
    "set application_name = 'diff'",
    "show application_name",
];

/// One frontend message of an extended-protocol round (the round's closing Sync is implied).
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum M {
    /// Parse(statement, text), no parameter types.
    Parse(&'static str, &'static str),
    /// Bind(portal, statement, wrong): text parameter "7" if the client's last Parse of that name took one
    /// (the opposite when `wrong`), text results.
    Bind(&'static str, &'static str, bool),
    /// Describe(b'S' | b'P', name)
    Describe(u8, &'static str),
    /// Execute(portal, max rows)
    Execute(&'static str, i32),
    /// Close(b'S' | b'P', name)
    Close(u8, &'static str),
    Flush,
}

impl fmt::Debug for M {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            M::Parse(n, q) => write!(f, "Parse({n:?}, {q:?})"),
            M::Bind(p, s, w) => write!(f, "Bind({p:?} <- {s:?}{})", if *w { ", wrong params" } else { "" }),
            M::Describe(k, n) => write!(f, "Describe({}, {n:?})", *k as char),
            M::Execute(p, l) => write!(f, "Execute({p:?}, {l})"),
            M::Close(k, n) => write!(f, "Close({}, {n:?})", *k as char),
            M::Flush => write!(f, "Flush"),
        }
    }
}

/// One round: extended messages closed by Sync, or one simple Query.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Round {
    Ext(Vec<M>),
    Query(&'static str),
}

impl fmt::Debug for Round {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Round::Ext(ms) => {
                for m in ms {
                    write!(f, "{m:?}, ")?;
                }
                write!(f, "Sync")
            }
            Round::Query(q) => write!(f, "Query({q:?})"),
        }
    }
}

/// A generated case: the number of logical clients and the schedule of (client, round).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Case {
    pub(crate) clients: usize,
    pub(crate) steps: Vec<(usize, Round)>,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} clients", self.clients)?;
        for (i, (c, r)) in self.steps.iter().enumerate() {
            writeln!(f, "  {i:>2} client {c}: {r:?}")?;
        }
        Ok(())
    }
}

fn pick<T: Clone + fmt::Debug + 'static>(xs: &'static [T]) -> BoxedStrategy<T> {
    proptest::sample::select(xs).boxed()
}

fn stmt() -> BoxedStrategy<&'static str> {
    prop_oneof![9 => pick(&["", "s1", "s2"]), 1 => Just("nx")].boxed()
}

fn portal() -> BoxedStrategy<&'static str> {
    pick(&["", "p1"])
}

fn wrong() -> BoxedStrategy<bool> {
    prop_oneof![9 => Just(false), 1 => Just(true)].boxed()
}

fn text() -> BoxedStrategy<&'static str> {
    // Mostly statements that parse.
    prop_oneof![8 => pick(&TEXTS[..3]), 1 => Just(TEXTS[3]), 6 => pick(&TEXTS[4..])].boxed()
}

fn single() -> BoxedStrategy<M> {
    prop_oneof![
        4 => (pick(&["", "s1", "s2"]), text()).prop_map(|(n, t)| M::Parse(n, t)),
        4 => (portal(), stmt(), wrong()).prop_map(|(p, s, w)| M::Bind(p, s, w)),
        1 => stmt().prop_map(|s| M::Describe(b'S', s)),
        1 => portal().prop_map(|p| M::Describe(b'P', p)),
        3 => (portal(), pick(&[0, 2])).prop_map(|(p, l)| M::Execute(p, l)),
        1 => stmt().prop_map(|s| M::Close(b'S', s)),
        1 => portal().prop_map(|p| M::Close(b'P', p)),
        1 => Just(M::Flush),
    ]
    .boxed()
}

/// Parse, Bind, optional Describe, one or two Executes: the usual extended batch.
fn batch() -> BoxedStrategy<Vec<M>> {
    (pick(&["", "s1", "s2"]), text(), portal(), any::<bool>(), pick(&[0, 2]), any::<bool>())
        .prop_map(|(s, t, p, describe, limit, twice)| {
            let mut v = vec![M::Parse(s, t), M::Bind(p, s, false)];
            if describe {
                v.push(M::Describe(b'P', p));
            }
            v.push(M::Execute(p, limit));
            if twice {
                v.push(M::Execute(p, limit));
            }
            v
        })
        .boxed()
}

/// Bind and Execute of a statement prepared earlier (or not).
fn rerun() -> BoxedStrategy<Vec<M>> {
    (stmt(), portal(), wrong(), pick(&[0, 2]), any::<bool>())
        .prop_map(|(s, p, w, limit, describe)| {
            let mut v = vec![M::Bind(p, s, w)];
            if describe {
                v.push(M::Describe(b'S', s));
            }
            v.push(M::Execute(p, limit));
            v
        })
        .boxed()
}

fn ext_round() -> BoxedStrategy<Round> {
    let unit = prop_oneof![3 => single().prop_map(|m| vec![m]), 3 => batch(), 3 => rerun()];
    proptest::collection::vec(unit, 1..4).prop_map(|us| Round::Ext(us.concat())).boxed()
}

fn round() -> BoxedStrategy<Round> {
    prop_oneof![3 => ext_round(), 2 => pick(QUERIES).prop_map(Round::Query)].boxed()
}

pub(crate) fn case() -> BoxedStrategy<Case> {
    (2..=3usize)
        .prop_flat_map(|n| (Just(n), proptest::collection::vec((0..n, round()), 1..24)))
        .prop_map(|(clients, steps)| Case { clients, steps: steps.into_iter().map(exclude).collect() })
        .boxed()
}

/// Patterns left out of generation because they hit a known proxy bug (see the ignored tests in
/// `repro.rs`); they are rewritten into a nearby pattern, not dropped, so the schedule keeps its shape.
pub(crate) fn exclude((c, r): (usize, Round)) -> (usize, Round) {
    let Round::Ext(ms) = r else { return (c, r) };
    let ms = ms
        .into_iter()
        .map(|m| match m {
            // repro::wrong_parameter_count_error_names_the_clients_statement: the wrong parameter count
            // only for statements whose name the error cannot show wrong ("" and one that does not exist).
            M::Bind(p, s @ ("s1" | "s2"), true) => M::Bind(p, s, false),
            m => m,
        })
        .collect();
    (c, Round::Ext(ms))
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// The bytes of one round. `held` are the client's statements before it: a Bind sends as many parameters
/// as the statement takes (unless told to get it wrong), Parses earlier in the round counted as done (if
/// one fails, the rest of the round is skipped).
pub(crate) fn encode(r: &Round, held: &model::Stmts) -> Vec<u8> {
    let mut texts = held.clone();
    let mut out = Vec::new();
    let ms = match r {
        Round::Query(q) => return raw::query(q),
        Round::Ext(ms) => ms,
    };
    for m in ms {
        let framed = match m {
            M::Parse(n, q) => {
                texts.parsed(n, q);
                raw::parse(n, q)
            }
            M::Bind(p, s, wrong) => {
                let takes = texts.get(s).is_some_and(|t| t.contains("$1"));
                let mut b = Vec::new();
                cstr(&mut b, p);
                cstr(&mut b, s);
                b.extend_from_slice(&0i16.to_be_bytes()); // parameter formats: all text
                if takes != *wrong {
                    b.extend_from_slice(&1i16.to_be_bytes());
                    b.extend_from_slice(&1i32.to_be_bytes());
                    b.push(b'7');
                } else {
                    b.extend_from_slice(&0i16.to_be_bytes());
                }
                b.extend_from_slice(&0i16.to_be_bytes()); // result formats: all text
                raw::msg(b'B', &b)
            }
            M::Describe(k, n) => raw::describe(*k, n),
            M::Execute(p, l) => raw::execute_portal(p, *l),
            M::Close(k, n) => raw::close(*k, n),
            M::Flush => raw::flush(),
        };
        out.extend_from_slice(&framed);
    }
    out.extend_from_slice(&raw::sync());
    out
}

/// Number of frontend messages of a round.
pub(crate) fn msg_count(r: &Round) -> u64 {
    match r {
        Round::Ext(ms) => ms.len() as u64 + 1,
        Round::Query(_) => 1,
    }
}
