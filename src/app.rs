//! The process around the shared context (`context::App`): the accept loop, the background tasks it starts and
//! shutdown.

use crate::context::{App, LoginPermit};
use crate::error::ProxyError;
use crate::protocol::Startup;
use crate::tls::Stream;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::{info, warn, Instrument};

impl App {
    /// Accept clients until shutdown; each gets a session task with its own span.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        self.spawn_reaper();
        self.verify_read_only();
        self.start_snapshot_log();
        self.start_lake_snapshots();
        #[cfg(feature = "lake")]
        if let Some(lake) = self.lake().filter(|l| l.writer().is_some()) {
            let every = self.resolved().config.lake.maintenance_interval;
            crate::lake::maintain::spawn_maintenance(lake.clone(), every, self.shutdown.clone(), &self.tasks);
        }
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
                        .spawn(crate::client::session::run(self.clone(), sock, peer, id, console).instrument(span));
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
                    _ = tick.tick() => app.pools().reap(),
                }
            }
        });
    }

    /// Stop accepting, let sessions finish their transactions up to the drain deadline, then close all servers.
    pub async fn drain(&self) {
        self.begin_shutdown();
        self.tasks.close();
        let deadline = self.resolved().config.proxy.drain_timeout;
        if tokio::time::timeout(deadline, self.tasks.wait()).await.is_err() {
            warn!(kind = "drain", remaining = self.tasks.len(), "drain deadline passed; closing remaining sessions");
        }
        self.pools().close();
        #[cfg(feature = "lake")]
        if let Some(lake) = self.lake().cloned() {
            // The final flush is bounded by `lake.shutdown_timeout`.
            let _ = tokio::task::spawn_blocking(move || lake.shutdown()).await;
        }
        info!("shutdown complete");
    }
}

/// The admin console as the client layer's [`crate::client::session::Console`].
fn console<'a>(
    app: &'a Arc<App>,
    sock: &'a mut Stream,
    startup: &'a Startup,
    login_slot: LoginPermit,
) -> Pin<Box<dyn Future<Output = Result<(), ProxyError>> + Send + 'a>> {
    Box::pin(crate::admin::console::run(app, sock, startup, login_slot))
}
