//! Configuration: the embedded default, an optional TOML file, and
//! `QUOTA_BROKER__…` environment overrides, layered by the `config` crate and
//! then validated into typed [`Settings`] before anything binds a socket.
//!
//! Validation collects every problem rather than stopping at the first, so an
//! operator fixes a bad file in one go. The embedded default is
//! `examples/broker.toml`, compiled in, so the documented example and the
//! default can never drift apart.
//!
//! | module | owns |
//! |---|---|
//! | `mod.rs` | the typed [`Settings`], their parts and the checks they share |
//! | `load` | the layers (file, default, environment) and [`ConfigError`] |
//! | `collect`, `raw` | the document read as written, validated into `Settings` |
//! | `state_dir` | the state directory: created, checked writable, locked |
//! | `tls` | the TLS files |

mod collect;
mod load;
mod raw;
mod state_dir;
mod tls;

pub(crate) use load::shown;
pub use load::{unread_env_vars, ConfigError};

pub(crate) use tls::{EtcdTls, TlsSettings};

use crate::auth::TokenSettings;
use crate::learning::LearnSettings;
use crate::limits::Route;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

/// Windows longer than a day are almost certainly a unit mistake.
const MAX_WINDOW_MS: u64 = 86_400_000;
/// Keeps bucket arithmetic far from overflow.
const MAX_BURST: u32 = 1_000_000;
/// Most slots of a bucket (`max_in_flight`), in the config and in an
/// operator's change alike: far more concurrent calls than any upstream
/// allows, and a typo (or `u32::MAX`) is not taken for a limit.
pub(crate) const MAX_IN_FLIGHT: u32 = 1_000_000;

/// The embedded default configuration (the content of `examples/broker.toml`).
pub(crate) const DEFAULT_TOML: &str = include_str!("../../examples/broker.toml");

/// Prefix of environment variables that override single keys.
pub(crate) const ENV_PREFIX: &str = "QUOTA_BROKER";

/// Validated, typed configuration of the whole broker.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Process-level settings.
    pub server: ServerSettings,
    /// Upstream organisations, each with its buckets.
    pub tenants: Vec<TenantSettings>,
    /// How the broker learns from reported throttling.
    pub learning: LearnSettings,
    /// Priority classes every tenant starts with, in order.
    pub classes: Vec<ClassSettings>,
    /// Queueing rules.
    pub scheduling: SchedulingSettings,
    /// Bearer tokens; none means open (allowed on loopback only).
    pub tokens: Vec<TokenSettings>,
    /// Request rates and stream caps per caller.
    pub overload: OverloadSettings,
    /// Cluster mode on etcd (`None`: a single broker, state in `state_dir`).
    pub cluster: Option<ClusterSettings>,
}

/// Cluster mode (`[cluster]`): brokers that share tenants through etcd, one
/// leader per tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// etcd endpoints, `http://host:port`, or `https://host:port` with
    /// [`ClusterSettings::etcd_tls`].
    pub etcd: Vec<String>,
    /// This broker's name in the cluster, unique among its members.
    pub node: String,
    /// The gRPC URL clients reach this broker at (sent to them when they
    /// ask a broker that does not lead their tenant).
    pub advertise: String,
    /// Key prefix of the cluster's keys in etcd.
    pub prefix: String,
    /// TTL of this broker's etcd lease (whole seconds): how long a dead
    /// leader's tenants wait before another broker takes them.
    pub lease_ttl: Duration,
    /// A leader stops granting this long before its etcd lease could have
    /// expired (covers the clocks of broker and etcd drifting apart).
    pub safety_margin: Duration,
    /// TLS to etcd (`https://` endpoints): the CA to trust and, for an etcd
    /// with `--client-cert-auth`, the broker's client certificate.
    pub etcd_tls: Option<EtcdTls>,
}

/// Overload protection per caller (`[overload]`); a token's own
/// `max_requests_per_sec` / `max_watch_streams` override these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverloadSettings {
    /// RPCs per second a token may start, and an anonymous caller (open
    /// mode, or no valid token) per peer IP; the burst is one second's
    /// worth. 0: no limit.
    pub max_requests_per_sec: u32,
    /// Watch streams a token (or an anonymous peer IP) may hold open at
    /// once. 0: no limit.
    pub max_watch_streams: u32,
    /// Anonymous callers on a loopback address (127.0.0.0/8, ::1) are not
    /// held to the per-IP limits (tokens always are).
    pub exempt_loopback: bool,
}

impl Default for OverloadSettings {
    fn default() -> Self {
        OverloadSettings {
            max_requests_per_sec: 2_000,
            max_watch_streams: 64,
            exempt_loopback: true,
        }
    }
}

/// A priority class. Its serde form is the `[[classes]]` entry of the
/// config and of the state directory's `admin.toml` alike.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassSettings {
    /// Name clients use in `priority_class`.
    pub name: String,
    /// Lower is served first.
    pub order: u32,
    /// Share weight among classes competing for the same capacity.
    #[serde(default = "one")]
    pub weight: u32,
    /// Share (0–1) of each bucket's burst and slots that lower classes may
    /// never take.
    #[serde(default)]
    pub reserve: f64,
    /// Wait used when an Acquire gives no `max_wait_ms`.
    #[serde(default, rename = "default_max_wait_ms", with = "as_millis")]
    pub default_max_wait: Duration,
}

fn one() -> u32 {
    1
}

/// A `Duration` as whole milliseconds in serde forms.
mod as_millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(crate::clock::millis(*d))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// Queueing rules.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulingSettings {
    /// Class of Acquires that name none.
    pub default_class: String,
    /// Most requests waiting on one bucket instance; past it, an immediate
    /// `granted = false`.
    pub max_waiters_per_bucket: u32,
}

impl ClassSettings {
    /// Checks one class, pushing a line per problem.
    pub fn check(&self, at: &str, problems: &mut Vec<String>) {
        if self.name.trim().is_empty() || self.name.len() > 64 {
            problems.push(format!("{at}: name must be 1 to 64 characters"));
        } else if let Some(problem) = name_problem(&self.name) {
            problems.push(format!("{at}: name {problem}"));
        }
        if self.weight == 0 {
            problems.push(format!("{at}: weight must be at least 1"));
        }
        if !(self.reserve.is_finite() && (0.0..1.0).contains(&self.reserve)) {
            problems.push(format!(
                "{at}: reserve {} must be at least 0 and below 1",
                self.reserve
            ));
        }
        if self.default_max_wait > Duration::from_millis(raw::MAX_WAIT_MS) {
            problems.push(format!(
                "{at}: default_max_wait_ms {} is over an hour ({}); server.max_wait_ms caps \
                 every wait anyway",
                self.default_max_wait.as_millis(),
                raw::MAX_WAIT_MS
            ));
        }
    }

    /// The default set: critical (wallboards), interactive (call-flow
    /// relays), batch (ingestion), best_effort; critical and interactive
    /// each reserve 10% of every bucket.
    pub fn defaults() -> Vec<ClassSettings> {
        let class = |name: &str, order, weight, reserve, wait_ms| ClassSettings {
            name: name.to_owned(),
            order,
            weight,
            reserve,
            default_max_wait: Duration::from_millis(wait_ms),
        };
        vec![
            class("critical", 0, 8, 0.1, 2_000),
            class("interactive", 1, 4, 0.1, 500),
            class("batch", 2, 2, 0.0, 30_000),
            class("best_effort", 3, 1, 0.0, 0),
        ]
    }
}

/// Longest tenant id, bucket name or class name, in bytes: the most an RPC
/// may carry in such a field (`grpc::codec` checks requests against it),
/// so that every configured name can be asked for.
pub(crate) const MAX_ID_LEN: usize = 256;

/// What is wrong with a tenant id, bucket name or class name, if
/// anything: a hidden character ([`hidden_char`]) would break the log line
/// it is printed on or make it print as another name, a `/` the names
/// built from it (the dashboard's `tenant/bucket/client`, a cluster's etcd
/// keys), and a name longer than an RPC may carry could never be named in
/// one (every Acquire of the tenant, every pause of the bucket refused as
/// INVALID_ARGUMENT).
pub(crate) fn name_problem(name: &str) -> Option<String> {
    if let Some(c) = hidden_char(name) {
        Some(format!(
            "must not hold control characters or invisible format characters: it holds {}",
            hidden_char_named(c)
        ))
    } else if name.contains('/') {
        Some("must not hold '/' (it separates names in the dashboard and in etcd keys)".to_owned())
    } else if name.len() > MAX_ID_LEN {
        Some(format!(
            "is {} bytes long, more than a request may carry ({MAX_ID_LEN}), so no request \
             could name it: shorten it",
            name.len()
        ))
    } else {
        None
    }
}

/// The first character of `text` that does not print as itself, if any:
/// a control character (a newline forges a log line, an escape colours a
/// terminal) or an invisible format character ([`is_format`]: a
/// right-to-left override, U+202E, prints the rest of the text backwards,
/// a zero-width space makes two ids look the same). Ids, names
/// and reasons are printed as they are (logs, `quotactl status`, the
/// dashboard), so none may hold one.
pub(crate) fn hidden_char(text: &str) -> Option<char> {
    text.chars().find(|&c| c.is_control() || is_format(c))
}

/// Whether `c` is invisible formatting: the Unicode general category Cf
/// (format characters), listed here by hand from the Unicode 15 data
/// (std has no category lookup, and these ranges change rarely enough not
/// to need a crate for one table), and the line and paragraph separators
/// (Zl, Zp), which break a line where a reader of a log looks for none.
fn is_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}' // soft hyphen
        | '\u{0600}'..='\u{0605}' | '\u{06DD}' | '\u{070F}' // Arabic, Syriac marks
        | '\u{061C}' // Arabic letter mark (bidirectional)
        | '\u{0890}'..='\u{0891}' | '\u{08E2}' // Arabic marks
        | '\u{180E}' // Mongolian vowel separator
        | '\u{200B}'..='\u{200F}' // zero-width space and joiners, LRM, RLM
        | '\u{2028}'..='\u{2029}' // line and paragraph separators
        | '\u{202A}'..='\u{202E}' // bidirectional embeddings and overrides
        | '\u{2060}'..='\u{2064}' // word joiner, invisible operators
        | '\u{2066}'..='\u{206F}' // bidirectional isolates, deprecated format characters
        | '\u{FEFF}' // zero-width no-break space (byte order mark)
        | '\u{FFF9}'..='\u{FFFB}' // interlinear annotation
        | '\u{110BD}' | '\u{110CD}' // Kaithi number signs
        | '\u{13430}'..='\u{1343F}' // Egyptian hieroglyph format controls
        | '\u{1BCA0}'..='\u{1BCA3}' // shorthand format controls
        | '\u{1D173}'..='\u{1D17A}' // musical symbol format controls
        | '\u{E0001}' | '\u{E0020}'..='\u{E007F}' // tags
    )
}

/// A hidden character ([`hidden_char`]) as a problem names it: what kind
/// it is and its code point, never the character itself (which would do
/// what it is refused for).
pub(crate) fn hidden_char_named(c: char) -> String {
    let code = u32::from(c);
    if c.is_control() {
        format!("a control character (U+{code:04X}: a newline, a tab, an escape)")
    } else {
        format!(
            "an invisible format character (U+{code:04X}: a bidirectional control, a \
             zero-width space or joiner)"
        )
    }
}

/// Checks a whole class set (after each class is checked on its own).
pub(crate) fn check_class_set(classes: &[ClassSettings], problems: &mut Vec<String>) {
    let mut names = HashSet::new();
    for c in classes {
        if !names.insert(c.name.as_str()) {
            problems.push(format!("classes: name {:?} is used twice", c.name));
        }
    }
    let total: f64 = classes.iter().map(|c| c.reserve).sum();
    if total >= 1.0 {
        problems.push(format!(
            "classes: reserves add up to {total:.3}; they must stay below 1 so the lowest class can run"
        ));
    }
}

/// Process-level settings.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Address the gRPC server binds.
    pub listen: SocketAddr,
    /// Cap on an Acquire's server-side wait.
    pub max_wait: Duration,
    /// Cap on the TTL a Renew may ask for.
    pub max_lease_ttl: Duration,
    /// Bound on the drain after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Where learned state is kept across restarts (`None`: not kept).
    pub state_dir: Option<std::path::PathBuf>,
    /// TLS on the gRPC port (`None`: plaintext, allowed with tokens only on
    /// a loopback address).
    pub tls: Option<TlsSettings>,
    /// How long a new connection may take to complete its TLS handshake and
    /// send the HTTP/2 preface before it is closed.
    pub handshake_timeout: Duration,
    /// Most connections still in their handshake at once; new ones beyond
    /// it are closed at once.
    pub max_pending_connections: usize,
    /// Most open connections (pending or serving); new ones beyond it are
    /// closed at once.
    pub max_connections: usize,
    /// Most open connections from one peer address (by default a quarter
    /// of `max_connections`): one host cannot take every connection.
    pub max_connections_per_address: usize,
    /// Threads that serve gRPC connections, each running its connections
    /// (their calls, reads and writes) on a single-threaded runtime of its
    /// own; a new connection goes to the one with the fewest open. `0`: on
    /// the runtime the broker was started on. `None` (not set): the
    /// `quota-broker` program uses one per CPU it may run on
    /// ([`ServerSettings::resolve_io_threads`]); a program embedding the
    /// broker serves on its own runtime.
    pub io_threads: Option<usize>,
    /// Address of the HTTP port (`/metrics`, the dashboard, `/healthz`,
    /// `/readyz`); `None`: no HTTP port.
    pub http_listen: Option<SocketAddr>,
    /// Whether `http_listen` was set (in the file or the environment): a
    /// port asked for must be bound, the default one is best effort.
    pub http_listen_required: bool,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// Most Watch streams and dashboard event feeds (`/events`) open at
    /// once, every caller's together, loopback's included; one more is
    /// refused at once. Each keeps its own copy of every bucket instance
    /// it shows.
    pub max_watch_streams: usize,
}

impl ServerSettings {
    /// Sets `io_threads` as the `quota-broker` program runs it when the
    /// config leaves it unset: one thread per CPU the process may run on
    /// (its affinity mask counts, so a broker pinned to one core serves on
    /// one).
    pub fn resolve_io_threads(&mut self) {
        if self.io_threads.is_none() {
            self.io_threads = Some(std::thread::available_parallelism().map_or(1, |n| n.get()));
        }
    }
}

/// How the process writes its log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// One upstream organisation.
#[derive(Debug, Clone)]
pub struct TenantSettings {
    /// Tenant id clients name in requests.
    pub id: String,
    /// Upstream region, informational.
    pub region: Option<String>,
    /// The tenant's limits.
    pub buckets: Vec<BucketSettings>,
}

/// Whether a bucket is one for the whole tenant or one per OAuth client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One instance for the whole tenant.
    Org,
    /// One instance per OAuth client id seen.
    OauthClient,
}

impl Scope {
    /// The name used in configuration and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Org => "org",
            Scope::OauthClient => "oauth_client",
        }
    }
}

/// A rate: `permits` per `window`, holding at most `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Permits per window.
    pub permits: NonZeroU32,
    /// The window.
    pub window: Duration,
    /// Most permits held at once.
    pub burst: NonZeroU32,
}

/// The one rule for a rate, for the config and operators' changes alike:
/// `permits` per `window_ms` (1 ms to one day) holding `burst` (1 to
/// 1 000 000; `None`: as many as `permits`). Each problem names its key.
pub(crate) fn check_rate(
    permits: u32,
    window_ms: u64,
    burst: Option<u32>,
) -> Result<Rate, Vec<(&'static str, String)>> {
    let mut problems = Vec::new();
    let permits_ok = NonZeroU32::new(permits);
    if permits_ok.is_none() {
        problems.push(("permits", "must be above 0".to_owned()));
    }
    if window_ms == 0 || window_ms > MAX_WINDOW_MS {
        problems.push((
            "window_ms",
            format!("{window_ms} must be between 1 and {MAX_WINDOW_MS} (one day)"),
        ));
    }
    // The bucket paces one permit per `window / permits`, in nanoseconds.
    if u64::from(permits) > window_ms.saturating_mul(1_000_000) {
        problems.push((
            "permits",
            format!(
                "{permits} per {window_ms} ms is more than one a nanosecond, finer than the \
                 broker paces: give fewer permits or a longer window"
            ),
        ));
    }
    let burst_ok = match burst {
        None => permits_ok.filter(|p| p.get() <= MAX_BURST),
        Some(b) => NonZeroU32::new(b).filter(|b| b.get() <= MAX_BURST),
    };
    match burst {
        Some(asked) if burst_ok.is_none() => problems.push((
            "burst",
            format!("{asked} must be between 1 and {MAX_BURST} (it defaults to permits)"),
        )),
        None if permits_ok.is_some() && burst_ok.is_none() => problems.push((
            "burst",
            format!(
                "not given, so it would be permits ({permits}), above the most a burst may \
                 be ({MAX_BURST}): give burst explicitly"
            ),
        )),
        _ => {}
    }
    match (permits_ok, burst_ok) {
        (Some(permits), Some(burst)) if problems.is_empty() => Ok(Rate {
            permits,
            window: Duration::from_millis(window_ms),
            burst,
        }),
        _ => Err(problems),
    }
}

/// The one rule for a slot limit, for the config and operators' changes
/// alike: 1 to [`MAX_IN_FLIGHT`] slots.
pub(crate) fn check_max_in_flight(max_in_flight: u32) -> Result<NonZeroU32, String> {
    NonZeroU32::new(max_in_flight)
        .filter(|m| m.get() <= MAX_IN_FLIGHT)
        .ok_or_else(|| format!("{max_in_flight} must be between 1 and {MAX_IN_FLIGHT}"))
}

impl Rate {
    /// The rate in permits per minute.
    pub fn per_minute(&self) -> f64 {
        f64::from(self.permits.get()) * 60.0 / self.window.as_secs_f64()
    }

    /// The burst once the permits become `permits` and no burst is given:
    /// a burst as large as the permits (the default when none is given)
    /// follows them, any other stays. The one rule for an operator's change
    /// and for what of it is saved.
    pub(crate) fn burst_with_permits(&self, permits: u32) -> u32 {
        if self.burst == self.permits {
            permits
        } else {
            self.burst.get()
        }
    }
}

/// One limit of a tenant.
#[derive(Debug, Clone)]
pub struct BucketSettings {
    /// Unique name within the tenant.
    pub name: String,
    /// Org-wide or per OAuth client.
    pub scope: Scope,
    /// Which calls draw on this bucket.
    pub routes: Vec<Route>,
    /// Token-bucket rate, if the bucket limits rate.
    pub rate: Option<Rate>,
    /// Concurrency limit, if the bucket limits concurrency.
    pub max_in_flight: Option<NonZeroU32>,
    /// How long a slot is held without Renew.
    pub lease_ttl: Duration,
    /// Per-OAuth-client buckets: most instances kept.
    pub max_clients: NonZeroU32,
}

#[cfg(test)]
mod tests;
