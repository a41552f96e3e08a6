//! An upstream URL (`postgres://user:pass@host:port/db?params`, after `${ENV}` expansion): where and as whom
//! server connections log in, how they negotiate TLS, and which authentication the server may ask for. Every
//! libpq parameter either works or is refused here, by name — none is silently ignored.

use super::Env;
use crate::tls::upstream::{SslMode, TlsParams, UpstreamTls};
use std::time::Duration;

/// Where and as whom server connections are opened, from an upstream URL.
#[derive(Debug, Clone)]
pub struct UpstreamTarget {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    pub ceiling: u32,
    pub reserved: u32,
    /// What a client may ask for → the database its server logs in to.
    pub databases: crate::config::databases::DatabaseMap,
    /// TLS as the URL asks (`sslmode` default `prefer`, as libpq).
    pub tls: UpstreamTls,
    pub tls_params: TlsParams,
    /// Which authentication the server may ask for.
    pub auth: AuthPolicy,
    /// `options=...`: sent in every server connection's startup packet.
    pub options: Option<String>,
    /// `connect_timeout=N`: caps the services' `connect_timeout` for this upstream.
    pub connect_timeout: Option<Duration>,
    pub session_attrs: SessionAttrs,
    /// `host=/dir`: connect to the Unix socket `/dir/.s.PGSQL.<port>` (no TLS there, as libpq).
    pub socket_dir: Option<String>,
    /// Settings sent in every server connection's startup packet (a session-mode pool's clients' own
    /// startup parameters, in force natively: `RESET` returns to them, as direct). Empty from a URL.
    pub startup: Vec<(String, String)>,
    /// A passthrough role's pool (`[auth] passthrough`): SCRAM answered with the keys its latest client
    /// proved, in place of a password. `None` from a URL.
    pub passthrough: Option<crate::config::users::KeyCell>,
}

/// `channel_binding` of an upstream URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelBinding {
    Disable,
    /// SCRAM-SHA-256-PLUS when the connection is TLS and the server offers it (libpq's default).
    Prefer,
    Require,
}

/// The authentication an upstream may ask for: anything else is refused before a secret is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthPolicy {
    /// A cleartext password (AuthenticationCleartextPassword).
    pub password: bool,
    pub md5: bool,
    pub scram: bool,
    /// No authentication at all (`trust`).
    pub none: bool,
    pub channel_binding: ChannelBinding,
    /// Where the rule came from, for the refusal message.
    pub source: &'static str,
}

impl Default for AuthPolicy {
    /// SCRAM or none; cleartext and md5 only when `allow_cleartext_upstream` or the URL's `require_auth` says so.
    fn default() -> Self {
        AuthPolicy {
            password: false,
            md5: false,
            scram: true,
            none: true,
            channel_binding: ChannelBinding::Prefer,
            source: "allow_cleartext_upstream = false",
        }
    }
}

/// `target_session_attrs` with one host: check what the server is after login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionAttrs {
    Any,
    /// `read-write`: `transaction_read_only` must be off.
    ReadWrite,
    /// `primary`: the server must not be in recovery.
    Primary,
}

/// Parameters refused with a reason (others unknown to pgbudget are refused as unknown).
const REFUSED: &[(&str, &str)] = &[
    ("sslcert", "client certificates to the upstream are not supported"),
    ("sslkey", "client certificates to the upstream are not supported"),
    ("sslpassword", "client certificates to the upstream are not supported"),
    ("sslcertmode", "client certificates to the upstream are not supported"),
    ("sslcrl", "certificate revocation lists are not supported"),
    ("sslcrldir", "certificate revocation lists are not supported"),
    ("sslcompression", "TLS compression is not supported (and off in every modern TLS)"),
    ("requiressl", "obsolete: use sslmode=require"),
    ("application_name", "pgbudget names its server connections (proxy.application_name_prefix)"),
    ("fallback_application_name", "pgbudget names its server connections (proxy.application_name_prefix)"),
    ("client_encoding", "each client sets its own; the proxy replays it"),
    ("replication", "replication connections are not pooled"),
    ("service", "pg_service.conf is not read: write the parameters into the URL"),
    ("passfile", ".pgpass is not read: put the password in the URL (e.g. ${PGPASSWORD})"),
    ("hostaddr", "give the address as host"),
    ("load_balance_hosts", "one host per upstream"),
    ("krbsrvname", "GSSAPI is not supported"),
    ("gsslib", "GSSAPI is not supported"),
    ("gssdelegation", "GSSAPI is not supported"),
    ("keepalives", "pgbudget sets TCP keepalive itself (30 s idle, 10 s interval)"),
    ("keepalives_idle", "pgbudget sets TCP keepalive itself (30 s idle, 10 s interval)"),
    ("keepalives_interval", "pgbudget sets TCP keepalive itself (30 s idle, 10 s interval)"),
    ("keepalives_count", "pgbudget sets TCP keepalive itself (30 s idle, 10 s interval)"),
    ("tcp_user_timeout", "not supported"),
];

/// Stands in for an empty host in the URL (the host then comes from `host=`).
const NO_HOST: &str = "no-host.invalid";

/// Parse an upstream URL after env expansion; every problem with it is named in the error.
pub fn parse_upstream_url(name: &str, raw: &str, env: &Env) -> Result<UpstreamTarget, String> {
    let at = format!("upstreams.{name}.url");
    let expanded = crate::config::expand_env(raw, env).map_err(|e| format!("{at}: {e}"))?;
    // libpq allows an empty host before the path (`postgresql://u@/db?host=/dir`): stand a placeholder in.
    let url = match url::Url::parse(&expanded) {
        Err(url::ParseError::EmptyHost) => url::Url::parse(
            &expanded.replacen("@/", &format!("@{NO_HOST}/"), 1).replacen(":///", &format!("://{NO_HOST}/"), 1),
        ),
        r => r,
    }
    .map_err(|e| format!("{at}: not a URL ({e})"))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(format!("{at}: scheme must be postgres:// or postgresql://"));
    }
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    let mut host =
        url.host_str().filter(|h| *h != NO_HOST).unwrap_or("").trim_matches(|c| c == '[' || c == ']').to_owned();
    let mut port = url.port().unwrap_or(5432);
    let mut user = decode(url.username());
    let mut password = url.password().map(decode);
    let mut database = decode(url.path().trim_start_matches('/'));
    let mut tls = TlsParams::default();
    let mut auth = AuthPolicy::default();
    let (mut options, mut connect_timeout, mut session_attrs) = (None, None, SessionAttrs::Any);
    let mut socket_dir: Option<String> = None;
    let mut v = Vec::new();
    for (k, val) in url.query_pairs() {
        let (k, val) = (k.as_ref(), val.into_owned());
        let bad = |what: &str| format!("{at}: {k}={val:?}: {what}");
        match k {
            "sslmode" => match SslMode::parse(&val) {
                Ok(m) => tls.mode = m,
                Err(e) => v.push(format!("{at}: {e}")),
            },
            "sslrootcert" => tls.rootcert = Some(val),
            "sslsni" => tls.sni = val != "0",
            "sslnegotiation" => match val.as_str() {
                "postgres" => tls.direct = false,
                "direct" => tls.direct = true,
                _ => v.push(bad("not postgres or direct")),
            },
            "ssl_min_protocol_version" => match val.as_str() {
                "TLSv1" | "TLSv1.1" | "TLSv1.2" => {}
                "TLSv1.3" => tls.only13 = true,
                _ => v.push(bad("not TLSv1.2 or TLSv1.3")),
            },
            "ssl_max_protocol_version" => match val.as_str() {
                "TLSv1.2" => tls.only12 = true,
                "TLSv1.3" | "" => {}
                _ => v.push(bad("pgbudget speaks TLS 1.2 and 1.3 only")),
            },
            "channel_binding" => match val.as_str() {
                "disable" => auth.channel_binding = ChannelBinding::Disable,
                "prefer" => auth.channel_binding = ChannelBinding::Prefer,
                "require" => auth.channel_binding = ChannelBinding::Require,
                _ => v.push(bad("not disable, prefer or require")),
            },
            "require_auth" => match require_auth(&val) {
                Ok((password, md5, scram, none)) => {
                    auth = AuthPolicy { password, md5, scram, none, source: "the URL's require_auth", ..auth }
                }
                Err(e) => v.push(bad(&e)),
            },
            "gssencmode" => {
                if !matches!(val.as_str(), "disable" | "prefer") {
                    v.push(bad("GSSAPI encryption is not supported (disable or prefer only)"));
                }
            }
            "connect_timeout" => match val.trim().parse::<u64>() {
                Ok(0) => {}
                Ok(s) => connect_timeout = Some(Duration::from_secs(s.max(2))),
                Err(_) => v.push(bad("not a number of seconds")),
            },
            "options" => options = Some(val),
            "target_session_attrs" => match val.as_str() {
                "any" => session_attrs = SessionAttrs::Any,
                "read-write" => session_attrs = SessionAttrs::ReadWrite,
                "primary" => session_attrs = SessionAttrs::Primary,
                _ => v.push(bad("with one host only any, read-write and primary make sense")),
            },
            "host" if val.starts_with('@') => v.push(bad("abstract Unix sockets are not supported")),
            "host" if val.starts_with('/') => socket_dir = Some(val),
            "host" if val.contains(',') => v.push(bad("one host per upstream")),
            "host" => host = val,
            "port" => match val.parse() {
                Ok(p) => port = p,
                Err(_) => v.push(bad("not a port")),
            },
            "user" => user = val,
            "password" => password = Some(val),
            "dbname" => database = val,
            _ => match REFUSED.iter().find(|(n, _)| *n == k) {
                Some((_, why)) => v.push(format!("{at}: {k}: {why}")),
                None => v.push(format!("{at}: {k}: not a parameter pgbudget knows (refused rather than ignored)")),
            },
        }
    }
    if host.is_empty() && socket_dir.is_none() {
        v.push(format!("{at}: no host"));
    }
    if let Some(dir) = &socket_dir {
        host = dir.clone();
        if !matches!(tls.mode, SslMode::Disable | SslMode::Prefer) {
            v.push(format!("{at}: sslmode={:?} over a Unix socket: TLS is not used there (libpq neither)", tls.mode));
        }
        tls.mode = SslMode::Disable;
    }
    if host.contains(',') {
        v.push(format!("{at}: one host per upstream"));
    }
    if user.is_empty() {
        v.push(format!("{at}: no user"));
    }
    if auth.channel_binding == ChannelBinding::Require && tls.mode == SslMode::Disable {
        v.push(format!("{at}: channel_binding=require needs TLS (sslmode is disable)"));
    }
    let built = match UpstreamTls::build(&tls) {
        Ok(t) => Some(t),
        Err(e) => {
            v.push(format!("{at}: {e}"));
            None
        }
    };
    if !v.is_empty() {
        return Err(v.join("; "));
    }
    Ok(UpstreamTarget {
        name: name.to_owned(),
        host,
        port,
        password,
        database: if database.is_empty() { user.clone() } else { database },
        user,
        ceiling: 0,
        reserved: 0,
        databases: Default::default(),
        tls: built.expect("built when no violation"),
        tls_params: tls,
        auth,
        options,
        connect_timeout,
        session_attrs,
        socket_dir,
        startup: Vec::new(),
        passthrough: None,
    })
}

/// libpq's `require_auth`: a list of methods (`password`, `md5`, `scram-sha-256`, `none`), or a list of
/// `!method` exclusions. Returns (password, md5, scram, none).
fn require_auth(v: &str) -> Result<(bool, bool, bool, bool), String> {
    let items: Vec<&str> = v.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    let negated = items.first().is_some_and(|s| s.starts_with('!'));
    let mut allowed = if negated { [true; 4] } else { [false; 4] };
    for it in items {
        if it.starts_with('!') != negated {
            return Err("mixes methods and !exclusions".into());
        }
        let i = match it.trim_start_matches('!') {
            "password" => 0,
            "md5" => 1,
            "scram-sha-256" => 2,
            "none" => 3,
            "gss" | "sspi" => continue,
            other => return Err(format!("{other} is not password, md5, scram-sha-256, gss, sspi or none")),
        };
        allowed[i] = !negated;
    }
    Ok((allowed[0], allowed[1], allowed[2], allowed[3]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<UpstreamTarget, String> {
        parse_upstream_url("p", url, &Env::default())
    }

    #[test]
    fn parameters_work_or_are_refused_by_name() {
        let t =
            parse("postgres://u:p@db:6543/app?sslmode=require&connect_timeout=7&options=-c%20work_mem%3D64MB").unwrap();
        assert_eq!((t.tls.mode, t.connect_timeout), (SslMode::Require, Some(Duration::from_secs(7))));
        assert_eq!(t.options.as_deref(), Some("-c work_mem=64MB"));
        let t =
            parse("postgres://u@x/app?host=db2&port=7000&dbname=other&user=v&target_session_attrs=read-write").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.database.as_str(), t.user.as_str()), ("db2", 7000, "other", "v"));
        assert_eq!(t.session_attrs, SessionAttrs::ReadWrite);
        let err = parse("postgres://u@db/app?sslcert=a&keepalives=1&frobnicate=2&sslmode=allow&host=@abs").unwrap_err();
        for needle in ["sslcert", "keepalives", "frobnicate: not a parameter", "sslmode=allow", "abstract Unix"] {
            assert!(err.contains(needle), "{needle} missing in {err}");
        }
    }

    #[test]
    fn unix_socket_hosts() {
        let t = parse("postgresql://u@/app?host=/var/run/postgresql&port=5433").unwrap();
        assert_eq!(
            (t.socket_dir.as_deref(), t.port, t.tls.mode),
            (Some("/var/run/postgresql"), 5433, SslMode::Disable)
        );
        assert!(parse("postgresql://u@/app?host=/run/pg&sslmode=require").unwrap_err().contains("Unix socket"));
    }

    #[test]
    fn default_is_prefer_and_scram_or_nothing() {
        let t = parse("postgres://u:p@db/app").unwrap();
        assert_eq!(t.tls.mode, SslMode::Prefer);
        assert!(!t.auth.password && !t.auth.md5 && t.auth.scram && t.auth.none);
        let t = parse("postgres://u:p@db/app?require_auth=md5,scram-sha-256").unwrap();
        assert!(!t.auth.password && t.auth.md5 && t.auth.scram && !t.auth.none);
        let t = parse("postgres://u:p@db/app?require_auth=!none").unwrap();
        assert!(t.auth.password && t.auth.md5 && t.auth.scram && !t.auth.none);
        assert!(parse("postgres://u:p@db/app?require_auth=md5,!none").is_err());
    }

    #[test]
    fn verifying_modes_need_roots() {
        let err = parse("postgres://u:p@db/app?sslmode=verify-full&sslrootcert=/nonexistent.pem").unwrap_err();
        assert!(err.contains("sslrootcert=/nonexistent.pem"), "{err}");
        assert!(parse("postgres://u:p@db/app?sslmode=disable&sslnegotiation=direct").is_err());
        assert!(parse("postgres://u:p@db/app?sslmode=disable&channel_binding=require").is_err());
    }
}
