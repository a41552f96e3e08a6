//! Service identity: shared mode picks each client's slice from its startup packet (application_name or
//! a user→service map with env-referenced passwords); an unknown service is a clear FATAL.

mod common;
use common::*;

fn shared(pg: &Pg, extra_proxy: &str, auth: &str) -> String {
    format!(
        "[proxy]\nmode = \"shared\"\n{LABEL}{extra_proxy}\n{auth}\n[upstreams.primary]\nurl = \"{}\"\nceiling = 20\n\n\
         [services.worker]\nslice = 3\n[services.web]\nslice = 2\n",
        pg.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_mode_by_application_name() {
    let pg = Pg::start();
    let admin = connect(&pg.conninfo()).await.unwrap();
    let proxy = Proxy::start(&shared(&pg, "service_from = \"application_name\"\ntrust_application_name = true", ""));
    let w = connect(&format!("{} application_name=worker", proxy.conninfo())).await.unwrap();
    let b = connect(&format!("{} application_name=web", proxy.conninfo())).await.unwrap();
    w.batch_execute("begin; select 1").await.unwrap();
    b.batch_execute("begin; select 1").await.unwrap();
    assert_eq!(server_conns(&admin, "worker").await, 1);
    assert_eq!(server_conns(&admin, "web").await, 1);
    let err = connect(&format!("{} application_name=billing", proxy.conninfo())).await.unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!((db.severity(), db.code().code()), ("FATAL", "28000"));
    assert!(db.message().contains("billing") && db.message().contains("budgets.toml"), "{}", db.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_mode_by_user_with_env_passwords() {
    let pg = Pg::start();
    let admin = connect(&pg.conninfo()).await.unwrap();
    let auth = "[auth]\nmethod = \"scram-sha-256\"\n\
                [[auth.users]]\nname = \"jobs\"\npassword_env = \"JOBS_PW\"\nservice = \"worker\"\n\
                [[auth.users]]\nname = \"site\"\nscram = \"VERIFIER\"\nservice = \"web\"\n";
    let verifier = postgres_protocol::password::scram_sha_256(b"site-pw");
    let cfg = shared(&pg, "service_from = \"user\"", &auth.replace("VERIFIER", &verifier));
    let proxy = Proxy::start_env(&cfg, &[("JOBS_PW", "jobs-pw")]);
    let base = format!("host=127.0.0.1 port={} dbname=postgres", proxy.port);
    let jobs = connect(&format!("{base} user=jobs password=jobs-pw")).await.unwrap();
    let site = connect(&format!("{base} user=site password=site-pw")).await.unwrap();
    jobs.batch_execute("begin; select 1").await.unwrap();
    site.batch_execute("begin; select 1").await.unwrap();
    assert_eq!(server_conns(&admin, "worker").await, 1);
    assert_eq!(server_conns(&admin, "web").await, 1);
    let bad = connect(&format!("{base} user=site password=jobs-pw")).await.unwrap_err();
    assert_eq!(bad.code().unwrap().code(), "28P01");
    // Server connections log in as the upstream URL's user, whatever the client user is.
    let who: String = jobs.query_one("select current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(who, "postgres");
}

/// Shared mode by application_name without `trust_application_name`: a user may name only the services it
/// lists; any other name (an existing service included) reads exactly like an unknown one (FATAL 28000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_name_is_checked_against_the_users_allow_list() {
    let pg = Pg::start();
    let admin = connect(&pg.conninfo()).await.unwrap();
    let auth = "[auth]\nmethod = \"scram-sha-256\"\n\
                [[auth.users]]\nname = \"jobs\"\npassword_env = \"JOBS_PW\"\nservices = [\"worker\"]\n\
                [[auth.users]]\nname = \"site\"\npassword_env = \"SITE_PW\"\nservices = [\"web\"]\n";
    let cfg = shared(&pg, "service_from = \"application_name\"", auth);
    let proxy = Proxy::start_env(&cfg, &[("JOBS_PW", "jobs-pw"), ("SITE_PW", "site-pw")]);
    let base = format!("host=127.0.0.1 port={} dbname=postgres", proxy.port);
    let jobs = connect(&format!("{base} user=jobs password=jobs-pw application_name=worker")).await.unwrap();
    jobs.batch_execute("begin; select 1").await.unwrap();
    assert_eq!(server_conns(&admin, "worker").await, 1);
    let claim =
        |user: &str, pw: &str, service: &str| format!("{base} user={user} password={pw} application_name={service}");
    let other = connect(&claim("site", "site-pw", "worker")).await.unwrap_err();
    let unknown = connect(&claim("site", "site-pw", "billing")).await.unwrap_err();
    let (o, u) = (other.as_db_error().unwrap(), unknown.as_db_error().unwrap());
    assert_eq!((o.severity(), o.code().code()), ("FATAL", "28000"));
    assert_eq!((u.severity(), u.code().code()), ("FATAL", "28000"));
    assert_eq!(o.message().replace("worker", "billing"), u.message(), "the same text for both");
    // The worker's share saw nothing of the refused claim.
    assert_eq!(server_conns(&admin, "worker").await, 1);
    connect(&claim("site", "site-pw", "web")).await.unwrap().batch_execute("select 1").await.unwrap();
}

#[test]
fn application_name_without_an_allow_list_or_trust_is_refused_at_startup() {
    let pg = Pg::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("budgets.toml");
    std::fs::write(&path, shared(&pg, "service_from = \"application_name\"", "")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgbudget"))
        .args(["check", "--config"])
        .arg(&path)
        .env_remove("PGBUDGET_SLICES")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("trust_application_name") && err.contains("services = [...]"), "{err}");
}
