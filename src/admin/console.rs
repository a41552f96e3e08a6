//! The admin console: a virtual database (`psql -d pgbudget`) answering PgBouncer-style `SHOW` commands,
//! open only to the users listed in `admin.users`. Simple query protocol only.

use crate::context::{App, LoginPermit};
use crate::error::{AuthError, ConsoleError, ProxyError};
use crate::protocol::{self, Startup};
use crate::tls::Stream;
use bytes::{BufMut, BytesMut};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncWriteExt;
use tracing::info;

const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Append the ErrorResponse for a failed command.
fn error_response(out: &mut BytesMut, e: &ConsoleError) {
    let (severity, code, msg) = crate::error::console_error_to_client(e);
    protocol::error_response(out, severity, code, &msg, None);
}

/// A result set under construction: text columns only.
struct Rows {
    out: BytesMut,
    ncols: usize,
    count: usize,
}

impl Rows {
    fn new(cols: &[&str]) -> Rows {
        let mut out = BytesMut::new();
        let at = protocol::begin(&mut out, b'T');
        out.put_i16(cols.len() as i16);
        for c in cols {
            protocol::put_cstr(&mut out, c);
            out.put_i32(0); // table oid
            out.put_i16(0); // column number
            out.put_i32(25); // text
            out.put_i16(-1);
            out.put_i32(-1);
            out.put_i16(0); // text format
        }
        protocol::finish(&mut out, at);
        Rows { out, ncols: cols.len(), count: 0 }
    }

    fn row(&mut self, vals: &[String]) {
        debug_assert_eq!(vals.len(), self.ncols);
        let at = protocol::begin(&mut self.out, b'D');
        self.out.put_i16(vals.len() as i16);
        for v in vals {
            self.out.put_i32(v.len() as i32);
            self.out.put_slice(v.as_bytes());
        }
        protocol::finish(&mut self.out, at);
        self.count += 1;
    }

    fn done(mut self, tag: &str) -> BytesMut {
        protocol::command_complete(&mut self.out, tag);
        self.out
    }
}

fn epoch(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs().to_string()).unwrap_or_default()
}

/// Serve an authenticated console session; `Err` ends the session with that error. The client's login
/// slot is held (and the exchange bounded by the login timeout) until its user has authenticated.
pub async fn run(
    app: &Arc<App>,
    sock: &mut Stream,
    startup: &Startup,
    login_slot: LoginPermit,
) -> Result<(), ProxyError> {
    let mut buf = BytesMut::with_capacity(512);
    let users = app.users();
    let binding = crate::client::startup::binding(app, sock);
    let auth = users.authenticate(sock, startup.user(), &mut buf, binding.as_deref());
    let auth = tokio::time::timeout(crate::client::session::LOGIN_TIMEOUT, auth);
    let auth = auth.await;
    drop(login_slot);
    auth.map_err(|_| ProxyError::ClientIo(std::io::ErrorKind::TimedOut.into()))??;
    if !app.resolved().config.admin.users.iter().any(|u| u == startup.user()) {
        return Err(ProxyError::Auth(AuthError::Failed { user: startup.user().into(), reason: "not an admin user" }));
    }
    info!(user = startup.user(), "admin console login");
    let mut out = BytesMut::new();
    protocol::auth_request(&mut out, 0, &[]);
    for (k, v) in [
        ("server_version", "15.0 (pgbudget console)"),
        ("client_encoding", "UTF8"),
        ("server_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", startup.get("application_name").unwrap_or("")),
    ] {
        protocol::parameter_status(&mut out, k, v);
    }
    protocol::backend_key_data(&mut out, 0, 0);
    protocol::ready_for_query(&mut out, b'I');
    sock.write_all(&out).await.map_err(ProxyError::ClientIo)?;
    loop {
        let read = tokio::time::timeout(IDLE_TIMEOUT, protocol::read_message(sock, &mut buf));
        let kind = tokio::select! {
            r = read => match r {
                Ok(r) => r?,
                Err(_) => return Ok(()),
            },
            _ = app.shutdown.cancelled() => return Err(ProxyError::ShuttingDown),
        };
        out.clear();
        match kind {
            b'X' => return Ok(()),
            b'Q' => {
                let mut b = &buf[..];
                let sql = protocol::cstr(&mut b)?.to_owned();
                for stmt in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                    match command(app, stmt).await {
                        Ok(rows) => out.extend_from_slice(&rows),
                        Err(e) => {
                            error_response(&mut out, &e);
                            break;
                        }
                    }
                }
                if sql.trim().trim_matches(';').is_empty() {
                    out.extend_from_slice(&[b'I', 0, 0, 0, 4]);
                }
                protocol::ready_for_query(&mut out, b'I');
            }
            b'S' => {
                error_response(&mut out, &ConsoleError::ExtendedProtocol);
                protocol::ready_for_query(&mut out, b'I');
            }
            _ => continue, // extended-protocol messages before Sync are skipped; Sync answers
        }
        sock.write_all(&out).await.map_err(ProxyError::ClientIo)?;
    }
}

/// An operator command's reply: just its CommandComplete tag.
fn done(tag: &str) -> BytesMut {
    let mut out = BytesMut::new();
    protocol::command_complete(&mut out, tag);
    out
}

async fn command(app: &Arc<App>, stmt: &str) -> Result<BytesMut, ConsoleError> {
    let words: Vec<String> = stmt.split_whitespace().map(|w| w.to_ascii_lowercase()).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let target = |w: &[&str]| w.get(1).map(|s| s.trim_matches('"').to_owned());
    match words.as_slice() {
        ["pause", ..] if words.len() <= 2 => {
            app.pause(target(&words).as_deref()).await?;
            Ok(done("PAUSE"))
        }
        ["resume", ..] if words.len() <= 2 => {
            app.resume(target(&words).as_deref())?;
            Ok(done("RESUME"))
        }
        ["reconnect", ..] if words.len() <= 2 => {
            app.reconnect(target(&words).as_deref())?;
            Ok(done("RECONNECT"))
        }
        ["kill", ..] if words.len() <= 2 => {
            app.kill(target(&words).as_deref())?;
            Ok(done("KILL"))
        }
        ["reload"] => {
            app.reload()?;
            Ok(done("RELOAD"))
        }
        ["shutdown"] => {
            info!("SHUTDOWN requested from the admin console");
            app.begin_shutdown();
            Ok(done("SHUTDOWN"))
        }
        ["show", "pools"] => Ok(show_pools(app)),
        ["show", "stats"] => Ok(show_stats(app)),
        ["show", "clients"] => Ok(show_clients(app)),
        ["show", "servers"] => Ok(show_servers(app)),
        ["show", "prepared"] => Ok(show_prepared(app)),
        ["show", "config"] => Ok(show_config(app)),
        ["show", "version"] => {
            let mut r = Rows::new(&["version"]);
            r.row(&[format!("pgbudget {}", env!("CARGO_PKG_VERSION"))]);
            Ok(r.done("SHOW"))
        }
        ["show", "help"] | ["help"] => {
            let mut r = Rows::new(&["command"]);
            for c in [
                "SHOW POOLS",
                "SHOW STATS",
                "SHOW CLIENTS",
                "SHOW SERVERS",
                "SHOW PREPARED",
                "SHOW CONFIG",
                "SHOW VERSION",
                "RELOAD",
                "PAUSE [service]",
                "RESUME [service]",
                "RECONNECT [service]",
                "KILL [service]",
                "SHUTDOWN",
            ] {
                r.row(&[c.to_owned()]);
            }
            Ok(r.done("SHOW"))
        }
        _ => Err(ConsoleError::UnknownCommand(stmt.to_owned())),
    }
}

fn show_pools(app: &App) -> BytesMut {
    let snap = app.snapshot();
    let mut r = Rows::new(&[
        "database",
        "user",
        "service",
        "route",
        "cl_active",
        "cl_waiting",
        "sv_active",
        "sv_idle",
        "sv_used",
        "maxwait",
        "pool_mode",
        "share",
        "slice",
        "checkout_timeouts",
        "paused",
        "shed_line",
        "shed",
        "ro_enforcement",
    ]);
    let resolved = app.resolved();
    for p in snap.pools {
        let t = &resolved.upstreams[&p.upstream];
        let here = |asked: &str| p.route == "ro" || t.databases.real(asked).is_some_and(|d| d == p.database);
        let clients = app
            .clients
            .iter()
            .filter(|c| c.service == p.service && c.settings == p.settings && here(&c.database))
            .count();
        r.row(&[
            p.database.clone(),
            p.role.clone(),
            p.service.clone(),
            p.route.to_owned(),
            clients.saturating_sub(p.waiting as usize).to_string(),
            p.waiting.to_string(),
            p.in_use.to_string(),
            p.available.to_string(),
            "0".into(),
            "0".into(),
            p.pool_mode.to_owned(),
            p.share.to_string(),
            p.slice.to_string(),
            p.checkout_timeouts.to_string(),
            if p.paused { "yes" } else { "no" }.into(),
            p.shed_line.map(|l| l.to_string()).unwrap_or_default(),
            p.shed.to_string(),
            p.ro_enforcement.unwrap_or("").into(),
        ]);
    }
    r.done("SHOW")
}

fn show_stats(app: &App) -> BytesMut {
    let mut r = Rows::new(&[
        "database",
        "service",
        "route",
        "total_xact_count",
        "total_query_count",
        "total_received",
        "total_sent",
        "total_wait_time",
        "checkout_timeouts",
    ]);
    for p in app.pools().all() {
        let b = p.budget();
        let m = &p.metrics;
        r.row(&[
            p.key.database.clone(),
            b.name.clone(),
            p.route.as_str().to_owned(),
            m.transactions.get().to_string(),
            m.queries.get().to_string(),
            m.bytes_from_client.get().to_string(),
            m.bytes_to_client.get().to_string(),
            ((m.checkout_wait.get_sample_sum() * 1e6) as u64).to_string(),
            m.checkout_timeouts.get().to_string(),
        ]);
    }
    r.done("SHOW")
}

/// Named statements of transaction-mode clients, per pool: the server-side name, how many client sessions
/// use it, the pool's hit/miss/eviction counts, and the statement with its constants taken out.
fn show_prepared(app: &App) -> BytesMut {
    let mut r = Rows::new(&["service", "route", "name", "clients", "hits", "misses", "evictions", "statement"]);
    for p in app.pools().all() {
        let b = p.budget();
        let m = &p.metrics;
        for (stmt, clients) in p.statements.list() {
            let text = String::from_utf8_lossy(stmt.query());
            r.row(&[
                b.name.clone(),
                p.route.as_str().to_owned(),
                stmt.name.clone(),
                clients.to_string(),
                m.prepared_hits.get().to_string(),
                m.prepared_misses.get().to_string(),
                m.prepared_evictions.get().to_string(),
                crate::read_only::policy::fingerprint(&text),
            ]);
        }
    }
    r.done("SHOW")
}

fn show_clients(app: &App) -> BytesMut {
    let attached = app.cancels.attached();
    let mut r = Rows::new(&[
        "type",
        "user",
        "database",
        "service",
        "state",
        "addr",
        "port",
        "connect_time",
        "application_name",
        "server_pid",
        "pinned",
    ]);
    for c in app.clients.iter() {
        let bits = c.pins.load(std::sync::atomic::Ordering::Relaxed);
        let pinned: Vec<&str> = crate::telemetry::labels::PIN_REASONS
            .iter()
            .enumerate()
            .filter(|(i, _)| bits & (1 << i) != 0)
            .map(|(_, r)| *r)
            .collect();
        let server = attached.get(&c.key);
        r.row(&[
            "C".into(),
            c.user.clone(),
            c.database.clone(),
            c.service.clone(),
            if server.is_some() { "active" } else { "idle" }.into(),
            c.addr.ip().to_string(),
            c.addr.port().to_string(),
            epoch(c.connected_at),
            c.application_name.clone(),
            server.map(|p| p.to_string()).unwrap_or_default(),
            pinned.join(","),
        ]);
    }
    r.done("SHOW")
}

fn show_servers(app: &App) -> BytesMut {
    let active: HashSet<i32> = app.cancels.attached().into_values().collect();
    let mut r = Rows::new(&["type", "upstream", "service", "route", "state", "addr", "port", "connect_time", "pid"]);
    for (name, up) in &app.pools().upstreams {
        for s in up.servers.iter() {
            r.row(&[
                "S".into(),
                name.clone(),
                s.service.clone(),
                s.route.to_owned(),
                if active.contains(&s.pid) { "active" } else { "idle" }.into(),
                s.addr.ip().to_string(),
                s.addr.port().to_string(),
                epoch(s.connected_at),
                s.pid.to_string(),
            ]);
        }
    }
    r.done("SHOW")
}

fn show_config(app: &App) -> BytesMut {
    let resolved = app.resolved();
    let c = &resolved.config;
    let mut r = Rows::new(&["key", "value", "changeable"]);
    let mut kv = |k: &str, v: String| r.row(&[k.to_owned(), v, "no".into()]);
    kv("listen", c.proxy.listen.clone());
    kv("mode", format!("{:?}", c.proxy.mode).to_lowercase());
    kv("auth_method", format!("{:?}", c.auth.method).to_lowercase());
    kv("auth_passthrough", c.auth.passthrough.to_string());
    kv("drain_timeout", format!("{:?}", c.proxy.drain_timeout));
    kv("admin_listen", c.admin.listen.clone());
    kv("pool_log_interval", format!("{:?}", c.admin.pool_log_interval));
    for (name, u) in &resolved.upstreams {
        kv(
            &format!("upstream.{name}"),
            format!("{}:{}/{} ceiling={} reserved={}", u.host, u.port, u.database, u.ceiling, u.reserved),
        );
    }
    for s in resolved.services.values() {
        let t = &s.settings;
        kv(
            &format!("service.{}", s.name),
            format!(
                "slice={} share={} pool_mode={:?} checkout_timeout={:?} server_idle_timeout={:?} server_lifetime={:?}",
                s.slice, s.share, t.pool_mode, t.checkout_timeout, t.server_idle_timeout, t.server_lifetime
            )
            .to_lowercase(),
        );
    }
    r.done("SHOW")
}
