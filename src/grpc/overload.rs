//! Overload protection per caller, in front of every service.
//!
//! [`GuardLayer`] sees each RPC before it is routed and
//! - refuses a bearer token sent over plaintext from a non-loopback peer
//!   (UNAUTHENTICATED: the token has crossed the network in the clear);
//! - holds each caller to its request rate: a token to its own
//!   `max_requests_per_sec` (default `[overload]`), an anonymous caller (open
//!   mode, or no valid token) per peer IP, in a governor keyed limiter.
//!
//! [`Overload::open_watch`] caps the Watch streams (and dashboard event
//! feeds) a caller holds open, and those of every caller together
//! (`server.max_watch_streams`, loopback included: each stream keeps its
//! own copy of every bucket instance it shows, so their count bounds the
//! broker's memory). Both answer at once with RESOURCE_EXHAUSTED, the time
//! to retry in the message and in the `retry-after-ms` response metadata;
//! nothing waits.
//! Health checks are never rate-limited. The limiters run on tokio's clock,
//! so tests pause and advance it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::ops::Add;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{Either, Ready};
use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::HashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, Quota, RateLimiter};
use tonic::codegen::http;
use tonic::metadata::MetadataValue;
use tonic::Status;
use tower::{Layer, Service};

use super::caps::{Gauge, Slot};
use super::transport::PeerInfo;
use crate::auth::{Authenticator, Principal};
use crate::clock::millis;
use crate::config::Settings;

/// Response metadata with the time to wait before retrying, in milliseconds.
pub(crate) const RETRY_AFTER_MS: &str = "retry-after-ms";
/// Retry hint when a Watch cap is hit (a stream has to close first, which no
/// clock predicts).
const WATCH_RETRY: Duration = Duration::from_secs(1);
/// Paths never rate-limited: load balancers probe without tokens.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";
/// Release gives capacity back: refused as over a token's rate, the slots
/// it frees would stay held until their TTL and deepen the overload.
const RELEASE_PATH: &str = "/quota.v1.QuotaBroker/Release";
/// Every this many anonymous checks, forget peers idle for a full period.
const PRUNE_EVERY: u64 = 4096;

/// governor on tokio's clock (so paused test time drives it).
#[derive(Debug, Clone, Copy, Default)]
struct TokioClock;

/// An instant of [`TokioClock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct At(tokio::time::Instant);

impl Add<Nanos> for At {
    type Output = At;

    fn add(self, d: Nanos) -> At {
        At(self.0 + Duration::from(d))
    }
}

impl Reference for At {
    fn duration_since(&self, earlier: At) -> Nanos {
        Nanos::from(self.0.saturating_duration_since(earlier.0))
    }

    fn saturating_sub(&self, d: Nanos) -> At {
        At(self.0.checked_sub(Duration::from(d)).unwrap_or(self.0))
    }
}

impl Clock for TokioClock {
    type Instant = At;

    fn now(&self) -> At {
        At(tokio::time::Instant::now())
    }
}

type Direct = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<At>>;
type Keyed = RateLimiter<IpAddr, HashMapStateStore<IpAddr>, TokioClock, NoOpMiddleware<At>>;

/// One second's worth of `per_sec` as burst; `None` for 0 (no limit).
fn quota(per_sec: u32) -> Option<Quota> {
    NonZeroU32::new(per_sec).map(Quota::per_second)
}

/// How long until `denied` would pass, at least 1 ms.
fn wait_of(denied: &NotUntil<At>) -> Duration {
    denied
        .wait_time_from(TokioClock.now())
        .max(Duration::from_millis(1))
}

/// RESOURCE_EXHAUSTED with the retry time in the message and metadata.
fn exhausted(what: String, wait: Duration) -> Status {
    let ms = millis(wait).max(1);
    let mut status = Status::resource_exhausted(format!("overloaded: {what}; retry in {ms} ms"));
    status
        .metadata_mut()
        .insert(RETRY_AFTER_MS, MetadataValue::from(ms));
    status
}

/// One token's budget.
struct TokenBudget {
    name: String,
    per_sec: u32,
    rate: Option<Direct>,
    max_watch: u32,
}

/// Who a limit is kept for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Caller {
    /// A configured token (its index).
    Token(usize),
    /// An anonymous caller at this IP.
    Peer(IpAddr),
}

/// The per-caller limits of one server.
pub(crate) struct Overload {
    auth: Authenticator,
    tokens: Vec<TokenBudget>,
    /// Anonymous callers per IP (`None`: no limit).
    anonymous: Option<Keyed>,
    anonymous_per_sec: u32,
    anonymous_max_watch: u32,
    exempt_loopback: bool,
    anonymous_checks: AtomicU64,
    /// Open Watch streams per caller (std Mutex: never held across .await).
    watches: Mutex<HashMap<Caller, u32>>,
    /// Open Watch streams and event feeds of every caller.
    streams: Gauge,
    /// `server.max_watch_streams`.
    max_streams: usize,
}

/// Why a Watch stream or event feed was not opened: a cap is full until
/// one closes (RESOURCE_EXHAUSTED on gRPC).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WatchRefused {
    /// The caller's own cap (`max_watch_streams` of its token, or
    /// `overload.max_watch_streams`).
    #[error(
        "{whose} {max} Watch {} open (max_watch_streams); close one first",
        if *max == 1 { "stream or dashboard feed" } else { "streams or dashboard feeds" }
    )]
    Caller {
        /// Who, as said: "token \"x\" already has", "callers ... already hold".
        whose: String,
        /// The cap.
        max: u32,
    },
    /// Every caller's together (`server.max_watch_streams`).
    #[error(
        "the broker already serves {max} Watch streams and dashboard feeds, its most at once \
         (server.max_watch_streams); retry once one has closed, or ask the operator to raise it"
    )]
    Broker {
        /// The cap.
        max: usize,
    },
}

impl WatchRefused {
    /// Whether the cap of every caller together was full (not the
    /// caller's own).
    pub(crate) fn is_broker_wide(&self) -> bool {
        matches!(self, WatchRefused::Broker { .. })
    }

    /// When to try again: a stream has to close first, which no clock
    /// predicts.
    pub(crate) fn retry_after(&self) -> Duration {
        WATCH_RETRY
    }
}

impl From<WatchRefused> for Status {
    fn from(refused: WatchRefused) -> Status {
        exhausted(refused.to_string(), refused.retry_after())
    }
}

impl Overload {
    /// The tokens its limits are per.
    pub(crate) fn auth(&self) -> &Authenticator {
        &self.auth
    }

    /// The limits of `settings`; `auth` must be built from the same
    /// `settings.tokens`, in order.
    pub(crate) fn new(settings: &Settings, auth: Authenticator) -> Arc<Overload> {
        let o = &settings.overload;
        let tokens = settings
            .tokens
            .iter()
            .map(|t| {
                let per_sec = t.max_requests_per_sec().unwrap_or(o.max_requests_per_sec);
                TokenBudget {
                    name: t.name().to_owned(),
                    per_sec,
                    rate: quota(per_sec).map(|q| RateLimiter::direct_with_clock(q, TokioClock)),
                    max_watch: t.max_watch_streams().unwrap_or(o.max_watch_streams),
                }
            })
            .collect();
        Arc::new(Overload {
            auth,
            tokens,
            anonymous: quota(o.max_requests_per_sec)
                .map(|q| RateLimiter::hashmap_with_clock(q, TokioClock)),
            anonymous_per_sec: o.max_requests_per_sec,
            anonymous_max_watch: o.max_watch_streams,
            exempt_loopback: o.exempt_loopback,
            anonymous_checks: AtomicU64::new(0),
            watches: Mutex::new(HashMap::new()),
            streams: Gauge::default(),
            max_streams: settings.server.max_watch_streams,
        })
    }

    /// The caller limits are kept for: the token, or for anonymous callers
    /// the peer IP (`None`: not limited, e.g. a loopback peer when exempt).
    fn caller(&self, token_index: Option<usize>, peer: Option<&PeerInfo>) -> Option<Caller> {
        match token_index {
            Some(i) => Some(Caller::Token(i)),
            None => {
                let peer = peer?;
                if self.exempt_loopback && peer.is_loopback() {
                    return None;
                }
                peer.ip().map(Caller::Peer)
            }
        }
    }

    /// Checks one RPC: plaintext tokens from afar, then the caller's rate.
    fn admit(
        &self,
        path: &str,
        authorization: Option<&str>,
        peer: Option<&PeerInfo>,
    ) -> Result<(), Status> {
        if let Some(peer) = peer {
            if authorization.is_some() && !peer.is_tls() && !peer.is_loopback() {
                let from = peer
                    .ip()
                    .map_or_else(|| "an unknown address".to_owned(), |ip| ip.to_string());
                return Err(Status::unauthenticated(format!(
                    "refused a bearer token sent over plaintext from {from}: it crossed the \
                     network unencrypted, so treat it as exposed and rotate it; connect with \
                     https:// to a broker that has [server.tls] configured"
                )));
            }
        }
        if path.starts_with(HEALTH_PREFIX) {
            return Ok(());
        }
        // Open mode has no tokens to look up (and nothing to hash).
        let token_index = if self.auth.is_open() {
            None
        } else {
            self.auth
                .authenticate(authorization)
                .ok()
                .and_then(|p| p.token_index())
        };
        match self.caller(token_index, peer) {
            None => Ok(()),
            Some(Caller::Token(_)) if path == RELEASE_PATH => Ok(()),
            Some(Caller::Token(i)) => {
                let Some(budget) = self.tokens.get(i) else {
                    return Ok(());
                };
                match &budget.rate {
                    Some(rate) => rate.check().map_err(|denied| {
                        exhausted(
                            format!(
                                "token {:?} is over its {} requests per second \
                                 (max_requests_per_sec)",
                                budget.name, budget.per_sec
                            ),
                            wait_of(&denied),
                        )
                    }),
                    None => Ok(()),
                }
            }
            Some(Caller::Peer(ip)) => {
                let Some(limiter) = &self.anonymous else {
                    return Ok(());
                };
                let n = self.anonymous_checks.fetch_add(1, Ordering::Relaxed);
                if n % PRUNE_EVERY == PRUNE_EVERY - 1 {
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                }
                limiter.check_key(&ip).map_err(|denied| {
                    exhausted(
                        format!(
                            "requests without a valid token from {ip} are over {} per second \
                             (overload.max_requests_per_sec)",
                            self.anonymous_per_sec
                        ),
                        wait_of(&denied),
                    )
                })
            }
        }
    }

    /// Counts a Watch stream (or event feed) for `who` (from `peer`)
    /// against every caller's cap, then against its own; the permit gives
    /// both back when dropped with the stream.
    pub(crate) fn open_watch(
        self: &Arc<Self>,
        who: &Principal,
        peer: Option<&PeerInfo>,
    ) -> Result<WatchPermit, WatchRefused> {
        // Every caller, loopback and tokens without a cap of their own
        // included.
        let Some(slot) = self.streams.try_take(self.max_streams) else {
            return Err(WatchRefused::Broker {
                max: self.max_streams,
            });
        };
        let permit = |caller| WatchPermit {
            caller,
            _counted: slot,
        };
        let Some(caller) = self.caller(who.token_index(), peer) else {
            return Ok(permit(None));
        };
        let (max, whose) = match caller {
            Caller::Token(i) => match self.tokens.get(i) {
                Some(b) => (b.max_watch, format!("token {:?} already has", b.name)),
                None => return Ok(permit(None)),
            },
            Caller::Peer(ip) => (
                self.anonymous_max_watch,
                format!("callers without a valid token at {ip} already hold"),
            ),
        };
        if max == 0 {
            return Ok(permit(None));
        }
        let mut open = self.watches.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(caller).or_insert(0);
        if *n >= max {
            return Err(WatchRefused::Caller { whose, max });
        }
        *n += 1;
        Ok(permit(Some((self.clone(), caller))))
    }

    /// Open Watch streams counted for `caller`.
    #[cfg(test)]
    fn watching(&self, caller: Caller) -> u32 {
        let open = self.watches.lock().unwrap_or_else(PoisonError::into_inner);
        open.get(&caller).copied().unwrap_or(0)
    }
}

/// One open Watch stream, counted until dropped.
pub(crate) struct WatchPermit {
    /// Counted for this caller (`None`: it has no cap of its own).
    caller: Option<(Arc<Overload>, Caller)>,
    /// Counted among every caller's streams.
    _counted: Slot,
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        if let Some((overload, caller)) = self.caller.take() {
            let mut open = overload
                .watches
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(n) = open.get_mut(&caller) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.remove(&caller);
                }
            }
        }
    }
}

/// The tower layer that puts [`Overload::admit`] in front of the router.
#[derive(Clone)]
pub(crate) struct GuardLayer(Arc<Overload>);

impl GuardLayer {
    /// Guards with `overload`.
    pub(crate) fn new(overload: Arc<Overload>) -> GuardLayer {
        GuardLayer(overload)
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            overload: self.0.clone(),
        }
    }
}

/// The service [`GuardLayer`] makes.
#[derive(Clone)]
pub(crate) struct Guard<S> {
    inner: S,
    overload: Arc<Overload>,
}

impl<S, B, R> Service<http::Request<B>> for Guard<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Either<Ready<Result<http::Response<R>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let peer = req.extensions().get::<PeerInfo>().cloned();
        if let Some(peer) = &peer {
            let (tcp, tls) = peer.tonic_info();
            req.extensions_mut().insert(tcp);
            if let Some(tls) = tls {
                req.extensions_mut().insert(tls);
            }
        }
        let authorization = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or(""));
        match self
            .overload
            .admit(req.uri().path(), authorization, peer.as_ref())
        {
            Ok(()) => Either::Right(self.inner.call(req)),
            Err(status) => Either::Left(futures_util::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::hash_token;

    fn settings(extra: &str) -> Settings {
        Settings::from_toml(&format!(
            r#"
            [overload]
            max_requests_per_sec = 2
            max_watch_streams = 1
            exempt_loopback = false
            [[auth.tokens]]
            name = "fast"
            sha256 = "{fast}"
            role = "client"
            tenants = ["t"]
            max_requests_per_sec = 0
            max_watch_streams = 3
            [[auth.tokens]]
            name = "slow"
            sha256 = "{slow}"
            role = "client"
            tenants = ["t"]
            {extra}
            [[tenants]]
            id = "t"
            [[tenants.buckets]]
            name = "b"
            routes = ["* /**"]
            max_in_flight = 1
            "#,
            fast = hash_token("fast-secret"),
            slow = hash_token("slow-secret"),
        ))
        .unwrap()
    }

    fn overload(s: &Settings) -> Arc<Overload> {
        Overload::new(s, Authenticator::new(s.tokens.clone()))
    }

    fn peer(addr: &str, tls: bool) -> PeerInfo {
        PeerInfo::new(Some(addr.parse().unwrap()), tls)
    }

    const ACQUIRE: &str = "/quota.v1.QuotaBroker/Acquire";

    #[tokio::test(start_paused = true)]
    async fn plaintext_token_from_afar_is_refused_before_anything_else() {
        let o = overload(&settings(""));
        let far = peer("203.0.113.9:4000", false);
        let err = o
            .admit(ACQUIRE, Some("Bearer slow-secret"), Some(&far))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("203.0.113.9"), "{}", err.message());
        assert!(err.message().contains("rotate"), "{}", err.message());
        assert!(err.message().contains("https://"), "{}", err.message());
        // Even health checks: the token is exposed either way.
        let err = o
            .admit("/grpc.health.v1.Health/Check", Some("Bearer x"), Some(&far))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        // Over TLS, or from this host, or with no token: fine.
        assert!(o
            .admit(
                ACQUIRE,
                Some("Bearer slow-secret"),
                Some(&peer("203.0.113.9:1", true))
            )
            .is_ok());
        assert!(o
            .admit(
                ACQUIRE,
                Some("Bearer slow-secret"),
                Some(&peer("127.0.0.1:1", false))
            )
            .is_ok());
        assert!(o
            .admit(ACQUIRE, None, Some(&peer("203.0.113.9:2", false)))
            .is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn each_token_has_its_own_rate_and_anonymous_peers_theirs() {
        let o = overload(&settings(""));
        let p = peer("203.0.113.9:1", true);
        for _ in 0..2 {
            o.admit(ACQUIRE, Some("Bearer slow-secret"), Some(&p))
                .unwrap();
        }
        let err = o
            .admit(ACQUIRE, Some("Bearer slow-secret"), Some(&p))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains("\"slow\""), "{}", err.message());
        let ms: u64 = err
            .metadata()
            .get(RETRY_AFTER_MS)
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=500).contains(&ms), "{ms}");
        assert!(err.message().contains(&format!("retry in {ms} ms")));
        // A Release over the token's rate still passes: it frees slots.
        o.admit(RELEASE_PATH, Some("Bearer slow-secret"), Some(&p))
            .unwrap();
        // 0 = no limit for "fast"; anonymous peers are limited per IP.
        for _ in 0..100 {
            o.admit(ACQUIRE, Some("Bearer fast-secret"), Some(&p))
                .unwrap();
        }
        let other = peer("203.0.113.10:1", true);
        for _ in 0..2 {
            o.admit(ACQUIRE, Some("Bearer wrong"), Some(&other))
                .unwrap();
        }
        let err = o
            .admit(ACQUIRE, None, Some(&peer("203.0.113.10:9", true)))
            .unwrap_err();
        assert!(err.message().contains("203.0.113.10"), "{}", err.message());
        // Health checks pass; time heals the rest.
        o.admit("/grpc.health.v1.Health/Check", None, Some(&other))
            .unwrap();
        tokio::time::advance(Duration::from_millis(ms)).await;
        o.admit(ACQUIRE, Some("Bearer slow-secret"), Some(&p))
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn loopback_is_exempt_from_anonymous_limits_only_when_configured() {
        let s = settings("");
        let mut exempt = s.clone();
        exempt.overload.exempt_loopback = true;
        let o = overload(&exempt);
        let local = peer("127.0.0.1:1", false);
        for _ in 0..10 {
            o.admit(ACQUIRE, None, Some(&local)).unwrap();
        }
        // Tokens stay limited on loopback.
        for _ in 0..2 {
            o.admit(ACQUIRE, Some("Bearer slow-secret"), Some(&local))
                .unwrap();
        }
        assert!(o
            .admit(ACQUIRE, Some("Bearer slow-secret"), Some(&local))
            .is_err());
        let o = overload(&s);
        for _ in 0..2 {
            o.admit(ACQUIRE, None, Some(&local)).unwrap();
        }
        assert!(o.admit(ACQUIRE, None, Some(&local)).is_err());
    }

    #[test]
    fn watch_caps_count_per_caller_and_give_back_on_drop() {
        let s = settings("max_watch_streams = 2");
        let o = overload(&s);
        let slow = o.auth.authenticate(Some("Bearer slow-secret")).unwrap();
        let p = peer("203.0.113.9:1", true);
        let a = o.open_watch(&slow, Some(&p)).unwrap();
        let _b = o.open_watch(&slow, Some(&p)).unwrap();
        let err = Status::from(o.open_watch(&slow, Some(&p)).err().unwrap());
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(
            err.message().contains("2 Watch streams"),
            "{}",
            err.message()
        );
        assert!(err.metadata().get(RETRY_AFTER_MS).is_some());
        drop(a);
        assert_eq!(o.watching(Caller::Token(1)), 1);
        let _c = o.open_watch(&slow, Some(&p)).unwrap();
        // "fast" has its own cap of 3.
        let fast = o.auth.authenticate(Some("Bearer fast-secret")).unwrap();
        let held: Vec<_> = (0..3)
            .map(|_| o.open_watch(&fast, Some(&p)).unwrap())
            .collect();
        assert!(o.open_watch(&fast, Some(&p)).is_err());
        drop(held);
        assert_eq!(o.watching(Caller::Token(0)), 0);
    }

    #[test]
    fn every_callers_watch_streams_are_capped_together_loopback_included() {
        // Open mode, loopback exempt from the per-caller caps (the default).
        let s = Settings::from_toml(
            "[server]\nmax_watch_streams = 2\n[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\n\
             name = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 1\n",
        )
        .unwrap();
        assert!(s.overload.exempt_loopback);
        let o = overload(&s);
        let anyone = o.auth.authenticate(None).unwrap();
        let local = peer("127.0.0.1:1", false);
        let a = o.open_watch(&anyone, Some(&local)).unwrap();
        let _b = o
            .open_watch(&anyone, Some(&peer("127.0.0.2:1", false)))
            .unwrap();
        let refused = o.open_watch(&anyone, Some(&local)).err().unwrap();
        assert!(refused.is_broker_wide());
        let err = Status::from(refused);
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(
            err.message().contains("server.max_watch_streams"),
            "{}",
            err.message()
        );
        assert!(err.metadata().get(RETRY_AFTER_MS).is_some());
        // A stream closed gives its place back.
        drop(a);
        let _c = o.open_watch(&anyone, Some(&local)).unwrap();
        assert!(o.open_watch(&anyone, Some(&local)).is_err());
    }

    #[test]
    fn a_caller_at_its_own_cap_is_told_so_not_the_broker_wide_one() {
        let mut s = settings("max_watch_streams = 1");
        s.server.max_watch_streams = 10;
        let o = overload(&s);
        let slow = o.auth.authenticate(Some("Bearer slow-secret")).unwrap();
        let p = peer("203.0.113.9:1", true);
        let _a = o.open_watch(&slow, Some(&p)).unwrap();
        let refused = o.open_watch(&slow, Some(&p)).err().unwrap();
        assert!(!refused.is_broker_wide());
        // The refused one gave back its place among every caller's.
        assert_eq!(o.streams.get(), 1);
    }
}
