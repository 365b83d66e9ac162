//! What each subcommand does: connect to the broker (with the bearer token on
//! every call), make the RPC, print the answer. Formatting is in
//! [`crate::table`].
//!
//! Several brokers (a cluster, `--broker URL,URL,...`): a call for one
//! tenant goes to the first broker given and follows the cluster as the
//! Rust client does ([`Cluster::call`]); a call over every tenant (`status`
//! or `watch` without `--tenant`) goes to every broker given and the
//! answers are merged ([`Cluster::each`]), each broker showing the tenants
//! it leads.

use crate::cli::{
    parse_broker_url, BucketCommand, ClassCommand, ClassListArgs, ClassResetArgs, ClassSetArgs,
    ClearArgs, Cli, Command, PauseArgs, ResumeArgs, SetLimitArgs, StatusArgs, TlsArgs, WatchArgs,
    NEW_CLASS_RESERVE, NEW_CLASS_WEIGHT,
};
use crate::error::{clip, short, Error};
use crate::table::{self, BucketKey};
use quota_broker::pb::quota_admin_client::QuotaAdminClient;
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use quota_broker::pb::{
    ClearLearnedRequest, ListBucketsRequest, ListPriorityClassesRequest, PauseBucketRequest,
    PriorityClass, QuotaStatus, ResumeBucketRequest, SetBucketLimitRequest,
    SetPriorityClassRequest, WatchRequest,
};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;
use tokio::time::Instant;
use tokio_stream::{StreamExt, StreamMap};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How long connecting to the broker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Quiet time on a connection with calls open before quotactl pings the
/// broker, and how long the ping may go unanswered: a broker whose host
/// hangs (connections accepted, nothing answered) fails the call within
/// about 5 s, and the next broker given is tried, as the Rust client does.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);
/// Watch table mode coalesces updates arriving this close together into one redraw.
const REDRAW_EVERY: Duration = Duration::from_millis(100);
/// Largest answer accepted (ListBuckets with many per-client instances).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// ANSI: cursor home, clear screen.
const CLEAR_SCREEN: &str = "\x1b[H\x1b[2J";

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
struct Conn {
    url: String,
    /// How long a unary call may take (Watch streams are not bounded).
    call_timeout: Duration,
    admin: QuotaAdminClient<Authed>,
    broker: QuotaBrokerClient<Authed>,
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
                .map_err(|e| Error::Tls(chain(&e)))?;
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
    async fn call<T>(
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
struct Cluster {
    urls: Vec<String>,
    token: Option<String>,
    tls: TlsArgs,
    call_timeout: Duration,
    conns: HashMap<String, Conn>,
}

impl Cluster {
    fn new(
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
    async fn conn(&mut self, url: &str) -> Result<&Conn, Error> {
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
    async fn call<T, F, Fut>(&mut self, tenant: &str, f: F) -> Result<(String, T), Error>
    where
        F: FnMut(&Conn) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let first = self.urls[0].clone();
        self.call_at(first, tenant, f).await
    }

    /// [`Cluster::call`], first on `url` (a leader a broker named).
    async fn call_at<T, F, Fut>(
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
    async fn each<T, F, Fut>(
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

/// Why the first certificate in `pem` (the client's own) is not valid now,
/// if it is not: the broker would drop the connection without a word.
fn out_of_validity(pem: &[u8]) -> Option<String> {
    let block = x509_parser::pem::Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .find(|b| b.label == "CERTIFICATE")?;
    let (_, cert) = x509_parser::parse_x509_certificate(&block.contents).ok()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_secs()).ok())?;
    let validity = cert.validity();
    if validity.not_after.timestamp() < now {
        Some(format!(
            "the certificate expired on {}: renew it",
            validity.not_after
        ))
    } else if validity.not_before.timestamp() > now {
        Some(format!(
            "the certificate is not valid before {}: check this host's clock",
            validity.not_before
        ))
    } else {
        None
    }
}

/// TLS for an `https://` URL from the `--ca-cert`, `--client-cert` and
/// `--client-key` options (the system's roots without `--ca-cert`); `None`
/// for `http://` (TLS options with one were refused at start:
/// [`crate::cli::Cli::usage_problem`]).
fn tls_config(url: &str, tls: &TlsArgs) -> Result<Option<ClientTlsConfig>, Error> {
    if !url.starts_with("https://") {
        return Ok(None);
    }
    // tonic takes any bytes here and fails only at the handshake, with an
    // error that does not name the file: check the PEM's kind first.
    let read = |flag: &str, path: &Path, kind: &str| {
        let pem = std::fs::read(path)
            .map_err(|e| Error::Tls(format!("cannot read {flag} {}: {e}", path.display())))?;
        let text = String::from_utf8_lossy(&pem);
        // The block's exact kind ("CERTIFICATE REQUEST" is not one, nor is
        // an "ENCRYPTED PRIVATE KEY", which tonic cannot use).
        let found = text.lines().any(|l| {
            l.strip_prefix("-----BEGIN ")
                .and_then(|l| l.strip_suffix("-----"))
                .is_some_and(|k| {
                    k == kind
                        || (kind == "PRIVATE KEY"
                            && matches!(k, "RSA PRIVATE KEY" | "EC PRIVATE KEY"))
                })
        });
        if !found {
            return Err(Error::Tls(format!(
                "{flag} {}: no PEM {} in it (expected a -----BEGIN ...{kind}----- block)",
                path.display(),
                kind.to_ascii_lowercase()
            )));
        }
        // Whole (not cut short: tonic's "Error parsing TLS certificate."
        // named no file), and a certificate that parses.
        let whole = if kind == "CERTIFICATE" {
            quota_broker_client::check_pem_certificates(&pem)
        } else {
            quota_broker_client::check_pem_private_key(&pem)
        };
        whole.map_err(|problem| Error::Tls(format!("{flag} {}: {problem}", path.display())))?;
        Ok(pem)
    };
    let mut config = match &tls.ca_cert {
        Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(
            "--ca-cert",
            ca,
            "CERTIFICATE",
        )?)),
        None => ClientTlsConfig::new().with_native_roots(),
    };
    // One without the other was refused at start (`Cli::usage_problem`).
    if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
        let pem = read("--client-cert", cert, "CERTIFICATE")?;
        if let Some(problem) = out_of_validity(&pem) {
            return Err(Error::Tls(format!(
                "--client-cert {}: {problem}",
                cert.display()
            )));
        }
        config = config.identity(Identity::from_pem(
            pem,
            read("--client-key", key, "PRIVATE KEY")?,
        ));
    }
    if let Some(name) = &tls.tls_server_name {
        config = config.domain_name(name.clone());
    }
    Ok(Some(config))
}

/// An error and its causes on one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<(), Error> {
    let timeout = Duration::from_secs(cli.timeout);
    let mut c = Cluster::new(cli.broker.0, cli.token, cli.tls, timeout);
    // As with one broker: TLS options that cannot apply fail before any call.
    for url in &c.urls {
        tls_config(url, &c.tls)?;
    }
    match cli.command {
        Command::Status(a) => status(&mut c, a).await,
        Command::Watch(a) => watch(&mut c, a).await,
        Command::Class(ClassCommand::List(a)) => class_list(&mut c, a).await,
        Command::Class(ClassCommand::Set(a)) => class_set(&mut c, a).await,
        Command::Class(ClassCommand::Reset(a)) => class_reset(&mut c, a).await,
        Command::Bucket(BucketCommand::SetLimit(a)) => set_limit(&mut c, a).await,
        Command::Pause(a) => pause(&mut c, a).await,
        Command::Resume(a) => resume(&mut c, a).await,
        Command::Clear(a) => clear(&mut c, a).await,
    }
}

/// Merges bucket states from several brokers: one per bucket (the latest
/// snapshot, should two brokers show the same bucket), sorted.
fn merge(answers: impl IntoIterator<Item = QuotaStatus>) -> Vec<QuotaStatus> {
    let mut by_key: BTreeMap<BucketKey, QuotaStatus> = BTreeMap::new();
    for s in answers {
        match by_key.get(&table::key(&s)) {
            Some(old) if old.at_ms >= s.at_ms => {}
            _ => {
                by_key.insert(table::key(&s), s);
            }
        }
    }
    by_key.into_values().collect()
}

async fn status(c: &mut Cluster, a: StatusArgs) -> Result<(), Error> {
    let list = |conn: &Conn, tenant: String| {
        let mut admin = conn.admin.clone();
        async move { admin.list_buckets(ListBucketsRequest { tenant }).await }
    };
    let (mut buckets, partial) = match &a.tenant {
        Some(t) => (
            c.call(t, |conn| list(conn, t.clone())).await?.1.buckets,
            None,
        ),
        None => {
            let (answers, partial) = c.each(|conn| list(conn, String::new())).await?;
            (
                merge(answers.into_iter().flat_map(|(_, r)| r.buckets)),
                partial,
            )
        }
    };
    table::sort(&mut buckets);
    // Every tenant has buckets (a per-client bucket no client uses is
    // listed too, as unused): none listed over every tenant means no
    // broker leads any, not an empty org (said without an empty table).
    if a.tenant.is_none() && buckets.is_empty() && partial.is_none() {
        return Err(Error::NothingLed {
            asked: c.urls.len(),
        });
    }
    if a.json {
        let all: Vec<_> = buckets.iter().map(table::status_json).collect();
        print(&format!("{}\n", pretty(&serde_json::Value::Array(all))))?;
    } else {
        print(&table::render_status(&buckets))?;
    }
    partial.map_or(Ok(()), Err)
}

/// How long `watch --tenant` keeps looking for the tenant's leader after
/// its stream ended (a hand-over, a broker stopped, an election).
const FOLLOW_FOR: Duration = Duration::from_secs(30);
/// The pause between two looks while no broker leads the tenant.
const FOLLOW_PAUSE: Duration = Duration::from_millis(500);
/// How often `watch` over every tenant tries again a broker given whose
/// stream is not open (it stopped, restarted, or did not answer at first).
const REOPEN_EVERY: Duration = Duration::from_secs(2);
/// Bound on one such try, so a hung broker holds up the others' updates
/// no longer.
const REOPEN_TIMEOUT: Duration = Duration::from_secs(1);

/// The Watch streams of one `quotactl watch`, by their broker's URL. Of one
/// tenant (`tenant` set), a stream that ends (the tenant moved to another
/// broker, or its broker stopped) is opened again on the tenant's leader,
/// for at most [`FOLLOW_FOR`]; the new leader's snapshot follows. Of every
/// tenant, a broker whose stream ended (or that did not answer at first)
/// is tried again every [`REOPEN_EVERY`] while the others' streams go on:
/// restarted, it sends what it leads whole.
struct Feed {
    streams: StreamMap<String, tonic::Streaming<QuotaStatus>>,
    tenant: Option<String>,
    /// The URL of the tenant's stream.
    watched: Option<String>,
    /// A stream of the tenant ended: (its URL, the leader it named, why,
    /// since when the leader is looked for).
    lost: Option<(String, Option<String>, String, Instant)>,
    /// The tenant's stream moved to another broker since the last look:
    /// what the old one sent is to be forgotten.
    switched: bool,
    /// Of every tenant: the brokers given whose stream is not open, and
    /// when they are tried again.
    dropped: Vec<String>,
    reopen_at: Instant,
    /// Of every tenant: the brokers whose stream ended since the last
    /// look; what they sent is no longer live.
    gone: Vec<String>,
}

impl Feed {
    /// The next update and the URL of the broker that sent it; `None`
    /// when every stream ended (never for one tenant, which is followed or
    /// fails).
    async fn next(&mut self, c: &mut Cluster) -> Option<Result<(String, QuotaStatus), Error>> {
        loop {
            if let Some(lost) = self.lost.clone() {
                if let Err(e) = self.follow(c, lost).await {
                    return Some(Err(e));
                }
            }
            if !self.dropped.is_empty() && Instant::now() >= self.reopen_at {
                self.reopen(c).await;
            }
            let reopen_at = (!self.dropped.is_empty()).then_some(self.reopen_at);
            let retry = async {
                match reopen_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let next = tokio::select! {
                next = self.streams.next() => next,
                () = retry => continue,
            };
            match next {
                Some((url, Ok(s))) => return Some(Ok((url, s))),
                Some((url, Err(status))) => {
                    let leader = status
                        .metadata()
                        .get(quota_broker::LEADER_METADATA)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| parse_broker_url(v).ok());
                    let error = Error::status(&url, status);
                    if self.tenant.is_none() {
                        self.streams.remove(&url);
                        self.gone.push(url.clone());
                    }
                    if self.tenant.is_none() && !self.streams.is_empty() {
                        // One broker of several ended its Watch (shutting
                        // down, or gone): the others' go on, and it is
                        // tried again.
                        eprintln!(
                            "quotactl: {}: the Watch ended ({}); watching the other brokers, \
                             and this one again once it answers",
                            short(&url),
                            one_line_why(&error.without_url())
                        );
                        self.dropped.push(url);
                        self.reopen_at = Instant::now() + REOPEN_EVERY;
                        continue;
                    }
                    // One broker given and no leader named: nowhere to
                    // follow the tenant to.
                    let nowhere = leader.is_none() && c.urls.len() < 2;
                    if self.tenant.is_none() || !error.try_another() || nowhere {
                        return Some(Err(error));
                    }
                    self.streams.remove(&url);
                    let why = match &leader {
                        Some(l) => format!("the tenant moved to {l}"),
                        None => one_line_why(&error.without_url()),
                    };
                    self.lost = Some((url, leader, why, Instant::now()));
                }
                None => {
                    // Ended without an error: its broker is shutting down.
                    // With no other broker given, so does the watch.
                    let (Some(_), Some(url), true) =
                        (&self.tenant, self.watched.take(), c.urls.len() > 1)
                    else {
                        return None;
                    };
                    let why = "its broker is shutting down".to_owned();
                    self.lost = Some((url, None, why, Instant::now()));
                }
            }
        }
    }

    /// Of every tenant: opens the Watch again on each broker whose stream
    /// is not open; one that does not answer is tried again later.
    async fn reopen(&mut self, c: &mut Cluster) {
        for url in std::mem::take(&mut self.dropped) {
            let opened = tokio::time::timeout(REOPEN_TIMEOUT, async {
                let conn = c.conn(&url).await.ok()?;
                let mut broker = conn.broker.clone();
                conn.call(broker.watch(WatchRequest::default())).await.ok()
            })
            .await
            .ok()
            .flatten();
            match opened {
                Some(stream) => {
                    eprintln!("quotactl: {}: watching it again", short(&url));
                    self.streams.insert(url, stream);
                }
                None => self.dropped.push(url),
            }
        }
        self.reopen_at = Instant::now() + REOPEN_EVERY;
    }

    /// Opens the tenant's stream again on its leader: first the one the
    /// ended stream named, else the brokers given.
    async fn follow(
        &mut self,
        c: &mut Cluster,
        (url, leader, why, since): (String, Option<String>, String, Instant),
    ) -> Result<(), Error> {
        let tenant = self.tenant.clone().unwrap_or_default();
        let mut looking = false;
        loop {
            let start = leader.clone().unwrap_or_else(|| {
                // The next broker given after the one that ended.
                let at = c.urls.iter().position(|u| *u == url).map_or(0, |i| i + 1);
                c.urls[at % c.urls.len()].clone()
            });
            let opened = c
                .call_at(start, &tenant, |conn| {
                    let mut broker = conn.broker.clone();
                    let tenant = tenant.clone();
                    async move { broker.watch(WatchRequest { tenant }).await }
                })
                .await;
            match opened {
                Ok((to, stream)) => {
                    eprintln!(
                        "quotactl: the Watch of tenant {tenant:?} on {url} ended ({why}); following it on {to}"
                    );
                    self.watched = Some(to.clone());
                    self.streams.insert(to, stream);
                    self.lost = None;
                    self.switched = true;
                    return Ok(());
                }
                Err(e) if worth_another_look(&e) && since.elapsed() < FOLLOW_FOR => {
                    // Not at once (a leader dead until its etcd lease runs
                    // out, etcd away): say so now, not only once found, so
                    // the figures on screen are not taken for live ones.
                    if !looking {
                        looking = true;
                        eprintln!(
                            "quotactl: the Watch of tenant {tenant:?} on {url} ended ({why}); \
                             looking for its leader for up to {} s (the figures shown are \
                             from before)",
                            FOLLOW_FOR.as_secs()
                        );
                    }
                    tokio::time::sleep(FOLLOW_PAUSE).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// After the tenant's stream moved to another broker: the old broker's
/// rows go (the new one's snapshot follows), the title names the new one.
fn forget_if_switched(
    feed: &mut Feed,
    state: &mut BTreeMap<BucketKey, QuotaStatus>,
    title: &mut String,
) {
    if std::mem::take(&mut feed.switched) {
        state.clear();
        *title = feed.streams.keys().cloned().collect::<Vec<_>>().join(",");
    }
}

/// Adds `s`, sent by `url`, to the table's rows, and drops the rows no
/// longer live: those of brokers whose stream ended, and those of `s`'s
/// tenant sent by another broker (it no longer leads the tenant).
fn keep_live(
    feed: &mut Feed,
    state: &mut BTreeMap<BucketKey, QuotaStatus>,
    source: &mut BTreeMap<BucketKey, String>,
    url: String,
    s: QuotaStatus,
) {
    for gone in std::mem::take(&mut feed.gone) {
        source.retain(|key, from| {
            let live = *from != gone;
            if !live {
                state.remove(key);
            }
            live
        });
    }
    source.retain(|key, from| {
        let live = key.0 != s.tenant || *from == url;
        if !live {
            state.remove(key);
        }
        live
    });
    if s.scope == "oauth_client" {
        // A per-client bucket's unused row stands for it only while no
        // client's row is there: the two never hold at once.
        let stale: Vec<BucketKey> = state
            .iter()
            .filter(|(k, v)| {
                k.0 == s.tenant
                    && k.1 == s.bucket
                    && k.2 != s.oauth_client
                    && (s.unused || v.unused)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            state.remove(&k);
            source.remove(&k);
        }
    }
    let key = table::key(&s);
    source.insert(key.clone(), url);
    state.insert(key, s);
}

/// Whether no broker led the tenant for now (an election, a broker
/// stopping), rather than a refusal that a later look would meet again.
fn worth_another_look(e: &Error) -> bool {
    match e {
        Error::NoBroker { tried, .. } => tried.iter().all(|(_, e)| e.try_another()),
        e => e.try_another(),
    }
}

/// A reason on one line and at most 160 characters, for a note on stderr.
fn one_line_why(why: &str) -> String {
    let line = why.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(160) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line,
    }
}

async fn watch(c: &mut Cluster, a: WatchArgs) -> Result<(), Error> {
    let open = |conn: &Conn, tenant: String| {
        let mut broker = conn.broker.clone();
        async move { broker.watch(WatchRequest { tenant }).await }
    };
    // Every stream, by its broker's URL.
    let mut streams = StreamMap::new();
    let partial = match &a.tenant {
        Some(t) => {
            let (url, stream) = c.call(t, |conn| open(conn, t.clone())).await?;
            streams.insert(url, stream);
            None
        }
        None => {
            let (answers, partial) = c.each(|conn| open(conn, String::new())).await?;
            for (url, stream) in answers {
                streams.insert(url, stream);
            }
            partial
        }
    };
    // Of every tenant: the brokers that did not answer are tried again.
    let dropped = match &a.tenant {
        Some(_) => Vec::new(),
        None => c
            .urls
            .iter()
            .filter(|u| !streams.contains_key(*u))
            .cloned()
            .collect(),
    };
    let title = streams.keys().cloned().collect::<Vec<_>>().join(",");
    let limit = a.count.unwrap_or(u64::MAX);
    let tty = std::io::stdout().is_terminal();
    let mut state: BTreeMap<BucketKey, QuotaStatus> = BTreeMap::new();
    let mut updates = 0u64;
    let watched = a.tenant.as_ref().and(streams.keys().next().cloned());
    let mut feed = Feed {
        watched,
        streams,
        tenant: a.tenant.clone(),
        lost: None,
        switched: false,
        dropped,
        reopen_at: Instant::now() + REOPEN_EVERY,
        gone: Vec::new(),
    };
    // Which broker sent each row: a tenant is led by one broker at a time,
    // so a row of it from another broker is no longer live, nor is any row
    // of a broker whose stream ended.
    let mut source: BTreeMap<BucketKey, String> = BTreeMap::new();
    let mut title = title;
    while updates < limit {
        let Some(first) = feed.next(c).await else {
            break;
        };
        let (url, first) = first?;
        updates += 1;
        if a.json {
            print(&format!("{}\n", table::status_json(&first)))?;
            continue;
        }
        forget_if_switched(&mut feed, &mut state, &mut title);
        keep_live(&mut feed, &mut state, &mut source, url, first);
        // Coalesce what arrives right after (the initial snapshot, bursts).
        let deadline = Instant::now() + REDRAW_EVERY;
        let mut ended = false;
        while updates < limit {
            match tokio::time::timeout_at(deadline, feed.next(c)).await {
                Err(_) => break,
                Ok(None) => {
                    ended = true;
                    break;
                }
                Ok(Some(s)) => {
                    let (url, s) = s?;
                    updates += 1;
                    forget_if_switched(&mut feed, &mut state, &mut title);
                    keep_live(&mut feed, &mut state, &mut source, url, s);
                }
            }
        }
        let body = table::render_status(state.values());
        if tty {
            print(&format!(
                "{CLEAR_SCREEN}quotactl watch {title}: {} buckets, {updates} updates (Ctrl-C to stop)\n\n{body}",
                state.len()
            ))?;
        } else {
            print(&format!("{body}\n"))?;
        }
        if ended {
            break;
        }
    }
    partial.map_or(Ok(()), Err)
}

async fn class_list(c: &mut Cluster, a: ClassListArgs) -> Result<(), Error> {
    let tenant = given(a.tenant);
    let req = ListPriorityClassesRequest {
        tenant: tenant.clone(),
    };
    let list = c
        .call(&tenant, |conn| {
            let (mut admin, req) = (conn.admin.clone(), req.clone());
            async move { admin.list_priority_classes(req).await }
        })
        .await?
        .1;
    if a.json {
        let classes: Vec<_> = list.classes.iter().map(table::class_json).collect();
        print(&format!(
            "{}\n",
            pretty(&serde_json::json!({
                "tenant": tenant,
                "classes": classes,
                "default_class": list.default_class,
            }))
        ))
    } else {
        print(&table::render_classes(
            &list.classes,
            Some(list.default_class.as_str()),
        ))
    }
}

async fn class_set(c: &mut Cluster, a: ClassSetArgs) -> Result<(), Error> {
    let tenant = given(a.tenant.clone());
    let all_given = a.order.is_some()
        && a.weight.is_some()
        && a.reserve.is_some()
        && a.default_max_wait_ms.is_some();
    // Fields not given keep the class's values: read them as `class list` does.
    let now = if all_given {
        None
    } else {
        let req = ListPriorityClassesRequest {
            tenant: tenant.clone(),
        };
        c.call(&tenant, |conn| {
            let (mut admin, req) = (conn.admin.clone(), req.clone());
            async move { admin.list_priority_classes(req).await }
        })
        .await?
        .1
        .classes
        .into_iter()
        .find(|class| class.name == a.name)
    };
    let class = class_to_set(&a, &tenant, now)?;
    let none = format!("class {} set for tenant {}\n", a.name, tenant);
    send_class(c, &tenant, class, false, a.json, &none).await
}

/// The class `class set` sends: the fields given, the others those of the
/// class `now` in force, or for a new class the config's defaults (a new
/// class has no default order: [`Error::Usage`] without `--order`).
fn class_to_set(
    a: &ClassSetArgs,
    tenant: &str,
    now: Option<PriorityClass>,
) -> Result<PriorityClass, Error> {
    let now = match now {
        Some(now) => now,
        None => PriorityClass {
            name: a.name.clone(),
            order: a.order.ok_or_else(|| {
                Error::Usage(format!(
                    "class {:?} is not one of tenant {:?}'s classes yet: a new class needs \
                     --order (the others default to weight {NEW_CLASS_WEIGHT}, reserve \
                     {NEW_CLASS_RESERVE}, default-max-wait-ms 0)",
                    clip(&a.name, 64),
                    clip(tenant, 64)
                ))
            })?,
            weight: NEW_CLASS_WEIGHT,
            reserve: NEW_CLASS_RESERVE,
            default_max_wait_ms: 0,
        },
    };
    Ok(PriorityClass {
        name: a.name.clone(),
        order: a.order.unwrap_or(now.order),
        weight: a.weight.unwrap_or(now.weight),
        reserve: a.reserve.unwrap_or(now.reserve),
        default_max_wait_ms: a.default_max_wait_ms.unwrap_or(now.default_max_wait_ms),
    })
}

async fn class_reset(c: &mut Cluster, a: ClassResetArgs) -> Result<(), Error> {
    let tenant = given(a.tenant);
    let class = PriorityClass {
        name: a.name.clone(),
        ..Default::default()
    };
    let none = format!(
        "class {} removed from tenant {} (Acquires waiting in it are still served)\n",
        a.name, tenant
    );
    send_class(c, &tenant, class, true, a.json, &none).await
}

/// Sends SetPriorityClass and prints the class now in force (`none`
/// when the answer has none).
async fn send_class(
    c: &mut Cluster,
    tenant: &str,
    class: PriorityClass,
    reset: bool,
    json: bool,
    none: &str,
) -> Result<(), Error> {
    let req = SetPriorityClassRequest {
        tenant: tenant.to_owned(),
        class: Some(class),
        reset,
    };
    let class = c
        .call(tenant, |conn| {
            let (mut admin, req) = (conn.admin.clone(), req.clone());
            async move { admin.set_priority_class(req).await }
        })
        .await?
        .1
        .class;
    match (class, json) {
        (Some(c), true) => print(&format!("{}\n", pretty(&table::class_json(&c)))),
        (Some(c), false) => print(&table::render_class(&c)),
        (None, true) => print("null\n"),
        (None, false) => print(none),
    }
}

async fn set_limit(c: &mut Cluster, a: SetLimitArgs) -> Result<(), Error> {
    let tenant = given(a.tenant);
    let req = SetBucketLimitRequest {
        tenant: tenant.clone(),
        bucket: a.bucket.clone(),
        permits: a.permits.unwrap_or(0),
        window_ms: a.window_ms.unwrap_or(0),
        burst: a.burst.unwrap_or(0),
        max_in_flight: a.max_in_flight.unwrap_or(0),
        reset: a.reset,
    };
    let status = c
        .call(&tenant, |conn| {
            let (mut admin, req) = (conn.admin.clone(), req.clone());
            async move { admin.set_bucket_limit(req).await }
        })
        .await?
        .1
        .status;
    let what = if a.reset {
        "limit reset to the config's"
    } else {
        "limit changed"
    };
    print_status(status, a.json, &tenant, &a.bucket, what)
}

async fn pause(c: &mut Cluster, a: PauseArgs) -> Result<(), Error> {
    let tenant = given(a.tenant);
    let req = PauseBucketRequest {
        tenant: tenant.clone(),
        bucket: a.bucket.clone(),
        reason: a.reason.unwrap_or_default(),
    };
    let status = c
        .call(&tenant, |conn| {
            let (mut admin, req) = (conn.admin.clone(), req.clone());
            async move { admin.pause_bucket(req).await }
        })
        .await?
        .1
        .status;
    print_status(status, a.json, &tenant, &a.bucket, "paused")
}

async fn resume(c: &mut Cluster, a: ResumeArgs) -> Result<(), Error> {
    let tenant = given(a.tenant);
    let req = ResumeBucketRequest {
        tenant: tenant.clone(),
        bucket: a.bucket.clone(),
    };
    let status = c
        .call(&tenant, |conn| {
            let (mut admin, req) = (conn.admin.clone(), req.clone());
            async move { admin.resume_bucket(req).await }
        })
        .await?
        .1
        .status;
    print_status(status, a.json, &tenant, &a.bucket, "resumed")
}

async fn clear(c: &mut Cluster, a: ClearArgs) -> Result<(), Error> {
    let tenant = given(a.tenant);
    let req = ClearLearnedRequest {
        tenant: tenant.clone(),
        bucket: a.bucket.clone(),
        oauth_client: a.oauth_client.unwrap_or_default(),
    };
    let statuses = c
        .call(&tenant, |conn| {
            let (mut admin, req) = (conn.admin.clone(), req.clone());
            async move { admin.clear_learned(req).await }
        })
        .await?
        .1
        .statuses;
    if a.json {
        let all: Vec<_> = statuses.iter().map(table::status_json).collect();
        return print(&format!("{}\n", pretty(&serde_json::Value::Array(all))));
    }
    if statuses.is_empty() {
        return print(&format!("{}/{}: no instance to clear\n", tenant, a.bucket));
    }
    print(&table::render_status(&statuses))
}

/// The tenant of a command for one tenant: given, since
/// [`Cli::usage_problem`] refuses such a command without one.
fn given(tenant: Option<String>) -> String {
    tenant.unwrap_or_default()
}

/// Prints the state an admin change answered with, as a one-row table or JSON.
fn print_status(
    status: Option<QuotaStatus>,
    json: bool,
    tenant: &str,
    bucket: &str,
    what: &str,
) -> Result<(), Error> {
    match (status, json) {
        (Some(s), true) => print(&format!("{}\n", pretty(&table::status_json(&s)))),
        (Some(s), false) => print(&table::render_status([&s])),
        (None, true) => print("null\n"),
        (None, false) => print(&format!("{tenant}/{bucket}: {what}\n")),
    }
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// Writes to stdout and flushes (so `watch` output appears at once).
fn print(s: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes())
        .and_then(|()| out.flush())
        .map_err(Error::Output)
}

#[cfg(test)]
mod tests;
