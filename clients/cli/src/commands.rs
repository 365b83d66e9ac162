//! What each subcommand does: connect to the broker (with the bearer token on
//! every call), make the RPC, print the answer. Formatting is in
//! [`crate::table`].

use crate::cli::{
    BucketCommand, ClassCommand, ClassSetArgs, ClearArgs, Cli, Command, PauseArgs, ResumeArgs,
    SetLimitArgs, StatusArgs, TlsArgs, WatchArgs,
};
use crate::error::Error;
use crate::table::{self, BucketKey};
use quota_broker::pb::quota_admin_client::QuotaAdminClient;
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use quota_broker::pb::{
    ClearLearnedRequest, ListBucketsRequest, PauseBucketRequest, PriorityClass, QuotaStatus,
    ResumeBucketRequest, SetBucketLimitRequest, SetPriorityClassRequest, WatchRequest,
};
use std::collections::BTreeMap;
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How long connecting to the broker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a unary call may take (Watch streams are not bounded).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
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
    admin: QuotaAdminClient<Authed>,
    broker: QuotaBrokerClient<Authed>,
}

impl Conn {
    async fn open(url: &str, token: Option<&str>, tls: &TlsArgs) -> Result<Conn, Error> {
        let bearer = Bearer::new(token)?;
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| Error::transport(url, &e))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
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
            admin: QuotaAdminClient::with_interceptor(channel.clone(), bearer.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            broker: QuotaBrokerClient::with_interceptor(channel, bearer)
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        })
    }

    /// Awaits a unary call, bounded by [`CALL_TIMEOUT`], mapping its errors.
    async fn call<T>(
        &self,
        f: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(CALL_TIMEOUT, f).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(Error::status(&self.url, s)),
            Err(_) => Err(Error::Timeout {
                url: self.url.clone(),
                secs: CALL_TIMEOUT.as_secs(),
            }),
        }
    }
}

/// TLS for an `https://` URL from the `--ca-cert`, `--client-cert` and
/// `--client-key` options (the system's roots without `--ca-cert`); `None`
/// for `http://`, where the options are an error rather than ignored.
fn tls_config(url: &str, tls: &TlsArgs) -> Result<Option<ClientTlsConfig>, Error> {
    if !url.starts_with("https://") {
        if tls.any() {
            return Err(Error::Tls(format!(
                "--ca-cert, --client-cert and --client-key need an https:// broker URL (got {url})"
            )));
        }
        return Ok(None);
    }
    let read = |flag: &str, path: &Path| {
        std::fs::read(path)
            .map_err(|e| Error::Tls(format!("cannot read {flag} {}: {e}", path.display())))
    };
    let mut config = match &tls.ca_cert {
        Some(ca) => {
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--ca-cert", ca)?))
        }
        None => ClientTlsConfig::new().with_native_roots(),
    };
    match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            config = config.identity(Identity::from_pem(
                read("--client-cert", cert)?,
                read("--client-key", key)?,
            ));
        }
        (None, None) => {}
        _ => {
            return Err(Error::Tls(
                "--client-cert and --client-key go together (a certificate and its key)".into(),
            ))
        }
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
    let conn = Conn::open(&cli.broker, cli.token.as_deref(), &cli.tls).await?;
    match cli.command {
        Command::Status(a) => status(&conn, a).await,
        Command::Watch(a) => watch(&conn, a).await,
        Command::Class(ClassCommand::Set(a)) => class_set(&conn, a).await,
        Command::Bucket(BucketCommand::SetLimit(a)) => set_limit(&conn, a).await,
        Command::Pause(a) => pause(&conn, a).await,
        Command::Resume(a) => resume(&conn, a).await,
        Command::Clear(a) => clear(&conn, a).await,
    }
}

async fn status(conn: &Conn, a: StatusArgs) -> Result<(), Error> {
    let req = ListBucketsRequest {
        tenant: a.tenant.unwrap_or_default(),
    };
    let mut buckets = conn
        .call(conn.admin.clone().list_buckets(req))
        .await?
        .buckets;
    table::sort(&mut buckets);
    if a.json {
        let all: Vec<_> = buckets.iter().map(table::status_json).collect();
        print(&format!("{}\n", pretty(&serde_json::Value::Array(all))))
    } else {
        print(&table::render_status(&buckets))
    }
}

async fn watch(conn: &Conn, a: WatchArgs) -> Result<(), Error> {
    let req = WatchRequest {
        tenant: a.tenant.unwrap_or_default(),
    };
    let mut stream = conn.call(conn.broker.clone().watch(req)).await?;
    let limit = a.count.unwrap_or(u64::MAX);
    let tty = std::io::stdout().is_terminal();
    let mut state: BTreeMap<BucketKey, QuotaStatus> = BTreeMap::new();
    let mut updates = 0u64;
    let failed = |s| Error::status(&conn.url, s);
    while updates < limit {
        let Some(first) = stream.next().await else {
            break;
        };
        let first = first.map_err(failed)?;
        updates += 1;
        if a.json {
            print(&format!("{}\n", table::status_json(&first)))?;
            continue;
        }
        state.insert(table::key(&first), first);
        // Coalesce what arrives right after (the initial snapshot, bursts).
        let deadline = Instant::now() + REDRAW_EVERY;
        let mut ended = false;
        while updates < limit {
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Err(_) => break,
                Ok(None) => {
                    ended = true;
                    break;
                }
                Ok(Some(s)) => {
                    let s = s.map_err(failed)?;
                    updates += 1;
                    state.insert(table::key(&s), s);
                }
            }
        }
        let body = table::render_status(state.values());
        if tty {
            print(&format!(
                "{CLEAR_SCREEN}quotactl watch {}: {} buckets, {updates} updates (Ctrl-C to stop)\n\n{body}",
                conn.url,
                state.len()
            ))?;
        } else {
            print(&format!("{body}\n"))?;
        }
        if ended {
            break;
        }
    }
    Ok(())
}

async fn class_set(conn: &Conn, a: ClassSetArgs) -> Result<(), Error> {
    let req = SetPriorityClassRequest {
        tenant: a.tenant.clone(),
        class: Some(PriorityClass {
            name: a.name.clone(),
            order: a.order,
            weight: a.weight,
            reserve: a.reserve,
            default_max_wait_ms: a.default_max_wait_ms,
        }),
    };
    let class = conn
        .call(conn.admin.clone().set_priority_class(req))
        .await?
        .class;
    match (class, a.json) {
        (Some(c), true) => print(&format!("{}\n", pretty(&table::class_json(&c)))),
        (Some(c), false) => print(&table::render_class(&c)),
        (None, true) => print("null\n"),
        (None, false) => print(&format!("class {} set for tenant {}\n", a.name, a.tenant)),
    }
}

async fn set_limit(conn: &Conn, a: SetLimitArgs) -> Result<(), Error> {
    let req = SetBucketLimitRequest {
        tenant: a.tenant.clone(),
        bucket: a.bucket.clone(),
        permits: a.permits.unwrap_or(0),
        window_ms: a.window_ms.unwrap_or(0),
        burst: a.burst.unwrap_or(0),
        max_in_flight: a.max_in_flight.unwrap_or(0),
    };
    let status = conn
        .call(conn.admin.clone().set_bucket_limit(req))
        .await?
        .status;
    print_status(status, a.json, &a.tenant, &a.bucket, "limit changed")
}

async fn pause(conn: &Conn, a: PauseArgs) -> Result<(), Error> {
    let req = PauseBucketRequest {
        tenant: a.tenant.clone(),
        bucket: a.bucket.clone(),
        reason: a.reason.unwrap_or_default(),
    };
    let status = conn
        .call(conn.admin.clone().pause_bucket(req))
        .await?
        .status;
    print_status(status, a.json, &a.tenant, &a.bucket, "paused")
}

async fn resume(conn: &Conn, a: ResumeArgs) -> Result<(), Error> {
    let req = ResumeBucketRequest {
        tenant: a.tenant.clone(),
        bucket: a.bucket.clone(),
    };
    let status = conn
        .call(conn.admin.clone().resume_bucket(req))
        .await?
        .status;
    print_status(status, a.json, &a.tenant, &a.bucket, "resumed")
}

async fn clear(conn: &Conn, a: ClearArgs) -> Result<(), Error> {
    let req = ClearLearnedRequest {
        tenant: a.tenant.clone(),
        bucket: a.bucket.clone(),
        oauth_client: a.oauth_client.unwrap_or_default(),
    };
    let statuses = conn
        .call(conn.admin.clone().clear_learned(req))
        .await?
        .statuses;
    if a.json {
        let all: Vec<_> = statuses.iter().map(table::status_json).collect();
        return print(&format!("{}\n", pretty(&serde_json::Value::Array(all))));
    }
    if statuses.is_empty() {
        return print(&format!(
            "{}/{}: no instance to clear\n",
            a.tenant, a.bucket
        ));
    }
    print(&table::render_status(&statuses))
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
