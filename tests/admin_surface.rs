//! The admin surface against a real Postgres: the bearer token guards every endpoint except `/health`,
//! `/ready` and `/metrics` (and everything stays open, with a warning, when no token is set).

mod common;
use common::*;

async fn get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new().get(format!("http://127.0.0.1:{port}{path}"));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// `cfg` with `line` added to its `[admin]` section.
fn admin_line(cfg: &str, line: &str) -> String {
    cfg.replacen("[admin]\n", &format!("[admin]\n{line}\n"), 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_guards_everything_but_the_open_probes() {
    const TOKEN: &str = "adm1n-T0ken-xyz";
    let pg = Pg::start();
    let (cfg, port) = with_admin(config(&pg, "[services.app]\nslice = 2\n"));
    let cfg = admin_line(&cfg, "api_token_env = \"ADMIN_SURFACE_TOKEN\"");
    let proxy = Proxy::start_env(&cfg, &[("ADMIN_SURFACE_TOKEN", TOKEN)]);
    for path in ["/pools", "/errors", "/errors/health?minutes=5", "/lake/health", "/no-such-endpoint"] {
        let (status, body) = get(port, path, None).await;
        assert_eq!(status, 401, "{path} without a token: {body}");
        let error = json(&body)["error"].as_str().unwrap_or_default().to_owned();
        assert!(error.contains("missing Authorization header") && error.contains("ADMIN_SURFACE_TOKEN"), "{body}");
        let (status, body) = get(port, path, Some("wrong-token-abc")).await;
        assert_eq!(status, 401, "{path} with a wrong token: {body}");
        assert!(json(&body)["error"].as_str().unwrap().contains("wrong bearer token"), "{body}");
        assert!(!body.contains("wrong-token-abc") && !body.contains(TOKEN), "a token is echoed: {body}");
    }
    // Not a bearer token at all.
    let r = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/pools"))
        .header("authorization", format!("Basic {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"pgbudget admin\"");
    assert!(r.text().await.unwrap().contains("is not `Bearer <token>`"));

    let (status, body) = get(port, "/pools", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["budget"][0]["service"], "app");
    for path in ["/errors", "/errors/health?minutes=5"] {
        assert_eq!(get(port, path, Some(TOKEN)).await.0, 200, "{path}");
    }
    #[cfg(feature = "lake")]
    assert_eq!(json(&get(port, "/lake/health", Some(TOKEN)).await.1)["enabled"], false);
    assert_eq!(get(port, "/no-such-endpoint", Some(TOKEN)).await.0, 404);

    // The probes and the scrape stay open.
    for path in ["/health", "/ready", "/metrics"] {
        let (status, body) = get(port, path, None).await;
        assert_eq!(status, 200, "{path} without a token: {body}");
    }
    let log = proxy.log();
    assert!(log.contains("need the bearer token"), "{log}");
    assert!(!log.contains("are open to anyone"), "{log}");
    assert!(!log.contains(TOKEN) && !log.contains("wrong-token-abc"), "a token reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_admin_endpoints_stay_open_and_say_so() {
    let pg = Pg::start();
    let (cfg, port) = with_admin(config(&pg, "[services.app]\nslice = 2\n"));
    // Empty counts as unset.
    let proxy = Proxy::start_env(&cfg, &[("PGBUDGET_ADMIN_TOKEN", "")]);
    for path in ["/pools", "/errors", "/errors/health", "/health", "/ready", "/metrics"] {
        let (status, body) = get(port, path, None).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    // A token sent anyway changes nothing.
    assert_eq!(get(port, "/pools", Some("whatever")).await.0, 200);
    #[cfg(feature = "lake")]
    {
        let r = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/lake/query"))
            .header("content-type", "application/json")
            .body(r#"{"sql": "select 1"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "the lake API needs a token to be on");
        assert!(r.text().await.unwrap().contains("the lake API is off: set PGBUDGET_ADMIN_TOKEN"));
    }
    let log = proxy.log();
    let warnings = log.lines().filter(|l| l.contains("are open to anyone who reaches the listener")).count();
    assert_eq!(warnings, 1, "one startup warning:\n{log}");
    assert!(log.lines().any(|l| l.contains("are open") && l.contains("WARN") && l.contains("PGBUDGET_ADMIN_TOKEN")));
}
