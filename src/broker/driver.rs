//! One driver task per tenant: it grants waiters the moment capacity frees,
//! expires leases on time and drops idle per-client instances, woken by a
//! `Notify` on every release and enqueue, on a grant or renewal whose lease
//! expires before its next planned run, and by a timer at the next instant
//! anything can change; and it tells Watch streams that something changed.
//! (Acquire, Renew and Release expire due leases themselves first, so none
//! of them counts an expired lease while the driver is on its way.)

use super::Broker;
use std::sync::atomic::Ordering;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The driver tasks of a started broker.
pub(crate) struct Drivers(pub(super) Vec<JoinHandle<()>>);

impl Drivers {
    /// Waits until every driver stopped (after the shutdown token fired).
    pub(crate) async fn join(self) {
        for d in self.0 {
            if let Err(e) = d.await {
                tracing::error!(error = %e, "a tenant driver task failed");
            }
        }
    }
}

impl Broker {
    /// Expires leases and serves waiters of tenant `t` on time, until shutdown.
    pub(super) async fn drive(self, t: usize) {
        let tenant = &self.inner.tenants[t];
        loop {
            let next = tenant.lock().tick(Instant::now());
            self.announce();
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => break,
                _ = tenant.wake.notified() => {}
                _ = sleep => {}
            }
        }
        tenant.lock().drop_waiters();
        self.announce();
    }

    /// Tells Watch streams that this broker began or stopped leading a
    /// tenant (no bucket need have changed).
    pub(super) fn leadership_changed(&self) {
        if self.inner.changes.receiver_count() > 0 {
            self.inner.changes.send_replace(());
        }
    }

    /// Tells Watch streams if any bucket changed since the last call.
    pub(super) fn announce(&self) {
        // Nobody watches: nothing to tell (a stream that starts later begins
        // with a full snapshot). Saves a lock per grant on the hot path.
        if self.inner.changes.receiver_count() == 0 {
            return;
        }
        let v = self.inner.version.load(Ordering::Relaxed);
        if self.inner.announced.swap(v, Ordering::Relaxed) != v {
            self.inner.changes.send_replace(());
        }
    }
}
