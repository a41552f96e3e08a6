//! Read-only routes: the statement policy (`policy`, a SQL lexer and parser that fails closed), the filter
//! that applies it to client messages in the relay (`filter`), and the tier check every new server connection
//! of the route passes (`verify`).

pub mod filter;
pub mod policy;
pub mod verify;
