//! The client side: its first packets and TLS (`startup`), one session from login to goodbye (`session`) and
//! who the client is (`auth`); its cancel keys are `budget::cancel`.

pub mod auth;
pub mod session;
pub mod startup;
