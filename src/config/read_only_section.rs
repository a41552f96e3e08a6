//! `[read_only]`: the route's alias, where it is served, and which tier enforces it: `replica` (the upstream is a
//! hot standby), `role` (the route logs in as a role that can write nothing it can reach) or `session`
//! (`default_transaction_read_only` plus the statement filter and the tripwire: it stops mistakes, not a hostile
//! client).

use serde::Deserialize;

/// How a read-only route's guarantee is made.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Enforce {
    /// The upstream answers `pg_is_in_recovery() = true`: it cannot write at all.
    Replica,
    /// The route's role holds no write privilege, no CREATE, no ownership, no powerful membership.
    Role,
    /// `default_transaction_read_only = on`, the statement filter and the tripwire.
    Session,
}

impl Enforce {
    pub fn as_str(self) -> &'static str {
        match self {
            Enforce::Replica => "replica",
            Enforce::Role => "role",
            Enforce::Session => "session",
        }
    }

    /// `pgbudget_ro_enforcement`: 1 replica, 2 role, 3 session.
    pub fn gauge(self) -> i64 {
        match self {
            Enforce::Replica => 1,
            Enforce::Role => 2,
            Enforce::Session => 3,
        }
    }
}

/// What a read-only route does when its replica cannot be reached.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaDown {
    /// Serve from the primary, with read-only enforced.
    Fallthrough,
    /// Refuse with 08006.
    Refuse,
}

/// The read-only route: clients reach it by connecting to `database` instead of the real database name.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ReadOnlySection {
    /// Alias database name of the route (e.g. `app_ro`); empty disables read-only routes.
    pub database: String,
    /// Replica URL (`${ENV}` expanded); empty: the primary serves the route, with enforcement.
    pub replica_url: String,
    /// Connection ceiling of the replica.
    pub replica_ceiling: u32,
    pub on_replica_down: ReplicaDown,
    /// How the guarantee is made (and verified on every new server connection of the route).
    pub enforce: Enforce,
    /// `enforce = "role"`: the upstream role read-only pools log in as (default: the replica URL's user).
    pub user: String,
    /// Environment variable holding `user`'s password.
    pub password_env: String,
    /// Serve `CALL` and `DO` on the route (both can commit inside; refused by default in the session tier).
    pub allow_procedures: bool,
}

impl Default for ReadOnlySection {
    fn default() -> Self {
        Self {
            database: String::new(),
            replica_url: String::new(),
            replica_ceiling: 97,
            on_replica_down: ReplicaDown::Fallthrough,
            enforce: Enforce::Session,
            user: String::new(),
            password_env: String::new(),
            allow_procedures: false,
        }
    }
}

impl ReadOnlySection {
    /// Check the tier's requirements; the role read-only pools log in as, when `user` names one.
    pub fn resolve(&self, env: &super::Env, v: &mut Vec<String>) -> Option<super::databases::UpstreamLogin> {
        if self.database.is_empty() {
            return None;
        }
        match self.enforce {
            Enforce::Replica if self.replica_url.is_empty() => {
                v.push("read_only.enforce = \"replica\" needs read_only.replica_url (a hot standby)".into())
            }
            Enforce::Replica if self.on_replica_down == ReplicaDown::Fallthrough => v.push(
                "read_only.enforce = \"replica\" cannot fall through to the primary: set on_replica_down = \"refuse\""
                    .into(),
            ),
            Enforce::Role if self.user.is_empty() && self.replica_url.is_empty() => v.push(
                "read_only.enforce = \"role\" needs read_only.user (+ password_env): the role the route logs in as"
                    .into(),
            ),
            _ => {}
        }
        if self.user.is_empty() {
            if !self.password_env.is_empty() {
                v.push("read_only.password_env is set without read_only.user".into());
            }
            return None;
        }
        let password = if self.password_env.is_empty() {
            None
        } else {
            let p = env.get(&self.password_env).map(str::to_owned);
            if p.is_none() {
                v.push(format!("environment variable {} (read_only.password_env) is not set", self.password_env));
            }
            p
        };
        Some(super::databases::UpstreamLogin { user: self.user.clone(), password, keys: None })
    }
}
