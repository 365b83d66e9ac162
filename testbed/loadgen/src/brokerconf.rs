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
    /// `server.listen`; only a broker run as a child process reads it.
    pub(crate) listen: Option<SocketAddr>,
}

impl BrokerConfig {
    /// `tenants` tenants of `buckets` buckets, no listen address.
    pub(crate) fn new(tenants: usize, buckets: usize) -> Self {
        BrokerConfig {
            tenants: tenants.max(1),
            buckets: buckets.max(1),
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
                        "max_in_flight = {MAX_IN_FLIGHT}\nlease_ttl_ms = {LEASE_TTL_MS}"
                    );
                }
            }
            s.push('\n');
        }
        s
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
}
