//! Differential property test of `relay::txstate::TxState` against a real Postgres.
//!
//! One backend, one raw protocol connection (synchronous, every read bounded by a 2 s timeout), reused by
//! every generated case. A case is a list of rounds; a round is a list of units (simple queries, extended
//! protocol fragments, FunctionCall, COPY in and out, misplaced copy messages...) written in ONE pipelined
//! write and always closed by `CopyFail, Sync` (CopyFail ends any COPY FROM STDIN still running and is
//! ignored outside one; the Sync then gets a ReadyForQuery). Every client message is fed to the model as it
//! is written; server messages are read and fed one by one until the model says it is settled. A probe
//! query then shows whether the model settled exactly when the server did: the probe's own reply must come
//! next (a leftover of the round means the model settled too early; a timeout means it expected too much),
//! and the probe's ReadyForQuery status must match the model's. After each case a reset round (`rollback`,
//! `discard all`, `delete from t`) must leave the model idle; the next case starts from a fresh model.
//!
//! Three generator profiles, N cases each (`PGBUDGET_DIFF_CASES`, default 300; `PGBUDGET_DIFF_SEED` fixes
//! the seed; `PGBUDGET_DIFF_PROFILES=strict,copy-sync,wild` picks profiles):
//! - `strict`: COPY FROM STDIN only as a self-contained unit (start, data, CopyDone/CopyFail) with Sync
//!   and Flush only before the first CopyData: every stream is unambiguous, the model must never be
//!   uncertain;
//! - `copy-sync`: the same, with Sync and Flush anywhere between CopyData messages;
//! - `wild`: COPY FROM STDIN may also start anywhere (bare `copy t from stdin` queries and statements), so
//!   any message may land inside a COPY.
//!
//! `uncertain()` is accepted only when the round sent a message into a COPY FROM STDIN that the copy may
//! not take (a non-copy message, or a Sync after CopyData: the copy may already have failed on that data,
//! and then the Sync is answered instead of swallowed), and only if the model says so while the COPY runs
//! (at the CopyInResponse or at the error that ends the COPY; later it has already misread the stream). The
//! connection is then replaced by a fresh one. A failure is shrunk by proptest, then further by dropping
//! single rounds, units and messages while the same kind of disagreement remains.
//!
//! A backend crash (Postgres 15 can segfault on Execute of an unnamed portal left by a simple query that
//! failed while running in a transaction block, see [`simple_query`]) voids the case and is reported.

#[path = "../common/mod.rs"]
mod common;
mod gen;
mod harness;
mod wire;

use common::*;
use gen::*;
use harness::*;
use pgbudget::relay::txstate::TxState;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use wire::*;

const READ_TIMEOUT: Duration = Duration::from_secs(2);

#[test]
fn txstate_matches_postgres() {
    let t0 = Instant::now();
    let pg = Pg::start();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let func_oid: u32 = rt.block_on(async {
        let c = connect(&pg.conninfo()).await.expect("connect for setup");
        c.batch_execute("create table t(a int primary key)").await.unwrap();
        let secret = scram_secret_1_iteration(PG_PASSWORD);
        c.batch_execute(&format!("alter role postgres password '{secret}'")).await.unwrap();
        let row = c.query_one("select oid from pg_proc where proname = 'int4abs'", &[]).await.unwrap();
        row.get::<_, u32>(0)
    });
    let cases = env_u64("PGBUDGET_DIFF_CASES").unwrap_or(300) as u32;
    let seed = env_u64("PGBUDGET_DIFF_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    let wanted = std::env::var("PGBUDGET_DIFF_PROFILES").unwrap_or_else(|_| "strict,copy-sync,wild".into());
    let profiles: Vec<Profile> = [Profile::Strict, Profile::CopySync, Profile::Wild]
        .into_iter()
        .filter(|p| wanted.split(',').any(|w| w.trim() == p.name()))
        .collect();
    assert!(!profiles.is_empty(), "PGBUDGET_DIFF_PROFILES={wanted:?} names no profile");
    eprintln!("txstate_diff: {cases} cases per profile, seed {seed} (PGBUDGET_DIFF_SEED={seed} to repeat)");

    let mut failures = Vec::new();
    for profile in profiles {
        let started = Instant::now();
        let h = RefCell::new(Harness {
            port: pg.port,
            log_path: pg.log_path(),
            crashes_seen: pg.log().matches("terminated by signal").count(),
            first_crash: None,
            func_oid,
            profile,
            conn: None,
            probes: 0,
            stats: Stats::default(),
        });
        let config = Config {
            cases,
            failure_persistence: None,
            rng_seed: RngSeed::Fixed(seed),
            max_shrink_iters: 2_000,
            max_shrink_time: 60_000,
            ..Config::default()
        };
        let mut runner = TestRunner::new(config);
        let result = runner.run(&case(profile), |c| h.borrow_mut().run_case(&c).map_err(TestCaseError::fail));
        let mut h = h.into_inner();
        let failure = match result {
            Ok(()) => None,
            Err(TestError::Fail(why, shrunk)) => {
                let (minimal, why) = minimize(&mut h, shrunk, why.message().to_owned());
                Some(format!("minimal failing case:\n{}\n{why}", show_case(&minimal)))
            }
            Err(e) => Some(format!("profile {}: {e}", profile.name())),
        };
        let st = &h.stats;
        eprintln!(
            "txstate_diff: profile {:9} {:>5} case runs, {:>5} rounds, {:>6} client msgs, server msgs {:?}, \
             uncertain {}, fatal {}, connections {}, Postgres crashes {}, {:.2?}",
            profile.name(),
            st.cases,
            st.rounds,
            st.client_msgs,
            st.server_msgs,
            st.uncertain,
            st.fatal,
            st.reconnects,
            st.crashes,
            started.elapsed()
        );
        if let Some(c) = &h.first_crash {
            eprintln!("txstate_diff: a Postgres backend crashed (case void, not a model disagreement) on:\n{c}");
        }
        if profile == Profile::Strict {
            assert_eq!(st.uncertain, 0, "the strict profile never sends anything ambiguous");
        }
        failures.extend(failure);
    }
    eprintln!("txstate_diff: total {:.2?}", t0.elapsed());
    if !failures.is_empty() {
        panic!("TxState disagrees with Postgres ({} profile(s)):\n\n{}", failures.len(), failures.join("\n\n"));
    }
}
