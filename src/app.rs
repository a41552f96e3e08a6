//! Process-wide shared state (passed as `Arc<App>`, no globals), the accept loop, background tasks and shutdown.

use crate::auth::UserDb;
use crate::budget::Resolved;
use crate::cancel::CancelRegistry;
use crate::config::Env;
use crate::pool::Pools;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

/// Everything a session or background task needs.
pub struct App {
    pub resolved: Resolved,
    pub users: UserDb,
    pub pools: Pools,
    pub cancels: Arc<CancelRegistry>,
    /// Fired once to start a graceful shutdown.
    pub shutdown: CancellationToken,
    /// Every client session and background task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    next_session: AtomicU64,
    pub started: Instant,
}

impl App {
    pub fn new(resolved: Resolved, env: &Env) -> Arc<App> {
        let users = UserDb::build(&resolved, env);
        let pools = Pools::build(&resolved);
        Arc::new(App {
            resolved,
            users,
            pools,
            cancels: Arc::new(CancelRegistry::default()),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            next_session: AtomicU64::new(1),
            started: Instant::now(),
        })
    }

    pub fn session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Accept clients until shutdown; each gets a session task with its own span.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        self.spawn_reaper();
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((sock, peer)) => {
                    crate::server::tune_socket(&sock);
                    let id = self.session_id();
                    let span = tracing::info_span!("session", id, client = %peer, service = tracing::field::Empty);
                    self.tasks
                        .spawn(crate::session::run(self.clone(), sock).instrument(span));
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(kind = "accept", cause = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        drop(listener);
        info!("listener closed; draining sessions");
    }

    /// Close server connections that idled past `server_idle_timeout` or outlived `server_lifetime`.
    fn spawn_reaper(self: &Arc<Self>) {
        let app = self.clone();
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = app.shutdown.cancelled() => break,
                    _ = tick.tick() => app.pools.pools.values().for_each(|p| p.reap()),
                }
            }
        });
    }

    /// Stop accepting, let sessions finish their transactions up to the drain deadline, then close all servers.
    pub async fn drain(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        let deadline = self.resolved.config.proxy.drain_timeout;
        if tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                kind = "drain",
                remaining = self.tasks.len(),
                "drain deadline passed; closing remaining sessions"
            );
        }
        self.pools.close();
        info!("shutdown complete");
    }
}
