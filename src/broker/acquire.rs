//! An Acquire on the broker: the tenant decides under its lock; a queued
//! request then awaits its grant outside the lock, up to its deadline, and
//! leaves the queue however the wait ends (granted, timed out, or the
//! caller gone), handing back a grant that raced with its going.

use super::Broker;
use crate::error::BrokerError;
use crate::tenant::{AcquireArgs, Decision, Denial, Grant};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// The answer to an Acquire.
#[derive(Debug)]
pub(crate) enum AcquireOutcome {
    /// Granted.
    Granted(Grant),
    /// Not granted within the wait.
    Denied(Denial),
}

impl Broker {
    /// Grants `args` on `tenant`, waiting up to `max_wait` (`None`: the
    /// class's default; capped by the server's `max_wait`) for capacity.
    pub(crate) async fn acquire(
        &self,
        tenant: &str,
        args: AcquireArgs,
        max_wait: Option<Duration>,
    ) -> Result<AcquireOutcome, BrokerError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(BrokerError::ShuttingDown);
        }
        let t = self.tenant_index(tenant)?;
        let tenant = &self.inner.tenants[t];
        let metrics = self.inner.metrics.as_deref();
        let class = metrics.map_or(0, |m| m.class(&args.class));
        let started = Instant::now();
        let (decision, wake) = {
            let mut state = tenant.lock();
            let decision = state.acquire(&args, max_wait, started)?;
            (decision, state.take_wake_driver())
        };
        if wake {
            // A lease that expires before the driver's next run.
            tenant.wake.notify_one();
        }
        let queued = match decision {
            Decision::Granted(g) => {
                self.announce();
                if let Some(m) = metrics {
                    m.granted(t, class);
                }
                return Ok(AcquireOutcome::Granted(g));
            }
            Decision::Denied(d) => {
                if let Some(m) = metrics {
                    m.denied(t, class, &d.reason);
                }
                return Ok(AcquireOutcome::Denied(d));
            }
            Decision::Queued(q) => q,
        };
        tenant.wake.notify_one();
        self.announce();
        let deadline = queued.deadline;
        let mut wait = Waiting {
            broker: self,
            tenant: t,
            waiter: queued.waiter,
            rx: queued.reply,
            settled: false,
        };
        let outcome = tokio::select! {
            // An answer already there wins over the deadline.
            biased;
            r = &mut wait.rx => {
                wait.settled = true;
                match r {
                    Ok(Ok(g)) => AcquireOutcome::Granted(g),
                    Ok(Err(d)) => AcquireOutcome::Denied(d),
                    Err(_) => return Err(self.waiters_dropped(t)),
                }
            }
            _ = tokio::time::sleep_until(deadline) => wait.give_up()?,
        };
        if let Some(m) = metrics {
            m.waited(t, class, started.elapsed());
            match &outcome {
                AcquireOutcome::Granted(_) => m.granted(t, class),
                AcquireOutcome::Denied(d) => m.denied(t, class, &d.reason),
            }
        }
        Ok(outcome)
    }

    /// Why tenant `t`'s waiters were dropped: it moved to another broker
    /// (cluster mode), or this one stops.
    fn waiters_dropped(&self, t: usize) -> BrokerError {
        self.leading(t).err().unwrap_or(BrokerError::ShuttingDown)
    }
}

/// A request waiting in a tenant's queue. If the caller goes away (the RPC
/// is cancelled and this is dropped), the waiter leaves the queue, and a
/// grant that raced with the cancellation is handed back.
struct Waiting<'a> {
    broker: &'a Broker,
    tenant: usize,
    waiter: u64,
    rx: oneshot::Receiver<Result<Grant, Denial>>,
    settled: bool,
}

impl Waiting<'_> {
    /// The wait is over: leave the queue and say why, unless a grant came in
    /// the meantime, which the caller then gets. If every waiter was dropped
    /// just before (the broker stopping, the tenant moving away), the answer
    /// is the error that dropping them gives.
    pub(super) fn give_up(&mut self) -> Result<AcquireOutcome, BrokerError> {
        self.settled = true;
        let tenant = &self.broker.inner.tenants[self.tenant];
        let mut state = tenant.lock();
        let outcome = match state.withdraw(self.waiter, Instant::now()) {
            Some(denial) => Some(AcquireOutcome::Denied(denial)),
            // Not in the queue: the driver granted it (under this lock, so
            // the grant is already in the channel), or every waiter was
            // dropped.
            None => match self.rx.try_recv() {
                Ok(Ok(g)) => Some(AcquireOutcome::Granted(g)),
                Ok(Err(d)) => Some(AcquireOutcome::Denied(d)),
                Err(_) => None,
            },
        };
        drop(state);
        tenant.wake.notify_one();
        self.broker.announce();
        outcome.ok_or_else(|| self.broker.waiters_dropped(self.tenant))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let tenant = &self.broker.inner.tenants[self.tenant];
        let mut state = tenant.lock();
        if state.withdraw(self.waiter, Instant::now()).is_none() {
            if let Ok(Ok(g)) = self.rx.try_recv() {
                state.undo(&g);
            }
        }
        drop(state);
        tenant.wake.notify_one();
        self.broker.announce();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use tokio_util::sync::CancellationToken;

    /// A wait that runs out just as the broker drops its waiters (it stops,
    /// or the tenant moves) is answered with that, not "not granted": the
    /// caller retries elsewhere or later instead of reading a denial.
    #[tokio::test]
    async fn a_wait_that_ends_as_the_waiters_are_dropped_says_why() {
        let settings = Settings::from_toml(
            "[server]\nstate_dir = \"\"\n[[tenants]]\nid = \"t\"\n\
             [[tenants.buckets]]\nname = \"slots\"\nroutes = [\"* /**\"]\nmax_in_flight = 1\n",
        )
        .unwrap();
        let (broker, _drivers) = Broker::start(&settings, CancellationToken::new(), None);
        let call = crate::tenant::tests::args("POST", "/x", 1);
        let now = Instant::now();
        let queued = {
            let mut state = broker.inner.tenants[0].lock();
            let Ok(Decision::Granted(_)) = state.acquire(&call, Some(Duration::ZERO), now) else {
                panic!("the free slot was not granted")
            };
            let Ok(Decision::Queued(q)) = state.acquire(&call, Some(Duration::from_secs(5)), now)
            else {
                panic!("the second call did not queue")
            };
            q
        };
        let mut wait = Waiting {
            broker: &broker,
            tenant: 0,
            waiter: queued.waiter,
            rx: queued.reply,
            settled: false,
        };
        broker.inner.tenants[0].lock().drop_waiters();
        match wait.give_up() {
            Err(BrokerError::ShuttingDown) => {}
            other => panic!("{other:?}"),
        }
    }
}
