//! pgbudget: a Postgres connection-budget proxy.
//!
//! Data flow, top to bottom: a client connects (`app` accepts it) and `client::session` reads its startup
//! packet, authenticates it (`client::auth`) and picks its service from the budgets (`config`). For each
//! checkout, `budget` admits it, queues it in arrival order and hands it a `server` connection from its
//! service's pool, bounded by the service's share and the upstream's ceiling. `relay` pumps bytes both ways
//! while its transaction-state machine follows the server; at a clean boundary the server goes back to the
//! pool, otherwise `server::reset` cleans it up or it is closed. Read-only routes pass client statements
//! through `read_only`. `budget::cancel` routes cancel requests to the server a client holds. Everything
//! is counted by `telemetry` (Prometheus, the error journal, rows for the DuckLake warehouse in `lake`) and
//! operated through `admin` (HTTP, console, PAUSE/RESUME, stats). `protocol` frames the wire format, `tls`
//! encrypts either side of it, and `error` maps every error to one SQLSTATE.

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
