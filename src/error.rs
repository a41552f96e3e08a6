//! The session-layer error type and the one exhaustive mapping to severity, SQLSTATE and client-safe text.

use crate::admission::Refusal;
use crate::auth::AuthError;
use crate::protocol::{ProtocolError, Severity};
use crate::server::ServerError;
use std::time::Duration;

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
    #[error("load shed: service {service} share {share}: {refusal:?}")]
    Shed { service: String, share: u32, refusal: crate::admission::Refusal },
    #[error("client cancelled while queued for a server")]
    QueuedCancel,
    #[error("service {service} paused; waited {waited:?}")]
    Paused { service: String, waited: Duration },
    #[error("session ended by an operator's KILL")]
    Killed,
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
}

/// Stable label for logs (and later metrics) — fixed cardinality, never client input.
impl ProxyError {
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::ClientProtocol(_) => "client_protocol",
            ProxyError::Auth(_) => "auth",
            ProxyError::UnknownService(_) => "unknown_service",
            ProxyError::UnknownDatabase(_) => "unknown_database",
            ProxyError::BudgetExhausted { .. } => "budget_exhausted",
            ProxyError::Shed { .. } => "load_shed",
            ProxyError::QueuedCancel => "queued_cancel",
            ProxyError::Paused { .. } => "paused",
            ProxyError::Killed => "killed",
            ProxyError::IdleInTransaction(_) => "idle_in_transaction_timeout",
            ProxyError::ClientIdle(_) => "client_idle_timeout",
            ProxyError::Upstream { .. } => "upstream",
            ProxyError::ServerRejected { .. } => "server_rejected",
            ProxyError::ReadOnly { .. } => "read_only",
            ProxyError::RouteDisabled { .. } => "route_disabled",
            ProxyError::BadParameter(_) => "bad_parameter",
            ProxyError::ShuttingDown => "shutting_down",
            ProxyError::ClientIo(_) => "client_io",
        }
    }

    /// Severity, SQLSTATE and the message a client may see.
    pub fn to_client(&self) -> (Severity, &str, String) {
        use Severity::*;
        match self {
            ProxyError::ClientProtocol(e) => (Fatal, "08P01", format!("invalid frontend message: {e}")),
            ProxyError::Auth(AuthError::Protocol(_)) => (Fatal, "08P01", "invalid authentication exchange".into()),
            ProxyError::Auth(AuthError::Failed { user, .. }) => {
                (Fatal, "28P01", format!("password authentication failed for user \"{user}\""))
            }
            ProxyError::UnknownService(s) => {
                (Fatal, "3D000", format!("no budget for service \"{s}\": declare it under [services] in budgets.toml"))
            }
            ProxyError::UnknownDatabase(d) => (Fatal, "3D000", format!("database \"{d}\" is not served by pgbudget")),
            ProxyError::BudgetExhausted { service, share, waited } => (
                Error,
                "53300",
                format!(
                    "pgbudget: service \"{service}\" is using all {share} of its server connections; \
                     no connection freed up within {} ms",
                    waited.as_millis()
                ),
            ),
            ProxyError::Shed { service, share, refusal } => (
                Error,
                "53300",
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
            ProxyError::QueuedCancel => (Error, "57014", "canceling statement due to user request".into()),
            ProxyError::Paused { service, waited } => (
                Error,
                "57P03",
                format!(
                    "pgbudget: service \"{service}\" is paused by an operator; no RESUME within {} ms",
                    waited.as_millis()
                ),
            ),
            ProxyError::Killed => {
                (Fatal, "57P01", "terminating connection due to administrator command (pgbudget KILL)".into())
            }
            ProxyError::IdleInTransaction(d) => (
                Fatal,
                "25P03",
                format!("terminating connection due to idle-in-transaction timeout (pgbudget: {} ms)", d.as_millis()),
            ),
            ProxyError::ClientIdle(d) => (
                Fatal,
                "57P05",
                format!("terminating connection due to idle-session timeout (pgbudget: {} ms)", d.as_millis()),
            ),
            ProxyError::Upstream { upstream, source } => match source {
                ServerError::Auth(_) => {
                    (Fatal, "08006", format!("pgbudget could not log in to upstream \"{upstream}\": {source}"))
                }
                _ => (Error, "08006", format!("pgbudget cannot reach upstream \"{upstream}\": {source}")),
            },
            ProxyError::ServerRejected { code, message } => (Error, code.as_str(), message.clone()),
            ProxyError::ReadOnly { route, what } => {
                (Fatal, "25006", format!("pgbudget: read-only route \"{route}\" refuses {what}"))
            }
            ProxyError::RouteDisabled { service, route } => (
                Fatal,
                "3D000",
                format!("read-only route \"{route}\" is disabled for service \"{service}\" (read_only_share = 0)"),
            ),
            ProxyError::BadParameter(p) => (Fatal, "08P01", format!("unsupported startup parameter \"{p}\"")),
            ProxyError::ShuttingDown => (Fatal, "57P01", "pgbudget is shutting down".into()),
            ProxyError::ClientIo(e) => (Fatal, "08006", format!("client connection failed: {e}")),
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
            ProxyError::IdleInTransaction(Duration::from_secs(1)),
            ProxyError::ClientIdle(Duration::from_secs(1)),
            ProxyError::ServerRejected { code: "22023".into(), message: "bad value".into() },
            ProxyError::ReadOnly { route: "r".into(), what: "x".into() },
            ProxyError::RouteDisabled { service: "s".into(), route: "r".into() },
            ProxyError::BadParameter("p".into()),
            ProxyError::ShuttingDown,
            ProxyError::ClientIo(std::io::Error::other("x")),
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
}
