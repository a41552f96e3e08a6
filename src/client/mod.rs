//! The client side: its first packets and TLS (`startup`), one session from login to goodbye (`session`) and
//! who the client is (`auth`, and `passthrough` for roles only the upstream knows); its cancel keys are
//! `budget::cancel`.

pub mod auth;
pub mod passthrough;
pub mod session;
pub mod startup;
