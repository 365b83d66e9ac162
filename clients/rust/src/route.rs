//! Which broker a call goes to: a lazily connected channel for each URL,
//! a cluster's leader hints followed (never from TLS to plaintext), the next
//! configured broker when one is away, and URLs found not to be a broker
//! passed over for a while.

use crate::address;
use crate::error::{error_chain, is_unreachable, may_have_reached_a_broker, ClientError, RpcError};
use crate::tls::{tls_refusal, ClientTls};
use crate::BrokerClient;
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::PoisonError;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// What is known of what a URL speaks (see `Inner::asked`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Asked {
    /// It answered a call in gRPC: a broker, whatever fails there later.
    Grpc,
    /// Asked at that instant.
    At(std::time::Instant),
}

/// How often a URL that has not answered in gRPC is asked what it speaks.
pub(crate) const ASK_EVERY: Duration = Duration::from_secs(30);

/// How long a URL found not to be a broker is passed over before calls
/// try it again.
pub const RECHECK_NOT_A_BROKER: Duration = Duration::from_secs(30);

/// The broker calls go to, and its URL.
pub(crate) struct Conn {
    pub(crate) url: String,
    pub(crate) client: QuotaBrokerClient<Channel>,
}

impl BrokerClient {
    /// Runs one RPC on the current broker. A broker of a cluster that does
    /// not lead the tenant answers UNAVAILABLE with the leader's URL: the
    /// call goes there. UNAVAILABLE without one (the broker is down, or no
    /// leader is elected yet), or a server that is not a quota-broker's
    /// gRPC port (logged once): the next configured URL. The last answer
    /// when every hop is used.
    pub(crate) async fn rpc<T, F, Fut>(&self, call: F) -> Result<T, RpcError>
    where
        F: FnMut(QuotaBrokerClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.rpc_noting(&AtomicBool::new(false), call).await
    }

    /// [`BrokerClient::rpc`], setting `reached` when a hop failed in a way
    /// that may have come after a broker processed the call (its answer
    /// lost), before the call went on to the next broker. A URL found not
    /// to be a broker is passed over; the call fails with that
    /// ([`RpcError::NotABroker`]) only when no URL of the list is a broker
    /// that is away: with one down it is an outage (the fallback), not a
    /// mistake, whichever URL the call started at.
    pub(crate) async fn rpc_noting<T, F, Fut>(
        &self,
        reached: &AtomicBool,
        mut call: F,
    ) -> Result<T, RpcError>
    where
        F: FnMut(QuotaBrokerClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let hops = self.inner.urls.len() + 2;
        let mut hop = 0;
        // A broker found away on the way.
        let mut away: Option<tonic::Status> = None;
        loop {
            let (url, client) = {
                let c = self.conn();
                (c.url.clone(), c.client.clone())
            };
            let status = match call(client).await {
                Ok(r) => {
                    self.answered_in_grpc(&url);
                    return Ok(r.into_inner());
                }
                Err(s) => s,
            };
            if std::error::Error::source(&status).is_none() {
                self.answered_in_grpc(&url);
            }
            if let Some(mistake) = self.mistaken(&url, &status).await {
                let next = if hop < hops {
                    self.next_url(&url)
                } else {
                    None
                };
                let client =
                    next.and_then(|n| Some((channel(&n, self.inner.tls.as_ref()).ok()?, n)));
                let Some((client, next)) = client else {
                    return Err(away.map_or(RpcError::NotABroker(mistake), RpcError::Status));
                };
                hop += 1;
                *self.conn() = Conn { url: next, client };
                continue;
            }
            // Also a connection that failed locally (a connect timeout is
            // not UNAVAILABLE): the next broker may answer.
            if !(is_unreachable(&status) && tls_refusal(&status).is_none() && hop < hops) {
                return Err(RpcError::Status(status));
            }
            if may_have_reached_a_broker(&status) {
                reached.store(true, Ordering::Release);
            }
            hop += 1;
            let leader = status
                .metadata()
                .get(quota_broker::LEADER_METADATA)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let next = match leader {
                Some(l) if l != url => l,
                // "I lead it" cannot come with UNAVAILABLE; do not loop.
                Some(_) => return Err(RpcError::Status(status)),
                None => match self.next_url(&url) {
                    Some(next) => next,
                    None => return Err(RpcError::Status(status)),
                },
            };
            if !may_follow(&url, &next) {
                tracing::warn!(from = %url, to = %next,
                    "not following a broker's leader hint from https to plaintext (the token would cross in the clear)");
                return Err(RpcError::Status(status));
            }
            let Ok(client) = channel(&next, self.inner.tls.as_ref()) else {
                return Err(RpcError::Status(status));
            };
            tracing::debug!(from = %url, to = %next, "following the cluster to another broker");
            away = Some(status);
            *self.conn() = Conn { url: next, client };
        }
    }

    /// The configured URL after `from`, passing over those found not to be
    /// a broker; `None` when there is no other.
    fn next_url(&self, from: &str) -> Option<String> {
        let urls = &self.inner.urls;
        let wrong = self
            .inner
            .said_not_a_broker
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = tokio::time::Instant::now();
        let at = urls.iter().position(|u| u == from).map_or(0, |i| i + 1);
        (0..urls.len())
            .map(|k| &urls[(at + k) % urls.len()])
            .find(|u| {
                *u != from
                    && wrong
                        .get(*u)
                        .is_none_or(|(_, found)| now >= *found + RECHECK_NOT_A_BROKER)
            })
            .cloned()
    }

    /// Notes that `url` answered a call in gRPC: never asked again what it
    /// speaks.
    fn answered_in_grpc(&self, url: &str) {
        let mut asked = self
            .inner
            .asked
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !matches!(asked.get(url), Some(Asked::Grpc)) {
            asked.insert(url.to_owned(), Asked::Grpc);
        }
    }

    /// Whether `url` may be asked what it speaks now (and if so, notes it).
    fn may_ask(&self, url: &str) -> bool {
        let now = std::time::Instant::now();
        let mut asked = self
            .inner
            .asked
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match asked.get(url) {
            Some(Asked::Grpc) => false,
            Some(Asked::At(at)) if now.saturating_duration_since(*at) < ASK_EVERY => false,
            _ => {
                asked.insert(url.to_owned(), Asked::At(now));
                true
            }
        }
    }

    /// Whether the call that got `status` at `url` found a server that is
    /// not a quota-broker's gRPC port (see `address`): its error, logged
    /// the first time for the URL.
    async fn mistaken(&self, url: &str, status: &tonic::Status) -> Option<ClientError> {
        let now = tokio::time::Instant::now();
        let known = || {
            self.inner
                .said_not_a_broker
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(url)
                .filter(|(_, found)| now < *found + RECHECK_NOT_A_BROKER)
                .map(|(reason, _)| reason.clone())
        };
        let mut first = None;
        let mut plaintext = None;
        if address::worth_asking(status) {
            // Found wrong lately: what it was then (not asked again yet).
            if let Some(reason) = known() {
                return Some(address::not_a_broker_error(url, reason, status));
            }
            if let Ok(uri) = url.parse::<http::Uri>() {
                match uri.scheme_str() {
                    Some("http") if self.may_ask(url) => {
                        first = address::first_answer(&uri, CONNECT_TIMEOUT).await;
                    }
                    Some("https") if self.may_ask(url) => {
                        plaintext = address::plaintext_at_tls_url(url, CONNECT_TIMEOUT).await;
                    }
                    _ => {}
                }
            }
        }
        let reason = match plaintext {
            Some(reason) => reason,
            None => address::not_a_broker(status, first)?,
        };
        let error = address::not_a_broker_error(url, reason.clone(), status);
        let before = self
            .inner
            .said_not_a_broker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(url.to_owned(), (reason.clone(), now));
        if before.is_none_or(|(was, _)| was != reason) {
            tracing::error!(
                "{error} (calls there fail, never fall back; fix the URL; tried again every {} s)",
                RECHECK_NOT_A_BROKER.as_secs()
            );
        }
        Some(error)
    }
}

/// Whether the client may go from broker `from` to `to` (a leader hint or
/// the next configured URL): never from TLS to plaintext.
fn may_follow(from: &str, to: &str) -> bool {
    let https = |u: &str| {
        u.get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
    };
    !https(from) || https(to)
}

/// Quiet time on a connection with calls open before the client pings
/// the broker.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// How long a ping may go unanswered before the connection (and its open
/// calls) is given up: a hung broker is noticed within about 5 s.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// A lazily connected client for the broker at `url`.
pub(crate) fn channel(
    url: &str,
    tls: Option<&ClientTls>,
) -> Result<QuotaBrokerClient<Channel>, ClientError> {
    let bad_url = |message: String| ClientError::Url {
        url: address::shown(url),
        message,
    };
    // The keep-alive is what notices a broker whose host hangs or was cut
    // off (connections open, nothing answered): without it a call on an
    // established connection waits forever, neither moving to the next
    // broker nor falling back. Pings only while calls are open.
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| bad_url(e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    // Checked here, not at the first call: a URL that cannot be dialled
    // would otherwise read as a broker that is down, and every call would
    // quietly run on the fallback rate.
    let dialable = matches!(endpoint.uri().scheme_str(), Some("http" | "https"))
        && endpoint.uri().host().is_some_and(|h| !h.is_empty());
    if !dialable {
        return Err(bad_url(
            "expected http://host:port or https://host:port".into(),
        ));
    }
    let https = endpoint.uri().scheme_str() == Some("https");
    let endpoint = match (https, tls) {
        (true, tls) => endpoint
            .tls_config(tls.cloned().unwrap_or_default().into_tonic())
            .map_err(|e| ClientError::Tls(error_chain(&e)))?,
        (false, Some(_)) => {
            return Err(bad_url(
                "TLS settings were given for a plaintext URL; use https://".into(),
            ))
        }
        (false, None) => endpoint,
    };
    // Through a connector of our own: tonic's `connect_lazy` bounds only
    // the TCP connect by `connect_timeout`, so a broker whose host hangs
    // (its kernel still completes TCP handshakes) held every new TLS
    // connection in its handshake for ever, before any keep-alive could
    // start: calls never moved to the next broker nor fell back. With a
    // connector given, tonic bounds the whole connect, TLS included.
    let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
    Ok(QuotaBrokerClient::new(
        endpoint.connect_with_connector_lazy(tcp),
    ))
}

/// How long connecting to a broker (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::may_follow;

    #[test]
    fn a_leader_hint_never_leads_from_tls_to_plaintext() {
        assert!(may_follow("https://a:7443", "https://b:7443"));
        assert!(may_follow("HTTPS://a:7443", "https://b:7443"));
        assert!(may_follow("http://a:7070", "http://b:7070"));
        assert!(may_follow("http://a:7070", "https://b:7443"));
        assert!(!may_follow("https://a:7443", "http://b:7070"));
        assert!(!may_follow("https://a:7443", "b:7070"));
    }
}
