//! pgbudget: a Postgres connection-budget proxy.
//!
//! Layout (data flows top to bottom):
//! - `config`  — `budgets.toml` parsing; `budget` — invariants and per-process shares.
//! - `app`     — shared state behind an `Arc`, the accept loop, background tasks, drain.
//! - `session` — one client: startup, auth (`auth`), service choice, greeting.
//! - `relay`   — the message pump; transaction-mode release; `reset` — checkin cleanup.
//! - `checkout`, `admission` — who gets a server, who waits (and is told), who is refused.
//! - `pool`    — deadpool pools of `server` connections under each upstream's ceiling.
//! - `cancel`  — proxy-issued cancel keys mapped to the server backend in use.
//! - `protocol`— framing by 5-byte header; the few messages the proxy builds.
//! - `error`   — the session error type and its one SQLSTATE mapping.
//! - `metrics`, `stats`, `journal`, `admin` — gauges, pool figures, error ring, admin HTTP.
//! - `console`, `control`, `reload` — the admin console, PAUSE/RESUME/RECONNECT/KILL, hot reload.
//! - `lake`    — (feature `lake`) the embedded DuckLake telemetry warehouse: writer, reader, registry.

pub mod admin;
#[cfg(feature = "lake")]
pub mod admin_lake;
pub mod admission;
pub mod app;
pub mod auth;
pub mod budget;
pub mod cancel;
pub mod checkout;
pub mod config;
pub mod console;
pub mod control;
pub mod error;
pub mod journal;
#[cfg(feature = "lake")]
pub mod lake;
pub mod metrics;
pub mod pool;
pub mod protocol;
pub mod readonly;
pub mod relay;
pub mod reload;
pub mod reset;
pub mod ro_filter;
pub mod server;
pub mod session;
pub mod stats;
pub mod telemetry;
