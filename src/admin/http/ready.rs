//! `/ready` from a cached probe: each upstream is checked at most once per `admin.ready_interval`, concurrent
//! requests share the check in flight, and a check never takes a client's slot or queues behind clients.
//!
//! A check runs `SELECT 1` within [`READY_TIMEOUT`] on the first of: an idle connection of one of the
//! upstream's read-write pools (taken only when one is idle, never waited for); the probe's own connection
//! from an earlier check; a new one. The probe holds at most one connection per upstream: with
//! `reserved >= 1` it counts inside `reserved` and is kept for the next check (closed when no check has used
//! it for two intervals), and if the server closes it (Postgres stopped or restarted) a cached "ready" is
//! stale at once; with `reserved = 0` it takes a ceiling slot like any other and is closed after the check
//! (a full ceiling counts as ready: every slot is in use, so the upstream answers).

use crate::budget::pool::Route;
use crate::context::App;
use crate::error::ProxyError;
use crate::server::{ServerConn, ServerError};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Semaphore;

/// Deadline of one check: connecting (when it must) and `SELECT 1` together.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);
/// A request waits for the check in flight at most this much longer than the check may take.
const LOCK_SLACK: Duration = Duration::from_millis(500);

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
enum CheckError {
    #[error("no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Pool(#[from] ProxyError),
    #[error("the readiness check in flight ran past its deadline")]
    Stuck,
    /// Cannot happen: a check runs alone per upstream and has dropped the probe's previous connection.
    #[error("the readiness probe's connection slot is taken")]
    SlotTaken,
    #[error("the readiness check failed: {0}")]
    Task(String),
}

/// One upstream's latest check.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub checked_at: SystemTime,
    /// `Err(why)` when the upstream did not answer.
    pub result: Result<(), String>,
    /// What the check ran on (`pool:<service>/rw`, `health connection`, `ceiling full`).
    pub via: String,
    /// The first of the failing checks in a row (`None` while it answers).
    pub since: Option<SystemTime>,
    finished: Instant,
}

impl Outcome {
    fn failed(e: CheckError) -> Outcome {
        let now = SystemTime::now();
        let (result, via) = (Err(e.to_string()), "none".to_owned());
        Outcome { checked_at: now, result, via, since: Some(now), finished: Instant::now() }
    }
}

#[derive(Default)]
struct State {
    last: Option<Outcome>,
    /// The probe's own connection, kept for the next check (see `close_later`).
    conn: Option<ServerConn>,
}

/// One upstream's probe: its latest outcome, and the lock a check holds while it runs.
struct Probe {
    state: Arc<tokio::sync::Mutex<State>>,
    /// The one connection the probe may open inside the upstream's `reserved`.
    slot: Arc<Semaphore>,
}

/// The readiness probes of the admin listener, one per upstream (made on first use).
#[derive(Default)]
pub struct Readiness {
    probes: Mutex<HashMap<String, Arc<Probe>>>,
}

impl Readiness {
    fn probe(&self, upstream: &str) -> Arc<Probe> {
        let mut probes = self.probes.lock().unwrap_or_else(|e| e.into_inner());
        let make = || Arc::new(Probe { state: Default::default(), slot: Arc::new(Semaphore::new(1)) });
        probes.entry(upstream.to_owned()).or_insert_with(make).clone()
    }

    /// Every upstream's outcome, checking (concurrently) those whose result is stale. Each check runs in its
    /// own task, so a client that hangs up does not cancel the check the other requests are waiting for.
    pub async fn outcomes(&self, app: &Arc<App>) -> Vec<(String, Outcome)> {
        let names: Vec<String> = app.pools().upstreams.keys().cloned().collect();
        let running: Vec<_> = names
            .into_iter()
            .map(|name| {
                let (app, probe, n) = (app.clone(), self.probe(&name), name.clone());
                (name, tokio::spawn(async move { probe.answer(&app, &n).await }))
            })
            .collect();
        let mut out = Vec::with_capacity(running.len());
        for (name, task) in running {
            out.push((name, task.await.unwrap_or_else(|e| Outcome::failed(CheckError::Task(e.to_string())))));
        }
        out
    }
}

impl Probe {
    /// The cached outcome while it is fresh or was made while this request waited; otherwise a new check.
    async fn answer(&self, app: &Arc<App>, upstream: &str) -> Outcome {
        let arrived = Instant::now();
        let interval = app.resolved().config.admin.ready_interval;
        let Ok(mut st) = tokio::time::timeout(READY_TIMEOUT + LOCK_SLACK, self.state.clone().lock_owned()).await else {
            return Outcome::failed(CheckError::Stuck);
        };
        if let Some(last) = &st.last {
            let shared = last.finished >= arrived;
            let fresh = last.finished.elapsed() < interval && st.conn.as_ref().is_none_or(|c| c.peek_alive());
            if shared || fresh {
                return last.clone();
            }
        }
        let mut via = String::from("none");
        let kept = st.conn.take();
        let checked = tokio::time::timeout(READY_TIMEOUT, self.check(app, upstream, kept, &mut via)).await;
        let result = checked.unwrap_or(Err(CheckError::Timeout(READY_TIMEOUT)));
        let now = SystemTime::now();
        let since = match (&result, st.last.as_ref().and_then(|l| l.since)) {
            (Ok(_), _) => None,
            (Err(_), Some(since)) => Some(since),
            (Err(_), None) => Some(now),
        };
        let outcome = Outcome {
            checked_at: now,
            result: result.as_ref().map(|_| ()).map_err(|e| e.to_string()),
            via,
            since,
            finished: Instant::now(),
        };
        st.last = Some(outcome.clone());
        st.conn = match result {
            Ok(Some(conn)) if !interval.is_zero() && !app.shutdown.is_cancelled() => {
                self.close_later(app, outcome.finished, interval);
                Some(conn)
            }
            _ => None,
        };
        outcome
    }

    /// `SELECT 1` on the upstream; `Ok(Some(conn))` hands back the probe's own connection for keeping.
    async fn check(
        &self,
        app: &App,
        upstream: &str,
        kept: Option<ServerConn>,
        via: &mut String,
    ) -> Result<Option<ServerConn>, CheckError> {
        let pools = app.pools();
        for p in pools.all() {
            let m = p.pool.manager();
            let idle = p.status().available > 0;
            if p.route != Route::ReadWrite || m.upstream.target.name != upstream || p.control.is_paused() || !idle {
                continue;
            }
            *via = format!("pool:{}/{}", p.budget().name, p.route.as_str());
            match p.checkout_within(Duration::ZERO).await {
                Ok(mut conn) => {
                    // An idle pool connection serves: the probe's own one is not needed.
                    drop(kept);
                    conn.simple("SELECT 1", READY_TIMEOUT).await?;
                    return Ok(None);
                }
                Err(e @ ProxyError::Upstream { .. }) => return Err(e.into()),
                // Taken by a client meanwhile: try the next pool, then the probe's own connection.
                Err(_) => continue,
            }
        }
        *via = "health connection".into();
        if let Some(mut conn) = kept.filter(|c| c.peek_alive()) {
            conn.simple("SELECT 1", READY_TIMEOUT).await?;
            return Ok(Some(conn));
        }
        let up = pools
            .upstreams
            .get(upstream)
            .cloned()
            .ok_or_else(|| CheckError::Task(format!("no upstream {upstream}")))?;
        let inside_reserved = up.target.reserved >= 1;
        let slots = if inside_reserved { &self.slot } else { &up.permits };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            if inside_reserved {
                return Err(CheckError::SlotTaken);
            }
            // Under the ceiling, every slot is in use: the upstream is answering (saturated, not down).
            *via = "ceiling full".into();
            return Ok(None);
        };
        let label = format!("{}:health", app.resolved().config.proxy.application_name_prefix);
        let mut conn = ServerConn::connect(&up.target, &label, READY_TIMEOUT, permit).await?;
        conn.simple("SELECT 1", READY_TIMEOUT).await?;
        Ok(inside_reserved.then_some(conn))
    }

    /// Close the kept connection when no check has taken it over within two intervals of this one (a request
    /// in the interval after the result went stale reuses it), or at shutdown.
    fn close_later(&self, app: &Arc<App>, finished: Instant, interval: Duration) {
        let (state, shutdown) = (self.state.clone(), app.shutdown.clone());
        app.tasks.spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(interval.saturating_mul(2)) => {}
            }
            if let Ok(mut st) = tokio::time::timeout(READY_TIMEOUT + LOCK_SLACK, state.lock()).await {
                if shutdown.is_cancelled() || st.last.as_ref().is_some_and(|l| l.finished == finished) {
                    st.conn = None;
                }
            }
        });
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime_serde::re::humantime::format_rfc3339_millis(t).to_string()
}

/// `GET /ready`: 200 with each upstream's `checked_at`, or 503 naming what fails and since when.
pub async fn handler(app: Arc<App>, readiness: Arc<Readiness>) -> Response {
    let not_ready = |failing: Map<String, Value>, upstreams: Map<String, Value>| {
        let body = json!({ "status": "not ready", "failing": failing, "upstreams": upstreams });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    };
    let shutting_down = || Map::from_iter([("proxy".to_owned(), json!("shutting down"))]);
    if app.shutdown.is_cancelled() {
        return not_ready(shutting_down(), Map::new());
    }
    let (mut failing, mut upstreams) = (Map::new(), Map::new());
    for (name, o) in readiness.outcomes(&app).await {
        let checked_at = rfc3339(o.checked_at);
        match o.result {
            Ok(()) => upstreams.insert(name, json!({ "checked_at": checked_at, "via": o.via })),
            Err(error) => failing.insert(
                format!("upstream:{name}"),
                json!({ "error": error, "since": o.since.map(rfc3339), "checked_at": checked_at, "via": o.via }),
            ),
        };
    }
    if app.shutdown.is_cancelled() {
        failing.extend(shutting_down());
    }
    if failing.is_empty() {
        (StatusCode::OK, Json(json!({ "status": "ready", "upstreams": upstreams }))).into_response()
    } else {
        not_ready(failing, upstreams)
    }
}
