//! The admin bearer token: one check, applied as a layer to every admin route except the open probes.
//! The token comes from the variable named by `admin.api_token_env`; unset or empty, the guarded routes are
//! open (as before the token existed) and the lake API, which needs a token, is off.

use crate::context::App;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Paths anyone who reaches the listener may read (Prometheus convention: probes and scrapes need no secret).
pub const OPEN_PATHS: [&str; 3] = ["/health", "/ready", "/metrics"];

/// Why a request to a guarded endpoint is refused. The messages never contain what the client sent.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing Authorization header: this endpoint needs `Authorization: Bearer <token>` (the token in {var})")]
    Missing { var: String },
    #[error("the Authorization header is not `Bearer <token>` (the token in {var})")]
    NotBearer { var: String },
    #[error("wrong bearer token (expected the token in {var})")]
    Wrong { var: String },
    #[error("{what} is off: set {var} to a token")]
    Off { what: &'static str, var: String },
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let status = match self {
            AuthError::Off { .. } => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        };
        let mut r = (status, Json(json!({ "error": self.to_string() }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"pgbudget admin\""));
        }
        r
    }
}

/// The name of the token variable and its value, when one is set.
pub fn token(app: &App) -> (String, Option<String>) {
    let var = app.resolved().config.admin.api_token_env.clone();
    let value = app.env.get(&var).map(str::to_owned);
    (var, value)
}

/// Without a configured token: `Ok`. With one: `Ok` only for a request carrying it.
pub fn check(app: &App, headers: &HeaderMap) -> Result<(), AuthError> {
    match token(app) {
        (_, None) => Ok(()),
        (var, Some(expected)) => verify(&var, &expected, headers),
    }
}

/// Like [`check`], but an endpoint that must never be open refuses when no token is configured.
#[cfg(feature = "lake")]
pub fn require(app: &App, headers: &HeaderMap, what: &'static str) -> Result<(), AuthError> {
    match token(app) {
        (var, None) => Err(AuthError::Off { what, var }),
        (var, Some(expected)) => verify(&var, &expected, headers),
    }
}

fn verify(var: &str, expected: &str, headers: &HeaderMap) -> Result<(), AuthError> {
    let var = || var.to_owned();
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(AuthError::Missing { var: var() });
    };
    let given = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .ok_or_else(|| AuthError::NotBearer { var: var() })?;
    if same(given.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(AuthError::Wrong { var: var() })
    }
}

/// Equality in time independent of where the inputs differ and of their lengths: both sides are hashed
/// first, and the digests are compared without an early exit.
fn same(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The layer over the whole admin router: open paths pass, everything else (unknown paths included) is checked.
pub async fn layer(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if OPEN_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    match check(&app, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn bearer_tokens_are_checked_and_never_echoed() {
        assert!(verify("T", "s3cret", &headers("Bearer s3cret")).is_ok());
        assert!(verify("T", "s3cret", &headers("bearer  s3cret ")).is_ok());
        assert!(matches!(verify("T", "s3cret", &HeaderMap::new()), Err(AuthError::Missing { .. })));
        assert!(matches!(verify("T", "s3cret", &headers("Basic czNjcmV0")), Err(AuthError::NotBearer { .. })));
        assert!(matches!(verify("T", "s3cret", &headers("s3cret")), Err(AuthError::NotBearer { .. })));
        for wrong in ["Bearer s3cre", "Bearer s3cret0", "Bearer S3CRET", "Bearer "] {
            let e = verify("T", "s3cret", &headers(wrong)).unwrap_err();
            assert!(matches!(e, AuthError::Wrong { .. } | AuthError::NotBearer { .. }), "{wrong}: {e}");
            assert!(!e.to_string().contains("s3cre"), "{e}");
        }
    }

    #[test]
    fn comparison_needs_every_byte() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
        assert!(!same(b"", b"a"));
    }
}
