//! What each member publishes of its config in its `serves` key, and how
//! two members' are compared: per tenant, a fingerprint of the config that
//! decides its grants, so a member whose buckets allow 10 times the permits
//! is noticed before it leads the tenant, not after.
//!
//! A fingerprint has one hash per part (`buckets`: each bucket's routes,
//! rate, slots, lease TTL, scope and client cap; `classes`: the priority
//! classes every tenant starts with and the queueing rules; `learning`:
//! how reported throttling cuts the rate), so the warning says which part
//! differs. Nothing per node is in it (node name, ports, TLS files,
//! tokens, the state directory, overload caps), nor a tenant's `region`
//! (informational). Each part is SHA-256 of a canonical encoding written
//! field by field here (strings length-prefixed, numbers in full, floats
//! by their bits, buckets by name and routes sorted: the config's order
//! decides no grant), so every build that encodes the same config agrees;
//! not std's `DefaultHasher`, which no two builds promise to share. A
//! field added to the config that decides grants belongs here too.
//!
//! The `serves` value: the tenant ids, one a line, as every earlier build
//! wrote and reads them; after each id, a line that starts with a tab (no
//! tenant id may hold a control character) with its fingerprint, e.g.
//! `\tbuckets:0a1b2c3d4e5f6071 classes:… learning:…`. A value without such
//! lines is from an earlier build: that member is compared on tenant ids
//! only. (An earlier build reads the fingerprint lines as ids of tenants it
//! does not have: during a rolling upgrade it warns once per upgraded
//! member that the member serves other tenants, and places tenants as
//! before, since no configured tenant is named so.)

use crate::config::{BucketSettings, Settings, TenantSettings};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

/// A part of a fingerprint, in the order they are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Part {
    Buckets,
    Classes,
    Learning,
}

impl Part {
    const ALL: [Part; 3] = [Part::Buckets, Part::Classes, Part::Learning];

    /// Its name in the `serves` value.
    fn key(self) -> &'static str {
        match self {
            Part::Buckets => "buckets",
            Part::Classes => "classes",
            Part::Learning => "learning",
        }
    }

    /// What it is, in a message ("… differ").
    pub(super) fn name(self) -> &'static str {
        match self {
            Part::Learning => "learning settings",
            other => other.key(),
        }
    }

    /// The config sections that set it.
    pub(super) fn section(self) -> &'static str {
        match self {
            Part::Buckets => "[[tenants]]",
            Part::Classes => "[[classes]] and [scheduling]",
            Part::Learning => "[learning]",
        }
    }
}

/// One tenant's config as a member publishes it: a hash per part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Fingerprint(Vec<(String, String)>);

impl Fingerprint {
    /// The fingerprint of tenant `tenant` of `settings`.
    #[cfg(test)]
    fn of(settings: &Settings, tenant: &TenantSettings) -> Fingerprint {
        Fingerprint::with_shared(tenant, &Shared::of(settings))
    }

    fn with_shared(tenant: &TenantSettings, shared: &Shared) -> Fingerprint {
        Fingerprint(vec![
            (Part::Buckets.key().to_owned(), hash(&buckets(tenant))),
            (Part::Classes.key().to_owned(), shared.classes.clone()),
            (Part::Learning.key().to_owned(), shared.learning.clone()),
        ])
    }

    /// The parts both fingerprints have whose hashes differ (parts only
    /// one has, or another build's, are not compared).
    pub(super) fn differing(&self, theirs: &Fingerprint) -> Vec<Part> {
        Part::ALL
            .into_iter()
            .filter(|p| match (self.part(p.key()), theirs.part(p.key())) {
                (Some(mine), Some(other)) => mine != other,
                _ => false,
            })
            .collect()
    }

    fn part(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(p, _)| p == name)
            .map(|(_, h)| h.as_str())
    }

    /// `part:hash` pairs, space-separated.
    fn encode(&self) -> String {
        let pairs: Vec<String> = self.0.iter().map(|(p, h)| format!("{p}:{h}")).collect();
        pairs.join(" ")
    }

    /// `part:hash` pairs as [`Fingerprint::encode`] writes them; anything
    /// else in them is skipped.
    fn decode(line: &str) -> Fingerprint {
        Fingerprint(
            line.split_whitespace()
                .filter_map(|pair| pair.split_once(':'))
                .filter(|(p, h)| !p.is_empty() && !h.is_empty())
                .map(|(p, h)| (p.to_owned(), h.to_owned()))
                .collect(),
        )
    }
}

/// The parts every tenant of one config shares, hashed once.
struct Shared {
    classes: String,
    learning: String,
}

impl Shared {
    fn of(settings: &Settings) -> Shared {
        Shared {
            classes: hash(&classes(settings)),
            learning: hash(&learning(settings)),
        }
    }
}

/// Every tenant of `settings` with its fingerprint, in config order.
pub(super) fn of_tenants(settings: &Settings) -> Vec<(String, Fingerprint)> {
    let shared = Shared::of(settings);
    settings
        .tenants
        .iter()
        .map(|t| (t.id.clone(), Fingerprint::with_shared(t, &shared)))
        .collect()
}

/// The `serves` value of a member serving `tenants`.
pub(super) fn serves_value(tenants: &[(String, Fingerprint)]) -> String {
    let mut value = String::new();
    for (id, fingerprint) in tenants {
        if !value.is_empty() {
            value.push('\n');
        }
        value.push_str(id);
        value.push_str("\n\t");
        value.push_str(&fingerprint.encode());
    }
    value
}

/// What a member's `serves` key says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Served {
    /// The tenant ids it serves.
    pub(super) tenants: HashSet<String>,
    /// Each tenant's fingerprint; `None`: a member of an earlier build,
    /// which published ids only.
    pub(super) configs: Option<HashMap<String, Fingerprint>>,
}

impl Served {
    /// Reads a `serves` value, of this build or an earlier one.
    pub(super) fn parse(value: &str) -> Served {
        let mut served = Served::default();
        let mut last: Option<&str> = None;
        for line in value.lines() {
            match line.strip_prefix('\t') {
                Some(fingerprint) => {
                    if let Some(id) = last.take() {
                        served
                            .configs
                            .get_or_insert_with(HashMap::new)
                            .insert(id.to_owned(), Fingerprint::decode(fingerprint));
                    }
                }
                None => {
                    served.tenants.insert(line.to_owned());
                    last = Some(line);
                }
            }
        }
        served
    }

    /// Whether it serves `tenant`.
    pub(super) fn contains(&self, tenant: &str) -> bool {
        self.tenants.contains(tenant)
    }
}

/// The first 8 bytes of SHA-256 of `canonical`, in hex.
fn hash(canonical: &str) -> String {
    hex::encode(&Sha256::digest(canonical.as_bytes())[..8])
}

/// A string as `len:bytes`, so no content can run into the next field.
fn string(out: &mut String, s: &str) {
    let _ = write!(out, "{}:{s};", s.len());
}

fn buckets(tenant: &TenantSettings) -> String {
    let mut sorted: Vec<&BucketSettings> = tenant.buckets.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = String::from("buckets/v1;");
    for b in sorted {
        out.push_str("bucket;");
        string(&mut out, &b.name);
        string(&mut out, b.scope.as_str());
        let mut routes: Vec<String> = b.routes.iter().map(ToString::to_string).collect();
        routes.sort();
        let _ = write!(out, "routes={};", routes.len());
        for r in &routes {
            string(&mut out, r);
        }
        match &b.rate {
            Some(r) => {
                let _ = write!(
                    out,
                    "rate={}/{}ns burst={};",
                    r.permits,
                    r.window.as_nanos(),
                    r.burst
                );
            }
            None => out.push_str("rate=none;"),
        }
        match b.max_in_flight {
            Some(n) => {
                let _ = write!(out, "slots={n};");
            }
            None => out.push_str("slots=none;"),
        }
        let _ = write!(
            out,
            "lease_ttl={}ns max_clients={};",
            b.lease_ttl.as_nanos(),
            b.max_clients
        );
    }
    out
}

fn classes(settings: &Settings) -> String {
    let mut sorted: Vec<_> = settings.classes.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = String::from("classes/v1;");
    for c in sorted {
        out.push_str("class;");
        string(&mut out, &c.name);
        let _ = write!(
            out,
            "order={} weight={} reserve={:016x} default_max_wait={}ns;",
            c.order,
            c.weight,
            c.reserve.to_bits(),
            c.default_max_wait.as_nanos()
        );
    }
    out.push_str("default_class;");
    string(&mut out, &settings.scheduling.default_class);
    let _ = write!(
        out,
        "max_waiters_per_bucket={};",
        settings.scheduling.max_waiters_per_bucket
    );
    out
}

fn learning(settings: &Settings) -> String {
    let l = &settings.learning;
    let bits = |f: f64| format!("{:016x}", f.to_bits());
    format!(
        "learning/v1;beta={};floor_fraction={};default_freeze={}ns;max_freeze={}ns;\
         episode_grace={}ns;recovery_windows={};probe_hold_windows={};probe_max_windows={};\
         ratio_window={}ns;ratio_threshold={};ratio_min_reports={};ratio_cut={};cooldown={}ns;\
         jitter={};",
        bits(l.beta),
        bits(l.floor_fraction),
        l.default_freeze.as_nanos(),
        l.max_freeze.as_nanos(),
        l.episode_grace.as_nanos(),
        bits(l.recovery_windows),
        bits(l.probe_hold_windows),
        bits(l.probe_max_windows),
        l.ratio_window.as_nanos(),
        bits(l.ratio_threshold),
        l.ratio_min_reports,
        bits(l.ratio_cut),
        l.cooldown.as_nanos(),
        bits(l.jitter),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(extra: &str) -> Settings {
        Settings::from_toml(&format!(
            "[[tenants]]\nid = \"demo\"\n[[tenants.buckets]]\nname = \"rate\"\n\
             routes = [\"GET /a/**\", \"POST /b/**\"]\npermits = 10\nwindow_ms = 1000\n\
             [[tenants.buckets]]\nname = \"slots\"\nroutes = [\"* /c/**\"]\nmax_in_flight = 3\n\
             [[tenants]]\nid = \"other\"\n[[tenants.buckets]]\nname = \"b\"\n\
             routes = [\"* /**\"]\nmax_in_flight = 1\n{extra}"
        ))
        .unwrap()
    }

    fn demo(s: &Settings) -> Fingerprint {
        Fingerprint::of(s, &s.tenants[0])
    }

    #[test]
    fn the_same_config_has_the_same_fingerprint_whatever_its_order_or_node() {
        let a = settings("");
        let reordered = Settings::from_toml(
            "[server]\nlisten = \"127.0.0.1:40052\"\n\
             [[tenants]]\nid = \"demo\"\nregion = \"eu\"\n[[tenants.buckets]]\nname = \"slots\"\n\
             routes = [\"* /c/**\"]\nmax_in_flight = 3\n[[tenants.buckets]]\nname = \"rate\"\n\
             routes = [\"POST /b/**\", \"GET /a/**\"]\npermits = 10\nwindow_ms = 1000\n",
        )
        .unwrap();
        assert_eq!(demo(&a), demo(&reordered));
        assert!(demo(&a).differing(&demo(&reordered)).is_empty());
        // Fixed across builds: a change here is a change of the format,
        // and every member of a mixed cluster would warn of every other one
        // (the buckets part only: the others hash the config's defaults).
        assert_eq!(demo(&a).part("buckets"), Some("e1bde51e67cf5ca6"));
    }

    #[test]
    fn what_decides_grants_changes_the_fingerprint_and_says_which_part() {
        let base = demo(&settings(""));
        let permits = settings("").tenants[0].buckets[0].rate;
        let mut more = settings("");
        if let (Some(r), Some(p)) = (more.tenants[0].buckets[0].rate.as_mut(), permits) {
            r.permits = std::num::NonZeroU32::new(p.permits.get() * 10).unwrap();
        }
        assert_eq!(base.differing(&demo(&more)), [Part::Buckets]);
        let mut classes = settings("");
        classes.classes[0].weight += 1;
        assert_eq!(base.differing(&demo(&classes)), [Part::Classes]);
        let mut both = classes.clone();
        both.tenants[0].buckets[1].max_in_flight = std::num::NonZeroU32::new(4);
        assert_eq!(base.differing(&demo(&both)), [Part::Buckets, Part::Classes]);
        let mut learning = settings("");
        learning.learning.beta = 0.5;
        assert_eq!(base.differing(&demo(&learning)), [Part::Learning]);
        // Another tenant's change is not this one's.
        let mut other = settings("");
        other.tenants[1].buckets[0].max_in_flight = std::num::NonZeroU32::new(2);
        assert!(base.differing(&demo(&other)).is_empty());
    }

    #[test]
    fn serves_values_of_this_build_and_of_earlier_ones_are_read() {
        let s = settings("");
        let tenants = of_tenants(&s);
        let value = serves_value(&tenants);
        let served = Served::parse(&value);
        assert_eq!(
            served.tenants,
            HashSet::from(["demo".to_owned(), "other".to_owned()])
        );
        let configs = served.configs.unwrap();
        assert_eq!(configs["demo"], tenants[0].1);
        assert_eq!(configs["other"], tenants[1].1);
        // An earlier build's ids a line: compared on ids only.
        let old = Served::parse("demo\nother");
        assert_eq!(old.tenants, HashSet::from(["demo".into(), "other".into()]));
        assert_eq!(old.configs, None);
        // The ids are the lines an earlier build reads as ids.
        let ids: Vec<&str> = value.lines().filter(|l| !l.starts_with('\t')).collect();
        assert_eq!(ids, ["demo", "other"]);
        // A part this build does not know is not compared.
        let newer = Fingerprint::decode(&format!("{} routes_v2:00ff", tenants[0].1.encode()));
        assert!(tenants[0].1.differing(&newer).is_empty());
    }
}
