//! The state directory as the broker takes it at start (single broker):
//! created and checked writable, then held with a lock so that no second
//! broker writes there beside it.

use super::Settings;
use crate::error::clip;
use std::path::Path;

/// The lock file in `server.state_dir` (see [`Settings::lock_state_dir`]).
const STATE_LOCK_FILE: &str = "broker.lock";

/// How to change `server.state_dir`: a broker on the embedded default has
/// no config file to fix, and its `state` is under the working directory.
const CHANGE_IT: &str = "set server.state_dir in the config file, or \
    QUOTA_BROKER__SERVER__STATE_DIR in the environment, to a directory the broker can write, \
    or to \"\" to keep nothing across restarts";

/// `server.state_dir` as given and, when it is relative, the absolute path
/// it names (under the working directory), each clipped.
fn shown(dir: &Path) -> String {
    let given = clip(&dir.display().to_string());
    match std::path::absolute(dir) {
        Ok(abs) if abs != dir => format!("{given} (that is {})", clip(&abs.display().to_string())),
        Ok(_) => given,
        Err(e) => format!("{given} (under a working directory that cannot be read: {e})"),
    }
}

/// Why a directory cannot be made at `dir` when the reason is that it, or
/// the nearest of its parents that exists, is not a directory (a file
/// where the directory should be).
fn not_a_directory(dir: &Path) -> Option<String> {
    let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let (at, meta) = abs
        .ancestors()
        .find_map(|p| Some((p, std::fs::metadata(p).ok()?)))?;
    if meta.is_dir() {
        return None;
    }
    let what = if meta.is_file() {
        "is a file, not a directory"
    } else {
        "is not a directory"
    };
    Some(if at == abs {
        format!("it {what}")
    } else {
        format!("{} {what}", clip(&at.display().to_string()))
    })
}

impl Settings {
    /// Creates `server.state_dir` if it is missing and checks that the
    /// broker can write files there; call it before serving. Without it a
    /// start after a crash could not tell it is a restart (and would grant
    /// slots the earlier run's callers still hold), and every operator's
    /// change would be refused as unsaved. Nothing to check in cluster mode
    /// (the state lives in etcd) or without a state directory.
    pub fn check_state_dir(&self) -> Result<(), String> {
        let Some(dir) = self.server.state_dir.as_deref() else {
            return Ok(());
        };
        if self.cluster.is_some() {
            return Ok(());
        }
        let probe = dir.join(".write-check");
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&probe, b"quota-broker"))
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|e| {
                // A full disk creates the probe, then fails to fill it.
                let _ = std::fs::remove_file(&probe);
                let (why, fix) = match not_a_directory(dir) {
                    Some(why) => (why, ""),
                    None if e.kind() == std::io::ErrorKind::PermissionDenied => (
                        e.to_string(),
                        "give the broker's user write access there, or ",
                    ),
                    None => (e.to_string(), ""),
                };
                format!(
                    "server.state_dir {}: cannot write there: {why} (learned limits and \
                     operators' changes are kept in that directory); {fix}{CHANGE_IT}",
                    shown(dir)
                )
            })
    }

    /// Takes `server.state_dir` for this process: an exclusive lock on
    /// `broker.lock` there, held as long as the returned file is open, with
    /// this process's id written in it. Two brokers on one state directory
    /// would each overwrite the other's learned state, operators' changes
    /// and lease records with their own (the last write wins, silently), so
    /// a second one is refused, naming the first. `None` where
    /// [`Settings::check_state_dir`] has nothing to check. The lock is the
    /// kernel's (`flock`): it goes with the process however it ends, so a
    /// crash leaves nothing to clean up.
    pub fn lock_state_dir(&self) -> Result<Option<std::fs::File>, String> {
        let Some(dir) = self.server.state_dir.as_deref() else {
            return Ok(None);
        };
        if self.cluster.is_some() {
            return Ok(None);
        }
        let shown = || shown(dir);
        let path = dir.join(STATE_LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| {
                format!(
                    "server.state_dir {}: cannot open {STATE_LOCK_FILE}: {e}",
                    shown()
                )
            })?;
        // fs4 rather than std's `File::try_lock`: the same `flock`, within
        // the crate's minimum Rust version.
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => {}
            Err(fs4::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = std::io::Read::read_to_string(&mut file, &mut holder);
                let holder = holder.trim();
                let who = match holder.parse::<u32>() {
                    Ok(pid) => format!("another broker (process {pid})"),
                    Err(_) => "another broker".to_owned(),
                };
                return Err(format!(
                    "server.state_dir {} is in use by {who}: two brokers on one state \
                     directory overwrite each other's learned state and operators' changes; \
                     give each broker its own state_dir, or stop the other first",
                    shown()
                ));
            }
            Err(fs4::TryLockError::Error(e)) => {
                return Err(format!(
                    "server.state_dir {}: cannot lock {STATE_LOCK_FILE}: {e}",
                    shown()
                ))
            }
        }
        let wrote = file
            .set_len(0)
            .and_then(|()| std::io::Seek::rewind(&mut file))
            .and_then(|()| {
                std::io::Write::write_all(&mut file, format!("{}\n", std::process::id()).as_bytes())
            })
            .and_then(|()| file.sync_all());
        wrote.map_err(|e| {
            format!(
                "server.state_dir {}: cannot write {STATE_LOCK_FILE}: {e}",
                shown()
            )
        })?;
        Ok(Some(file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(state_dir: &str) -> Result<(), String> {
        Settings::from_toml(&format!(
            "[server]\nstate_dir = {state_dir:?}\n[[tenants]]\nid = \"t\"\n\
             [[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 1\n"
        ))
        .unwrap()
        .check_state_dir()
    }

    /// Says how to change it: a broker on the embedded default has no
    /// config file to fix.
    fn says_how_to_change_it(err: &str) {
        for what in [
            "set server.state_dir in the config file",
            "QUOTA_BROKER__SERVER__STATE_DIR in the environment",
            "or to \"\" to keep nothing across restarts",
        ] {
            assert!(err.contains(what), "{what}: {err}");
        }
    }

    #[test]
    fn a_state_dir_that_is_a_file_is_said_to_be_one() {
        let file = std::env::temp_dir().join(format!("qb-state-file-{}", std::process::id()));
        std::fs::write(&file, "").unwrap();
        let err = check(file.to_str().unwrap()).unwrap_err();
        let _ = std::fs::remove_file(&file);
        assert!(
            err.starts_with(&format!(
                "server.state_dir {:?}: cannot write there: it is a file, not a directory",
                file.display().to_string()
            )),
            "{err}"
        );
        assert!(!err.contains("(that is"), "absolute already: {err}");
        assert!(!err.contains("os error"), "{err}");
        says_how_to_change_it(&err);
    }

    #[test]
    fn a_relative_state_dir_is_named_by_its_absolute_path_too() {
        // Tests run in the package's directory, which holds Cargo.toml.
        let cwd = std::env::current_dir().unwrap();
        let err = check("Cargo.toml/state").unwrap_err();
        assert!(
            err.starts_with(&format!(
                "server.state_dir \"Cargo.toml/state\" (that is {:?}): cannot write there: \
                 {:?} is a file, not a directory",
                cwd.join("Cargo.toml/state").display().to_string(),
                cwd.join("Cargo.toml").display().to_string()
            )),
            "{err}"
        );
        says_how_to_change_it(&err);
        // A long path is clipped, both as given and as absolute.
        let long = format!("Cargo.toml/{}", "d".repeat(5_000));
        let err = check(&long).unwrap_err();
        assert!(err.len() < 1_000, "{} bytes: {err}", err.len());
    }

    #[test]
    fn a_state_dir_it_can_make_is_made() {
        let dir = std::env::temp_dir().join(format!("qb-state-made-{}", std::process::id()));
        let made = check(dir.join("a/b").to_str().unwrap());
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(made, Ok(()));
    }
}
