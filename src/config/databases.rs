//! Which databases an upstream serves (`databases = [...]`: names, `"alias -> real"` renames, `"*"` for any),
//! which upstream role a client user maps to, and which services a client may name: the parts of the budget
//! that say *where* a server connection logs in, never how many there may be.

use super::Env;
use serde::Deserialize;
use std::collections::BTreeMap;

/// Longest database name Postgres keeps (NAMEDATALEN − 1).
const MAX_NAME: usize = 63;

/// `databases = "*"` or `databases = ["app", "shadow -> app_shadow"]` in `budgets.toml`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum DatabaseList {
    One(String),
    Many(Vec<String>),
}

impl Default for DatabaseList {
    fn default() -> Self {
        DatabaseList::Many(Vec::new())
    }
}

impl DatabaseList {
    fn entries(&self) -> Vec<&str> {
        match self {
            DatabaseList::One(s) => vec![s.as_str()],
            DatabaseList::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// The databases one upstream serves: the name a client asks for → the database its server logs in to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DatabaseMap {
    names: BTreeMap<String, String>,
    /// `*`: any other name is served as itself.
    any: bool,
}

impl DatabaseMap {
    /// Parse `entries` of `upstreams.<name>`; with none, the URL's own database is the one served.
    pub fn parse(at: &str, list: &DatabaseList, url_database: &str, v: &mut Vec<String>) -> DatabaseMap {
        let mut map = DatabaseMap::default();
        let entries = list.entries();
        if entries.is_empty() {
            map.names.insert(url_database.to_owned(), url_database.to_owned());
            return map;
        }
        for entry in entries {
            if entry.trim() == "*" {
                map.any = true;
                continue;
            }
            let (alias, real) = match entry.split_once("->") {
                Some((a, r)) => (a.trim(), r.trim()),
                None => (entry.trim(), entry.trim()),
            };
            let bad = |n: &str| n.is_empty() || n.len() > MAX_NAME || n.contains('\0') || n == "*";
            if bad(alias) || bad(real) {
                v.push(format!(
                    "{at}.databases: {entry:?} is not a database name, \"alias -> real\" or \"*\" (names: 1 ..= {MAX_NAME} bytes)"
                ));
                continue;
            }
            if map.names.insert(alias.to_owned(), real.to_owned()).is_some() {
                v.push(format!("{at}.databases: {alias:?} is listed twice"));
            }
        }
        map
    }

    /// The database a server logs in to for a client that asked for `asked`; `None`: not served here.
    pub fn real(&self, asked: &str) -> Option<String> {
        match self.names.get(asked) {
            Some(real) => Some(real.clone()),
            None if self.any && !asked.is_empty() && asked.len() <= MAX_NAME => Some(asked.to_owned()),
            None => None,
        }
    }

    /// Whether a server may log in to `real` for some name a client may ask for.
    pub fn real_targets_include(&self, real: &str) -> bool {
        self.any || self.names.values().any(|r| r == real)
    }

    /// Names a client may ask for (not counting `*`).
    pub fn aliases(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(String::as_str)
    }

    /// For the budget table: `app, shadow -> app_shadow, *`.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> =
            self.names.iter().map(|(a, r)| if a == r { a.clone() } else { format!("{a} -> {r}") }).collect();
        if self.any {
            parts.push("*".into());
        }
        parts.join(", ")
    }
}

/// The upstream role and secret a client user's server connections log in with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamLogin {
    pub user: String,
    pub password: Option<String>,
    /// A passthrough role (`[auth] passthrough`): the keys its client's SCRAM proof yielded.
    pub keys: Option<crate::config::users::RoleKeys>,
}

/// `[[auth.users]] upstream_user` / `upstream_password_env` of one user; `None`: the URL's own role.
pub fn upstream_login(u: &super::UserConfig, env: &Env, v: &mut Vec<String>) -> Option<UpstreamLogin> {
    let at = format!("auth.users {:?}", u.name);
    match (&u.upstream_user, &u.upstream_password_env) {
        (None, None) => None,
        (None, Some(_)) => {
            v.push(format!("{at}: upstream_password_env needs upstream_user (the role it is the password of)"));
            None
        }
        (Some(user), pw) => {
            if user.is_empty() || user.len() > MAX_NAME {
                v.push(format!("{at}: upstream_user {user:?} is not a role name"));
            }
            let password = pw.as_ref().and_then(|var| {
                let p = env.get(var).map(str::to_owned);
                if p.is_none() {
                    v.push(format!("{at}: environment variable {var} (upstream_password_env) is not set"));
                }
                p
            });
            Some(UpstreamLogin { user: user.clone(), password, keys: None })
        }
    }
}

/// Resolve every user's upstream login and check the rules that tie databases, users and services together:
/// served names never shadow the console or the read-only alias; `services` name declared services; shared
/// mode by `application_name` has an allow-list or says it trusts clients; `max_pools` is in range.
pub fn resolve_logins(
    config: &super::Config,
    served: &BTreeMap<String, DatabaseMap>,
    env: &Env,
    v: &mut Vec<String>,
) -> BTreeMap<String, UpstreamLogin> {
    let p = &config.proxy;
    if !(1..=10_000).contains(&p.max_pools) {
        v.push(format!("proxy.max_pools = {} is out of range (1 ..= 10000)", p.max_pools));
    }
    for (name, map) in served {
        for reserved in [&config.admin.console_database, &config.read_only.database] {
            if !reserved.is_empty() && map.aliases().any(|a| a == reserved.as_str()) {
                v.push(format!(
                    "upstreams.{name}.databases lists {reserved:?}, which is the console's or the read-only route's name"
                ));
            }
        }
    }
    let mut logins = BTreeMap::new();
    for u in &config.auth.users {
        if let Some(l) = upstream_login(u, env, v) {
            logins.insert(u.name.clone(), l);
        }
        for s in &u.services {
            if !config.services.contains_key(s) {
                v.push(format!("auth.users {:?}: services lists {s:?}, which is not under [services]", u.name));
            }
        }
    }
    let by_app_name = p.mode == super::Mode::Shared && p.service_from == super::ServiceFrom::ApplicationName;
    if by_app_name && !p.trust_application_name && config.auth.users.iter().all(|u| u.services.is_empty()) {
        v.push(
            "proxy.service_from = \"application_name\" lets any client name any service: list the services each \
             user may name ([[auth.users]] services = [...]) or set proxy.trust_application_name = true"
                .into(),
        );
    }
    logins
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(entries: &[&str]) -> (DatabaseMap, Vec<String>) {
        let mut v = Vec::new();
        let list = DatabaseList::Many(entries.iter().map(|s| s.to_string()).collect());
        (DatabaseMap::parse("upstreams.primary", &list, "railway", &mut v), v)
    }

    #[test]
    fn default_is_the_url_database() {
        let (m, v) = parse(&[]);
        assert!(v.is_empty());
        assert_eq!(m.real("railway").as_deref(), Some("railway"));
        assert_eq!(m.real("template1"), None);
        assert_eq!(m.describe(), "railway");
    }

    #[test]
    fn names_renames_and_wildcard() {
        let (m, v) = parse(&["app -> railway", "app_shadow", "*"]);
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(m.real("app").as_deref(), Some("railway"));
        assert_eq!(m.real("app_shadow").as_deref(), Some("app_shadow"));
        assert_eq!(m.real("fresh_db").as_deref(), Some("fresh_db"));
        assert_eq!(m.real(""), None);
        assert_eq!(m.real(&"x".repeat(64)), None);
        assert_eq!(m.describe(), "app -> railway, app_shadow, *");
        let mut v = Vec::new();
        let one = DatabaseMap::parse("u", &DatabaseList::One("*".into()), "railway", &mut v);
        assert!(v.is_empty() && one.real("anything").is_some() && one.real("railway").is_some());
    }

    #[test]
    fn bad_entries_are_named() {
        let (_, v) = parse(&["", "a -> ", "x", "x", &"d".repeat(64)]);
        assert_eq!(v.len(), 4, "{v:?}");
        assert!(v.iter().any(|e| e.contains("\"x\" is listed twice")));
    }
}
