//! The connections to the brokers given: the bearer token on every call,
//! the bound on each call, and how a call finds a broker that answers it
//! (following the cluster to a tenant's leader as the Rust client does, or
//! asking every broker given).

use super::tls::tls_config;
use crate::cli::{parse_broker_url, TlsArgs};
use crate::error::Error;
use quota_broker::pb::quota_admin_client::QuotaAdminClient;
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

/// How long connecting to the broker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Quiet time on a connection with calls open before quotactl pings the
/// broker, and how long the ping may go unanswered: a broker whose host
/// hangs (connections accepted, nothing answered) fails the call within
/// about 5 s, and the next broker given is tried, as the Rust client does.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest answer accepted (ListBuckets with many per-client instances).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// The metadata for `token`; `None` or an empty token sends none.
    pub fn new(token: Option<&str>) -> Result<Bearer, Error> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(Bearer(None)),
            Some(t) => {
                let mut v: MetadataValue<Ascii> =
                    format!("Bearer {t}").parse().map_err(|_| Error::BadToken)?;
                v.set_sensitive(true);
                Ok(Bearer(Some(v)))
            }
        }
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Authed = InterceptedService<Channel, Bearer>;

/// A connection to one broker.
pub(super) struct Conn {
    url: String,
    /// How long a unary call may take (Watch streams are not bounded).
    call_timeout: Duration,
    pub(super) admin: QuotaAdminClient<Authed>,
    pub(super) broker: QuotaBrokerClient<Authed>,
}

impl Conn {
    async fn open(
        url: &str,
        token: Option<&str>,
        tls: &TlsArgs,
        call_timeout: Duration,
    ) -> Result<Conn, Error> {
        let bearer = Bearer::new(token)?;
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| Error::transport(url, &e))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT);
        if let Some(config) = tls_config(url, tls)? {
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| Error::Tls(quota_broker_client::error_chain(&e)))?;
        }
        let channel = match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(Error::transport(url, &e)),
            Err(_) => {
                return Err(Error::Unreachable {
                    url: url.to_owned(),
                    detail: format!("no connection within {}s", CONNECT_TIMEOUT.as_secs()),
                })
            }
        };
        Ok(Conn {
            url: url.to_owned(),
            call_timeout,
            admin: QuotaAdminClient::with_interceptor(channel.clone(), bearer.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            broker: QuotaBrokerClient::with_interceptor(channel, bearer)
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        })
    }

    /// Awaits a call, bounded by `--timeout`, mapping its errors; on
    /// a failure also the leader the broker named in the
    /// `x-quota-broker-leader` metadata, if any.
    pub(super) async fn call<T>(
        &self,
        f: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, (Error, Option<String>)> {
        match tokio::time::timeout(self.call_timeout, f).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => {
                let leader = s
                    .metadata()
                    .get(quota_broker::LEADER_METADATA)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_broker_url(v).ok());
                Err((Error::status(&self.url, s), leader))
            }
            Err(_) => Err((
                Error::Timeout {
                    url: self.url.clone(),
                    secs: self.call_timeout.as_secs(),
                },
                None,
            )),
        }
    }
}

/// The brokers given, with a connection to each one used so far.
pub(super) struct Cluster {
    pub(super) urls: Vec<String>,
    token: Option<String>,
    pub(super) tls: TlsArgs,
    call_timeout: Duration,
    conns: HashMap<String, Conn>,
}

impl Cluster {
    pub(super) fn new(
        urls: Vec<String>,
        token: Option<String>,
        tls: TlsArgs,
        call_timeout: Duration,
    ) -> Cluster {
        Cluster {
            urls,
            token,
            tls,
            call_timeout,
            conns: HashMap::new(),
        }
    }

    /// The connection to `url`, opened on first use.
    pub(super) async fn conn(&mut self, url: &str) -> Result<&Conn, Error> {
        if !self.conns.contains_key(url) {
            let conn = Conn::open(url, self.token.as_deref(), &self.tls, self.call_timeout).await?;
            self.conns.insert(url.to_owned(), conn);
        }
        Ok(&self.conns[url])
    }

    /// Makes a call for `tenant` on the broker that leads it, the way the
    /// Rust client does: first on the first broker given; a broker that
    /// answers UNAVAILABLE naming the leader (`x-quota-broker-leader`)
    /// sends the call there; one that names none, cannot be reached, or
    /// drops the connection, to the next broker given not tried yet. At
    /// most as many attempts as brokers given plus two. Returns the URL
    /// that answered and its answer; when none did, the one error if only
    /// one broker was tried (as with a single broker), else
    /// [`Error::NoBroker`] naming every broker tried.
    pub(super) async fn call<T, F, Fut>(&mut self, tenant: &str, f: F) -> Result<(String, T), Error>
    where
        F: FnMut(&Conn) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let first = self.urls[0].clone();
        self.call_at(first, tenant, f).await
    }

    /// [`Cluster::call`], first on `url` (a leader a broker named).
    pub(super) async fn call_at<T, F, Fut>(
        &mut self,
        mut url: String,
        tenant: &str,
        mut f: F,
    ) -> Result<(String, T), Error>
    where
        F: FnMut(&Conn) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let most = self.urls.len() + 2;
        let mut tried: Vec<(String, Error)> = Vec::new();
        loop {
            let (error, leader) = match self.conn(&url).await {
                Ok(conn) => match conn.call(f(conn)).await {
                    Ok(answer) => return Ok((url, answer)),
                    Err(failed) => failed,
                },
                Err(e) => (e, None),
            };
            if !error.try_another() {
                return Err(error);
            }
            tried.push((url.clone(), error));
            // A broker already given up on (unreachable, the connection
            // lost, no answer in time) is not asked again on another's word.
            let given_up = |l: &String| {
                tried
                    .iter()
                    .any(|(t, e)| t == l && !matches!(e, Error::Rpc { .. }))
            };
            let next = match leader {
                // "I lead it" cannot come with UNAVAILABLE: do not loop.
                Some(l) if l == url => None,
                Some(l) if !given_up(&l) => Some(l),
                _ => self
                    .urls
                    .iter()
                    .find(|u| !tried.iter().any(|(t, _)| t == *u))
                    .cloned(),
            };
            match next {
                Some(n) if tried.len() < most => url = n,
                _ => break,
            }
        }
        if tried.len() == 1 {
            return Err(tried.remove(0).1);
        }
        Err(Error::NoBroker {
            tenant: Some(tenant.to_owned()),
            tried,
        })
    }

    /// Makes a call over every tenant on every broker given, one after the
    /// other (no following: each answers for the tenants it leads).
    /// Returns the answers, each with its broker's URL, and
    /// [`Error::Partial`] if some broker failed: each such one is reported
    /// on stderr (`quotactl: URL: why`) and left out. When none answers:
    /// the one error for a single broker (as before), else
    /// [`Error::NoBroker`]. Options that cannot work (token, TLS) fail at
    /// once.
    pub(super) async fn each<T, F, Fut>(
        &mut self,
        mut f: F,
    ) -> Result<(Vec<(String, T)>, Option<Error>), Error>
    where
        F: FnMut(&Conn) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut answers = Vec::new();
        let mut failed: Vec<(String, Error)> = Vec::new();
        for url in self.urls.clone() {
            let result = match self.conn(&url).await {
                Ok(conn) => conn.call(f(conn)).await.map_err(|(e, _)| e),
                Err(e) => Err(e),
            };
            match result {
                Ok(answer) => answers.push((url, answer)),
                Err(e @ (Error::BadToken | Error::Tls(_))) => return Err(e),
                Err(e) => failed.push((url, e)),
            }
        }
        if answers.is_empty() {
            if failed.len() == 1 {
                return Err(failed.remove(0).1);
            }
            return Err(Error::NoBroker {
                tenant: None,
                tried: failed,
            });
        }
        let partial = (!failed.is_empty()).then_some(Error::Partial {
            failed: failed.len(),
            total: self.urls.len(),
        });
        for (url, e) in failed {
            eprintln!("quotactl: {url}: {}", e.without_url());
        }
        Ok((answers, partial))
    }
}
