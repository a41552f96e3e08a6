//! Tests of the error mapping: every variant's SQLSTATE and client text.

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
        ProxyError::Shed { service: "w".into(), share: 10, refusal: Refusal::QueueFull { waiting: 3, max_waiting: 3 } },
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
