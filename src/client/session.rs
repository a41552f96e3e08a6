//! One client session: startup → authenticate → pick service → (check out per session or per transaction) → relay → checkin.

use crate::budget::pool::{Route, ServicePool};
use crate::client::startup::{binding, desired_settings, forward_cancel, read_startup, First};
use crate::config::resolve::Resolved;
use crate::config::users::UserDb;
use crate::config::{Mode, PoolMode, ServiceFrom};
use crate::context::{App, ClientInfo, LoginPermit};
use crate::error::{AuthError, ProxyError};
use crate::protocol::{self, Severity, Startup};
use crate::relay::{Outcome, Relay};
use crate::server::ServerError;
use crate::telemetry::{tables, Value};
use crate::tls::Stream;
use bytes::BytesMut;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

pub(crate) const LOGIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Spellings of reported settings learned per pool (past it, a client's own spelling is shown).
const MAX_LEARNED: usize = 256;

/// The admin console's entry point, for a client that asks for `admin.console_database`: `app` hands in
/// `admin::console::run` (the console logs its users in through this layer, so it sits above it).
pub type Console = for<'a> fn(
    &'a Arc<App>,
    &'a mut Stream,
    &'a Startup,
    LoginPermit,
) -> Pin<Box<dyn Future<Output = Result<(), ProxyError>> + Send + 'a>>;

/// Serve one client socket to the end; never panics the process, always logs why it ended.
pub async fn run(app: Arc<App>, tcp: TcpStream, peer: SocketAddr, id: u64, console: Console) {
    let mut sock = Stream::Plain(tcp);
    // A login slot before a single byte is read; held until the client is logged in (or gone).
    let Some(permit) = app.login_slots.try_acquire() else {
        return refuse_pending_login(&app, &mut sock).await;
    };
    let tls = app.resolved().tls.clone();
    let mode = app.resolved().config.tls.mode();
    let startup = match tokio::time::timeout(LOGIN_TIMEOUT, read_startup(&mut sock, tls.as_deref(), mode)).await {
        Ok(Ok(First::Startup(s))) => s,
        Ok(Ok(First::Cancel { pid, secret })) => {
            drop(permit);
            return forward_cancel(&app, pid, secret).await;
        }
        Ok(Ok(First::Gone)) => return, // a probe that closed before sending a startup packet
        Ok(Err(ProxyError::ClientProtocol(e @ crate::protocol::ProtocolError::StartupLength(_)))) => {
            // Bytes that do not frame as a startup packet get no reply, as from Postgres: the peer may not
            // speak the protocol at all, or be a driver that queued its Terminate ahead of its startup packet
            // (node-postgres's end() during connect()), which would take an ErrorResponse for a failed login.
            // What already arrived is read first: closing on unread bytes would reset the connection (RST).
            if let Some(tcp) = sock.tcp() {
                let mut sink = [0u8; 4096];
                for _ in 0..4 {
                    if !matches!(tcp.try_read(&mut sink), Ok(n) if n > 0) {
                        break;
                    }
                }
            }
            return warn!(kind = "client_protocol", cause = %e, "closed without a reply: not a startup packet");
        }
        Ok(Err(e)) => {
            drop(permit);
            return fail(&mut sock, e).await;
        }
        Err(_) => return debug!("client sent no startup packet in time"),
    };
    if startup.database() == app.resolved().config.admin.console_database {
        // The console frees the slot once its user has authenticated.
        if let Err(e) = console(&app, &mut sock, &startup, permit).await {
            fail(&mut sock, e).await;
        }
        return;
    }
    // The slot is given back once the client has authenticated (before any wait for a server).
    // Boxed: the login's state (auth exchange, first checkout) is not kept in every idle session's task.
    let logged_in = tokio::time::timeout(LOGIN_TIMEOUT, Box::pin(login(&app, &mut sock, &startup, peer, permit))).await;
    let mut relay = match logged_in {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let reason = reject_reason(&e);
            app.metrics.clients_rejected.with_label_values(&[reason]).inc();
            app.telemetry.emit(tables::ADMISSION_DECISIONS, || {
                let service = match &e {
                    ProxyError::BudgetExhausted { service, .. }
                    | ProxyError::CeilingReached { service, .. }
                    | ProxyError::Shed { service, .. } => service.as_str(),
                    _ => "",
                };
                vec![
                    Value::now(),
                    service.into(),
                    "".into(),
                    startup.user().into(),
                    startup.database().into(),
                    peer.to_string().into(),
                    false.into(),
                    reason.into(),
                    Value::Null,
                ]
            });
            return fail(&mut sock, e).await;
        }
        Err(_) => return fail(&mut sock, ProxyError::ClientIo(std::io::ErrorKind::TimedOut.into())).await,
    };
    let _registered = app.register_client(
        id,
        ClientInfo {
            addr: peer,
            user: startup.user().to_owned(),
            database: startup.database().to_owned(),
            service: relay.pool.budget().name.clone(),
            application_name: startup.get("application_name").unwrap_or("").to_owned(),
            connected_at: std::time::SystemTime::now(),
            key: (relay.key.pid, relay.key.secret),
            settings: relay.pool.key.settings_text(),
            pins: relay.pin_bits.clone(),
        },
    );
    tracing::Span::current().record("service", relay.pool.budget().name.as_str());
    debug!(user = startup.user(), "client logged in");
    let started = (std::time::SystemTime::now(), std::time::Instant::now());
    // Reads gated on their own wakes: the relay's loop looks at the client on every wake of the task.
    let outcome = relay.run(&mut crate::relay::gate::ReadGate::new(&mut sock)).await;
    let end_reason = match &outcome {
        Ok(Outcome::ClientDone) => "client_done",
        Ok(Outcome::ShuttingDown) => "shutting_down",
        Ok(Outcome::ServerEnded) => "server_fatal",
        Err(e) if e.is_disconnect() => "disconnect",
        Err(e) => e.kind(),
    };
    match outcome {
        Ok(Outcome::ClientDone) => debug!("client left"),
        Ok(Outcome::ServerEnded) => info!("server ended the session with FATAL"),
        Ok(Outcome::ShuttingDown) => {
            let _ = write_error(&mut sock, &ProxyError::ShuttingDown).await;
        }
        Err(e) => fail(&mut sock, e).await,
    }
    Box::pin(relay.finish()).await;
    let c = relay.counts;
    app.telemetry.emit(tables::CLIENT_SESSIONS, || {
        vec![
            Value::now(),
            id.into(),
            relay.pool.budget().name.as_str().into(),
            startup.user().into(),
            startup.database().into(),
            startup.get("application_name").unwrap_or("").into(),
            peer.to_string().into(),
            started.0.into(),
            (started.1.elapsed().as_secs_f64() * 1000.0).into(),
            c.transactions.into(),
            c.queries.into(),
            c.bytes_in.into(),
            c.bytes_out.into(),
            end_reason.into(),
        ]
    });
}

/// The fixed metric label for a refused login.
fn reject_reason(e: &ProxyError) -> &'static str {
    match e {
        ProxyError::Auth(_) => "auth",
        ProxyError::UnknownService(_) => "unknown_service",
        ProxyError::UnknownDatabase(_) | ProxyError::RouteDisabled { .. } => "unknown_database",
        ProxyError::ReadOnly { .. } => "read_only",
        ProxyError::BadParameter(_) | ProxyError::SettingRejected { .. } => "bad_parameter",
        ProxyError::ShuttingDown => "shutting_down",
        ProxyError::TooManyLogins(_) => "pending_logins",
        ProxyError::TooManyPools { .. } => "max_pools",
        ProxyError::TlsRequired => "auth",
        ProxyError::BudgetExhausted { .. }
        | ProxyError::CeilingReached { .. }
        | ProxyError::Shed { .. }
        | ProxyError::Paused { .. } => "budget",
        ProxyError::Upstream { .. } | ProxyError::ServerRejected { .. } => "upstream",
        ProxyError::ClientProtocol(_)
        | ProxyError::MessageTooLarge { .. }
        | ProxyError::ClientIo(_)
        | ProxyError::QueuedCancel
        | ProxyError::Killed
        | ProxyError::HomeTerminated
        | ProxyError::IdleInTransaction(_)
        | ProxyError::ClientIdle(_)
        | ProxyError::PinRefused { .. }
        | ProxyError::StatementExists(_)
        | ProxyError::StatementMissing(_)
        | ProxyError::TooManyStatements(_)
        | ProxyError::PinIdle(_)
        | ProxyError::PlanChanged => "protocol",
    }
}

/// Send a FATAL/ERROR for `e` and log it with its kind and cause.
async fn fail(sock: &mut Stream, e: ProxyError) {
    if e.is_disconnect() {
        debug!(kind = e.kind(), cause = %e, "client disconnected");
        return;
    }
    // A server's message may quote the client's values: the log gets it redacted (the client gets it whole).
    let text = e.to_string();
    let cause = crate::telemetry::redact::redact(&text);
    match &e {
        // The role's secret could not be read: the upstream's fault, not the client's (the client was told to
        // look here).
        ProxyError::Auth(AuthError::Lookup { .. }) => warn!(kind = e.kind(), %cause, "login failed"),
        ProxyError::Auth(_) | ProxyError::UnknownService(_) | ProxyError::UnknownDatabase(_) => {
            info!(kind = e.kind(), %cause, "login refused")
        }
        _ => warn!(kind = e.kind(), %cause, "session ended with error"),
    }
    let _ = write_error(sock, &e).await;
}

async fn write_error(sock: &mut Stream, e: &ProxyError) -> std::io::Result<()> {
    let (sev, code, msg) = e.to_client();
    let mut out = BytesMut::new();
    protocol::error_response(&mut out, if sev == Severity::Error { Severity::Fatal } else { sev }, code, &msg, None);
    sock.write_all(&out).await?;
    sock.flush().await
}

/// No login slot free: count it, tell the client without reading anything it sent, and close.
async fn refuse_pending_login(app: &App, sock: &mut Stream) {
    let e = ProxyError::TooManyLogins(app.login_slots.max());
    app.metrics.clients_rejected.with_label_values(&[reject_reason(&e)]).inc();
    if app.login_slots.should_warn() {
        warn!(kind = e.kind(), max_pending_logins = app.login_slots.max(), "refusing clients: too many logging in");
    } else {
        debug!(kind = e.kind(), "client refused: too many logging in");
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        write_error(sock, &e).await?;
        sock.shutdown().await
    })
    .await;
}

/// Which service a client belongs to.
fn service_for(r: &Resolved, users: &UserDb, s: &Startup) -> Result<String, ProxyError> {
    let name = match r.config.proxy.mode {
        Mode::Sidecar => r.sidecar_service.clone().unwrap_or_default(),
        Mode::Shared => match r.config.proxy.service_from {
            ServiceFrom::ApplicationName => {
                let name = s.get("application_name").unwrap_or("");
                // Without trust, a client may name only a service its user lists; any other name is refused
                // exactly as an unknown one, so a client cannot probe which services exist.
                let allowed = r.config.proxy.trust_application_name
                    || users.get(s.user()).is_some_and(|u| u.services.iter().any(|x| x == name));
                if !allowed {
                    return Err(ProxyError::UnknownService(name.to_owned()));
                }
                name.to_owned()
            }
            ServiceFrom::User => users.get(s.user()).and_then(|u| u.service.clone()).unwrap_or_default(),
        },
    };
    if r.services.contains_key(&name) {
        Ok(name)
    } else {
        Err(ProxyError::UnknownService(name))
    }
}

/// Authenticate, pick the pool, and greet the client like Postgres would.
async fn login(
    app: &Arc<App>,
    sock: &mut Stream,
    startup: &Startup,
    peer: SocketAddr,
    slot: LoginPermit,
) -> Result<Box<Relay>, ProxyError> {
    let mut buf = BytesMut::with_capacity(512);
    // One configuration for the whole login, even if a reload lands meanwhile.
    let (resolved, users) = (app.resolved(), app.users());
    let bound = binding(app, sock);
    let service_of = || service_for(&resolved, &users, startup);
    let passthrough = crate::client::passthrough::authenticate(
        &app.pools(),
        &users,
        service_of,
        sock,
        startup.user(),
        &mut buf,
        bound.as_deref(),
    )
    .await?;
    drop(slot);
    if app.shutdown.is_cancelled() {
        return Err(ProxyError::ShuttingDown);
    }
    let service = service_for(&resolved, &users, startup)?;
    let budget = &resolved.services[&service];
    let upstream = &resolved.upstreams[&budget.upstream];
    let ro_alias = &resolved.config.read_only.database;
    let (route, database) = if !ro_alias.is_empty() && startup.database() == ro_alias {
        (Route::ReadOnly, upstream.database.clone())
    } else {
        let real = upstream.databases.real(startup.database());
        (Route::ReadWrite, real.ok_or_else(|| ProxyError::UnknownDatabase(startup.database().to_owned()))?)
    };
    let mut desired = desired_settings(startup)?;
    // A client's own application_name is replayed; with none set, its server keeps pgbudget's label unless
    // `server_application_name = "client"` asks for exact fidelity (then it is empty, as direct).
    match resolved.config.proxy.server_application_name {
        crate::config::AppNamePolicy::Client => {
            desired.entry("application_name".into()).or_default();
        }
        crate::config::AppNamePolicy::Label => {
            if desired.get("application_name").is_some_and(|v| v.is_empty()) {
                desired.remove("application_name");
            }
        }
    }
    if route == Route::ReadOnly {
        if let Some(k) = desired.keys().find(|k| k.to_ascii_lowercase().contains("transaction_read_only")) {
            return Err(ProxyError::ReadOnly { route: ro_alias.clone(), what: format!("startup setting {k}") });
        }
    }
    let login = passthrough.as_ref().or_else(|| users.get(startup.user()).and_then(|u| u.upstream.as_ref()));
    let pool_with = |settings: &[(String, String)]| {
        app.pools()
            .pool_for(&service, route, Some(&database), login, settings)?
            .ok_or_else(|| ProxyError::RouteDisabled { service: service.clone(), route: ro_alias.clone() })
    };
    // Session mode: the client's startup settings go in its server's own startup packet (one pool per set of
    // them), so they are that session's reset values and `RESET` returns to them, as direct. Transaction mode
    // replays them on each server (and restores them after a RESET, see `relay::checkin`).
    let session = budget.pool_mode() == PoolMode::Session;
    let natives: Vec<(String, String)> = if session {
        // A setting already at the server's default (psql's client_encoding=UTF8) needs no pool of its own.
        let defaults = pool_with(&[])?.template().await?;
        let at_default =
            |k: &str, v: &str| defaults.iter().any(|(n, d)| n.eq_ignore_ascii_case(k) && norm(d) == norm(v));
        desired
            .iter()
            .filter(|(k, v)| *k != "application_name" && !at_default(k, v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    } else {
        Vec::new()
    };
    let all = desired.clone();
    let (pool, natives) = match pool_with(&natives) {
        Ok(p) => (p, natives),
        // No room for another pool: the settings are replayed instead.
        Err(ProxyError::TooManyPools { .. }) if !natives.is_empty() => (pool_with(&[])?, Vec::new()),
        Err(e) => return Err(e),
    };
    desired.retain(|k, _| !natives.iter().any(|(n, _)| n == k));
    let qt = budget.settings.query_timeout;
    let with_timeout = |mut d: BTreeMap<String, String>| {
        if !qt.is_zero() && !d.keys().any(|k| k.eq_ignore_ascii_case("statement_timeout")) {
            d.insert("statement_timeout".into(), format!("{}ms", qt.as_millis()));
        }
        d
    };
    let make = |pool: &Arc<ServicePool>, desired| {
        let mut relay = Box::new(Relay::new(app.clone(), pool.clone(), app.cancels.issue(), desired, peer));
        relay.exempt = pool.admission.is_exempt(startup.get("application_name").unwrap_or(""), startup.user());
        relay.user = startup.user().to_owned();
        relay.database = startup.database().to_owned();
        relay
    };
    let mut relay = make(&pool, with_timeout(desired));

    // Session mode holds one server for the whole session; transaction mode shows the cached parameter set.
    let mut shown: crate::server::Params = if session {
        match relay.attach(sock, None).await {
            // The server refused a startup setting: the replay reports it as a direct connection would.
            Err(ProxyError::Upstream { source: ServerError::Postgres { .. }, .. }) if !natives.is_empty() => {
                relay = make(&pool_with(&[])?, with_timeout(all));
                relay.attach(sock, None).await.map_err(setting_refused)?;
            }
            r => r.map_err(setting_refused)?,
        }
        if let Some(pid) = relay.server_pid() {
            relay.key.take_pid(pid);
        }
        relay.server_params().cloned().unwrap_or_default()
    } else {
        let mut t = (*pool.template().await?).clone();
        // A reported setting the client asked for is shown as the server spells it; an unknown spelling is
        // learned from a server once per pool.
        let asked: Vec<(String, String)> = relay
            .desired
            .iter()
            .filter(|(k, _)| k.as_str() != "application_name")
            .filter_map(|(k, v)| {
                let (name, cur) = t.iter().find(|(n, _)| n.eq_ignore_ascii_case(k))?;
                (norm(cur) != norm(v)).then(|| (name.clone(), v.clone()))
            })
            .collect();
        let known = |pool: &ServicePool, k: &(String, String)| {
            pool.reported.lock().unwrap_or_else(|e| e.into_inner()).get(k).cloned()
        };
        let room = pool.reported.lock().unwrap_or_else(|e| e.into_inner()).len() < MAX_LEARNED;
        if room && asked.iter().any(|k| known(&pool, k).is_none()) {
            relay.attach(sock, None).await.map_err(setting_refused)?;
            if let Some(params) = relay.server_params() {
                let mut learned = pool.reported.lock().unwrap_or_else(|e| e.into_inner());
                for (name, v) in &asked {
                    if let Some(now) = params.get(name) {
                        learned.insert((name.clone(), v.clone()), now.clone());
                    }
                }
            }
            relay.give_back().await;
        }
        for k in &asked {
            let shown = known(&pool, k).unwrap_or_else(|| k.1.clone());
            t.insert(k.0.clone(), shown);
        }
        t
    };
    shown.insert("application_name".into(), startup.get("application_name").unwrap_or("").to_owned());
    // Transaction mode: the client is told the pid of a real server of its pool, which it gets back whenever
    // that server is idle (see `budget::affinity`).
    if !session {
        if let Some(home) = pool.choose_home().await {
            if relay.key.take_pid(home.pid) {
                relay.home = Some(home);
            }
        }
    }

    let mut out = BytesMut::with_capacity(512);
    protocol::auth_request(&mut out, 0, &[]);
    crate::error::long_application_name_notice(&mut out, startup.get("application_name").unwrap_or(""));
    for (k, v) in &shown {
        protocol::parameter_status(&mut out, k, v);
    }
    protocol::backend_key_data(&mut out, relay.key.pid, relay.key.secret);
    protocol::ready_for_query(&mut out, b'I');
    sock.write_all(&out).await.map_err(ProxyError::ClientIo)?;
    relay.greeted = true;
    Ok(relay)
}

/// At login a startup setting the server refuses ends the login with the server's SQLSTATE (as direct).
fn setting_refused(e: ProxyError) -> ProxyError {
    match e {
        ProxyError::ServerRejected { code, message } => ProxyError::SettingRejected { code, message },
        e => e,
    }
}

/// Compare setting values loosely (`utf-8` = `UTF8`).
fn norm(v: &str) -> String {
    v.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>().to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(pairs: &[(&str, &str)]) -> Startup {
        Startup { params: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
    }

    #[test]
    fn options_become_settings() {
        let s =
            startup(&[("user", "u"), ("options", "-c search_path=app --statement-timeout=5s"), ("DateStyle", "ISO")]);
        let d = desired_settings(&s).unwrap();
        assert_eq!(d.get("search_path").map(String::as_str), Some("app"));
        assert_eq!(d.get("statement_timeout").map(String::as_str), Some("5s"));
        assert_eq!(d.get("datestyle").map(String::as_str), Some("ISO"));
        assert!(!d.contains_key("user"));
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(desired_settings(&startup(&[("replication", "database")])).is_err());
        assert!(desired_settings(&startup(&[("options", "-c x;drop=1")])).is_err());
        assert!(desired_settings(&startup(&[("options", "-x")])).is_err());
    }
}
