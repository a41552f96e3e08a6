//! Unit tests of budget resolution: every invariant refuses with its reason.

use super::*;

fn env(pairs: &[(&str, &str)]) -> Env {
    Env { vars: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
}

const BASE: &str = r#"
[proxy]
mode = "sidecar"
service = "web"
[upstreams.primary]
url = "postgres://app:pw@127.0.0.1:5432/railway"
ceiling = 97
reserved = 2
[services.worker]
slice = 38
[services.canvas]
slice = 20
[services.web]
slice = 15
[services.landing]
slice = 5
[services.evergreen]
slice = 5
"#;

fn resolve(text: &str, e: &Env) -> Result<Resolved, ConfigError> {
    Config::parse(text).and_then(|c| Resolved::resolve(c, e))
}

#[test]
fn example_file_resolves() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/budgets.toml")).unwrap();
    let r = resolve(&text, &env(&[("DATABASE_URL", "postgres://u:p@localhost/db")])).unwrap();
    assert_eq!(r.services["worker"].share, 38);
    let t = r.table();
    assert!(t.contains("slices 83 + reserved 2 = 85 of ceiling 97"), "{t}");
}

#[test]
fn over_ceiling_is_refused_with_sum() {
    let text = BASE.replace("slice = 38", "slice = 80");
    let err = resolve(&text, &env(&[])).unwrap_err();
    assert!(
        err.violations.iter().any(|v| v.contains("slices sum to 125 + 2 reserved = 127") && v.contains("97")),
        "{err}"
    );
}

#[test]
fn every_violation_is_reported_at_once() {
    let text = BASE
        .replace("slice = 5\n[services.evergreen]", "slice = 1\n[services.evergreen]")
        .replace("ceiling = 97", "ceiling = 97\nbogus = 1")
        .replace(
            "[services.worker]\nslice = 38",
            "[services.worker]\nslice = 38\ncheckout_timeout = \"1ms\"\nmax_conn = 3",
        );
    let err = resolve(&text, &env(&[])).unwrap_err();
    let all = err.to_string();
    assert!(all.contains("unknown key `upstreams.primary.bogus`"), "{all}");
    assert!(all.contains("unknown key `services.worker.max_conn`"), "{all}");
    // Unknown keys are reported together; semantic checks follow once keys are fixed.
    let text = BASE
        .replace("slice = 5\n[services.evergreen]", "slice = 1\n[services.evergreen]")
        .replace("[services.worker]\nslice = 38", "[services.worker]\nslice = 38\ncheckout_timeout = \"1ms\"");
    let err = resolve(&text, &env(&[])).unwrap_err();
    assert_eq!(err.violations.len(), 2, "{err}");
    assert!(err.to_string().contains("services.landing.slice = 1 is below the floor of 2"));
    assert!(err.to_string().contains("services.worker.checkout_timeout = 1ms is out of range"));
}

#[test]
fn sidecar_service_from_env_must_exist() {
    let err = resolve(BASE, &env(&[("RAILWAY_SERVICE_NAME", "billing")])).unwrap_err();
    assert!(err.to_string().contains("RAILWAY_SERVICE_NAME = \"billing\" is not a service"), "{err}");
    let r = resolve(BASE, &env(&[("RAILWAY_SERVICE_NAME", "worker")])).unwrap();
    assert_eq!(r.sidecar_service.as_deref(), Some("worker"));
}

#[test]
fn per_process_share_divides_with_floor() {
    let text = BASE.replace("service = \"web\"", "service = \"web\"\nsplit_per_process = true");
    let r = resolve(&text, &env(&[("RAILWAY_REPLICA_COUNT", "2"), ("WEB_CONCURRENCY", "3")])).unwrap();
    assert_eq!(r.processes, 6);
    assert_eq!(r.services["worker"].share, 6); // 38 / 6
    assert_eq!(r.services["web"].share, 4); // 15 / 6 = 2, floored to 4
    assert_eq!(r.services["landing"].share, 4);
    let r = resolve(&text, &env(&[("RAILWAY_REPLICA_COUNT", "0")])).unwrap();
    assert_eq!(r.services["worker"].share, 38);
}

#[test]
fn missing_env_and_bad_urls_are_named() {
    let text = BASE.replace("postgres://app:pw@127.0.0.1:5432/railway", "${NOPE_URL}");
    let err = resolve(&text, &env(&[])).unwrap_err();
    assert!(err.to_string().contains("environment variable NOPE_URL is not set"), "{err}");
    let text = BASE.replace("postgres://app:pw@127.0.0.1:5432/railway", "mysql://x@y/z");
    assert!(resolve(&text, &env(&[])).unwrap_err().to_string().contains("scheme"));
}

#[test]
fn upstream_url_parts_are_decoded() {
    let t = parse_upstream_url("p", "postgresql://us%40er:p%3Ass@db.internal:6543/rail", &env(&[])).unwrap();
    assert_eq!(
        (t.user.as_str(), t.password.as_deref(), t.host.as_str(), t.port),
        ("us@er", Some("p:ss"), "db.internal", 6543)
    );
    assert_eq!(t.database, "rail");
}

#[test]
fn plaintext_password_key_is_unknown() {
    let text = format!("{BASE}\n[[auth.users]]\nname = \"app\"\npassword = \"hunter2\"\n");
    let err = resolve(&text, &env(&[])).unwrap_err();
    assert!(err.to_string().contains("unknown key `auth.users"), "{err}");
}

#[test]
fn admission_thresholds_and_exempt_headroom_are_checked() {
    let bad_order = format!("{BASE}[services.web.admission]\nwarn = 0.9\nshed = 0.8\nhard_reject = 0.95\n");
    let e = resolve(&bad_order, &env(&[])).unwrap_err();
    assert!(e.violations.iter().any(|v| v.contains("warn < shed < hard_reject")), "{e}");
    let no_headroom =
        format!("{BASE}[services.web.admission]\nhard_reject = 1.0\nexempt_application_names = [\"ops\"]\n");
    let e = resolve(&no_headroom, &env(&[])).unwrap_err();
    assert!(e.violations.iter().any(|v| v.contains("no headroom for the exempt class")), "{e}");
    let timeouts = BASE.replace("[services.web]\nslice = 15", "[services.web]\nslice = 15\nquery_timeout = \"5ms\"");
    let e = resolve(&timeouts, &env(&[])).unwrap_err();
    assert!(e.violations.iter().any(|v| v.contains("query_timeout = 5ms is below 100ms")), "{e}");
    let ok = format!("{BASE}[services.web.admission]\nexempt_users = [\"ops\"]\n");
    let r = resolve(&ok, &env(&[])).unwrap();
    assert_eq!(r.services["web"].settings.admission.as_ref().unwrap().hard_reject, 0.88);
}

#[test]
fn malformed_md5_secrets_and_pending_logins_are_refused() {
    let good = "md5".to_owned() + &"0123456789abcdef".repeat(2);
    let users = |md5: &str| {
        BASE.replace("[proxy]\n", "[proxy]\nmax_pending_logins = 0\n").replace(
            "[upstreams.primary]",
            &format!("[auth]\nmethod = \"md5\"\n[[auth.users]]\nname = \"app\"\nmd5 = \"{md5}\"\n[upstreams.primary]"),
        )
    };
    let err = resolve(&users("md"), &env(&[])).unwrap_err();
    assert!(err.violations.iter().any(|v| v.contains("auth user \"app\": md5 is not an md5 secret")), "{err}");
    assert!(err.violations.iter().any(|v| v.contains("proxy.max_pending_logins = 0")), "{err}");
    let ok = users(&good).replace("max_pending_logins = 0", "max_pending_logins = 1");
    assert_eq!(resolve(&ok, &env(&[])).unwrap().config.proxy.max_pending_logins, 1);
    assert_eq!(resolve(BASE, &env(&[])).unwrap().config.proxy.max_pending_logins, 256);
}
