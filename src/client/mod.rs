//! The client side: its first packets and TLS (`startup`), one session from login to goodbye (`session`), who
//! the client is (`auth`), and the proxy-issued cancel keys that route a CancelRequest to the server the client
//! holds (`cancel`).

pub mod auth;
pub mod cancel;
pub mod session;
pub mod startup;
