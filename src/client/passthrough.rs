//! `[auth] passthrough`: the secret of a role not under `[[auth.users]]`, read from the upstream with
//! `auth_query` on a server of the service's own pool (the lookup counts against its share like any other
//! use, and waits no longer than a checkout may), the role name bound as a parameter, never spliced in.

use crate::budget::pool::{Route, ServicePool};
use crate::budget::pools::Pools;
use crate::config::databases::UpstreamLogin;
use crate::config::users::{is_md5_secret, ScramVerifier, Secret, UserDb};
use crate::error::{AuthError, ProxyError};
use crate::server::ServerError;
use bytes::BytesMut;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// How long the query may run once a server is checked out.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Check the client: against its `[[auth.users]]` entry as usual, or, for a role not listed there while
/// passthrough is on, against the secret the upstream holds for it. `Some`: the passthrough role's login,
/// which its servers use (`service`: where the client goes, through whose pool the secret is read).
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    pools: &Pools,
    users: &UserDb,
    service: impl FnOnce() -> Result<String, ProxyError>,
    sock: &mut S,
    user: &str,
    buf: &mut BytesMut,
    binding: Option<&[u8]>,
) -> Result<Option<UpstreamLogin>, ProxyError> {
    let Some(query) = users.passthrough.as_deref().filter(|_| users.get(user).is_none()) else {
        users.authenticate(sock, user, buf, binding).await?;
        return Ok(None);
    };
    let service = service()?;
    let pool = pools
        .pool_for(&service, Route::ReadWrite, None, None, &[])?
        .ok_or_else(|| ProxyError::UnknownService(service.clone()))?;
    let secret = role_secret(&pool, query, user).await?;
    let keys = users.authenticate_passthrough(sock, user, secret, buf, binding).await?;
    Ok(Some(UpstreamLogin { user: user.to_owned(), password: None, keys: Some(keys) }))
}

/// Bring a pooled server from the session settings its last client left (a `SET ROLE` to a role that may not
/// read `pg_authid`, a `search_path` that shadows a custom `auth_query`'s tables) to the login's defaults, so
/// no client's session decides another's login. Nothing to do on a server no client changed.
async fn at_defaults(conn: &mut crate::budget::pool::PooledConn) -> Result<(), ServerError> {
    if conn.applied.is_empty() {
        return Ok(());
    }
    let (set, reset) = crate::relay::reset::settings_diff(&conn.applied, &Default::default());
    conn.apply_settings(&set, &reset, QUERY_TIMEOUT).await?;
    conn.applied = Default::default();
    Ok(())
}

/// The role's secret (a SCRAM verifier or an md5 hash); `None` when the query finds no row, a NULL, or
/// anything else.
pub async fn role_secret(pool: &ServicePool, query: &str, role: &str) -> Result<Option<Secret>, ProxyError> {
    let mut conn = pool.checkout().await?;
    let r = match at_defaults(&mut conn).await {
        Ok(()) => conn.rows_bound(query, &[role], QUERY_TIMEOUT).await,
        Err(e) => Err(e),
    };
    match r {
        // The statement failed (no such relation, permission denied): the server is as clean as before.
        Ok(_) | Err(ServerError::Postgres { .. }) => pool.put_back(conn),
        Err(_) => pool.discard(conn),
    }
    let rows = r.map_err(|e| AuthError::Lookup { user: role.to_owned(), cause: e.to_string() })?;
    let secret = rows.into_iter().next().and_then(|r| r.into_iter().next()).flatten();
    Ok(secret.and_then(|s| match ScramVerifier::parse(&s) {
        Some(v) => Some(Secret::Scram(v)),
        None => is_md5_secret(&s).then_some(Secret::Md5(s)),
    }))
}
