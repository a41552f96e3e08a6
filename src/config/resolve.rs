//! Budget resolution: turns a parsed config plus the process environment into per-service shares under
//! each upstream's ceiling, checking every invariant and naming each one that breaks.

use crate::config::{AuthMethod, Config, ConfigError, Env, Mode, PoolMode, ServiceConfig, ServiceFrom};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

pub use super::upstream_url::{parse_upstream_url, UpstreamTarget};

/// One service's resolved budget.
#[derive(Debug, Clone)]
pub struct ServiceBudget {
    pub name: String,
    pub upstream: String,
    pub slice: u32,
    /// What this process may open on the read-write route: the slice (or its per-process split) less `ro_share`.
    pub share: u32,
    /// What this process may open on the read-only route (0: route disabled for this service).
    pub ro_share: u32,
    pub settings: ServiceConfig,
}

impl ServiceBudget {
    pub fn pool_mode(&self) -> PoolMode {
        self.settings.pool_mode
    }
}

/// The validated configuration every other module works from.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub config: Config,
    pub upstreams: BTreeMap<String, UpstreamTarget>,
    pub services: BTreeMap<String, ServiceBudget>,
    /// The read-only route's replica, when one is configured.
    pub replica: Option<UpstreamTarget>,
    /// Sidecar mode: the service every client belongs to.
    pub sidecar_service: Option<String>,
    pub processes: u32,
    /// `[[auth.users]]` that log in to the upstream as their own role (the rest use the URL's).
    pub logins: BTreeMap<String, crate::config::databases::UpstreamLogin>,
    /// The certificate and key for clients (`[tls]`), read when the configuration is (so a reload renews it).
    pub tls: Option<std::sync::Arc<crate::tls::listener::Listener>>,
    /// `[read_only] user`: the role read-only pools log in as.
    pub ro_login: Option<crate::config::databases::UpstreamLogin>,
}

const MAX_CEILING: u32 = 100_000;

fn check_duration(v: &mut Vec<String>, what: &str, d: Duration, min: Duration, max: Duration) {
    if d < min || d > max {
        v.push(format!("{what} = {} is out of range ({} ..= {})", fmt_d(d), fmt_d(min), fmt_d(max)));
    }
}

fn fmt_d(d: Duration) -> String {
    humantime_serde::re::humantime::format_duration(d).to_string()
}

impl Resolved {
    /// Validate `config` against every invariant; on failure all violations are returned.
    pub fn resolve(config: Config, env: &Env) -> Result<Resolved, ConfigError> {
        let mut v = Vec::new();
        let p = &config.proxy;
        if p.listen.parse::<std::net::SocketAddr>().is_err() {
            v.push(format!("proxy.listen = {:?} is not an address:port", p.listen));
        }
        if !(1..=1000).contains(&p.slice_floor) {
            v.push(format!("proxy.slice_floor = {} is out of range (1 ..= 1000)", p.slice_floor));
        }
        if !(1..=1000).contains(&p.share_floor) {
            v.push(format!("proxy.share_floor = {} is out of range (1 ..= 1000)", p.share_floor));
        }
        check_duration(&mut v, "proxy.drain_timeout", p.drain_timeout, Duration::ZERO, Duration::from_secs(3600));
        let other = p.other_database_idle_timeout;
        check_duration(&mut v, "proxy.other_database_idle_timeout", other, Duration::ZERO, Duration::from_secs(86_400));
        if p.max_pending_logins < 1 {
            v.push(format!("proxy.max_pending_logins = {} must be at least 1", p.max_pending_logins));
        }
        if !(1024..=crate::protocol::LARGE_MESSAGE).contains(&p.max_query_size) {
            v.push(format!("proxy.max_query_size = {} is out of range (1024 ..= 1073741823 bytes)", p.max_query_size));
        }
        let a = &config.admin;
        if !a.listen.is_empty() && a.listen.parse::<std::net::SocketAddr>().is_err() {
            v.push(format!("admin.listen = {:?} is not an address:port (or \"\" to disable)", a.listen));
        }
        if let Some(raw) = env.get("PGBUDGET_POOL_LOG_INTERVAL") {
            if crate::config::parse_interval(raw).is_none() {
                v.push(format!("PGBUDGET_POOL_LOG_INTERVAL = {raw:?} is not a duration (e.g. 60s) or seconds"));
            }
        }
        check_duration(
            &mut v,
            "admin.pool_log_interval",
            a.pool_log_interval,
            Duration::ZERO,
            Duration::from_secs(86_400),
        );
        if config.upstreams.is_empty() {
            v.push("no [upstreams] declared".into());
        }
        if config.services.is_empty() {
            v.push("no [services] declared".into());
        }

        let mut upstreams = BTreeMap::new();
        for (name, u) in &config.upstreams {
            if !(1..=MAX_CEILING).contains(&u.ceiling) {
                v.push(format!("upstreams.{name}.ceiling = {} is out of range (1 ..= {MAX_CEILING})", u.ceiling));
            }
            if u.reserved >= u.ceiling.max(1) {
                v.push(format!("upstreams.{name}.reserved = {} leaves nothing of ceiling {}", u.reserved, u.ceiling));
            }
            match parse_upstream_url(name, &u.url, env) {
                Ok(mut t) => {
                    t.ceiling = u.ceiling;
                    t.reserved = u.reserved;
                    if u.allow_cleartext_upstream && t.auth.source != "the URL's require_auth" {
                        t.auth.password = true;
                        t.auth.md5 = true;
                        t.auth.source = "allow_cleartext_upstream = true";
                    }
                    let at = format!("upstreams.{name}");
                    t.databases = crate::config::databases::DatabaseMap::parse(&at, &u.databases, &t.database, &mut v);
                    upstreams.insert(name.clone(), t);
                }
                Err(e) => v.push(e),
            }
        }

        let processes = if p.split_per_process { env.processes() } else { 1 };
        let mut services = BTreeMap::new();
        let mut sums: BTreeMap<&str, u32> = BTreeMap::new();
        let ro = &config.read_only;
        let mut replica = None;
        if !ro.replica_url.is_empty() {
            if ro.database.is_empty() {
                v.push("read_only.replica_url is set but read_only.database (the route's alias) is empty".into());
            }
            if !(1..=MAX_CEILING).contains(&ro.replica_ceiling) {
                v.push(format!(
                    "read_only.replica_ceiling = {} is out of range (1 ..= {MAX_CEILING})",
                    ro.replica_ceiling
                ));
            }
            match parse_upstream_url("replica", &ro.replica_url, env) {
                Ok(mut t) => {
                    t.ceiling = ro.replica_ceiling;
                    replica = Some(t);
                }
                Err(e) => v.push(e.replace("upstreams.replica.url", "read_only.replica_url")),
            }
        }
        if !ro.database.is_empty()
            && (ro.database == config.admin.console_database || upstreams.values().any(|u| u.database == ro.database))
        {
            v.push(format!(
                "read_only.database = {:?} must differ from every real database and the console",
                ro.database
            ));
        }
        let mut replica_sum = 0;
        for (name, s) in &config.services {
            let at = format!("services.{name}");
            if !valid_name(name) {
                v.push(format!("{at}: service names may use only letters, digits, '_' and '-'"));
            }
            if s.slice < p.slice_floor {
                v.push(format!("{at}.slice = {} is below the floor of {}", s.slice, p.slice_floor));
            }
            if s.read_only_share > 0 && ro.database.is_empty() {
                v.push(format!(
                    "{at}.read_only_share = {} needs [read_only] database = \"<alias>\"",
                    s.read_only_share
                ));
            }
            if s.read_only_share >= s.slice.max(1) {
                v.push(format!("{at}.read_only_share = {} leaves nothing of slice {}", s.read_only_share, s.slice));
            }
            let on_replica = if replica.is_some() { s.read_only_share.min(s.slice) } else { 0 };
            replica_sum += on_replica;
            match config.upstreams.get(&s.upstream) {
                None => v.push(format!("{at}.upstream = {:?} is not a declared upstream", s.upstream)),
                Some(_) => *sums.entry(s.upstream.as_str()).or_default() += s.slice - on_replica,
            }
            let ms = Duration::from_millis;
            let h = Duration::from_secs(3600);
            check_duration(&mut v, &format!("{at}.checkout_timeout"), s.checkout_timeout, ms(10), ms(600_000));
            check_duration(&mut v, &format!("{at}.connect_timeout"), s.connect_timeout, ms(100), ms(120_000));
            check_duration(&mut v, &format!("{at}.server_idle_timeout"), s.server_idle_timeout, ms(1000), h);
            check_duration(&mut v, &format!("{at}.server_lifetime"), s.server_lifetime, ms(1000), 24 * h);
            check_duration(&mut v, &format!("{at}.server_check_delay"), s.server_check_delay, ms(0), h);
            check_duration(&mut v, &format!("{at}.reset_timeout"), s.reset_timeout, ms(100), ms(600_000));
            let total = if processes > 1 { (s.slice / processes).max(p.share_floor).min(s.slice) } else { s.slice };
            let ro_share = match s.read_only_share {
                0 => 0,
                r if processes > 1 => r.div_ceil(processes).min(total.saturating_sub(1)).max(1),
                r => r.min(total.saturating_sub(1)),
            };
            let share = total - ro_share;
            check_duration(&mut v, &format!("{at}.notice_after"), s.notice_after, ms(0), h);
            for (what, d) in [
                ("idle_in_transaction_timeout", s.idle_in_transaction_timeout),
                ("query_timeout", s.query_timeout),
                ("client_idle_timeout", s.client_idle_timeout),
                ("pin_idle_timeout", s.pin_idle_timeout),
                ("terminate_window", s.terminate_window),
            ] {
                check_duration(&mut v, &format!("{at}.{what}"), d, ms(0), 24 * h);
                if !d.is_zero() && d < ms(100) {
                    v.push(format!("{at}.{what} = {} is below 100ms (use 0 to turn it off)", fmt_d(d)));
                }
            }
            if let Some(a) = &s.admission {
                check_admission(&mut v, &at, a, share, ro_share);
            }
            if s.max_prepared_statements > 100_000 {
                v.push(format!("{at}.max_prepared_statements = {} is over 100000", s.max_prepared_statements));
            }
            services.insert(
                name.clone(),
                ServiceBudget {
                    name: name.clone(),
                    upstream: s.upstream.clone(),
                    slice: s.slice,
                    share,
                    ro_share,
                    settings: s.clone(),
                },
            );
        }
        for (up, sum) in &sums {
            let u = &config.upstreams[*up];
            if sum + u.reserved > u.ceiling {
                v.push(format!(
                    "upstream {up}: slices sum to {sum} + {} reserved = {} which exceeds the ceiling of {}",
                    u.reserved,
                    sum + u.reserved,
                    u.ceiling
                ));
            }
        }

        if let Some(r) = &replica {
            if replica_sum > r.ceiling {
                v.push(format!(
                    "replica: read_only_share values sum to {replica_sum} which exceeds read_only.replica_ceiling of {}",
                    r.ceiling
                ));
            }
        }

        let mut sidecar_service = None;
        match p.mode {
            Mode::Sidecar => {
                let from_env = env.get("RAILWAY_SERVICE_NAME").map(str::to_owned);
                match from_env.clone().or_else(|| p.service.clone()) {
                    None => v.push("sidecar mode needs RAILWAY_SERVICE_NAME or proxy.service to pick a service".into()),
                    Some(s) if !config.services.contains_key(&s) => {
                        let src = if from_env.is_some() { "RAILWAY_SERVICE_NAME" } else { "proxy.service" };
                        v.push(format!("{src} = {s:?} is not a service in [services]"));
                    }
                    Some(s) => sidecar_service = Some(s),
                }
            }
            Mode::Shared if p.service_from == ServiceFrom::User => {
                for u in &config.auth.users {
                    match &u.service {
                        None => v.push(format!("auth user {:?} needs `service` when service_from = \"user\"", u.name)),
                        Some(s) if !config.services.contains_key(s) => {
                            v.push(format!("auth user {:?}: service {s:?} is not in [services]", u.name))
                        }
                        Some(_) => {}
                    }
                }
            }
            Mode::Shared => {}
        }
        for u in &config.auth.users {
            let forms = [&u.password_env, &u.scram, &u.md5].iter().filter(|f| f.is_some()).count();
            if config.auth.method != AuthMethod::Trust && forms != 1 {
                v.push(format!("auth user {:?} needs exactly one of password_env, scram, md5", u.name));
            }
            if let Some(var) = &u.password_env {
                if env.get(var).is_none() {
                    v.push(format!("auth user {:?}: environment variable {var} is not set", u.name));
                }
            }
            if let Some(s) = &u.scram {
                if crate::config::users::ScramVerifier::parse(s).is_none() {
                    v.push(format!("auth user {:?}: scram is not a SCRAM-SHA-256 verifier", u.name));
                }
            }
            if let Some(m) = &u.md5 {
                if !crate::config::users::is_md5_secret(m) {
                    v.push(format!(
                        "auth user {:?}: md5 is not an md5 secret (\"md5\" followed by 32 lowercase hex digits)",
                        u.name
                    ));
                }
            }
            if config.auth.method == AuthMethod::Md5 && u.scram.is_some() {
                v.push(format!("auth user {:?}: a SCRAM verifier cannot serve md5 authentication", u.name));
            }
        }
        if config.auth.passthrough {
            if config.auth.method == AuthMethod::Trust {
                v.push(
                    "auth.passthrough needs method = \"scram-sha-256\" or \"md5\" (the client's proof is what \
                     logs its servers in)"
                        .into(),
                );
            }
            if !config.auth.auth_query.contains("$1") {
                v.push("auth.auth_query must take the role name as $1".into());
            }
        }
        #[cfg(feature = "lake")]
        if config.lake.enabled {
            v.extend(config.lake.validate());
            let lake_pg = config.lake.catalog.starts_with("postgres:");
            // Reader and flush thread, the flush lock's session, and maintenance's short-lived lock session.
            let need = config.lake.pg_pool_max_connections + 2;
            if lake_pg && config.upstreams.values().all(|u| u.reserved < need) {
                v.push(format!(
                    "lake: a Postgres catalog opens up to {need} connections ({} pooled + the flush and maintenance lock sessions); \
                     reserve them on its upstream (reserved = {need})",
                    config.lake.pg_pool_max_connections
                ));
            }
        }
        let t = &config.tls;
        let tls = match (t.mode(), t.cert.is_empty() || t.key.is_empty()) {
            (crate::config::TlsMode::Disable, _) => None,
            (mode, true) => {
                v.push(format!("tls.mode = {mode:?} needs tls.cert and tls.key (PEM files)").to_lowercase());
                None
            }
            (_, false) => match crate::tls::listener::Listener::load(t.cert.as_ref(), t.key.as_ref()) {
                Ok(l) => Some(std::sync::Arc::new(l)),
                Err(e) => {
                    v.push(e);
                    None
                }
            },
        };
        let served = upstreams.iter().map(|(n, t)| (n.clone(), t.databases.clone())).collect();
        let logins = crate::config::databases::resolve_logins(&config, &served, env, &mut v);
        let ro_login = config.read_only.resolve(env, &mut v);
        if !v.is_empty() {
            return Err(ConfigError { violations: v });
        }
        let mut config = config;
        if let Some(d) = env.get("PGBUDGET_POOL_LOG_INTERVAL").and_then(crate::config::parse_interval) {
            config.admin.pool_log_interval = d;
        }
        Ok(Resolved { config, upstreams, services, replica, sidecar_service, processes, logins, tls, ro_login })
    }

    /// Slices an upstream carries: every service on it, less read-only shares served by a replica.
    pub fn upstream_slices(&self, name: &str) -> u32 {
        let on_replica = |s: &ServiceBudget| if self.replica.is_some() { s.settings.read_only_share } else { 0 };
        self.services.values().filter(|s| s.upstream == name).map(|s| s.slice - on_replica(s)).sum()
    }

    /// Where read-only routes go: `replica`, `primary_fallthrough`, or `disabled` when no alias is set.
    pub fn ro_routing(&self) -> &'static str {
        if self.config.read_only.database.is_empty() {
            "disabled"
        } else if self.replica.is_some() {
            "replica"
        } else {
            "primary_fallthrough"
        }
    }

    /// The budget table `pgbudget check` prints.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<16} {:<12} {:>6} {:>6} {:>8} {:<12}",
            "service", "upstream", "slice", "share", "ro_share", "pool_mode"
        );
        for s in self.services.values() {
            let mode = match s.pool_mode() {
                PoolMode::Session => "session",
                PoolMode::Transaction => "transaction",
            };
            let _ = writeln!(
                out,
                "{:<16} {:<12} {:>6} {:>6} {:>8} {:<12}",
                s.name, s.upstream, s.slice, s.share, s.ro_share, mode
            );
        }
        for u in self.upstreams.values() {
            let sum = self.upstream_slices(&u.name);
            let _ = writeln!(
                out,
                "upstream {}: slices {} + reserved {} = {} of ceiling {} (headroom {})",
                u.name,
                sum,
                u.reserved,
                sum + u.reserved,
                u.ceiling,
                u.ceiling - sum - u.reserved
            );
            let _ = writeln!(out, "upstream {}: databases {}", u.name, u.databases.describe());
        }
        let own: Vec<String> = self.logins.iter().map(|(user, l)| format!("{user} -> {}", l.user)).collect();
        if !own.is_empty() {
            let _ = writeln!(out, "upstream roles: {}", own.join(", "));
        }
        if let Some(r) = &self.replica {
            let sum: u32 = self.services.values().map(|s| s.settings.read_only_share).sum();
            let _ = writeln!(out, "replica {}:{}: read-only shares {} of ceiling {}", r.host, r.port, sum, r.ceiling);
        }
        let ro = &self.config.read_only;
        let _ = writeln!(out, "read-only route: {} (database alias {:?})", self.ro_routing(), ro.database);
        if !ro.database.is_empty() {
            let what = match ro.enforce {
                crate::config::Enforce::Replica => "the upstream must be a hot standby (pg_is_in_recovery)",
                crate::config::Enforce::Role => "its role must be able to write nothing it can reach",
                crate::config::Enforce::Session => {
                    "default_transaction_read_only + statement filter + tripwire: this stops mistakes, not a hostile client"
                }
            };
            let _ = writeln!(out, "read-only enforcement: {} ({what})", ro.enforce.as_str());
        }
        let _ = writeln!(out, "processes per slice: {}", self.processes);
        if let Some(s) = &self.sidecar_service {
            let _ = writeln!(out, "sidecar service: {s}");
        }
        out
    }
}

/// `warn < shed < hard_reject <= 1`, a queue bound in range, and real headroom for an exempt class.
fn check_admission(v: &mut Vec<String>, at: &str, a: &crate::config::AdmissionConfig, share: u32, ro_share: u32) {
    let ordered = 0.0 < a.warn && a.warn < a.shed && a.shed < a.hard_reject && a.hard_reject <= 1.0;
    if !ordered {
        v.push(format!(
            "{at}.admission: thresholds must satisfy 0 < warn < shed < hard_reject <= 1 (got warn = {}, shed = {}, hard_reject = {})",
            a.warn, a.shed, a.hard_reject
        ));
    }
    if a.max_waiting.is_some_and(|m| m > 100_000) {
        v.push(format!("{at}.admission.max_waiting = {} is out of range (0 ..= 100000)", a.max_waiting.unwrap_or(0)));
    }
    let has_exempt = !a.exempt_application_names.is_empty() || !a.exempt_users.is_empty();
    for (route, n) in [("read-write", share), ("read-only", ro_share)] {
        if n == 0 || !ordered {
            continue;
        }
        let line = crate::config::hard_line(a.hard_reject, n);
        if has_exempt && line >= n {
            v.push(format!(
                "{at}.admission: hard_reject = {} of the {route} share {n} leaves no headroom for the exempt class",
                a.hard_reject
            ));
        }
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[cfg(test)]
#[path = "resolve_tests.rs"]
mod tests;
