//! The few etcd v3 calls cluster mode makes, over the generated gRPC client:
//! a lease and its keep-alive stream, prefix reads, a create-if-absent and a
//! compare-and-put / compare-and-delete on a key's value.
//!
//! Written on the generated stubs rather than the `etcd-client` crate, whose
//! build script needs a system `protoc`; `cargo build` stays protoc-free.

use super::proto::etcdserverpb::{
    compare, kv_client::KvClient, lease_client::LeaseClient, request_op, Compare,
    DeleteRangeRequest, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseRevokeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use crate::config::EtcdTls;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Streaming;

/// An etcd call that failed: which, and what etcd or the network said.
#[derive(Debug, thiserror::Error)]
#[error("etcd {call}: {message}")]
pub(crate) struct EtcdError {
    call: &'static str,
    message: String,
}

impl EtcdError {
    pub(crate) fn new(call: &'static str, e: impl std::fmt::Display) -> EtcdError {
        EtcdError {
            call,
            message: e.to_string(),
        }
    }
}

/// A connection to an etcd cluster (any of its endpoints; cheap to clone).
#[derive(Clone)]
pub(crate) struct Etcd {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
    /// Bound on every call (not set on the channel: it would end the
    /// keep-alive stream too).
    timeout: Duration,
}

/// The keep-alive stream of one etcd lease.
pub(crate) struct KeepAlive {
    id: i64,
    timeout: Duration,
    /// When the request already on the stream was sent (etcd answers the
    /// stream's headers only once it has one to answer).
    primed: Option<tokio::time::Instant>,
    requests: mpsc::Sender<LeaseKeepAliveRequest>,
    responses: Streaming<LeaseKeepAliveResponse>,
}

impl KeepAlive {
    /// The lease's id.
    pub(crate) fn id(&self) -> i64 {
        self.id
    }

    /// Refreshes the lease: when the request was sent, and the TTL etcd
    /// gave from when it answered it (`None`: the lease is gone). The lease
    /// lasts at least until the send time plus that TTL.
    pub(crate) async fn refresh(
        &mut self,
    ) -> Result<(tokio::time::Instant, Option<Duration>), EtcdError> {
        let sent = match self.primed.take() {
            Some(at) => at,
            None => {
                let at = tokio::time::Instant::now();
                self.requests
                    .send(LeaseKeepAliveRequest { id: self.id })
                    .await
                    .map_err(|e| EtcdError::new("lease keep-alive", e))?;
                at
            }
        };
        let answer = tokio::time::timeout(self.timeout, self.responses.message())
            .await
            .map_err(|_| EtcdError::new("lease keep-alive", "no answer in time"))?
            .map_err(|e| EtcdError::new("lease keep-alive", e))?
            .ok_or_else(|| EtcdError::new("lease keep-alive", "stream ended"))?;
        let ttl = (answer.ttl > 0).then(|| Duration::from_secs(answer.ttl.unsigned_abs()));
        Ok((sent, ttl))
    }
}

/// A key and its value under a prefix.
pub(crate) struct Entry {
    pub(crate) key: String,
    pub(crate) value: Vec<u8>,
    /// The lease the key is attached to (0: none).
    pub(crate) lease: i64,
}

/// What a failed call's status says, with the causes a transport error
/// carries ("tcp connect error: Connection refused", a certificate etcd
/// refused), which its message alone leaves out.
fn status_text(s: &tonic::Status) -> String {
    with_causes(s.message().to_owned(), std::error::Error::source(s))
}

/// `text`, then each cause in turn that it does not say already.
fn with_causes(mut text: String, mut cause: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(e) = cause {
        let said = e.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = e.source();
    }
    text
}

/// `call` bounded by `timeout`, its error as an [`EtcdError`].
async fn bounded<T>(
    timeout: Duration,
    what: &'static str,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(EtcdError::new(what, status_text(&s))),
        Err(_) => Err(EtcdError::new(what, "no answer in time")),
    }
}

impl Etcd {
    /// Connects lazily to `endpoints` (each `http://host:port`, or
    /// `https://host:port` with `tls`), balancing over them; every call
    /// times out after `timeout`.
    pub(crate) fn connect(
        endpoints: &[String],
        tls: Option<&EtcdTls>,
        timeout: Duration,
    ) -> Result<Etcd, EtcdError> {
        let tls = tls.map(|tls| {
            let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca));
            match &tls.identity {
                Some((cert, key)) => config.identity(Identity::from_pem(cert, key)),
                None => config,
            }
        });
        let endpoints = endpoints
            .iter()
            .map(|e| {
                let endpoint = Endpoint::from_shared(e.clone())
                    .map_err(|err| EtcdError::new("endpoint", format!("{e}: {err}")))?
                    .connect_timeout(timeout);
                match &tls {
                    Some(tls) => endpoint.tls_config(tls.clone()).map_err(|err| {
                        let text = with_causes(err.to_string(), std::error::Error::source(&err));
                        EtcdError::new("endpoint TLS", format!("{e}: {text}"))
                    }),
                    None => Ok(endpoint),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let channel = Channel::balance_list(endpoints.into_iter());
        Ok(Etcd {
            kv: KvClient::new(channel.clone()),
            lease: LeaseClient::new(channel),
            timeout,
        })
    }

    /// A new lease of `ttl` and its keep-alive stream.
    pub(crate) async fn grant(&self, ttl: Duration) -> Result<KeepAlive, EtcdError> {
        let ttl = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let granted = bounded(
            self.timeout,
            "lease grant",
            self.lease
                .clone()
                .lease_grant(LeaseGrantRequest { ttl, id: 0 }),
        )
        .await?;
        self.keep_alive(granted.id).await
    }

    /// A keep-alive stream for lease `id`.
    pub(crate) async fn keep_alive(&self, id: i64) -> Result<KeepAlive, EtcdError> {
        let (requests, rx) = mpsc::channel(4);
        let primed = tokio::time::Instant::now();
        requests
            .send(LeaseKeepAliveRequest { id })
            .await
            .map_err(|e| EtcdError::new("lease keep-alive", e))?;
        let responses = bounded(
            self.timeout,
            "lease keep-alive",
            self.lease
                .clone()
                .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await?;
        Ok(KeepAlive {
            id,
            timeout: self.timeout,
            primed: Some(primed),
            requests,
            responses,
        })
    }

    /// Revokes lease `id` (its keys go with it).
    pub(crate) async fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        bounded(
            self.timeout,
            "lease revoke",
            self.lease.clone().lease_revoke(LeaseRevokeRequest { id }),
        )
        .await?;
        Ok(())
    }

    /// Every key under `prefix`, in key order.
    pub(crate) async fn list(&self, prefix: &str) -> Result<Vec<Entry>, EtcdError> {
        let answer = bounded(
            self.timeout,
            "range",
            self.kv.clone().range(RangeRequest {
                key: prefix.as_bytes().to_vec(),
                range_end: prefix_end(prefix.as_bytes()),
                ..RangeRequest::default()
            }),
        )
        .await?;
        Ok(answer
            .kvs
            .into_iter()
            .map(|kv| Entry {
                key: String::from_utf8_lossy(&kv.key).into_owned(),
                value: kv.value,
                lease: kv.lease,
            })
            .collect())
    }

    /// The value of `key`, if it exists.
    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, EtcdError> {
        Ok(self.one(key, false).await?.map(|kv| kv.value))
    }

    /// The lease `key` is attached to, if the key exists (0: none).
    pub(crate) async fn lease_of(&self, key: &str) -> Result<Option<i64>, EtcdError> {
        Ok(self.one(key, true).await?.map(|kv| kv.lease))
    }

    /// The entry of `key` (without its value when `keys_only`), if it exists.
    async fn one(
        &self,
        key: &str,
        keys_only: bool,
    ) -> Result<Option<super::proto::mvccpb::KeyValue>, EtcdError> {
        let answer = bounded(
            self.timeout,
            "range",
            self.kv.clone().range(RangeRequest {
                key: key.as_bytes().to_vec(),
                keys_only,
                ..RangeRequest::default()
            }),
        )
        .await?;
        Ok(answer.kvs.into_iter().next())
    }

    /// Creates `key` = `value` on `lease` if no one holds it; true if created.
    pub(crate) async fn create(
        &self,
        key: &str,
        value: &[u8],
        lease: i64,
    ) -> Result<bool, EtcdError> {
        self.txn(
            vec![absent(key)],
            vec![put_op(key, value.to_vec(), lease)],
            "create",
        )
        .await
    }

    /// Puts `key` = `value` (no lease) if `guard` is on etcd lease
    /// `owner`; true if put. By lease, not by the value (a node's name): a
    /// second process under the same name holds other leases.
    pub(crate) async fn put_if(
        &self,
        (guard, owner): (&str, i64),
        key: &str,
        value: Vec<u8>,
    ) -> Result<bool, EtcdError> {
        self.txn(
            vec![lease_is(guard, owner)],
            vec![put_op(key, value, 0)],
            "guarded put",
        )
        .await
    }

    /// Puts `key` = `value` and `with`'s key = value, both on `lease`, in
    /// one transaction: if `key` is absent (`was` is `None`) or on etcd
    /// lease `was`. True if put. One transaction, so no one reads the
    /// first key without the second.
    pub(crate) async fn put_pair_if(
        &self,
        (key, value): (&str, Vec<u8>),
        (with, with_value): (&str, Vec<u8>),
        was: Option<i64>,
        lease: i64,
    ) -> Result<bool, EtcdError> {
        let guard = match was {
            Some(was) => lease_is(key, was),
            None => absent(key),
        };
        self.txn(
            vec![guard],
            vec![put_op(key, value, lease), put_op(with, with_value, lease)],
            "guarded pair put",
        )
        .await
    }

    /// Deletes `key` if it is on etcd lease `lease`; true if deleted.
    pub(crate) async fn delete_if(&self, key: &str, lease: i64) -> Result<bool, EtcdError> {
        let delete = RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest {
                    key: key.as_bytes().to_vec(),
                    ..DeleteRangeRequest::default()
                },
            )),
        };
        self.txn(vec![lease_is(key, lease)], vec![delete], "guarded delete")
            .await
    }

    async fn txn(
        &self,
        compare: Vec<Compare>,
        success: Vec<RequestOp>,
        call: &'static str,
    ) -> Result<bool, EtcdError> {
        let answer = bounded(
            self.timeout,
            call,
            self.kv.clone().txn(TxnRequest {
                compare,
                success,
                failure: Vec::new(),
            }),
        )
        .await?;
        Ok(answer.succeeded)
    }
}

fn absent(key: &str) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key: key.as_bytes().to_vec(),
        target_union: Some(compare::TargetUnion::CreateRevision(0)),
        ..Compare::default()
    }
}

fn lease_is(key: &str, lease: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Lease as i32,
        key: key.as_bytes().to_vec(),
        target_union: Some(compare::TargetUnion::Lease(lease)),
        ..Compare::default()
    }
}

fn put_op(key: &str, value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.as_bytes().to_vec(),
            value,
            lease,
            ..PutRequest::default()
        })),
    }
}

/// The end of the key range of `prefix`: the prefix with its last byte
/// below 0xff incremented (etcd's convention).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_range_ends_past_every_key_under_it() {
        assert_eq!(prefix_end(b"/qb/members/"), b"/qb/members0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[tokio::test]
    async fn a_failed_connection_says_why() {
        // A loopback port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let etcd = Etcd::connect(
            &[format!("http://127.0.0.1:{port}")],
            None,
            Duration::from_secs(5),
        )
        .unwrap();
        let Err(e) = etcd.grant(Duration::from_secs(2)).await else {
            panic!("a lease from nowhere")
        };
        assert!(e.to_string().contains("Connection refused"), "{e}");
    }
}
