//! Prometheus metrics, in the `quota_broker_` namespace, with bounded label
//! sets: tenants, buckets and classes come from the configuration, reasons
//! and methods from fixed lists; no lease ids, paths or OAuth client ids.
//!
//! Two kinds, so the hot path pays only for what cannot be had otherwise:
//! - counted on the path ([`Metrics`]): grants and denials per class, the
//!   queue wait, reported statuses, RPC latency. A tenant's label set is
//!   resolved into a handle (an `Arc`'d atomic) at its first use and kept,
//!   so a call after that bumps an atomic and allocates nothing; a tenant,
//!   class, reason or status that never happened has no series (made up
//!   front for every tenant, they were some 160 series each, nearly all
//!   zeros: 137 MB a scrape at 10,000 tenants);
//! - read at scrape time ([`BucketCollector`]): rates, tokens, slots,
//!   waiters, freezes and leases, from the same bucket snapshots as
//!   ListBuckets, so the decision itself carries no metric code. These are
//!   every configured bucket's state, exported whether or not it was used.

mod buckets;

pub(crate) use buckets::BucketCollector;

use crate::config::Settings;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

/// A label set: label names are fixed, values come from the configuration.
type Labels = Vec<(&'static str, String)>;

/// Why an Acquire was denied, as a bounded label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DenyReason {
    /// Not enough tokens (the rate).
    Rate,
    /// Every concurrency slot taken.
    Slots,
    /// Frozen after a 429.
    Frozen,
    /// The upstream's own remaining budget says no.
    UpstreamBudget,
    /// Paused by an operator.
    Paused,
    /// Too many waiters already; this one may not queue.
    QueueFull,
    /// A per-OAuth-client bucket tracks as many clients as it may.
    ClientsFull,
    /// Earlier requests of higher or equal classes wait.
    Queue,
    /// The broker is shutting down.
    ShuttingDown,
}

impl DenyReason {
    const ALL: [DenyReason; 9] = [
        DenyReason::Rate,
        DenyReason::Slots,
        DenyReason::Frozen,
        DenyReason::UpstreamBudget,
        DenyReason::Paused,
        DenyReason::QueueFull,
        DenyReason::ClientsFull,
        DenyReason::Queue,
        DenyReason::ShuttingDown,
    ];

    fn label(self) -> &'static str {
        match self {
            DenyReason::Rate => "rate",
            DenyReason::Slots => "slots",
            DenyReason::Frozen => "frozen",
            DenyReason::UpstreamBudget => "upstream_budget",
            DenyReason::Paused => "paused",
            DenyReason::QueueFull => "queue_full",
            DenyReason::ClientsFull => "clients_full",
            DenyReason::Queue => "queue",
            DenyReason::ShuttingDown => "shutting_down",
        }
    }

    /// Classifies a denial by the explanation the tenant gave it. The
    /// explanation is the one description of a denial the decision makes
    /// (it names the first cause per bucket); reading it here keeps the
    /// decision free of metric code. `tests::every_denial_is_classified`
    /// pins the phrases.
    pub(crate) fn of(reason: &str) -> DenyReason {
        // Names in it are quoted (`bucket "frozen-foods"`): read only the
        // words around them.
        let reason = unquoted(reason);
        const PHRASES: [(&str, DenyReason); 9] = [
            ("may not queue", DenyReason::QueueFull),
            ("is paused", DenyReason::Paused),
            ("OAuth clients", DenyReason::ClientsFull),
            ("shutting down", DenyReason::ShuttingDown),
            ("frozen", DenyReason::Frozen),
            ("the upstream reports", DenyReason::UpstreamBudget),
            ("concurrency slots", DenyReason::Slots),
            ("permits for", DenyReason::Rate),
            ("earlier requests wait", DenyReason::Queue),
        ];
        PHRASES
            .iter()
            .find(|(phrase, _)| reason.contains(phrase))
            .map_or(DenyReason::Rate, |&(_, r)| r)
    }
}

/// `text` without its `"…"` parts (names written with `{:?}`, so a quote
/// inside one is escaped).
fn unquoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut quoted, mut escaped) = (false, false);
    for c in text.chars() {
        match (quoted, escaped, c) {
            (false, _, '"') => quoted = true,
            (false, _, c) => out.push(c),
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (true, false, '"') => quoted = false,
            (true, false, _) => {}
        }
    }
    out
}

/// The RPCs timed, by their gRPC path; anything else counts as `other`.
const METHODS: [&str; 15] = [
    "/quota.v1.QuotaBroker/Acquire",
    "/quota.v1.QuotaBroker/Release",
    "/quota.v1.QuotaBroker/Renew",
    "/quota.v1.QuotaBroker/Report",
    "/quota.v1.QuotaBroker/Watch",
    "/quota.v1.QuotaBroker/LeaseStream",
    "/quota.v1.QuotaAdmin/ListBuckets",
    "/quota.v1.QuotaAdmin/SetPriorityClass",
    "/quota.v1.QuotaAdmin/ListPriorityClasses",
    "/quota.v1.QuotaAdmin/SetBucketLimit",
    "/quota.v1.QuotaAdmin/PauseBucket",
    "/quota.v1.QuotaAdmin/ResumeBucket",
    "/quota.v1.QuotaAdmin/ClearLearned",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
];

/// A gRPC status code as a label: its name in snake case.
fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// Upstream status classes of reports.
const STATUSES: [&str; 6] = ["2xx", "3xx", "4xx", "429", "5xx", "other"];

fn status_class(status: u32) -> usize {
    match status {
        429 => 3,
        200..=299 => 0,
        300..=399 => 1,
        400..=499 => 2,
        500..=599 => 4,
        _ => 5,
    }
}

/// Seconds: queue waits and RPC latencies, 100 µs to 60 s.
fn time_buckets() -> impl Iterator<Item = f64> {
    [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0, 30.0, 60.0,
    ]
    .into_iter()
}

/// The wait histograms' family.
type Waits = Family<Labels, Histogram, fn() -> Histogram>;

/// One tenant's handles, each made at its first use.
struct TenantMetrics {
    id: String,
    /// Bucket name → row of `reports`.
    buckets: HashMap<String, usize>,
    /// Per class (config order, then `other`); boxed, so a class never used
    /// costs a pointer.
    classes: Box<[OnceLock<Box<ClassMetrics>>]>,
    /// Per bucket × [`STATUSES`].
    reports: Box<[OnceLock<Counter>]>,
}

/// One tenant's handles of one class.
#[derive(Default)]
struct ClassMetrics {
    grants: OnceLock<Counter>,
    /// Per [`DenyReason::ALL`].
    denials: [OnceLock<Counter>; DenyReason::ALL.len()],
    waits: OnceLock<Histogram>,
}

/// The handle in `slot`, made in `family` at its first use.
fn handle<'a, M: Clone, C: MetricConstructor<M>>(
    slot: &'a OnceLock<M>,
    family: &Family<Labels, M, C>,
    labels: impl FnOnce() -> Labels,
) -> &'a M {
    slot.get_or_init(|| family.get_or_create_owned(&labels()))
}

/// The metrics counted on the request path. Cheap to share (`Arc`); every
/// method is a few atomic operations (and, at a label set's first use, the
/// family's lock).
pub(crate) struct Metrics {
    tenants: Vec<TenantMetrics>,
    /// Class names in config order; index `classes.len()` is `other`.
    classes: Vec<String>,
    default_class: usize,
    grants: Family<Labels, Counter>,
    denials: Family<Labels, Counter>,
    waits: Waits,
    reports: Family<Labels, Counter>,
    rpc: Vec<Histogram>,
    /// Per method and status code, created at the first refusal of each
    /// (refusals are off the hot path; most pairs never happen).
    refusals: Family<Labels, Counter>,
    watch_streams: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers every family in `registry` and the tenants, buckets and
    /// classes of `settings`, whose series are made at their first use.
    pub(crate) fn new(settings: &Settings, registry: &mut Registry) -> Metrics {
        let grants = Family::<Labels, Counter>::default();
        let denials = Family::<Labels, Counter>::default();
        let waits =
            Waits::new_with_constructor((|| Histogram::new(time_buckets())) as fn() -> Histogram);
        let reports = Family::<Labels, Counter>::default();
        let rpc = Family::<Labels, Histogram>::new_with_constructor(
            (|| Histogram::new(time_buckets())) as fn() -> Histogram,
        );
        let refusals = Family::<Labels, Counter>::default();
        let watch_streams = Gauge::default();
        registry.register(
            "grants",
            "Acquires granted, per tenant and priority class",
            grants.clone(),
        );
        registry.register(
            "denials",
            "Acquires denied, per tenant, priority class and reason",
            denials.clone(),
        );
        registry.register(
            "wait_seconds",
            "Time queued Acquires waited for their answer, per tenant and class",
            waits.clone(),
        );
        registry.register(
            "reports",
            "Upstream outcomes reported, per tenant, bucket and status class",
            reports.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "gRPC call latency in the broker until the response starts, per method (streams: until they open)",
            rpc.clone(),
        );
        registry.register(
            "rpc_refusals",
            "gRPC calls answered with an error status, and dashboard event feeds (method \
             /events) refused, per method and code (resource_exhausted: shed under overload \
             or over the stream cap; unavailable: shutting down or not the leader; \
             unauthenticated, permission_denied: tokens)",
            refusals.clone(),
        );
        registry.register(
            "watch_streams",
            "Open Watch streams and dashboard event feeds",
            watch_streams.clone(),
        );
        if let Some(tls) = &settings.server.tls {
            let expiry = Family::<Labels, Gauge>::default();
            registry.register(
                "tls_cert_expiry_timestamp_seconds",
                "When the gRPC port's TLS certificates expire (unix time), per certificate: \
                 server (the broker's own) and client_ca (the first of the client CAs to expire)",
                expiry.clone(),
            );
            expiry
                .get_or_create(&vec![("cert", "server".to_owned())])
                .set(tls.cert_not_after);
            if let Some(at) = tls.client_ca_not_after {
                expiry
                    .get_or_create(&vec![("cert", "client_ca".to_owned())])
                    .set(at);
            }
        }
        let mut classes: Vec<String> = settings.classes.iter().map(|c| c.name.clone()).collect();
        let default_class = classes
            .iter()
            .position(|c| *c == settings.scheduling.default_class)
            .unwrap_or(0);
        classes.push("other".to_owned());
        let tenants = settings
            .tenants
            .iter()
            .map(|t| TenantMetrics {
                id: t.id.clone(),
                buckets: t
                    .buckets
                    .iter()
                    .enumerate()
                    .map(|(i, b)| (b.name.clone(), i))
                    .collect(),
                classes: classes.iter().map(|_| OnceLock::new()).collect(),
                reports: (0..t.buckets.len() * STATUSES.len())
                    .map(|_| OnceLock::new())
                    .collect(),
            })
            .collect();
        let rpc = METHODS
            .iter()
            .chain(std::iter::once(&"other"))
            .map(|m| {
                rpc.get_or_create(&vec![("method", (*m).to_owned())])
                    .clone()
            })
            .collect();
        Metrics {
            tenants,
            classes,
            default_class,
            grants,
            denials,
            waits,
            reports,
            rpc,
            refusals,
            watch_streams,
        }
    }

    /// Tenant `t`'s handles of class index `class`, and its labels.
    fn of_class(
        &self,
        t: usize,
        class: usize,
    ) -> Option<(&ClassMetrics, impl Fn() -> Labels + '_)> {
        let m = self.tenants.get(t)?;
        let name = self.classes.get(class)?;
        let handles = m.classes.get(class)?.get_or_init(Box::default);
        Some((handles, move || {
            vec![("tenant", m.id.clone()), ("class", name.clone())]
        }))
    }

    /// Every `class` label: the configured classes, then `other`.
    pub(crate) fn class_labels(&self) -> &[String] {
        &self.classes
    }

    /// The `class` label of a class name: its own for a configured class,
    /// `other` for one added at run time (label sets stay bounded).
    pub(crate) fn class_label(&self, name: &str) -> &str {
        let known = self.classes.len() - 1;
        self.classes[..known]
            .iter()
            .find(|c| *c == name)
            .map_or("other", String::as_str)
    }

    /// The label index of a class name ("" is the default class).
    pub(crate) fn class(&self, name: &str) -> usize {
        if name.is_empty() {
            return self.default_class;
        }
        let known = self.classes.len() - 1;
        self.classes[..known]
            .iter()
            .position(|c| c == name)
            .unwrap_or(known)
    }

    /// An Acquire of tenant `t`, class index `class` was granted.
    pub(crate) fn granted(&self, t: usize, class: usize) {
        if let Some((c, labels)) = self.of_class(t, class) {
            handle(&c.grants, &self.grants, labels).inc();
        }
    }

    /// An Acquire was denied, for `reason` (the tenant's explanation).
    pub(crate) fn denied(&self, t: usize, class: usize, reason: &str) {
        let r = DenyReason::of(reason);
        if let Some((c, labels)) = self.of_class(t, class) {
            let at = DenyReason::ALL.iter().position(|&x| x == r).unwrap_or(0);
            if let Some(slot) = c.denials.get(at) {
                handle(slot, &self.denials, || {
                    let mut l = labels();
                    l.push(("reason", r.label().to_owned()));
                    l
                })
                .inc();
            }
        }
    }

    /// A queued Acquire waited `waited` for its answer.
    pub(crate) fn waited(&self, t: usize, class: usize, waited: Duration) {
        if let Some((c, labels)) = self.of_class(t, class) {
            handle(&c.waits, &self.waits, labels).observe(waited.as_secs_f64());
        }
    }

    /// A report of `status` was counted on `buckets`.
    pub(crate) fn reported(&self, t: usize, buckets: &[String], status: u32) {
        let Some(m) = self.tenants.get(t) else {
            return;
        };
        let s = status_class(status);
        for b in buckets {
            let Some(&i) = m.buckets.get(b) else {
                continue;
            };
            if let Some(slot) = m.reports.get(i * STATUSES.len() + s) {
                handle(slot, &self.reports, || {
                    vec![
                        ("tenant", m.id.clone()),
                        ("bucket", b.clone()),
                        ("status", STATUSES[s].to_owned()),
                    ]
                })
                .inc();
            }
        }
    }

    /// The method index of a gRPC path, for [`Metrics::rpc_done`].
    pub(crate) fn method(path: &str) -> usize {
        METHODS
            .iter()
            .position(|m| *m == path)
            .unwrap_or(METHODS.len())
    }

    /// The label of a method index.
    pub(crate) fn method_name(method: usize) -> &'static str {
        METHODS.get(method).copied().unwrap_or("other")
    }

    /// An RPC of method index `method` took `took`.
    pub(crate) fn rpc_done(&self, method: usize, took: Duration) {
        if let Some(h) = self.rpc.get(method) {
            h.observe(took.as_secs_f64());
        }
    }

    /// An RPC of method index `method` was answered with the error `code`.
    pub(crate) fn refused(&self, method: usize, code: tonic::Code) {
        self.refusals
            .get_or_create(&vec![
                ("method", Metrics::method_name(method).to_owned()),
                ("code", code_label(code).to_owned()),
            ])
            .inc();
    }

    /// The dashboard's event feed (`/events`) was refused with the HTTP
    /// `status`: counted with the gRPC refusals, under the method `/events`
    /// and the code the same refusal has on gRPC.
    pub(crate) fn feed_refused(&self, status: u16) {
        use tonic::Code;
        let code = match status {
            400 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            429 => Code::ResourceExhausted,
            503 => Code::Unavailable,
            _ => Code::Unknown,
        };
        self.refusals
            .get_or_create(&vec![
                ("method", "/events".to_owned()),
                ("code", code_label(code).to_owned()),
            ])
            .inc();
    }

    /// Counts an open Watch stream or event feed until the guard drops.
    pub(crate) fn watch_opened(&self) -> WatchGuard {
        self.watch_streams.inc();
        WatchGuard(self.watch_streams.clone())
    }
}

/// Counts one open Watch stream while it lives.
#[derive(Debug)]
pub(crate) struct WatchGuard(Gauge);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A registry with the `quota_broker_` prefix.
pub(crate) fn registry() -> Registry {
    Registry::with_prefix("quota_broker")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_certificates_expiry_is_exported() {
        let dir = std::env::temp_dir().join(format!("qb-metrics-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2999, 1, 1);
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join("c.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("c.key"), key.serialize_pem()).unwrap();
        let settings = Settings::from_toml(&format!(
            "[server]\nstate_dir = \"\"\n[server.tls]\ncert = {:?}\nkey = {:?}\n\
             [[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\n\
             max_in_flight = 1\n",
            dir.join("c.pem"),
            dir.join("c.key")
        ))
        .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let mut registry = Registry::with_prefix("quota_broker");
        let _metrics = Metrics::new(&settings, &mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        // 2999-01-01T00:00:00Z
        assert!(
            text.lines().any(|l| l
                == "quota_broker_tls_cert_expiry_timestamp_seconds{cert=\"server\"} 32472144000"),
            "{text}"
        );
        assert!(!text.contains("cert=\"client_ca\""), "{text}");
    }
    use crate::tenant::{AcquireArgs, Decision, TenantState};
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    use tokio::time::Instant;

    fn tenant(buckets: &str) -> (TenantState, Settings) {
        let settings = Settings::from_toml(&format!(
            "[server]\nstate_dir = \"\"\n[scheduling]\nmax_waiters_per_bucket = 1\n\
             [[tenants]]\nid = \"t\"\n{buckets}"
        ))
        .unwrap();
        let t = TenantState::new(
            0,
            &settings.tenants[0],
            &settings,
            Arc::new(AtomicU64::new(0)),
            Instant::now(),
        );
        (t, settings)
    }

    fn args(path: &str) -> AcquireArgs {
        AcquireArgs {
            client_id: "c".into(),
            class: String::new(),
            method: "GET".into(),
            path: path.into(),
            oauth_client: String::new(),
            permits: 1,
            idempotency_key: String::new(),
        }
    }

    fn denial(t: &mut TenantState, path: &str, wait: u64, now: Instant) -> String {
        match t
            .acquire(&args(path), Some(Duration::from_millis(wait)), now)
            .unwrap()
        {
            Decision::Denied(d) => d.reason,
            other => panic!("expected a denial, got {other:?}"),
        }
    }

    /// The explanations the decision gives, each classified as its cause.
    #[tokio::test(start_paused = true)]
    async fn every_denial_is_classified() {
        let (mut t, _) = tenant(
            "[[tenants.buckets]]\nname = \"r\"\nroutes = [\"GET /r\"]\npermits = 1\nwindow_ms = 60000\n\
             [[tenants.buckets]]\nname = \"s\"\nroutes = [\"GET /s\"]\nmax_in_flight = 1\n\
             [[tenants.buckets]]\nname = \"p\"\nroutes = [\"GET /p\"]\nmax_in_flight = 1\n",
        );
        let now = Instant::now();
        assert!(matches!(
            t.acquire(&args("/r"), Some(Duration::ZERO), now).unwrap(),
            Decision::Granted(_)
        ));
        let rate = denial(&mut t, "/r", 0, now);
        assert_eq!(DenyReason::of(&rate), DenyReason::Rate, "{rate}");
        // A bucket's name is not read as the cause.
        let named = rate.replace("\"r\"", "\"frozen-foods \\\" is paused\"");
        assert_ne!(named, rate);
        assert_eq!(DenyReason::of(&named), DenyReason::Rate, "{named}");
        assert!(matches!(
            t.acquire(&args("/s"), Some(Duration::ZERO), now).unwrap(),
            Decision::Granted(_)
        ));
        let slots = denial(&mut t, "/s", 0, now);
        assert_eq!(DenyReason::of(&slots), DenyReason::Slots, "{slots}");
        // One waiter fills the queue (max_waiters_per_bucket = 1).
        assert!(matches!(
            t.acquire(&args("/s"), Some(Duration::from_secs(5)), now)
                .unwrap(),
            Decision::Queued(_)
        ));
        let full = denial(&mut t, "/s", 5000, now);
        assert_eq!(DenyReason::of(&full), DenyReason::QueueFull, "{full}");
        t.set_paused("p", Some("maintenance".into()), now).unwrap();
        let paused = denial(&mut t, "/p", 0, now);
        assert_eq!(DenyReason::of(&paused), DenyReason::Paused, "{paused}");
        assert_eq!(
            DenyReason::of("the broker is shutting down"),
            DenyReason::ShuttingDown
        );
    }

    /// The series of `tenant` in `registry`'s text.
    fn series_of(registry: &Registry, tenant: &str) -> Vec<String> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        let label = format!("tenant=\"{tenant}\"");
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains(&label))
            .map(str::to_owned)
            .collect()
    }

    /// A tenant's request-path series are made at their first use: one
    /// with no traffic has none (made up front, each had some 160, nearly
    /// all zeros), and one used in a class has that class's only.
    #[test]
    fn series_appear_at_their_first_use() {
        let (_, settings) = tenant(
            "[[tenants.buckets]]\nname = \"r\"\nroutes = [\"GET /r\"]\npermits = 1\nwindow_ms = 60000\n",
        );
        let mut registry = registry();
        let m = Metrics::new(&settings, &mut registry);
        assert_eq!(series_of(&registry, "t"), Vec::<String>::new());
        let batch = m.class("batch");
        m.granted(0, batch);
        m.granted(0, batch);
        assert_eq!(
            series_of(&registry, "t"),
            ["quota_broker_grants_total{tenant=\"t\",class=\"batch\"} 2"]
        );
        m.waited(0, batch, Duration::from_millis(3));
        m.denied(0, batch, "bucket \"r\" has 0.00 permits for 1 asked");
        m.reported(0, &["r".to_owned()], 200);
        let series = series_of(&registry, "t");
        // The wait's histogram: 18 bounds, +Inf, sum and count.
        assert_eq!(series.len(), 1 + 21 + 1 + 1, "{series:#?}");
        assert!(series
            .iter()
            .all(|l| !l.contains("class=") || l.contains("class=\"batch\"")));
        assert!(series.contains(
            &"quota_broker_denials_total{tenant=\"t\",class=\"batch\",reason=\"rate\"} 1"
                .to_owned()
        ));
        assert!(series.contains(
            &"quota_broker_reports_total{tenant=\"t\",bucket=\"r\",status=\"2xx\"} 1".to_owned()
        ));
        assert!(series.contains(
            &"quota_broker_wait_seconds_bucket{le=\"0.005\",tenant=\"t\",class=\"batch\"} 1"
                .to_owned()
        ));
    }

    #[test]
    fn label_sets_are_resolved_once_and_counted() {
        let (_, settings) = tenant(
            "[[tenants.buckets]]\nname = \"r\"\nroutes = [\"GET /r\"]\npermits = 1\nwindow_ms = 60000\n",
        );
        let mut registry = registry();
        let m = Metrics::new(&settings, &mut registry);
        let class = m.class("");
        m.granted(0, class);
        m.denied(
            0,
            m.class("batch"),
            "bucket \"r\" has 0.00 permits for 1 asked",
        );
        m.denied(0, m.class("no-such-class"), "capacity is taken");
        m.reported(0, &["r".to_owned()], 429);
        m.rpc_done(
            Metrics::method("/quota.v1.QuotaBroker/Acquire"),
            Duration::from_millis(1),
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let default = &settings.scheduling.default_class;
        assert!(
            text.contains(&format!(
                "quota_broker_grants_total{{tenant=\"t\",class=\"{default}\"}} 1"
            )),
            "{text}"
        );
        assert!(text.contains(
            "quota_broker_denials_total{tenant=\"t\",class=\"batch\",reason=\"rate\"} 1"
        ));
        assert!(text.contains(
            "quota_broker_denials_total{tenant=\"t\",class=\"other\",reason=\"rate\"} 1"
        ));
        assert!(
            text.contains("quota_broker_reports_total{tenant=\"t\",bucket=\"r\",status=\"429\"} 1")
        );
        assert!(text.contains(
            "quota_broker_rpc_duration_seconds_count{method=\"/quota.v1.QuotaBroker/Acquire\"} 1"
        ));
    }
}
