//! The `[cluster]` section as written, and its validation.

use super::super::tls::EtcdTls;
use super::super::ClusterSettings;
use crate::error::clip;
use serde::Deserialize;
use std::time::Duration;

/// The longest `cluster.advertise`: `https://`, a DNS name's 253
/// characters, a port.
const MAX_ADVERTISE_LEN: usize = 300;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    #[serde(default)]
    etcd: Vec<String>,
    #[serde(default)]
    node: String,
    #[serde(default)]
    advertise: String,
    #[serde(default = "default_prefix")]
    prefix: String,
    #[serde(default = "default_cluster_ttl")]
    lease_ttl_ms: u64,
    #[serde(default = "default_safety_margin")]
    safety_margin_ms: u64,
    #[serde(default)]
    etcd_ca: String,
    #[serde(default)]
    etcd_cert: String,
    #[serde(default)]
    etcd_key: String,
}

/// An `http://` or `https://` URL with a host (what a gRPC client can dial).
/// An `http://` or `https://` URL with a host and no path or query: the
/// clients refuse a broker URL with one (gRPC would drop it).
fn is_http_url(url: &str) -> bool {
    (url.starts_with("http://") || url.starts_with("https://"))
        && url.parse::<tonic::codegen::http::Uri>().is_ok_and(|u| {
            u.host().is_some_and(|h| !h.is_empty())
                && matches!(u.path(), "" | "/")
                && u.query().is_none()
        })
}

fn default_prefix() -> String {
    "/quota-broker".into()
}

/// Longest `cluster.lease_ttl_ms`: when a leader crashes, its tenants have
/// no leader until its etcd lease expires, every client on its fallback
/// rate meanwhile, and nothing else tells the other brokers it is gone (they
/// stay ready). A minute is already a long outage for a failover meant to
/// take seconds, and a longer TTL buys nothing while etcd is away: a leader
/// steps down once its keep-alive is given up (a few etcd timeouts),
/// whatever the TTL.
const MAX_LEASE_TTL_MS: u64 = 60_000;

fn default_cluster_ttl() -> u64 {
    5_000
}

fn default_safety_margin() -> u64 {
    1_000
}

impl RawCluster {
    pub(super) fn validate(self, problems: &mut Vec<String>) -> ClusterSettings {
        if self.etcd.is_empty() {
            problems.push(
                "cluster.etcd is empty: list the etcd endpoints, e.g. [\"http://127.0.0.1:2379\"]"
                    .into(),
            );
        }
        for e in &self.etcd {
            if !is_http_url(e) {
                problems.push(format!(
                    "cluster.etcd: {} is not an http:// or https:// URL",
                    clip(e)
                ));
            }
        }
        let etcd_tls = EtcdTls::validate(
            &self.etcd,
            [self.etcd_ca, self.etcd_cert, self.etcd_key],
            problems,
        );
        let name_ok = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
        if self.node.is_empty() || self.node.len() > 64 || !self.node.chars().all(name_ok) {
            problems.push(format!(
                "cluster.node {} must be 1-64 letters, digits, '-', '_' or '.', unique in the cluster",
                clip(&self.node)
            ));
        }
        if !is_http_url(&self.advertise) {
            problems.push(format!(
                "cluster.advertise {} must be the URL clients reach this broker at, \
                 e.g. \"http://10.0.0.5:50051\" (scheme, host and port: no path)",
                clip(&self.advertise)
            ));
        } else if self.advertise.len() > MAX_ADVERTISE_LEN {
            problems.push(format!(
                "cluster.advertise {} is {} bytes long: a scheme, a host name (at most 253 \
                 characters) and a port take at most {MAX_ADVERTISE_LEN}, and every redirect \
                 to this broker carries it",
                clip(&self.advertise),
                self.advertise.len()
            ));
        }
        if !self.prefix.starts_with('/') {
            problems.push(format!(
                "cluster.prefix {} must start with '/'",
                clip(&self.prefix)
            ));
        }
        if self.lease_ttl_ms < 2_000 || self.lease_ttl_ms % 1_000 != 0 {
            problems.push(format!(
                "cluster.lease_ttl_ms {} must be whole seconds, at least 2000 (etcd leases count seconds)",
                self.lease_ttl_ms
            ));
        } else if self.lease_ttl_ms > MAX_LEASE_TTL_MS {
            problems.push(format!(
                "cluster.lease_ttl_ms {} must be at most {MAX_LEASE_TTL_MS} (a minute): a \
                 leader's crash leaves its tenants without a leader for up to this long",
                self.lease_ttl_ms
            ));
        }
        if self.safety_margin_ms == 0 || self.safety_margin_ms.saturating_mul(2) > self.lease_ttl_ms
        {
            problems.push(format!(
                "cluster.safety_margin_ms {} must be above 0 and at most half of cluster.lease_ttl_ms",
                self.safety_margin_ms
            ));
        }
        ClusterSettings {
            etcd: self.etcd,
            node: self.node,
            advertise: self.advertise,
            prefix: self.prefix.trim_end_matches('/').to_owned(),
            lease_ttl: Duration::from_millis(self.lease_ttl_ms),
            safety_margin: Duration::from_millis(self.safety_margin_ms),
            etcd_tls,
        }
    }
}
