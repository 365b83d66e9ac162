//! The few etcd v3 calls cluster mode makes, over the generated gRPC client:
//! a lease and its keep-alive stream, prefix reads, a create-if-absent and a
//! compare-and-put / compare-and-delete on a key's value.
//!
//! Written on the generated stubs rather than the `etcd-client` crate, whose
//! build script needs a system `protoc`; `cargo build` stays protoc-free.

use super::connect::Connector;
use super::proto::etcdserverpb::{
    compare, kv_client::KvClient, lease_client::LeaseClient, request_op, Compare,
    DeleteRangeRequest, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseRevokeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use crate::config::EtcdTls;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
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

/// A connection to an etcd cluster (cheap to clone).
///
/// One channel per endpoint, and every call goes to one endpoint, the
/// *pinned* one: the last that answered, as etcd's own clients do. A call
/// that cannot connect there (the member is down: refused, or no
/// connection, TLS and HTTP/2 start included, within half the call's
/// bound: a frozen member, see [`Connector`]) is sent to the next endpoint,
/// all within
/// the one bound on the call, so one member down costs a failed connect and
/// nothing else, and no call lasts longer than with a single endpoint. A
/// call that reached a member is never sent again elsewhere (it may have
/// been applied); a member that answered it with an error or not in time
/// loses the pin, so the next call tries the next endpoint.
///
/// Not `Channel::balance_list`: its balancer keeps picking an endpoint
/// whose connection was refused (the lazy connection counts as ready and
/// fails the call it is given), so with one member of three down about a
/// call in three failed, and most cluster ticks with them.
#[derive(Clone)]
pub(crate) struct Etcd {
    members: Arc<[Member]>,
    /// The index in `members` calls go to first. Atomic: every clone of the
    /// handle (the cluster task, the store's saves) moves one shared pin,
    /// with no lock held across a call.
    pinned: Arc<AtomicUsize>,
    /// Bound on every call, failing over included (not set on the channel:
    /// it would end the keep-alive stream too).
    timeout: Duration,
}

/// The clients of one etcd endpoint.
struct Member {
    url: String,
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
}

/// The keep-alive stream of one etcd lease.
pub(crate) struct KeepAlive {
    id: i64,
    /// The endpoint (index) the stream is open on.
    member: usize,
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

/// The call never reached the server: no connection could be made (a
/// member down, a port closed, an address unreachable, a member frozen),
/// so it was not applied and may be sent to another endpoint.
fn unreached(s: &tonic::Status) -> bool {
    let mut cause = std::error::Error::source(s);
    while let Some(e) = cause {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

impl Etcd {
    /// Connects lazily to `endpoints` (each `http://host:port`, or
    /// `https://host:port` with `tls`), one channel each, calls pinned to
    /// one and failing over to the next (see [`Etcd`]); every call times
    /// out after `timeout`.
    pub(crate) fn connect(
        endpoints: &[String],
        tls: Option<&EtcdTls>,
        timeout: Duration,
    ) -> Result<Etcd, EtcdError> {
        let tls = tls
            .map(EtcdTls::client_config)
            .transpose()
            .map_err(|e| EtcdError::new("endpoint TLS", e))?;
        // Half the call's bound for a connection (TCP, TLS and HTTP/2's
        // start): a member that cannot make one (down, unreachable, or
        // frozen) still leaves time to try the next endpoint.
        let connector = Connector::new(tls, timeout / 2);
        let endpoints = endpoints
            .iter()
            .map(|e| {
                let endpoint = Endpoint::from_shared(e.clone())
                    .map_err(|err| EtcdError::new("endpoint", format!("{e}: {err}")))?;
                // TLS is the connector's: tonic is given the URL as
                // `http://` (it refuses `https://` without TLS of its own)
                // and the real one as the requests' origin.
                let endpoint = match endpoint.uri().scheme_str() {
                    Some("https") => {
                        let authority = endpoint.uri().authority().map(|a| a.as_str());
                        Endpoint::from_shared(format!("http://{}", authority.unwrap_or_default()))
                            .map_err(|err| EtcdError::new("endpoint", format!("{e}: {err}")))?
                            .origin(endpoint.uri().clone())
                    }
                    _ => endpoint,
                };
                // A member that stops answering on a connection already
                // made (frozen after it was made) is noticed by its
                // unanswered pings, idle or not: the connection closes,
                // and the next call to the member needs a new one, which
                // the connector bounds. A call open on it fails as it
                // would after the call's bound.
                let channel = endpoint
                    .http2_keep_alive_interval(timeout)
                    .keep_alive_timeout(timeout)
                    .keep_alive_while_idle(true)
                    .connect_with_connector_lazy(connector.clone());
                Ok(Member {
                    url: e.clone(),
                    kv: KvClient::new(channel.clone()),
                    lease: LeaseClient::new(channel),
                })
            })
            .collect::<Result<Vec<_>, EtcdError>>()?;
        if endpoints.is_empty() {
            return Err(EtcdError::new("endpoint", "no etcd endpoint configured"));
        }
        Ok(Etcd {
            members: endpoints.into(),
            pinned: Arc::new(AtomicUsize::new(0)),
            timeout,
        })
    }

    /// `call` on the pinned endpoint, or on the next ones while none can
    /// be connected to, all bounded by the call timeout; the endpoint that
    /// answered stays pinned.
    async fn call<T, F, Fut>(&self, what: &'static str, call: F) -> Result<T, EtcdError>
    where
        F: FnMut(&Member) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        Ok(self.call_at(what, call).await?.1)
    }

    /// [`Etcd::call`], with the index of the endpoint that answered.
    async fn call_at<T, F, Fut>(
        &self,
        what: &'static str,
        mut call: F,
    ) -> Result<(usize, T), EtcdError>
    where
        F: FnMut(&Member) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let count = self.members.len();
        let first = self.pinned.load(Ordering::Acquire) % count;
        let mut refused = Vec::new();
        for at in (0..count).map(|i| (first + i) % count) {
            let member = &self.members[at];
            match tokio::time::timeout_at(deadline, call(member)).await {
                Ok(Ok(answer)) => {
                    self.pinned.store(at, Ordering::Release);
                    return Ok((at, answer));
                }
                Ok(Err(s)) if unreached(&s) => {
                    refused.push(format!("{}: {}", member.url, status_text(&s)));
                }
                Ok(Err(s)) => {
                    self.unpin(at);
                    let text = format!("{}: {}", member.url, status_text(&s));
                    return Err(EtcdError::new(what, text));
                }
                Err(_) => {
                    self.unpin(at);
                    let mut text = format!("no answer in time from {}", member.url);
                    if !refused.is_empty() {
                        text = format!("{} ({})", text, refused.join("; "));
                    }
                    return Err(EtcdError::new(what, text));
                }
            }
        }
        Err(EtcdError::new(what, refused.join("; ")))
    }

    /// Moves the pin off endpoint `at` (if still there): the next call
    /// tries the next endpoint first.
    fn unpin(&self, at: usize) {
        let next = (at + 1) % self.members.len();
        let _ = self
            .pinned
            .compare_exchange(at, next, Ordering::AcqRel, Ordering::Acquire);
    }

    /// A new lease of `ttl`: its id (see [`Etcd::keep_alive`]).
    pub(crate) async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let ttl = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let granted = self
            .call("lease grant", |m| {
                let mut lease = m.lease.clone();
                async move {
                    lease
                        .lease_grant(LeaseGrantRequest { ttl, id: 0 })
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await?;
        Ok(granted.id)
    }

    /// A keep-alive stream for lease `id`.
    pub(crate) async fn keep_alive(&self, id: i64) -> Result<KeepAlive, EtcdError> {
        // Before any attempt: the lease lasts at least TTL from when the
        // request was sent, so an earlier instant only errs on the safe side.
        let primed = tokio::time::Instant::now();
        let (member, (requests, responses)) = self
            .call_at("lease keep-alive", |m| {
                let (requests, rx) = mpsc::channel(4);
                let mut lease = m.lease.clone();
                async move {
                    // A new channel with its receiver alive has room.
                    requests
                        .try_send(LeaseKeepAliveRequest { id })
                        .map_err(|_| tonic::Status::cancelled("keep-alive request not queued"))?;
                    let responses = lease
                        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await?
                        .into_inner();
                    Ok((requests, responses))
                }
            })
            .await?;
        Ok(KeepAlive {
            id,
            member,
            timeout: self.timeout,
            primed: Some(primed),
            requests,
            responses,
        })
    }

    /// A new keep-alive stream for `failed`'s lease after its stream
    /// failed, first on another endpoint than the one it was open on.
    pub(crate) async fn reopen(&self, failed: &KeepAlive) -> Result<KeepAlive, EtcdError> {
        self.unpin(failed.member);
        self.keep_alive(failed.id).await
    }

    /// Revokes lease `id` (its keys go with it).
    pub(crate) async fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.call("lease revoke", |m| {
            let mut lease = m.lease.clone();
            async move {
                lease
                    .lease_revoke(LeaseRevokeRequest { id })
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .await?;
        Ok(())
    }

    /// Every key under `prefix`, in key order.
    pub(crate) async fn list(&self, prefix: &str) -> Result<Vec<Entry>, EtcdError> {
        let request = RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
            ..RangeRequest::default()
        };
        let answer = self.range(request).await?;
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
        let request = RangeRequest {
            key: key.as_bytes().to_vec(),
            keys_only,
            ..RangeRequest::default()
        };
        Ok(self.range(request).await?.kvs.into_iter().next())
    }

    async fn range(
        &self,
        request: RangeRequest,
    ) -> Result<super::proto::etcdserverpb::RangeResponse, EtcdError> {
        self.call("range", |m| {
            let (mut kv, request) = (m.kv.clone(), request.clone());
            async move { kv.range(request).await.map(tonic::Response::into_inner) }
        })
        .await
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
        let request = TxnRequest {
            compare,
            success,
            failure: Vec::new(),
        };
        let answer = self
            .call(call, |m| {
                let (mut kv, request) = (m.kv.clone(), request.clone());
                async move { kv.txn(request).await.map(tonic::Response::into_inner) }
            })
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

    #[tokio::test]
    async fn a_refused_endpoint_is_passed_over_within_the_call_bound() {
        let ports: Vec<u16> = (0..2)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .map(|a| a.port())
                    .unwrap()
            })
            .collect();
        let urls: Vec<String> = ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect();
        let etcd = Etcd::connect(&urls, None, Duration::from_secs(5)).unwrap();
        let started = tokio::time::Instant::now();
        let Err(e) = etcd.list("/x/").await else {
            panic!("a range from nowhere")
        };
        // Both tried, each refused at once: no wait for the bound.
        assert!(started.elapsed() < Duration::from_secs(2), "{e}");
        for url in &urls {
            assert!(e.to_string().contains(url.as_str()), "{e}");
        }
        assert_eq!(
            e.to_string().matches("Connection refused").count(),
            2,
            "{e}"
        );
    }

    /// A member that accepts TCP connections and never speaks (a frozen
    /// process: its kernel still completes handshakes) is passed over as
    /// one that refuses, within the call's bound, over TLS too; before, the
    /// call waited there for the whole bound and failed.
    #[tokio::test]
    async fn a_member_that_accepts_and_never_speaks_is_passed_over_within_the_call_bound() {
        // Listening, never accepting: connections complete in its backlog.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let silent_port = silent.local_addr().unwrap().port();
        let refused = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let pki = testpki::Pki::new("etcd-silent");
        let tls = EtcdTls {
            ca: std::fs::read(pki.path("ca.pem")).unwrap(),
            identity: None,
        };
        let bound = Duration::from_secs(2);
        for (scheme, tls, stage) in [
            ("http", None, "HTTP/2 start"),
            ("https", Some(&tls), "TLS handshake"),
        ] {
            let urls = [
                format!("{scheme}://127.0.0.1:{silent_port}"),
                format!("{scheme}://127.0.0.1:{refused}"),
            ];
            let etcd = Etcd::connect(&urls, tls, bound).unwrap();
            let started = tokio::time::Instant::now();
            let Err(e) = etcd.grant(Duration::from_secs(2)).await else {
                panic!("a lease from nowhere")
            };
            // The silent one given up at half the bound, the next tried.
            assert!(started.elapsed() < bound, "{scheme}: {e}");
            let silent = format!("{}: {stage} not done within 1000 ms", urls[0]);
            assert!(e.to_string().contains(&silent), "{e}");
            assert!(e.to_string().contains(&format!("{}: ", urls[1])), "{e}");
            assert!(e.to_string().contains("Connection refused"), "{e}");
        }
        drop(silent);
    }

    /// An etcd member served over TLS on `ip`, port 0: its certificate is
    /// `pki`'s server certificate (for 127.0.0.1 and `broker.test`), and
    /// with `mutual` it asks for a client certificate signed by `pki`'s
    /// CA. A connection whose handshake fails is kept open until the
    /// client closes it, so the alert it was sent is read, not lost to a
    /// reset. Returns its `https://` URL.
    async fn tls_member(pki: &testpki::Pki, ip: &str, mutual: bool) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_rustls::rustls::crypto::ring::default_provider;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use tokio_rustls::rustls::server::WebPkiClientVerifier;
        use tokio_rustls::rustls::{RootCertStore, ServerConfig};

        let provider = Arc::new(default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if mutual {
            let mut roots = RootCertStore::empty();
            for ca in CertificateDer::pem_file_iter(pki.path("ca.pem")).unwrap() {
                roots.add(ca.unwrap()).unwrap();
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let chain = CertificateDer::pem_file_iter(pki.path("server.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).unwrap();
        let mut config = builder.with_single_cert(chain, key).unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        // Ended with the test's runtime.
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    match acceptor.accept(tcp).into_fallible().await {
                        Ok(mut tls) => {
                            // An empty SETTINGS frame: HTTP/2 has started.
                            let _ = tls.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
                            while matches!(tls.read(&mut buf).await, Ok(1..)) {}
                        }
                        Err((_, mut tcp)) => while matches!(tcp.read(&mut buf).await, Ok(1..)) {},
                    }
                });
            }
        });
        url
    }

    /// A TLS setup that does not fit the etcd it meets is said with the
    /// setting to change: the CA (`cluster.etcd_ca`) that did not sign
    /// etcd's certificate, the URL's host (`cluster.etcd`) the certificate
    /// is not for, the client certificate (`cluster.etcd_cert`,
    /// `cluster.etcd_key`) etcd asks for or refuses.
    #[tokio::test]
    async fn a_tls_mismatch_with_etcd_names_the_setting_to_change() {
        let pki = testpki::Pki::new("etcd-hint");
        let other = testpki::Pki::new("etcd-hint-other");
        let read = |pki: &testpki::Pki, file: &str| std::fs::read(pki.path(file)).unwrap();
        let trusting = |ca: &testpki::Pki, client: Option<&testpki::Pki>| EtcdTls {
            ca: read(ca, "ca.pem"),
            identity: client.map(|c| (read(c, "client.pem"), read(c, "client.key"))),
        };
        let bound = Duration::from_secs(5);
        for (url, tls, says, raw) in [
            (
                tls_member(&pki, "127.0.0.1", false).await,
                trusting(&other, None),
                "(check cluster.etcd_ca: the CA that signed etcd's certificate; the one set did \
                 not)"
                    .to_owned(),
                "UnknownIssuer",
            ),
            (
                // The certificate is for 127.0.0.1 and broker.test.
                tls_member(&pki, "127.0.0.2", false).await,
                trusting(&pki, None),
                "(check cluster.etcd: its host \"127.0.0.2\" is not a name etcd's certificate \
                 is for; use one it is for, or add this one to the certificate)"
                    .to_owned(),
                "not valid for name",
            ),
            (
                tls_member(&pki, "127.0.0.1", true).await,
                trusting(&pki, None),
                "(check cluster.etcd_cert and cluster.etcd_key: etcd asks for a client \
                 certificate, and none is set)"
                    .to_owned(),
                "received fatal alert",
            ),
            (
                tls_member(&pki, "127.0.0.1", true).await,
                trusting(&pki, Some(&other)),
                "(check cluster.etcd_cert and cluster.etcd_key: etcd refused the client \
                 certificate; it must be signed by a CA etcd trusts"
                    .to_owned(),
                "received fatal alert",
            ),
        ] {
            let etcd = Etcd::connect(std::slice::from_ref(&url), Some(&tls), bound).unwrap();
            let started = tokio::time::Instant::now();
            let Err(e) = etcd.grant(Duration::from_secs(2)).await else {
                panic!("{url}: a lease through a TLS setup that does not fit")
            };
            let e = e.to_string();
            assert!(started.elapsed() < bound, "{url}: {e}");
            assert!(e.contains(&says) && e.contains(raw), "{url}: {e}");
            assert!(e.starts_with(&format!("etcd lease grant: {url}: ")), "{e}");
        }
    }
}
