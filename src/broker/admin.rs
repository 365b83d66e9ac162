//! Operators' changes on the broker: classes, bucket limits, pause and
//! resume. Each is applied under the tenant's lock, logged with who made it,
//! wakes the tenant's waiters, and is saved (every change so far, as one
//! file) to the state directory, from which it is restored at start.

use super::files::{AdminBucket, AdminClass, AdminFile};
use super::{Broker, TenantBucketStatus};
use crate::clock::millis;
use crate::config::ClassSettings;
use crate::error::{clip, BrokerError};
use crate::tenant::LimitChange;
use std::collections::BTreeSet;
use std::sync::PoisonError;
use std::time::Duration;
use tokio::time::Instant;

/// What an operator changed, so only that is saved and restored.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum AdminKey {
    Class(String),
    Bucket(String),
}

impl Broker {
    /// Creates or changes a priority class of `tenant`; durable.
    pub(crate) async fn set_class(
        &self,
        tenant: &str,
        class: ClassSettings,
        who: &str,
    ) -> Result<ClassSettings, BrokerError> {
        let t = self.tenant_index(tenant)?;
        self.leading(t)?;
        self.inner.tenants[t].lock().set_class(class.clone())?;
        tracing::info!(%tenant, class = %class.name, order = class.order, weight = class.weight,
            reserve = class.reserve, default_max_wait_ms = millis(class.default_max_wait),
            by = %who, "priority class set");
        self.changed_by_admin(t, AdminKey::Class(class.name.clone()))
            .await?;
        Ok(class)
    }

    /// Puts a class of `tenant` back to the config's, or removes it when
    /// the config has none of that name; durable (no longer re-applied at
    /// start). Returns the class now in force (`None`: removed).
    pub(crate) async fn reset_class(
        &self,
        tenant: &str,
        name: &str,
        who: &str,
    ) -> Result<Option<ClassSettings>, BrokerError> {
        let t = self.tenant_index(tenant)?;
        self.leading(t)?;
        let configured = self.inner.settings.classes.iter().find(|c| c.name == name);
        let class = self.inner.tenants[t].lock().reset_class(name, configured)?;
        match &class {
            Some(_) => tracing::info!(%tenant, class = %name, by = %who,
                "priority class reset to the config's"),
            None => tracing::info!(%tenant, class = %name, by = %who,
                "priority class removed (Acquires waiting in it are still served)"),
        }
        self.changed_by_admin_as(t, AdminKey::Class(name.to_owned()), false)
            .await?;
        Ok(class)
    }

    /// `tenant`'s classes as now in force, served first to last, and its
    /// default class.
    pub(crate) fn classes(
        &self,
        tenant: &str,
    ) -> Result<(Vec<ClassSettings>, String), BrokerError> {
        let t = self.tenant_index(tenant)?;
        self.leading(t)?;
        let state = self.inner.tenants[t].lock();
        let mut classes: Vec<ClassSettings> = state.classes().into_iter().cloned().collect();
        classes.sort_by(|a, b| (a.order, &a.name).cmp(&(b.order, &b.name)));
        Ok((classes, state.default_class().to_owned()))
    }

    /// Changes a bucket's limits; durable; returns its instances' status.
    pub(crate) async fn set_bucket_limit(
        &self,
        tenant: &str,
        bucket: &str,
        change: LimitChange,
        who: &str,
    ) -> Result<Vec<TenantBucketStatus>, BrokerError> {
        check_change(&change)?;
        let t = self.tenant_index(tenant)?;
        self.leading(t)?;
        {
            let mut state = self.inner.tenants[t].lock();
            let b = state.set_bucket_limit(bucket, change, Instant::now())?;
            tracing::info!(%tenant, %bucket, rate = ?b.rate, max_in_flight = ?b.max_in_flight,
                by = %who, "bucket limit set");
        }
        self.changed_by_admin(t, AdminKey::Bucket(bucket.to_owned()))
            .await?;
        self.bucket_status(t, bucket)
    }

    /// Puts a bucket's limits back to the config file's, dropping what
    /// operators set; durable (no longer re-applied at start); returns its
    /// instances' status.
    pub(crate) async fn reset_bucket_limit(
        &self,
        tenant: &str,
        bucket: &str,
        who: &str,
    ) -> Result<Vec<TenantBucketStatus>, BrokerError> {
        let t = self.tenant_index(tenant)?;
        self.leading(t)?;
        {
            let configured = self.inner.settings.tenants[t]
                .buckets
                .iter()
                .find(|c| c.name == bucket);
            let mut state = self.inner.tenants[t].lock();
            let b = state.reset_bucket_limit(bucket, configured, Instant::now())?;
            tracing::info!(%tenant, %bucket, rate = ?b.rate, max_in_flight = ?b.max_in_flight,
                by = %who, "bucket limit reset to the config's");
        }
        self.changed_by_admin(t, AdminKey::Bucket(bucket.to_owned()))
            .await?;
        self.bucket_status(t, bucket)
    }

    /// Pauses (`Some(reason)`) or resumes (`None`) a bucket; durable.
    pub(crate) async fn set_paused(
        &self,
        tenant: &str,
        bucket: &str,
        reason: Option<String>,
        who: &str,
    ) -> Result<Vec<TenantBucketStatus>, BrokerError> {
        let t = self.tenant_index(tenant)?;
        self.leading(t)?;
        let paused = reason.is_some();
        self.inner.tenants[t]
            .lock()
            .set_paused(bucket, reason.clone(), Instant::now())?;
        if paused {
            tracing::info!(%tenant, %bucket, reason = reason.as_deref().unwrap_or(""), by = %who, "bucket paused");
        } else {
            tracing::info!(%tenant, %bucket, by = %who, "bucket resumed");
        }
        self.changed_by_admin(t, AdminKey::Bucket(bucket.to_owned()))
            .await?;
        self.bucket_status(t, bucket)
    }

    /// Forgets what was learned about a bucket (one OAuth client's instance
    /// or all); durable: saved (the learned-state file, or the cluster's
    /// snapshot) before it answers, so a crash right after cannot bring a
    /// freeze back.
    pub(crate) async fn clear_learned(
        &self,
        tenant: &str,
        bucket: &str,
        oauth_client: Option<&str>,
        who: &str,
    ) -> Result<Vec<TenantBucketStatus>, BrokerError> {
        let t = self.tenant_index(tenant)?;
        self.leading(t)?;
        let now = Instant::now();
        let statuses = {
            let mut state = self.inner.tenants[t].lock();
            state.clear_learned(bucket, oauth_client, now)?
        };
        tracing::info!(%tenant, %bucket, oauth_client = oauth_client.unwrap_or("(all)"),
            instances = statuses.len(), by = %who, "learned state cleared");
        self.inner.tenants[t].wake.notify_one();
        self.announce();
        self.save_learned_now(t).await?;
        Ok(statuses
            .into_iter()
            .map(|status| TenantBucketStatus {
                tenant: tenant.to_owned(),
                at: now,
                status,
            })
            .collect())
    }

    /// Saves tenant `t`'s learned state now (after an operator cleared it).
    async fn save_learned_now(&self, t: usize) -> Result<(), BrokerError> {
        // In the order of the other saves (operators' changes, the cluster
        // task's snapshots, the learned-state writer).
        let saving = self.hold_saves().await;
        if self.inner.cluster.get().is_some() {
            let saved = self.save_to_cluster(t).await;
            drop(saving);
            return saved;
        }
        let Some(dir) = self.inner.server.state_dir.clone() else {
            return Ok(());
        };
        let file = self.learned_file();
        let saved = write_state(move || file.write(&dir), saving, "learned state cleared").await;
        if saved.is_err() {
            self.still_dirty(t);
        }
        saved
    }

    /// After an admin change: wake the tenant's waiters, tell Watch, and
    /// write every admin change so far to the state directory.
    pub(super) async fn changed_by_admin(
        &self,
        t: usize,
        key: AdminKey,
    ) -> Result<(), BrokerError> {
        self.changed_by_admin_as(t, key, true).await
    }

    /// [`Self::changed_by_admin`], where `keep` false drops what `key`
    /// names from the changes saved (it is back to the config's).
    async fn changed_by_admin_as(
        &self,
        t: usize,
        key: AdminKey,
        keep: bool,
    ) -> Result<(), BrokerError> {
        self.inner.tenants[t].wake.notify_one();
        self.announce();
        // Held until the write ends, even if this caller goes away.
        let saving = self.hold_saves().await;
        let file = {
            let mut changed = self
                .inner
                .admin_changes
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if keep {
                changed.insert((t, key));
            } else {
                changed.remove(&(t, key));
            }
            self.admin_file(&changed)
        };
        if self.inner.cluster.get().is_some() {
            return self.save_to_cluster(t).await;
        }
        let Some(dir) = self.inner.server.state_dir.clone() else {
            return Ok(());
        };
        let saved = write_state(move || file.write(&dir), saving, "admin change applied").await;
        // Not saved: the learned-state writer tries again each second, so
        // a change in force is not lost at the next restart once the disk
        // has room again.
        self.inner
            .admin_unsaved
            .store(saved.is_err(), std::sync::atomic::Ordering::Relaxed);
        saved
    }

    /// Writes `admin.toml` again if an operator's change in force is not in
    /// it (a failed write, the file deleted); whether it is saved now.
    pub(super) async fn save_admin_if_unsaved(&self, dir: &std::path::Path) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let saving = self.hold_saves().await;
        let file = {
            let changed = self
                .inner
                .admin_changes
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if changed.is_empty() {
                return true;
            }
            let vanished = !dir.join(super::files::ADMIN_FILE).exists();
            if !self.inner.admin_unsaved.load(Relaxed) && !vanished {
                return true;
            }
            if vanished && !self.inner.admin_unsaved.load(Relaxed) {
                tracing::warn!(dir = %dir.display(),
                    "admin.toml vanished from the state directory (deleted?): writing the \
                     operators' changes in force again");
            }
            self.admin_file(&changed)
        };
        let dir = dir.to_path_buf();
        let written = tokio::task::spawn_blocking(move || {
            let written = file.write(&dir);
            drop(saving);
            written
        })
        .await;
        let saved = matches!(written, Ok(Ok(())));
        if saved && self.inner.admin_unsaved.swap(false, Relaxed) {
            tracing::info!("operators' changes saved to the state directory after all");
        }
        self.inner.admin_unsaved.store(!saved, Relaxed);
        saved
    }

    pub(super) fn admin_file(&self, changed: &BTreeSet<(usize, AdminKey)>) -> AdminFile {
        let mut classes = Vec::new();
        let mut buckets = Vec::new();
        for (t, key) in changed {
            let state = self.inner.tenants[*t].lock();
            let tenant = state.id().to_owned();
            match key {
                AdminKey::Class(name) => {
                    if let Some(c) = state.classes().into_iter().find(|c| &c.name == name) {
                        classes.push(AdminClass {
                            tenant,
                            class: c.clone(),
                        });
                    }
                }
                AdminKey::Bucket(name) => {
                    if let Some((b, paused)) = state.bucket_admin_view(name) {
                        // Only what differs from the config: a pause pins no
                        // limit, and a later edit of the config's other
                        // fields takes effect at the next start.
                        let configured = self.inner.settings.tenants[*t]
                            .buckets
                            .iter()
                            .find(|c| &c.name == name);
                        let rate = configured.and_then(|c| c.rate);
                        let differs = |now: Option<u64>, then: Option<u64>| {
                            now.filter(|_| configured.is_none() || now != then)
                        };
                        let narrow = |v: Option<u64>| v.and_then(|v| u32::try_from(v).ok());
                        let permits = narrow(differs(
                            b.rate.map(|r| u64::from(r.permits.get())),
                            rate.map(|r| u64::from(r.permits.get())),
                        ));
                        // The burst where it differs from the one the saved
                        // permits give when replayed over the config (a
                        // burst as large as the config's permits follows
                        // them): a burst the operator kept beside new
                        // permits is saved, one they never gave follows
                        // later edits of the config.
                        let replayed_burst = match (rate, permits) {
                            (Some(r), Some(p)) => Some(r.burst_with_permits(p)),
                            (Some(r), None) => Some(r.burst.get()),
                            (None, p) => p,
                        };
                        let burst = narrow(differs(
                            b.rate.map(|r| u64::from(r.burst.get())),
                            replayed_burst.map(u64::from),
                        ));
                        let change = AdminBucket {
                            tenant,
                            bucket: name.clone(),
                            permits,
                            window_ms: differs(
                                b.rate.map(|r| millis(r.window)),
                                rate.map(|r| millis(r.window)),
                            ),
                            burst,
                            max_in_flight: narrow(differs(
                                b.max_in_flight.map(|m| u64::from(m.get())),
                                configured
                                    .and_then(|c| c.max_in_flight)
                                    .map(|m| u64::from(m.get())),
                            )),
                            paused: paused.map(str::to_owned),
                        };
                        // Back to the config (a pause resumed, a limit set
                        // back): nothing to save or re-apply.
                        let changed = change.permits.is_some()
                            || change.window_ms.is_some()
                            || change.burst.is_some()
                            || change.max_in_flight.is_some()
                            || change.paused.is_some();
                        if changed {
                            buckets.push(change);
                        }
                    }
                }
            }
        }
        AdminFile::new(classes, buckets)
    }

    /// Re-applies operators' changes saved in `dir`.
    pub(super) fn restore_admin(&self, dir: &std::path::Path, now: Instant) {
        let file = match AdminFile::read(dir) {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                // Kept for whoever wants to know what was in it; the next
                // change writes a new file.
                let kept = super::persist::keep_aside(dir, super::files::ADMIN_FILE);
                tracing::warn!(error = %e, kept_as = ?kept,
                    "operators' changes not restored; starting on the config alone");
                return;
            }
        };
        let changes = self.apply_admin(file, now);
        tracing::info!(dir = %dir.display(), changes, "operators' changes restored");
    }

    /// Re-applies the changes in an admin file; how many of them applied.
    pub(super) fn apply_admin(&self, file: AdminFile, now: Instant) -> usize {
        let mut changed = self
            .inner
            .admin_changes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Those of `file` (a tenant's snapshot names that tenant's only;
        // `changed` holds every tenant's).
        let mut applied = 0;
        for c in file.classes {
            let Some(&t) = self.inner.by_id.get(&c.tenant) else {
                tracing::warn!(tenant = %clip(&c.tenant), class = %clip(&c.class.name),
                    "an operator's class change for a tenant no longer configured: dropped");
                continue;
            };

            match self.inner.tenants[t].lock().set_class(c.class.clone()) {
                Ok(()) => {
                    changed.insert((t, AdminKey::Class(c.class.name)));
                    applied += 1;
                }
                Err(e) => {
                    tracing::warn!(tenant = %c.tenant, error = %e, "saved class not restored")
                }
            }
        }
        for b in file.buckets {
            let Some(&t) = self.inner.by_id.get(&b.tenant) else {
                tracing::warn!(tenant = %clip(&b.tenant), bucket = %clip(&b.bucket),
                    "an operator's bucket change for a tenant no longer configured: dropped");
                continue;
            };
            let mut state = self.inner.tenants[t].lock();
            let change = LimitChange {
                permits: b.permits,
                window: b.window_ms.map(Duration::from_millis),
                burst: b.burst,
                max_in_flight: b.max_in_flight,
            };
            let restored = check_change(&change)
                .and_then(|()| state.set_bucket_limit(&b.bucket, change, now))
                .map(|_| ())
                .and_then(|()| state.set_paused(&b.bucket, b.paused.clone(), now));
            match restored {
                Ok(()) => {
                    tracing::info!(tenant = %b.tenant, bucket = %b.bucket, permits = ?b.permits,
                        window_ms = ?b.window_ms, burst = ?b.burst, max_in_flight = ?b.max_in_flight,
                        paused = ?b.paused,
                        "an operator's change is re-applied over the config (the fields set)");
                    changed.insert((t, AdminKey::Bucket(b.bucket)));
                    applied += 1;
                }
                Err(e) => {
                    tracing::warn!(tenant = %b.tenant, error = %e, "saved bucket change not restored")
                }
            }
        }
        applied
    }
}

/// Checks what of an operator's limit change the tenant leaves to its
/// callers against the config's bounds: the slot limit (the rate is
/// checked by the tenant, with the config's `check_rate`).
fn check_change(change: &LimitChange) -> Result<(), BrokerError> {
    if let Some(m) = change.max_in_flight {
        crate::config::check_max_in_flight(m).map_err(|problem| {
            BrokerError::invalid(
                "max_in_flight",
                format!("{problem}, as in the config (0 leaves it as it is)"),
            )
        })?;
    }
    Ok(())
}

/// Runs `write` (a state file's atomic write) off the async threads,
/// holding `saving` until it ends, and answers the operator's change: saved,
/// or applied but not saved (`what` names the change in the log).
async fn write_state(
    write: impl FnOnce() -> Result<(), super::files::StateError> + Send + 'static,
    saving: tokio::sync::OwnedMutexGuard<()>,
    what: &'static str,
) -> Result<(), BrokerError> {
    let written = tokio::task::spawn_blocking(move || {
        let written = write();
        drop(saving);
        written
    })
    .await;
    let error = match written {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => e.to_string(),
        Err(e) => format!("the writer failed: {e}"),
    };
    tracing::error!(error = %error, "{what} but not saved");
    Err(BrokerError::Internal(
        "the change is applied but could not be saved",
    ))
}
