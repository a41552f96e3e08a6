//! Proptest generators of cases (rounds of pipelined units) for the three profiles.

use super::*;

// ---------------------------------------------------------------------------------------------------------
// Generators

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Profile {
    Strict,
    CopySync,
    Wild,
}

impl Profile {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Profile::Strict => "strict",
            Profile::CopySync => "copy-sync",
            Profile::Wild => "wild",
        }
    }
}

pub(crate) const COPY_IN: &str = "copy t from stdin";

pub(crate) type Unit = Vec<M>;
pub(crate) type Round = Vec<Unit>;
pub(crate) type Case = Vec<Round>;

pub(crate) fn pick<T: Clone + fmt::Debug + 'static>(xs: &'static [T]) -> BoxedStrategy<T> {
    proptest::sample::select(xs).boxed()
}

pub(crate) fn query_sql(p: Profile) -> BoxedStrategy<&'static str> {
    const SQL: &[&str] = &[
        "select 1",
        "insert into t values (1)",
        "insert into t values (2)",
        "begin",
        "commit",
        "rollback",
        "savepoint s",
        "rollback to savepoint s",
        "select 1/0",
        "selec oops",
        "select 1; select 2",
        "select 1; select 1/0",
        "",
        "select generate_series(1,3)",
        "copy (select 1) to stdout",
        "listen c",
        "notify c",
        "set application_name = 'x'",
    ];
    if p == Profile::Wild {
        prop_oneof![8 => pick(SQL), 1 => Just(COPY_IN)].boxed()
    } else {
        pick(SQL)
    }
}

pub(crate) fn parse_sql(p: Profile) -> BoxedStrategy<&'static str> {
    const SQL: &[&str] = &[
        "select 1",
        "select generate_series(1,3)",
        "insert into t values (3)",
        "select 1/0",
        "selec oops",
        "begin",
        "commit",
        "rollback",
        "",
        "copy (select 1) to stdout",
        "select 1; select 2",
    ];
    if p == Profile::Wild {
        prop_oneof![6 => pick(SQL), 1 => Just(COPY_IN)].boxed()
    } else {
        pick(SQL)
    }
}

pub(crate) fn copy_row() -> BoxedStrategy<M> {
    pick(&["1\n", "2\n", "5\n", "x\n", "6\n7\n"]).prop_map(M::CopyData).boxed()
}

/// One message, placed anywhere (misplaced copy messages included).
pub(crate) fn single(p: Profile) -> BoxedStrategy<M> {
    let stmt = || pick(&["", "s1", "s2"]);
    let portal = || pick(&["", "p1", "p2"]);
    let sp = || pick(b"SP");
    prop_oneof![
        3 => (pick(&["", "s1"]), parse_sql(p)).prop_map(|(n, q)| M::Parse(n, q)),
        3 => (pick(&["", "p1"]), stmt()).prop_map(|(p, s)| M::Bind(p, s)),
        2 => (sp(), pick(&["", "s1", "p1", "p2"])).prop_map(|(k, n)| M::Describe(k, n)),
        3 => (portal(), pick(&[0, 1])).prop_map(|(p, l)| M::Execute(p, l)),
        1 => (sp(), pick(&["", "s1", "p1"])).prop_map(|(k, n)| M::Close(k, n)),
        1 => Just(M::Flush),
        2 => Just(M::Sync),
        1 => pick(&["-5", "x"]).prop_map(M::Func),
        1 => copy_row(),
        1 => Just(M::CopyDone),
        1 => Just(M::CopyFail),
    ]
    .boxed()
}

/// Parse, Bind, optional Describe, one or two Executes, optional Sync: the usual extended batch.
pub(crate) fn batch(p: Profile) -> BoxedStrategy<Unit> {
    (pick(&["", "s1"]), parse_sql(p), pick(&["", "p1"]), any::<bool>(), pick(&[0, 1]), any::<bool>(), any::<bool>())
        .prop_map(|(s, q, portal, describe, limit, twice, sync)| {
            let mut u = vec![M::Parse(s, q), M::Bind(portal, s)];
            if describe {
                u.push(M::Describe(b'P', portal));
            }
            u.push(M::Execute(portal, limit));
            if twice {
                u.push(M::Execute(portal, limit));
            }
            if sync {
                u.push(M::Sync);
            }
            u
        })
        .boxed()
}

/// Data of a COPY FROM STDIN and its end; with `anywhere`, Sync and Flush are mixed into the data,
/// otherwise they may only precede it.
pub(crate) fn copy_body(anywhere: bool) -> BoxedStrategy<Vec<M>> {
    let item = if anywhere {
        prop_oneof![4 => copy_row(), 1 => Just(M::Sync), 1 => Just(M::Flush)].boxed()
    } else {
        copy_row()
    };
    (
        proptest::collection::vec(pick(&[M::Sync, M::Flush]), 0..2),
        proptest::collection::vec(item, 0..4),
        prop_oneof![3 => Just(M::CopyDone), 1 => Just(M::CopyFail)],
    )
        .prop_map(|(lead, data, end)| {
            let mut v = lead;
            v.extend(data);
            v.push(end);
            v
        })
        .boxed()
}

/// `copy t from stdin` by simple Query (alone or with another statement), its data, its end and
/// `Close(P, "")` (see [`simple_query`]).
pub(crate) fn copy_simple(p: Profile) -> BoxedStrategy<Unit> {
    (pick(&[COPY_IN, "copy t from stdin; select 2", "select 1; copy t from stdin"]), copy_body(p != Profile::Strict))
        .prop_map(|(q, body)| {
            let mut u = vec![M::Query(q)];
            u.extend(body);
            u.push(M::Close(b'P', ""));
            u
        })
        .boxed()
}

/// `copy t from stdin` by Parse/Bind/Execute (statement `cp`, portal `cpp`, used by nothing else), its data,
/// its end and an optional Sync.
pub(crate) fn copy_extended(p: Profile) -> BoxedStrategy<Unit> {
    (copy_body(p != Profile::Strict), any::<bool>())
        .prop_map(|(body, sync)| {
            let mut u = vec![
                M::Close(b'S', "cp"),
                M::Close(b'P', "cpp"),
                M::Parse("cp", COPY_IN),
                M::Bind("cpp", "cp"),
                M::Execute("cpp", 0),
            ];
            u.extend(body);
            if sync {
                u.push(M::Sync);
            }
            u
        })
        .boxed()
}

/// Simple queries that can fail while their portal runs (not while parsing or planning) are followed by
/// `Close(P, "")`. Postgres 15 keeps such a failed unnamed portal until the transaction block ends, with its
/// statement list pointing into freed memory; a later Execute or Describe of the unnamed portal reads it and
/// may crash the backend. The Close drops that portal; a simple query that succeeded has dropped its own.
pub(crate) fn simple_query(p: Profile) -> BoxedStrategy<Unit> {
    query_sql(p)
        .prop_map(|q| {
            let mut u = vec![M::Query(q)];
            if q.starts_with("insert") || q.starts_with("rollback to") {
                u.push(M::Close(b'P', ""));
            }
            u
        })
        .boxed()
}

pub(crate) fn unit(p: Profile) -> BoxedStrategy<Unit> {
    prop_oneof![
        3 => simple_query(p),
        6 => single(p).prop_map(|m| vec![m]),
        2 => batch(p),
        1 => copy_simple(p),
        1 => copy_extended(p),
    ]
    .boxed()
}

pub(crate) fn case(p: Profile) -> BoxedStrategy<Case> {
    proptest::collection::vec(proptest::collection::vec(unit(p), 1..8), 1..6).boxed()
}

/// Whether `msgs` send, while a COPY FROM STDIN may be running (after a message that can start one and
/// before the next CopyDone/CopyFail), something the copy may not take: a non-copy message, or a Sync
/// after CopyData (the copy may already have failed on that data, and then the Sync is not swallowed).
pub(crate) fn sends_into_copy(p: Profile, msgs: &[M]) -> bool {
    let mut in_copy = false;
    let mut data = false;
    for m in msgs {
        let starts = match m {
            M::Query(q) => q.contains(COPY_IN),
            M::Execute(portal, _) => p == Profile::Wild || *portal == "cpp",
            _ => false,
        };
        match m {
            _ if starts => {
                if in_copy {
                    return true;
                }
                in_copy = true;
                data = false;
            }
            M::CopyData(_) => data = true,
            M::CopyDone | M::CopyFail => in_copy = false,
            M::Flush => {}
            M::Sync if !data => {}
            _ if in_copy => return true,
            _ => {}
        }
    }
    false
}
