//! The client side: one session from startup to goodbye (`session`), who the client is (`auth`), and the
//! proxy-issued cancel keys that route a CancelRequest to the server the client holds (`cancel`).

pub mod auth;
pub mod cancel;
pub mod session;
