//! The broker's error type: every way a request can be refused for good
//! (as opposed to "not now", which is a normal `granted = false` answer).
//! The gRPC codec (`grpc/codec.rs`) maps each variant to one status code.

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// A request field is missing or malformed.
    #[error("{field}: {problem}")]
    InvalidArgument {
        /// The offending field.
        field: &'static str,
        /// What is wrong and what would be right.
        problem: String,
    },
    /// The tenant is not configured.
    #[error(
        "tenant {} is not configured on this broker (configured: {})",
        clip(.tenant),
        clip_plain(.known)
    )]
    UnknownTenant {
        /// The tenant asked for.
        tenant: String,
        /// The configured tenant ids, comma-separated.
        known: String,
    },
    /// No bucket of the tenant matches the call.
    #[error(
        "tenant {}: no bucket matches {} {}; add a route for it to a bucket \
         (or a catch-all \"* /**\" bucket) in the broker config",
        clip(.tenant),
        clip_plain(.method),
        clip_plain(.path)
    )]
    NoBucketMatches {
        /// The tenant.
        tenant: String,
        /// The call's method.
        method: String,
        /// The call's path.
        path: String,
    },
    /// More permits than a bucket can ever grant at once.
    #[error(
        "tenant {}: {permits} permits can never be granted at once: bucket {} \
         allows at most {max} ({what}); ask for fewer permits per Acquire",
        clip(.tenant),
        clip(.bucket)
    )]
    TooManyPermits {
        /// The tenant.
        tenant: String,
        /// The bucket that can never grant that many.
        bucket: String,
        /// Permits asked for.
        permits: u32,
        /// The bucket's most.
        max: u32,
        /// "burst" or "max_in_flight", either "less the reserve of higher
        /// classes" when they hold some of it back.
        what: &'static str,
    },
    /// Renew of a lease that holds no slot (anymore).
    #[error(
        "lease {} holds no slot: it was released, expired, or never held one; \
         acquire a new lease",
        clip(.lease_id)
    )]
    LeaseNotFound {
        /// The lease id given.
        lease_id: String,
    },
    /// An admin RPC names a bucket the tenant does not have.
    #[error(
        "tenant {} has no bucket {} (buckets: {})",
        clip(.tenant),
        clip(.bucket),
        clip_plain(.known)
    )]
    UnknownBucket {
        /// The tenant.
        tenant: String,
        /// The bucket asked for.
        bucket: String,
        /// The tenant's bucket names, comma-separated.
        known: String,
    },
    /// A change was applied but could not be made durable, or another
    /// fault inside the broker; details are in the broker's log.
    #[error("internal error: {0}; see the broker's log")]
    Internal(&'static str),
    /// The broker is shutting down.
    #[error("the broker is shutting down; retry once it is back")]
    ShuttingDown,
    /// Cluster mode: another broker leads the tenant (or none does yet).
    #[error("{}", not_leader_message(.tenant, .leader.as_deref()))]
    NotLeader {
        /// The tenant.
        tenant: String,
        /// The leader's URL, if known (also sent as the
        /// `x-quota-broker-leader` response metadata).
        leader: Option<String>,
    },
}

fn not_leader_message(tenant: &str, leader: Option<&str>) -> String {
    match leader {
        Some(url) => format!(
            "this broker does not lead tenant {}; its leader is {url}: send the call there \
             (the quota-broker clients follow the x-quota-broker-leader metadata; a leader \
             that does not answer is replaced once its etcd lease runs out: retry shortly)",
            clip(tenant)
        ),
        None => format!(
            "no broker leads tenant {} right now (a leader is being elected, or this broker \
             lost etcd); retry shortly or on another broker",
            clip(tenant)
        ),
    }
}

impl BrokerError {
    /// Shorthand for [`BrokerError::InvalidArgument`].
    pub fn invalid(field: &'static str, problem: impl Into<String>) -> BrokerError {
        BrokerError::InvalidArgument {
            field,
            problem: problem.into(),
        }
    }
}

/// Most characters of a caller's value echoed in an error.
const ECHO_CHARS: usize = 64;

/// A value as an error message shows it: quoted, and clipped to
/// [`ECHO_CHARS`] characters with its full length noted, so an error never
/// grows with what a caller sent.
pub(crate) fn clip(value: &str) -> String {
    match value.char_indices().nth(ECHO_CHARS) {
        None => format!("{value:?}"),
        Some((end, _)) => format!("{:?}… ({} bytes)", &value[..end], value.len()),
    }
}

/// `text` as is, or cut after `most` characters with `…` (no note of its
/// length: for names inside a longer message).
pub(crate) fn cut(text: &str, most: usize) -> String {
    match text.char_indices().nth(most) {
        None => text.to_owned(),
        Some((end, _)) => format!("{}…", &text[..end]),
    }
}

/// Most characters of an unquoted value (a list of names, a path) shown in
/// an error.
const LIST_CHARS: usize = 256;

/// An unquoted value, such as a comma-separated list of names, as an error
/// shows it: as is, or cut after [`LIST_CHARS`] characters with its full
/// length noted (ten thousand tenants must not make a ten-thousand-name
/// error).
pub(crate) fn clip_plain(list: &str) -> String {
    match list.char_indices().nth(LIST_CHARS) {
        None => list.to_owned(),
        Some((end, _)) => format!("{}… ({} bytes in all)", &list[..end], list.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoed_values_are_clipped() {
        assert_eq!(clip("demo"), "\"demo\"");
        let long = "é".repeat(30_000);
        let shown = clip(&long);
        assert!(shown.len() < 200, "{shown}");
        assert!(shown.ends_with("… (60000 bytes)"), "{shown}");
        let e = BrokerError::UnknownTenant {
            tenant: long.clone(),
            known: "demo".into(),
        };
        assert!(e.to_string().len() < 300);
        let many: Vec<String> = (0..10_000).map(|i| format!("tenant-{i}")).collect();
        let e = BrokerError::UnknownTenant {
            tenant: "x".into(),
            known: many.join(", "),
        };
        assert!(e.to_string().len() < 400, "{e}");
    }
}
