//! The client's handle ([`BrokerClient`]) and the state its clones share:
//! built from broker URLs and [`ConnectOptions`], asked for leases (from the
//! broker, or from the local fallback while the broker is away) and for a
//! check at start that the broker serves a tenant.

use crate::address;
use crate::error::{is_unreachable, may_have_reached_a_broker, ClientError};
use crate::fallback::{Fallback, FallbackSettings, Route, Take};
use crate::kept::Kept;
use crate::lease::{Counted, Lease};
use crate::release::Unanswered;
use crate::route::{channel, Asked, Conn};
use crate::tls::{tls_refusal, ClientTls};
use crate::Call;
use quota_broker::pb::{ReleaseRequest, WatchRequest};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tonic::metadata::MetadataValue;

/// How [`BrokerClient::connect_with`] connects.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    token: Option<String>,
    tls: Option<ClientTls>,
    fallback: FallbackSettings,
}

impl ConnectOptions {
    /// No token, TLS as the URL says (platform roots for `https://`),
    /// default fallback.
    pub fn new() -> ConnectOptions {
        ConnectOptions::default()
    }

    /// Sends `token` as a bearer token on every call.
    pub fn token(mut self, token: impl Into<String>) -> ConnectOptions {
        self.token = Some(token.into());
        self
    }

    /// TLS settings; the URL must then be `https://`.
    pub fn tls(mut self, tls: ClientTls) -> ConnectOptions {
        self.tls = Some(tls);
        self
    }

    /// The local limiter used while the broker is unreachable.
    pub fn fallback(mut self, fallback: FallbackSettings) -> ConnectOptions {
        self.fallback = fallback;
        self
    }
}

pub(crate) struct Inner {
    /// The broker calls go to now (std `Mutex`: never held across `.await`).
    conn: Mutex<Conn>,
    /// The configured broker URLs, tried in turn when one does not answer.
    pub(crate) urls: Vec<String>,
    /// TLS for every broker URL (`None`: the platform's roots for https).
    pub(crate) tls: Option<ClientTls>,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
    /// std `Mutex`: held for a check of the local limiter, never across `.await`.
    fallback: Mutex<Fallback>,
    /// Outcomes the broker could not be told yet (std `Mutex`: never held
    /// across `.await`).
    kept: Mutex<Kept>,
    /// A probe of the broker runs in the background (while falling back).
    pub(crate) probing: AtomicBool,
    /// Releases of dropped leases still on their way to the broker.
    pub(crate) releasing: std::sync::atomic::AtomicUsize,
    /// Told when the last of them is done.
    pub(crate) released: tokio::sync::Notify,
    /// Leases held that count against the fallback's cap on calls in
    /// flight: the broker's that hold slots, and the fallback's own.
    pub(crate) in_flight: std::sync::atomic::AtomicUsize,
    /// Told each time one of them ends.
    pub(crate) freed: tokio::sync::Notify,
    /// The URLs found not to be a quota-broker's gRPC port, with what they
    /// are and when that was found: passed over for [`RECHECK_NOT_A_BROKER`]
    /// after it, then tried again (a load balancer that misrouted during a
    /// deploy); each logged once while it stays what it was (std `Mutex`:
    /// never held across `.await`).
    ///
    /// [`RECHECK_NOT_A_BROKER`]: crate::RECHECK_NOT_A_BROKER
    pub(crate) said_not_a_broker:
        Mutex<std::collections::HashMap<String, (String, tokio::time::Instant)>>,
    /// Whether a URL was asked what it speaks ([`address::first_answer`]),
    /// and when: a URL that answered in gRPC once is never asked again,
    /// another at most once per [`ASK_EVERY`], so a broker under load or
    /// going down is not sent a probe connection per failed call (std
    /// `Mutex`: never held across `.await`).
    ///
    /// [`ASK_EVERY`]: crate::route::ASK_EVERY
    pub(crate) asked: Mutex<std::collections::HashMap<String, Asked>>,
}

/// The longest a call that gives no `max_wait` waits for the local
/// fallback (the broker's default `server.max_wait_ms`).
pub const FALLBACK_MAX_WAIT: Duration = Duration::from_secs(60);

/// A connection to the broker (cheap to clone).
#[derive(Clone)]
pub struct BrokerClient {
    pub(crate) inner: Arc<Inner>,
}

/// The brokers it was given and whether it is falling back; never the
/// token.
impl std::fmt::Debug for BrokerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerClient")
            .field("urls", &self.inner.urls)
            .field("tls", &self.inner.tls.is_some())
            .field("token", &self.inner.token.is_some())
            .finish_non_exhaustive()
    }
}

impl BrokerClient {
    /// A client for the broker at `url` (`http://` or `https://`, the
    /// latter trusting the platform's roots), sending `token` as a bearer
    /// token. Connects lazily, so a broker that is down at start means
    /// fallback, not failure. For a cluster, `url` lists several brokers,
    /// comma-separated: calls follow the tenant's leader (the
    /// `x-quota-broker-leader` answer) and move to the next broker when
    /// one does not answer.
    pub fn connect(url: &str, token: Option<&str>) -> Result<BrokerClient, ClientError> {
        Self::with_fallback(url, token, FallbackSettings::default())
    }

    /// Like [`BrokerClient::connect`], with explicit fallback settings.
    pub fn with_fallback(
        url: &str,
        token: Option<&str>,
        fallback: FallbackSettings,
    ) -> Result<BrokerClient, ClientError> {
        let mut options = ConnectOptions::new().fallback(fallback);
        options.token = token.map(str::to_owned);
        Self::connect_with(url, options)
    }

    /// A client for the broker at `url` with explicit `options` (token,
    /// TLS, fallback). TLS settings need an `https://` URL; a bad CA,
    /// certificate or key is an error here, not at the first call.
    pub fn connect_with(url: &str, options: ConnectOptions) -> Result<BrokerClient, ClientError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ClientError::NoRuntime);
        }
        if let Some(tls) = &options.tls {
            tls.check()?;
        }
        // Checked here: a URL that can never be dialled would otherwise
        // read as a broker that is down, and every call would quietly run
        // on the fallback rate.
        let urls: Vec<String> = url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(address::broker_url)
            .collect::<Result<_, _>>()?;
        let first = urls.first().ok_or_else(|| ClientError::Url {
            url: address::shown(url),
            message: "no broker URL given".into(),
        })?;
        let mut clients = Vec::new();
        for u in &urls {
            clients.push(channel(u, options.tls.as_ref())?);
        }
        let token = options
            .token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| ClientError::Token)
            })
            .transpose()?;
        Ok(BrokerClient {
            inner: Arc::new(Inner {
                conn: Mutex::new(Conn {
                    url: first.clone(),
                    client: clients.swap_remove(0),
                }),
                urls,
                tls: options.tls,
                token,
                fallback: Mutex::new(Fallback::new(options.fallback)),
                kept: Mutex::new(Kept::default()),
                probing: AtomicBool::new(false),
                releasing: std::sync::atomic::AtomicUsize::new(0),
                released: tokio::sync::Notify::new(),
                in_flight: std::sync::atomic::AtomicUsize::new(0),
                freed: tokio::sync::Notify::new(),
                said_not_a_broker: Mutex::default(),
                asked: Mutex::default(),
            }),
        })
    }

    /// The broker URL calls go to now (the leader of a cluster, once one
    /// answered that it is not).
    pub fn current_url(&self) -> String {
        self.conn().url.clone()
    }

    pub(crate) fn conn(&self) -> std::sync::MutexGuard<'_, Conn> {
        self.inner
            .conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = &self.inner.token {
            r.metadata_mut().insert("authorization", t.clone());
        }
        r
    }

    pub(crate) fn fallback(&self) -> std::sync::MutexGuard<'_, Fallback> {
        self.inner
            .fallback
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.inner
            .kept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks for a lease for `call`. Not granted within the wait is
    /// [`ClientError::NotGranted`]. If the broker is unreachable, the lease
    /// comes from the local fallback limiter instead
    /// ([`Lease::is_fallback`]).
    pub async fn acquire(&self, call: &Call) -> Result<Lease, ClientError> {
        let started = tokio::time::Instant::now();
        loop {
            let route = self.fallback().route();
            if route == (Route::Local { probe: true }) {
                self.probe_in_background();
            }
            if route == Route::Broker {
                let req = call.acquire_request();
                let unanswered = Unanswered::of(self, &req);
                let answer = self
                    .rpc(|mut c| {
                        let req = self.request(req.clone());
                        async move { c.acquire(req).await }
                    })
                    .await;
                unanswered.answered();
                // Not a broker: the caller's error, never a fallback lease.
                let answer = match answer {
                    Ok(r) => Ok(r),
                    Err(e) => Err(e.status()?),
                };
                match answer {
                    Ok(r) => {
                        self.fallback().broker_answered();
                        self.send_kept_in_background();
                        if !r.granted {
                            return Err(ClientError::NotGranted {
                                reason: r.reason,
                                retry_after: Duration::from_millis(r.retry_after_ms),
                            });
                        }
                        let lease =
                            Lease::new(self.clone(), call.clone(), r.lease_id, r.lease_ttl_ms)
                                .with_buckets(r.buckets);
                        let slots = lease
                            .counted
                            .is_some()
                            .then(|| self.inner.in_flight.load(Ordering::Acquire));
                        self.fallback().granted(call.permits, slots);
                        return Ok(lease);
                    }
                    Err(s) if tls_refusal(&s).is_some() => {
                        return Err(ClientError::Tls(tls_refusal(&s).unwrap_or_default()))
                    }
                    Err(s) if is_unreachable(&s) => {
                        // The broker may have read it before it stopped
                        // answering: once it is back, a lease it granted
                        // nobody holds is released by the Acquire's key.
                        if may_have_reached_a_broker(&s) && !req.idempotency_key.is_empty() {
                            self.kept().keep_release(ReleaseRequest {
                                tenant: req.tenant,
                                acquire_key: req.idempotency_key,
                                ..Default::default()
                            });
                        }
                        self.fallback().broker_unreachable(&s)
                    }
                    Err(s) => return Err(s.into()),
                }
            }
            // Armed before the count is read, so a lease ending in between
            // is not missed.
            let freed = self.inner.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let cap = self.fallback().max_in_flight();
            let counted = match cap {
                None => None,
                Some(cap) => match Counted::take(&self.inner, cap) {
                    Some(c) => Some(c),
                    None => {
                        let probe_every = self.fallback().probe_every();
                        let most = call.max_wait.unwrap_or(FALLBACK_MAX_WAIT);
                        let left = most.saturating_sub(started.elapsed());
                        if left.is_zero() {
                            return Err(ClientError::NotGranted {
                                reason: format!(
                                    "quota broker unreachable: local fallback limit of {cap} \
                                     at once (half the slots this client held)"
                                ),
                                retry_after: probe_every,
                            });
                        }
                        let nap = probe_every.min(left);
                        // Until a lease ends, or the next probe is due.
                        let _ = tokio::time::timeout(nap, freed).await;
                        continue;
                    }
                },
            };
            let take = self.fallback().try_take();
            match take {
                Take::Taken => return Ok(Lease::local(self.clone(), call.clone(), counted)),
                // Waiting for the local limiter, the broker is probed again
                // meanwhile; once it answers, waiting calls ask it instead
                // of going out unleased all at once.
                Take::Wait {
                    permit_in,
                    nap,
                    retry_after,
                } => {
                    // Told "not now" at once, as the broker would, not held
                    // past the wait.
                    let most = call.max_wait.unwrap_or(FALLBACK_MAX_WAIT);
                    if started.elapsed() + permit_in > most {
                        return Err(ClientError::NotGranted {
                            reason: format!(
                                "quota broker unreachable: local fallback limit of {}/min",
                                self.fallback().per_min()
                            ),
                            // The broker may answer at the next probe (a
                            // hand-over takes well under a second): not the
                            // local permit's 10 s at 6 a minute.
                            retry_after,
                        });
                    }
                    tokio::time::sleep(nap).await
                }
                Take::BrokerBack => {}
            }
        }
    }

    /// Checks that the broker serves `tenant` to this client, as a service
    /// does at start so that a wrong token or tenant stops it there rather
    /// than failing every call later: `Ok(true)` it does; `Ok(false)` not
    /// checked: no broker answered within `within`, asked every 250 ms
    /// meanwhile (calls would use the fallback rate until one does), or,
    /// at once, one answered that this caller is over its limits
    /// (RESOURCE_EXHAUSTED: its request rate or Watch cap; calls are
    /// answered `Overloaded`, not sent to the fallback); an error is the
    /// broker's refusal (an unknown tenant, a token it does not know or
    /// not scoped to the tenant).
    /// Reads the snapshot of a Watch of the tenant (following a cluster to
    /// its leader): nothing is granted, reported or counted.
    pub async fn check(&self, tenant: &str, within: Duration) -> Result<bool, ClientError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let watch = self.rpc(|mut c| {
                let req = self.request(WatchRequest {
                    tenant: tenant.to_owned(),
                });
                async move {
                    let mut stream = c.watch(req).await?.into_inner();
                    stream.message().await.map(tonic::Response::new)
                }
            });
            let s = match tokio::time::timeout_at(deadline, watch).await {
                Ok(Ok(_)) => return Ok(true),
                Ok(Err(e)) => e.status()?,
                Err(_) => return Ok(false),
            };
            if let Some(why) = tls_refusal(&s) {
                return Err(ClientError::Tls(why));
            }
            // Over its limits: a broker that answers, and would be asked
            // again against its retry-after-ms (the Watch cap's is a
            // second). Not a refusal of the token or tenant either (an
            // unknown token is limited by its address before it is
            // refused): not checked.
            if s.code() == tonic::Code::ResourceExhausted {
                return Ok(false);
            }
            if !is_unreachable(&s) {
                return Err(s.into());
            }
            // Not answering yet (a broker starting beside this service, a
            // cluster electing a leader): asked again until `within` ends,
            // not taken for a broker that is away after one try.
            let pause = CHECK_AGAIN_AFTER
                .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            if pause.is_zero() {
                return Ok(false);
            }
            tokio::time::sleep(pause).await;
        }
    }
}

/// The pause between two tries of [`BrokerClient::check`].
const CHECK_AGAIN_AFTER: Duration = Duration::from_millis(250);
