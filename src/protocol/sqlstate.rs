//! The SQLSTATEs the proxy itself emits or acts on (names as in Postgres's errcodes.txt); the mapping of
//! errors to them is `crate::error`'s alone.

pub const SUCCESSFUL_COMPLETION: &str = "00000";
pub const PROTOCOL_VIOLATION: &str = "08P01";
pub const CONNECTION_FAILURE: &str = "08006";
pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
pub const INVALID_PARAMETER_VALUE: &str = "22023";
pub const ACTIVE_SQL_TRANSACTION: &str = "25001";
pub const READ_ONLY_SQL_TRANSACTION: &str = "25006";
pub const IDLE_IN_TRANSACTION_SESSION_TIMEOUT: &str = "25P03";
pub const INVALID_SQL_STATEMENT_NAME: &str = "26000";
pub const INVALID_AUTHORIZATION_SPECIFICATION: &str = "28000";
pub const INVALID_PASSWORD: &str = "28P01";
pub const INVALID_CATALOG_NAME: &str = "3D000";
pub const SYNTAX_ERROR: &str = "42601";
pub const NAME_TOO_LONG: &str = "42622";
pub const UNDEFINED_OBJECT: &str = "42704";
pub const DUPLICATE_PSTATEMENT: &str = "42P05";
pub const TOO_MANY_CONNECTIONS: &str = "53300";
pub const CONFIGURATION_LIMIT_EXCEEDED: &str = "53400";
pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
pub const OBJECT_IN_USE: &str = "55006";
pub const QUERY_CANCELED: &str = "57014";
pub const ADMIN_SHUTDOWN: &str = "57P01";
pub const CRASH_SHUTDOWN: &str = "57P02";
pub const CANNOT_CONNECT_NOW: &str = "57P03";
pub const DATABASE_DROPPED: &str = "57P04";
pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
pub const IO_ERROR: &str = "58030";
pub const CONFIG_FILE_ERROR: &str = "F0000";

/// Upstream login/checkout errors a client should see with the server's own SQLSTATE (operator
/// intervention class 57P and the server's own "too many connections"), so it can tell a restart
/// or a full server from an unreachable one; and "database does not exist", for upstreams that serve `*`.
pub fn passes_through(code: &str) -> bool {
    [
        TOO_MANY_CONNECTIONS,
        ADMIN_SHUTDOWN,
        CRASH_SHUTDOWN,
        CANNOT_CONNECT_NOW,
        DATABASE_DROPPED,
        IDLE_SESSION_TIMEOUT,
        INVALID_CATALOG_NAME,
    ]
    .contains(&code)
}
