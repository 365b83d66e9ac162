//! Held leases: acquires many leases that each hold a concurrency slot and
//! keeps them (the broker's memory per held lease is the point), then
//! releases them all. Acquires go out concurrently over a few connections so
//! that holding 10,000 takes about a second.

use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use quota_broker::pb::ReleaseRequest;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use crate::drive;
use crate::error::Error;

/// Leases held on a broker.
pub(crate) struct Held {
    channels: Vec<Channel>,
    leases: Vec<String>,
    /// Workers that acquired and will release them.
    workers: usize,
}

impl Held {
    /// Acquires `n` leases on `tenant` with `workers` concurrent callers
    /// spread over the connections `channels` (at least one). Fails unless
    /// every Acquire is granted with a slot (a lease that holds no slot would
    /// measure nothing).
    pub(crate) async fn acquire(
        channels: Vec<Channel>,
        tenant: &str,
        n: usize,
        workers: usize,
    ) -> Result<Held, Error> {
        if channels.is_empty() {
            return Err(Error::NotHeld("no connection to acquire on".into()));
        }
        let workers = workers.clamp(1, n.max(1));
        let mut tasks = JoinSet::new();
        for w in 0..workers {
            let mut client = QuotaBrokerClient::new(channels[w % channels.len()].clone());
            let tenant = tenant.to_owned();
            // Worker w takes leases w, w + workers, …
            let count = (n + workers - 1 - w) / workers;
            tasks.spawn(async move {
                let mut leases = Vec::with_capacity(count);
                for _ in 0..count {
                    let granted = drive::acquire(&mut client, &tenant).await?;
                    if granted.lease_ttl_ms == 0 {
                        return Err(Error::NotHeld(format!(
                            "lease {} holds no concurrency slot (buckets {:?})",
                            granted.lease_id, granted.buckets
                        )));
                    }
                    leases.push(granted.lease_id);
                }
                Ok::<_, Error>(leases)
            });
        }
        let mut leases = Vec::with_capacity(n);
        while let Some(joined) = tasks.join_next().await {
            leases.extend(joined??);
        }
        Ok(Held {
            channels,
            leases,
            workers,
        })
    }

    /// How many are held.
    pub(crate) fn len(&self) -> usize {
        self.leases.len()
    }

    /// Releases every lease; returns how many the broker said it released.
    pub(crate) async fn release_all(self) -> Result<usize, Error> {
        let mut tasks = JoinSet::new();
        let per_worker = self.leases.len().div_ceil(self.workers);
        for (w, chunk) in self.leases.chunks(per_worker.max(1)).enumerate() {
            let mut client = QuotaBrokerClient::new(self.channels[w % self.channels.len()].clone());
            let chunk = chunk.to_vec();
            tasks.spawn(async move {
                let mut released = 0;
                for lease_id in chunk {
                    if client
                        .release(ReleaseRequest {
                            lease_id,
                            ..Default::default()
                        })
                        .await?
                        .into_inner()
                        .released
                    {
                        released += 1;
                    }
                }
                Ok::<usize, Error>(released)
            });
        }
        let mut released = 0;
        while let Some(joined) = tasks.join_next().await {
            released += joined??;
        }
        Ok(released)
    }
}
