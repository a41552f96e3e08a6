//! Getting a server for one client: admission, an immediate try, then a queued wait (arrival order, bounded by
//! `checkout_timeout`) that watches the client — a disconnect or CancelRequest leaves the queue at once — and
//! tells it after `notice_after` how many clients are ahead. Every checkout counts exactly one decision.
//! Checkout does no client I/O of its own: the client side is a [`Watch`] the caller provides.

use crate::budget::admission::Hold;
use crate::budget::cancel::ClientKey;
use crate::budget::pool::{PooledConn, ServicePool};
use crate::config::resolve::ServiceBudget;
use crate::error::{ProxyError, Refusal};
use crate::telemetry::labels::Decision;
use crate::telemetry::{tables, Telemetry, Value};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How long a paused pool holds a checkout beyond its `checkout_timeout` (a Postgres restart fits well within).
const PAUSE_WAIT: Duration = Duration::from_secs(60);
/// A queued checkout blocked by the upstream ceiling tries again at least this often.
const CEILING_RECHECK: Duration = Duration::from_millis(100);

/// The client while it waits, provided by the client's side of the proxy.
pub trait Watch {
    /// Resolves once the client has gone (closed or failed); what it sends meanwhile is kept for later.
    fn gone(&mut self) -> impl Future<Output = ()>;
    /// Tell the waiting client something (a NOTICE).
    fn notice(&mut self, text: &str) -> impl Future<Output = Result<(), ProxyError>>;
}

/// The client side of a checkout.
pub struct Waiter<'a, W> {
    pub client: &'a mut W,
    pub key: &'a ClientKey,
    pub exempt: bool,
    /// Whether a NOTICE may be sent now (not before the client's login completed).
    pub may_notice: bool,
    /// The client's home server (transaction mode), taken when it is idle.
    pub home: Option<i32>,
    pub who: Who<'a>,
    /// A checkout that queued in the relay loop continues here: admitted already, waiting since then.
    pub resumed: Option<crate::budget::queued::Resumed>,
}

/// The client, for `admission_decisions` rows.
pub struct Who<'a> {
    pub user: &'a str,
    pub database: &'a str,
    pub addr: SocketAddr,
    pub telemetry: &'a Telemetry,
}

/// Count a decision and, unless it is the common "admitted at once", write it to the lake. Every checkout that
/// completes here also feeds the pool's high-water marks (servers in use, clients waiting, the wait).
pub(super) fn decide(pool: &ServicePool, who: &Who<'_>, d: Decision, waited: Duration) {
    let hw = &pool.metrics.high_water;
    let st = pool.status();
    hw.servers_in_use(st.size.saturating_sub(st.available) as u32);
    hw.clients_waiting(st.waiting as u32);
    decide_handed(pool, who, d, waited);
}

/// [`decide`] for a checkout that took a server handed over from another client: no peak to sample (the
/// server went from one client to the next without being idle, and this client stopped waiting).
pub(super) fn decide_handed(pool: &ServicePool, who: &Who<'_>, d: Decision, waited: Duration) {
    pool.admission.record(d);
    if !waited.is_zero() {
        pool.metrics.high_water.checkout_waited(waited);
    }
    if d != Decision::Admitted {
        lake_row(pool, who, d, waited);
    }
}

fn lake_row(pool: &ServicePool, who: &Who<'_>, d: Decision, waited: Duration) {
    let accepted = matches!(d, Decision::Queued | Decision::Exempt);
    who.telemetry.emit(tables::ADMISSION_DECISIONS, || {
        vec![
            Value::now(),
            pool.budget().name.as_str().into(),
            pool.route.as_str().into(),
            who.user.into(),
            who.database.into(),
            who.addr.to_string().into(),
            accepted.into(),
            d.as_str().into(),
            (waited.as_secs_f64() * 1000.0).into(),
        ]
    });
}

/// What a queued client is told after `notice_after`: where it stands.
pub(super) fn queue_notice(pool: &ServicePool, ahead: usize) -> String {
    let b = pool.budget();
    format!(
        "pgbudget: queued for a server connection of service \"{}\" ({ahead} ahead; share {}, waiting up to {} ms)",
        b.name,
        pool.share(),
        b.settings.checkout_timeout.as_millis()
    )
}

/// The common checkout, without an await: a parked server ready without a round trip, then admission (its
/// refusal is the same error [`acquire`] gives). `None`: nothing is parked (or the pool is paused, or a
/// liveness ping is due): take [`acquire`]'s path.
pub fn acquire_now(
    pool: &ServicePool,
    exempt: bool,
    home: Option<i32>,
    who: &Who<'_>,
    now: Instant,
    b: &ServiceBudget,
) -> Option<Result<(PooledConn, Hold), ProxyError>> {
    if pool.control.is_paused() {
        return None;
    }
    let conn = pool.take_parked_now(home, now, b)?;
    match pool.admission.admit(exempt, &b.name) {
        Ok(hold) => {
            let served = if hold.above_line { Decision::Exempt } else { Decision::Admitted };
            decide(pool, who, served, Duration::ZERO);
            pool.stamp_use_at(now);
            Some(Ok((conn, hold)))
        }
        Err(refusal) => {
            pool.put_back(conn);
            Some(Err(shed(pool, who, &b.name, refusal)))
        }
    }
}

/// The error of a refused admission (counted by `admit`), with its lake row.
pub(super) fn shed(pool: &ServicePool, who: &Who<'_>, service: &str, refusal: Refusal) -> ProxyError {
    let d = match refusal {
        Refusal::Hard { .. } => Decision::RejectedHard,
        Refusal::QueueFull { .. } => Decision::RejectedQueueFull,
    };
    lake_row(pool, who, d, Duration::ZERO);
    ProxyError::Shed { service: service.to_owned(), share: pool.share(), refusal }
}

/// Admit, then take a server now or wait for one in the pool's queue.
pub async fn acquire<W: Watch>(pool: &ServicePool, mut w: Waiter<'_, W>) -> Result<(PooledConn, Hold), ProxyError> {
    let b = pool.budget();
    let adm = &pool.admission;
    let resumed = w.resumed.is_some();
    let (hold, started, noticed) = match w.resumed.take() {
        Some(r) => (r.hold, r.started, r.noticed),
        None => {
            if pool.control.is_paused() {
                wait_resumed(pool, &mut w).await?;
            }
            let hold = adm.admit(w.exempt, &b.name).map_err(|refusal| shed(pool, &w.who, &b.name, refusal))?;
            (hold, Instant::now(), false)
        }
    };
    let queued = if hold.above_line { Decision::Exempt } else { Decision::Queued };
    if let Some(c) = pool.checkout_now(w.home).await? {
        let served = match (resumed, hold.above_line) {
            (true, _) => queued,
            (false, true) => Decision::Exempt,
            (false, false) => Decision::Admitted,
        };
        let waited = if resumed { started.elapsed() } else { Duration::ZERO };
        decide(pool, &w.who, served, waited);
        return Ok((c, hold));
    }

    let ticket = adm.enqueue();
    // This client joins the queue (the pool counts it once its wait starts).
    pool.metrics.high_water.clients_waiting(pool.status().waiting as u32 + 1);
    let wake = Arc::new(Notify::new());
    let _queued = w.key.mark_queued(crate::budget::cancel::QueuedWake::Notify(wake.clone()));
    let s = &b.settings;
    let get = checkout_by(pool, started + s.checkout_timeout, w.home);
    tokio::pin!(get);
    let notice = tokio::time::sleep_until((started + s.notice_after).into());
    tokio::pin!(notice);
    let mut noticed = noticed || !w.may_notice || s.notice_after.is_zero();
    loop {
        tokio::select! {
            r = &mut get => {
                return match r {
                    Ok(c) => {
                        decide(pool, &w.who, queued, started.elapsed());
                        Ok((c, hold))
                    }
                    Err(ProxyError::BudgetExhausted { service, share, .. }) => {
                        decide(pool, &w.who, Decision::TimedOut, started.elapsed());
                        Err(ProxyError::BudgetExhausted { service, share, waited: started.elapsed() })
                    }
                    Err(ProxyError::CeilingReached { upstream, ceiling, service, holding, share, .. }) => {
                        decide(pool, &w.who, Decision::TimedOut, started.elapsed());
                        let waited = started.elapsed();
                        Err(ProxyError::CeilingReached { upstream, ceiling, service, holding, share, waited })
                    }
                    Err(e) => Err(e),
                };
            }
            _ = &mut notice, if !noticed => {
                noticed = true;
                let msg = queue_notice(pool, adm.ahead(&ticket));
                Box::pin(w.client.notice(&msg)).await?; // rare: boxed, out of every wait's future
            }
            _ = wake.notified() => {
                decide(pool, &w.who, Decision::Abandoned, started.elapsed());
                return Err(ProxyError::QueuedCancel);
            }
            () = w.client.gone() => {
                decide(pool, &w.who, Decision::Abandoned, started.elapsed());
                return Err(ProxyError::ClientIo(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
}

/// Check out a server by `deadline`. An upstream at its ceiling is waited out as well (another service's
/// connection may close meanwhile); at the deadline the last failure is reported: the pool's own wait
/// (`BudgetExhausted`) or the ceiling (`CeilingReached`).
async fn checkout_by(pool: &ServicePool, deadline: Instant, home: Option<i32>) -> Result<PooledConn, ProxyError> {
    loop {
        let r = pool.checkout_near(deadline.saturating_duration_since(Instant::now()), home).await;
        let left = deadline.saturating_duration_since(Instant::now());
        match r {
            Err(ProxyError::CeilingReached { ref upstream, .. }) if !left.is_zero() => {
                pool.ceiling_freed(upstream, left.min(CEILING_RECHECK)).await
            }
            r => return r,
        }
    }
}

/// Hold a checkout while an operator has the pool paused, up to `checkout_timeout` plus [`PAUSE_WAIT`].
async fn wait_resumed<W: Watch>(pool: &ServicePool, w: &mut Waiter<'_, W>) -> Result<(), ProxyError> {
    let started = Instant::now();
    let b = pool.budget();
    let limit = b.settings.checkout_timeout + PAUSE_WAIT;
    let mut rx = pool.control.subscribe();
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    while *rx.borrow_and_update() {
        tokio::select! {
            r = rx.changed() => if r.is_err() { break },
            _ = &mut deadline => return Err(ProxyError::Paused { service: b.name.clone(), waited: started.elapsed() }),
            () = w.client.gone() => {
                decide(pool, &w.who, Decision::Abandoned, started.elapsed());
                return Err(ProxyError::ClientIo(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::pool::Route;
    use crate::config::resolve::Resolved;
    use crate::config::{Config, Env};
    use crate::context::App;

    /// One service (share 3) on an upstream with a ceiling of 10 that nothing listens on.
    fn app() -> Arc<App> {
        let text = "[proxy]\nservice = \"web\"\n\
                    [upstreams.primary]\nurl = \"postgres://u:p@127.0.0.1:1/db\"\nceiling = 10\n\
                    [services.web]\nslice = 3\n";
        let env = Env::default();
        App::new(Resolved::resolve(Config::parse(text).unwrap(), &env).unwrap(), &env)
    }

    /// Take every connection slot under the upstream's ceiling (as other services' connections would).
    fn fill_ceiling(app: &App) -> tokio::sync::OwnedSemaphorePermit {
        let up = app.pools().upstreams["primary"].clone();
        let n = up.permits.available_permits() as u32;
        up.permits.clone().try_acquire_many_owned(n).unwrap()
    }

    #[tokio::test]
    async fn a_full_ceiling_is_its_own_error_not_the_service_budget() {
        let app = app();
        let pool = app.pools().get("web", Route::ReadWrite).unwrap().clone();
        let _others = fill_ceiling(&app);
        match pool.checkout_within(Duration::ZERO).await {
            Err(ProxyError::CeilingReached { upstream, ceiling, service, holding, share, .. }) => {
                assert_eq!((upstream.as_str(), ceiling, service.as_str(), holding, share), ("primary", 10, "web", 0, 3))
            }
            other => panic!("expected CeilingReached, got {:?}", other.map(|_| ())),
        }
    }

    #[tokio::test]
    async fn a_queued_checkout_waits_out_the_ceiling_until_its_deadline() {
        let app = app();
        let pool = app.pools().get("web", Route::ReadWrite).unwrap().clone();
        let others = fill_ceiling(&app);
        let t = Instant::now();
        let r = checkout_by(&pool, t + Duration::from_millis(300), None).await;
        assert!(matches!(r, Err(ProxyError::CeilingReached { .. })), "{:?}", r.map(|_| ()));
        assert!(t.elapsed() >= Duration::from_millis(300), "gave up early: {:?}", t.elapsed());

        // A slot freed during the wait is tried at once (here the connect itself then fails: nothing listens).
        let t = Instant::now();
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(others);
        });
        let r = checkout_by(&pool, t + Duration::from_secs(5), None).await;
        assert!(matches!(r, Err(ProxyError::Upstream { .. })), "{:?}", r.map(|_| ()));
        assert!(t.elapsed() < Duration::from_secs(2), "the freed slot was not noticed: {:?}", t.elapsed());
        release.await.unwrap();
    }

    struct Quiet;
    impl Watch for Quiet {
        async fn gone(&mut self) {
            std::future::pending().await
        }
        async fn notice(&mut self, _: &str) -> Result<(), ProxyError> {
            Ok(())
        }
    }

    /// A queued checkout's future is built (and boxed by the relay) on every wait: state only rare paths
    /// need (opening a server, a liveness ping) is boxed where it is used, so the common wait stays small.
    #[tokio::test]
    async fn a_queued_checkout_carries_no_login_or_ping_state() {
        let app = app();
        let pool = app.pools().get("web", Route::ReadWrite).unwrap().clone();
        let key = app.cancels.issue();
        let mut client = Quiet;
        let who = Who { user: "u", database: "d", addr: "127.0.0.1:1".parse().unwrap(), telemetry: &app.telemetry };
        let waiter =
            Waiter { client: &mut client, key: &key, exempt: false, may_notice: true, home: None, who, resumed: None };
        let acquire = std::mem::size_of_val(&acquire(&pool, waiter));
        let near = std::mem::size_of_val(&pool.checkout_near(Duration::ZERO, None));
        // Before the boxing: 10,944 and 4,704 bytes (debug build); after it about 4,200 and 1,200.
        assert!(acquire <= 4608, "acquire's future is {acquire} bytes");
        assert!(near <= 1536, "checkout_near's future is {near} bytes");
    }
}
