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

mod common;

use common::*;
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

const READ_TIMEOUT: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------------------
// Client messages

/// One frontend message.
#[derive(Clone, PartialEq, Eq)]
enum M {
    Query(&'static str),
    /// Parse(statement, sql)
    Parse(&'static str, &'static str),
    /// Bind(portal, statement), no parameters, text results
    Bind(&'static str, &'static str),
    /// Describe(b'S' | b'P', name)
    Describe(u8, &'static str),
    /// Execute(portal, row limit)
    Execute(&'static str, i32),
    /// Close(b'S' | b'P', name)
    Close(u8, &'static str),
    Flush,
    Sync,
    /// FunctionCall of int4abs with one text argument
    Func(&'static str),
    CopyData(&'static str),
    CopyDone,
    CopyFail,
}

impl fmt::Debug for M {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            M::Query(q) => write!(f, "Q{q:?}"),
            M::Parse(n, q) => write!(f, "P({n:?},{q:?})"),
            M::Bind(p, s) => write!(f, "B({p:?}<-{s:?})"),
            M::Describe(k, n) => write!(f, "D({}{n:?})", *k as char),
            M::Execute(p, l) => write!(f, "E({p:?},{l})"),
            M::Close(k, n) => write!(f, "C({}{n:?})", *k as char),
            M::Flush => write!(f, "H"),
            M::Sync => write!(f, "S"),
            M::Func(a) => write!(f, "F(int4abs {a:?})"),
            M::CopyData(d) => write!(f, "d{d:?}"),
            M::CopyDone => write!(f, "c"),
            M::CopyFail => write!(f, "f"),
        }
    }
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// Type byte and body of `m`; `func_oid` is int4abs.
fn encode(m: &M, func_oid: u32) -> (u8, Vec<u8>) {
    let mut b = Vec::new();
    let kind = match m {
        M::Query(q) => {
            cstr(&mut b, q);
            b'Q'
        }
        M::Parse(n, q) => {
            cstr(&mut b, n);
            cstr(&mut b, q);
            b.extend_from_slice(&0i16.to_be_bytes());
            b'P'
        }
        M::Bind(p, s) => {
            cstr(&mut b, p);
            cstr(&mut b, s);
            b.extend_from_slice(&[0; 6]); // no parameter formats, no parameters, no result formats
            b'B'
        }
        M::Describe(k, n) => {
            b.push(*k);
            cstr(&mut b, n);
            b'D'
        }
        M::Execute(p, l) => {
            cstr(&mut b, p);
            b.extend_from_slice(&l.to_be_bytes());
            b'E'
        }
        M::Close(k, n) => {
            b.push(*k);
            cstr(&mut b, n);
            b'C'
        }
        M::Flush => b'H',
        M::Sync => b'S',
        M::Func(a) => {
            b.extend_from_slice(&func_oid.to_be_bytes());
            b.extend_from_slice(&1i16.to_be_bytes()); // one argument format code: text
            b.extend_from_slice(&0i16.to_be_bytes());
            b.extend_from_slice(&1i16.to_be_bytes()); // one argument
            b.extend_from_slice(&(a.len() as i32).to_be_bytes());
            b.extend_from_slice(a.as_bytes());
            b.extend_from_slice(&0i16.to_be_bytes()); // text result
            b'F'
        }
        M::CopyData(d) => {
            b.extend_from_slice(d.as_bytes());
            b'd'
        }
        M::CopyDone => b'c',
        M::CopyFail => {
            cstr(&mut b, "end");
            b'f'
        }
    };
    (kind, b)
}

fn frame(out: &mut Vec<u8>, kind: u8, body: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
}

// ---------------------------------------------------------------------------------------------------------
// Server messages

struct Srv {
    kind: u8,
    body: Vec<u8>,
}

impl Srv {
    fn first(&self) -> Option<u8> {
        self.body.first().copied()
    }

    /// Severity (non-localized if present), SQLSTATE and message of an ErrorResponse/NoticeResponse.
    fn fields(&self) -> (String, String, String) {
        let (mut sev, mut code, mut text) = (String::new(), String::new(), String::new());
        for f in self.body.split(|b| *b == 0).filter(|f| !f.is_empty()) {
            let v = String::from_utf8_lossy(&f[1..]).into_owned();
            match f[0] {
                b'V' => sev = v,
                b'S' if sev.is_empty() => sev = v,
                b'C' => code = v,
                b'M' => text = v,
                _ => {}
            }
        }
        (sev, code, text)
    }

    fn fatal(&self) -> bool {
        self.kind == b'E' && matches!(self.fields().0.as_str(), "FATAL" | "PANIC")
    }

    /// First column of a DataRow, as text.
    fn first_value(&self) -> Option<String> {
        let b = &self.body;
        if b.len() < 6 || u16::from_be_bytes([b[0], b[1]]) == 0 {
            return None;
        }
        let len = i32::from_be_bytes([b[2], b[3], b[4], b[5]]);
        let v = b.get(6..6 + usize::try_from(len).ok()?)?;
        Some(String::from_utf8_lossy(v).into_owned())
    }
}

impl fmt::Debug for Srv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = self.kind as char;
        match self.kind {
            b'E' | b'N' => {
                let (sev, code, text) = self.fields();
                write!(f, "{k}[{sev} {code} {text}]")
            }
            b'Z' => write!(f, "Z({})", self.first().map(char::from).unwrap_or('?')),
            b'C' => write!(f, "C({})", String::from_utf8_lossy(self.body.strip_suffix(&[0]).unwrap_or(&self.body))),
            b'D' => match self.first_value() {
                Some(v) if v.starts_with("probe") => write!(f, "D({v})"),
                _ => write!(f, "D"),
            },
            _ => write!(f, "{k}"),
        }
    }
}

enum ReadErr {
    Timeout,
    Closed,
    Io(io::Error),
}

impl fmt::Display for ReadErr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadErr::Timeout => write!(f, "no server message within {READ_TIMEOUT:?}"),
            ReadErr::Closed => write!(f, "the server closed the connection"),
            ReadErr::Io(e) => write!(f, "read error: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// A minimal synchronous raw client

struct Conn {
    r: BufReader<TcpStream>,
    w: TcpStream,
    /// Status of the last ReadyForQuery read from this connection.
    last_status: u8,
}

impl Conn {
    /// Log in, waiting (up to 30 s) while Postgres restarts after a backend crash.
    fn open(port: u16) -> Conn {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Self::login(port) {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("login: {e}"),
            }
        }
    }

    fn login(port: u16) -> Result<Conn, String> {
        let s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        let w = s.try_clone().unwrap();
        let mut c = Conn { r: BufReader::with_capacity(1 << 16, s), w, last_status: b'I' };
        let mut body = 196_608i32.to_be_bytes().to_vec();
        for s in ["user", "postgres", "database", "postgres", "client_encoding", "UTF8"] {
            cstr(&mut body, s);
        }
        body.push(0);
        let mut startup = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        startup.extend_from_slice(&body);
        c.w.write_all(&startup).map_err(|e| format!("write: {e}"))?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let m = c.read().map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            match m.kind {
                b'R' => match i32::from_be_bytes(m.body[..4].try_into().unwrap()) {
                    0 => {}
                    10 => {
                        let sc = ScramSha256::new(PG_PASSWORD.as_bytes(), ChannelBinding::unsupported());
                        let mut b = b"SCRAM-SHA-256\0".to_vec();
                        b.extend_from_slice(&(sc.message().len() as i32).to_be_bytes());
                        b.extend_from_slice(sc.message());
                        frame(&mut out, b'p', &b);
                        scram = Some(sc);
                    }
                    11 => {
                        let sc = scram.as_mut().expect("SASLContinue after SASL");
                        sc.update(&m.body[4..]).unwrap();
                        frame(&mut out, b'p', sc.message());
                    }
                    12 => scram.as_mut().expect("SASLFinal after SASL").finish(&m.body[4..]).unwrap(),
                    code => panic!("unexpected authentication request {code}"),
                },
                b'E' => return Err(format!("{m:?}")),
                b'Z' => return Ok(c),
                _ => {}
            }
            if !out.is_empty() {
                c.w.write_all(&out).map_err(|e| format!("write: {e}"))?;
            }
        }
    }

    fn read(&mut self) -> Result<Srv, ReadErr> {
        let map = |e: io::Error| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ReadErr::Timeout,
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                ReadErr::Closed
            }
            _ => ReadErr::Io(e),
        };
        let mut h = [0u8; 5];
        self.r.read_exact(&mut h).map_err(map)?;
        let len = i32::from_be_bytes([h[1], h[2], h[3], h[4]]);
        if len < 4 {
            return Err(ReadErr::Io(io::Error::new(io::ErrorKind::InvalidData, format!("message length {len}"))));
        }
        let mut body = vec![0u8; len as usize - 4];
        self.r.read_exact(&mut body).map_err(map)?;
        if h[0] == b'Z' {
            self.last_status = body.first().copied().unwrap_or(b'?');
        }
        Ok(Srv { kind: h[0], body })
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let _ = self.w.shutdown(std::net::Shutdown::Both);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Generators

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Profile {
    Strict,
    CopySync,
    Wild,
}

impl Profile {
    fn name(self) -> &'static str {
        match self {
            Profile::Strict => "strict",
            Profile::CopySync => "copy-sync",
            Profile::Wild => "wild",
        }
    }
}

const COPY_IN: &str = "copy t from stdin";

type Unit = Vec<M>;
type Round = Vec<Unit>;
type Case = Vec<Round>;

fn pick<T: Clone + fmt::Debug + 'static>(xs: &'static [T]) -> BoxedStrategy<T> {
    proptest::sample::select(xs).boxed()
}

fn query_sql(p: Profile) -> BoxedStrategy<&'static str> {
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

fn parse_sql(p: Profile) -> BoxedStrategy<&'static str> {
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

fn copy_row() -> BoxedStrategy<M> {
    pick(&["1\n", "2\n", "5\n", "x\n", "6\n7\n"]).prop_map(M::CopyData).boxed()
}

/// One message, placed anywhere (misplaced copy messages included).
fn single(p: Profile) -> BoxedStrategy<M> {
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
fn batch(p: Profile) -> BoxedStrategy<Unit> {
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
fn copy_body(anywhere: bool) -> BoxedStrategy<Vec<M>> {
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
fn copy_simple(p: Profile) -> BoxedStrategy<Unit> {
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
fn copy_extended(p: Profile) -> BoxedStrategy<Unit> {
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
fn simple_query(p: Profile) -> BoxedStrategy<Unit> {
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

fn unit(p: Profile) -> BoxedStrategy<Unit> {
    prop_oneof![
        3 => simple_query(p),
        6 => single(p).prop_map(|m| vec![m]),
        2 => batch(p),
        1 => copy_simple(p),
        1 => copy_extended(p),
    ]
    .boxed()
}

fn case(p: Profile) -> BoxedStrategy<Case> {
    proptest::collection::vec(proptest::collection::vec(unit(p), 1..8), 1..6).boxed()
}

/// Whether `msgs` send, while a COPY FROM STDIN may be running (after a message that can start one and
/// before the next CopyDone/CopyFail), something the copy may not take: a non-copy message, or a Sync
/// after CopyData (the copy may already have failed on that data, and then the Sync is not swallowed).
fn sends_into_copy(p: Profile, msgs: &[M]) -> bool {
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

// ---------------------------------------------------------------------------------------------------------
// Running cases

#[derive(Default)]
struct Stats {
    cases: u64,
    rounds: u64,
    client_msgs: u64,
    server_msgs: BTreeMap<char, u64>,
    uncertain: u64,
    fatal: u64,
    reconnects: u64,
    /// Backend crashes (segfaults) of Postgres itself; the case is void.
    crashes: u64,
}

struct Harness {
    port: u16,
    log_path: std::path::PathBuf,
    /// Backend crashes already in the Postgres log.
    crashes_seen: usize,
    /// The transcript of the first case that crashed a backend.
    first_crash: Option<String>,
    func_oid: u32,
    profile: Profile,
    conn: Option<Conn>,
    probes: u64,
    stats: Stats,
}

/// One round as sent and received, for the failure report.
struct Log {
    sent: Vec<Unit>,
    got: Vec<Srv>,
    probe: Vec<Srv>,
}

enum Outcome {
    Settled,
    /// The model said uncertain (or saw a FATAL): the connection is no longer usable for the test.
    Lost,
}

impl Harness {
    fn conn(&mut self) -> &mut Conn {
        if self.conn.is_none() {
            let mut c = Conn::open(self.port);
            // A fresh backend: clean the table left by a dropped one (its transaction may still be ending).
            let mut model = TxState::default();
            let mut log = Log { sent: vec![], got: vec![], probe: vec![] };
            let reset = vec![vec![M::Query("delete from t")]];
            if let Err(e) = round(&mut c, &mut model, self.func_oid, &mut self.probes, &reset, &mut log) {
                panic!("reset of a fresh connection failed: {e}\n{}", show(&[log]));
            }
            self.conn = Some(c);
            self.stats.reconnects += 1;
        }
        self.conn.as_mut().unwrap()
    }

    fn run_case(&mut self, case: &Case) -> Result<(), String> {
        let mut r = self.run_case_inner(case);
        if let Err(e) = &r {
            // A backend that dies of a signal is a Postgres bug, not a disagreement: the case is void.
            // The postmaster logs the crash a moment after the connection drops: give it a little time.
            let closed = e.contains("closed the connection") || e.contains("write:");
            let until = Instant::now() + Duration::from_secs(if closed { 3 } else { 0 });
            let mut crashes;
            loop {
                let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
                crashes = log.matches("terminated by signal").count();
                if crashes > self.crashes_seen || Instant::now() >= until {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if crashes > self.crashes_seen {
                self.crashes_seen = crashes;
                self.stats.crashes += 1;
                self.conn = None;
                self.first_crash.get_or_insert_with(|| e.clone());
                r = Ok(());
            }
        }
        r
    }

    fn run_case_inner(&mut self, case: &Case) -> Result<(), String> {
        self.stats.cases += 1;
        let mut model = TxState::default();
        let mut logs: Vec<Log> = Vec::new();
        let reset: Round =
            vec![vec![M::Query("rollback")], vec![M::Query("discard all")], vec![M::Query("delete from t")]];
        for (i, r) in case.iter().chain(std::iter::once(&reset)).enumerate() {
            let is_reset = i == case.len();
            self.stats.rounds += 1;
            self.stats.client_msgs += r.iter().map(|u| u.len() as u64).sum::<u64>() + 2;
            logs.push(Log { sent: r.clone(), got: vec![], probe: vec![] });
            let log = logs.last_mut().unwrap();
            let (oid, profile) = (self.func_oid, self.profile);
            let mut probes = self.probes;
            let res = round(self.conn(), &mut model, oid, &mut probes, r, log);
            self.probes = probes;
            for m in log.got.iter().chain(&log.probe) {
                *self.stats.server_msgs.entry(m.kind as char).or_default() += 1;
            }
            let fail = |what: String, logs: &[Log]| {
                format!(
                    "profile {}, {}: {what}\n{}",
                    profile.name(),
                    if is_reset { "reset round".to_owned() } else { format!("round {} of {}", i + 1, case.len()) },
                    show(logs)
                )
            };
            match res {
                Ok(Outcome::Settled) => {}
                Ok(Outcome::Lost) => {
                    self.conn = None;
                    let msgs: Vec<M> = r.iter().flatten().cloned().chain([M::CopyFail, M::Sync]).collect();
                    if model.fatal() {
                        self.stats.fatal += 1;
                    }
                    // Since the server's last CopyInResponse: nothing, or only the error that ended the COPY.
                    let in_copy = log
                        .got
                        .iter()
                        .rposition(|m| m.kind == b'G')
                        .map(|g| log.got[g + 1..].iter().all(|m| matches!(m.kind, b'E' | b'N' | b'S')));
                    let ambiguous = profile != Profile::Strict && !is_reset && sends_into_copy(profile, &msgs);
                    let what = if !ambiguous {
                        "although the round sent nothing ambiguous into a COPY"
                    } else if model.uncertain() && in_copy != Some(true) {
                        // It must see the ambiguity when the COPY starts or when the error ends it; later, it
                        // has already misread the stream.
                        "too late: only after the COPY, not at its CopyInResponse or at the error that ended it"
                    } else if in_copy.is_none() {
                        "although the server entered no COPY in this round"
                    } else {
                        self.stats.uncertain += 1;
                        return Ok(());
                    };
                    let lost = if model.uncertain() { "the model is uncertain" } else { "FATAL from the server" };
                    return Err(fail(format!("{lost} {what}; model: {model:?}"), &logs));
                }
                Err(e) => {
                    self.conn = None;
                    return Err(fail(e, &logs));
                }
            }
        }
        if !model.idle() {
            self.conn = None;
            return Err(format!("after the reset round the model is not idle: {model:?}\n{}", show(&logs)));
        }
        Ok(())
    }
}

/// Send one round (its units, then CopyFail and Sync), read until the model settles, then probe.
fn round(
    conn: &mut Conn,
    model: &mut TxState,
    func_oid: u32,
    probes: &mut u64,
    units: &[Unit],
    log: &mut Log,
) -> Result<Outcome, String> {
    let mut out = Vec::new();
    for m in units.iter().flatten().chain(&[M::CopyFail, M::Sync]) {
        let (kind, body) = encode(m, func_oid);
        model.client(kind, body.first().copied());
        frame(&mut out, kind, &body);
    }
    conn.w.write_all(&out).map_err(|e| format!("write: {e}"))?;

    loop {
        if model.uncertain() || model.fatal() {
            return Ok(Outcome::Lost);
        }
        if model.settled() {
            break;
        }
        let m = conn.read().map_err(|e| {
            format!(
                "{e} while the model still expects a reply (outstanding {}, copy_in {}, needs_sync {}): \
                 the model expected too much; model: {model:?}",
                model.outstanding(),
                model.copy_in(),
                model.needs_sync()
            )
        })?;
        model.server(m.kind, m.first(), m.fatal());
        let kind = m.kind;
        log.got.push(m);
        if kind == b'G' && !model.copy_in() && !model.uncertain() {
            return Err(format!("the server started a COPY FROM STDIN but the model's copy_in() is false: {model:?}"));
        }
    }
    // The server's status at the end of the round: the last ReadyForQuery read (the probe confirms it).
    let round_status = model.status();
    if log.got.iter().any(|m| m.kind == b'Z') && round_status != conn.last_status {
        return Err(format!(
            "model status {} but the round's last ReadyForQuery said {}",
            round_status as char, conn.last_status as char
        ));
    }

    // The probe: a query whose reply cannot be mistaken for anything the round produced. In an aborted
    // transaction only a syntax error leaves the state as it is (it fails before the aborted check).
    *probes += 1;
    let token = format!("probe_{probes}");
    let aborted = conn.last_status == b'E';
    let sql = if aborted { format!("{token} oops") } else { format!("select '{token}'") };
    let mut out = Vec::new();
    frame(&mut out, b'Q', format!("{sql}\0").as_bytes());
    model.client(b'Q', Some(sql.as_bytes()[0]));
    conn.w.write_all(&out).map_err(|e| format!("write: {e}"))?;
    let expect: &[u8] = if aborted { b"EZ" } else { b"TDCZ" };
    let mut at = 0;
    while at < expect.len() {
        let m = conn.read().map_err(|e| format!("probe {sql:?}: {e}; model: {model:?}"))?;
        model.server(m.kind, m.first(), m.fatal());
        let kind = m.kind;
        let ok = match kind {
            b'N' | b'S' | b'A' => {
                log.probe.push(m);
                continue;
            }
            b'E' => {
                kind == expect[at] && {
                    let (_, code, text) = m.fields();
                    code == "42601" && text.contains(&token)
                }
            }
            b'D' => kind == expect[at] && m.first_value().as_deref() == Some(token.as_str()),
            _ => kind == expect[at],
        };
        log.probe.push(m);
        if !ok {
            return Err(format!(
                "probe {sql:?}: expected {:?} next, got {:?}: a leftover of the round, the model settled too \
                 early; model: {model:?}",
                expect[at] as char,
                log.probe.last().unwrap()
            ));
        }
        at += 1;
    }
    let status = conn.last_status;
    if model.status() != status
        || round_status != status
        || model.idle() != (status == b'I')
        || !model.settled()
        || model.outstanding() != 0
        || model.copy_in()
        || model.needs_sync()
    {
        return Err(format!(
            "after the probe the server says {}, the model: status {} (end of round {}), idle {}, settled {}, \
             outstanding {}, copy_in {}, needs_sync {}; {model:?}",
            status as char,
            model.status() as char,
            round_status as char,
            model.idle(),
            model.settled(),
            model.outstanding(),
            model.copy_in(),
            model.needs_sync()
        ));
    }
    Ok(Outcome::Settled)
}

fn show(logs: &[Log]) -> String {
    let mut s = String::new();
    for (i, l) in logs.iter().enumerate() {
        let units: Vec<String> = l.sent.iter().map(|u| format!("{u:?}")).collect();
        s += &format!("  round {}: {} + [f, S]\n", i + 1, units.join(" "));
        s += &format!("    server: {:?}\n", l.got);
        if !l.probe.is_empty() {
            s += &format!("    probe:  {:?}\n", l.probe);
        }
    }
    s
}

fn show_case(c: &Case) -> String {
    c.iter()
        .enumerate()
        .map(|(i, r)| {
            format!("  round {}: {} + [f, S]", i + 1, r.iter().map(|u| format!("{u:?}")).collect::<Vec<_>>().join(" "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The kind of a disagreement, so that minimizing keeps to the same one.
fn category(why: &str) -> &'static str {
    const KINDS: &[&str] = &[
        "settled too early",
        "expected too much",
        "uncertain although",
        "uncertain too late",
        "FATAL from the server",
        "after the probe",
        "copy_in() is false",
        "the round's last ReadyForQuery",
        "not idle",
    ];
    KINDS.iter().find(|k| why.contains(*k)).copied().unwrap_or("other")
}

/// Greedy minimization below proptest's shrinking: drop whole rounds, then units, then single messages,
/// as long as the case still fails with the same kind of disagreement. Returns the smallest case and why.
fn minimize(h: &mut Harness, mut case: Case, mut why: String) -> (Case, String) {
    let kind = category(&why);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut changed = true;
    while changed && Instant::now() < deadline {
        changed = false;
        let mut candidates: Vec<Case> = Vec::new();
        for i in 0..case.len() {
            if case.len() > 1 {
                let mut c = case.clone();
                c.remove(i);
                candidates.push(c);
            }
            for j in 0..case[i].len() {
                let mut c = case.clone();
                c[i].remove(j);
                candidates.push(c);
                for k in 0..case[i][j].len() {
                    let mut c = case.clone();
                    c[i][j].remove(k);
                    c[i].retain(|u| !u.is_empty());
                    candidates.push(c);
                }
            }
        }
        for c in candidates {
            if Instant::now() > deadline {
                break;
            }
            match h.run_case(&c) {
                Err(e) if category(&e) == kind => {
                    (case, why, changed) = (c, e, true);
                    break;
                }
                _ => {}
            }
        }
    }
    (case, why)
}

/// A SCRAM-SHA-256 secret for `password` with ONE iteration: logins then cost microseconds instead of 4096
/// HMAC rounds in an unoptimized test build (the test opens a fresh connection after every uncertain case).
fn scram_secret_1_iteration(password: &str) -> String {
    use base64::Engine;
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};
    let hmac = |key: &[u8], data: &[u8]| {
        let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
        m.update(data);
        m.finalize().into_bytes().to_vec()
    };
    let salt = *b"txstate-diff-slt";
    let salted = hmac(password.as_bytes(), &[&salt[..], &1u32.to_be_bytes()].concat());
    let stored = Sha256::digest(hmac(&salted, b"Client Key"));
    let server = hmac(&salted, b"Server Key");
    let b64 = base64::engine::general_purpose::STANDARD;
    format!("SCRAM-SHA-256$1:{}${}:{}", b64.encode(salt), b64.encode(stored), b64.encode(server))
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

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
