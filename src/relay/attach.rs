//! Taking a server for a client: the checkout without an await when a parked server is ready, the queued
//! checkout otherwise, bringing the server to the client's settings, and the wait for the client's home
//! when a statement asks for what only that backend knows.

use super::{waiting, Relay, HOME_RECHECK};
use crate::budget::admission::Hold;
use crate::budget::cancel::ServerKey;
use crate::budget::checkout::{Waiter, Who};
use crate::budget::pool::PooledConn;
use crate::budget::queued::Resumed;
use crate::config::resolve::ServiceBudget;
use crate::config::PoolMode;
use crate::error::ProxyError;
use crate::server::ServerError;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite};

/// What the checkout without an await did.
pub(super) enum Quick {
    Attached,
    Failed(ProxyError),
    /// Checked out; the client's settings still have to be applied (boxed: the rare case).
    Install(Box<(PooledConn, Hold)>),
}

impl Relay {
    /// Check out a server, bring its session settings in line with this client's, and record it for cancels.
    /// `resumed`: a checkout that waited in the relay loop's own queue state continues here.
    pub async fn attach<C: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        sock: &mut C,
        resumed: Option<Resumed>,
    ) -> Result<(), ProxyError> {
        let started = resumed.as_ref().map_or_else(Instant::now, |r| r.started);
        let pool = self.pool.clone();
        let home = self.preferred();
        let mut client = waiting::ClientWatch { sock, cin: &mut self.pump.cin };
        let waiter = Waiter {
            client: &mut client,
            key: &self.key,
            exempt: self.exempt,
            may_notice: self.greeted,
            home,
            who: Who { user: &self.user, database: &self.database, addr: self.peer, telemetry: &self.app.telemetry },
            resumed,
        };
        let checkout = crate::budget::checkout::acquire(&pool, waiter).await;
        self.pool.metrics.checkout_wait.observe(started.elapsed().as_secs_f64());
        let (conn, hold) = match checkout {
            Ok(c) => c,
            Err(e) => {
                self.note_checkout_error(&e);
                return Err(e);
            }
        };
        self.install(conn, hold).await
    }

    /// The common checkout without an await (and without building the checkout's future): a parked server
    /// with this client's settings already in force. `None`: take [`Self::attach`]. `now`: the caller's clock
    /// read, for every age this checkout looks at.
    pub(super) fn attach_now(&mut self, now: Instant) -> Option<Quick> {
        let who = Who { user: &self.user, database: &self.database, addr: self.peer, telemetry: &self.app.telemetry };
        let home = self.preferred();
        // One read of the budget for the whole quick checkout (a reload applies from the next one).
        let pool = self.pool.clone();
        let b = pool.budget();
        let (conn, hold) = match crate::budget::checkout::acquire_now(&pool, self.exempt, home, &who, now, &b)? {
            Ok(c) => c,
            Err(e) => {
                self.note_checkout_error(&e);
                return Some(Quick::Failed(e));
            }
        };
        self.pool.metrics.checkout_wait.observe(0.0);
        if !crate::relay::reset::settings_match(&conn.applied, &self.desired) {
            // Bringing the server to the client's settings is a round trip: the async path does it.
            return Some(Quick::Install(Box::new((conn, hold))));
        }
        self.adopt(conn, hold, now, &b);
        Some(Quick::Attached)
    }

    /// Take a server handed over from the pool's queue (its settings applied first when they differ).
    /// `now`: the caller's clock read.
    pub(super) async fn take_handed(&mut self, conn: PooledConn, hold: Hold, now: Instant) -> Result<(), ProxyError> {
        if crate::relay::reset::settings_match(&conn.applied, &self.desired) {
            self.adopt(conn, hold, now, &self.pool.clone().budget());
            return Ok(());
        }
        Box::pin(self.install(conn, hold)).await
    }

    /// Bring a checked-out server to this client's settings, then take it.
    pub(super) async fn install(&mut self, mut conn: PooledConn, hold: Hold) -> Result<(), ProxyError> {
        bring_to(&mut conn, &self.desired, &self.pool).await?;
        self.adopt(conn, hold, Instant::now(), &self.pool.clone().budget());
        Ok(())
    }

    /// Take a server whose settings are the client's: record it for cancels, and set the pump up for it.
    /// `now` (a recent clock read) starts the transaction's clock unless one already runs.
    fn adopt(&mut self, mut conn: PooledConn, hold: Hold, now: Instant, b: &ServiceBudget) {
        self.key.attach(ServerKey { route: conn.cancel.clone(), pid: conn.pid, secret: conn.secret });
        self.prefer = None;
        self.ended_at = None;
        self.last_pid = conn.pid;
        if let Some(h) = self.home.as_ref().filter(|h| h.pid == conn.pid) {
            h.touch_at(now);
        }
        if self.tx_started.is_none() {
            self.tx_started = Some(now);
        }
        self.use_settings(b);
        self.hold = Some(hold);
        self.pump.attach();
        self.pump.backslash_quotes = conn.backslash_quotes;
        // Notifications the server got while the proxy spoke to it belong to whoever listened: only a pinned
        // client listens, so a fresh checkout drops what a previous holder left.
        conn.notifications.clear();
        if self.mode == PoolMode::Transaction {
            conn.note_client(self.key.pid);
            self.pump.servers = conn.server_list().cloned();
        }
        if let Some(s) = self.pump.stmts.as_mut() {
            std::mem::swap(&mut s.server, &mut conn.statements);
            s.server.begin();
            s.unnamed_here = false;
            // Every Parse of the last server was answered before it was released (nothing is owed then).
            s.unnamed_pending.clear();
            s.checked = None;
            // `search_path` follows `desired` where that changes (the probe), not at every checkout.
        }
        self.pump.close_gone();
        self.server = Some(conn);
    }

    /// The server the next checkout takes when it is idle: the one a statement needs, else the home.
    fn preferred(&self) -> Option<i32> {
        self.prefer.or(self.home.as_ref().map(|h| h.pid))
    }

    /// The server a statement needs, when only one backend can answer it as direct: `pg_backend_pid()` the
    /// home (the pid the client was told); `currval`/`lastval` the server this client last used (where its
    /// `nextval` most likely ran). Only the statements already received are looked at. The next checkout
    /// takes that server; [`Self::await_server`] waits while another client has it.
    pub(super) fn wanted_server(&mut self) -> Option<i32> {
        let home = self.home.as_ref().map(|h| h.pid)?;
        // The usual case needs no scan: the home is parked (the checkout takes it anyway) and this client's
        // last statement ran there too.
        let affinity = &self.pool.pool.manager().affinity;
        if (self.last_pid == 0 || self.last_pid == home) && affinity.is_parked(home) {
            return None;
        }
        let want = match mentions(&self.pump.cin) {
            Some(Needs::Home) => home,
            Some(Needs::Last) if self.last_pid != 0 => self.last_pid,
            Some(Needs::Last) => home,
            None => return None,
        };
        self.prefer = Some(want);
        (!affinity.is_parked(want)).then_some(want)
    }

    /// Wait (up to `checkout_timeout`) for server `pid` to be parked again, while it lives.
    pub(super) async fn await_server(&mut self, pid: i32) {
        let m = self.pool.pool.manager();
        let alive = || {
            m.upstream.servers.contains_key(&pid) || m.replica.as_ref().is_some_and(|r| r.servers.contains_key(&pid))
        };
        let until = Instant::now() + self.pool.budget().settings.checkout_timeout;
        while alive() && !m.affinity.is_parked(pid) && Instant::now() < until {
            tokio::time::sleep(HOME_RECHECK).await;
        }
    }
}

/// The backend a statement needs ([`Relay::wanted_server`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    /// `pg_backend_pid()`: the home.
    Home,
    /// `currval`/`lastval`: the server used last.
    Last,
}

/// What `b` mentions, in one pass over its `_`, `v` and `V` (few statements have them): `backend_pid`
/// (any case; it wins), else `currval` or `lastval`.
fn mentions(b: &[u8]) -> Option<Needs> {
    let mut found = None;
    for i in memchr::memchr3_iter(b'_', b'v', b'V', b) {
        if b[i] == b'_' {
            if i >= 7 && b.get(i - 7..i + 4).is_some_and(|w| w.eq_ignore_ascii_case(b"backend_pid")) {
                return Some(Needs::Home);
            }
        } else if found.is_none()
            && i >= 4
            && b.get(i - 4..i + 3)
                .is_some_and(|w| w.eq_ignore_ascii_case(b"currval") || w.eq_ignore_ascii_case(b"lastval"))
        {
            found = Some(Needs::Last);
        }
    }
    found
}

#[cfg(test)]
fn mentions_backend_pid(b: &[u8]) -> bool {
    mentions(b) == Some(Needs::Home)
}

#[cfg(test)]
fn mentions_currval(b: &[u8]) -> bool {
    mentions(b) == Some(Needs::Last)
}

/// Bring `conn` to the settings `desired` as a diff (one round trip; none when they already match).
pub(super) async fn bring_to(
    conn: &mut PooledConn,
    desired: &std::sync::Arc<std::collections::BTreeMap<String, String>>,
    pool: &crate::budget::pool::ServicePool,
) -> Result<(), ProxyError> {
    let (set, reset) = crate::relay::reset::settings_diff(&conn.applied, desired);
    if !set.is_empty() || !reset.is_empty() {
        let timeout = pool.budget().settings.reset_timeout;
        if let Err(e) = conn.apply_settings(&set, &reset, timeout).await {
            // A refused value leaves the server as it was (and usable): the client's setting is at fault.
            return Err(match e {
                ServerError::Postgres { code, message } => ProxyError::ServerRejected { code, message },
                source => ProxyError::Upstream { upstream: pool.budget().upstream.clone(), source },
            });
        }
        conn.applied = desired.clone();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statements_that_need_one_backend_are_recognised_in_any_case_and_position() {
        assert!(mentions_backend_pid(b"select pg_backend_pid()"));
        assert!(mentions_backend_pid(b"SELECT PG_BACKEND_PID"));
        assert!(mentions_backend_pid(b"backend_pid"));
        assert!(!mentions_backend_pid(b"select backend pid, _pid, backend_pi"));
        assert!(!mentions_backend_pid(b"_"));
        assert!(mentions_currval(b"select currval('s')"));
        assert!(mentions_currval(b"SELECT LASTVAL()"));
        assert!(mentions_currval(b"lastval"));
        assert!(!mentions_currval(b"select nextval('s'), val, v, urrval, lastva"));
        assert!(!mentions_currval(b"v"));
        // Both: the home wins, wherever each one is.
        assert_eq!(mentions(b"select currval('s'), pg_backend_pid()"), Some(Needs::Home));
        assert_eq!(mentions(b"select pg_backend_pid(), lastval()"), Some(Needs::Home));
        assert_eq!(mentions(b"select 1"), None);
    }
}
