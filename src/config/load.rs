//! Reading a configuration: the file (or the embedded default) and the
//! `QUOTA_BROKER__…` environment overrides layered by the `config` crate,
//! TOML syntax errors placed by line and column, every problem collected
//! into one [`ConfigError`] that says which variable set a key, and the
//! variables that look meant for the broker but are not read.

use super::collect;
use super::raw::RawConfig;
use super::{Settings, DEFAULT_TOML, ENV_PREFIX};
use std::path::{Path, PathBuf};

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

    /// The problems on one line, for a log: the first `most`, each cut
    /// to a few hundred characters, and how many more there are.
    pub fn one_line(&self, most: usize) -> String {
        let mut shown: Vec<String> = self
            .problems
            .iter()
            .take(most)
            .map(|p| crate::error::cut(p, 300))
            .collect();
        if self.problems.len() > most {
            shown.push(format!("… and {} more", self.problems.len() - most));
        }
        shown.join("; ")
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
        Settings::load_with_warnings(path, env).map(|(settings, _)| settings)
    }

    /// [`Settings::load`], and what a start on the configuration should
    /// warn of though it runs, one line each (for the log, once it is set
    /// up): on unix, a config file that others than its owner may write
    /// (whoever can write it can give themselves an admin token at the next
    /// start) and a TLS private key file every user may read.
    pub fn load_with_warnings(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Settings, Vec<String>), ConfigError> {
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
        let (raw, keys) = Self::load_sources(base, env, &written)
            .map_err(|e| e.annotated(&source, &overrides))?;
        let settings = raw
            .validate()
            .map_err(|e| e.annotated(&source, &overrides))?;
        let warnings = path
            .and_then(config_writable_by_others)
            .into_iter()
            .chain(
                keys.iter()
                    .filter_map(|(key, file)| super::tls::key_readable_by_all(key, file)),
            )
            .collect();
        Ok((settings, warnings))
    }

    /// What a start on the config file at `path` would say of it, without
    /// starting: its problems (the file and the overrides in `env` read and
    /// validated, the state directory checked), or else its warnings (see
    /// [`Settings::load_with_warnings`]). For a running broker asked to
    /// check the file it started with (SIGHUP), so that an operator who
    /// edited it learns whether a restart would fail.
    pub fn check_file(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Vec<String>, ConfigError> {
        let (settings, warnings) = Settings::load_with_warnings(Some(path), env)?;
        settings.check_state_dir().map_err(ConfigError::one)?;
        Ok(warnings)
    }

    /// The configuration read from the file's text `base` and the
    /// environment overrides `env` (`written`: each override's key and
    /// value as written), not validated yet.
    fn load_sources(
        base: config::File<config::FileSourceString, config::FileFormat>,
        env: config::Map<String, String>,
        written: &[(String, String)],
    ) -> Result<(RawConfig, Vec<KeyFile>), ConfigError> {
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
        // The private key files as the broker will read them (overrides
        // applied), for the check of who else may read them.
        let keys = KEY_FILES
            .into_iter()
            .filter_map(|key| {
                let mut at = &raw;
                for part in key.split('.') {
                    at = at.get(part)?;
                }
                let file = at.as_str()?.trim();
                (!file.is_empty()).then(|| (key, PathBuf::from(file)))
            })
            .collect();
        Ok((collect::read::<RawConfig>(raw, written)?, keys))
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

/// The config keys that name a TLS private key file.
const KEY_FILES: [&str; 2] = ["server.tls.key", "cluster.etcd_key"];

/// A private key file as the config names it: its key, and its path.
type KeyFile = (&'static str, PathBuf);

/// The mode of the file at `path` (its permission bits) and who, of its
/// group and everyone else, may write it; `None` when only its owner may
/// (or it cannot be read: that is a problem of its own, said elsewhere).
/// Unix only; elsewhere always `None`.
pub(super) fn writable_by_others(path: &Path) -> Option<(u32, &'static str)> {
    let mode = mode(path)?;
    match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (false, false) => None,
        (true, false) => Some((mode, "its group")),
        (false, true) => Some((mode, "every user of this host")),
        (true, true) => Some((mode, "its group and every user of this host")),
    }
}

/// A warning when the config file at `path` may be written by others
/// than its owner (unix): whoever can write it can give themselves an
/// admin token at the next start.
fn config_writable_by_others(path: &Path) -> Option<String> {
    let (mode, who) = writable_by_others(path)?;
    Some(format!(
        "config file {} is writable by {who} (mode {mode:04o}): whoever can write it can give \
         themselves an admin token at the next start; let only its owner write it (chmod go-w)",
        shown(path)
    ))
}

/// The permission bits of the file at `path`, if it can be read.
#[cfg(unix)]
pub(super) fn mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    Some(std::fs::metadata(path).ok()?.permissions().mode() & 0o7777)
}

/// Not on unix: no permission bits to check.
#[cfg(not(unix))]
pub(super) fn mode(_path: &Path) -> Option<u32> {
    None
}

/// A file's path as a config error names it: clipped (a path is input).
pub(crate) fn shown(path: &Path) -> String {
    crate::error::clip_plain(&path.display().to_string())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A file of `mode` unique to this test process, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, content: &str, mode: u32) -> TempFile {
            let path = std::env::temp_dir()
                .join(format!("quota-broker-{}-load-{name}", std::process::id()));
            std::fs::write(&path, content).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn files_others_may_write_or_read_are_found() {
        let open = TempFile::new("open", "", 0o666);
        assert_eq!(
            writable_by_others(&open.0),
            Some((0o666, "its group and every user of this host"))
        );
        let group = TempFile::new("group", "", 0o664);
        assert_eq!(writable_by_others(&group.0), Some((0o664, "its group")));
        let own = TempFile::new("own", "", 0o600);
        assert_eq!(writable_by_others(&own.0), None);
        // Readable by all is fine for a config file, not for a key.
        let readable = TempFile::new("readable", "", 0o644);
        assert_eq!(writable_by_others(&readable.0), None);
        let warned = super::super::tls::key_readable_by_all("server.tls.key", &readable.0)
            .expect("a key every user may read");
        assert!(warned.contains("server.tls.key"), "{warned}");
        assert!(
            warned.contains("mode 0644") && warned.contains("chmod o-r"),
            "{warned}"
        );
        for mode in [0o600, 0o640, 0o400] {
            let key = TempFile::new("key", "", mode);
            assert_eq!(
                super::super::tls::key_readable_by_all("cluster.etcd_key", &key.0),
                None,
                "{mode:o}"
            );
        }
        // A file that cannot be read is a problem said elsewhere.
        assert_eq!(
            writable_by_others(Path::new("/nonexistent/broker.toml")),
            None
        );
    }

    #[test]
    fn a_start_warns_of_a_config_file_others_may_write_and_a_key_all_may_read() {
        let config = "[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\n\
                      routes = [\"* /**\"]\nmax_in_flight = 1\n";
        let file = TempFile::new("warned.toml", config, 0o666);
        let (_, warnings) = Settings::load_with_warnings(Some(&file.0), []).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("is writable by its group and every user of this host"),
            "{warnings:?}"
        );
        assert!(warnings[0].contains("admin token"), "{warnings:?}");
        std::fs::set_permissions(&file.0, std::fs::Permissions::from_mode(0o600)).unwrap();
        let (_, warnings) = Settings::load_with_warnings(Some(&file.0), []).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        // The key as the broker reads it: a path an override gives counts.
        let pki = testpki::Pki::new("load-key-mode");
        let key = pki.path("server.key");
        let tls = |mode| {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            let env = [
                ("QUOTA_BROKER__SERVER__TLS__CERT", pki.arg("server.pem")),
                ("QUOTA_BROKER__SERVER__TLS__KEY", pki.arg("server.key")),
            ]
            .map(|(k, v)| (k.to_owned(), v));
            Settings::load_with_warnings(Some(&file.0), env).unwrap().1
        };
        let warnings = tls(0o644);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("server.tls.key ") && warnings[0].contains("mode 0644"),
            "{warnings:?}"
        );
        assert!(tls(0o600).is_empty());
    }
}
