//! Running a case direct and through the proxy, the comparison, the report and the minimizer.

use super::*;

#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) cases: u64,
    /// Rounds run (each twice: direct and through the proxy).
    pub(crate) rounds: u64,
    /// Rounds left out because the proxy would have made them wait (see [`admitted`]).
    pub(crate) skipped: u64,
    pub(crate) client_msgs: u64,
    pub(crate) server_msgs: BTreeMap<char, u64>,
}

/// One round as run: its place in the case, the exact bytes sent and the direct transcript.
pub(crate) struct Step {
    pub(crate) index: usize,
    pub(crate) client: usize,
    pub(crate) round: Round,
    pub(crate) bytes: Vec<u8>,
    pub(crate) direct: Vec<String>,
}

pub(crate) struct Harness<'a> {
    pub(crate) pg: &'a Pg,
    pub(crate) share: usize,
    pub(crate) proxy: Proxy,
    pub(crate) stats: Stats,
    /// Whether rounds are rewritten to keep clear of known bugs (`model::exclude_now`); not in `repro.rs`.
    pub(crate) exclude: bool,
}

/// The proxy's service config: transaction mode, at most 2 statements per server (evictions and
/// re-prepares), SQL PREPARE served pinned.
pub(crate) const SVC: &str = "pool_mode = \"transaction\"\nmax_prepared_statements = 2\npin = \"allow\"\n";

/// pgbudget as `fidelity::start` starts it, with a `checkout_timeout` of 1 s: a client the proxy makes wait
/// (a difference already) gets its 53300 well within [`DEADLINE`].
pub(crate) fn start_proxy(pg: &Pg, share: usize) -> Proxy {
    let services = format!("[services.app]\nslice = {share}\ncheckout_timeout = \"1s\"\n{SVC}");
    let cfg = config(pg, &services).replace(LABEL, "");
    Proxy::start(&cfg.replace("[proxy]\n", "[proxy]\nslice_floor = 1\n"))
}

/// Whether client `c` may run round `r` now. Direct connections never wait for each other, the proxy's
/// clients do: a round of a client that holds no server while `share` other clients hold one (inside a
/// transaction block, or pinned) would wait for a server until `checkout_timeout` — the share is the
/// proxy's promise, not a difference — so such a round is left out of both runs.
pub(crate) fn admitted(clients: &[Client], c: usize, share: usize) -> bool {
    clients.iter().enumerate().filter(|(i, k)| *i != c && k.holds()).count() < share
}

async fn terminate(clients: Vec<Client>) {
    for c in clients {
        if let Some(mut raw) = c.conn {
            let _ = raw.s.write_all(&raw::msg(b'X', b"")).await;
        }
    }
}

impl Harness<'_> {
    /// Run `case` direct (choosing the admitted rounds), then the same bytes through the proxy; the steps
    /// with both transcripts.
    pub(crate) async fn run(&mut self, case: &Case) -> (Vec<Step>, Vec<Vec<String>>) {
        self.stats.cases += 1;
        let mut clients = Vec::new();
        for _ in 0..case.clients {
            clients.push(Client::login(self.pg.port).await);
        }
        let mut steps = Vec::new();
        for (index, (c, r)) in case.steps.iter().enumerate() {
            if !admitted(&clients, *c, self.share) {
                self.stats.skipped += 1;
                continue;
            }
            let r = &if self.exclude { model::exclude_now(r, &clients[*c]) } else { r.clone() };
            let bytes = gen::encode(r, &clients[*c].stmts);
            let direct = clients[*c].round(&bytes, &mut self.stats).await;
            model::update(&mut clients[*c], r, &direct);
            self.stats.rounds += 1;
            self.stats.client_msgs += 2 * gen::msg_count(r);
            steps.push(Step { index, client: *c, round: r.clone(), bytes, direct });
        }
        terminate(clients).await;

        let mut clients = Vec::new();
        for _ in 0..case.clients {
            clients.push(Client::login(self.proxy.port).await);
        }
        // Up to the first difference: what follows it is of no interest and may wait out deadlines (the
        // hand-written reproducers run to the end).
        let mut proxied = Vec::new();
        for s in &steps {
            let t = clients[s.client].round(&s.bytes, &mut self.stats).await;
            let differs = t != s.direct;
            proxied.push(t);
            if differs && self.exclude {
                break;
            }
        }
        terminate(clients).await;
        (steps, proxied)
    }

    /// Run `case`; on a difference, the report (Err) with the kind of the first difference.
    pub(crate) async fn check(&mut self, case: &Case) -> Result<(), (String, String)> {
        let (steps, proxied) = self.run(case).await;
        let Some(at) = steps.iter().zip(&proxied).position(|(s, p)| s.direct != *p) else {
            return Ok(());
        };
        let (d, p) = (&steps[at].direct, &proxied[at]);
        let line = (0..d.len().max(p.len())).find(|i| d.get(*i) != p.get(*i)).unwrap();
        let short = |l: Option<&String>| {
            l.map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" ")).unwrap_or_else(|| "(nothing)".into())
        };
        let kind = format!("direct {} / proxy {}", short(d.get(line)), short(p.get(line)));
        Err((kind, report(self.share, case, &steps, &proxied, at)))
    }
}

/// The schedule as run, with both transcripts of each step, the first difference marked.
pub(crate) fn report(share: usize, case: &Case, steps: &[Step], proxied: &[Vec<String>], first: usize) -> String {
    let mut s =
        format!("share {share}, {} clients; {} of {} rounds admitted\n", case.clients, steps.len(), case.steps.len());
    if steps.len() > proxied.len() {
        s += &format!("  (the last {} admitted rounds were not run through the proxy)\n", steps.len() - proxied.len());
    }
    for (i, (st, p)) in steps.iter().zip(proxied).enumerate() {
        let mark = if i == first {
            "   <== first difference"
        } else if st.direct != *p {
            "   <== differs"
        } else {
            ""
        };
        s += &format!("  step {:>2} client {}: {:?}{mark}\n", st.index, st.client, st.round);
        s += &format!("      direct: {:?}\n", st.direct);
        if st.direct != *p {
            s += &format!("      proxy:  {p:?}\n");
        }
    }
    s
}

/// Greedy minimization below proptest's shrinking, each candidate on a fresh proxy (so the pool's history
/// of earlier cases plays no part): drop whole steps, then single messages, while the case still fails
/// with the same kind of first difference. Returns the smallest case and its report.
pub(crate) async fn minimize(h: &mut Harness<'_>, mut case: Case, kind: String) -> (Case, Option<String>) {
    let deadline = Instant::now() + Duration::from_secs(40);
    h.proxy = start_proxy(h.pg, h.share);
    let mut why = match h.check(&case).await {
        Err((k, why)) if k == kind => Some(why),
        _ => None,
    };
    let mut changed = why.is_some();
    while changed && Instant::now() < deadline {
        changed = false;
        let mut candidates = Vec::new();
        for i in 0..case.steps.len() {
            if case.steps.len() > 1 {
                let mut c = case.clone();
                c.steps.remove(i);
                candidates.push(c);
            }
            if let Round::Ext(ms) = &case.steps[i].1 {
                for j in 0..ms.len() {
                    let mut c = case.clone();
                    if let Round::Ext(ms) = &mut c.steps[i].1 {
                        ms.remove(j);
                    }
                    candidates.push(c);
                }
            }
        }
        if case.clients == 3 && case.steps.iter().all(|(c, _)| *c < 2) {
            candidates.push(Case { clients: 2, steps: case.steps.clone() });
        }
        for c in candidates {
            if Instant::now() > deadline {
                break;
            }
            h.proxy = start_proxy(h.pg, h.share);
            if let Err((k, w)) = h.check(&c).await {
                if k == kind {
                    (case, why, changed) = (c, Some(w), true);
                    break;
                }
            }
        }
    }
    (case, why)
}

pub(crate) fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}
