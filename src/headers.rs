//! TEMPORARY stub; replaced by the real parser.
use std::time::{Duration, SystemTime};

/// What the upstream's rate-limit headers say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitInfo {
    /// Retry-After.
    pub retry_after: Option<Duration>,
    /// Limit.
    pub limit: Option<u64>,
    /// Remaining.
    pub remaining: Option<u64>,
    /// Reset.
    pub reset: Option<Duration>,
    /// Window.
    pub window: Option<Duration>,
}

impl RateLimitInfo {
    /// Nothing understood.
    pub fn is_empty(&self) -> bool {
        *self == RateLimitInfo::default()
    }
    /// Used up.
    pub fn exhausted(&self) -> bool {
        self.remaining == Some(0)
    }
}

/// Parses.
pub fn parse<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    _now: SystemTime,
) -> RateLimitInfo {
    let mut i = RateLimitInfo::default();
    let mut allowed = None;
    let mut count = None;
    for (k, v) in headers {
        let v: Option<u64> = v.trim().parse().ok();
        match k.to_ascii_lowercase().as_str() {
            "retry-after" => i.retry_after = v.map(Duration::from_secs),
            "inin-ratelimit-allowed" => allowed = v,
            "inin-ratelimit-count" => count = v,
            "inin-ratelimit-reset" => i.reset = v.map(Duration::from_secs),
            _ => {}
        }
    }
    i.limit = allowed;
    i.remaining = allowed.zip(count).map(|(a, c)| a.saturating_sub(c));
    i
}
