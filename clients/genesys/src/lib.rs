//! Genesys Cloud API calls leased through quota-broker, for the tools that
//! call the upstream on a fleet's behalf (the call-flow relay, bulk
//! ingestion): the region's hosts, an OAuth client-credentials token kept
//! fresh, and [`Upstream`], which leases every call from the broker, makes
//! it, reports its status and rate-limit headers back, and retries what is
//! worth retrying only when the broker grants again.
//!
//! ```no_run
//! # async fn example() -> Result<(), gc_upstream::UpstreamError> {
//! use gc_upstream::{Credentials, Region, Request, RetryPolicy, Upstream, UpstreamError};
//! use quota_broker_client::{BrokerClient, Call};
//!
//! let broker = BrokerClient::connect("http://127.0.0.1:50051", None).map_err(UpstreamError::Lease)?;
//! let template = Call::new("my-org", "GET", "/").client_id("relay-1").class("interactive");
//! let upstream = Upstream::new(
//!     Region::new("mypurecloud.com")?,
//!     Credentials { client_id: "…".into(), client_secret: "…".into() },
//!     broker,
//!     template,
//! )?;
//! let answer = upstream
//!     .send_retrying(&Request::get("/api/v2/users/me"), &RetryPolicy::default())
//!     .await?;
//! println!("{}", answer.status);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod check;
mod region;
mod token;

pub use check::{client_id_problem, clip, host_refuses, MAX_CLIENT_ID, SHOWN};
pub use region::{Credentials, Region};

use bytes::Bytes;
use quota_broker_client::{says_concurrency, BrokerClient, Call, ClientError, Lease};
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use token::TokenCache;

/// Longest response body read (a details page of 100 conversations is far
/// below it); a longer one is an error rather than unbounded memory.
const MAX_BODY: usize = 32 << 20;
/// First pause before retrying a 5xx or a transport error; doubled each
/// attempt up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Longest `Retry-After` honoured locally (only for fallback leases: with
/// the broker, its next grant is the answer).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);
/// Shortest pause after "not granted", whatever the broker suggested.
const MIN_NOT_GRANTED_PAUSE: Duration = Duration::from_millis(10);
/// Longest: the broker's estimate is of the bucket as it was; an operator
/// raising the limit or clearing a cut makes it stale, and a fresh
/// Acquire queues again anyway.
const MAX_NOT_GRANTED_PAUSE: Duration = Duration::from_secs(5);

/// A lease for `call` from `broker`, asked again after each "not now"
/// (not granted within the class's wait, or the broker over this caller's
/// rate) until it is granted; other errors end it.
pub async fn lease_waiting(broker: &BrokerClient, call: &Call) -> Result<Lease, UpstreamError> {
    loop {
        match broker.acquire(call).await {
            Ok(lease) => return Ok(lease),
            Err(ClientError::NotGranted { retry_after, .. })
            | Err(ClientError::Overloaded { retry_after, .. }) => {
                tokio::time::sleep(retry_after.clamp(MIN_NOT_GRANTED_PAUSE, MAX_NOT_GRANTED_PAUSE))
                    .await;
            }
            Err(e) => return Err(UpstreamError::Lease(e)),
        }
    }
}

/// Why an upstream call could not be made or answered.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// A region, URL or path that cannot be used.
    #[error("invalid {what}: {message}")]
    Invalid {
        /// Which setting or argument.
        what: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The login host refused the client credentials (not retried).
    #[error("login refused ({status}): {message}")]
    Auth {
        /// HTTP status of the login answer.
        status: u16,
        /// The login host's error, clipped.
        message: String,
    },
    /// The login host can never be reached as given: it refuses
    /// connections, or its name does not exist (a wrong region). Said by
    /// [`Upstream::preflight`].
    #[error("the login host {login} {why}: check --region")]
    LoginUnreachable {
        /// The login host's base URL, clipped.
        login: String,
        /// Why, with the system's error ([`host_refuses`]).
        why: String,
    },
    /// The broker refused the lease (unknown tenant, bad token, ...).
    #[error("lease refused: {0}")]
    Lease(ClientError),
    /// The connection to the upstream failed or timed out (retried by
    /// [`Upstream::send_retrying`]).
    #[error("upstream unreachable: {0}")]
    Transport(String),
    /// The upstream's answer was longer than the limit (bytes).
    #[error("upstream answer over {0} bytes")]
    BodyTooLarge(usize),
}

impl UpstreamError {
    fn retryable(&self) -> bool {
        matches!(self, UpstreamError::Transport(_))
    }
}

/// One upstream request.
#[derive(Debug, Clone)]
pub struct Request {
    /// HTTP method.
    pub method: http::Method,
    /// Path from `/api/v2/...`, optionally with `?query`.
    pub path: String,
    /// JSON body, if any.
    pub body: Option<serde_json::Value>,
}

impl Request {
    /// A GET of `path`.
    pub fn get(path: impl Into<String>) -> Request {
        Request {
            method: http::Method::GET,
            path: path.into(),
            body: None,
        }
    }

    /// A DELETE of `path`.
    pub fn delete(path: impl Into<String>) -> Request {
        Request {
            method: http::Method::DELETE,
            path: path.into(),
            body: None,
        }
    }

    /// A POST of `body` to `path`.
    pub fn post(path: impl Into<String>, body: serde_json::Value) -> Request {
        Request {
            method: http::Method::POST,
            path: path.into(),
            body: Some(body),
        }
    }

    /// The path without its query: what the broker's routes match.
    fn route_path(&self) -> &str {
        self.path.split('?').next().unwrap_or_default()
    }
}

/// The upstream's answer.
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: http::HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Response {
    /// The body as JSON of type `T`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }

    /// The body as text (lossy), for messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether a retry may succeed: 408 (the upstream timed the request
    /// out), 429 or 5xx.
    pub fn is_retryable(&self) -> bool {
        matches!(self.status, 408 | 429) || self.status >= 500
    }

    /// The answer's `Retry-After` in (decimal) seconds, if it makes sense,
    /// at most two minutes.
    pub fn retry_after(&self) -> Option<Duration> {
        let secs: f64 = self
            .headers
            .get(http::header::RETRY_AFTER)?
            .to_str()
            .ok()?
            .trim()
            .parse()
            .ok()?;
        (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs).min(MAX_RETRY_AFTER))
    }
}

/// How [`Upstream::send_retrying`] retries.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy { max_attempts: 8 }
    }
}

/// Counts of what an [`Upstream`] did since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Upstream requests sent (answered or not).
    pub calls: u64,
    /// Answers by class of status.
    pub ok_2xx: u64,
    /// 4xx other than 429.
    pub client_4xx: u64,
    /// 429 answers.
    pub throttled_429: u64,
    /// 5xx answers.
    pub server_5xx: u64,
    /// Requests without an answer (connection, timeout).
    pub transport_errors: u64,
    /// Attempts after the first, by `send_retrying` and after a 401.
    pub retries: u64,
    /// Leases from the client's local fallback (broker unreachable).
    pub fallback_leases: u64,
    /// Access tokens fetched from the login host.
    pub logins: u64,
    /// Leases given back unused because a 429 for the same route came back
    /// after they were granted (leased again once the broker knew).
    pub withheld: u64,
}

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    ok_2xx: AtomicU64,
    client_4xx: AtomicU64,
    throttled_429: AtomicU64,
    server_5xx: AtomicU64,
    transport_errors: AtomicU64,
    retries: AtomicU64,
    fallback_leases: AtomicU64,
    withheld: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

struct Inner {
    http: reqwest::Client,
    api: String,
    /// The login host's base URL.
    login: String,
    tokens: TokenCache,
    broker: BrokerClient,
    template: Call,
    counters: Counters,
    throttled: Throttled,
    /// Longest answer body read (bytes).
    max_body: AtomicUsize,
}

/// 429s seen per broker bucket (the buckets of the lease the 429 came
/// on: as many keys as the broker's config has buckets, however many
/// conversation ids the paths carry). A rate 429 is counted and reported
/// under the write lock, so a lease granted on one of those buckets before
/// the broker heard of it is caught (a count moved) and leased again only
/// after the broker holds the bucket back: calls in this process racing the
/// report do not each earn a 429 of their own.
#[derive(Default)]
struct Throttled(tokio::sync::RwLock<Counted>);

/// 429s counted in all, and per bucket the count at its last one.
#[derive(Default)]
struct Counted {
    total: u64,
    last: HashMap<String, u64>,
}

impl Throttled {
    /// The 429s counted so far; waits while one is being reported.
    async fn seen(&self) -> u64 {
        self.0.read().await.total
    }

    /// Whether a 429 was counted on one of `buckets` since [`Self::seen`]
    /// said `before`.
    async fn moved(&self, before: u64, buckets: &[String]) -> bool {
        let counted = self.0.read().await;
        buckets
            .iter()
            .any(|b| counted.last.get(b).is_some_and(|&at| at > before))
    }

    /// Counts a 429 on `buckets` and runs `report` before anyone reads the
    /// counts again.
    async fn record<T>(
        &self,
        buckets: &[String],
        report: impl std::future::Future<Output = T>,
    ) -> T {
        let mut counted = self.0.write().await;
        counted.total += 1;
        let at = counted.total;
        for b in buckets {
            counted.last.insert(b.clone(), at);
        }
        report.await
    }
}

/// Leased, authenticated calls to one org's API (cheap to clone).
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

impl Upstream {
    /// Calls `region`'s API with `credentials`, leasing every call from
    /// `broker` as `template` (its tenant, client id, OAuth client and
    /// class; method and path are each request's). Requests time out after
    /// 60 s.
    pub fn new(
        region: Region,
        credentials: Credentials,
        broker: BrokerClient,
        template: Call,
    ) -> Result<Upstream, UpstreamError> {
        Upstream::with_timeout(
            region,
            credentials,
            broker,
            template,
            Some(Duration::from_secs(60)),
        )
    }

    /// [`Upstream::new`] with another request timeout (`None`: none).
    pub fn with_timeout(
        region: Region,
        credentials: Credentials,
        broker: BrokerClient,
        template: Call,
        timeout: Option<Duration>,
    ) -> Result<Upstream, UpstreamError> {
        let mut builder = reqwest::Client::builder().user_agent("quota-broker-gc-upstream");
        if let Some(t) = timeout {
            builder = builder.timeout(t);
        }
        let http = builder.build().map_err(|e| UpstreamError::Invalid {
            what: "HTTP client settings",
            message: e.to_string(),
        })?;
        let tokens = TokenCache::new(http.clone(), &region.login, credentials);
        Ok(Upstream {
            inner: Arc::new(Inner {
                http,
                api: region.api,
                login: region.login,
                tokens,
                broker,
                template,
                counters: Counters::default(),
                throttled: Throttled::default(),
                max_body: AtomicUsize::new(MAX_BODY),
            }),
        })
    }

    /// Sets the longest answer body read (default 32 MiB): a longer one is
    /// [`UpstreamError::BodyTooLarge`], not read into memory.
    pub fn set_max_body(&self, bytes: usize) {
        self.inner.max_body.store(bytes, Ordering::Relaxed);
    }

    /// Checks at start what would otherwise fail every call later: that
    /// the broker serves the tenant to this token, and that the login host
    /// takes the client credentials (the token is kept for the first
    /// call). A refusal of either is an error, and so is a login host that
    /// refuses connections or whose name does not exist
    /// ([`UpstreamError::LoginUnreachable`]: a wrong region). A broker or
    /// login host that does not answer within `within` is not (calls wait
    /// or fall back as they would anyway): it comes back as a warning to
    /// log, which says so when the broker refuses connections.
    pub async fn preflight(&self, within: Duration) -> Result<Vec<String>, UpstreamError> {
        let mut warnings = Vec::new();
        let tenant = self.inner.template.tenant();
        let broker = self.inner.broker.current_url();
        if !self
            .inner
            .broker
            .check(tenant, within)
            .await
            .map_err(UpstreamError::Lease)?
        {
            let shown = clip(&broker);
            warnings.push(match host_refuses(&broker, within).await {
                Some(why) => format!(
                    "the broker at {shown} {why} at the start-up check of tenant {tenant:?}: \
                     calls wait for it or use the local fallback rate"
                ),
                None => format!(
                    "the broker at {shown} did not answer the start-up check of tenant \
                     {tenant:?} (away, or over this token's limits): calls wait for it or use \
                     the local fallback rate"
                ),
            });
        }
        let failed = match tokio::time::timeout(within, self.inner.tokens.get()).await {
            Ok(Ok(_)) => None,
            Ok(Err(e @ UpstreamError::Transport(_))) => Some(format!("({e})")),
            Ok(Err(e)) => return Err(e),
            Err(_) => Some(format!("within {} s", within.as_secs())),
        };
        if let Some(failed) = failed {
            let login = &self.inner.login;
            if let Some(why) = host_refuses(login, within).await {
                return Err(UpstreamError::LoginUnreachable {
                    login: clip(login),
                    why,
                });
            }
            warnings.push(format!(
                "the login host {} did not answer the start-up check {failed}: calls log in \
                 when they can",
                clip(login)
            ));
        }
        Ok(warnings)
    }

    /// The broker its calls are leased from.
    pub fn broker(&self) -> &BrokerClient {
        &self.inner.broker
    }

    /// What this upstream did so far.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            calls: get(&c.calls),
            ok_2xx: get(&c.ok_2xx),
            client_4xx: get(&c.client_4xx),
            throttled_429: get(&c.throttled_429),
            server_5xx: get(&c.server_5xx),
            transport_errors: get(&c.transport_errors),
            retries: get(&c.retries),
            fallback_leases: get(&c.fallback_leases),
            logins: self.inner.tokens.logins(),
            withheld: get(&c.withheld),
        }
    }

    /// One leased attempt: the token, a lease for the request's method and
    /// path (waiting as long as the broker says "not yet"), the call, the
    /// report, the release. A 401 is tried once more with a new token.
    pub async fn send(&self, req: &Request) -> Result<Response, UpstreamError> {
        self.attempt(req).await.map(|(response, _)| response)
    }

    /// [`Upstream::send`] again while it answers 429 or 5xx or cannot reach
    /// the upstream, at most `retry.max_attempts` in all. Each attempt is
    /// leased anew: after a reported 429 the broker holds the next grant
    /// until the upstream will take it. Returns the last answer; what a 4xx
    /// means is the caller's to decide.
    pub async fn send_retrying(
        &self,
        req: &Request,
        retry: &RetryPolicy,
    ) -> Result<Response, UpstreamError> {
        let mut attempt = 1;
        loop {
            let last = attempt >= retry.max_attempts.max(1);
            let pause = match self.attempt(req).await {
                Ok((response, fallback)) if response.is_retryable() && !last => {
                    match (response.status, fallback) {
                        // Without the broker nobody else learned the 429.
                        (429, true) => response.retry_after().unwrap_or(FIRST_BACKOFF),
                        (429, false) => Duration::ZERO,
                        _ => backoff(attempt),
                    }
                }
                Ok((response, _)) => return Ok(response),
                Err(e) if e.retryable() && !last => backoff(attempt),
                Err(e) => return Err(e),
            };
            bump(&self.inner.counters.retries);
            tracing::debug!(attempt, ?pause, path = %req.route_path(), "retrying upstream call");
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    async fn attempt(&self, req: &Request) -> Result<(Response, bool), UpstreamError> {
        if !req.path.starts_with('/') {
            return Err(UpstreamError::Invalid {
                what: "path",
                message: "an API path starts with '/'".into(),
            });
        }
        let call = self
            .inner
            .template
            .to(req.method.as_str(), req.route_path());
        let mut renewed_token = false;
        loop {
            let token = self.inner.tokens.get().await?;
            let seen = self.inner.throttled.seen().await;
            let lease = self.lease(&call).await?;
            let fallback = lease.is_fallback();
            if !fallback && self.inner.throttled.moved(seen, lease.buckets()).await {
                bump(&self.inner.counters.withheld);
                lease.release().await;
                continue;
            }
            if fallback {
                bump(&self.inner.counters.fallback_leases);
            }
            let response = self.call(req, &token).await;
            let response = match response {
                Ok(r) => r,
                Err(e) => {
                    lease.release().await;
                    return Err(e);
                }
            };
            let reported = if response.status == 429 && says_concurrency(&response.body) {
                lease.report_concurrency_429(&response.headers).await
            } else if response.status == 429 {
                let report = lease.report(response.status, &response.headers);
                let buckets = lease.buckets().to_vec();
                self.inner.throttled.record(&buckets, report).await
            } else {
                lease.report(response.status, &response.headers).await
            };
            if let Err(e) = reported {
                // The client keeps what it could not send and sends it later.
                tracing::debug!(error = %e, "report not delivered yet");
            }
            lease.release().await;
            if response.status == 401 && !renewed_token {
                renewed_token = true;
                self.inner.tokens.invalidate(&token).await;
                bump(&self.inner.counters.retries);
                continue;
            }
            return Ok((response, fallback));
        }
    }

    /// A lease for `call`; "not granted" and "overloaded" are waited out.
    async fn lease(&self, call: &Call) -> Result<Lease, UpstreamError> {
        lease_waiting(&self.inner.broker, call).await
    }

    async fn call(&self, req: &Request, token: &str) -> Result<Response, UpstreamError> {
        let c = &self.inner.counters;
        bump(&c.calls);
        let url = format!("{}{}", self.inner.api, req.path);
        let mut builder = self
            .inner
            .http
            .request(req.method.clone(), url)
            .bearer_auth(token);
        if let Some(body) = &req.body {
            builder = builder.json(body);
        }
        let read = async {
            let mut response = builder.send().await?;
            let status = response.status().as_u16();
            let headers = std::mem::take(response.headers_mut());
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                let max = self.inner.max_body.load(Ordering::Relaxed);
                if body.len() + chunk.len() > max {
                    return Ok(Err(UpstreamError::BodyTooLarge(max)));
                }
                body.extend_from_slice(&chunk);
            }
            Ok::<_, reqwest::Error>(Ok(Response {
                status,
                headers,
                body: body.into(),
            }))
        };
        let response = match read.await {
            Ok(r) => r?,
            Err(e) => {
                bump(&c.transport_errors);
                return Err(UpstreamError::Transport(without_url(e)));
            }
        };
        bump(match response.status {
            200..=299 => &c.ok_2xx,
            429 => &c.throttled_429,
            400..=499 => &c.client_4xx,
            500.. => &c.server_5xx,
            _ => &c.ok_2xx,
        });
        Ok(response)
    }
}

/// 200 ms, 400 ms, ... up to 10 s.
fn backoff(attempt: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

/// A reqwest error's message without its URL (which may carry a query the
/// caller would rather not see in logs), with its causes ("error sending
/// request" alone does not say "connection refused").
pub(crate) fn without_url(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut message = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        message.push_str(": ");
        message.push_str(&c.to_string());
        cause = c.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unreachable_host_is_said_with_its_cause_and_without_the_url() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let err = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{port}/secret?token=x"))
            .send()
            .await
            .unwrap_err();
        let message = without_url(err);
        assert!(message.to_lowercase().contains("refused"), "{message}");
        assert!(!message.contains("token=x"), "{message}");
    }

    #[tokio::test]
    async fn a_lease_checked_while_a_429_is_reported_sees_it_once_reported() {
        let throttled = Arc::new(Throttled::default());
        let query = vec!["analytics-query".to_owned(), "per-client".to_owned()];
        let before = throttled.seen().await;
        let (reported_tx, reported_rx) = tokio::sync::oneshot::channel::<()>();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let reporter = tokio::spawn({
            let (throttled, query) = (throttled.clone(), query.clone());
            async move {
                throttled
                    .record(&query, async move {
                        let _ = started_tx.send(());
                        reported_rx.await
                    })
                    .await
            }
        });
        started_rx.await.unwrap();
        let check = tokio::spawn({
            let throttled = throttled.clone();
            async move {
                throttled
                    .moved(before, &["analytics-query".to_owned()])
                    .await
            }
        });
        tokio::task::yield_now().await;
        assert!(!check.is_finished(), "the check waits for the report");
        reported_tx.send(()).unwrap();
        reporter.await.unwrap().unwrap();
        assert!(check.await.unwrap(), "a lease on the refused bucket");
        assert!(
            !throttled.moved(before, &["users".to_owned()]).await,
            "a lease on another bucket"
        );
    }

    /// Keyed by the broker's buckets, not by paths: a path carries its
    /// conversation's id, so a long-running relay kept one entry per
    /// conversation ever throttled, and a 429 on one conversation's call
    /// held back no other's.
    #[tokio::test]
    async fn the_429_counts_are_per_bucket_however_many_paths_there_are() {
        let throttled = Throttled::default();
        let bucket = vec!["conversations".to_owned()];
        for _ in 0..1000 {
            throttled.record(&bucket, async {}).await;
        }
        let counted = throttled.0.read().await;
        assert_eq!((counted.total, counted.last.len()), (1000, 1));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        assert_eq!(backoff(1), Duration::from_millis(200));
        assert_eq!(backoff(3), Duration::from_millis(800));
        assert_eq!(backoff(20), MAX_BACKOFF);
    }

    #[test]
    fn timeouts_throttling_and_server_errors_may_pass_later() {
        let answer = |status| Response {
            status,
            headers: http::HeaderMap::new(),
            body: Bytes::new(),
        };
        for status in [408, 429, 500, 503] {
            assert!(answer(status).is_retryable(), "{status}");
        }
        for status in [400, 401, 403, 404, 409] {
            assert!(!answer(status).is_retryable(), "{status}");
        }
    }

    #[test]
    fn retry_after_is_read_in_seconds_and_capped() {
        let with = |v: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::RETRY_AFTER, v.parse().unwrap());
            Response {
                status: 429,
                headers,
                body: Bytes::new(),
            }
            .retry_after()
        };
        assert_eq!(with("2"), Some(Duration::from_secs(2)));
        assert_eq!(with("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(with("99999"), Some(MAX_RETRY_AFTER));
        assert_eq!(with("soon"), None);
    }

    #[test]
    fn the_broker_sees_the_path_without_its_query() {
        let r = Request::get("/api/v2/analytics/jobs/7/results?cursor=abc");
        assert_eq!(r.route_path(), "/api/v2/analytics/jobs/7/results");
    }
}
