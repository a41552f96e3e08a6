//! Command line: `run` the proxy, `check` a config, or make a SCRAM `verifier` for `budgets.toml`.

use clap::{Parser, Subcommand};
use pgbudget::app::App;
use pgbudget::budget::Resolved;
use pgbudget::config::{Config, Env};
use pgbudget::telemetry::Telemetry;
use std::path::PathBuf;
use std::process::ExitCode;
use tracing::{error, info};

#[derive(Parser)]
#[command(name = "pgbudget", version, about = "Postgres connection-budget proxy")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy.
    Run {
        #[arg(long, short, env = "PGBUDGET_CONFIG", default_value = "budgets.toml")]
        config: PathBuf,
        /// Override `proxy.listen`.
        #[arg(long, env = "PGBUDGET_LISTEN")]
        listen: Option<String>,
        /// Override `admin.listen` ("" disables the admin HTTP listener).
        #[arg(long, env = "PGBUDGET_ADMIN_LISTEN")]
        admin_listen: Option<String>,
        /// `text` or `json`.
        #[arg(long, env = "PGBUDGET_LOG_FORMAT", default_value = "text")]
        log_format: String,
    },
    /// Validate a config, print the resolved budget table, exit non-zero on any violation.
    Check {
        #[arg(long, short, env = "PGBUDGET_CONFIG", default_value = "budgets.toml")]
        config: PathBuf,
    },
    /// Read a password on stdin and print a SCRAM-SHA-256 verifier for `[[auth.users]] scram = ...`.
    Verifier,
}

fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        // The SQL parser logs statement text at debug level; statements (and their constants) never reach our logs.
        .add_directive("sqlparser=warn".parse().expect("valid directive"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if format == "json" {
        b.json().with_current_span(true).init();
    } else {
        b.init();
    }
}

fn load(path: &std::path::Path, env: &Env) -> Result<Resolved, pgbudget::config::ConfigError> {
    Config::load(path).and_then(|c| Resolved::resolve(c, env))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = Env::from_process();
    match cli.cmd {
        Cmd::Check { config } => match load(&config, &env) {
            Ok(r) => {
                print!("{}", r.table());
                println!("ok: {} satisfies every invariant", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", config.display());
                ExitCode::from(2)
            }
        },
        Cmd::Verifier => {
            let mut pw = String::new();
            if std::io::stdin().read_line(&mut pw).is_err() || pw.trim_end_matches(['\r', '\n']).is_empty() {
                eprintln!("usage: echo PASSWORD | pgbudget verifier");
                return ExitCode::from(2);
            }
            println!("{}", postgres_protocol::password::scram_sha_256(pw.trim_end_matches(['\r', '\n']).as_bytes()));
            ExitCode::SUCCESS
        }
        Cmd::Run { config, listen, admin_listen, log_format } => {
            init_logs(&log_format);
            let mut resolved = match load(&config, &env) {
                Ok(r) => r,
                Err(e) => {
                    error!(kind = "config", cause = %e, "refusing to start");
                    eprintln!("{}: {e}", config.display());
                    return ExitCode::from(2);
                }
            };
            if let Some(l) = listen {
                resolved.config.proxy.listen = l;
            }
            if let Some(l) = admin_listen {
                resolved.config.admin.listen = l;
            }
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
            rt.block_on(run(resolved, env, config))
        }
    }
}

async fn run(resolved: Resolved, env: Env, config_path: std::path::PathBuf) -> ExitCode {
    let addr = resolved.config.proxy.listen.clone();
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            error!(kind = "listen", cause = %e, %addr, "cannot listen");
            return ExitCode::from(1);
        }
    };
    for line in resolved.table().lines() {
        info!("budget: {line}");
    }
    let admin_addr = resolved.config.admin.listen.clone();
    let admin = if admin_addr.is_empty() {
        None
    } else {
        match tokio::net::TcpListener::bind(&admin_addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                error!(kind = "listen", cause = %e, addr = %admin_addr, "cannot listen for admin http");
                return ExitCode::from(1);
            }
        }
    };
    let metrics = pgbudget::metrics::Metrics::new();
    let telemetry = match open_lake(&resolved, &metrics).await {
        Ok(t) => t,
        Err(e) => {
            error!(kind = "lake", cause = %e, "refusing to start");
            return ExitCode::from(2);
        }
    };
    let app = App::with_telemetry(resolved, &env, metrics, telemetry);
    let _ = app.config_path.set(config_path);
    app.record_config("startup", &app.resolved().table(), 0);
    if let Some(l) = admin {
        tokio::spawn(pgbudget::admin::serve(app.clone(), l));
    }
    info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or(addr), "pgbudget listening");
    let server = tokio::spawn(app.clone().serve(listener));
    let signal = wait_for_signal(&app).await;
    info!(signal, "shutting down: draining sessions");
    app.drain().await;
    let _ = server.await;
    ExitCode::SUCCESS
}

/// Open the lake when `[lake] enabled`: a configuration or extension problem stops the start, an unreachable
/// catalog does not (rows are kept and the attach retried).
#[cfg(feature = "lake")]
async fn open_lake(r: &Resolved, metrics: &pgbudget::metrics::Metrics) -> Result<Telemetry, String> {
    if !r.config.lake.enabled {
        return Ok(Telemetry::default());
    }
    let (cfg, registry) = (r.config.lake.clone(), metrics.registry.clone());
    let lake = tokio::task::spawn_blocking(move || {
        pgbudget::lake::Lake::open(&cfg, pgbudget::lake::registry::Registry::builtin(), &registry)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    Ok(Telemetry::new(Some(std::sync::Arc::new(lake))))
}

#[cfg(not(feature = "lake"))]
async fn open_lake(_: &Resolved, _: &pgbudget::metrics::Metrics) -> Result<Telemetry, String> {
    Ok(Telemetry::default())
}

/// Serve SIGHUP (reload) until SIGTERM, SIGINT or the console's SHUTDOWN asks to stop.
async fn wait_for_signal(app: &App) -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    loop {
        tokio::select! {
            _ = term.recv() => return "SIGTERM",
            _ = int.recv() => return "SIGINT",
            _ = app.shutdown.cancelled() => return "SHUTDOWN",
            _ = hup.recv() => {
                info!("SIGHUP: reloading the configuration");
                let _ = app.reload();
            }
        }
    }
}
