//! Read-only routes: the statement policy (`policy`, a SQL lexer and parser that fails closed), the filter
//! that applies it to client messages in the relay (`filter`) after spelling them as the server reads them
//! (`normalize`: `U&` escapes, `standard_conforming_strings = off`), and the tier check every new server connection
//! of the route passes (`verify`).

pub mod filter;
pub mod normalize;
pub mod policy;
pub mod verify;
