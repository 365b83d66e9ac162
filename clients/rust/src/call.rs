//! One upstream call to lease ([`Call`]): what the broker is asked for, and
//! the idempotency keys its Acquires and Reports carry.

use quota_broker::pb::AcquireRequest;
use std::time::Duration;

/// One upstream call to lease.
#[derive(Debug, Clone)]
pub struct Call {
    pub(crate) tenant: String,
    pub(crate) method: String,
    pub(crate) path: String,
    client_id: String,
    pub(crate) oauth_client: String,
    class: String,
    pub(crate) permits: u32,
    pub(crate) max_wait: Option<Duration>,
}

impl Call {
    /// A call of `method` to `path` on `tenant`.
    pub fn new(
        tenant: impl Into<String>,
        method: impl Into<String>,
        path: impl Into<String>,
    ) -> Call {
        Call {
            tenant: tenant.into(),
            method: method.into(),
            path: path.into(),
            client_id: "quota-broker-client".into(),
            oauth_client: String::new(),
            class: String::new(),
            permits: 1,
            max_wait: None,
        }
    }

    /// The tenant the call is for.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The calling integration instance (for fair sharing and logs).
    pub fn client_id(mut self, id: impl Into<String>) -> Call {
        self.client_id = id.into();
        self
    }

    /// The OAuth client the call is made with.
    pub fn oauth_client(mut self, id: impl Into<String>) -> Call {
        self.oauth_client = id.into();
        self
    }

    /// The priority class ("" for the broker's default).
    pub fn class(mut self, class: impl Into<String>) -> Call {
        self.class = class.into();
        self
    }

    /// Permits to take (default 1; 0 is taken as 1, as the broker reads
    /// it).
    pub fn permits(mut self, permits: u32) -> Call {
        self.permits = permits.max(1);
        self
    }

    /// Longest server-side wait (default: the class's default). While the
    /// broker is unreachable the client does not know the class's default:
    /// without `max_wait` a call waits for the local fallback limiter at
    /// most [`FALLBACK_MAX_WAIT`], the broker's own cap by default, and is
    /// told "not now" beyond it, so a call waits no longer with the broker
    /// down than with it up.
    ///
    /// [`FALLBACK_MAX_WAIT`]: crate::FALLBACK_MAX_WAIT
    pub fn max_wait(mut self, wait: Duration) -> Call {
        self.max_wait = Some(wait);
        self
    }

    /// The Acquire for this call, as sent (and sent again with each Renew,
    /// so a broker that restarted can adopt the lease).
    pub(crate) fn acquire_request(&self) -> AcquireRequest {
        AcquireRequest {
            tenant: self.tenant.clone(),
            client_id: self.client_id.clone(),
            priority_class: self.class.clone(),
            method: self.method.clone(),
            path: self.path.clone(),
            oauth_client: self.oauth_client.clone(),
            permits: self.permits,
            max_wait_ms: self.max_wait.map(|d| d.as_millis() as u64),
            idempotency_key: new_key(),
        }
    }

    /// The same call to another method and path.
    pub fn to(&self, method: &str, path: &str) -> Call {
        Call {
            method: method.to_owned(),
            path: path.to_owned(),
            ..self.clone()
        }
    }
}

/// A random idempotency key for an Acquire or a Report: 128 bits from the
/// OS (unguessable: it names a lease to release). Should the OS refuse,
/// none: the broker then counts a Report sent again twice, and a lease
/// granted to an unanswered Acquire holds its slots until its expiry.
pub(crate) fn new_key() -> String {
    let mut bytes = [0u8; 16];
    match getrandom::fill(&mut bytes) {
        Ok(()) => bytes.iter().map(|b| format!("{b:02x}")).collect(),
        Err(_) => String::new(),
    }
}
