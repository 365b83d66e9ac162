//! The broker configurations loadgen generates: `tenants` tenants `t0…`, each
//! with `buckets` org-wide buckets matching every call with a rate far above
//! anything a load run reaches, the first of them also a concurrency bucket
//! (so every grant takes and returns a slot, as a real sidecar's would).

use std::fmt::Write as _;
use std::net::SocketAddr;

/// Slots of the first bucket of each tenant: far above any number of
/// leases a run holds (held-leases holds 10,000).
pub(crate) const MAX_IN_FLIGHT: u32 = 1_000_000;
/// TTL of a lease's slot in generated configs: longer than a whole scale
/// suite, so held leases never expire while measured.
pub(crate) const LEASE_TTL_MS: u64 = 600_000;

/// What to generate.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BrokerConfig {
    /// Tenants `t0`, `t1`, ….
    pub(crate) tenants: usize,
    /// Buckets per tenant, all matching `* /**`.
    pub(crate) buckets: usize,
    /// The first bucket's `lease_ttl_ms` (default [`LEASE_TTL_MS`]).
    pub(crate) lease_ttl_ms: u64,
    /// `server.listen`; only a broker run as a child process reads it.
    pub(crate) listen: Option<SocketAddr>,
}

impl BrokerConfig {
    /// `tenants` tenants of `buckets` buckets, no listen address.
    pub(crate) fn new(tenants: usize, buckets: usize) -> Self {
        BrokerConfig {
            tenants: tenants.max(1),
            buckets: buckets.max(1),
            lease_ttl_ms: LEASE_TTL_MS,
            listen: None,
        }
    }

    /// The tenant ids requests go to.
    pub(crate) fn tenant_ids(&self) -> Vec<String> {
        (0..self.tenants).map(|t| format!("t{t}")).collect()
    }

    /// The TOML text.
    pub(crate) fn render(&self) -> String {
        let mut s = String::with_capacity(64 + self.tenants * self.buckets * 200);
        // Metrics on, as deployed, on a port of its own.
        s.push_str(
            "[server]\nshutdown_grace_ms = 1000\nstate_dir = \"\"\nmax_wait_ms = 1000\n\
             http_listen = \"127.0.0.1:0\"\n",
        );
        if let Some(listen) = self.listen {
            // Writing to a String cannot fail.
            let _ = writeln!(s, "listen = \"{listen}\"");
        }
        s.push('\n');
        for t in 0..self.tenants {
            let _ = writeln!(s, "[[tenants]]\nid = \"t{t}\"");
            for b in 0..self.buckets {
                let _ = writeln!(
                    s,
                    "[[tenants.buckets]]\nname = \"b{b}\"\nscope = \"org\"\nroutes = [\"* /**\"]\n\
                     permits = 100000000\nwindow_ms = 1000\nburst = 1000000"
                );
                if b == 0 {
                    let _ = writeln!(
                        s,
                        "max_in_flight = {MAX_IN_FLIGHT}\nlease_ttl_ms = {}",
                        self.lease_ttl_ms
                    );
                }
            }
            s.push('\n');
        }
        s
    }
}

/// A cluster node's `[cluster]` section (appended to a [`BrokerConfig`]'s
/// text): etcd, the node's name, its etcd lease TTL (the safety margin is
/// a fifth of it, at least 1 s and at most half); it advertises its listen
/// address.
#[derive(Clone, Debug)]
pub(crate) struct ClusterNode {
    /// The etcd client URL.
    pub(crate) etcd: String,
    /// The node's name.
    pub(crate) node: String,
    /// The etcd lease TTL, ms (whole seconds, at least 2000).
    pub(crate) lease_ttl_ms: u64,
}

impl ClusterNode {
    /// The `[cluster]` section for a node listening on `listen`.
    pub(crate) fn render(&self, listen: SocketAddr) -> String {
        let margin = (self.lease_ttl_ms / 5).max(1000).min(self.lease_ttl_ms / 2);
        format!(
            "\n[cluster]\netcd = [\"{}\"]\nnode = \"{}\"\nadvertise = \"http://{listen}\"\n\
             prefix = \"/quota-broker\"\nlease_ttl_ms = {}\nsafety_margin_ms = {margin}\n",
            self.etcd, self.node, self.lease_ttl_ms
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_config_the_broker_accepts() {
        let config = BrokerConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 4321))),
            ..BrokerConfig::new(3, 2)
        };
        let settings = quota_broker::Settings::from_toml(&config.render()).unwrap();
        assert_eq!(settings.tenants.len(), 3);
        assert_eq!(settings.tenants[2].id, "t2");
        assert_eq!(settings.tenants[0].buckets.len(), 2);
        assert_eq!(settings.server.listen.port(), 4321);
        let first = &settings.tenants[0].buckets[0];
        assert_eq!(first.max_in_flight.map(|m| m.get()), Some(MAX_IN_FLIGHT));
        assert_eq!(first.lease_ttl.as_millis(), u128::from(LEASE_TTL_MS));
        assert_eq!(config.tenant_ids(), ["t0", "t1", "t2"]);
    }

    #[test]
    fn renders_a_cluster_node_the_broker_accepts() {
        let listen = SocketAddr::from(([127, 0, 0, 1], 4321));
        let config = BrokerConfig {
            listen: Some(listen),
            lease_ttl_ms: 1000,
            ..BrokerConfig::new(2, 1)
        };
        let node = ClusterNode {
            etcd: "http://127.0.0.1:2379".into(),
            node: "b2".into(),
            lease_ttl_ms: 5000,
        };
        let text = format!("{}{}", config.render(), node.render(listen));
        let settings = quota_broker::Settings::from_toml(&text).unwrap();
        let cluster = settings.cluster.unwrap();
        assert_eq!(cluster.node, "b2");
        assert_eq!(cluster.advertise, "http://127.0.0.1:4321");
        assert_eq!(cluster.safety_margin.as_millis(), 1000);
        assert_eq!(settings.tenants[1].buckets[0].lease_ttl.as_millis(), 1000);
    }
}
