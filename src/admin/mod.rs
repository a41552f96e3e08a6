//! The operator surface: the admin HTTP listener (`http`, with the lake API in `lake_api`), the SQL console
//! (`console`), PAUSE/RESUME/RECONNECT/KILL (`control`) and the pool figures they report (`stats`);
//! `probe` is the client side of `/health` and `/ready` for container health checks.

pub mod console;
pub mod control;
pub mod http;
#[cfg(feature = "lake")]
pub mod lake_api;
pub mod probe;
pub mod stats;
