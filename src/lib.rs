//! pgbudget: a Postgres connection-budget proxy.
//!
//! Data flow, top to bottom: a client connects (`app` accepts it) and `client::session` reads its startup
//! packet, authenticates it (`client::auth`, against `config::users`) and picks its service from the budgets
//! (`config`). For each checkout, `budget` admits it, queues it in arrival order and hands it a `server`
//! connection from its service's pool, bounded by the service's share and the upstream's ceiling. `relay` pumps
//! bytes both ways while its transaction-state machine follows the server; at a clean boundary the server goes
//! back to the pool, otherwise `relay::reset` cleans it up or it is closed. Read-only routes pass client
//! statements through `read_only`. `budget::cancel` routes cancel requests to the server a client holds.
//! Everything is counted by `telemetry` (Prometheus, the error journal, rows for the DuckLake warehouse in
//! `lake`) and operated through `admin` (HTTP, console, PAUSE/RESUME, stats). `protocol` frames the wire format,
//! `tls` encrypts either side of it, and `error` maps every error to one SQLSTATE.
//!
//! Module map, bottom to top; each group uses only the groups before it (`scripts/module-graph --check`, run by
//! `scripts/test`, keeps it so):
//!
//! `protocol` → `tls` → `telemetry` → `config` → `lake` → `server` → `read_only` → `error` → `budget` →
//! `context` → `relay` → `client` → `admin` → `app`
//!
//! - `telemetry` needs nothing of the crate and sits below `config`, whose `[lake]` validation applies the lake's
//!   table rules (`telemetry::registry`, beside the row types and table ids it describes). It writes rows to a
//!   `telemetry::Sink`, which `lake` implements.
//! - `error` sits below `budget`, whose checkout fails with the client-facing `ProxyError` variants themselves;
//!   the error types `error` maps (a failed login, a load-shedding refusal, a console or operator command that
//!   failed) live in it. `budget` also holds what a checkout needs of the layers above: a pool's operator state
//!   (`budget::control`) and the cancel keys (`budget::cancel`).
//! - `context` holds `App`, the shared state relay, client and admin read (configuration, users, pools,
//!   metrics, cancel keys, login slots) and the reload that swaps it; `app` on top runs the process around it
//!   and hands `client` the admin console as its `Console` entry point.

pub mod admin;
pub mod app;
pub mod budget;
pub mod client;
pub mod config;
pub mod context;
pub mod error;
#[cfg(feature = "lake")]
pub mod lake;
pub mod protocol;
pub mod read_only;
pub mod relay;
pub mod server;
pub mod telemetry;
pub mod tls;
