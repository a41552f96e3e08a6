//! Verifying a read-only route's tier on every new server connection, before any client gets it: `replica`
//! asks `pg_is_in_recovery()`, `role` audits what the connection's role could write. A failed check refuses
//! the connection with what was found, so the route serves nothing it cannot vouch for.

use crate::config::Enforce;
use crate::server::{ServerConn, ServerError};
use std::time::Duration;

/// Everything the current role could change: attributes, memberships, privileges, ownership (at most a few
/// examples of each, so the refusal can say what to revoke).
const ROLE_AUDIT: &str = "\
SELECT 'role attribute ' || a FROM (SELECT unnest(ARRAY[\
 CASE WHEN r.rolsuper THEN 'SUPERUSER' END, CASE WHEN r.rolcreaterole THEN 'CREATEROLE' END,\
 CASE WHEN r.rolcreatedb THEN 'CREATEDB' END, CASE WHEN r.rolreplication THEN 'REPLICATION' END,\
 CASE WHEN r.rolbypassrls THEN 'BYPASSRLS' END]) a FROM pg_catalog.pg_roles r WHERE r.rolname = current_user) x \
 WHERE a IS NOT NULL \
UNION ALL SELECT 'member of ' || g.rolname FROM pg_catalog.pg_roles g WHERE g.rolname IN ('pg_write_all_data',\
 'pg_signal_backend','pg_execute_server_program','pg_write_server_files','pg_checkpoint','pg_maintain',\
 'pg_create_subscription') AND pg_catalog.pg_has_role(current_user, g.oid, 'MEMBER') \
UNION ALL (SELECT 'may ' || p || ' on ' || n.nspname || '.' || c.relname FROM pg_catalog.pg_class c \
 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace, \
 unnest(ARRAY['INSERT','UPDATE','DELETE','TRUNCATE','REFERENCES','TRIGGER']) p \
 WHERE c.relkind IN ('r','p','v','m','f') AND n.nspname NOT IN ('pg_catalog','information_schema') \
 AND n.nspname NOT LIKE 'pg\\_toast%' AND pg_catalog.has_table_privilege(c.oid, p) LIMIT 20) \
UNION ALL (SELECT 'may use sequence ' || n.nspname || '.' || c.relname FROM pg_catalog.pg_class c \
 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'S' \
 AND (pg_catalog.has_sequence_privilege(c.oid, 'UPDATE') OR pg_catalog.has_sequence_privilege(c.oid, 'USAGE')) LIMIT 5) \
UNION ALL (SELECT 'may CREATE in schema ' || nspname FROM pg_catalog.pg_namespace \
 WHERE pg_catalog.has_schema_privilege(oid, 'CREATE') AND nspname NOT LIKE 'pg\\_temp%' \
 AND nspname NOT LIKE 'pg\\_toast\\_temp%' LIMIT 5) \
UNION ALL SELECT 'may CREATE in database ' || current_database() \
 WHERE pg_catalog.has_database_privilege(current_database(), 'CREATE') \
UNION ALL (SELECT 'owns ' || relname FROM pg_catalog.pg_class \
 WHERE relowner = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user) LIMIT 5) \
UNION ALL (SELECT 'owns schema ' || nspname FROM pg_catalog.pg_namespace \
 WHERE nspowner = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user) LIMIT 5) \
UNION ALL (SELECT 'owns function ' || proname FROM pg_catalog.pg_proc \
 WHERE proowner = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user) LIMIT 5) \
UNION ALL (SELECT 'owns type ' || typname FROM pg_catalog.pg_type \
 WHERE typowner = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user) LIMIT 5) \
UNION ALL (SELECT 'owns database ' || datname FROM pg_catalog.pg_database \
 WHERE datdba = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user) LIMIT 5)";

/// Check `tier` on `conn`; `Err(ServerError::ReadOnlyUnverified)` names what failed.
pub async fn verify(conn: &mut ServerConn, tier: Enforce, timeout: Duration) -> Result<(), ServerError> {
    match tier {
        Enforce::Session => Ok(()),
        Enforce::Replica => {
            let got = conn.simple_column("SELECT pg_catalog.pg_is_in_recovery()", timeout).await?;
            if got.first().map(String::as_str) == Some("t") {
                Ok(())
            } else {
                conn.broken = true;
                Err(ServerError::ReadOnlyUnverified(
                    "enforce = \"replica\", but the upstream is not in recovery (pg_is_in_recovery() = false): it is a primary"
                        .into(),
                ))
            }
        }
        Enforce::Role => {
            let found = conn.simple_column(ROLE_AUDIT, timeout).await?;
            if found.is_empty() {
                return Ok(());
            }
            conn.broken = true;
            Err(ServerError::ReadOnlyUnverified(format!(
                "enforce = \"role\", but role \"{}\" can write: {}",
                conn.login_user,
                found.join("; ")
            )))
        }
    }
}
