//! Reading a configuration: the file (or the embedded default) and the
//! `QUOTA_BROKER__…` environment overrides layered by the `config` crate,
//! TOML syntax errors placed by line and column, every problem collected
//! into one [`ConfigError`] that says which variable set a key, and the
//! variables that look meant for the broker but are not read.

use super::collect;
use super::raw::RawConfig;
use super::{Settings, DEFAULT_TOML, ENV_PREFIX};
use std::path::Path;

/// Every problem found in a configuration, one line each.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    /// One human-readable line per problem.
    pub problems: Vec<String>,
}

impl ConfigError {
    pub(super) fn one(problem: String) -> Self {
        ConfigError {
            problems: vec![problem],
        }
    }

    /// Says where each problem comes from: the environment variable that
    /// set its key (`overrides`: key path → variable), or else `source` for
    /// a problem that names no key (a TOML syntax error).
    fn annotated(mut self, source: &str, overrides: &[(String, String)]) -> Self {
        for p in &mut self.problems {
            // Problems name keys clipped (`collect::clip_dotted`); an
            // unknown section is named alone, above the key the variable set.
            let named = p.split([':', ' ']).next().unwrap_or_default();
            let from_env = overrides.iter().find(|(key, _)| {
                let under_named = !named.is_empty()
                    && key
                        .strip_prefix(named)
                        .is_some_and(|rest| rest.starts_with('.'));
                under_named
                    || [key.clone(), collect::clip_dotted(key)].iter().any(|k| {
                        p.strip_prefix(k.as_str())
                            .is_some_and(|rest| rest.starts_with([':', ' ', '[', '.']))
                    })
            });
            if let Some((_, var)) = from_env {
                p.push_str(&format!(
                    " (set by the environment variable {})",
                    crate::error::clip_plain(var)
                ));
            } else if p.starts_with("TOML parse error") {
                *p = format!("{source}: {}", one_line_toml_error(p));
            }
        }
        self
    }
}

/// Keys whose value is a list of strings, which an environment variable
/// sets comma-separated (`QUOTA_BROKER__CLUSTER__ETCD=http://a:2379,http://b:2379`).
const ENV_LISTS: [&str; 1] = ["cluster.etcd"];

/// Sets the list `key` (dotted) of `doc` to `written` split on commas, each
/// item trimmed, empty ones dropped (a trailing comma, or "" for none).
/// Done here rather than by the `config` crate's `list_separator`, which
/// keeps the spaces around items and reads a value that looks like a
/// number as one.
fn set_list(doc: &mut toml::Value, key: &str, written: &str) {
    let items = written
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| toml::Value::String(item.to_owned()))
        .collect();
    let mut at = doc;
    for part in key.split('.') {
        let Some(table) = at.as_table_mut() else {
            // Not a table here (a section set to a value): that problem
            // is said when the document is read.
            return;
        };
        at = table
            .entry(part)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
    *at = toml::Value::Array(items);
}

/// Variables the clients and tools read (not the broker): set beside the
/// broker's own, they are not a mistake.
const CLIENT_ENV: [&str; 9] = [
    "QUOTA_BROKER_URL",
    "QUOTA_BROKER_TOKEN",
    "QUOTA_BROKER_TENANT",
    "QUOTA_BROKER_CA_CERT",
    "QUOTA_BROKER_CLIENT_CERT",
    "QUOTA_BROKER_CLIENT_KEY",
    "QUOTA_BROKER_TLS_SERVER_NAME",
    "QUOTA_BROKER_TIMEOUT",
    "QUOTA_BROKER_BIN",
];

/// Names (clipped) of environment variables that look meant for the
/// broker's config but are not read: `QUOTA_BROKER_SERVER__LISTEN` with
/// one underscore after the prefix, where overrides take two.
pub fn unread_env_vars(env: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
    let mut unread: Vec<String> = env
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| {
            k.strip_prefix(ENV_PREFIX)
                .is_some_and(|rest| rest.starts_with('_') && !rest.starts_with("__"))
                && !CLIENT_ENV.contains(&k.as_str())
        })
        .map(|k| crate::error::clip_plain(&k))
        .collect();
    unread.sort();
    unread
}

/// A TOML parse error on one line, without the source line it quotes (a
/// file with a long line would be echoed whole): where it is, and what is
/// wrong, clipped.
fn one_line_toml_error(text: &str) -> String {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let at = lines.next().unwrap_or_default();
    // After the first line: the quoted source (`|` gutters, a caret line),
    // then the message.
    let mut message =
        lines.filter(|l| !l.starts_with('|') && !l.contains(" | ") && !l.starts_with('^'));
    let message = message.next_back().unwrap_or_default();
    crate::error::clip_plain(&format!("{at}: {message}"))
}

impl Settings {
    /// Loads the configuration: the file at `path` (or the embedded default
    /// when `None`), then overrides from `env` (`QUOTA_BROKER__SECTION__KEY`
    /// pairs; pass `std::env::vars()` in the process, a map in tests).
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|e| {
                ConfigError::one(format!("cannot read config file {}: {e}", shown(path)))
            })?,
            None => DEFAULT_TOML.to_owned(),
        };
        let source_name = path.map_or_else(
            || "the embedded default config".to_owned(),
            |p| format!("config file {}", shown(p)),
        );
        toml_syntax(&text).map_err(|e| ConfigError::one(format!("{source_name}: {e}")))?;
        let base = config::File::from_str(&text, config::FileFormat::Toml);
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        let source = source_name;
        let overrides: Vec<(String, String)> = env
            .keys()
            .filter_map(|k| {
                let path = k.strip_prefix(ENV_PREFIX)?.strip_prefix("__")?;
                Some((path.to_lowercase().replace("__", "."), k.clone()))
            })
            .collect();
        let written: Vec<(String, String)> = overrides
            .iter()
            .filter_map(|(key, var)| Some((key.clone(), env.get(var)?.clone())))
            .collect();
        Self::load_sources(base, env, &written)
            .map_err(|e| e.annotated(&source, &overrides))?
            .validate()
            .map_err(|e| e.annotated(&source, &overrides))
    }

    /// The configuration read from the file's text `base` and the
    /// environment overrides `env` (`written`: each override's key and
    /// value as written), not validated yet.
    fn load_sources(
        base: config::File<config::FileSourceString, config::FileFormat>,
        env: config::Map<String, String>,
        written: &[(String, String)],
    ) -> Result<RawConfig, ConfigError> {
        let mut raw = config::Config::builder()
            .add_source(base)
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(env)),
            )
            .build()
            .and_then(|c| c.try_deserialize::<toml::Value>())
            .map_err(|e| ConfigError::one(e.to_string()))?;
        for (key, value) in written {
            if ENV_LISTS.contains(&key.as_str()) {
                set_list(&mut raw, key, value);
            }
        }
        collect::read::<RawConfig>(raw, written)
    }

    /// Parses and validates a TOML document, with no environment overrides.
    ///
    /// ```
    /// let s = quota_broker::Settings::from_toml(r#"
    ///     [[tenants]]
    ///     id = "acme"
    ///     [[tenants.buckets]]
    ///     name = "org"
    ///     routes = ["* /**"]
    ///     permits = 300
    ///     window_ms = 60000
    /// "#).unwrap();
    /// assert_eq!(s.tenants[0].buckets[0].rate.unwrap().per_minute(), 300.0);
    /// ```
    pub fn from_toml(toml: &str) -> Result<Settings, ConfigError> {
        toml_syntax(toml).map_err(ConfigError::one)?;
        let raw = config::Config::builder()
            .add_source(config::File::from_str(toml, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize::<toml::Value>())
            .map_err(|e| ConfigError::one(e.to_string()))?;
        collect::read::<RawConfig>(raw, &[])?.validate()
    }

    /// The embedded default configuration.
    pub fn embedded_default() -> Result<Settings, ConfigError> {
        Settings::from_toml(DEFAULT_TOML)
    }
}

/// The TOML syntax of `text`, checked first: the `config` crate's own
/// parse error says what but not where ("number too large to fit in target
/// type"); this one names the line and column, not the line's text (a line
/// is input, of any length).
fn toml_syntax(text: &str) -> Result<(), String> {
    let Err(e) = toml::from_str::<toml::Table>(text) else {
        return Ok(());
    };
    let message = crate::error::clip_plain(e.message().trim());
    Err(match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("TOML parse error at line {line}, column {column}: {message}")
        }
        None => format!("TOML parse error: {message}"),
    })
}

/// A file's path as a config error names it: clipped (a path is input).
pub(crate) fn shown(path: &Path) -> String {
    crate::error::clip_plain(&path.display().to_string())
}
