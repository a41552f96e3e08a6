//! Operator controls, familiar from PgBouncer: `PAUSE` (finish running transactions, hold new checkouts, close
//! the servers), `RESUME`, `RECONNECT` (replace server connections gracefully), `KILL` (end a service's clients
//! and servers now, then hold new ones until `RESUME`) and `SHUTDOWN`.

use crate::budget::pool::ServicePool;
use crate::context::App;
use crate::error::ControlError;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

impl App {
    /// The pools a command addresses: one service's (both routes) or all.
    fn addressed(&self, service: Option<&str>) -> Result<Vec<Arc<ServicePool>>, ControlError> {
        let pools = self.pools().of_service(service);
        match service {
            Some(s) if pools.is_empty() => Err(ControlError::UnknownService(s.to_owned())),
            _ => Ok(pools),
        }
    }

    /// Hold new checkouts, wait (up to `drain_timeout`) for running transactions to end, close idle servers.
    pub async fn pause(&self, service: Option<&str>) -> Result<(), ControlError> {
        let pools = self.addressed(service)?;
        pools.iter().for_each(|p| p.control.set_paused(true));
        info!(service = service.unwrap_or("*"), "PAUSE: holding new checkouts");
        let deadline = Instant::now() + self.resolved().config.proxy.drain_timeout;
        loop {
            let busy: u32 = pools.iter().map(|p| p.in_use()).sum();
            if busy == 0 {
                break;
            }
            if Instant::now() >= deadline {
                warn!(kind = "pause", busy, "PAUSE: servers still in use at the deadline; staying paused");
                return Err(ControlError::PauseTimedOut { busy });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        pools.iter().for_each(|p| {
            p.close_idle();
        });
        info!(service = service.unwrap_or("*"), "PAUSE: complete, server connections closed");
        Ok(())
    }

    pub fn resume(&self, service: Option<&str>) -> Result<(), ControlError> {
        self.addressed(service)?.iter().for_each(|p| p.control.set_paused(false));
        info!(service = service.unwrap_or("*"), "RESUME");
        Ok(())
    }

    /// Retire every server connection: idle ones close now, busy ones when their client releases them.
    pub fn reconnect(&self, service: Option<&str>) -> Result<(), ControlError> {
        for p in self.addressed(service)? {
            p.pool.manager().generation.fetch_add(1, Ordering::AcqRel);
            p.reap(None);
        }
        info!(service = service.unwrap_or("*"), "RECONNECT: server connections will be replaced");
        Ok(())
    }

    /// End the service's client sessions and their servers now; new checkouts wait for `RESUME`.
    pub fn kill(&self, service: Option<&str>) -> Result<(), ControlError> {
        for p in self.addressed(service)? {
            p.control.set_paused(true);
            p.control.kill_sessions();
            p.close_idle();
        }
        warn!(service = service.unwrap_or("*"), "KILL: sessions ended by operator; paused until RESUME");
        Ok(())
    }
}
