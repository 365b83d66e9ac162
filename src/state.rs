//! Learned state on disk: one TOML file in the state directory, written
//! atomically (temp file, fsync, rename, fsync of the directory) so a crash
//! leaves either the old file or the new one, and read once at start. A file
//! that cannot be read is reported and ignored: the broker then starts on
//! its config alone rather than not at all.

use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Name of the learned-state file inside the state directory.
pub const LEARNED_FILE: &str = "learned.toml";
const FORMAT_VERSION: u32 = 1;

/// The learned-state file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearnedFile {
    /// Format version.
    pub version: u32,
    /// One entry per bucket instance with learned state.
    #[serde(default)]
    pub buckets: Vec<LearnedEntry>,
}

/// Learned state of one bucket instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearnedEntry {
    /// Tenant id.
    pub tenant: String,
    /// Bucket name.
    pub bucket: String,
    /// OAuth client of a per-client instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth_client: Option<String>,
    /// Effective rate per minute.
    pub effective_per_min: f64,
    /// Learned limit per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learned_limit_per_min: Option<f64>,
    /// Freeze end, unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_until_ms: Option<u64>,
    /// Ratio-backstop cooldown end, unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown_until_ms: Option<u64>,
    /// Rate the cooldown holds, per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown_per_min: Option<f64>,
}

/// Why the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid learned state.
    #[error("{path} is corrupt: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl LearnedFile {
    /// A file holding `buckets`.
    pub fn new(buckets: Vec<LearnedEntry>) -> LearnedFile {
        LearnedFile {
            version: FORMAT_VERSION,
            buckets,
        }
    }

    /// Reads `dir/learned.toml`; `Ok(None)` if there is none yet.
    pub fn read(dir: &Path) -> Result<Option<LearnedFile>, StateError> {
        let path = dir.join(LEARNED_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let file: LearnedFile = toml::from_str(&text).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if file.version != FORMAT_VERSION {
            return Err(StateError::Corrupt {
                path,
                message: format!("format version {} is not {FORMAT_VERSION}", file.version),
            });
        }
        Ok(Some(file))
    }

    /// Writes `dir/learned.toml` atomically, creating `dir` if needed.
    pub fn write(&self, dir: &Path) -> Result<(), StateError> {
        let path = dir.join(LEARNED_FILE);
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        let text = toml::to_string(self).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = dir.join(format!(".{LEARNED_FILE}.tmp"));
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(io)?;
        // The rename is durable only once the directory is synced.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("qb-state-{}-{name}", std::process::id()))
    }

    #[test]
    fn round_trips_and_reports_corruption() {
        let d = dir("rt");
        assert_eq!(LearnedFile::read(&d).unwrap(), None);
        let f = LearnedFile::new(vec![LearnedEntry {
            tenant: "t".into(),
            bucket: "b".into(),
            oauth_client: None,
            effective_per_min: 42.0,
            learned_limit_per_min: Some(45.0),
            frozen_until_ms: Some(1_800_000_000_000),
            cooldown_until_ms: None,
            cooldown_per_min: None,
        }]);
        f.write(&d).unwrap();
        assert_eq!(LearnedFile::read(&d).unwrap(), Some(f));
        std::fs::write(d.join(LEARNED_FILE), "version = 1\nbuckets = 7\n").unwrap();
        let err = LearnedFile::read(&d).unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
