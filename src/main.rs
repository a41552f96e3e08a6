//! Command line: `run` the proxy, `check` a config, make a SCRAM `verifier` for `budgets.toml`, or look into the
//! telemetry `lake` (`timeline`, `query`, `maintain`; these read only the `[lake]` section and never connect to
//! an upstream).

use clap::{Parser, Subcommand};
use pgbudget::config::resolve::Resolved;
use pgbudget::config::source::Source;
use pgbudget::config::{environment, Env};
use pgbudget::context::App;
use pgbudget::telemetry::metrics::Metrics;
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
        /// The config file (default `budgets.toml`; without one, `PGBUDGET_SLICES` + `DATABASE_URL` describe it).
        #[arg(long, short, env = "PGBUDGET_CONFIG")]
        config: Option<PathBuf>,
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
        #[arg(long, short, env = "PGBUDGET_CONFIG")]
        config: Option<PathBuf>,
    },
    /// GET an admin endpoint (`/health`, `/ready`); exit 0 on HTTP 200. For container health checks and
    /// entrypoints that start the app once pgbudget is ready.
    Probe {
        #[arg(default_value = "/health")]
        path: String,
        /// The admin listener (default: the container's, else 127.0.0.1:9187).
        #[arg(long, env = "PGBUDGET_ADMIN_LISTEN")]
        admin: Option<String>,
        /// Keep trying until this long has passed (e.g. `30s`); default: one try.
        #[arg(long, value_parser = humantime_serde::re::humantime::parse_duration, default_value = "0s")]
        wait: std::time::Duration,
    },
    /// Read a password on stdin and print a SCRAM-SHA-256 verifier for `[[auth.users]] scram = ...`.
    Verifier,
    /// The telemetry lake of `[lake]`: daily timeline, ad-hoc read-only SQL, maintenance.
    Lake {
        #[arg(long, short, global = true, env = "PGBUDGET_CONFIG")]
        config: Option<PathBuf>,
        #[command(subcommand)]
        cmd: LakeCmd,
    },
}

#[derive(Subcommand)]
#[cfg_attr(not(feature = "lake"), allow(dead_code))]
enum LakeCmd {
    /// Per service and UTC day or hour (the current one last): checkout timeouts, 53300 rejections, read-only
    /// violations, server errors (upstream-side only) and the peak utilisation of the share.
    Timeline {
        /// The last N UTC days (default 7 unless `--since` is given).
        #[arg(long, conflicts_with = "since", value_parser = clap::value_parser!(u32).range(1..=3660))]
        days: Option<u32>,
        /// How far back, e.g. `2d`, `36h` (the current bucket included).
        #[arg(long, value_parser = humantime_serde::re::humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// One row per UTC `day` or `hour`.
        #[arg(long, value_enum, default_value = "day")]
        by: TimelineBucket,
        /// Only this service.
        #[arg(long)]
        service: Option<String>,
        /// `text` (an aligned table) or `json` (one document, for scripts).
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
    },
    /// Run one query against the lake attached READ_ONLY; tables are `lake.<table>` (or just `<table>`).
    Query {
        /// One query (SELECT, WITH ..., FROM ...); it runs as a subquery, so other statements are refused.
        sql: String,
        /// One JSON object per row instead of a table.
        #[arg(long)]
        json: bool,
        /// Most rows printed (default and cap: `lake.max_rows`).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Flush inlined rows to Parquet, merge small files, expire snapshots older than `lake.expire_older_than`,
    /// delete files unreferenced for `lake.cleanup_older_than`. Skipped while another process maintains the lake.
    Maintain,
}

#[cfg(feature = "lake")]
use pgbudget::lake::timeline::Bucket as TimelineBucket;
/// Without the lake there is no timeline; the arguments still parse.
#[cfg(not(feature = "lake"))]
#[derive(Clone, Copy, clap::ValueEnum)]
enum TimelineBucket {
    Day,
    Hour,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OutputFormat {
    Text,
    Json,
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

/// Logs of the one-shot commands: errors only unless RUST_LOG says otherwise (the outcome goes to stdout/stderr).
#[cfg(feature = "lake")]
fn init_cli_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// Bind a listener; `[::]` falls back to `0.0.0.0` on a host without IPv6.
async fn bind(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(addr).await {
        Err(e) if addr.starts_with("[::]:") && e.raw_os_error() == Some(97 /* EAFNOSUPPORT */) => {
            let v4 = addr.replacen("[::]", "0.0.0.0", 1);
            tracing::warn!(%addr, fallback = %v4, "no IPv6 on this host: listening on IPv4 only");
            tokio::net::TcpListener::bind(v4).await
        }
        r => r,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = Env::from_process();
    match cli.cmd {
        Cmd::Check { config } => {
            let source = Source::pick(config, &env);
            match source.load(&env) {
                Ok(r) => {
                    print!("{}", r.table());
                    println!("ok: {source} satisfies every invariant");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{source}: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Probe { path, admin, wait } => {
            use pgbudget::admin::probe;
            let listen = admin
                .filter(|a| !a.is_empty())
                .or_else(|| environment::container_listen(&env).1)
                .unwrap_or_else(|| "127.0.0.1:9187".into());
            match probe::target(&listen).and_then(|addr| probe::wait_for(addr, &path, wait)) {
                Ok(body) => {
                    println!("{body}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("probe: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Verifier => {
            let mut pw = String::new();
            if std::io::stdin().read_line(&mut pw).is_err() || pw.trim_end_matches(['\r', '\n']).is_empty() {
                eprintln!("usage: echo PASSWORD | pgbudget verifier");
                return ExitCode::from(2);
            }
            println!("{}", postgres_protocol::password::scram_sha_256(pw.trim_end_matches(['\r', '\n']).as_bytes()));
            ExitCode::SUCCESS
        }
        Cmd::Lake { config, cmd } => lake_cmd(&Source::pick(config, &env), &env, cmd),
        Cmd::Run { config, listen, admin_listen, log_format } => {
            init_logs(&log_format);
            let source = Source::pick(config, &env);
            let mut resolved = match source.load(&env) {
                Ok(r) => r,
                Err(e) => {
                    error!(kind = "config", cause = %e, "refusing to start");
                    eprintln!("{source}: {e}");
                    return ExitCode::from(2);
                }
            };
            info!(config = %source, "configuration loaded");
            let (container_listen, container_admin) = environment::container_listen(&env);
            if let Some(l) = listen.or(container_listen) {
                resolved.config.proxy.listen = l;
            }
            if let Some(l) = admin_listen.or(container_admin) {
                resolved.config.admin.listen = l;
            }
            let rt = runtime(std::env::var("PGBUDGET_WORKER_THREADS").ok().as_deref());
            rt.block_on(run(resolved, env, source.path().map(std::path::Path::to_path_buf)))
        }
    }
}

/// The runtime: one event-loop thread by default (PgBouncer's shape: a client, its server and the pool meet
/// on one thread, with no cross-thread wakeups); `PGBUDGET_WORKER_THREADS=N` (N > 1) runs N worker threads.
fn runtime(threads: Option<&str>) -> tokio::runtime::Runtime {
    let n = threads.and_then(|t| t.parse::<usize>().ok()).unwrap_or(1);
    let mut b = if n > 1 {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(n);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    b.enable_all().build().expect("tokio runtime")
}

async fn run(resolved: Resolved, env: Env, config_path: Option<PathBuf>) -> ExitCode {
    // The admin listener binds first: once the client port takes connections, the probes answer too.
    let admin_addr = resolved.config.admin.listen.clone();
    let admin = if admin_addr.is_empty() {
        None
    } else {
        match bind(&admin_addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                error!(kind = "listen", cause = %e, addr = %admin_addr, "cannot listen for admin http");
                return ExitCode::from(1);
            }
        }
    };
    let addr = resolved.config.proxy.listen.clone();
    let listener = match bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            error!(kind = "listen", cause = %e, %addr, "cannot listen");
            return ExitCode::from(1);
        }
    };
    for line in resolved.table().lines() {
        info!("budget: {line}");
    }
    let metrics = Metrics::new();
    #[cfg(feature = "lake")]
    let app = match open_lake(&resolved, &metrics).await {
        Ok(lake) => App::with_lake(resolved, &env, metrics, lake),
        Err(e) => {
            error!(kind = "lake", cause = %e, "refusing to start");
            return ExitCode::from(2);
        }
    };
    #[cfg(not(feature = "lake"))]
    let app = App::with_telemetry(resolved, &env, metrics, pgbudget::telemetry::Telemetry::default());
    if let Some(path) = config_path {
        let _ = app.config_path.set(path);
    }
    app.record_config("startup", &app.resolved().table(), 0);
    // `/errors` answers right after a restart: the ring is refilled from the lake's server_errors.
    #[cfg(feature = "lake")]
    if let Some(lake) = app.lake().cloned() {
        let window = app.resolved().config.admin.errors_window;
        match pgbudget::lake::errors::refill(&app.journal, lake, window, std::time::Duration::from_secs(3)).await {
            Ok(n) => info!(errors = n, "error journal refilled from the lake"),
            Err(e) => tracing::warn!(kind = "lake", cause = %e, "error journal not refilled from the lake"),
        }
    }
    if let Some(l) = admin {
        tokio::spawn(pgbudget::admin::http::serve(app.clone(), l));
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
async fn open_lake(r: &Resolved, metrics: &Metrics) -> Result<Option<std::sync::Arc<pgbudget::lake::Lake>>, String> {
    if !r.config.lake.enabled {
        return Ok(None);
    }
    let (cfg, registry) = (r.config.lake.clone(), metrics.registry.clone());
    let lake = tokio::task::spawn_blocking(move || {
        let tables = pgbudget::lake::registry::Registry::for_config(&cfg)?;
        pgbudget::lake::Lake::open(&cfg, tables, &registry)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    Ok(Some(std::sync::Arc::new(lake)))
}

/// `pgbudget lake ...`: exit 0 on success, 1 when the lake or the query fails, 2 for configuration problems.
#[cfg(feature = "lake")]
fn lake_cmd(config: &Source, env: &Env, cmd: LakeCmd) -> ExitCode {
    use pgbudget::lake::{maintain, timeline, Lake, LakeError, Registry};
    init_cli_logs();
    // Only `[lake]` matters here: the rest of the file is parsed (unknown keys refused) but not resolved, so an
    // operator can read the lake where the budget itself would not start.
    let (mut cfg, admin) = match config.config(env) {
        Ok(c) => (c.lake, c.admin),
        Err(e) => {
            eprintln!("{config}: {e}");
            return ExitCode::from(2);
        }
    };
    if !cfg.enabled {
        eprintln!("{config}: [lake] enabled = false: there is no lake to look at");
        return ExitCode::from(2);
    }
    // Everything but maintenance attaches READ_ONLY: no writer, no table creation, writes refused.
    cfg.read_only = !matches!(cmd, LakeCmd::Maintain);
    let tables = match Registry::for_config(&cfg) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("lake: {e}");
            return ExitCode::from(2);
        }
    };
    let lake = match Lake::open(&cfg, tables, &prometheus::Registry::new()) {
        Ok(l) => l,
        Err(e @ (LakeError::Config(_) | LakeError::Schema { .. })) => {
            eprintln!("{config}: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("lake: {e}");
            return ExitCode::from(1);
        }
    };
    if !lake.is_attached() {
        if let Err(e) = lake.reader().reattach() {
            if e.to_string().contains("Conflicting lock") && !matches!(cmd, LakeCmd::Maintain) {
                // A running pgbudget holds the embedded catalog: ask it through its admin listener.
                lake.shutdown();
                drop(lake);
                return remote_lake_cmd(&cfg, &admin, env, cmd);
            }
            eprintln!("lake: {e}");
            if e.to_string().contains("Conflicting lock") {
                eprintln!("lake: the embedded file catalog admits one process: stop the pgbudget using it, or share a Postgres catalog (lake.catalog = \"postgres:...\")");
            }
            return ExitCode::from(1);
        }
    }
    let out = match cmd {
        LakeCmd::Timeline { days, since, by, service, format } => {
            let options = timeline_options(days, since, by, service);
            timeline::timeline(lake.reader(), &options).map(|t| render_timeline(&t, format))
        }
        LakeCmd::Query { sql, json, limit } => {
            // Bare table names resolve in the lake (lake.main), qualified ones as before.
            let _ = lake.reader().with_conn(|c| Ok(c.execute_batch("USE lake")?));
            lake.reader().query(&sql, &[], limit.unwrap_or(cfg.max_rows)).map(|r| render_query(&r, json))
        }
        LakeCmd::Maintain => maintain(&lake).map(|r| format!("lake maintenance: {r}\n")),
    };
    lake.shutdown();
    print_outcome(out)
}

#[cfg(feature = "lake")]
fn render_timeline(t: &pgbudget::lake::timeline::Timeline, format: OutputFormat) -> String {
    match format {
        OutputFormat::Text => pgbudget::lake::timeline::format_timeline(t),
        OutputFormat::Json => pgbudget::lake::timeline::format_timeline_json(t),
    }
}

#[cfg(feature = "lake")]
fn render_query(r: &pgbudget::lake::QueryResult, json: bool) -> String {
    if r.truncated {
        eprintln!("lake query: output cut at {} rows (--limit, lake.max_rows)", r.rows.len());
    }
    if json {
        pgbudget::lake::timeline::format_json_lines(r)
    } else {
        pgbudget::lake::timeline::format_result(r)
    }
}

/// `timeline` and `query` through the admin listener of the pgbudget holding the embedded catalog (`[admin]
/// listen` or `PGBUDGET_ADMIN_LISTEN`, the token from `admin.api_token_env`): the same output.
#[cfg(feature = "lake")]
fn remote_lake_cmd(
    cfg: &pgbudget::lake::LakeConfig,
    admin: &pgbudget::config::AdminSection,
    env: &Env,
    cmd: LakeCmd,
) -> ExitCode {
    let held = "lake: the embedded catalog file is held by a running pgbudget";
    let listen = env.get("PGBUDGET_ADMIN_LISTEN").unwrap_or(&admin.listen).to_owned();
    if listen.is_empty() {
        eprintln!("{held}, and its admin listener is off ([admin] listen): stop it to read the lake");
        return ExitCode::from(1);
    }
    let Some(token) = env.get(&admin.api_token_env).filter(|t| !t.is_empty()).map(str::to_owned) else {
        eprintln!("{held}: set {} to its admin token to ask it through {listen}", admin.api_token_env);
        return ExitCode::from(1);
    };
    let addr = match pgbudget::admin::probe::target(&listen) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("lake: {e}");
            return ExitCode::from(2);
        }
    };
    let remote =
        pgbudget::lake::remote::Remote { addr, token, timeout: cfg.query_timeout + std::time::Duration::from_secs(5) };
    let out = match cmd {
        LakeCmd::Timeline { days, since, by, service, format } => {
            remote.timeline(&timeline_options(days, since, by, service)).map(|t| render_timeline(&t, format))
        }
        LakeCmd::Query { sql, json, limit } => {
            remote.query(&sql, limit.unwrap_or(cfg.max_rows)).map(|r| render_query(&r, json))
        }
        LakeCmd::Maintain => unreachable!("maintenance is never asked remotely"),
    };
    print_outcome(out)
}

#[cfg(feature = "lake")]
fn print_outcome(out: Result<String, pgbudget::lake::LakeError>) -> ExitCode {
    match out {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lake: {e}");
            ExitCode::from(1)
        }
    }
}

/// `--days N` is N day buckets; `--since D` is as many `--by` buckets as cover D; neither: the last 7 days.
#[cfg(feature = "lake")]
fn timeline_options(
    days: Option<u32>,
    since: Option<std::time::Duration>,
    by: TimelineBucket,
    service: Option<String>,
) -> pgbudget::lake::timeline::TimelineOptions {
    let buckets = match (days, since) {
        (_, Some(d)) => by.count(d),
        (Some(n), None) => by.count(std::time::Duration::from_secs(u64::from(n) * 86_400)),
        (None, None) => by.count(std::time::Duration::from_secs(7 * 86_400)),
    };
    pgbudget::lake::timeline::TimelineOptions { by, buckets, service }
}

#[cfg(not(feature = "lake"))]
fn lake_cmd(_: &Source, _: &Env, _: LakeCmd) -> ExitCode {
    eprintln!("pgbudget was built without the lake feature (rebuild with the default features)");
    ExitCode::from(2)
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
