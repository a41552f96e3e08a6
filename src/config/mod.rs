//! `budgets.toml`: strict parsing (unknown keys collected via serde_ignored), env expansion, and the startup invariants (every violation is reported, not just the first).
//!
//! Submodules: `environment` builds the simple case's config from env vars alone; `resolve` turns the parsed file into per-process shares and upstream targets (the budget
//! invariants); `reload` re-reads and swaps it in at run time.

pub mod databases;
pub mod environment;
#[cfg(feature = "lake")]
pub mod lake_section;
pub mod read_only_section;
pub mod reload;
pub mod resolve;
pub mod source;
pub mod tls_section;
pub mod upstream_url;
pub mod users;

pub use read_only_section::{Enforce, ReadOnlySection, ReplicaDown};
pub use tls_section::{TlsMode, TlsSection};

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// A config that could not be loaded; `violations` names every broken rule.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub violations: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration ({} problem(s)):", self.violations.len())?;
        for v in &self.violations {
            write!(f, "\n  - {v}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(default)]
    pub proxy: ProxySection,
    #[serde(default)]
    pub auth: AuthSection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub read_only: ReadOnlySection,
    /// TLS for clients.
    #[serde(default)]
    pub tls: TlsSection,
    /// The embedded DuckLake telemetry warehouse (`[lake]`; needs the `lake` cargo feature).
    #[cfg(feature = "lake")]
    #[serde(default)]
    pub lake: lake_section::LakeConfig,
    pub upstreams: BTreeMap<String, Upstream>,
    pub services: BTreeMap<String, ServiceConfig>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One proxy per service: every client belongs to the process's service.
    Sidecar,
    /// One proxy for many services: the service comes from each client's startup packet.
    Shared,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ServiceFrom {
    ApplicationName,
    User,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ProxySection {
    pub listen: String,
    pub mode: Mode,
    /// Sidecar service when `RAILWAY_SERVICE_NAME` is not set.
    pub service: Option<String>,
    pub service_from: ServiceFrom,
    /// Divide each slice by `max(RAILWAY_REPLICA_COUNT,1) * max(WEB_CONCURRENCY,1)`.
    pub split_per_process: bool,
    /// Smallest slice a service may declare.
    pub slice_floor: u32,
    /// Smallest per-process share after splitting.
    pub share_floor: u32,
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Prefix of `application_name` on server connections: `<prefix>:<service>:<route>`.
    pub application_name_prefix: String,
    /// What `application_name` a client's server shows while the client holds it: `client` (exactly the
    /// client's, empty when unset, as direct; the default) or `label` (the client's own when it set one,
    /// pgbudget's label otherwise).
    pub server_application_name: AppNamePolicy,
    /// Clients that may be between accept and the end of authentication at once; more get FATAL 53300 unread.
    pub max_pending_logins: u32,
    /// Largest client message the proxy reads whole after login (read-only routes' statements); over it the
    /// client gets FATAL 54000. Other messages stream through whatever their size.
    pub max_query_size: usize,
    /// Most pools at once (one per service, route, database and upstream role); past it a login for a new
    /// combination gets 53300. A pool of another database or role than the URL's goes once it has been
    /// unused, with no connection left, for `other_database_idle_timeout`.
    pub max_pools: u32,
    /// Shared mode with `service_from = "application_name"`: let any client name any service. Without it,
    /// each `[[auth.users]]` lists the `services` it may name.
    pub trust_application_name: bool,
    /// Idle connections to databases other than the upstream URL's close after this (or `server_idle_timeout`
    /// when shorter), so a client's `DROP DATABASE` or `CREATE DATABASE ... TEMPLATE` of one finds it free.
    #[serde(with = "humantime_serde")]
    pub other_database_idle_timeout: Duration,
}

impl Default for ProxySection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:6432".into(),
            mode: Mode::Sidecar,
            service: None,
            service_from: ServiceFrom::ApplicationName,
            split_per_process: false,
            slice_floor: 2,
            share_floor: 4,
            drain_timeout: Duration::from_secs(30),
            application_name_prefix: "pgbudget".into(),
            server_application_name: AppNamePolicy::Client,
            max_pending_logins: 256,
            max_query_size: 1 << 20,
            max_pools: 64,
            trust_application_name: false,
            other_database_idle_timeout: Duration::from_secs(1),
        }
    }
}

/// How far back the error journal is refilled from the lake at startup (`admin.errors_window`'s default).
pub const DEFAULT_ERRORS_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Operator surfaces: the admin HTTP listener, the console database and the snapshot log.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AdminSection {
    /// Admin HTTP listener (`/metrics`, `/health`, `/ready`, `/pools`, `/errors`, `/errors/health`, the lake
    /// API); empty disables it.
    pub listen: String,
    /// Users (authenticated like any client) who may open the console: `psql -d pgbudget`.
    pub users: Vec<String>,
    /// Interval of the one-line pool snapshot in the log (`PGBUDGET_POOL_LOG_INTERVAL` overrides); 0 disables.
    #[serde(with = "humantime_serde")]
    pub pool_log_interval: Duration,
    /// Name of the console's virtual database.
    pub console_database: String,
    /// Environment variable holding the admin bearer token. When it is set, every admin endpoint except
    /// `/health`, `/ready` and `/metrics` needs `Authorization: Bearer <token>`; unset or empty, those endpoints
    /// stay open (a warning says so at startup) and the lake API (`POST /lake/...`) is off.
    pub api_token_env: String,
    /// `/ready` checks each upstream at most once per interval and answers from that check in between
    /// (concurrent requests share the one check in flight); 0: every request checks, still one at a time.
    #[serde(with = "humantime_serde")]
    pub ready_interval: Duration,
    /// Replace quoted values and literals in error texts before they reach `/errors`, the journal, the lake
    /// and the logs. `false` is for development only.
    pub redact: bool,
    /// At startup `/errors` is refilled from the lake's `server_errors` of this window.
    #[serde(with = "humantime_serde")]
    pub errors_window: Duration,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9187".into(),
            users: Vec::new(),
            pool_log_interval: Duration::from_secs(60),
            console_database: "pgbudget".into(),
            api_token_env: "PGBUDGET_ADMIN_TOKEN".into(),
            ready_interval: Duration::from_secs(5),
            redact: true,
            errors_window: DEFAULT_ERRORS_WINDOW,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum AuthMethod {
    #[serde(rename = "scram-sha-256")]
    Scram,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "trust")]
    Trust,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AuthSection {
    pub method: AuthMethod,
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// A role not under `[[auth.users]]` logs in with its own Postgres password: its SCRAM secret is read from
    /// the upstream (`auth_query`, run as the URL's role), the client is checked against it, and its servers
    /// log in as that role with the key the client's proof yields (no password is ever known to pgbudget).
    #[serde(default)]
    pub passthrough: bool,
    /// The query that returns a role's secret (`$1` is the role name; the first column of the first row).
    #[serde(default = "default_auth_query")]
    pub auth_query: String,
}

/// Secrets live in `pg_authid` (superuser only); a `SECURITY DEFINER` function can stand in for it. An expired
/// password (`VALID UNTIL`) reads as none, as Postgres refuses it.
pub const DEFAULT_AUTH_QUERY: &str =
    "SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname OPERATOR(pg_catalog.=) $1 \
AND (rolvaliduntil IS NULL OR rolvaliduntil OPERATOR(pg_catalog.>) pg_catalog.now())";

fn default_auth_query() -> String {
    DEFAULT_AUTH_QUERY.to_owned()
}

impl Default for AuthSection {
    fn default() -> Self {
        Self { method: AuthMethod::Scram, users: Vec::new(), passthrough: false, auth_query: default_auth_query() }
    }
}

/// A client login. Exactly one secret form; plaintext passwords never appear in the file.
#[derive(Debug, Clone, Deserialize)]
pub struct UserConfig {
    pub name: String,
    /// Name of an environment variable holding the password.
    pub password_env: Option<String>,
    /// A SCRAM-SHA-256 verifier as stored by Postgres (`SCRAM-SHA-256$<iter>:<salt>$<stored>:<server>`).
    pub scram: Option<String>,
    /// An md5 secret as stored by Postgres (`md5` + 32 lowercase hex digits of md5(password || user)).
    pub md5: Option<String>,
    /// Shared mode with `service_from = "user"`: the service this user belongs to.
    pub service: Option<String>,
    /// Shared mode with `service_from = "application_name"`: the services this user may name.
    #[serde(default)]
    pub services: Vec<String>,
    /// The upstream role this user's server connections log in as (default: the URL's user).
    pub upstream_user: Option<String>,
    /// Environment variable holding `upstream_user`'s password.
    pub upstream_password_env: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Upstream {
    /// `postgres://user:pass@host:port/db`; `${VAR}` is replaced from the environment.
    pub url: String,
    /// Connections the database accepts from all of us together.
    pub ceiling: u32,
    /// Connections held back for others (e.g. the DuckLake catalog).
    #[serde(default)]
    pub reserved: u32,
    /// Databases it serves: names, `"alias -> real"`, or `"*"` for any (default: the URL's own). Every
    /// database's pools share the service's share and this ceiling.
    #[serde(default)]
    pub databases: databases::DatabaseList,
    /// Let the upstream ask for a cleartext or md5 password (default: SCRAM or nothing; the URL's
    /// `require_auth` may say otherwise).
    #[serde(default)]
    pub allow_cleartext_upstream: bool,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PoolMode {
    Session,
    Transaction,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ServiceConfig {
    pub slice: u32,
    /// Part of the slice for the read-only route (0: the route is disabled for this service).
    #[serde(default)]
    pub read_only_share: u32,
    #[serde(default = "default_upstream")]
    pub upstream: String,
    #[serde(default = "default_pool_mode")]
    pub pool_mode: PoolMode,
    #[serde(default = "d_checkout", with = "humantime_serde")]
    pub checkout_timeout: Duration,
    #[serde(default = "d_connect", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default = "d_idle", with = "humantime_serde")]
    pub server_idle_timeout: Duration,
    #[serde(default = "d_lifetime", with = "humantime_serde")]
    pub server_lifetime: Duration,
    /// Idle time after which a connection is pinged (not just peeked) before reuse.
    #[serde(default = "d_check_delay", with = "humantime_serde")]
    pub server_check_delay: Duration,
    /// Deadline for rolling back / resetting a server connection at checkin.
    #[serde(default = "d_reset", with = "humantime_serde")]
    pub reset_timeout: Duration,
    /// A client queued longer than this gets a NOTICE saying so (0: never).
    #[serde(default = "d_notice", with = "humantime_serde")]
    pub notice_after: Duration,
    /// End a client that holds a server idle inside a transaction this long (0: off).
    #[serde(default, with = "humantime_serde")]
    pub idle_in_transaction_timeout: Duration,
    /// `statement_timeout` sent to the server unless the client chose its own (0: off).
    #[serde(default, with = "humantime_serde")]
    pub query_timeout: Duration,
    /// End a client that sends nothing while holding no open transaction this long (0: off).
    #[serde(default, with = "humantime_serde")]
    pub client_idle_timeout: Duration,
    /// Graduated load shedding; absent: clients queue in arrival order up to `checkout_timeout`.
    #[serde(default)]
    pub admission: Option<AdmissionConfig>,
    /// Transaction mode: serve statements that keep state in one server connection (LISTEN, temp tables,
    /// session advisory locks, WITH HOLD cursors, SQL PREPARE, LOAD) by pinning it to the client, or refuse them.
    #[serde(default)]
    pub pin: PinPolicy,
    /// End a pinned client that idles this long outside a transaction (0: off).
    #[serde(default = "d_pin_idle", with = "humantime_serde")]
    pub pin_idle_timeout: Duration,
    /// Transaction mode: a client whose home backend (the pid it was told) an administrator terminates
    /// within this long of the client's last use of it loses its session, as on a direct connection; after
    /// longer the pool just replaces that backend and the client keeps its session (0: always replaced).
    #[serde(default = "d_terminate_window", with = "humantime_serde")]
    pub terminate_window: Duration,
    /// Transaction mode: named prepared statements each server keeps (least recently used closed first;
    /// 0: statement names pass through unmapped).
    #[serde(default = "d_prepared")]
    pub max_prepared_statements: usize,
}

/// Which `application_name` a server shows while a client holds it.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AppNamePolicy {
    /// The client's own when it set one; pgbudget's `<prefix>:<service>:<route>` label when it did not.
    Label,
    /// Exactly the client's (empty when it set none), as on a direct connection.
    #[default]
    Client,
}

/// What transaction mode does with statements that keep state in one server connection.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PinPolicy {
    /// Pin the server to the client until the state is gone or the client leaves.
    #[default]
    Allow,
    /// Refuse the statement with 0A000.
    Refuse,
}

/// Graduated load shedding for one service, as fractions of its share (`warn < shed < hard_reject <= 1`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct AdmissionConfig {
    /// At this utilisation the proxy logs a warning (once per 10 s per pool).
    pub warn: f64,
    /// From here the wait queue is bounded by `max_waiting`; later arrivals are refused at once.
    pub shed: f64,
    /// From here new checkouts are refused at once, except for the exempt class.
    pub hard_reject: f64,
    /// Queue bound at or above `shed` (default: the pool's share).
    pub max_waiting: Option<u32>,
    /// Clients with one of these `application_name`s may use the headroom above `hard_reject`.
    pub exempt_application_names: Vec<String>,
    /// Users who may use the headroom above `hard_reject`.
    pub exempt_users: Vec<String>,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            warn: 0.70,
            shed: 0.80,
            hard_reject: 0.88,
            max_waiting: None,
            exempt_application_names: Vec::new(),
            exempt_users: Vec::new(),
        }
    }
}

/// Most checkouts that non-exempt clients may hold together: a checkout is admitted while
/// `holding / share < hard_reject`, so the line is the smallest count at or above `hard_reject × share`.
pub fn hard_line(hard_reject: f64, share: u32) -> u32 {
    let x = hard_reject * share as f64;
    ((x - 1e-9).ceil().max(1.0) as u32).min(share)
}

fn default_upstream() -> String {
    "primary".into()
}
fn default_pool_mode() -> PoolMode {
    PoolMode::Transaction
}
fn d_checkout() -> Duration {
    Duration::from_secs(5)
}
fn d_connect() -> Duration {
    Duration::from_secs(5)
}
fn d_idle() -> Duration {
    Duration::from_secs(45)
}
fn d_lifetime() -> Duration {
    Duration::from_secs(3600)
}
fn d_check_delay() -> Duration {
    Duration::from_secs(10)
}
fn d_reset() -> Duration {
    Duration::from_secs(5)
}
fn d_pin_idle() -> Duration {
    Duration::from_secs(300)
}
fn d_terminate_window() -> Duration {
    Duration::from_secs(10)
}
fn d_prepared() -> usize {
    200
}
fn d_notice() -> Duration {
    Duration::from_secs(1)
}

/// Process environment values that shape budgets (read once, passed in so tests can vary them).
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub vars: BTreeMap<String, String>,
}

impl Env {
    pub fn from_process() -> Self {
        Self { vars: std::env::vars().collect() }
    }
    pub fn get(&self, k: &str) -> Option<&str> {
        self.vars.get(k).map(String::as_str).filter(|v| !v.is_empty())
    }
    fn positive(&self, k: &str) -> u32 {
        self.get(k).and_then(|v| v.trim().parse::<u32>().ok()).unwrap_or(1).max(1)
    }
    /// Processes sharing one slice: replicas × workers per replica.
    pub fn processes(&self) -> u32 {
        self.positive("RAILWAY_REPLICA_COUNT") * self.positive("WEB_CONCURRENCY")
    }
}

/// Replace every `${VAR}` in `s` from `env`; a missing variable is an error naming it.
pub fn expand_env(s: &str, env: &Env) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| format!("unterminated ${{ in {s:?}"))?;
        let name = &after[..end];
        let v = env.get(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
        out.push_str(v);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Parse a duration given as seconds or humantime (`60`, `60s`, `1m`).
pub fn parse_interval(s: &str) -> Option<Duration> {
    s.parse::<u64>().map(Duration::from_secs).ok().or_else(|| humantime_serde::re::humantime::parse_duration(s).ok())
}

impl Config {
    /// Parse TOML text; unknown keys anywhere are collected (all of them) as violations.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut unknown = Vec::new();
        let de = toml::Deserializer::new(text);
        let parsed: Result<Config, _> = serde_ignored::deserialize(de, |path| unknown.push(path.to_string()));
        match parsed {
            Ok(cfg) if unknown.is_empty() => Ok(cfg),
            Ok(_) => {
                Err(ConfigError { violations: unknown.into_iter().map(|k| format!("unknown key `{k}`")).collect() })
            }
            Err(e) => {
                let mut violations: Vec<String> = unknown.into_iter().map(|k| format!("unknown key `{k}`")).collect();
                violations.push(e.to_string().trim().replace('\n', " "));
                Err(ConfigError { violations })
            }
        }
    }

    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError { violations: vec![format!("cannot read {}: {e}", path.display())] })?;
        Config::parse(&text)
    }
}
