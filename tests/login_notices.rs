//! What a client is told while it logs in, against a direct connection: the NOTICE Postgres gives for an
//! `application_name` longer than an identifier, in both pool modes.

mod common;
#[path = "common/raw.rs"]
mod raw;

use common::*;
use raw::{params, Raw};

/// Log in with `application_name`: the (code, message) of every NoticeResponse before ReadyForQuery.
async fn login_notices(port: u16, app: &str) -> Vec<(String, String)> {
    let mut p: Vec<(&str, &str)> = params("postgres").to_vec();
    p.push(("application_name", app));
    Raw::login(port, &p, PG_PASSWORD).await.unwrap_or_else(|e| panic!("login: {e:?}")).notices
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_too_long_application_name_gets_postgres_notice_in_both_modes() {
    let pg = Pg::start();
    let long = "x".repeat(65);
    let direct = login_notices(pg.port, &long).await;
    assert_eq!(direct.len(), 1, "direct: {direct:?}");
    assert_eq!(direct[0].0, "42622");
    for mode in ["transaction", "session"] {
        let proxy = Proxy::start(&config(&pg, &format!("[services.app]\nslice = 2\npool_mode = \"{mode}\"\n")));
        assert_eq!(login_notices(proxy.port, &long).await, direct, "{mode}: proxy vs direct");
        assert_eq!(login_notices(proxy.port, "short").await, vec![], "{mode}: no notice for a short name");
    }
}
