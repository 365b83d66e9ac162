//! Learned state across restarts: written to the state directory when it
//! changed (at most once a second, and at shutdown) and restored at start,
//! with wire times mapped back onto the monotonic clock. What the learner
//! remembers beyond `learned.toml`'s entries — the ceiling memory and a
//! learned concurrency limit — goes to `learned-memory.toml` beside it,
//! written and read with it (an unreadable one is logged and ignored).

use super::files::{
    check_version, read_toml, write_toml, LearnedEntry, LearnedFile, StateError, FORMAT_VERSION,
};
use super::Broker;
use crate::learning::Persisted;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use tokio::time::Instant;

/// How often learned state is written, at most.
const PERSIST_EVERY: Duration = Duration::from_secs(1);

/// Name of the learner's memory file inside the state directory.
const MEMORY_FILE: &str = "learned-memory.toml";

/// The learner's memory of every bucket instance that has any.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MemoryFile {
    /// Format version.
    pub version: u32,
    /// One entry per bucket instance with a memory.
    #[serde(default)]
    pub buckets: Vec<MemoryEntry>,
}

/// The learner's memory of one bucket instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MemoryEntry {
    /// Tenant id.
    pub tenant: String,
    /// Bucket name.
    pub bucket: String,
    /// OAuth client of a per-client instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth_client: Option<String>,
    /// The rate the upstream last refused, per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceiling_per_min: Option<f64>,
    /// How many 429s in a row came at about that rate.
    #[serde(default)]
    pub ceiling_hits: u32,
    /// The learned concurrency limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    /// How many refusals in a row confirmed it.
    #[serde(default)]
    pub max_in_flight_hits: u32,
}

/// (tenant, bucket, OAuth client): one instance.
type InstanceKey = (String, String, Option<String>);

impl MemoryFile {
    /// Reads `dir/learned-memory.toml`; `Ok(None)` if there is none.
    pub(crate) fn read(dir: &Path) -> Result<Option<MemoryFile>, StateError> {
        let file: Option<MemoryFile> = read_toml(dir, MEMORY_FILE)?;
        check_version(dir, MEMORY_FILE, file.as_ref().map(|f| f.version))?;
        Ok(file)
    }

    /// Writes `dir/learned-memory.toml` atomically, creating `dir` if needed.
    pub(crate) fn write(&self, dir: &Path) -> Result<(), StateError> {
        write_toml(dir, MEMORY_FILE, self)
    }

    /// The entries by instance.
    fn by_instance(self) -> HashMap<InstanceKey, MemoryEntry> {
        self.buckets
            .into_iter()
            .map(|e| {
                (
                    (e.tenant.clone(), e.bucket.clone(), e.oauth_client.clone()),
                    e,
                )
            })
            .collect()
    }
}

impl Broker {
    /// Restores learned state from `dir`; true if an earlier run left
    /// state there (readable or not), so this start is a restart.
    pub(super) fn restore(&self, dir: &std::path::Path, now: Instant) -> bool {
        let file = match LearnedFile::read(dir) {
            Ok(Some(f)) => f,
            Ok(None) => return false,
            Err(e) => {
                tracing::warn!(error = %e, "learned state not restored; starting on the config alone");
                return true;
            }
        };
        let memory = match MemoryFile::read(dir) {
            Ok(m) => m.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "the learner's memory not restored; rates and limits are");
                MemoryFile::default()
            }
        };
        let restored = self.apply_learned_with(file, memory, now);
        tracing::info!(dir = %dir.display(), buckets = restored, "learned state restored");
        true
    }

    /// Applies a learned-state file's entries; how many were.
    pub(super) fn apply_learned(&self, file: LearnedFile, now: Instant) -> usize {
        self.apply_learned_with(file, MemoryFile::default(), now)
    }

    /// Applies a learned-state file's entries with the learner's memory of
    /// the same instances; how many were.
    fn apply_learned_with(&self, file: LearnedFile, memory: MemoryFile, now: Instant) -> usize {
        let clock = self.inner.clock;
        let mut memory = memory.by_instance();
        let mut restored = 0;
        for e in file.buckets {
            let remembered =
                memory.remove(&(e.tenant.clone(), e.bucket.clone(), e.oauth_client.clone()));
            let Some(&t) = self.inner.by_id.get(&e.tenant) else {
                tracing::info!(tenant = %e.tenant, "learned state of a tenant no longer configured: dropped");
                continue;
            };
            let p = Persisted {
                effective_per_min: e.effective_per_min,
                learned_limit_per_min: e.learned_limit_per_min,
                frozen_until: e.frozen_until_ms.and_then(|ms| clock.instant_of(ms, now)),
                cooldown: e
                    .cooldown_until_ms
                    .and_then(|ms| clock.instant_of(ms, now))
                    .zip(e.cooldown_per_min),
                upstream: match (
                    e.upstream_remaining,
                    e.upstream_reset_ms,
                    e.upstream_window_ms,
                ) {
                    (Some(r), Some(reset), Some(w)) => clock
                        .instant_of(reset, now)
                        .map(|at| (r, at, Duration::from_millis(w))),
                    _ => None,
                },
                ceiling: remembered
                    .as_ref()
                    .and_then(|m| Some((m.ceiling_per_min?, m.ceiling_hits))),
                slots: remembered
                    .as_ref()
                    .and_then(|m| Some((m.max_in_flight?, m.max_in_flight_hits))),
            };
            if self.inner.tenants[t]
                .lock()
                .restore(&e.bucket, e.oauth_client.as_deref(), p, now)
            {
                restored += 1;
            }
        }
        restored
    }

    /// Writes learned state when it changed, at most once per
    /// [`PERSIST_EVERY`], and once more at shutdown. (The broker writes it
    /// once before serving, too.)
    pub(super) async fn persist(self, dir: std::path::PathBuf) {
        loop {
            let stop = tokio::select! {
                _ = tokio::time::sleep(PERSIST_EVERY) => false,
                _ = self.inner.shutdown.cancelled() => true,
            };
            let mut dirty = false;
            for t in &self.inner.tenants {
                dirty |= t.lock().take_learned_dirty();
            }
            if dirty {
                let file = self.learned_file();
                let memory = self.memory_file();
                let dir = dir.clone();
                let written =
                    tokio::task::spawn_blocking(move || file.write(&dir).and(memory.write(&dir)))
                        .await;
                match written {
                    Ok(Ok(())) => tracing::debug!("learned state written"),
                    Ok(Err(e)) => tracing::error!(error = %e, "cannot write learned state"),
                    Err(e) => tracing::error!(error = %e, "learned-state writer failed"),
                }
            }
            if stop {
                break;
            }
        }
    }

    /// Every tenant's learned state, for the state file.
    pub(crate) fn learned_file(&self) -> LearnedFile {
        self.learned_of(None)
    }

    /// The learner's memory of every tenant's instances, for its file.
    pub(crate) fn memory_file(&self) -> MemoryFile {
        let now = Instant::now();
        let mut buckets = Vec::new();
        for t in &self.inner.tenants {
            let state = t.lock();
            for (bucket, oauth_client, p) in state.learned(now) {
                if p.ceiling.is_none() && p.slots.is_none() {
                    continue;
                }
                buckets.push(MemoryEntry {
                    tenant: state.id().to_owned(),
                    bucket,
                    oauth_client,
                    ceiling_per_min: p.ceiling.map(|c| c.0),
                    ceiling_hits: p.ceiling.map_or(0, |c| c.1),
                    max_in_flight: p.slots.map(|l| l.0),
                    max_in_flight_hits: p.slots.map_or(0, |l| l.1),
                });
            }
        }
        MemoryFile {
            version: FORMAT_VERSION,
            buckets,
        }
    }

    /// The learned state of tenant `only` (`None`: of every tenant).
    pub(super) fn learned_of(&self, only: Option<usize>) -> LearnedFile {
        let now = Instant::now();
        let clock = self.inner.clock;
        let mut entries = Vec::new();
        let tenants = self.inner.tenants.iter().enumerate();
        for (_, t) in tenants.filter(|(i, _)| only.is_none_or(|o| o == *i)) {
            let state = t.lock();
            for (bucket, oauth_client, p) in state.learned(now) {
                entries.push(LearnedEntry {
                    tenant: state.id().to_owned(),
                    bucket,
                    oauth_client,
                    effective_per_min: p.effective_per_min,
                    learned_limit_per_min: p.learned_limit_per_min,
                    frozen_until_ms: p.frozen_until.map(|t| clock.unix_ms(t)),
                    cooldown_until_ms: p.cooldown.map(|c| clock.unix_ms(c.0)),
                    cooldown_per_min: p.cooldown.map(|c| c.1),
                    upstream_remaining: p.upstream.map(|u| u.0),
                    upstream_reset_ms: p.upstream.map(|u| clock.unix_ms(u.1)),
                    upstream_window_ms: p.upstream.map(|u| crate::clock::millis(u.2)),
                });
            }
        }
        LearnedFile::new(entries)
    }
}
