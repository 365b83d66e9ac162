//! The simulator's configuration: serde types of the TOML in
//! testbed/gcsim/README.md, the built-in default, and validation into the
//! values the org model runs on. Every duration here is simulated ms.

use serde::Deserialize;

use crate::error::SimError;
use crate::jobs::JobsConfig;
use crate::route::Route;

/// The time scales the simulator runs at: past them a simulated instant
/// no longer fits a `Duration` (a thousandth is a simulated second per
/// 17 real minutes; ten thousand a simulated day in under 9 real seconds).
pub const TIME_SCALES: std::ops::RangeInclusive<f64> = 0.001..=10_000.0;

/// The whole simulator: its orgs, time scale, seed and escalation.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Simulated ms per real ms (`--time-scale` overrides).
    pub time_scale: f64,
    /// Seed of the analytics data (`--seed` overrides).
    pub seed: u64,
    /// First penalty for hammering during a block, simulated ms.
    pub escalation_base_ms: u64,
    /// Longest penalty, simulated ms.
    pub escalation_max_ms: u64,
    /// The orgs.
    pub orgs: Vec<OrgConfig>,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            time_scale: 1.0,
            seed: 1,
            escalation_base_ms: 1_000,
            escalation_max_ms: 60_000,
            orgs: vec![OrgConfig::default()],
        }
    }
}

/// One Genesys Cloud org.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrgConfig {
    /// Org id: the `<org>` of `Authorization: Bearer <org>:<client>`.
    pub id: String,
    /// Requests per OAuth client token per token window.
    pub token_permits: u64,
    /// Token window, simulated ms.
    pub token_window_ms: u64,
    /// Conversations in the day of analytics history.
    pub conversations_per_day: u64,
    /// That day, `YYYY-MM-DD` (UTC).
    pub day: String,
    /// Days of history from `day` on, `conversations_per_day` each.
    pub days: u64,
    /// Whether the `inin-ratelimit-*` headers describe the token limit.
    pub token_tell: bool,
    /// How a token refusal's `Retry-After` is rounded.
    pub token_retry_after: RetryAfter,
    /// Endpoint families with org-wide limits.
    pub families: Vec<FamilyConfig>,
    /// The analytics details jobs API's limits and timing.
    pub jobs: JobsConfig,
    /// The secret of this org's OAuth clients (`POST /oauth/token` with
    /// client id `<client>@<org>`).
    pub oauth_secret: String,
    /// Lifetime of an access token it issues, real seconds.
    pub token_ttl_s: u64,
}

/// How a limit admits requests (see the README).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    /// At most `permits` per window; windows aligned to the start.
    #[default]
    FixedWindow,
    /// A bucket of `burst` tokens refilled continuously at `permits` per
    /// window; a request takes one.
    TokenBucket,
    /// At most `permits` in any span of one window (the last `window_ms`).
    SlidingLog,
}

impl LimitKind {
    /// The name in the config and in `/_sim/stats`.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::FixedWindow => "fixed_window",
            LimitKind::TokenBucket => "token_bucket",
            LimitKind::SlidingLog => "sliding_log",
        }
    }
}

/// How `Retry-After` is computed from the exact time until the limit admits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryAfter {
    /// The exact simulated time (the header has decimals when scaled).
    #[default]
    Exact,
    /// Rounded up to whole simulated seconds.
    WholeSeconds,
}

impl RetryAfter {
    /// `ms` rounded as this says (simulated ms).
    pub(crate) fn round(self, ms: f64) -> f64 {
        match self {
            RetryAfter::Exact => ms,
            // Whole ms first, so float noise never rounds 2 s up to 3.
            RetryAfter::WholeSeconds => ((ms.round() / 1000.0).ceil() * 1000.0).max(1000.0),
        }
    }
}

/// How the unmanaged consumer's requests fall in time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnmanagedPattern {
    /// Each window's requests spread evenly through it.
    #[default]
    Steady,
    /// Each window's requests back to back (10 simulated ms apart) from a
    /// pseudo-random point in the first half of the window.
    Bursty,
    /// Like steady, but the requests per window move linearly from one
    /// step's `per_window` to the next step's (constant after the last).
    Ramping,
}

impl Default for OrgConfig {
    fn default() -> OrgConfig {
        OrgConfig {
            id: "org-a".into(),
            token_permits: 300,
            token_window_ms: 60_000,
            conversations_per_day: 20_000,
            day: "2026-11-01".into(),
            days: 1,
            token_tell: true,
            token_retry_after: RetryAfter::Exact,
            families: vec![
                FamilyConfig {
                    name: "analytics-query".into(),
                    routes: vec!["POST /api/v2/analytics/**/query".into()],
                    documented_permits: 60,
                    hidden_permits: Some(45),
                    max_concurrent: Some(10),
                    unmanaged: vec![UnmanagedStep {
                        at_ms: 0,
                        per_window: 5,
                    }],
                    ..FamilyConfig::default()
                },
                FamilyConfig {
                    name: "conversation-writes".into(),
                    routes: vec!["POST /api/v2/conversations/**".into()],
                    documented_permits: 300,
                    ..FamilyConfig::default()
                },
            ],
            jobs: JobsConfig::default(),
            oauth_secret: "gcsim-secret".into(),
            token_ttl_s: 86_400,
        }
    }
}

/// An endpoint family: routes sharing one org-wide limit.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FamilyConfig {
    /// Name (in stats, 429 reasons, limits/namespaces).
    pub name: String,
    /// `"METHOD /path/glob"` patterns: `*` matches within one path segment,
    /// `**` any number of whole segments (see the README).
    pub routes: Vec<String>,
    /// Permits per window that limits/namespaces reports.
    pub documented_permits: u64,
    /// Permits per window really enforced (default: documented).
    pub hidden_permits: Option<u64>,
    /// Window, simulated ms.
    pub window_ms: u64,
    /// Requests in flight at once, org-wide (default: unlimited).
    pub max_concurrent: Option<u64>,
    /// Changes of the hidden limit at simulated times.
    pub schedule: Vec<ScheduleStep>,
    /// The unmanaged consumer's requests per window, piecewise constant.
    pub unmanaged: Vec<UnmanagedStep>,
    /// How the limit admits requests.
    pub kind: LimitKind,
    /// Token bucket only: its capacity (default: the enforced permits).
    pub burst: Option<u64>,
    /// Whether the `inin-ratelimit-*` headers describe this limit.
    pub tell: bool,
    /// How a refusal's `Retry-After` is rounded.
    pub retry_after: RetryAfter,
    /// How the unmanaged consumer's requests fall in time.
    pub unmanaged_pattern: UnmanagedPattern,
}

impl Default for FamilyConfig {
    fn default() -> FamilyConfig {
        FamilyConfig {
            name: String::new(),
            routes: Vec::new(),
            documented_permits: 0,
            hidden_permits: None,
            window_ms: 60_000,
            max_concurrent: None,
            schedule: Vec::new(),
            unmanaged: Vec::new(),
            kind: LimitKind::FixedWindow,
            burst: None,
            tell: false,
            retry_after: RetryAfter::Exact,
            unmanaged_pattern: UnmanagedPattern::Steady,
        }
    }
}

/// From `at_ms` on, the family enforces `hidden_permits`.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleStep {
    /// Simulated ms.
    pub at_ms: u64,
    /// Enforced permits per window from then on.
    pub hidden_permits: u64,
}

/// From `at_ms` on, the unmanaged consumer sends `per_window` requests in
/// every window of the family.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnmanagedStep {
    /// Simulated ms.
    pub at_ms: u64,
    /// Requests per family window.
    pub per_window: u64,
}

/// A family ready to run: routes parsed, schedules sorted.
#[derive(Clone, Debug)]
pub(crate) struct Family {
    pub(crate) name: String,
    pub(crate) routes: Vec<Route>,
    /// The namespace limits/namespaces lists it under (the path segment
    /// after `/api/v2/` of its first route).
    pub(crate) namespace: String,
    pub(crate) documented: u64,
    pub(crate) hidden: u64,
    pub(crate) window_ms: u64,
    pub(crate) max_concurrent: Option<u64>,
    pub(crate) schedule: Vec<ScheduleStep>,
    pub(crate) unmanaged: Vec<UnmanagedStep>,
    pub(crate) kind: LimitKind,
    pub(crate) burst: Option<u64>,
    pub(crate) tell: bool,
    pub(crate) retry_after: RetryAfter,
    pub(crate) pattern: UnmanagedPattern,
}

impl SimConfig {
    /// Parses a TOML config; keys left out keep their defaults.
    pub fn from_toml(text: &str) -> Result<SimConfig, SimError> {
        toml::from_str(text).map_err(|e| SimError::Config(vec![e.to_string()]))
    }

    /// Every problem with the config, or nothing (`Sim::start` checks it
    /// too; call it first to fail before binding anything).
    pub fn check(&self) -> Result<(), SimError> {
        self.ready().map(drop)
    }

    /// Every org ready to run (in config order), or every problem.
    pub(crate) fn ready(&self) -> Result<Vec<ReadyOrg<'_>>, SimError> {
        let mut problems = Vec::new();
        if !TIME_SCALES.contains(&self.time_scale) {
            problems.push(format!(
                "time_scale must be from {} to {}, got {}",
                TIME_SCALES.start(),
                TIME_SCALES.end(),
                self.time_scale
            ));
        }
        if self.escalation_base_ms == 0 || self.escalation_max_ms < self.escalation_base_ms {
            problems.push("escalation_base_ms must be > 0 and <= escalation_max_ms".into());
        }
        if self.orgs.is_empty() {
            problems.push("at least one [[orgs]] is needed".into());
        }
        let mut ready = Vec::new();
        for (i, org) in self.orgs.iter().enumerate() {
            if org.id.is_empty() || org.id.contains(':') {
                problems.push(format!("orgs[{i}].id must be non-empty without ':'"));
            }
            if self.orgs[..i].iter().any(|o| o.id == org.id) {
                problems.push(format!("orgs[{i}].id {:?} appears twice", org.id));
            }
            if org.oauth_secret.is_empty() || org.token_ttl_s == 0 {
                problems.push(format!(
                    "org {}: oauth_secret must be non-empty and token_ttl_s > 0",
                    org.id
                ));
            }
            if org.token_permits == 0 || org.token_window_ms == 0 {
                problems.push(format!(
                    "org {}: token_permits and token_window_ms must be > 0",
                    org.id
                ));
            }
            let day_ms = crate::data::parse_day(&org.day);
            if day_ms.is_none() {
                problems.push(format!(
                    "org {}: day {:?} is not YYYY-MM-DD",
                    org.id, org.day
                ));
            }
            if !(1..=366).contains(&org.days) {
                problems.push(format!("org {}: days must be 1-366", org.id));
            }
            if let Some(problem) = org.jobs.problem() {
                problems.push(format!("org {}: {problem}", org.id));
            }
            let mut families = Vec::new();
            for (j, f) in org.families.iter().enumerate() {
                match f.ready() {
                    Ok(family) => families.push(family),
                    Err(e) => problems.push(format!("org {} families[{j}]: {e}", org.id)),
                }
                if org.families[..j].iter().any(|g| g.name == f.name) {
                    problems.push(format!("org {}: family {:?} appears twice", org.id, f.name));
                }
            }
            if let Some(day_ms) = day_ms {
                ready.push(ReadyOrg {
                    config: org,
                    families,
                    day_ms,
                });
            }
        }
        if problems.is_empty() {
            Ok(ready)
        } else {
            Err(SimError::Config(problems))
        }
    }
}

/// An org ready to run: its config, its families, its day's midnight.
pub(crate) struct ReadyOrg<'a> {
    pub(crate) config: &'a OrgConfig,
    pub(crate) families: Vec<Family>,
    /// Unix ms of the midnight its analytics history starts at.
    pub(crate) day_ms: i64,
}

impl FamilyConfig {
    /// Whether one of its routes matches a request with `method` to `path`
    /// (a route that does not parse matches nothing; `check` reports it).
    pub fn covers(&self, method: &str, path: &str) -> bool {
        self.routes
            .iter()
            .filter_map(|r| Route::parse(r).ok())
            .any(|r| r.matches(method, path))
    }

    /// The family ready to run, or what is wrong with it.
    pub(crate) fn ready(&self) -> Result<Family, String> {
        if self.name.is_empty() {
            return Err("name is empty".into());
        }
        if self.routes.is_empty() {
            return Err(format!("{}: at least one route is needed", self.name));
        }
        let routes = self
            .routes
            .iter()
            .map(|r| Route::parse(r).map_err(|e| format!("{}: route {r:?}: {e}", self.name)))
            .collect::<Result<Vec<_>, _>>()?;
        if self.window_ms == 0 {
            return Err(format!("{}: window_ms must be > 0", self.name));
        }
        if self.hidden_permits.unwrap_or(self.documented_permits) == 0 {
            return Err(format!(
                "{}: the enforced permits (hidden_permits, or documented_permits when \
                 hidden_permits is left out) must be > 0: a limit of 0 refuses every request",
                self.name
            ));
        }
        if self.schedule.iter().any(|s| s.hidden_permits == 0) {
            return Err(format!(
                "{}: a schedule step's hidden_permits must be > 0: a limit of 0 refuses every \
                 request",
                self.name
            ));
        }
        if self.max_concurrent == Some(0) {
            return Err(format!(
                "{}: max_concurrent must be > 0 (leave it out for no limit)",
                self.name
            ));
        }
        if self.burst.is_some() && self.kind != LimitKind::TokenBucket {
            return Err(format!(
                "{}: burst is for kind = \"token_bucket\" only",
                self.name
            ));
        }
        if self.burst == Some(0) {
            return Err(format!("{}: burst must be > 0", self.name));
        }
        let namespace = self.routes[0]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.strip_prefix("/api/v2/"))
            .and_then(|p| p.split('/').next())
            .unwrap_or("platform-api")
            .to_owned();
        let mut schedule = self.schedule.clone();
        schedule.sort_by_key(|s| s.at_ms);
        let mut unmanaged = self.unmanaged.clone();
        unmanaged.sort_by_key(|s| s.at_ms);
        let schedule_at = schedule.iter().map(|s| s.at_ms);
        let unmanaged_at = unmanaged.iter().map(|s| s.at_ms);
        for (key, at) in [
            ("schedule", repeated(schedule_at)),
            ("unmanaged", repeated(unmanaged_at)),
        ] {
            if let Some(at) = at {
                return Err(format!(
                    "{}: {key} has two steps at at_ms = {at}: which one holds from then is \
                     ambiguous",
                    self.name
                ));
            }
        }
        Ok(Family {
            name: self.name.clone(),
            routes,
            namespace,
            documented: self.documented_permits,
            hidden: self.hidden_permits.unwrap_or(self.documented_permits),
            window_ms: self.window_ms,
            max_concurrent: self.max_concurrent,
            schedule,
            unmanaged,
            kind: self.kind,
            burst: self.burst,
            tell: self.tell,
            retry_after: self.retry_after,
            pattern: self.unmanaged_pattern,
        })
    }
}

/// The first value that `sorted` has twice in a row, if any.
fn repeated(sorted: impl Iterator<Item = u64>) -> Option<u64> {
    let mut last = None;
    for at in sorted {
        if last == Some(at) {
            return last;
        }
        last = Some(at);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_the_documented_one() {
        let c = SimConfig::default();
        c.check().unwrap();
        let org = &c.orgs[0];
        assert_eq!(org.id, "org-a");
        let analytics = org.families[0].ready().unwrap();
        assert_eq!(
            (
                analytics.documented,
                analytics.hidden,
                analytics.max_concurrent
            ),
            (60, 45, Some(10))
        );
        assert_eq!(analytics.namespace, "analytics");
        let writes = org.families[1].ready().unwrap();
        assert_eq!((writes.documented, writes.hidden), (300, 300));
        assert_eq!(writes.namespace, "conversations");
    }

    #[test]
    fn toml_keeps_defaults_for_missing_keys() {
        let c = SimConfig::from_toml(
            "seed = 9\n[[orgs]]\nid = \"x\"\n[[orgs.families]]\nname = \"f\"\n\
             routes = [\"GET /api/v2/users/**\"]\ndocumented_permits = 5\n\
             schedule = [{ at_ms = 10, hidden_permits = 3 }]",
        )
        .unwrap();
        c.check().unwrap();
        assert_eq!((c.seed, c.time_scale), (9, 1.0));
        assert_eq!(c.orgs[0].token_permits, 300);
        let f = c.orgs[0].families[0].ready().unwrap();
        assert_eq!((f.hidden, f.schedule[0].hidden_permits), (5, 3));
    }

    #[test]
    fn every_problem_is_listed() {
        let c = SimConfig::from_toml(
            "time_scale = 0.0\n[[orgs]]\nid = \"a:b\"\nday = \"Nov 1\"\n\
             [[orgs.families]]\nname = \"f\"\nroutes = [\"nope\"]",
        )
        .unwrap();
        let Err(SimError::Config(problems)) = c.check() else {
            panic!("accepted a bad config")
        };
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(SimConfig::from_toml("bogus = 1").is_err());
    }

    #[test]
    fn a_family_covers_what_its_routes_match() {
        let analytics = &SimConfig::default().orgs[0].families[0];
        assert!(analytics.covers("POST", "/api/v2/analytics/conversations/details/query"));
        assert!(!analytics.covers("GET", "/api/v2/analytics/conversations/details/query"));
        assert!(!analytics.covers("POST", "/api/v2/analytics/conversations/details/jobs"));
    }

    #[test]
    fn a_limit_of_zero_is_refused() {
        let family = |keys: &str| {
            SimConfig::from_toml(&format!(
                "[[orgs]]\n[[orgs.families]]\nname = \"f\"\nroutes = [\"GET /x\"]\n{keys}"
            ))
            .unwrap()
            .check()
            .map_err(|e| e.to_string())
        };
        family("documented_permits = 5").unwrap();
        for keys in [
            "documented_permits = 60\nhidden_permits = 0",
            "hidden_permits = 0",
            "",
            "documented_permits = 5\nschedule = [{ at_ms = 1000, hidden_permits = 0 }]",
        ] {
            let err = family(keys).unwrap_err();
            assert!(err.contains("refuses every request"), "{keys:?}: {err}");
        }
    }

    #[test]
    fn jobs_that_expire_as_they_are_submitted_are_refused() {
        let jobs = |keys: &str| {
            SimConfig::from_toml(&format!("[[orgs]]\nid = \"o\"\n[orgs.jobs]\n{keys}"))
                .unwrap()
                .check()
                .map_err(|e| e.to_string())
        };
        jobs("expiry_ms = 1").unwrap();
        let err = jobs("expiry_ms = 0").unwrap_err();
        assert!(err.contains("org o: jobs: expiry_ms must be > 0"), "{err}");
    }

    #[test]
    fn two_steps_at_the_same_time_are_refused() {
        let family = |keys: &str| {
            SimConfig::from_toml(&format!(
                "[[orgs]]\nid = \"o\"\n[[orgs.families]]\nname = \"f\"\n\
                 routes = [\"GET /x\"]\ndocumented_permits = 50\n{keys}"
            ))
            .unwrap()
            .check()
            .map_err(|e| e.to_string())
        };
        family("schedule = [{at_ms=60000,hidden_permits=20},{at_ms=90000,hidden_permits=35}]")
            .unwrap();
        for (key, keys) in [
            (
                "schedule",
                "schedule = [{at_ms=60000,hidden_permits=20},{at_ms=0,hidden_permits=5},\
                 {at_ms=60000,hidden_permits=35}]",
            ),
            (
                "unmanaged",
                "unmanaged = [{at_ms=0,per_window=2},{at_ms=0,per_window=4}]",
            ),
        ] {
            let err = family(keys).unwrap_err();
            let at = if key == "schedule" { 60_000 } else { 0 };
            assert!(
                err.contains(&format!(
                    "org o families[0]: f: {key} has two steps at at_ms = {at}"
                )),
                "{keys:?}: {err}"
            );
        }
    }

    #[test]
    fn limit_kinds_and_their_keys() {
        let c = SimConfig::from_toml(
            "[[orgs]]\nid = \"x\"\ntoken_tell = false\ntoken_retry_after = \"whole_seconds\"\n\
             [[orgs.families]]\nname = \"f\"\nroutes = [\"POST /api/v2/analytics/**\"]\n\
             documented_permits = 60\nhidden_permits = 45\nkind = \"token_bucket\"\nburst = 10\n\
             tell = true\nretry_after = \"whole_seconds\"\nunmanaged_pattern = \"bursty\"\n\
             [[orgs.families]]\nname = \"g\"\nroutes = [\"GET /x\"]\ndocumented_permits = 5\n\
             kind = \"sliding_log\"",
        )
        .unwrap();
        c.check().unwrap();
        let org = &c.orgs[0];
        assert!(!org.token_tell);
        assert_eq!(org.token_retry_after, RetryAfter::WholeSeconds);
        let f = org.families[0].ready().unwrap();
        assert_eq!(
            (f.kind, f.burst, f.tell),
            (LimitKind::TokenBucket, Some(10), true)
        );
        assert_eq!(f.pattern, UnmanagedPattern::Bursty);
        assert_eq!(org.families[1].kind, LimitKind::SlidingLog);
        // Defaults: today's behaviour.
        let d = &SimConfig::default().orgs[0];
        assert!(d.token_tell);
        assert_eq!(d.families[0].kind, LimitKind::FixedWindow);
        assert!(!d.families[0].tell);
        // burst is for token buckets; unknown kinds are refused.
        let bad = SimConfig::from_toml(
            "[[orgs]]\n[[orgs.families]]\nname = \"f\"\nroutes = [\"GET /x\"]\nburst = 3",
        )
        .unwrap();
        assert!(bad.check().is_err());
        assert!(SimConfig::from_toml(
            "[[orgs]]\n[[orgs.families]]\nname = \"f\"\nkind = \"leaky\""
        )
        .is_err());
    }
}
