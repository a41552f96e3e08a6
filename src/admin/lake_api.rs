//! The lake's HTTP API on the admin listener, for operators and the services behind the proxy: `GET /lake/health`,
//! `POST /lake/query` (one read-only, parameter-bound SELECT; JSON rows, ISO timestamps, row and time limits),
//! `POST /lake/timeline` (what `pgbudget lake timeline` prints, as JSON) and `POST /lake/{table}` (JSON rows
//! checked against the registry; a bad row is refused naming its field, the good rows are kept). The POSTs need
//! `Authorization: Bearer <token>` from the `admin.api_token_env` variable (checked by `http::auth`, which also
//! guards `/lake/health` when a token is set); without one they are off.

use crate::context::App;
use crate::lake::registry::{ColumnType, TableSpec};
use crate::telemetry::Value;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value as Jv};
use sqlparser::tokenizer::{Token, Tokenizer};
use std::sync::Arc;

/// Most rows one `POST /lake/{table}` may carry.
const MAX_ROWS_PER_POST: usize = 10_000;

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/lake/health", get(health))
        .route("/lake/query", post(query))
        .route("/lake/timeline", post(timeline))
        .route("/lake/:table", post(append))
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

/// What every lake POST starts with: the bearer token, then the lake itself; `Err` is the response to send.
fn authorized_lake(app: &App, headers: &HeaderMap) -> Result<Arc<crate::lake::Lake>, Box<Response>> {
    crate::admin::http::auth::require(app, headers, "the lake API").map_err(|e| Box::new(e.into_response()))?;
    let off = || Box::new(error(StatusCode::NOT_FOUND, "the lake is not enabled ([lake] enabled)"));
    app.lake().cloned().ok_or_else(off)
}

async fn health(State(app): State<Arc<App>>) -> Response {
    match app.lake() {
        None => Json(json!({ "enabled": false })).into_response(),
        Some(l) => Json(json!({
            "enabled": true,
            "attached": l.is_attached(),
            "writer": l.writer().is_some(),
            "tables": l.registry().tables().iter().map(|t| t.name.to_string()).collect::<Vec<_>>(),
        }))
        .into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryBody {
    sql: String,
    #[serde(default)]
    params: Vec<Jv>,
    limit: Option<usize>,
    /// Bare table names resolve in the lake (`pgbudget lake query` asking a running proxy).
    #[serde(default)]
    in_lake: bool,
}

/// Table functions and replacement scans that reach outside the lake (files, URLs, other databases) or
/// change it (maintenance calls) are refused; the lake's own tables are read through `lake.<table>`.
pub fn check_read_only_sql(sql: &str) -> Result<(), String> {
    const DENIED_PREFIXES: [&str; 12] = [
        "read_",
        "ducklake_",
        "glob",
        "postgres_",
        "sqlite_",
        "parquet_",
        "iceberg_",
        "delta_",
        "query",
        "getenv",
        "http",
        "sniff_",
    ];
    let dialect = sqlparser::dialect::DuckDbDialect {};
    let tokens = Tokenizer::new(&dialect, sql).tokenize().map_err(|e| format!("cannot tokenize: {e}"))?;
    let toks: Vec<&Token> = tokens.iter().filter(|t| !matches!(t, Token::Whitespace(_))).collect();
    for (i, t) in toks.iter().enumerate() {
        match t {
            Token::SemiColon if toks[i + 1..].iter().any(|t| !matches!(t, Token::SemiColon | Token::EOF)) => {
                return Err("one statement only".into())
            }
            Token::Word(w) => {
                let name = w.value.to_ascii_lowercase();
                let called = matches!(toks.get(i + 1), Some(Token::LParen));
                if called && DENIED_PREFIXES.iter().any(|p| name.starts_with(p)) {
                    return Err(format!("function {name}() is not allowed in lake queries"));
                }
                let from = matches!(name.as_str(), "from" | "join");
                if from && matches!(toks.get(i + 1), Some(Token::SingleQuotedString(_) | Token::DoubleQuotedString(_)))
                {
                    return Err("reading files by name is not allowed in lake queries".into());
                }
                if i == 0 && !matches!(name.as_str(), "select" | "with" | "from" | "values" | "table") {
                    return Err(format!("only queries are allowed (got {})", w.value));
                }
            }
            _ if i == 0 && !matches!(t, Token::LParen) => return Err("only queries are allowed".into()),
            _ => {}
        }
    }
    Ok(())
}

fn json_param(v: &Jv) -> Result<Value, String> {
    Ok(match v {
        Jv::Null => Value::Null,
        Jv::Bool(b) => Value::Bool(*b),
        Jv::Number(n) => n.as_i64().map(Value::Int).or_else(|| n.as_f64().map(Value::Float)).ok_or("bad number")?,
        Jv::String(s) => Value::Text(s.clone()),
        other => return Err(format!("parameters are scalars, got {other}")),
    })
}

async fn query(State(app): State<Arc<App>>, headers: HeaderMap, body: Json<QueryBody>) -> Response {
    let lake = match authorized_lake(&app, &headers) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    if let Err(e) = check_read_only_sql(&body.sql) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    let params: Result<Vec<Value>, String> = body.params.iter().map(json_param).collect();
    let params = match params {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let (sql, limit, in_lake) = (body.sql.clone(), body.limit.unwrap_or(1000), body.in_lake);
    let reader = lake.clone();
    let run = move || {
        let r = reader.reader();
        if in_lake {
            r.query_in_lake(&sql, &params, limit)
        } else {
            r.query(&sql, &params, limit)
        }
    };
    within_deadline(&app, lake, "query", run).await
}

/// `POST /lake/timeline` with `{"by": "day"|"hour", "buckets": N, "service": null|"name"}`: the timeline
/// `pgbudget lake timeline` prints, as JSON (for the CLI while this process holds an embedded catalog).
async fn timeline(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Json<crate::lake::timeline::TimelineOptions>,
) -> Response {
    let lake = match authorized_lake(&app, &headers) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    let reader = lake.clone();
    let options = body.0;
    within_deadline(&app, lake, "timeline", move || crate::lake::timeline::timeline(reader.reader(), &options)).await
}

/// Run a reader call off the runtime within `lake.query_timeout`; past it the statement is interrupted (so it
/// stops holding the reader and a catalog connection) and the answer is 504.
async fn within_deadline<T: serde::Serialize + Send + 'static>(
    app: &App,
    lake: Arc<crate::lake::Lake>,
    what: &str,
    f: impl FnOnce() -> Result<T, crate::lake::LakeError> + Send + 'static,
) -> Response {
    let deadline = app.resolved().config.lake.query_timeout;
    match tokio::time::timeout(deadline, tokio::task::spawn_blocking(f)).await {
        Err(_) => {
            lake.reader().interrupt();
            error(
                StatusCode::GATEWAY_TIMEOUT,
                format!("the {what} ran past {} ms and was stopped", deadline.as_millis()),
            )
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{what} task failed: {e}")),
        Ok(Ok(Err(e))) => error(StatusCode::BAD_REQUEST, format!("lake {what} failed ({}): {e}", e.kind())),
        Ok(Ok(Ok(r))) => Json(json!(r)).into_response(),
    }
}

/// One JSON object as a row of `spec`; `Err((field, why))` names what is wrong.
pub fn json_row(spec: &TableSpec, obj: &Jv) -> Result<Vec<Value>, (String, String)> {
    let Jv::Object(map) = obj else {
        return Err(("(row)".into(), "each row is a JSON object".into()));
    };
    if let Some(k) = map.keys().find(|k| !spec.columns.iter().any(|c| c.name == k.as_str())) {
        return Err((k.clone(), format!("no column {k} in table {}", spec.name)));
    }
    let mut row = Vec::with_capacity(spec.columns.len());
    for c in &spec.columns {
        let v = map.get(c.name.as_ref()).unwrap_or(&Jv::Null);
        let bad = |why: &str| Err((c.name.to_string(), format!("{why} for {} column {}", c.ty.sql(), c.name)));
        let cell = match (c.ty, v) {
            (ColumnType::Timestamp, Jv::Null) if c.name == "ts" => Value::now(),
            (_, Jv::Null) => Value::Null,
            (ColumnType::Timestamp, Jv::String(s)) => match humantime_serde::re::humantime::parse_rfc3339_weak(s) {
                Ok(t) => Value::at(t),
                Err(_) => return bad("expected an RFC 3339 time such as 2026-11-23T12:00:00Z"),
            },
            (ColumnType::BigInt | ColumnType::Integer, Jv::Number(n)) if n.as_i64().is_some() => {
                Value::Int(n.as_i64().unwrap_or_default())
            }
            (ColumnType::Double, Jv::Number(n)) => Value::Float(n.as_f64().unwrap_or_default()),
            (ColumnType::Boolean, Jv::Bool(b)) => Value::Bool(*b),
            (ColumnType::Varchar, Jv::String(s)) => Value::Text(s.clone()),
            _ => return bad(&format!("{v} is not a valid value")),
        };
        if !c.ty.accepts(&cell) {
            return bad("out of range");
        }
        row.push(cell);
    }
    Ok(row)
}

async fn append(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(table): Path<String>,
    body: Json<Jv>,
) -> Response {
    let lake = match authorized_lake(&app, &headers) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    let (Some(writer), Some(id)) = (lake.writer(), lake.registry().id(&table)) else {
        return error(StatusCode::NOT_FOUND, format!("no writable lake table {table}"));
    };
    let spec = lake.registry().get(id).expect("id from this registry");
    let rows = match &body.0 {
        Jv::Array(rows) => rows.as_slice(),
        one => std::slice::from_ref(one),
    };
    if rows.len() > MAX_ROWS_PER_POST {
        return error(StatusCode::PAYLOAD_TOO_LARGE, format!("at most {MAX_ROWS_PER_POST} rows per request"));
    }
    let mut rejected = Vec::new();
    let mut accepted = 0;
    for (i, r) in rows.iter().enumerate() {
        match json_row(spec, r) {
            Ok(row) => {
                writer.append(id, row);
                accepted += 1;
            }
            Err((field, why)) => rejected.push(json!({ "row": i, "field": field, "error": why })),
        }
    }
    let status = if rejected.is_empty() { StatusCode::OK } else { StatusCode::BAD_REQUEST };
    (status, Json(json!({ "table": table, "accepted": accepted, "rejected": rejected }))).into_response()
}
