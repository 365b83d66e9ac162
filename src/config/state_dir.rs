//! The state directory as the broker takes it at start (single broker):
//! created and checked writable, then held with a lock so that no second
//! broker writes there beside it.

use super::Settings;

/// The lock file in `server.state_dir` (see [`Settings::lock_state_dir`]).
const STATE_LOCK_FILE: &str = "broker.lock";

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
                format!(
                    "server.state_dir {}: cannot write there: {e} (learned limits and operators' \
                     changes are kept there; fix the path or its permissions, or set it to \"\" \
                     to keep nothing across restarts)",
                    crate::error::clip(&dir.display().to_string())
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
        let shown = || crate::error::clip(&dir.display().to_string());
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
