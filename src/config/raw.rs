//! The configuration as written (TOML keys, milliseconds, plain numbers) and
//! its validation into typed [`Settings`], which collects every problem
//! rather than stopping at the first.

use super::{
    check_class_set, check_rate, BucketSettings, ClassSettings, ConfigError, OverloadSettings,
    SchedulingSettings, Scope, Settings, TenantSettings,
};
use crate::auth::{RawToken, TokenSettings};
use crate::clock::millis;
use crate::error::clip;
use crate::learning::LearnSettings;
use crate::limits::Route;
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::time::Duration;

mod cluster;
mod server;
use cluster::RawCluster;
use server::RawServer;
pub(crate) use server::MAX_WAIT_MS;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    tenants: Vec<RawTenant>,
    #[serde(default)]
    learning: RawLearning,
    #[serde(default)]
    classes: Option<Vec<ClassSettings>>,
    #[serde(default)]
    scheduling: RawScheduling,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    overload: RawOverload,
    cluster: Option<RawCluster>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawOverload {
    max_requests_per_sec: u32,
    max_watch_streams: u32,
    exempt_loopback: bool,
}

impl Default for RawOverload {
    fn default() -> Self {
        let d = OverloadSettings::default();
        RawOverload {
            max_requests_per_sec: d.max_requests_per_sec,
            max_watch_streams: d.max_watch_streams,
            exempt_loopback: d.exempt_loopback,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default)]
    tokens: Vec<RawToken>,
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
    max_freeze_ms: u64,
    episode_grace_ms: u64,
    recovery_windows: f64,
    probe_hold_windows: f64,
    probe_max_windows: f64,
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
            default_freeze_ms: millis(d.default_freeze),
            max_freeze_ms: millis(d.max_freeze),
            episode_grace_ms: millis(d.episode_grace),
            recovery_windows: d.recovery_windows,
            probe_hold_windows: d.probe_hold_windows,
            probe_max_windows: d.probe_max_windows,
            ratio_window_ms: millis(d.ratio_window),
            ratio_threshold: d.ratio_threshold,
            ratio_min_reports: d.ratio_min_reports,
            ratio_cut: d.ratio_cut,
            cooldown_ms: millis(d.cooldown),
            jitter: d.jitter,
        }
    }
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
        if !(self.probe_max_windows.is_finite() && self.probe_max_windows >= 0.0) {
            problems.push(format!(
                "learning.probe_max_windows = {} must be 0 or more",
                self.probe_max_windows
            ));
        }
        if !(self.probe_hold_windows.is_finite() && self.probe_hold_windows >= 0.0) {
            problems.push(format!(
                "learning.probe_hold_windows = {} must be 0 or more",
                self.probe_hold_windows
            ));
        }
        if self.probe_max_windows > 0.0 && self.probe_max_windows < self.probe_hold_windows {
            problems.push(format!(
                "learning.probe_max_windows = {} is below learning.probe_hold_windows = {}: \
                 the longest wait before probing a ceiling must be at least the first \
                 (0 turns the ceiling memory off)",
                self.probe_max_windows, self.probe_hold_windows
            ));
        }
        if self.max_freeze_ms < 1000 || self.max_freeze_ms < self.default_freeze_ms {
            problems.push(format!(
                "learning.max_freeze_ms = {} must be at least 1000 and at least default_freeze_ms",
                self.max_freeze_ms
            ));
        }
        if self.ratio_window_ms < 1000 {
            problems.push("learning.ratio_window_ms must be at least 1000".into());
        }
        LearnSettings {
            beta: self.beta,
            floor_fraction: self.floor_fraction,
            default_freeze: Duration::from_millis(self.default_freeze_ms),
            max_freeze: Duration::from_millis(self.max_freeze_ms),
            episode_grace: Duration::from_millis(self.episode_grace_ms),
            recovery_windows: self.recovery_windows,
            probe_hold_windows: self.probe_hold_windows,
            probe_max_windows: self.probe_max_windows,
            ratio_window: Duration::from_millis(self.ratio_window_ms),
            ratio_threshold: self.ratio_threshold,
            ratio_min_reports: self.ratio_min_reports,
            ratio_cut: self.ratio_cut,
            cooldown: Duration::from_millis(self.cooldown_ms),
            jitter: self.jitter,
        }
    }
}

/// Most `scheduling.max_waiters_per_bucket`: a queue that long is already
/// minutes of a busy upstream's calls, and each waiter holds memory.
const MAX_WAITERS_PER_BUCKET: u32 = 1_000_000;

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

impl RawConfig {
    pub(super) fn validate(self) -> Result<Settings, ConfigError> {
        let mut problems = Vec::new();
        let tls_asked = self.server.tls.is_set();
        let server = self.server.validate(&mut problems);
        let cluster = self.cluster.map(|c| c.validate(&mut problems));
        if let Some(c) = cluster.as_ref().filter(|_| tls_asked) {
            if c.advertise.to_ascii_lowercase().starts_with("http://") {
                problems.push(format!(
                    "cluster.advertise {} is plaintext but [server.tls] is set: the brokers \
                     would send clients to a TLS port in plaintext; advertise \"https://…\"",
                    crate::error::clip(&c.advertise)
                ));
            }
        }
        let learning = self.learning.validate(&mut problems);
        let classes = self.classes.unwrap_or_else(ClassSettings::defaults);
        if classes.is_empty() {
            problems.push("[[classes]] is empty; define at least one priority class".into());
        }
        for (i, c) in classes.iter().enumerate() {
            c.check(&format!("classes[{i}] ({})", clip(&c.name)), &mut problems);
        }
        check_class_set(&classes, &mut problems);
        if !classes
            .iter()
            .any(|c| c.name == self.scheduling.default_class)
        {
            problems.push(format!(
                "scheduling.default_class {} is not a configured class",
                clip(&self.scheduling.default_class)
            ));
        }
        if !(1..=MAX_WAITERS_PER_BUCKET).contains(&self.scheduling.max_waiters_per_bucket) {
            problems.push(format!(
                "scheduling.max_waiters_per_bucket {} must be between 1 and \
                 {MAX_WAITERS_PER_BUCKET}: each waiting request holds memory and a stream \
                 until it is served or gives up",
                self.scheduling.max_waiters_per_bucket
            ));
        }
        let tenant_ids: HashSet<&str> = self.tenants.iter().map(|t| t.id.as_str()).collect();
        // Entries given but refused are problems of their own, named there.
        let tokens_given = !self.auth.tokens.is_empty();
        let tokens: Vec<(usize, TokenSettings)> = self
            .auth
            .tokens
            .into_iter()
            .enumerate()
            .filter_map(|(i, t)| {
                let at = format!("auth.tokens[{i}] ({})", clip(&t.name));
                for tenant in &t.tenants {
                    if tenant != "*" && !tenant_ids.contains(tenant.as_str()) {
                        problems.push(format!("{at}: tenant {} is not configured", clip(tenant)));
                    }
                }
                Some((i, t.validate(&at, &mut problems)?))
            })
            .collect();
        // One token, one role and one tenant list: a hash listed twice
        // would leave which entry a caller runs as to the order of the file.
        let mut first_of: HashMap<[u8; 32], usize> = HashMap::new();
        for (i, t) in &tokens {
            let first = *first_of.entry(t.hash()).or_insert(*i);
            if first != *i {
                problems.push(format!(
                    "auth.tokens[{i}] ({}): the same sha256 as auth.tokens[{first}]; a token \
                     has one entry (two holders need two tokens)",
                    clip(t.name())
                ));
            }
        }
        let tokens: Vec<TokenSettings> = tokens.into_iter().map(|(_, t)| t).collect();
        if !tokens_given && !server.listen.ip().is_loopback() {
            problems.push(format!(
                "server.listen {} is not a loopback address but no [[auth.tokens]] are configured; \
                 the broker runs without authentication on loopback only",
                server.listen
            ));
        }
        if tokens_given && !server.listen.ip().is_loopback() && !tls_asked {
            problems.push(format!(
                "server.listen {} is not a loopback address and [[auth.tokens]] are configured, \
                 but [server.tls] is not: bearer tokens would cross the network in plaintext, \
                 where anyone on the path can read and replay them; set server.tls.cert and \
                 server.tls.key, or listen on 127.0.0.1 behind a TLS-terminating proxy on this host",
                server.listen
            ));
        }
        if let Some(http) = server.http_listen {
            if !tokens_given && !http.ip().is_loopback() {
                problems.push(format!(
                    "server.http_listen {http} is not a loopback address but no [[auth.tokens]] \
                     are configured: the dashboard shows every tenant's buckets; listen on \
                     127.0.0.1, configure tokens, or set server.http_listen = \"\" to turn it off"
                ));
            }
        }
        let overload = OverloadSettings {
            max_requests_per_sec: self.overload.max_requests_per_sec,
            max_watch_streams: self.overload.max_watch_streams,
            exempt_loopback: self.overload.exempt_loopback,
        };
        let scheduling = SchedulingSettings {
            default_class: self.scheduling.default_class,
            max_waiters_per_bucket: self.scheduling.max_waiters_per_bucket,
        };
        if self.tenants.is_empty() {
            problems
                .push("no [[tenants]] configured: the broker would have nothing to grant".into());
        }
        let mut ids = HashSet::new();
        let mut tags = std::collections::HashMap::new();
        let tenants = self
            .tenants
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                if !ids.insert(t.id.clone()) {
                    problems.push(format!("tenants[{i}]: id {} is used twice", clip(&t.id)));
                } else if let Some(other) =
                    tags.insert(crate::limits::tenant_tag(&t.id), t.id.clone())
                {
                    problems.push(format!(
                        "tenants[{i}]: id {:?} has the same lease-id tag as {:?} (a hash \
                         collision, about one in four billion): rename one of them",
                        clip(&t.id),
                        clip(&other)
                    ));
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
                overload,
                cluster,
            })
        } else {
            Err(ConfigError { problems })
        }
    }
}

/// Longest `lease_ttl_ms` of a bucket: after a crash every slot counts as
/// held for the longest one, and a crashed client's slot is held that long.
const MAX_LEASE_TTL_MS: u64 = 3_600_000;

impl RawTenant {
    fn validate(self, i: usize, problems: &mut Vec<String>) -> TenantSettings {
        let at = format!("tenants[{i}] ({})", clip(&self.id));
        if self.id.trim().is_empty() {
            problems.push(format!("tenants[{i}]: id must not be empty"));
        } else if let Some(problem) = super::name_problem(&self.id) {
            problems.push(format!("tenants[{i}]: id {problem}"));
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
                        "{at}.buckets[{j}]: name {} is used twice",
                        clip(&b.name)
                    ));
                }
                let at = format!("{at}.buckets[{j}] ({})", clip(&b.name));
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
        } else if let Some(problem) = super::name_problem(&self.name) {
            problems.push(format!("{at}: name {problem}"));
        }
        let scope = match self.scope.as_deref() {
            None | Some("org") => Scope::Org,
            Some("oauth_client") => Scope::OauthClient,
            Some(other) => {
                problems.push(format!(
                    "{at}: scope {} is unknown; use \"org\" or \"oauth_client\"",
                    clip(other)
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
                    .map_err(|e| problems.push(format!("{at}: route {}: {e}", clip(r))))
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
            (Some(permits), Some(window_ms)) => match check_rate(permits, window_ms, self.burst) {
                Ok(rate) => Some(rate),
                Err(found) => {
                    for (key, problem) in found {
                        problems.push(format!("{at}: {key} {problem}"));
                    }
                    None
                }
            },
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
            super::check_max_in_flight(m)
                .map_err(|problem| {
                    problems.push(format!(
                        "{at}: max_in_flight {problem} (leave it out for no concurrency limit)"
                    ))
                })
                .ok()
        });
        if self.permits.is_none() && self.window_ms.is_none() && self.max_in_flight.is_none() {
            problems.push(format!(
                "{at}: limits nothing; give permits + window_ms, max_in_flight, or both"
            ));
        }
        let lease_ttl_ms = self.lease_ttl_ms.unwrap_or(DEFAULT_LEASE_TTL_MS);
        if lease_ttl_ms == 0 || lease_ttl_ms > MAX_LEASE_TTL_MS {
            problems.push(format!(
                "{at}: lease_ttl_ms {lease_ttl_ms} must be above 0 and at most an hour \
                 ({MAX_LEASE_TTL_MS}): a crashed client's slots are held that long, and after \
                 a broker's crash every slot is; a long job renews its lease instead"
            ));
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
