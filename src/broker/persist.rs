//! Learned state across restarts: written to the state directory when it
//! changed (at most once a second, and at shutdown) and restored at start,
//! with wire times mapped back onto the monotonic clock. An entry carries
//! the learner's memory too (the ceiling and a learned concurrency limit),
//! so a restart and a cluster hand-over keep it alike.

use super::files::{LearnedEntry, LearnedFile, StopRecord};
use super::Broker;
use crate::learning::Persisted;
use std::time::Duration;
use tokio::time::Instant;

/// How often learned state is written, at most.
const PERSIST_EVERY: Duration = Duration::from_secs(1);

/// Files a run leaves in the state directory besides `learned.toml`.
const EARLIER_RUN_TRACES: &[&str] = &[
    super::files::ADMIN_FILE,
    super::files::STOP_FILE,
    crate::http::KEY_FILE,
];

impl Broker {
    /// Restores learned state from `dir`. `None` if no earlier run left
    /// state there; else this start is a restart, and `Some` of the run
    /// that wrote the file (`None` inside when unknown or unreadable).
    pub(super) fn restore(&self, dir: &std::path::Path, now: Instant) -> Option<Option<u64>> {
        let file = match LearnedFile::read(dir) {
            Ok(Some(f)) => f,
            Ok(None) => {
                // Every start writes learned.toml before it serves: without
                // it but with another file a run leaves, someone deleted it,
                // and that run's callers may still hold slots.
                let traces: Vec<&str> = EARLIER_RUN_TRACES
                    .iter()
                    .copied()
                    .filter(|name| dir.join(name).exists())
                    .collect();
                if traces.is_empty() {
                    return None;
                }
                tracing::warn!(dir = %dir.display(), found = ?traces,
                    "learned.toml is missing but an earlier run left other files: starting as \
                     after a crash (every slot counts as held until renewals claim it or one \
                     lease TTL passes) with nothing learned restored");
                return Some(None);
            }
            Err(e) => {
                // This run writes the file before it serves: keep the bad
                // one aside for whoever wants to know what happened.
                let kept = keep_aside(dir, super::files::LEARNED_FILE);
                tracing::warn!(error = %e, kept_as = ?kept,
                    "learned state not restored; starting on the config alone");
                return Some(None);
            }
        };
        let run = file.run;
        let restored = self.apply_learned(file, now);
        tracing::info!(dir = %dir.display(), buckets = restored, "learned state restored");
        Some(run)
    }

    /// Starts every tenant after a restart on `dir`, whose `learned.toml`
    /// the run `last_run` wrote: from the leases a graceful stop of that
    /// run recorded, else (a crash, an older record, none) in the restart
    /// learning mode.
    pub(super) fn resume(&self, dir: &std::path::Path, last_run: Option<u64>, now: Instant) {
        let record = match StopRecord::take(dir) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e,
                    "the last stop's record of its leases could not be used: every slot counts \
                     as held until renewals claim it or one lease TTL passes");
                None
            }
        };
        let record = record.filter(|r| {
            let current = Some(r.run) == last_run;
            match last_run {
                _ if current => {}
                Some(_) => tracing::warn!(
                    "a stop record older than the last start (that run did not stop \
                     gracefully): every slot counts as held until renewals claim it or one \
                     lease TTL passes"
                ),
                None => tracing::warn!(
                    "the last stop's record cannot be matched to the run that wrote it \
                     (learned.toml unreadable or missing): every slot counts as held until \
                     renewals claim it or one lease TTL passes"
                ),
            }
            current
        });
        let mut max_left = self.inner.settings.server.max_lease_ttl;
        let mut down = Duration::ZERO;
        if let Some(r) = &record {
            max_left = max_left.max(Duration::from_millis(r.max_lease_ttl_ms));
            // A clock set back since reads as no time down.
            let now_ms = self.inner.clock.unix_ms(now);
            down = Duration::from_millis(now_ms.saturating_sub(r.stopped_at_ms));
        }
        // Counted for one line, not one a tenant (ten thousand tenants).
        let (mut resumed, mut recorded, mut learning) = (0usize, 0usize, 0usize);
        for t in &self.inner.tenants {
            let mut state = t.lock();
            // What the last run's graceful stop recorded of this tenant:
            // its live leases, or `None` while it was still learning.
            match record.as_ref().map(|r| r.tenants.get(state.id())) {
                // A tenant that run did not have (added to the config since;
                // the stop records every tenant it had): no lease of it can
                // be held, so it starts with every slot free.
                Some(None) => {}
                Some(Some(Some(leases)))
                    if state.resume_after_stop(leases, down, max_left, now) =>
                {
                    resumed += 1;
                    recorded += leases.len();
                }
                Some(Some(Some(_))) => learning += 1,
                Some(Some(None)) | None => {
                    state.resume_after_restart(now);
                    learning += 1;
                }
            }
        }
        if resumed > 0 {
            tracing::info!(
                tenants = resumed,
                leases = recorded,
                "started after a graceful stop: token buckets start empty, the leases it \
                 recorded hold their slots and every other slot is free"
            );
        }
        if learning > 0 {
            tracing::info!(
                tenants = learning,
                "started with state: token buckets start empty, slots count as held until \
                 renewals claim them or one lease TTL passes"
            );
        }
    }

    /// A single broker with a state directory: records, once this run
    /// grants no more, every tenant's live leases there for the next start
    /// (see [`StopRecord`]). Call it after the server stopped answering: it
    /// also stops every tenant granting. (A cluster hands its leases to the
    /// next leader instead.)
    pub(crate) fn record_stop(&self) {
        let settings = &self.inner.settings;
        let Some(dir) = settings.server.state_dir.as_ref() else {
            return;
        };
        if settings.cluster.is_some() {
            return;
        }
        let now = Instant::now();
        let mut tenants = std::collections::BTreeMap::new();
        for t in &self.inner.tenants {
            let mut state = t.lock();
            state.set_lead(None, None, now);
            state.drop_waiters();
            tenants.insert(state.id().to_owned(), state.live_leases(now));
        }
        let record = StopRecord {
            run: self.inner.run,
            stopped_at_ms: self.inner.clock.unix_ms(now),
            max_lease_ttl_ms: crate::clock::millis(settings.server.max_lease_ttl),
            tenants,
        };
        let learning: Vec<&str> = record
            .tenants
            .iter()
            .filter(|(_, leases)| leases.is_none())
            .map(|(t, _)| t.as_str())
            .collect();
        match record.write(dir) {
            Ok(()) if learning.is_empty() => {
                tracing::info!("recorded the live leases for the next start")
            }
            Ok(()) => tracing::warn!(tenants = ?learning,
                "recorded the live leases for the next start, except of tenants still learning \
                 after this run's own start (an earlier run's lease may still hold a slot there): \
                 the next start counts their slots as held until renewals claim them or one \
                 lease TTL passes"),
            Err(e) => {
                self.inner
                    .state_failing
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(error = %e,
                    "cannot record the live leases: the next start counts every slot as held for \
                     one lease TTL")
            }
        }
    }

    /// Applies a learned-state file's entries; how many were.
    pub(super) fn apply_learned(&self, file: LearnedFile, now: Instant) -> usize {
        let clock = self.inner.clock;
        // Written "in the future" of this clock (it was set back, or the
        // file comes from a host whose clock runs ahead): its times are
        // read that much earlier, so a freeze is never longer than it was
        // when the file was written.
        let ahead = file
            .saved_at_ms
            .map_or(0, |saved| saved.saturating_sub(clock.unix_ms(now)));
        if ahead > 1_000 {
            tracing::warn!(
                ahead_ms = ahead,
                "learned state was written ahead of this clock: its freezes and resets are read \
                 as that much earlier"
            );
        }
        let back = |ms: u64| ms.saturating_sub(ahead);
        let mut restored = 0;
        for e in file.buckets {
            let Some(&t) = self.inner.by_id.get(&e.tenant) else {
                tracing::info!(tenant = %e.tenant, "learned state of a tenant no longer configured: dropped");
                continue;
            };
            let p = Persisted {
                effective_per_min: e.effective_per_min,
                learned_limit_per_min: e.learned_limit_per_min,
                frozen_until: e
                    .frozen_until_ms
                    .and_then(|ms| clock.instant_of(back(ms), now)),
                cooldown: e
                    .cooldown_until_ms
                    .and_then(|ms| clock.instant_of(back(ms), now))
                    .zip(e.cooldown_per_min),
                upstream: match (
                    e.upstream_remaining,
                    e.upstream_reset_ms,
                    e.upstream_window_ms,
                ) {
                    (Some(r), Some(reset), Some(w)) => clock
                        .instant_of(back(reset), now)
                        .map(|at| (r, at, Duration::from_millis(w))),
                    _ => None,
                },
                ceiling: e.ceiling_per_min.map(|c| (c, e.ceiling_hits.unwrap_or(0))),
                slots: e
                    .max_in_flight
                    .map(|l| (l, e.max_in_flight_hits.unwrap_or(0))),
                refills_continuously: e.refills_continuously,
                limit_window: e.learned_limit_window_ms.map(Duration::from_millis),
            };
            if self.inner.tenants[t]
                .lock()
                .restore(&e.bucket, e.oauth_client.as_deref(), p, now)
            {
                restored += 1;
            } else {
                tracing::warn!(tenant = %e.tenant, bucket = %crate::error::clip(&e.bucket),
                    "learned state of a bucket this tenant no longer has (removed or renamed): \
                     dropped; a renamed bucket starts on its config");
            }
        }
        restored
    }

    /// Writes learned state when it changed, at most once per
    /// [`PERSIST_EVERY`], and once more at shutdown. (The broker writes it
    /// once before serving, too.)
    pub(super) async fn persist(self, dir: std::path::PathBuf) {
        // Consecutive failed writes: the first is logged, then one line a
        // minute while it lasts (a full disk fails every second).
        let mut failures = 0_u64;
        loop {
            // The last write failed: try again even if nothing changed.
            let retry = failures > 0;
            let stop = tokio::select! {
                _ = tokio::time::sleep(PERSIST_EVERY) => false,
                _ = self.inner.shutdown.cancelled() => true,
            };
            let mut dirty = Vec::new();
            for (i, t) in self.inner.tenants.iter().enumerate() {
                if t.lock().take_learned_dirty() {
                    dirty.push(i);
                }
            }
            // The file is how a start after a crash knows it is a restart
            // (and must not grant the slots the callers of this run hold):
            // deleted under a running broker (a temp cleaner, a reset by
            // hand), it is written again at once, not at the next change.
            let vanished = failures == 0 && !dir.join(super::files::LEARNED_FILE).exists();
            let admin_saved = self.save_admin_if_unsaved(&dir).await;
            if !dirty.is_empty() || vanished || retry {
                // One writer of the state files at a time (an operator's
                // clear writes this file too).
                let saving = self.hold_saves().await;
                let file = self.learned_file();
                let to = dir.clone();
                let written = tokio::task::spawn_blocking(move || {
                    let written = file.write(&to);
                    drop(saving);
                    written
                })
                .await;
                let error = match written {
                    Ok(Ok(())) => {
                        tracing::debug!("learned state written");
                        None
                    }
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(e) => Some(e.to_string()),
                };
                let failed = error.is_some();
                self.inner
                    .state_failing
                    .store(failed, std::sync::atomic::Ordering::Relaxed);
                match error {
                    None if failures > 0 => {
                        tracing::info!(failed_writes = failures, "learned state written again");
                        failures = 0;
                    }
                    None if vanished => tracing::warn!(dir = %dir.display(),
                        "learned.toml vanished from the state directory (deleted?): written again"),
                    None => {}
                    Some(e) if stop => tracing::error!(error = %e,
                        "cannot write learned state at shutdown: what was learned since its \
                         last write is lost"),
                    Some(e) => {
                        if failures % 60 == 0 {
                            tracing::error!(error = %e, failed_writes = failures + 1,
                                "cannot write learned state; trying again each second (logged \
                                 once a minute while it fails)");
                        }
                        failures += 1;
                    }
                }
                if failed {
                    for t in dirty {
                        self.still_dirty(t);
                    }
                }
            }
            if !admin_saved && stop {
                tracing::error!(
                    "cannot write the operators' changes at shutdown: the next start runs on the \
                     config without them"
                );
            }
            if stop {
                break;
            }
        }
    }

    /// Whether the last write of learned state failed (a full disk, the
    /// state directory gone or not writable): what is learned meanwhile is
    /// lost at a crash.
    pub(crate) fn state_save_failing(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.inner.state_failing.load(Relaxed) || self.inner.admin_unsaved.load(Relaxed)
    }

    /// Every tenant's learned state, for the state file.
    pub(crate) fn learned_file(&self) -> LearnedFile {
        self.learned_of(None)
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
                    ceiling_per_min: p.ceiling.map(|c| c.0),
                    ceiling_hits: p.ceiling.map(|c| c.1),
                    max_in_flight: p.slots.map(|l| l.0),
                    max_in_flight_hits: p.slots.map(|l| l.1),
                    refills_continuously: p.refills_continuously,
                    learned_limit_window_ms: p.limit_window.map(crate::clock::millis),
                });
            }
        }
        let mut file = LearnedFile::new(entries);
        file.saved_at_ms = Some(clock.unix_ms(now));
        file.run = Some(self.inner.run);
        file
    }
}

/// Renames `dir/name` to `name.unreadable-<unix ms>` (it is about to be
/// overwritten); the new name, if the rename worked.
pub(super) fn keep_aside(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let aside = dir.join(format!("{name}.unreadable-{ms}"));
    // A directory in its place is not moved: writing there keeps failing,
    // and says so.
    if !dir.join(name).is_file() {
        return None;
    }
    std::fs::rename(dir.join(name), &aside).ok().map(|()| aside)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use tokio_util::sync::CancellationToken;

    #[tokio::test]
    async fn a_file_written_ahead_of_this_clock_does_not_lengthen_a_freeze() {
        let settings = Settings::from_toml(
            "[server]\nstate_dir = \"\"\n[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\n\
             name = \"b\"\nroutes = [\"* /**\"]\npermits = 60\nwindow_ms = 60000\n",
        )
        .unwrap();
        let stop = CancellationToken::new();
        let (b, _drivers) = Broker::start(&settings, stop.clone(), None);
        let now = Instant::now();
        let now_ms = b.inner.clock.unix_ms(now);
        let frozen_for = |saved_at_ms: u64| {
            let mut file = LearnedFile::new(vec![LearnedEntry {
                // One minute left when the file was written...
                frozen_until_ms: Some(saved_at_ms + 60_000),
                ..LearnedEntry::bare("t", "b", 42.0)
            }]);
            file.saved_at_ms = Some(saved_at_ms);
            b.apply_learned(file, now);
            let until = b.inner.tenants[0].lock().statuses(now)[0].frozen_until;
            until.map(|u| u - now)
        };
        // ...written by this clock a second ago: 59 s left.
        let left = frozen_for(now_ms - 1_000).unwrap();
        assert!(left <= Duration::from_secs(59), "{left:?}");
        // ...written two minutes "later" (this clock was set back): still a
        // minute at most, not three.
        let left = frozen_for(now_ms + 120_000).unwrap();
        assert!(left <= Duration::from_secs(60), "{left:?}");
        stop.cancel();
    }
}
