//! Where the configuration comes from: a `budgets.toml`, or for the simple case the environment alone.

use super::environment;
use super::resolve::Resolved;
use super::{Config, ConfigError, Env};
use std::path::PathBuf;

/// Where the configuration comes from: the named file; without one, the environment when `PGBUDGET_SLICES` is
/// set; else `budgets.toml` in the working directory.
pub enum Source {
    File { path: PathBuf, named: bool },
    Env,
}

impl Source {
    pub fn pick(config: Option<PathBuf>, env: &Env) -> Source {
        match config {
            Some(path) => Source::File { path, named: true },
            None if environment::present(env) => Source::Env,
            None => Source::File { path: PathBuf::from("budgets.toml"), named: false },
        }
    }

    pub fn config(&self, env: &Env) -> Result<Config, ConfigError> {
        match self {
            Source::Env => environment::config(env),
            Source::File { path, named } => {
                let mut c = Config::load(path);
                if let Err(e) = &mut c {
                    if environment::present(env) {
                        e.violations.push(format!(
                            "{} is set too: name either a config file or the slices, not both",
                            environment::SLICES_VAR
                        ));
                    } else if !named && !path.exists() {
                        e.violations.push(format!(
                            "name a file with --config or PGBUDGET_CONFIG, or run without one: set {} and DATABASE_URL",
                            environment::SLICES_VAR
                        ));
                    }
                }
                c
            }
        }
    }

    pub fn load(&self, env: &Env) -> Result<Resolved, ConfigError> {
        let both = matches!(self, Source::File { named: true, .. }) && environment::present(env);
        if both {
            return Err(ConfigError {
                violations: vec![format!(
                    "both a config file ({self}) and {} are given: name one",
                    environment::SLICES_VAR
                )],
            });
        }
        self.config(env).and_then(|c| Resolved::resolve(c, env))
    }

    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            Source::File { path, .. } => Some(path),
            Source::Env => None,
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File { path, .. } => write!(f, "{}", path.display()),
            Source::Env => write!(f, "the environment ({})", environment::SLICES_VAR),
        }
    }
}
