//! Admin HTTP listener: `/metrics`, `/health`, `/ready`, `/pools`, `/errors`, `/errors/health` (and the lake API).
//! Liveness never touches the database; readiness answers from a cached probe of each upstream (`ready`);
//! every endpoint but the open probes needs the admin bearer token when one is configured (`auth`).

pub mod auth;
pub mod ready;

use crate::context::App;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{middleware, Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::{info, warn};

pub fn router(app: Arc<App>) -> Router {
    let readiness = Arc::new(ready::Readiness::default());
    let r = Router::new();
    #[cfg(feature = "lake")]
    let r = r.merge(crate::admin::lake_api::routes());
    r.route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/ready", get(move |State(app): State<Arc<App>>| ready::handler(app, readiness.clone())))
        .route("/pools", get(pools))
        .route("/errors", get(errors))
        .route("/errors/health", get(errors_health))
        .layer(middleware::from_fn_with_state(app.clone(), auth::layer))
        .with_state(app)
}

/// Serve the admin API until shutdown.
pub async fn serve(app: Arc<App>, listener: TcpListener) {
    info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin http listening");
    let open = auth::OPEN_PATHS.join(" ");
    match auth::token(&app) {
        (var, None) => warn!(
            kind = "admin_http",
            token_env = %var,
            "admin endpoints other than {open} are open to anyone who reaches the listener: set {var} to require a bearer token"
        ),
        (var, Some(_)) => info!(token_env = %var, "admin endpoints other than {open} need the bearer token"),
    }
    let token = app.shutdown.clone();
    let r = axum::serve(listener, router(app)).with_graceful_shutdown(async move { token.cancelled().await }).await;
    if let Err(e) = r {
        warn!(kind = "admin_http", cause = %e, "admin listener failed");
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    app.snapshot();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

async fn health(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    Json(json!({ "status": "ok", "uptime_seconds": app.started.elapsed().as_secs_f64() }))
}

async fn pools(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let snap = app.snapshot();
    let ceiling_sum: Vec<_> = snap
        .upstreams
        .iter()
        .map(|u| {
            json!({
                "upstream": u.upstream, "ceiling": u.ceiling, "reserved": u.reserved, "slices": u.slices,
                "sum": u.slices + u.reserved, "headroom": u.ceiling.saturating_sub(u.slices + u.reserved), "open": u.open,
            })
        })
        .collect();
    let budget: Vec<_> = app
        .resolved()
        .services
        .values()
        .map(|s| json!({ "service": s.name, "upstream": s.upstream, "slice": s.slice, "share": s.share, "ro_share": s.ro_share }))
        .collect();
    let ro = json!({
        "database": app.resolved().config.read_only.database,
        "routes_to": app.resolved().ro_routing(),
        "ro_dsn_configured": app.resolved().replica.is_some(),
    });
    Json(
        json!({ "pools": snap.pools, "budget": budget, "upstreams": ceiling_sum, "clients": snap.clients, "read_only": ro }),
    )
}

#[derive(Deserialize)]
struct ErrorsQuery {
    limit: Option<usize>,
}

async fn errors(State(app): State<Arc<App>>, Query(q): Query<ErrorsQuery>) -> Json<serde_json::Value> {
    let recent = app.journal.recent(q.limit.unwrap_or(100).min(crate::telemetry::journal::CAPACITY));
    Json(json!({ "errors": recent }))
}

#[derive(Deserialize)]
struct HealthQuery {
    minutes: Option<u64>,
}

async fn errors_health(State(app): State<Arc<App>>, Query(q): Query<HealthQuery>) -> Json<serde_json::Value> {
    let minutes = q.minutes.unwrap_or(15).clamp(1, 24 * 60);
    let pools: Vec<(String, String)> =
        app.resolved().services.values().map(|s| (s.upstream.clone(), s.name.clone())).collect();
    let rows = app.journal.health(Duration::from_secs(minutes * 60), &pools);
    let healthy = rows.iter().all(|r| r.healthy);
    Json(
        json!({ "window_minutes": minutes, "healthy": healthy, "threshold": crate::telemetry::journal::UNHEALTHY_AT, "pools": rows }),
    )
}
