//! Read-only routes: the statement policy (`policy`, a SQL lexer and parser that fails closed) and the filter
//! that applies it to client messages in the relay (`filter`).

pub mod filter;
pub mod policy;
