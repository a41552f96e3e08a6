//! The session-layer error type and the one exhaustive mapping to severity, SQLSTATE and client-safe text.

use crate::admin::console::ConsoleError;
use crate::admin::control::ControlError;
use crate::budget::admission::Refusal;
use crate::client::auth::AuthError;
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
    Shed { service: String, share: u32, refusal: crate::budget::admission::Refusal },
    #[error("client cancelled while queued for a server")]
    QueuedCancel,
    #[error("service {service} paused; waited {waited:?}")]
    Paused { service: String, waited: Duration },
    #[error("session ended by an operator's KILL")]
    Killed,
    #[error("the client's home backend was terminated by an administrator")]
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
mod tests {
    use super::*;

    #[test]
    fn every_variant_has_a_nonempty_message_and_sqlstate() {
        let errs = vec![
            ProxyError::ClientProtocol(ProtocolError::Malformed("x")),
            ProxyError::Auth(AuthError::Failed { user: "u".into(), reason: "r" }),
            ProxyError::UnknownService("s".into()),
            ProxyError::UnknownDatabase("d".into()),
            ProxyError::BudgetExhausted { service: "w".into(), share: 3, waited: Duration::from_millis(5) },
            ProxyError::CeilingReached {
                upstream: "p".into(),
                ceiling: 10,
                service: "w".into(),
                holding: 1,
                share: 3,
                waited: Duration::ZERO,
            },
            ProxyError::Upstream { upstream: "p".into(), source: ServerError::Closed },
            ProxyError::Shed { service: "w".into(), share: 10, refusal: Refusal::Hard { holding: 9, line: 9 } },
            ProxyError::Shed {
                service: "w".into(),
                share: 10,
                refusal: Refusal::QueueFull { waiting: 3, max_waiting: 3 },
            },
            ProxyError::QueuedCancel,
            ProxyError::Paused { service: "w".into(), waited: Duration::from_secs(1) },
            ProxyError::Killed,
            ProxyError::HomeTerminated,
            ProxyError::IdleInTransaction(Duration::from_secs(1)),
            ProxyError::ClientIdle(Duration::from_secs(1)),
            ProxyError::ServerRejected { code: "22023".into(), message: "bad value".into() },
            ProxyError::ReadOnly { route: "r".into(), what: "x".into() },
            ProxyError::RouteDisabled { service: "s".into(), route: "r".into() },
            ProxyError::BadParameter("p".into()),
            ProxyError::ShuttingDown,
            ProxyError::ClientIo(std::io::Error::other("x")),
            ProxyError::TooManyLogins(256),
            ProxyError::TooManyPools { max: 64 },
            ProxyError::TlsRequired,
            ProxyError::MessageTooLarge { kind: 'Q', len: 2 << 20, max: 1 << 20 },
            ProxyError::SettingRejected { code: "22023".into(), message: "invalid value".into() },
            ProxyError::PinRefused { statement: "LISTEN", service: "w".into() },
            ProxyError::StatementExists("s".into()),
            ProxyError::StatementMissing("s".into()),
            ProxyError::TooManyStatements(10),
            ProxyError::PinIdle(Duration::from_secs(1)),
            ProxyError::PlanChanged,
            ProxyError::ClientProtocol(ProtocolError::Version { major: 4, minor: 0 }),
            ProxyError::Upstream {
                upstream: "p".into(),
                source: ServerError::Postgres { code: "57P03".into(), message: "starting up".into() },
            },
        ];
        for e in errs {
            let (_, code, msg) = e.to_client();
            assert_eq!(code.len(), 5, "{e:?}");
            assert!(!msg.is_empty() && !e.kind().is_empty() && !e.to_string().is_empty());
        }
        let e = ProxyError::BudgetExhausted { service: "worker".into(), share: 38, waited: Duration::from_secs(5) };
        let (_, code, msg) = e.to_client();
        assert_eq!(code, "53300");
        assert!(msg.contains("worker") && msg.contains("38") && msg.contains("5000 ms"), "{msg}");
    }

    #[test]
    fn ceiling_reached_names_the_upstream_not_the_service_budget() {
        let e = ProxyError::CeilingReached {
            upstream: "primary".into(),
            ceiling: 97,
            service: "worker".into(),
            holding: 12,
            share: 38,
            waited: Duration::from_secs(5),
        };
        let (sev, code, msg) = e.to_client();
        assert_eq!((sev, code, e.kind()), (Severity::Error, sqlstate::TOO_MANY_CONNECTIONS, "ceiling_reached"));
        assert_eq!(
            msg,
            "pgbudget: upstream \"primary\" is at its ceiling of 97 connections (service \"worker\" holds 12 of its \
             share of 38); no connection freed up within 5000 ms"
        );
        let budget = ProxyError::BudgetExhausted { service: "worker".into(), share: 38, waited: Duration::ZERO };
        assert_ne!(budget.kind(), e.kind());
        assert!(!msg.contains("is using all"), "{msg}");
    }

    #[test]
    fn console_errors_are_errors_with_their_own_sqlstate() {
        let cases: Vec<(ConsoleError, &str, &str)> = vec![
            (
                ConsoleError::UnknownCommand("DROP TABLE x".into()),
                sqlstate::SYNTAX_ERROR,
                "unsupported admin console command \"DROP TABLE x\"; try SHOW HELP",
            ),
            (
                ConsoleError::ExtendedProtocol,
                sqlstate::FEATURE_NOT_SUPPORTED,
                "the admin console takes simple queries only",
            ),
            (
                ControlError::UnknownService("nope".into()).into(),
                sqlstate::UNDEFINED_OBJECT,
                "no such service \"nope\"",
            ),
            (
                ControlError::PauseTimedOut { busy: 2 }.into(),
                sqlstate::OBJECT_IN_USE,
                "paused, but 2 server connection(s) are still in use",
            ),
            (
                ReloadError::NoConfigFile.into(),
                sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
                "this process was started from the environment, not a configuration file: restart it to change the configuration",
            ),
            (
                ReloadError::RestartNeeded { reasons: vec!["auth.method changed (needs a restart)".into()] }.into(),
                sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
                "1 change(s) need a restart: auth.method changed (needs a restart)",
            ),
            (
                ReloadError::from(crate::config::ConfigError { violations: vec!["a".into(), "b".into()] }).into(),
                sqlstate::CONFIG_FILE_ERROR,
                "invalid configuration (2 problem(s)):\n  - a\n  - b",
            ),
            (
                ReloadError::Io { path: "/x/budgets.toml".into(), source: std::io::ErrorKind::NotFound.into() }.into(),
                sqlstate::IO_ERROR,
                "cannot read /x/budgets.toml: entity not found",
            ),
        ];
        for (e, want_code, want_msg) in cases {
            let (sev, code, msg) = console_error_to_client(&e);
            assert_eq!((sev, code, msg.as_str()), (Severity::Error, want_code, want_msg), "{e:?}");
        }
        // The refusal text is the one the config loader prints at startup.
        let v = vec!["slices sum to 100".to_owned()];
        let startup = crate::config::ConfigError { violations: v.clone() }.to_string();
        assert_eq!(ReloadError::Invalid { violations: v }.to_string(), startup);
    }

    fn upstream_postgres(code: &str) -> (Severity, String, String) {
        let e = ProxyError::Upstream {
            upstream: "primary".into(),
            source: ServerError::Postgres { code: code.into(), message: "the database system is starting up".into() },
        };
        let (sev, code, msg) = e.to_client();
        (sev, code.to_owned(), msg)
    }

    #[test]
    fn upstream_operator_and_capacity_errors_keep_their_sqlstate() {
        for code in ["57P01", "57P02", "57P03", "57P04", "57P05", "53300"] {
            let (sev, got, msg) = upstream_postgres(code);
            assert_eq!((sev, got.as_str()), (Severity::Error, code));
            assert_eq!(msg, "pgbudget: upstream \"primary\": the database system is starting up");
        }
        for code in ["57P00", "57014", "42P01", "53200", "XX000", ""] {
            let (_, got, msg) = upstream_postgres(code);
            assert_eq!(got, sqlstate::CONNECTION_FAILURE, "{code}");
            assert!(msg.starts_with("pgbudget cannot reach upstream \"primary\""), "{msg}");
        }
        let auth = ProxyError::Upstream { upstream: "primary".into(), source: ServerError::Auth("no".into()) };
        assert_eq!(auth.to_client().1, sqlstate::CONNECTION_FAILURE);
    }

    #[test]
    fn protocol_version_and_pending_logins_codes() {
        let (sev, code, msg) = ProxyError::ClientProtocol(ProtocolError::Version { major: 2, minor: 0 }).to_client();
        assert_eq!((sev, code), (Severity::Fatal, "0A000"));
        assert_eq!(msg, "unsupported frontend protocol 2.0: server supports 3.0 to 3.0");
        let (sev, code, msg) = ProxyError::TooManyLogins(7).to_client();
        assert_eq!((sev, code), (Severity::Fatal, "53300"));
        assert_eq!(msg, "pgbudget: too many clients are logging in (max_pending_logins 7)");
        let (_, code, _) = ProxyError::ClientProtocol(ProtocolError::StartupLength(1 << 20)).to_client();
        assert_eq!(code, "08P01");
    }
}
