//! State on disk: learned state (`learned.toml`), operators' run-time
//! changes (`admin.toml`) and a graceful stop's record of its leases
//! (`stopped.json`) in the state directory, each written atomically
//! (temp file, fsync, rename, fsync of the directory) so a crash leaves
//! either the old file or the new one, and read once at start. A file that
//! cannot be read is reported and ignored: the broker then starts on its
//! config alone rather than not at all.

use crate::config::ClassSettings;
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Name of the learned-state file inside the state directory.
pub(super) const LEARNED_FILE: &str = "learned.toml";
/// Name of the operators' changes file inside the state directory.
pub(super) const ADMIN_FILE: &str = "admin.toml";
/// Name of the record a graceful stop leaves (see [`StopRecord`]).
pub(super) const STOP_FILE: &str = "stopped.json";

/// What a graceful stop knew once it granted no more: every tenant's live
/// leases, so the next start holds their slots instead of treating every
/// slot as held by an unknown lease. JSON, not TOML: a lease's instances
/// are (bucket, OAuth client or none) pairs. Read once and removed at the
/// next start, and trusted only if it names the run that wrote
/// `learned.toml` last: every start writes that file before it serves, so
/// a record older than the last start (whose run may have crashed) never
/// matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct StopRecord {
    /// The run that stopped (see [`LearnedFile::run`]).
    pub run: u64,
    /// When, unix ms.
    pub stopped_at_ms: u64,
    /// That run's `server.max_lease_ttl_ms`: a lease it renewed for that
    /// long keeps it, even if this run's limit is lower.
    #[serde(default)]
    pub max_lease_ttl_ms: u64,
    /// Per tenant id, its live leases; `None` where it did not know every
    /// slot's holder (still learning after its own start).
    pub tenants: std::collections::BTreeMap<String, Option<Vec<crate::tenant::HandedLease>>>,
}

impl StopRecord {
    /// Writes `dir/stopped.json` atomically.
    pub(super) fn write(&self, dir: &Path) -> Result<(), StateError> {
        let path = dir.join(STOP_FILE);
        let text = serde_json::to_string(self).map_err(|e| StateError::Corrupt {
            path,
            message: e.to_string(),
        })?;
        write_atomic(dir, STOP_FILE, text.as_bytes())
    }

    /// Reads and removes `dir/stopped.json`: `Ok(None)` if there is none.
    /// It is removed even when unreadable (the start that reads it is about
    /// to write `learned.toml`, so it could never match again).
    pub(super) fn take(dir: &Path) -> Result<Option<StopRecord>, StateError> {
        let path = dir.join(STOP_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        std::fs::remove_file(&path).map_err(|source| StateError::Io {
            path: path.clone(),
            source,
        })?;
        // Removed for good before this run grants: a power loss must not
        // bring the record back for a later start to trust.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| StateError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| StateError::Corrupt {
                path,
                message: crate::error::clip_plain(&e.to_string()),
            })
    }
}

/// Operators' run-time changes, per tenant: only what they changed. Fields
/// it does not know are ignored (see [`LearnedFile`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct AdminFile {
    /// Format version.
    pub version: u32,
    /// Changed priority classes.
    #[serde(default)]
    pub classes: Vec<AdminClass>,
    /// Changed buckets.
    #[serde(default)]
    pub buckets: Vec<AdminBucket>,
}

/// A class as an operator set it (its fields as in the config's
/// `[[classes]]`, beside the tenant).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct AdminClass {
    /// Tenant id.
    pub(super) tenant: String,
    /// The class.
    #[serde(flatten)]
    pub(super) class: ClassSettings,
}

/// A bucket's limits and pause as an operator set them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct AdminBucket {
    /// Tenant id.
    pub tenant: String,
    /// Bucket name.
    pub bucket: String,
    /// Rate permits per window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permits: Option<u32>,
    /// Rate window, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_ms: Option<u64>,
    /// Burst.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Concurrency limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    /// Why it is paused, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<String>,
}

impl AdminFile {
    /// A file holding these changes.
    pub(super) fn new(classes: Vec<AdminClass>, buckets: Vec<AdminBucket>) -> AdminFile {
        AdminFile {
            version: FORMAT_VERSION,
            classes,
            buckets,
        }
    }

    /// Reads `dir/admin.toml`; `Ok(None)` if there is none yet.
    pub(super) fn read(dir: &Path) -> Result<Option<AdminFile>, StateError> {
        let file: Option<AdminFile> = read_toml(dir, ADMIN_FILE)?;
        check_version(dir, ADMIN_FILE, file.as_ref().map(|f| f.version))?;
        Ok(file)
    }

    /// Writes `dir/admin.toml` atomically.
    pub(super) fn write(&self, dir: &Path) -> Result<(), StateError> {
        write_toml(dir, ADMIN_FILE, self)
    }
}

fn check_version(dir: &Path, name: &str, version: Option<u32>) -> Result<(), StateError> {
    match version {
        Some(v) if v != FORMAT_VERSION => Err(StateError::Corrupt {
            path: dir.join(name),
            message: format!("format version {v} is not {FORMAT_VERSION}"),
        }),
        _ => Ok(()),
    }
}

fn read_toml<T: serde::de::DeserializeOwned>(
    dir: &Path,
    name: &str,
) -> Result<Option<T>, StateError> {
    let path = dir.join(name);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateError::Io { path, source }),
    };
    let text = checked(&text).map_err(|message| StateError::Corrupt {
        path: path.clone(),
        message,
    })?;
    toml::from_str(text).map(Some).map_err(|e| {
        // Where and what, not the line itself (it may be megabytes).
        let line = e
            .span()
            .and_then(|s| text.get(..s.start))
            .map_or(1, |t| t.matches('\n').count() + 1);
        StateError::Corrupt {
            path,
            message: format!("line {line}: {}", crate::error::clip_plain(e.message())),
        }
    })
}

fn write_toml<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<(), StateError> {
    let text = toml::to_string(value).map_err(|e| StateError::Corrupt {
        path: dir.join(name),
        message: e.to_string(),
    })?;
    write_atomic(dir, name, with_checksum(&text).as_bytes())
}

/// The first line of a state file: its length and checksum, so a file cut
/// short (a copy, a file system that lost its tail) is refused whole
/// rather than read in part: TOML cut at a line's end still parses.
const CHECKSUM_PREFIX: &str = "# quota-broker state: ";

/// `text` behind its checksum line.
fn with_checksum(text: &str) -> String {
    use sha2::Digest as _;
    let sum = hex::encode(sha2::Sha256::digest(text.as_bytes()));
    format!(
        "{CHECKSUM_PREFIX}{} bytes, sha256 {sum}\n{text}",
        text.len()
    )
}

/// The body of a state file whose checksum line matches it; a file without
/// one (written before there was one, or by hand) as it is.
fn checked(text: &str) -> Result<&str, String> {
    use sha2::Digest as _;
    let Some(rest) = text.strip_prefix(CHECKSUM_PREFIX) else {
        return Ok(text);
    };
    let (line, body) = rest.split_once('\n').unwrap_or((rest, ""));
    let sum = hex::encode(sha2::Sha256::digest(body.as_bytes()));
    if line == format!("{} bytes, sha256 {sum}", body.len()) {
        Ok(body)
    } else {
        Err(format!(
            "its content does not match its checksum line ({} bytes after it): cut short or \
             edited; an edited file is read if its first line is removed",
            body.len()
        ))
    }
}

/// Writes `dir/name` atomically: temp file, fsync, rename, fsync of `dir`.
fn write_atomic(dir: &Path, name: &str, text: &[u8]) -> Result<(), StateError> {
    let path = dir.join(name);
    let io = |source| StateError::Io {
        path: path.clone(),
        source,
    };
    // `create_dir_all` would say only "File exists".
    if dir.exists() && !dir.is_dir() {
        return Err(StateError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::other("the state directory is not a directory"),
        });
    }
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(text)?;
        f.sync_all()
    });
    if let Err(e) = written {
        // A full disk: leave no empty temp file behind.
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    if let Err(e) = std::fs::rename(&tmp, &path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    // The rename is durable only once the directory is synced.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}
const FORMAT_VERSION: u32 = 1;

/// The learned-state file. Fields it does not know are ignored, not
/// refused: a cluster's snapshots carry it, and during a rolling upgrade an
/// older broker must still read a newer one's (refused, it would start the
/// tenant on its config alone, dropping operators' changes).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct LearnedFile {
    /// Format version.
    pub version: u32,
    /// When it was written, unix ms (by the writer's clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_at_ms: Option<u64>,
    /// The run that wrote it (random, drawn at start): a stop record is
    /// trusted only when it names the run that wrote this file last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<u64>,
    /// One entry per bucket instance with learned state.
    #[serde(default)]
    pub buckets: Vec<LearnedEntry>,
}

/// Learned state of one bucket instance (unknown fields ignored, as above).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct LearnedEntry {
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
    /// The upstream budget view: what is left, as the upstream said less our
    /// grants since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_remaining: Option<u32>,
    /// …until this reset, unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_reset_ms: Option<u64>,
    /// …of a window this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_window_ms: Option<u64>,
    /// The learner's memory: the rate the upstream last refused, per minute…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceiling_per_min: Option<f64>,
    /// …and how many 429s in a row came at about that rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceiling_hits: Option<u32>,
    /// A learned concurrency limit…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    /// …and how many refusals in a row confirmed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight_hits: Option<u32>,
    /// The upstream was seen giving permits back while it refused (a
    /// token bucket or a sliding log, not fixed windows).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refills_continuously: bool,
    /// The window the learned limit applies to, ms (the one the headers
    /// named, else the longest reset they stated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learned_limit_window_ms: Option<u64>,
}

/// Why the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StateError {
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

#[cfg(test)]
impl LearnedEntry {
    /// An entry of tenant `tenant`'s bucket `bucket` at `effective_per_min`
    /// with nothing else learned.
    pub(crate) fn bare(tenant: &str, bucket: &str, effective_per_min: f64) -> LearnedEntry {
        LearnedEntry {
            tenant: tenant.into(),
            bucket: bucket.into(),
            oauth_client: None,
            effective_per_min,
            learned_limit_per_min: None,
            frozen_until_ms: None,
            cooldown_until_ms: None,
            cooldown_per_min: None,
            upstream_remaining: None,
            upstream_reset_ms: None,
            upstream_window_ms: None,
            ceiling_per_min: None,
            ceiling_hits: None,
            max_in_flight: None,
            max_in_flight_hits: None,
            refills_continuously: false,
            learned_limit_window_ms: None,
        }
    }
}

impl LearnedFile {
    /// A file holding `buckets`.
    pub(crate) fn new(buckets: Vec<LearnedEntry>) -> LearnedFile {
        LearnedFile {
            version: FORMAT_VERSION,
            saved_at_ms: None,
            run: None,
            buckets,
        }
    }

    /// Reads `dir/learned.toml`; `Ok(None)` if there is none yet.
    pub(crate) fn read(dir: &Path) -> Result<Option<LearnedFile>, StateError> {
        let file: Option<LearnedFile> = read_toml(dir, LEARNED_FILE)?;
        check_version(dir, LEARNED_FILE, file.as_ref().map(|f| f.version))?;
        Ok(file)
    }

    /// Writes `dir/learned.toml` atomically, creating `dir` if needed.
    pub(crate) fn write(&self, dir: &Path) -> Result<(), StateError> {
        write_toml(dir, LEARNED_FILE, self)
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
            upstream_remaining: Some(3),
            upstream_reset_ms: Some(1_800_000_000_000),
            upstream_window_ms: Some(60_000),
            ceiling_per_min: Some(47.5),
            ceiling_hits: Some(2),
            max_in_flight: Some(4),
            max_in_flight_hits: Some(1),
            refills_continuously: true,
            learned_limit_window_ms: Some(6_000),
        }]);
        f.write(&d).unwrap();
        assert_eq!(LearnedFile::read(&d).unwrap(), Some(f));
        std::fs::write(d.join(LEARNED_FILE), "version = 1\nbuckets = 7\n").unwrap();
        let err = LearnedFile::read(&d).unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
        // A line of 300 KB is not echoed back.
        let long = format!("version = 1\nbuckets = \"{}\n", "x".repeat(300_000));
        std::fs::write(d.join(LEARNED_FILE), long).unwrap();
        let err = LearnedFile::read(&d).unwrap_err().to_string();
        assert!(
            err.len() < 1_000 && err.contains("line 2"),
            "{} bytes: {}",
            err.len(),
            &err[..200]
        );
        // A newer broker's fields are ignored, not refused (a cluster in a
        // rolling upgrade reads each other's snapshots).
        std::fs::write(
            d.join(LEARNED_FILE),
            "version = 1\nwritten_by = \"a newer broker\"\n[[buckets]]\ntenant = \"t\"\n\
             bucket = \"b\"\neffective_per_min = 42.0\nsomething_new = 3\n",
        )
        .unwrap();
        let read = LearnedFile::read(&d).unwrap().unwrap();
        assert_eq!(read.buckets[0].effective_per_min, 42.0);
        let admin = "version = 1\nnew_list = []\n[[buckets]]\ntenant = \"t\"\nbucket = \"b\"\n\
                     paused = \"x\"\nmax_clients = 9\n";
        std::fs::write(d.join(ADMIN_FILE), admin).unwrap();
        let read = AdminFile::read(&d).unwrap().unwrap();
        assert_eq!(read.buckets[0].paused.as_deref(), Some("x"));
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A file cut short at a line's end still parses as TOML: its checksum
    /// line refuses it whole instead of restoring only its first entries.
    #[test]
    fn a_file_cut_short_is_refused_not_read_in_part() {
        let d = dir("cut");
        let entry = |bucket: &str| LearnedEntry {
            frozen_until_ms: Some(1_800_000_000_000),
            ..LearnedEntry::bare("t", bucket, 42.0)
        };
        let f = LearnedFile::new(vec![entry("a"), entry("b")]);
        f.write(&d).unwrap();
        assert_eq!(LearnedFile::read(&d).unwrap(), Some(f));
        let whole = std::fs::read_to_string(d.join(LEARNED_FILE)).unwrap();
        let cut = &whole[..whole.find("bucket = \"b\"").unwrap()];
        std::fs::write(d.join(LEARNED_FILE), cut).unwrap();
        let err = LearnedFile::read(&d).unwrap_err().to_string();
        assert!(err.contains("does not match its checksum"), "{err}");
        // Edited by hand, without the checksum line: read as it is.
        let edited = whole.split_once('\n').unwrap().1.replace("42.0", "40.0");
        std::fs::write(d.join(LEARNED_FILE), edited).unwrap();
        let read = LearnedFile::read(&d).unwrap().unwrap();
        assert_eq!(read.buckets[1].effective_per_min, 40.0);
        let _ = std::fs::remove_dir_all(&d);
    }
}
