//! Running one case against the model and the server, the failure report and the shrinker.

use super::*;

// ---------------------------------------------------------------------------------------------------------
// Running cases

#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) cases: u64,
    pub(crate) rounds: u64,
    pub(crate) client_msgs: u64,
    pub(crate) server_msgs: BTreeMap<char, u64>,
    pub(crate) uncertain: u64,
    pub(crate) fatal: u64,
    pub(crate) reconnects: u64,
    /// Backend crashes (segfaults) of Postgres itself; the case is void.
    pub(crate) crashes: u64,
}

pub(crate) struct Harness {
    pub(crate) port: u16,
    pub(crate) log_path: std::path::PathBuf,
    /// Backend crashes already in the Postgres log.
    pub(crate) crashes_seen: usize,
    /// The transcript of the first case that crashed a backend.
    pub(crate) first_crash: Option<String>,
    pub(crate) func_oid: u32,
    pub(crate) profile: Profile,
    pub(crate) conn: Option<Conn>,
    pub(crate) probes: u64,
    pub(crate) stats: Stats,
}

/// One round as sent and received, for the failure report.
pub(crate) struct Log {
    pub(crate) sent: Vec<Unit>,
    pub(crate) got: Vec<Srv>,
    pub(crate) probe: Vec<Srv>,
}

pub(crate) enum Outcome {
    Settled,
    /// The model said uncertain (or saw a FATAL): the connection is no longer usable for the test.
    Lost,
}

impl Harness {
    pub(crate) fn conn(&mut self) -> &mut Conn {
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

    pub(crate) fn run_case(&mut self, case: &Case) -> Result<(), String> {
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

    pub(crate) fn run_case_inner(&mut self, case: &Case) -> Result<(), String> {
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
pub(crate) fn round(
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

pub(crate) fn show(logs: &[Log]) -> String {
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

pub(crate) fn show_case(c: &Case) -> String {
    c.iter()
        .enumerate()
        .map(|(i, r)| {
            format!("  round {}: {} + [f, S]", i + 1, r.iter().map(|u| format!("{u:?}")).collect::<Vec<_>>().join(" "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The kind of a disagreement, so that minimizing keeps to the same one.
pub(crate) fn category(why: &str) -> &'static str {
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
pub(crate) fn minimize(h: &mut Harness, mut case: Case, mut why: String) -> (Case, String) {
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
pub(crate) fn scram_secret_1_iteration(password: &str) -> String {
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

pub(crate) fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}
