//! The session-layer error type and the one exhaustive mapping to severity, SQLSTATE and client-safe text; the
//! error types it maps (a failed login, a load-shedding refusal, an operator or console command that failed) live
//! here too, below every layer that returns them.

use crate::config::reload::ReloadError;
use crate::protocol::{ProtocolError, Severity};
use crate::server::ServerError;
use std::time::Duration;

pub use crate::protocol::sqlstate;

/// Everything that can end or interrupt a client session.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("client protocol: {0}")]
    ClientProtocol(#[from] ProtocolError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("unknown service {0:?}")]
    UnknownService(String),
    #[error("unknown database {0:?}")]
    UnknownDatabase(String),
    #[error("budget exhausted: service {service} share {share}, waited {waited:?}")]
    BudgetExhausted { service: String, share: u32, waited: Duration },
    /// The upstream's ceiling (less `reserved`) is in use by all services together, though this service
    /// is below its share.
    #[error(
        "upstream {upstream} at ceiling {ceiling}: service {service} holds {holding} of {share}, waited {waited:?}"
    )]
    CeilingReached { upstream: String, ceiling: u32, service: String, holding: u32, share: u32, waited: Duration },
    #[error("load shed: service {service} share {share}: {refusal:?}")]
    Shed { service: String, share: u32, refusal: Refusal },
    #[error("client cancelled while queued for a server")]
    QueuedCancel,
    #[error("service {service} paused; waited {waited:?}")]
    Paused { service: String, waited: Duration },
    #[error("session ended by an operator's KILL")]
    Killed,
    // No apostrophe: the log redactor reads one as the start of a literal.
    #[error("home backend of this client terminated by an administrator")]
    HomeTerminated,
    #[error("idle in transaction for {0:?}")]
    IdleInTransaction(Duration),
    #[error("client idle for {0:?}")]
    ClientIdle(Duration),
    #[error("upstream {upstream}: {source}")]
    Upstream { upstream: String, source: ServerError },
    #[error("server rejected session setting: {code} {message}")]
    ServerRejected { code: String, message: String },
    #[error("read-only route {route}: refused {what}")]
    ReadOnly { route: String, what: String },
    #[error("service {service} has no read-only route {route}")]
    RouteDisabled { service: String, route: String },
    #[error("invalid startup parameter {0:?}")]
    BadParameter(String),
    #[error("proxy is shutting down")]
    ShuttingDown,
    #[error("client i/o: {0}")]
    ClientIo(std::io::Error),
    #[error("too many clients logging in (max_pending_logins {0})")]
    TooManyLogins(u32),
    /// `tls.mode = "require"` and the client did not negotiate TLS.
    #[error("plaintext client refused (tls.mode = require)")]
    TlsRequired,
    /// A login for a database or role without a pool while `proxy.max_pools` pools exist.
    #[error("max_pools ({max}) pools exist")]
    TooManyPools { max: u32 },
    #[error("client message {kind:?} of {len} bytes is over max_query_size {max}")]
    MessageTooLarge { kind: char, len: usize, max: usize },
    #[error("server refused the client's startup setting: {code} {message}")]
    SettingRejected { code: String, message: String },
    /// Transaction mode, `pin = "refuse"`: a statement that would pin the server to the client.
    #[error("pin refused: {statement} (service {service})")]
    PinRefused { statement: &'static str, service: String },
    #[error("prepared statement {0:?} already exists")]
    StatementExists(String),
    #[error("prepared statement {0:?} does not exist")]
    StatementMissing(String),
    #[error("over {0} prepared statements in one session")]
    TooManyStatements(usize),
    /// A statement whose result shape changed since the client prepared it (as Postgres's 0A000).
    #[error("cached plan must not change result type")]
    PlanChanged,
    /// A client pinned to its server idled past `pin_idle_timeout`.
    #[error("pinned client idle for {0:?}")]
    PinIdle(Duration),
}

/// Why a login failed. Every variant reaches the client as the same 28P01 text.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("protocol error during authentication: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("password authentication failed for user {user:?} ({reason})")]
    Failed { user: String, reason: &'static str },
    /// `[auth] passthrough`: the role's secret could not be read from the upstream (the query failed).
    #[error("cannot read the secret of role {user:?} with auth_query: {cause}")]
    Lookup { user: String, cause: String },
}

/// Why admission (`budget::admission`) refused a checkout before it queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `holding` checkouts reached the hard-reject line `line` of `share`.
    Hard { holding: u32, line: u32 },
    /// `waiting` clients queued already (the bound is `max_waiting`).
    QueueFull { waiting: u32, max_waiting: u32 },
}

/// Why an operator command (`admin::control`) could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no such service \"{0}\"")]
    UnknownService(String),
    /// The pool stays paused; the servers still in use close when their clients release them.
    #[error("paused, but {busy} server connection(s) are still in use")]
    PauseTimedOut { busy: u32 },
}

/// A console command that failed; the client gets an ERROR and the session goes on
/// (severity and SQLSTATE: `error::console_error_to_client`).
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("unsupported admin console command \"{0}\"; try SHOW HELP")]
    UnknownCommand(String),
    #[error("the admin console takes simple queries only")]
    ExtendedProtocol,
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Reload(#[from] ReloadError),
}

/// Stable label for logs (and later metrics) — fixed cardinality, never client input.
/// The NOTICE Postgres sends at login for an `application_name` longer than an identifier (63 bytes): the
/// proxy replays the setting on servers later, so it says it to the client itself, in Postgres's words.
pub fn long_application_name_notice(out: &mut bytes::BytesMut, name: &str) {
    const MAX: usize = 63;
    if name.len() <= MAX {
        return;
    }
    let cut = (0..=MAX).rev().find(|&i| name.is_char_boundary(i)).unwrap_or(0);
    let text = format!("identifier \"{name}\" will be truncated to \"{}\"", &name[..cut]);
    crate::protocol::error_response(out, Severity::Notice, sqlstate::NAME_TOO_LONG, &text, None);
}

impl ProxyError {
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::ClientProtocol(_) => "client_protocol",
            ProxyError::Auth(_) => "auth",
            ProxyError::UnknownService(_) => "unknown_service",
            ProxyError::UnknownDatabase(_) => "unknown_database",
            ProxyError::BudgetExhausted { .. } => "budget_exhausted",
            ProxyError::CeilingReached { .. } => "ceiling_reached",
            ProxyError::Shed { .. } => "load_shed",
            ProxyError::QueuedCancel => "queued_cancel",
            ProxyError::Paused { .. } => "paused",
            ProxyError::Killed => "killed",
            ProxyError::HomeTerminated => "home_terminated",
            ProxyError::IdleInTransaction(_) => "idle_in_transaction_timeout",
            ProxyError::ClientIdle(_) => "client_idle_timeout",
            ProxyError::Upstream { .. } => "upstream",
            ProxyError::ServerRejected { .. } => "server_rejected",
            ProxyError::ReadOnly { .. } => "read_only",
            ProxyError::RouteDisabled { .. } => "route_disabled",
            ProxyError::BadParameter(_) => "bad_parameter",
            ProxyError::ShuttingDown => "shutting_down",
            ProxyError::ClientIo(_) => "client_io",
            ProxyError::TooManyLogins(_) => "too_many_logins",
            ProxyError::TooManyPools { .. } => "too_many_pools",
            ProxyError::TlsRequired => "tls_required",
            ProxyError::MessageTooLarge { .. } => "message_too_large",
            ProxyError::SettingRejected { .. } => "setting_rejected",
            ProxyError::PinRefused { .. } => "pin_refused",
            ProxyError::StatementExists(_) => "statement_exists",
            ProxyError::StatementMissing(_) => "statement_missing",
            ProxyError::TooManyStatements(_) => "too_many_statements",
            ProxyError::PinIdle(_) => "pin_idle_timeout",
            ProxyError::PlanChanged => "plan_changed",
        }
    }

    /// Severity, SQLSTATE and the message a client may see.
    pub fn to_client(&self) -> (Severity, &str, String) {
        use sqlstate::*;
        use Severity::*;
        match self {
            ProxyError::ClientProtocol(ProtocolError::Version { major, minor }) => (
                Fatal,
                FEATURE_NOT_SUPPORTED,
                format!(
                    "unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.{}",
                    crate::protocol::NEWEST_MINOR
                ),
            ),
            ProxyError::ClientProtocol(e) => (Fatal, PROTOCOL_VIOLATION, format!("invalid frontend message: {e}")),
            ProxyError::Auth(AuthError::Protocol(_)) => {
                (Fatal, PROTOCOL_VIOLATION, "invalid authentication exchange".into())
            }
            ProxyError::Auth(AuthError::Failed { user, .. }) => {
                (Fatal, INVALID_PASSWORD, format!("password authentication failed for user \"{user}\""))
            }
            ProxyError::Auth(AuthError::Lookup { user, .. }) => (
                Fatal,
                INVALID_AUTHORIZATION_SPECIFICATION,
                format!("pgbudget could not read the password of role \"{user}\" from the upstream (see its log)"),
            ),
            // 28000 like a login refusal: a service the client may not name reads exactly as one that does not exist.
            ProxyError::UnknownService(s) => (
                Fatal,
                INVALID_AUTHORIZATION_SPECIFICATION,
                format!("no budget for service \"{s}\": declare it under [services] in budgets.toml"),
            ),
            ProxyError::UnknownDatabase(d) => {
                (Fatal, INVALID_CATALOG_NAME, format!("database \"{d}\" is not served by pgbudget"))
            }
            ProxyError::BudgetExhausted { service, share, waited } => (
                Error,
                TOO_MANY_CONNECTIONS,
                format!(
                    "pgbudget: service \"{service}\" is using all {share} of its server connections; \
                     no connection freed up within {} ms",
                    waited.as_millis()
                ),
            ),
            ProxyError::CeilingReached { upstream, ceiling, service, holding, share, waited } => (
                Error,
                TOO_MANY_CONNECTIONS,
                format!(
                    "pgbudget: upstream \"{upstream}\" is at its ceiling of {ceiling} connections \
                     (service \"{service}\" holds {holding} of its share of {share}); \
                     no connection freed up within {} ms",
                    waited.as_millis()
                ),
            ),
            ProxyError::Shed { service, share, refusal } => (
                Error,
                TOO_MANY_CONNECTIONS,
                match refusal {
                    Refusal::Hard { holding, line } => format!(
                        "pgbudget: service \"{service}\" holds {holding} of its {share} server connections, at its \
                         load-shedding line of {line}; new work is refused until load drops"
                    ),
                    Refusal::QueueFull { waiting, max_waiting } => format!(
                        "pgbudget: service \"{service}\" is near its share of {share} server connections and \
                         {waiting} clients already wait (max_waiting {max_waiting}); refused without queueing"
                    ),
                },
            ),
            ProxyError::QueuedCancel => (Error, QUERY_CANCELED, "canceling statement due to user request".into()),
            ProxyError::Paused { service, waited } => (
                Error,
                CANNOT_CONNECT_NOW,
                format!(
                    "pgbudget: service \"{service}\" is paused by an operator; no RESUME within {} ms",
                    waited.as_millis()
                ),
            ),
            ProxyError::Killed => {
                (Fatal, ADMIN_SHUTDOWN, "terminating connection due to administrator command (pgbudget KILL)".into())
            }
            // The words Postgres uses: the client was told this backend's pid, and it was terminated.
            ProxyError::HomeTerminated => {
                (Fatal, ADMIN_SHUTDOWN, "terminating connection due to administrator command".into())
            }
            ProxyError::IdleInTransaction(d) => (
                Fatal,
                IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                format!("terminating connection due to idle-in-transaction timeout (pgbudget: {} ms)", d.as_millis()),
            ),
            ProxyError::ClientIdle(d) => (
                Fatal,
                IDLE_SESSION_TIMEOUT,
                format!("terminating connection due to idle-session timeout (pgbudget: {} ms)", d.as_millis()),
            ),
            ProxyError::Upstream { source: ServerError::ReadOnlyUnverified(why), .. } => {
                (Fatal, READ_ONLY_SQL_TRANSACTION, format!("pgbudget: the read-only route is not served: {why}"))
            }
            ProxyError::Upstream { upstream, source } => match source {
                ServerError::Auth(_) => (
                    Fatal,
                    CONNECTION_FAILURE,
                    format!("pgbudget could not log in to upstream \"{upstream}\": {source}"),
                ),
                ServerError::Postgres { code, message } if sqlstate::passes_through(code) => {
                    (Error, code.as_str(), format!("pgbudget: upstream \"{upstream}\": {message}"))
                }
                _ => (Error, CONNECTION_FAILURE, format!("pgbudget cannot reach upstream \"{upstream}\": {source}")),
            },
            ProxyError::ServerRejected { code, message } => (Error, code.as_str(), message.clone()),
            ProxyError::ReadOnly { route, what } => {
                (Fatal, READ_ONLY_SQL_TRANSACTION, format!("pgbudget: read-only route \"{route}\" refuses {what}"))
            }
            ProxyError::RouteDisabled { service, route } => (
                Fatal,
                INVALID_CATALOG_NAME,
                format!("read-only route \"{route}\" is disabled for service \"{service}\" (read_only_share = 0)"),
            ),
            ProxyError::BadParameter(p) => {
                (Fatal, PROTOCOL_VIOLATION, format!("unsupported startup parameter \"{p}\""))
            }
            ProxyError::ShuttingDown => (Fatal, ADMIN_SHUTDOWN, "pgbudget is shutting down".into()),
            ProxyError::ClientIo(e) => (Fatal, CONNECTION_FAILURE, format!("client connection failed: {e}")),
            ProxyError::TlsRequired => (
                Fatal,
                INVALID_AUTHORIZATION_SPECIFICATION,
                "pgbudget requires TLS (tls.mode = \"require\"): connect with sslmode=require or stricter".into(),
            ),
            ProxyError::TooManyPools { max } => (
                Fatal,
                TOO_MANY_CONNECTIONS,
                format!(
                    "pgbudget: {max} pools (max_pools) are open, one per service, database and role; \
                     no pool can be added for this database or role now"
                ),
            ),
            ProxyError::TooManyLogins(max) => (
                Fatal,
                TOO_MANY_CONNECTIONS,
                format!("pgbudget: too many clients are logging in (max_pending_logins {max})"),
            ),
            ProxyError::MessageTooLarge { kind, len, max } => (
                Fatal,
                PROGRAM_LIMIT_EXCEEDED,
                format!("pgbudget: message of type '{kind}' is {len} bytes, over max_query_size ({max} bytes)"),
            ),
            ProxyError::SettingRejected { code, message } => (Fatal, code.as_str(), message.clone()),
            ProxyError::PinRefused { statement, service } => (
                Error,
                FEATURE_NOT_SUPPORTED,
                format!(
                    "pgbudget: {statement} keeps state in one server connection, which transaction pooling \
                     cannot share; service \"{service}\" has pin = \"refuse\" (set pin = \"allow\" to pin the \
                     connection to this client instead)"
                ),
            ),
            ProxyError::StatementExists(name) => {
                (Error, DUPLICATE_PSTATEMENT, format!("prepared statement \"{name}\" already exists"))
            }
            ProxyError::StatementMissing(name) => {
                (Error, INVALID_SQL_STATEMENT_NAME, format!("prepared statement \"{name}\" does not exist"))
            }
            ProxyError::TooManyStatements(max) => (
                Error,
                CONFIGURATION_LIMIT_EXCEEDED,
                format!(
                    "pgbudget: a session may keep at most {max} prepared statements and {} MiB of their text; \
                     close some first",
                    crate::server::statements::MAX_CLIENT_BYTES >> 20
                ),
            ),
            ProxyError::PlanChanged => (Error, FEATURE_NOT_SUPPORTED, "cached plan must not change result type".into()),
            ProxyError::PinIdle(d) => (
                Fatal,
                IDLE_SESSION_TIMEOUT,
                format!(
                    "terminating connection: idle for {} ms while pinned to a server connection (pgbudget \
                     pin_idle_timeout)",
                    d.as_millis()
                ),
            ),
        }
    }

    /// Errors that only mean the client went away; logged at debug, not as failures.
    pub fn is_disconnect(&self) -> bool {
        match self {
            ProxyError::ClientIo(_) => true,
            ProxyError::ClientProtocol(ProtocolError::Io(e)) => e.kind() == std::io::ErrorKind::UnexpectedEof,
            _ => false,
        }
    }
}

/// Severity, SQLSTATE and message for an admin console command that failed; the console session goes on.
pub fn console_error_to_client(e: &ConsoleError) -> (Severity, &'static str, String) {
    use sqlstate::*;
    let code = match e {
        ConsoleError::UnknownCommand(_) => SYNTAX_ERROR,
        ConsoleError::ExtendedProtocol => FEATURE_NOT_SUPPORTED,
        ConsoleError::Control(ControlError::UnknownService(_)) => UNDEFINED_OBJECT,
        ConsoleError::Control(ControlError::PauseTimedOut { .. }) => OBJECT_IN_USE,
        ConsoleError::Reload(ReloadError::NoConfigFile | ReloadError::RestartNeeded { .. }) => {
            OBJECT_NOT_IN_PREREQUISITE_STATE
        }
        ConsoleError::Reload(ReloadError::Invalid { .. }) => CONFIG_FILE_ERROR,
        ConsoleError::Reload(ReloadError::Io { .. }) => IO_ERROR,
    };
    (Severity::Error, code, e.to_string())
}

#[cfg(test)]
#[path = "error_tests.rs"]
mod tests;
