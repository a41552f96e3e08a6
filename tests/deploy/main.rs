//! The deployment patterns of `examples/`, started the way their containers start them (entrypoint script, env
//! only, no docker engine), against a real Postgres: the sidecar entrypoint beside an asyncpg app, the shared
//! proxy of `examples/shared/budgets.toml` with the image's listener defaults, and configuration from the
//! environment alone.

#[path = "../common/mod.rs"]
mod common;
mod support;

use common::{free_port, Pg, PG_PASSWORD};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use support::*;

#[test]
fn env_only_check_prints_the_same_table_as_the_file_example() {
    let dir = tempfile::tempdir().unwrap();
    let common = [("DATABASE_URL", "postgres://u:p@db.internal:5432/app"), ("RAILWAY_SERVICE_NAME", "web")];
    let run = |args: &[&str], extra: &[(&str, &str)]| {
        let mut cmd = Command::new(BIN);
        clean(&mut cmd).current_dir(dir.path()).args(args).envs(common).envs(extra.iter().copied());
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, file, err) = run(&["check", "--config", repo("budgets.toml").to_str().unwrap()], &[]);
    assert_eq!(code, Some(0), "{err}");
    let (code, envs, err) = run(&["check"], &[("PGBUDGET_SLICES", SLICES), ("PGBUDGET_RESERVED", "2")]);
    assert_eq!(code, Some(0), "{err}");
    let table = |s: &str| s.lines().filter(|l| !l.starts_with("ok: ")).map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(table(&envs), table(&file), "env:\n{envs}\nfile:\n{file}");
    assert!(envs.contains("ok: the environment (PGBUDGET_SLICES) satisfies every invariant"), "{envs}");
    assert!(envs.contains("slices 83 + reserved 2 = 85 of ceiling 97"), "{envs}");

    // The same rules refuse the same mistakes, every one named.
    let (code, _, err) = run(&["check"], &[("PGBUDGET_SLICES", "worker=90,web=15,bad=x"), ("PGBUDGET_CEILING", "97")]);
    assert_eq!(code, Some(2));
    assert!(err.contains("slice of `bad` is \"x\""), "{err}");
    // No file, no slices: the way out is named.
    let (code, _, err) = run(&["check"], &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("set PGBUDGET_SLICES and DATABASE_URL"), "{err}");
    // Both: refused rather than one silently winning.
    let (code, _, err) =
        run(&["check", "--config", repo("budgets.toml").to_str().unwrap()], &[("PGBUDGET_SLICES", SLICES)]);
    assert_eq!(code, Some(2));
    assert!(err.contains("name one"), "{err}");
}

#[test]
fn every_environment_variable_is_in_the_readme() {
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    for (var, _) in pgbudget::config::environment::VARS {
        assert!(readme.contains(var), "README does not document {var}");
    }
    for var in ["PGBUDGET_CONTAINER", "PGBUDGET_BIND_HOST", "PGBUDGET_ADMIN_LISTEN", "PORT"] {
        assert!(readme.contains(var), "README does not document {var}");
    }
}

/// The sidecar entrypoint of `examples/sidecar` with the example asyncpg app and an environment-only pgbudget.
#[test]
fn sidecar_entrypoint_serves_the_app_through_pgbudget_and_drains_on_sigterm() {
    require_python("asyncpg");
    let pg = pg_logging_eof();
    let app = repo("examples/sidecar/app.py");
    let mut s = Sidecar::start(&pg, &["python3", app.to_str().unwrap()], &[]);
    // The app runs, and its DATABASE_URL names pgbudget's port, not Postgres's.
    let line = s.expect_line(Duration::from_secs(60), |l| queries(l) >= 50);
    assert!(line.contains(&format!("port={}", s.proxy_port)), "{line}");

    // While it runs: the app's sessions are pgbudget's clients of service `app`, and Postgres sees at most the
    // share of 6 server connections, labelled with the app's own application_name.
    let (code, pools) = http_get(s.admin_port, "/pools");
    assert_eq!(code, 200, "{pools}");
    let pools: serde_json::Value = serde_json::from_str(&pools).unwrap();
    assert!(pools["clients"].as_u64().unwrap_or(0) >= 2, "the app's pool sessions are clients: {pools}");
    let app_pool =
        pools["pools"].as_array().unwrap().iter().find(|p| p["service"] == "app").expect("a pool of `app`").clone();
    assert_eq!(app_pool["share"].as_u64(), Some(6), "slice not split by WEB_CONCURRENCY: {app_pool}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let servers: i64 = rt.block_on(async {
        let c = common::connect(&pg.conninfo()).await.unwrap();
        c.query_one(
            "select count(*) from pg_stat_activity where application_name in ('sidecar-app', 'pgbudget:app:rw')",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    });
    assert!((1..=6).contains(&servers), "server connections of the app: {servers}");
    let (code, ready) = http_get(s.admin_port, "/ready");
    assert_eq!(code, 200, "{ready}");

    // A deploy: SIGTERM to the entrypoint stops the app (which closes its pool), then pgbudget, then exits 0.
    let kids = children(s.child.id());
    assert!(kids.iter().any(|&p| comm(p) == "pgbudget"), "pgbudget is a child: {kids:?}");
    assert!(kids.iter().any(|&p| comm(p).starts_with("python")), "the app is a child: {kids:?}");
    let _ = Command::new("kill").args(["-TERM", &s.child.id().to_string()]).status();
    let closed = s.expect_line(Duration::from_secs(20), |l| l.starts_with("closed"));
    assert!(queries(&closed) >= 50, "{closed}");
    let code = wait_exit(&mut s.child, Duration::from_secs(30));
    assert_eq!(code, Some(0), "entrypoint exit; stderr:\n{}", s.stderr());
    for p in &kids {
        assert!(!alive(*p), "process {p} ({}) outlived the entrypoint", comm(*p));
    }
    assert!(std::net::TcpStream::connect(("127.0.0.1", s.proxy_port)).is_err(), "pgbudget still listens");
    let err = s.stderr();
    assert!(err.contains("shutting down: draining sessions"), "pgbudget drained:\n{err}");
    let app_done = err.find("app exited with status 0").expect("app exit logged");
    let drain = err.find("shutting down: draining sessions").unwrap();
    assert!(app_done < drain, "pgbudget stopped only after the app:\n{err}");
    // Postgres saw every connection closed by a Terminate.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(disconnect_noise(&pg.log()), Vec::<String>::new());
}

#[test]
fn sidecar_entrypoint_stops_the_app_when_pgbudget_dies() {
    let pg = pg_logging_eof();
    let app = "trap 'echo stopped; exit 0' TERM; echo up; while :; do sleep 0.1; done";
    let mut s = Sidecar::start(&pg, &["sh", "-c", app], &[]);
    s.expect_line(Duration::from_secs(30), |l| l == "up");
    // A server connection in the pool, so the kill below is what an unclean stop looks like to Postgres.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = rt.block_on(async {
        let c = common::connect(&format!(
            "host=127.0.0.1 port={} user=postgres password={PG_PASSWORD} dbname=postgres",
            s.proxy_port
        ))
        .await
        .unwrap();
        c.simple_query("select 1").await.unwrap();
        c
    });
    let proxy = children(s.child.id()).into_iter().find(|&p| comm(p) == "pgbudget").expect("pgbudget child");
    let _ = Command::new("kill").args(["-KILL", &proxy.to_string()]).status();
    s.expect_line(Duration::from_secs(10), |l| l == "stopped");
    assert_eq!(wait_exit(&mut s.child, Duration::from_secs(10)), Some(1), "stderr:\n{}", s.stderr());
    assert!(s.stderr().contains("pgbudget exited; stopping the app"), "{}", s.stderr());
    drop(client);
    // The control for the clean-stop checks: a killed pgbudget does leave its mark in the Postgres log.
    let deadline = Instant::now() + Duration::from_secs(5);
    while disconnect_noise(&pg.log()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!disconnect_noise(&pg.log()).is_empty(), "an unclean stop is visible in the Postgres log");
}

#[test]
fn sidecar_entrypoint_never_starts_the_app_when_pgbudget_is_not_ready() {
    let pg = Pg::start();
    let marker = tempfile::tempdir().unwrap();
    let ran = marker.path().join("ran");
    let app = format!("touch {}", ran.display());
    // The upstream is a closed port: pgbudget starts, /ready stays 503.
    let dead = format!("postgres://postgres:{PG_PASSWORD}@127.0.0.1:{}/postgres", free_port());
    let mut s = Sidecar::start(&pg, &["sh", "-c", &app], &[("DATABASE_URL", &dead), ("PGBUDGET_READY_TIMEOUT", "2s")]);
    assert_eq!(wait_exit(&mut s.child, Duration::from_secs(30)), Some(1), "stderr:\n{}", s.stderr());
    assert!(!ran.exists(), "the app ran although pgbudget was not ready");
    assert!(s.stderr().contains("pgbudget did not become ready"), "{}", s.stderr());
    assert!(std::net::TcpStream::connect(("127.0.0.1", s.proxy_port)).is_err(), "pgbudget left running");
}

#[test]
fn shared_example_serves_each_service_by_user_with_the_image_listeners() {
    let pg = pg_logging_eof();
    let cwd = tempfile::tempdir().unwrap();
    let (proxy_port, health_port) = (free_port(), free_port());
    let users = ["worker", "canvas", "web", "landing", "evergreen"];
    let password_vars: Vec<(String, String)> =
        users.iter().map(|u| (format!("{}_DB_PASSWORD", u.to_uppercase()), format!("pw-{u}"))).collect();
    // The image's environment: PGBUDGET_CONTAINER=1 and the platform's PORT; the test binds loopback only
    // (PGBUDGET_BIND_HOST), the image binds [::].
    let image_env = |cmd: &mut Command| {
        clean(cmd)
            .current_dir(cwd.path())
            .env("PGBUDGET_CONTAINER", "1")
            .env("PGBUDGET_BIND_HOST", "127.0.0.1")
            .env("PORT", health_port.to_string())
            .env("PGBUDGET_CONFIG", repo("examples/shared/budgets.toml"))
            .env("DATABASE_URL", pg.url())
            .envs(password_vars.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    };
    let mut cmd = Command::new(BIN);
    image_env(&mut cmd);
    let log = cwd.path().join("pgbudget.log");
    let mut proxy = cmd
        .args(["run", "--listen", &format!("127.0.0.1:{proxy_port}")])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _kill = KillOnPanic(proxy.id());
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // The HEALTHCHECK command, with only the image's environment: it finds the admin listener on $PORT.
    let mut probe = Command::new(BIN);
    image_env(&mut probe);
    let out = probe.args(["probe", "/ready", "--wait", "20s"]).output().unwrap();
    assert!(out.status.success(), "probe: {} {}\n{}", String::from_utf8_lossy(&out.stderr), out.status, read_log());
    assert!(String::from_utf8_lossy(&out.stdout).contains("ready"));
    assert_eq!(http_get(health_port, "/health").0, 200);
    assert!(http_get(health_port, "/metrics").1.contains("pgbudget_"));

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut clients = Vec::new();
        for u in users {
            let c = common::connect(&format!(
                "host=127.0.0.1 port={proxy_port} user={u} password=pw-{u} dbname=postgres application_name=claims-{u}"
            ))
            .await
            .unwrap_or_else(|e| panic!("{u} logs in: {e}\n{}", read_log()));
            let one: i32 = c.query_one("select 1", &[]).await.unwrap().get(0);
            assert_eq!(one, 1);
            clients.push(c);
        }
        // A wrong password is refused as direct Postgres refuses it.
        let err = common::connect(&format!("host=127.0.0.1 port={proxy_port} user=web password=nope dbname=postgres"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD), "{err}");
        // Each user's client is counted under its own service (the console: SHOW POOLS, as the example's
        // admin user).
        let console = common::connect(&format!(
            "host=127.0.0.1 port={proxy_port} user=worker password=pw-worker dbname=pgbudget"
        ))
        .await
        .unwrap();
        let rows = console.simple_query("SHOW POOLS").await.unwrap();
        for u in users {
            let active = rows
                .iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) if r.get("service") == Some(u) => r.get("cl_active"),
                    _ => None,
                })
                .map(|n| n.parse::<u32>().unwrap())
                .sum::<u32>();
            let want = if u == "worker" { 1..=2 } else { 1..=1 };
            assert!(want.contains(&active), "{u}: cl_active {active}");
        }
        drop(clients);
    });

    let _ = Command::new("kill").args(["-TERM", &proxy.id().to_string()]).status();
    assert_eq!(wait_exit(&mut proxy, Duration::from_secs(30)), Some(0), "{}", read_log());
    assert!(cwd.path().join("pgbudget-lake").is_dir(), "the example's lake lives under the working directory");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(disconnect_noise(&pg.log()), Vec::<String>::new());
}

#[test]
fn dockerfiles_copy_what_exists_and_check_health_with_the_binary() {
    let root = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    let sidecar = std::fs::read_to_string(repo("examples/sidecar/Dockerfile")).unwrap();
    for (name, text) in [("Dockerfile", &root), ("examples/sidecar/Dockerfile", &sidecar)] {
        for line in text.lines().filter(|l| l.starts_with("COPY ") && !l.contains("--from=")) {
            let words: Vec<&str> = line.split_whitespace().collect();
            for src in &words[1..words.len() - 1] {
                assert!(repo(src).exists(), "{name}: {line}: {src} does not exist");
            }
        }
        assert!(text.contains("HEALTHCHECK") && text.contains("\"probe\", \"/health\""), "{name}: no health check");
    }
    assert!(root.contains("bash scripts/lake-deps"), "the image's DuckDB comes from scripts/lake-deps");
    assert!(root.contains("ENV PGBUDGET_CONTAINER=1"));
    assert!(root.contains("EXPOSE 6432 9187"));
    assert!(!root.contains("PGBUDGET_LISTEN=0.0.0.0"), "the container default replaces a fixed IPv4 listener");
    // The version the image's lake-deps installs is the one the crate pins.
    let deps = std::fs::read_to_string(repo("scripts/lake-deps")).unwrap();
    let build = std::fs::read_to_string(repo("build.rs")).unwrap();
    let version = deps.lines().find_map(|l| l.strip_prefix("VERSION=")).unwrap();
    assert!(build.contains(&format!("DUCKDB_VERSION: &str = \"{version}\"")), "build.rs and lake-deps disagree");
    let sh = Command::new("sh").args(["-n"]).arg(repo("examples/sidecar/entrypoint")).status().unwrap();
    assert!(sh.success(), "the entrypoint parses as POSIX sh");
}

#[test]
fn env_only_run_serves_clients() {
    let pg = Pg::start();
    let cwd = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut cmd = Command::new(BIN);
    let mut proxy = clean(&mut cmd)
        .current_dir(cwd.path())
        .args(["run", "--listen", &format!("127.0.0.1:{port}"), "--admin-listen", ""])
        .env("DATABASE_URL", pg.url())
        .env("PGBUDGET_SLICES", "solo=3:session,other=2")
        .env("PGBUDGET_SERVICE", "solo")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(cwd.path().join("log")).unwrap())
        .spawn()
        .unwrap();
    let _kill = KillOnPanic(proxy.id());
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let conninfo = format!("host=127.0.0.1 port={port} user=postgres password={PG_PASSWORD} dbname=postgres");
        let mut held = Vec::new();
        for _ in 0..3 {
            let c = common::connect(&conninfo).await.unwrap();
            // Session mode (`:session`): each client keeps its own backend.
            let pid: i32 = c.query_one("select pg_backend_pid()", &[]).await.unwrap().get(0);
            held.push((c, pid));
        }
        let pids: std::collections::BTreeSet<i32> = held.iter().map(|(_, p)| *p).collect();
        assert_eq!(pids.len(), 3);
    });
    let log = std::fs::read_to_string(cwd.path().join("log")).unwrap();
    assert!(log.contains("the environment (PGBUDGET_SLICES)"), "{log}");
    // Started from the environment: a reload has no file to read and says so, the old config stays.
    let _ = Command::new("kill").args(["-HUP", &proxy.id().to_string()]).status();
    std::thread::sleep(Duration::from_millis(300));
    assert!(alive(proxy.id()));
    let _ = Command::new("kill").args(["-TERM", &proxy.id().to_string()]).status();
    assert_eq!(wait_exit(&mut proxy, Duration::from_secs(20)), Some(0));
    let log = std::fs::read_to_string(cwd.path().join("log")).unwrap();
    assert!(log.contains("started from the environment"), "SIGHUP explained: {log}");
}

/// The app's DATABASE_URL: pgbudget's address in place of the upstream's, everything else as given (sslmode
/// dropped). A stub stands in for pgbudget (`run` waits for SIGTERM, `probe` succeeds) so only the script runs.
#[test]
fn sidecar_entrypoint_rewrites_only_the_address_of_database_url() {
    let dir = tempfile::tempdir().unwrap();
    let stub = dir.path().join("pgbudget");
    std::fs::write(
        &stub,
        "#!/bin/sh\ncase $1 in run) trap 'exit 0' TERM; while :; do sleep 0.05; done;; *) exit 0;; esac\n",
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&stub).status().unwrap();
    let cases = [
        ("postgres://u:p@db.internal:5432/app", "postgres://u:p@127.0.0.1:6432/app"),
        ("postgresql://u:p%40ss@db/app?sslmode=require", "postgresql://u:p%40ss@127.0.0.1:6432/app"),
        (
            "postgres://u@[fd12::1]:5432/app?application_name=x&sslmode=require&connect_timeout=5",
            "postgres://u@127.0.0.1:6432/app?application_name=x&connect_timeout=5",
        ),
        ("postgres://db.internal", "postgres://127.0.0.1:6432"),
        ("postgres://u:p@h:1/d?sslmode=disable", "postgres://u:p@127.0.0.1:6432/d"),
    ];
    for (given, want) in cases {
        for (listen, want) in [("", want.to_owned()), ("[::]:7000", want.replace(":6432", ":7000"))] {
            let mut cmd = Command::new("sh");
            clean(&mut cmd)
                .arg(repo("examples/sidecar/entrypoint"))
                .args(["sh", "-c", "printf '%s' \"$DATABASE_URL\""])
                .env("PGBUDGET_BIN", &stub)
                .env("DATABASE_URL", given);
            if !listen.is_empty() {
                cmd.env("PGBUDGET_LISTEN", listen);
            }
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "{given}: {}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(String::from_utf8_lossy(&out.stdout), want, "from {given} (listen {listen:?})");
        }
    }
}
