//! Randomized differential test of transaction pooling: several clients sharing few server connections
//! each see exactly what they would see on their own direct connection to Postgres.
//!
//! One Postgres, one pgbudget per profile in transaction mode (`max_prepared_statements = 2`, so statements
//! are evicted and prepared again; `pin = "allow"`), its service's share 1 server (profile `share1`) or 2
//! (`share2`). A generated case is 2 or 3 logical clients and a schedule of (client, round); a round is a
//! few extended-protocol messages closed by Sync (Parse of the names "", s1, s2 — the same names in every
//! client, with different texts, so a statement leaking between clients shows —, Bind with the parameters
//! the statement takes or, now and then, the wrong number, of a statement that may not exist, Describe,
//! Execute with max rows 0 or 2, Close, Flush) or one simple Query (transaction control, errors, SQL
//! PREPARE / EXECUTE / DEALLOCATE, which pins, DEALLOCATE ALL, DISCARD ALL, SET / RESET ALL). Rounds run
//! strictly one at a time: write, then read to the ReadyForQuery, every read with a 5 s deadline, so the
//! order is fixed and a schedule can be replayed. The schedule runs first with every client on its own
//! direct connection, then with every client through the proxy (fresh client connections on the
//! profile's proxy; nothing the vocabulary does outlives a session, so the database itself needs no reset).
//!
//! Compared, per round: every backend message in order — its type; ErrorResponse severity (when not ERROR),
//! SQLSTATE and message text (all of the vocabulary's messages are deterministic, and a text naming a
//! prepared statement must name the client's name, not the proxy's); CommandComplete tags; DataRow values;
//! RowDescription column names, type OIDs and formats; ParameterDescription type OIDs; ReadyForQuery status.
//! Left out: ParameterStatus (the proxy replays settings, so reports come at other moments),
//! NoticeResponse (the proxy's own queue notices), NotificationResponse and BackendKeyData (pids differ).
//! A round the proxy would have to make wait (its client holds no server while `share` others hold one,
//! in a transaction block or pinned) is left out of both runs: waiting for the share is the proxy's
//! promise, not a difference (`harness::admitted`). One documented difference is kept out of the
//! schedules: a batch of named Parses and a Sync from a client holding no server is answered by the proxy
//! itself, so a text that does not parse fails at its first Bind, not at its Parse (README, transaction
//! pooling); such batches only get texts that parse (`model::exclude_now`).
//!
//! What each client holds (its statements, by the direct replies: `model.rs`) decides a Bind's parameter
//! count and the rewrites that keep schedules clear of the known proxy bugs, as the case runs direct, so
//! the proxy gets exactly the same bytes.
//!
//! `PGBUDGET_PROXY_DIFF_CASES` (default 60 per profile) and `PGBUDGET_PROXY_DIFF_SEED` (fixes the seed).
//! A difference is shrunk by proptest, then by dropping steps and messages on a fresh proxy per attempt
//! while the same kind of first difference remains (the proxy run stops at the first difference). Known
//! proxy bugs are kept as ignored reproducers in `repro.rs`, and their patterns are left out of generation
//! (`gen::exclude`, `model::exclude_now`).

#[path = "../common/mod.rs"]
mod common;
#[path = "../common/fidelity.rs"]
mod fidelity;
mod gen;
mod harness;
mod model;
#[path = "../common/raw.rs"]
mod raw;
mod repro;
mod wire;

use common::*;
use gen::*;
use harness::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};
use raw::Raw;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use wire::*;

#[test]
fn proxy_matches_direct() {
    let t0 = Instant::now();
    let pg = Pg::start();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let cases = env_u64("PGBUDGET_PROXY_DIFF_CASES").unwrap_or(60) as u32;
    let seed = env_u64("PGBUDGET_PROXY_DIFF_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("proxy_diff: {cases} cases per profile, seed {seed} (PGBUDGET_PROXY_DIFF_SEED={seed} to repeat)");
    let mut failures = Vec::new();
    let mut summary = Vec::new();
    for share in [1, 2] {
        let started = Instant::now();
        let h = RefCell::new(Harness {
            pg: &pg,
            share,
            proxy: start_proxy(&pg, share),
            stats: Stats::default(),
            exclude: true,
        });
        let config = Config {
            cases,
            failure_persistence: None,
            rng_seed: RngSeed::Fixed(seed),
            max_shrink_iters: 400,
            max_shrink_time: 20_000,
            ..Config::default()
        };
        let mut runner = TestRunner::new(config);
        let result = runner.run(&case(), |c| {
            rt.block_on(h.borrow_mut().check(&c)).map_err(|(kind, why)| TestCaseError::fail(format!("{kind}\n{why}")))
        });
        let mut h = h.into_inner();
        match result {
            Ok(()) => {}
            Err(TestError::Fail(why, shrunk)) => {
                let why = why.message().to_owned();
                let kind = why.lines().next().unwrap_or_default().to_owned();
                let (minimal, report) = rt.block_on(minimize(&mut h, shrunk.clone(), kind.clone()));
                failures.push(match report {
                    Some(r) => format!("share{share}: {kind}\nminimal case:\n{minimal:?}\n{r}"),
                    None => format!(
                        "share{share}: {kind} (does NOT reproduce on a fresh proxy: depends on the pool's history)\n\
                         shrunk case:\n{shrunk:?}\n{why}"
                    ),
                });
                eprintln!("proxy_diff: --- pgbudget log tail ---\n{}", fidelity::log_tail(&h.proxy, 20));
                // Around a backend crash if there was one (Postgres itself, on a direct connection too),
                // else the end.
                let pg_log = pg.log();
                let lines: Vec<&str> = pg_log.lines().filter(|l| !l.contains("connection ")).collect();
                let crash = lines.iter().position(|l| l.contains("terminated by signal") || l.contains("PANIC"));
                let end = crash.map_or(lines.len(), |at| (at + 3).min(lines.len()));
                eprintln!("proxy_diff: --- postgres log ---\n{}", lines[end.saturating_sub(30)..end].join("\n"));
            }
            Err(e) => failures.push(format!("share{share}: {e}")),
        }
        let st = &h.stats;
        let line = format!(
            "share{share}: {} case runs, {} rounds ({} skipped), {} client msgs, {} server msgs, {:.1?}",
            st.cases,
            st.rounds,
            st.skipped,
            st.client_msgs,
            st.server_msgs.values().sum::<u64>(),
            started.elapsed()
        );
        summary.push(line);
    }
    eprintln!("proxy_diff: seed {seed}; {}; total {:.1?}", summary.join("; "), t0.elapsed());
    if !failures.is_empty() {
        panic!("the proxy differs from direct connections:\n\n{}", failures.join("\n\n"));
    }
}
