//! Hot reload (SIGHUP or console `RELOAD`): why one is refused, what it changed, and which changes need a
//! restart; `context` re-reads budgets.toml, validates it fully and swaps it in atomically. Kept pools keep their
//! connections; a shrunk pool closes idle connections first and never drops a transaction in flight; an invalid
//! file leaves the old configuration in force.

use crate::config::resolve::{Resolved, UpstreamTarget};
use crate::config::ConfigError;
use std::path::PathBuf;

/// Why a reload was refused; the old configuration then stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("this process was started from the environment, not a configuration file: restart it to change the configuration")]
    NoConfigFile,
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file breaks the budget rules (every violation is named).
    #[error(
        "invalid configuration ({} problem(s)):{}",
        violations.len(),
        violations.iter().map(|v| format!("\n  - {v}")).collect::<String>()
    )]
    Invalid { violations: Vec<String> },
    /// Valid, but it changes what only a restart can take over.
    #[error("{} change(s) need a restart: {}", reasons.len(), reasons.join("; "))]
    RestartNeeded { reasons: Vec<String> },
}

impl From<ConfigError> for ReloadError {
    fn from(e: ConfigError) -> Self {
        ReloadError::Invalid { violations: e.violations }
    }
}

impl ReloadError {
    /// How many problems the refusal names (the `violations` column of `config_reloads`).
    pub fn violations(&self) -> u32 {
        match self {
            ReloadError::Invalid { violations: v } | ReloadError::RestartNeeded { reasons: v } => v.len().max(1) as u32,
            ReloadError::NoConfigFile | ReloadError::Io { .. } => 1,
        }
    }
}

/// What a reload changed, for the log and the console.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl std::fmt::Display for ReloadSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &Vec<String>| if v.is_empty() { "-".to_owned() } else { v.join(",") };
        write!(f, "added={} removed={} changed={}", list(&self.added), list(&self.removed), list(&self.changed))
    }
}

/// The same server, reached the same way: address, login, ceiling, and every URL parameter that shapes a
/// connection (TLS, allowed authentication, options, timeouts, session attributes, socket).
fn same_target(a: &UpstreamTarget, b: &UpstreamTarget) -> bool {
    (&a.host, a.port, &a.user, &a.password, &a.database, a.ceiling, a.reserved)
        == (&b.host, b.port, &b.user, &b.password, &b.database, b.ceiling, b.reserved)
        && (&a.tls_params, &a.auth, &a.options, a.connect_timeout, a.session_attrs, &a.socket_dir)
            == (&b.tls_params, &b.auth, &b.options, b.connect_timeout, b.session_attrs, &b.socket_dir)
}

/// Every difference between `old` and `new` that a running process cannot take over.
pub fn restart_needed(old: &Resolved, new: &Resolved) -> Vec<String> {
    let (o, n) = (&old.config, &new.config);
    let mut v = Vec::new();
    let mut check = |what: &str, same: bool| {
        if !same {
            v.push(format!("{what} changed (needs a restart)"));
        }
    };
    check("proxy.mode", o.proxy.mode == n.proxy.mode);
    check("proxy.service_from", o.proxy.service_from == n.proxy.service_from);
    check("proxy.application_name_prefix", o.proxy.application_name_prefix == n.proxy.application_name_prefix);
    check("the sidecar service", old.sidecar_service == new.sidecar_service);
    check("proxy.max_pending_logins", o.proxy.max_pending_logins == n.proxy.max_pending_logins);
    check("auth.method", o.auth.method == n.auth.method);
    check("admin.console_database", o.admin.console_database == n.admin.console_database);
    check("read_only.database", o.read_only.database == n.read_only.database);
    check("read_only.on_replica_down", o.read_only.on_replica_down == n.read_only.on_replica_down);
    check("read_only.enforce", o.read_only.enforce == n.read_only.enforce);
    check(
        "read_only.user or password_env",
        (&o.read_only.user, &o.read_only.password_env) == (&n.read_only.user, &n.read_only.password_env),
    );
    check(
        "read_only.replica_url or replica_ceiling",
        match (&old.replica, &new.replica) {
            (None, None) => true,
            (Some(a), Some(b)) => same_target(a, b),
            _ => false,
        },
    );
    let names = |r: &Resolved| r.upstreams.keys().cloned().collect::<Vec<_>>();
    if names(old) != names(new) {
        v.push("the set of [upstreams] changed (needs a restart)".into());
    } else {
        for (name, a) in &old.upstreams {
            check(&format!("upstreams.{name} (url, ceiling or reserved)"), same_target(a, &new.upstreams[name]));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Env};

    fn resolved(query: &str) -> Resolved {
        let text = format!(
            "[proxy]\nservice = \"web\"\n[upstreams.primary]\nurl = \"postgres://u:p@db/app{query}\"\nceiling = 10\n\
             [services.web]\nslice = 3\n"
        );
        Resolved::resolve(Config::parse(&text).unwrap(), &Env::default()).unwrap()
    }

    #[test]
    fn a_changed_url_parameter_needs_a_restart() {
        let old = resolved("");
        assert!(restart_needed(&old, &resolved("")).is_empty());
        for query in ["?sslmode=require", "?require_auth=md5", "?options=-c%20x%3D1", "?connect_timeout=9"] {
            let why = restart_needed(&old, &resolved(query));
            assert!(why.iter().any(|w| w.contains("upstreams.primary")), "{query}: {why:?}");
        }
    }
}
