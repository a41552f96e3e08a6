//! The configuration of the simple case from the environment alone: one upstream from `DATABASE_URL`, the slice
//! table from `PGBUDGET_SLICES`. It is built as the equivalent `budgets.toml` text and parsed and resolved by the
//! same code as a file, so both give the same validation and the same `pgbudget check` table.

use super::{Config, ConfigError, Env};

/// The variable whose presence selects the environment configuration (when no config file is named).
pub const SLICES_VAR: &str = "PGBUDGET_SLICES";

/// Every variable this module reads, for the README and error messages.
pub const VARS: &[(&str, &str)] = &[
    (SLICES_VAR, "service=slice[:session|:transaction], comma-separated (required)"),
    ("DATABASE_URL", "the upstream Postgres (required)"),
    ("PGBUDGET_CEILING", "connections the upstream accepts from all services together (default 97)"),
    ("PGBUDGET_RESERVED", "connections held back under the ceiling (default 0)"),
    ("PGBUDGET_SERVICE", "this sidecar's service when RAILWAY_SERVICE_NAME is unset"),
    ("PGBUDGET_SPLIT_PER_PROCESS", "1: divide each slice by RAILWAY_REPLICA_COUNT x WEB_CONCURRENCY (default off)"),
    ("PGBUDGET_LAKE_DIR", "turn the embedded lake on, kept in this directory (default: off)"),
    ("PGBUDGET_AUTH_PASSTHROUGH", "1: roles Postgres knows log in with their own passwords ([auth] passthrough)"),
];

/// Set in the container image: listeners default to all interfaces (see `container_listen`).
pub const CONTAINER_VAR: &str = "PGBUDGET_CONTAINER";

/// The listener defaults of the container image (`PGBUDGET_CONTAINER=1`): the proxy on `[::]:6432` and the admin
/// listener on `[::]:$PORT` (`9187` without `PORT`), so the platform's health check and Prometheus reach it from
/// outside the container; `PGBUDGET_BIND_HOST` replaces `[::]` (e.g. `0.0.0.0`). `(None, None)` outside the
/// image; `PGBUDGET_LISTEN`/`PGBUDGET_ADMIN_LISTEN` win either way.
pub fn container_listen(env: &Env) -> (Option<String>, Option<String>) {
    if !env.get(CONTAINER_VAR).is_some_and(|v| matches!(v, "1" | "true" | "yes")) {
        return (None, None);
    }
    let port = env.get("PORT").and_then(|p| p.trim().parse::<u16>().ok()).unwrap_or(9187);
    let host = env.get("PGBUDGET_BIND_HOST").unwrap_or("[::]");
    (Some(format!("{host}:6432")), Some(format!("{host}:{port}")))
}

/// The environment names a configuration (`PGBUDGET_SLICES` is set).
pub fn present(env: &Env) -> bool {
    env.get(SLICES_VAR).is_some()
}

/// Build the configuration the variables describe; every malformed variable or entry is a violation.
pub fn config(env: &Env) -> Result<Config, ConfigError> {
    let text = toml_text(env)?;
    Config::parse(&text)
}

/// The `budgets.toml` equivalent of the environment (what `config` parses).
pub fn toml_text(env: &Env) -> Result<String, ConfigError> {
    let mut v = Vec::new();
    let mut root = toml::Table::new();

    let mut proxy = toml::Table::new();
    proxy.insert("mode".into(), "sidecar".into());
    if let Some(s) = env.get("PGBUDGET_SERVICE") {
        proxy.insert("service".into(), s.trim().into());
    }
    if let Some(split) = flag(env, "PGBUDGET_SPLIT_PER_PROCESS", &mut v) {
        proxy.insert("split_per_process".into(), split.into());
    }
    root.insert("proxy".into(), proxy.into());
    if let Some(on) = flag(env, "PGBUDGET_AUTH_PASSTHROUGH", &mut v) {
        let mut auth = toml::Table::new();
        auth.insert("method".into(), "scram-sha-256".into());
        auth.insert("passthrough".into(), on.into());
        root.insert("auth".into(), auth.into());
    }

    let mut upstream = toml::Table::new();
    // Expanded (and reported when unset) by the resolver, exactly as `url = "${DATABASE_URL}"` in a file.
    upstream.insert("url".into(), "${DATABASE_URL}".into());
    upstream.insert("ceiling".into(), number(env, "PGBUDGET_CEILING", 97, &mut v).into());
    upstream.insert("reserved".into(), number(env, "PGBUDGET_RESERVED", 0, &mut v).into());
    let mut upstreams = toml::Table::new();
    upstreams.insert("primary".into(), upstream.into());
    root.insert("upstreams".into(), upstreams.into());

    let mut services = toml::Table::new();
    match env.get(SLICES_VAR) {
        None => v.push(format!("{SLICES_VAR} is not set (e.g. {SLICES_VAR}=\"worker=38,web=15,landing=5:session\")")),
        Some(spec) => {
            for (name, service) in slices(spec, &mut v) {
                if services.contains_key(&name) {
                    v.push(format!("{SLICES_VAR}: service `{name}` is given twice"));
                } else {
                    services.insert(name, service.into());
                }
            }
        }
    }
    root.insert("services".into(), services.into());

    #[cfg(feature = "lake")]
    if let Some(dir) = env.get("PGBUDGET_LAKE_DIR") {
        let mut lake = toml::Table::new();
        lake.insert("enabled".into(), true.into());
        lake.insert("dir".into(), dir.into());
        root.insert("lake".into(), lake.into());
    }

    if !v.is_empty() {
        return Err(ConfigError { violations: v });
    }
    toml::to_string(&root).map_err(|e| ConfigError { violations: vec![format!("cannot build the configuration: {e}")] })
}

/// A yes/no variable: `None` when unset (or not a yes/no, which is a violation).
fn flag(env: &Env, var: &str, v: &mut Vec<String>) -> Option<bool> {
    match env.get(var)?.trim() {
        "1" | "true" | "yes" => Some(true),
        "0" | "false" | "no" => Some(false),
        other => {
            v.push(format!("{var} = {other:?} is not 1/true/yes or 0/false/no"));
            None
        }
    }
}

/// A non-negative count from `var`, `default` when unset.
fn number(env: &Env, var: &str, default: i64, v: &mut Vec<String>) -> i64 {
    match env.get(var) {
        None => default,
        Some(s) => match s.trim().parse::<u32>() {
            Ok(n) => i64::from(n),
            Err(_) => {
                v.push(format!("{var} = {s:?} is not a whole number of connections"));
                default
            }
        },
    }
}

/// Parse `name=slice[:mode]` entries separated by commas (spaces around them are allowed).
fn slices(spec: &str, v: &mut Vec<String>) -> Vec<(String, toml::Table)> {
    let mut out = Vec::new();
    for entry in spec.split(',').map(str::trim) {
        if entry.is_empty() {
            continue;
        }
        let Some((name, rest)) = entry.split_once('=') else {
            v.push(format!("{SLICES_VAR}: `{entry}` is not service=slice"));
            continue;
        };
        let name = name.trim();
        let (count, mode) = match rest.split_once(':') {
            Some((c, m)) => (c.trim(), Some(m.trim())),
            None => (rest.trim(), None),
        };
        let valid_name =
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !valid_name {
            v.push(format!("{SLICES_VAR}: `{name}` is not a service name (letters, digits, - _ .)"));
            continue;
        }
        let Ok(slice) = count.parse::<u32>() else {
            v.push(format!("{SLICES_VAR}: slice of `{name}` is {count:?}, not a whole number"));
            continue;
        };
        let mut service = toml::Table::new();
        service.insert("slice".into(), i64::from(slice).into());
        match mode {
            None => {}
            Some(m @ ("session" | "transaction")) => {
                service.insert("pool_mode".into(), m.into());
            }
            Some(m) => {
                v.push(format!("{SLICES_VAR}: pool mode of `{name}` is {m:?}, not session or transaction"));
                continue;
            }
        }
        out.push((name.to_owned(), service));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::resolve::Resolved;

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env { vars: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
    }

    #[test]
    fn container_listeners_take_port() {
        assert_eq!(container_listen(&env(&[("PORT", "8080")])), (None, None));
        let c = container_listen(&env(&[("PGBUDGET_CONTAINER", "1"), ("PORT", "8080")]));
        assert_eq!(c, (Some("[::]:6432".into()), Some("[::]:8080".into())));
        let c = container_listen(&env(&[("PGBUDGET_CONTAINER", "1")]));
        assert_eq!(c.1.as_deref(), Some("[::]:9187"));
        let c =
            container_listen(&env(&[("PGBUDGET_CONTAINER", "1"), ("PGBUDGET_BIND_HOST", "0.0.0.0"), ("PORT", "x")]));
        assert_eq!(c, (Some("0.0.0.0:6432".into()), Some("0.0.0.0:9187".into())));
    }

    #[test]
    fn slices_become_services_with_the_file_defaults() {
        let e = env(&[
            ("PGBUDGET_SLICES", "worker=38, canvas=20,web=15,landing=5:session,evergreen=5:session"),
            ("DATABASE_URL", "postgres://u:p@db.internal:5432/app"),
            ("RAILWAY_SERVICE_NAME", "web"),
        ]);
        let r = Resolved::resolve(config(&e).unwrap(), &e).unwrap();
        assert_eq!(r.services.len(), 5);
        assert_eq!(r.services["worker"].slice, 38);
        assert_eq!(r.services["landing"].pool_mode(), crate::config::PoolMode::Session);
        assert_eq!(r.services["canvas"].pool_mode(), crate::config::PoolMode::Transaction);
        assert_eq!(r.upstreams["primary"].ceiling, 97);
        assert_eq!(r.sidecar_service.as_deref(), Some("web"));
        #[cfg(feature = "lake")]
        assert!(!r.config.lake.enabled);
    }

    #[test]
    fn every_bad_entry_is_named() {
        let e = env(&[
            ("PGBUDGET_SLICES", "worker=3x,=4,web,canvas=2:pooled,a b=1,web=5,web=6"),
            ("PGBUDGET_CEILING", "-1"),
            ("PGBUDGET_SPLIT_PER_PROCESS", "maybe"),
        ]);
        let err = config(&e).unwrap_err();
        let all = err.violations.join("\n");
        for needle in [
            "slice of `worker` is \"3x\"",
            "`` is not a service name",
            "`web` is not service=slice",
            "pool mode of `canvas` is \"pooled\"",
            "`a b` is not a service name",
            "service `web` is given twice",
            "PGBUDGET_CEILING = \"-1\"",
            "PGBUDGET_SPLIT_PER_PROCESS = \"maybe\"",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert_eq!(err.violations.len(), 8, "{all}");
    }

    #[test]
    fn budget_rules_apply_as_for_a_file() {
        let e = env(&[
            ("PGBUDGET_SLICES", "worker=80,web=30"),
            ("PGBUDGET_CEILING", "97"),
            ("PGBUDGET_RESERVED", "2"),
            ("DATABASE_URL", "postgres://u:p@h/db"),
            ("PGBUDGET_SERVICE", "web"),
        ]);
        let err = Resolved::resolve(config(&e).unwrap(), &e).unwrap_err();
        assert!(err.violations.iter().any(|v| v.contains("ceiling")), "{:?}", err.violations);
    }

    #[test]
    fn passthrough_from_the_environment() {
        let base = [("PGBUDGET_SLICES", "web=5"), ("PGBUDGET_SERVICE", "web"), ("DATABASE_URL", "postgres://u:p@h/db")];
        let on = env(&[&base[..], &[("PGBUDGET_AUTH_PASSTHROUGH", "1")]].concat());
        let r = Resolved::resolve(config(&on).unwrap(), &on).unwrap();
        assert!(r.config.auth.passthrough);
        assert_eq!(r.config.auth.method, crate::config::AuthMethod::Scram);
        assert!(!config(&env(&base)).unwrap().auth.passthrough, "off by default");
        let bad = env(&[&base[..], &[("PGBUDGET_AUTH_PASSTHROUGH", "sure")]].concat());
        assert!(config(&bad).unwrap_err().violations[0].contains("PGBUDGET_AUTH_PASSTHROUGH = \"sure\""));
    }

    #[test]
    fn a_missing_database_url_is_reported_by_name() {
        let e = env(&[("PGBUDGET_SLICES", "web=5"), ("PGBUDGET_SERVICE", "web")]);
        let err = Resolved::resolve(config(&e).unwrap(), &e).unwrap_err();
        assert!(err.violations.iter().any(|v| v.contains("DATABASE_URL")), "{:?}", err.violations);
    }

    #[test]
    fn values_with_quotes_cannot_change_the_structure() {
        let e = env(&[
            ("PGBUDGET_SLICES", "web=5"),
            ("PGBUDGET_SERVICE", "web\"\n[admin]\nlisten = \"0.0.0.0:1\""),
            ("PGBUDGET_LAKE_DIR", "/tmp/x\"y"),
        ]);
        let c = config(&e).unwrap();
        assert_eq!(c.proxy.service.as_deref(), Some("web\"\n[admin]\nlisten = \"0.0.0.0:1\""));
        assert_eq!(c.admin.listen, "127.0.0.1:9187");
        #[cfg(feature = "lake")]
        assert_eq!(c.lake.dir, std::path::PathBuf::from("/tmp/x\"y"));
    }
}
