//! Configuration: the embedded default, an optional TOML file, and
//! `QUOTA_BROKER__…` environment overrides, layered by the `config` crate and
//! then validated into typed [`Settings`] before anything binds a socket.
//!
//! Validation collects every problem rather than stopping at the first, so an
//! operator fixes a bad file in one go. The embedded default is
//! `examples/broker.toml`, compiled in, so the documented example and the
//! default can never drift apart.

use crate::auth::{RawToken, TokenSettings};
use crate::learning::LearnSettings;
use crate::limits::Route;
use serde::Deserialize;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::time::Duration;

/// The embedded default configuration (the content of `examples/broker.toml`).
pub(crate) const DEFAULT_TOML: &str = include_str!("../examples/broker.toml");

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
}

/// A priority class.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassSettings {
    /// Name clients use in `priority_class`.
    pub name: String,
    /// Lower is served first.
    pub order: u32,
    /// Share weight among classes competing for the same capacity.
    pub weight: u32,
    /// Share (0–1) of each bucket's burst and slots that lower classes may
    /// never take.
    pub reserve: f64,
    /// Wait used when an Acquire gives no `max_wait_ms`.
    pub default_max_wait: Duration,
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
            "classes: reserves add up to {total}; they must stay below 1 so the lowest class can run"
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

impl Rate {
    /// The rate in permits per minute.
    pub fn per_minute(&self) -> f64 {
        f64::from(self.permits.get()) * 60.0 / self.window.as_secs_f64()
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

/// Every problem found in a configuration, one line each.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    /// One human-readable line per problem.
    pub problems: Vec<String>,
}

impl ConfigError {
    fn one(problem: String) -> Self {
        ConfigError {
            problems: vec![problem],
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    tenants: Vec<RawTenant>,
    #[serde(default)]
    learning: RawLearning,
    #[serde(default)]
    classes: Option<Vec<RawClass>>,
    #[serde(default)]
    scheduling: RawScheduling,
    #[serde(default)]
    auth: RawAuth,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default)]
    tokens: Vec<RawToken>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClass {
    name: String,
    order: u32,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    reserve: f64,
    #[serde(default)]
    default_max_wait_ms: u64,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawScheduling {
    default_class: String,
    max_waiters_per_bucket: u32,
}

impl Default for RawScheduling {
    fn default() -> Self {
        RawScheduling {
            default_class: "batch".to_owned(),
            max_waiters_per_bucket: 1_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLearning {
    beta: f64,
    floor_fraction: f64,
    default_freeze_ms: u64,
    episode_grace_ms: u64,
    recovery_windows: f64,
    probe_hold_windows: f64,
    ratio_window_ms: u64,
    ratio_threshold: f64,
    ratio_min_reports: u64,
    ratio_cut: f64,
    cooldown_ms: u64,
    jitter: f64,
}

impl Default for RawLearning {
    fn default() -> Self {
        let d = LearnSettings::default();
        RawLearning {
            beta: d.beta,
            floor_fraction: d.floor_fraction,
            default_freeze_ms: ms(d.default_freeze),
            episode_grace_ms: ms(d.episode_grace),
            recovery_windows: d.recovery_windows,
            probe_hold_windows: d.probe_hold_windows,
            ratio_window_ms: ms(d.ratio_window),
            ratio_threshold: d.ratio_threshold,
            ratio_min_reports: d.ratio_min_reports,
            ratio_cut: d.ratio_cut,
            cooldown_ms: ms(d.cooldown),
            jitter: d.jitter,
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl RawLearning {
    fn validate(self, problems: &mut Vec<String>) -> LearnSettings {
        let mut share = |key: &str, v: f64, open_zero: bool| {
            let ok = v.is_finite() && v <= 1.0 && if open_zero { v > 0.0 } else { v >= 0.0 };
            if !ok {
                let range = if open_zero {
                    "above 0 and at most 1"
                } else {
                    "between 0 and 1"
                };
                problems.push(format!("learning.{key} = {v} must be {range}"));
            }
        };
        share("beta", self.beta, true);
        share("floor_fraction", self.floor_fraction, true);
        share("ratio_threshold", self.ratio_threshold, false);
        share("ratio_cut", self.ratio_cut, true);
        share("jitter", self.jitter, false);
        if !(self.recovery_windows.is_finite() && self.recovery_windows >= 0.1) {
            problems.push(format!(
                "learning.recovery_windows = {} must be at least 0.1",
                self.recovery_windows
            ));
        }
        if !(self.probe_hold_windows.is_finite() && self.probe_hold_windows >= 0.0) {
            problems.push(format!(
                "learning.probe_hold_windows = {} must be 0 or more",
                self.probe_hold_windows
            ));
        }
        if self.ratio_window_ms < 1000 {
            problems.push("learning.ratio_window_ms must be at least 1000".into());
        }
        LearnSettings {
            beta: self.beta,
            floor_fraction: self.floor_fraction,
            default_freeze: Duration::from_millis(self.default_freeze_ms),
            episode_grace: Duration::from_millis(self.episode_grace_ms),
            recovery_windows: self.recovery_windows,
            probe_hold_windows: self.probe_hold_windows,
            ratio_window: Duration::from_millis(self.ratio_window_ms),
            ratio_threshold: self.ratio_threshold,
            ratio_min_reports: self.ratio_min_reports,
            ratio_cut: self.ratio_cut,
            cooldown: Duration::from_millis(self.cooldown_ms),
            jitter: self.jitter,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: String,
    max_wait_ms: u64,
    max_lease_ttl_ms: u64,
    shutdown_grace_ms: u64,
    state_dir: String,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: "127.0.0.1:50051".to_owned(),
            max_wait_ms: 60_000,
            max_lease_ttl_ms: 600_000,
            shutdown_grace_ms: 10_000,
            state_dir: "state".to_owned(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    id: String,
    region: Option<String>,
    #[serde(default)]
    buckets: Vec<RawBucket>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBucket {
    name: String,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    routes: Vec<String>,
    permits: Option<u32>,
    window_ms: Option<u64>,
    burst: Option<u32>,
    max_in_flight: Option<u32>,
    lease_ttl_ms: Option<u64>,
    max_clients: Option<u32>,
}

const DEFAULT_LEASE_TTL_MS: u64 = 30_000;
const DEFAULT_MAX_CLIENTS: u32 = 10_000;
/// Windows longer than a day are almost certainly a unit mistake.
const MAX_WINDOW_MS: u64 = 86_400_000;
/// Keeps bucket arithmetic far from overflow.
const MAX_BURST: u32 = 1_000_000;

impl Settings {
    /// Loads the configuration: the file at `path` (or the embedded default
    /// when `None`), then overrides from `env` (`QUOTA_BROKER__SECTION__KEY`
    /// pairs; pass `std::env::vars()` in the process, a map in tests).
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|e| {
                ConfigError::one(format!("cannot read config file {}: {e}", path.display()))
            })?,
            None => DEFAULT_TOML.to_owned(),
        };
        let base = config::File::from_str(&text, config::FileFormat::Toml);
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        let raw = config::Config::builder()
            .add_source(base)
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(env)),
            )
            .build()
            .and_then(|c| c.try_deserialize::<RawConfig>())
            .map_err(|e| ConfigError::one(e.to_string()))?;
        raw.validate()
    }

    /// Parses and validates a TOML document, with no environment overrides.
    ///
    /// ```
    /// let s = quota_broker::Settings::from_toml(r#"
    ///     [[tenants]]
    ///     id = "acme"
    ///     [[tenants.buckets]]
    ///     name = "org"
    ///     routes = ["* /**"]
    ///     permits = 300
    ///     window_ms = 60000
    /// "#).unwrap();
    /// assert_eq!(s.tenants[0].buckets[0].rate.unwrap().per_minute(), 300.0);
    /// ```
    pub fn from_toml(toml: &str) -> Result<Settings, ConfigError> {
        let raw = config::Config::builder()
            .add_source(config::File::from_str(toml, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize::<RawConfig>())
            .map_err(|e| ConfigError::one(e.to_string()))?;
        raw.validate()
    }

    /// The embedded default configuration.
    pub fn embedded_default() -> Result<Settings, ConfigError> {
        Settings::from_toml(DEFAULT_TOML)
    }
}

impl RawConfig {
    fn validate(self) -> Result<Settings, ConfigError> {
        let mut problems = Vec::new();
        let server = self.server.validate(&mut problems);
        let learning = self.learning.validate(&mut problems);
        let classes: Vec<ClassSettings> = match self.classes {
            None => ClassSettings::defaults(),
            Some(raw) => raw
                .into_iter()
                .map(|c| ClassSettings {
                    name: c.name,
                    order: c.order,
                    weight: c.weight,
                    reserve: c.reserve,
                    default_max_wait: Duration::from_millis(c.default_max_wait_ms),
                })
                .collect(),
        };
        if classes.is_empty() {
            problems.push("[[classes]] is empty; define at least one priority class".into());
        }
        for (i, c) in classes.iter().enumerate() {
            c.check(&format!("classes[{i}] ({:?})", c.name), &mut problems);
        }
        check_class_set(&classes, &mut problems);
        if !classes
            .iter()
            .any(|c| c.name == self.scheduling.default_class)
        {
            problems.push(format!(
                "scheduling.default_class {:?} is not a configured class",
                self.scheduling.default_class
            ));
        }
        if self.scheduling.max_waiters_per_bucket == 0 {
            problems.push("scheduling.max_waiters_per_bucket must be at least 1".into());
        }
        let tenant_ids: HashSet<&str> = self.tenants.iter().map(|t| t.id.as_str()).collect();
        let tokens: Vec<TokenSettings> = self
            .auth
            .tokens
            .into_iter()
            .enumerate()
            .filter_map(|(i, t)| {
                let at = format!("auth.tokens[{i}] ({:?})", t.name);
                for tenant in &t.tenants {
                    if tenant != "*" && !tenant_ids.contains(tenant.as_str()) {
                        problems.push(format!("{at}: tenant {tenant:?} is not configured"));
                    }
                }
                t.validate(&at, &mut problems)
            })
            .collect();
        if tokens.is_empty() && !server.listen.ip().is_loopback() {
            problems.push(format!(
                "server.listen {} is not a loopback address but no [[auth.tokens]] are configured; \
                 the broker runs without authentication on loopback only",
                server.listen
            ));
        }
        let scheduling = SchedulingSettings {
            default_class: self.scheduling.default_class,
            max_waiters_per_bucket: self.scheduling.max_waiters_per_bucket,
        };
        if self.tenants.is_empty() {
            problems
                .push("no [[tenants]] configured: the broker would have nothing to grant".into());
        }
        let mut ids = HashSet::new();
        let tenants = self
            .tenants
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                if !ids.insert(t.id.clone()) {
                    problems.push(format!("tenants[{i}]: id {:?} is used twice", t.id));
                }
                t.validate(i, &mut problems)
            })
            .collect();
        if problems.is_empty() {
            Ok(Settings {
                server,
                tenants,
                learning,
                classes,
                scheduling,
                tokens,
            })
        } else {
            Err(ConfigError { problems })
        }
    }
}

impl RawServer {
    fn validate(self, problems: &mut Vec<String>) -> ServerSettings {
        let listen = self.listen.parse().unwrap_or_else(|e| {
            problems.push(format!(
                "server.listen {:?} is not an IP:port address ({e})",
                self.listen
            ));
            SocketAddr::from(([127, 0, 0, 1], 0))
        });
        if self.max_lease_ttl_ms == 0 {
            problems.push("server.max_lease_ttl_ms must be above 0".into());
        }
        ServerSettings {
            listen,
            max_wait: Duration::from_millis(self.max_wait_ms),
            max_lease_ttl: Duration::from_millis(self.max_lease_ttl_ms),
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
            state_dir: (!self.state_dir.is_empty()).then(|| self.state_dir.into()),
        }
    }
}

impl RawTenant {
    fn validate(self, i: usize, problems: &mut Vec<String>) -> TenantSettings {
        let at = format!("tenants[{i}] ({:?})", self.id);
        if self.id.trim().is_empty() {
            problems.push(format!("tenants[{i}]: id must not be empty"));
        }
        if self.buckets.is_empty() {
            problems.push(format!("{at}: has no [[tenants.buckets]]"));
        }
        let mut names = HashSet::new();
        let buckets = self
            .buckets
            .into_iter()
            .enumerate()
            .filter_map(|(j, b)| {
                if !names.insert(b.name.clone()) {
                    problems.push(format!(
                        "{at}.buckets[{j}]: name {:?} is used twice",
                        b.name
                    ));
                }
                let at = format!("{at}.buckets[{j}] ({:?})", b.name);
                b.validate(&at, problems)
            })
            .collect();
        TenantSettings {
            id: self.id,
            region: self.region,
            buckets,
        }
    }
}

impl RawBucket {
    fn validate(self, at: &str, problems: &mut Vec<String>) -> Option<BucketSettings> {
        let before = problems.len();
        if self.name.trim().is_empty() {
            problems.push(format!("{at}: name must not be empty"));
        }
        let scope = match self.scope.as_deref() {
            None | Some("org") => Scope::Org,
            Some("oauth_client") => Scope::OauthClient,
            Some(other) => {
                problems.push(format!(
                    "{at}: scope {other:?} is unknown; use \"org\" or \"oauth_client\""
                ));
                Scope::Org
            }
        };
        if self.routes.is_empty() {
            problems.push(format!(
                "{at}: routes is empty; give at least one \"METHOD /path/glob\""
            ));
        }
        let routes = self
            .routes
            .iter()
            .filter_map(|r| {
                Route::parse(r)
                    .map_err(|e| problems.push(format!("{at}: route {r:?}: {e}")))
                    .ok()
            })
            .collect();
        let rate = match (self.permits, self.window_ms) {
            (None, None) => {
                if self.burst.is_some() {
                    problems.push(format!("{at}: burst is set but permits/window_ms are not"));
                }
                None
            }
            (Some(permits), Some(window_ms)) => {
                let permits = NonZeroU32::new(permits);
                if permits.is_none() {
                    problems.push(format!("{at}: permits must be above 0"));
                }
                if window_ms == 0 || window_ms > MAX_WINDOW_MS {
                    problems.push(format!(
                        "{at}: window_ms {window_ms} must be between 1 and {MAX_WINDOW_MS} (one day)"
                    ));
                }
                let burst = match self.burst {
                    None => permits,
                    Some(b) => NonZeroU32::new(b).filter(|b| b.get() <= MAX_BURST),
                };
                if burst.is_some_and(|b| b.get() > MAX_BURST)
                    || (self.burst.is_some() && burst.is_none())
                {
                    problems.push(format!(
                        "{at}: burst must be between 1 and {MAX_BURST} (it defaults to permits)"
                    ));
                }
                permits.zip(burst).map(|(permits, burst)| Rate {
                    permits,
                    window: Duration::from_millis(window_ms),
                    burst,
                })
            }
            (Some(_), None) => {
                problems.push(format!("{at}: permits is set without window_ms"));
                None
            }
            (None, Some(_)) => {
                problems.push(format!("{at}: window_ms is set without permits"));
                None
            }
        };
        let max_in_flight = self.max_in_flight.and_then(|m| {
            let m = NonZeroU32::new(m);
            if m.is_none() {
                problems.push(format!(
                    "{at}: max_in_flight must be above 0 (leave it out for no concurrency limit)"
                ));
            }
            m
        });
        if self.permits.is_none() && self.window_ms.is_none() && self.max_in_flight.is_none() {
            problems.push(format!(
                "{at}: limits nothing; give permits + window_ms, max_in_flight, or both"
            ));
        }
        let lease_ttl_ms = self.lease_ttl_ms.unwrap_or(DEFAULT_LEASE_TTL_MS);
        if lease_ttl_ms == 0 {
            problems.push(format!("{at}: lease_ttl_ms must be above 0"));
        }
        if self.lease_ttl_ms.is_some() && max_in_flight.is_none() {
            problems.push(format!(
                "{at}: lease_ttl_ms only applies to buckets with max_in_flight"
            ));
        }
        let max_clients = match (scope, self.max_clients) {
            (_, None) => NonZeroU32::new(DEFAULT_MAX_CLIENTS),
            (Scope::Org, Some(_)) => {
                problems.push(format!(
                    "{at}: max_clients only applies to scope \"oauth_client\""
                ));
                None
            }
            (Scope::OauthClient, Some(m)) => {
                let m = NonZeroU32::new(m);
                if m.is_none() {
                    problems.push(format!("{at}: max_clients must be above 0"));
                }
                m
            }
        };
        if problems.len() != before {
            return None;
        }
        Some(BucketSettings {
            name: self.name,
            scope,
            routes,
            rate,
            max_in_flight,
            lease_ttl: Duration::from_millis(lease_ttl_ms),
            max_clients: max_clients?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid_and_has_the_documented_buckets() {
        let s = Settings::embedded_default().unwrap();
        assert_eq!(s.server.listen, "127.0.0.1:50051".parse().unwrap());
        let demo = &s.tenants[0];
        assert_eq!(demo.id, "demo");
        let names: Vec<_> = demo.buckets.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["per-client", "analytics-query", "analytics-jobs"]);
        let per_client = &demo.buckets[0];
        assert_eq!(per_client.scope, Scope::OauthClient);
        let rate = per_client.rate.unwrap();
        assert_eq!(rate.per_minute(), 300.0);
        let query = &demo.buckets[1];
        assert!(query.rate.is_some() && query.max_in_flight.is_some());
        assert!(demo.buckets[2].max_in_flight.is_some());
    }

    #[test]
    fn every_problem_is_listed() {
        let err = Settings::from_toml(
            r#"
            [server]
            listen = "nowhere"
            [[tenants]]
            id = "a"
            [[tenants.buckets]]
            name = "x"
            routes = ["FETCH"]
            permits = 0
            window_ms = 1000
            [[tenants.buckets]]
            name = "x"
            routes = ["GET /a"]
            [[tenants]]
            id = "a"
            "#,
        )
        .unwrap_err();
        let all = err.to_string();
        for needle in [
            "server.listen \"nowhere\"",
            "route \"FETCH\"",
            "permits must be above 0",
            "name \"x\" is used twice",
            "limits nothing",
            "id \"a\" is used twice",
            "has no [[tenants.buckets]]",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert_eq!(err.problems.len(), 7, "{all}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Settings::from_toml("[server]\nlisten_on = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(err.to_string().contains("listen_on"), "{err}");
    }

    #[test]
    fn env_overrides_a_key_of_the_default() {
        let env = [(
            "QUOTA_BROKER__SERVER__LISTEN".to_owned(),
            "127.0.0.1:6000".to_owned(),
        )];
        let s = Settings::load(None, env).unwrap();
        assert_eq!(s.server.listen.port(), 6000);
        let env = [(
            "QUOTA_BROKER__SERVER__MAX_WAIT_MS".to_owned(),
            "1500".to_owned(),
        )];
        let s = Settings::load(None, env).unwrap();
        assert_eq!(s.server.max_wait, Duration::from_millis(1500));
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let err = Settings::load(Some(Path::new("/nonexistent/broker.toml")), []).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/broker.toml"),
            "{err}"
        );
    }
}
