//! The fidelity tests' shared pieces: a transaction- or session-mode proxy, a raw-protocol client and its
//! message traces, and the driver scenarios of `tests/drivers/fidelity_drivers.py`.
#![allow(dead_code)]

use crate::common::*;
use crate::raw::{bind, error_fields, execute, msg, params, sync, Raw};
use std::process::Command;
use tokio::io::AsyncWriteExt;

pub const TXN: &str = "pool_mode = \"transaction\"\n";
pub const SESSION: &str = "pool_mode = \"session\"\n";

/// pgbudget for service `app` (share `slice`, `svc` lines) with `proxy_extra` lines in `[proxy]`.
pub fn start(pg: &Pg, slice: u32, svc: &str, proxy_extra: &str) -> Proxy {
    let services = format!("[services.app]\nslice = {slice}\ncheckout_timeout = \"3s\"\n{svc}");
    // Fidelity is checked with pgbudget's own default for application_name unless `proxy_extra` sets one.
    let cfg = config(pg, &services).replace(LABEL, "");
    Proxy::start(&cfg.replace("[proxy]\n", &format!("[proxy]\nslice_floor = 1\n{proxy_extra}")))
}

pub async fn login(port: u16) -> Raw {
    login_with(port, &[]).await
}

pub async fn login_with(port: u16, extra: &[(&str, &str)]) -> Raw {
    let mut p: Vec<(&str, &str)> = params("postgres").to_vec();
    p.extend_from_slice(extra);
    Raw::login(port, &p, PG_PASSWORD).await.unwrap_or_else(|e| panic!("raw login on port {port}: {e:?}"))
}

pub async fn admin(pg: &Pg) -> tokio_postgres::Client {
    connect(&pg.conninfo()).await.expect("direct admin connection")
}

pub fn close_stmt(name: &str) -> Vec<u8> {
    msg(b'C', format!("S{name}\0").as_bytes())
}

pub fn describe_stmt(name: &str) -> Vec<u8> {
    msg(b'D', format!("S{name}\0").as_bytes())
}

pub fn cstr(b: &[u8]) -> String {
    String::from_utf8_lossy(b.split(|c| *c == 0).next().unwrap_or(b)).into_owned()
}

pub fn row(body: &[u8]) -> String {
    let n = u16::from_be_bytes([body[0], body[1]]) as usize;
    let (mut at, mut vals) = (2, Vec::new());
    for _ in 0..n {
        let len = i32::from_be_bytes(body[at..at + 4].try_into().unwrap());
        at += 4;
        if len < 0 {
            vals.push("NULL".to_owned());
        } else {
            vals.push(String::from_utf8_lossy(&body[at..at + len as usize]).into_owned());
            at += len as usize;
        }
    }
    vals.join("|")
}

/// Write `parts` in one go, then read to the `syncs`-th ReadyForQuery: the backend messages as a trace
/// (`1` ParseComplete, `2` BindComplete, `3` CloseComplete, `D:<row>`, `C:<tag>`, `E:<code>:<message>`,
/// `E:FATAL:<code>:<message>`, `Z:<status>`; ParameterStatus, notices and notifications are left out).
/// A close or timeout ends the trace with `closed` / `timeout`.
pub async fn exchange(c: &mut Raw, parts: &[Vec<u8>], syncs: usize) -> Vec<String> {
    let mut t = Vec::new();
    if let Err(e) = c.s.write_all(&parts.concat()).await {
        return vec![format!("write failed: {e}")];
    }
    let mut left = syncs;
    while left > 0 {
        match c.recv().await {
            Ok((b'S' | b'N' | b'A', _)) => {}
            Ok((b'D', body)) => t.push(format!("D:{}", row(&body))),
            Ok((b'C', body)) => t.push(format!("C:{}", cstr(&body))),
            Ok((b'T', body)) => t.push(format!("T:{}", u16::from_be_bytes([body[0], body[1]]))),
            Ok((b'E', body)) => {
                let e = error_fields(&body);
                let fatal = if e.severity == "FATAL" { "FATAL:" } else { "" };
                t.push(format!("E:{fatal}{}:{}", e.code, e.message));
            }
            Ok((b'Z', body)) => {
                t.push(format!("Z:{}", body[0] as char));
                left -= 1;
            }
            Ok((k, _)) => t.push((k as char).to_string()),
            Err(e) => {
                t.push(e.code);
                break;
            }
        }
    }
    t
}

/// One simple query's first column values (panics on error).
pub async fn simple_col(c: &mut Raw, sql: &str) -> Vec<String> {
    let r = c.simple(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    assert!(r.error.is_none(), "{sql}: {:?}", r.error);
    r.rows.into_iter().map(|r| r.into_iter().map(|v| v.unwrap_or_default()).collect::<Vec<_>>().join("|")).collect()
}

pub fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Bind `name`, Execute, Sync.
pub fn run(name: &str) -> Vec<Vec<u8>> {
    vec![bind(name), execute(), sync()]
}

/// The last `n` lines of pgbudget's log above DEBUG.
pub fn log_tail(proxy: &Proxy, n: usize) -> String {
    let log = proxy.log();
    let kept: Vec<&str> = log.lines().filter(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE ")).collect();
    kept[kept.len().saturating_sub(n)..].join("\n")
}

/// Run `tests/drivers/fidelity_drivers.py` with SCENARIO=`scenario` (killed after 40 s); its stdout.
pub fn script(scenario: &str, pg: &Pg, proxy: &Proxy) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers/fidelity_drivers.py");
    let url = |port: u16| format!("postgres://postgres:{PG_PASSWORD}@127.0.0.1:{port}/postgres");
    let out = Command::new("timeout")
        .args(["-s", "KILL", "40", "python3"])
        .arg(&path)
        .env("SCENARIO", scenario)
        .env("PROXY_DSN", url(proxy.port))
        .env("DIRECT_DSN", url(pg.port))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("PGAPPNAME")
        .output()
        .expect("python3 runs (scripts/driver-deps installs asyncpg and psycopg)");
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "fidelity_drivers.py {scenario} failed ({}):\n--- stdout ---\n{so}\n--- stderr ---\n{se}\n--- pgbudget log ---\n{}",
        out.status,
        log_tail(proxy, 30)
    );
    so.into_owned()
}
