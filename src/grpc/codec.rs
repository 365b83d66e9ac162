//! The wire codec of both services: the limits on what a request may carry,
//! decoding and validating request fields, encoding the broker's answers,
//! and the one table that maps [`BrokerError`] and [`AuthError`] to gRPC
//! status codes.

use crate::auth::{AuthError, Authenticator, Principal};
use crate::broker::TenantBucketStatus;
use crate::clock::{millis, Clock};
// The longest identifier-like field (tenant, client id, class, OAuth
// client) is the config's, so every configured name can be asked for; the
// longest method, the one a route pattern may name.
use crate::config::{hidden_char, hidden_char_named, ClassSettings, MAX_ID_LEN};
use crate::error::{clip, BrokerError};
use crate::limits::{normalize_path, MAX_METHOD_LEN};
use crate::tenant::{Denial, Grant};
use crate::{pb, LEADER_METADATA};
use std::time::Duration;
use tonic::{Request, Status};

/// Most concurrent RPCs (HTTP/2 streams) per client connection: a busy
/// sidecar multiplexes many waiting Acquires on one connection; one
/// LeaseStream may have as many Acquires waiting.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Largest request accepted. Requests are small (a report with its headers
/// is well under 4 KiB); this bounds what a broken client can make us buffer.
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Longest accepted path.
const MAX_PATH_LEN: usize = 4096;

/// Longest status message sent: values are clipped where they are echoed,
/// and this bounds the whole, so an error always fits in the trailers a
/// standard client accepts.
const MAX_MESSAGE_LEN: usize = 1024;

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Status {
        let mut msg = e.to_string();
        if msg.len() > MAX_MESSAGE_LEN {
            let mut end = MAX_MESSAGE_LEN;
            while !msg.is_char_boundary(end) {
                end -= 1;
            }
            msg.truncate(end);
            msg.push('…');
        }
        match e {
            BrokerError::InvalidArgument { .. } => Status::invalid_argument(msg),
            BrokerError::UnknownTenant { .. }
            | BrokerError::NoBucketMatches { .. }
            | BrokerError::LeaseNotFound { .. }
            | BrokerError::UnknownBucket { .. } => Status::not_found(msg),
            BrokerError::Internal(_) => Status::internal(msg),
            BrokerError::TooManyPermits { .. } => Status::failed_precondition(msg),
            BrokerError::ShuttingDown => Status::unavailable(msg),
            BrokerError::NotLeader { leader, .. } => {
                let mut status = Status::unavailable(msg);
                if let Some(v) = leader.and_then(|l| l.parse().ok()) {
                    status.metadata_mut().insert(LEADER_METADATA, v);
                }
                status
            }
        }
    }
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Status {
        if e.is_unauthenticated() {
            Status::unauthenticated(e.to_string())
        } else {
            Status::permission_denied(e.to_string())
        }
    }
}

/// Authenticates a request from its `authorization` metadata.
pub(crate) fn principal<T>(
    auth: &Authenticator,
    request: &Request<T>,
) -> Result<Principal, Status> {
    let header = request
        .metadata()
        .as_ref()
        .get(tonic::codegen::http::header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or(""));
    let who = auth.authenticate(header)?;
    // Every later line of the call says whose token it came with (a
    // report that froze a bucket, say). Not in open mode: no token, and
    // nothing recorded on the hot path.
    if who.token_index().is_some() {
        tracing::Span::current().record("token", who.name());
    }
    Ok(who)
}

pub(crate) fn required<'a>(
    field: &'static str,
    value: &'a str,
    example: &str,
) -> Result<&'a str, BrokerError> {
    if value.is_empty() {
        return Err(BrokerError::invalid(
            field,
            format!("required, e.g. {example:?}"),
        ));
    }
    bounded(field, value)
}

pub(crate) fn bounded<'a>(field: &'static str, value: &'a str) -> Result<&'a str, BrokerError> {
    if value.len() > MAX_ID_LEN {
        return Err(BrokerError::invalid(
            field,
            format!("{} bytes long; at most {MAX_ID_LEN}", value.len()),
        ));
    }
    // An id is printed (logs, quotactl's table, the dashboard): a newline
    // or an escape sequence in it would forge lines or colour a terminal,
    // a bidirectional override or a zero-width character show one client
    // as another. Named by code point, never echoed.
    if let Some(c) = hidden_char(value) {
        return Err(BrokerError::invalid(
            field,
            format!("it holds {}", hidden_char_named(c)),
        ));
    }
    Ok(value)
}

/// Validates a method and path; returns the upper-case method and the path
/// without its query string.
pub(crate) fn call_of(method: &str, path: &str) -> Result<(String, String), BrokerError> {
    let method = required("method", method, "POST")?;
    if method.len() > MAX_METHOD_LEN || !method.chars().all(|c| c.is_ascii_alphabetic()) {
        return Err(BrokerError::invalid(
            "method",
            format!("{} is not an HTTP method such as GET or POST", clip(method)),
        ));
    }
    if path.is_empty() {
        return Err(BrokerError::invalid(
            "path",
            "required, e.g. \"/api/v2/analytics/conversations/details/query\"",
        ));
    }
    if !path.starts_with('/') || path.len() > MAX_PATH_LEN {
        return Err(BrokerError::invalid(
            "path",
            format!(
                "must start with '/' and be at most {MAX_PATH_LEN} bytes; got {}",
                clip(path)
            ),
        ));
    }
    let path = path.split(['?', '#']).next().unwrap_or(path);
    let path = normalize_path(path).map_err(|e| {
        BrokerError::invalid("path", format!("{} cannot be matched: {e}", clip(path)))
    })?;
    Ok((method.to_ascii_uppercase(), path))
}

/// Encodes a grant for the wire.
pub(crate) fn grant_to_pb(g: Grant, clock: Clock) -> pb::AcquireResponse {
    let (expires_at_ms, ttl_ms) = g
        .slot
        .map_or((0, 0), |(at, ttl)| (clock.unix_ms(at), millis(ttl)));
    pb::AcquireResponse {
        granted: true,
        lease_id: g.lease_id.to_wire(),
        permits: g.permits,
        lease_expires_at_ms: expires_at_ms,
        lease_ttl_ms: ttl_ms,
        retry_after_ms: 0,
        reason: String::new(),
        buckets: g.buckets,
    }
}

/// Encodes a denial for the wire.
pub(crate) fn denial_to_pb(d: Denial) -> pb::AcquireResponse {
    pb::AcquireResponse {
        granted: false,
        permits: 0,
        retry_after_ms: millis(d.retry_after),
        reason: d.reason,
        buckets: d.buckets,
        ..Default::default()
    }
}

/// Encodes a bucket status for the wire.
pub(crate) fn status_to_pb(s: TenantBucketStatus, clock: Clock) -> pb::QuotaStatus {
    let b = s.status;
    pb::QuotaStatus {
        tenant: s.tenant,
        bucket: b.bucket,
        configured_rate_per_min: b.configured_rate_per_min,
        effective_rate_per_min: b.effective_rate_per_min,
        tokens_available: b.tokens_available,
        in_flight: b.in_flight,
        max_in_flight: b.max_in_flight,
        frozen_until_ms: b.frozen_until.map_or(0, |t| clock.unix_ms(t)),
        waiting: b.waiting.into_iter().collect(),
        granted_total: b.granted_total,
        throttled_total: b.throttled_total,
        at_ms: clock.unix_ms(s.at),
        oauth_client: b.oauth_client.unwrap_or_default(),
        scope: b.scope.as_str().to_owned(),
        burst: b.burst,
        reports_total: b.reports_total,
        paused: b.paused.is_some(),
        pause_reason: b.paused.clone().unwrap_or_default(),
        learned_limit_per_min: b.learned_limit_per_min.unwrap_or(0.0),
        throttle_ratio: b.throttle_ratio,
        cooldown_until_ms: b.cooldown_until.map_or(0, |t| clock.unix_ms(t)),
        upstream_remaining: b.upstream_remaining.map_or(-1, i64::from),
        unused: b.unused,
        held_over: b.held_over,
    }
}

/// Encodes a priority class for the wire.
pub(crate) fn class_to_pb(c: &ClassSettings) -> pb::PriorityClass {
    pb::PriorityClass {
        name: c.name.clone(),
        order: c.order,
        weight: c.weight,
        reserve: c.reserve,
        default_max_wait_ms: millis(c.default_max_wait),
    }
}

/// Decodes a priority class from the wire (checked by the tenant).
pub(crate) fn class_from_pb(c: pb::PriorityClass) -> ClassSettings {
    ClassSettings {
        name: c.name,
        order: c.order,
        weight: c.weight,
        reserve: c.reserve,
        default_max_wait: Duration::from_millis(c.default_max_wait_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_with_hidden_characters_are_refused_by_code_point() {
        for (value, named) in [
            ("evil\nline", "a control character (U+000A"),
            ("\u{1b}[31mred", "a control character (U+001B"),
            ("abc\u{202E}cba", "an invisible format character (U+202E"),
            ("\u{2066}isolated", "an invisible format character (U+2066"),
            ("zero\u{200B}width", "an invisible format character (U+200B"),
            ("\u{FEFF}bom", "an invisible format character (U+FEFF"),
            ("\u{061C}", "an invisible format character (U+061C"),
            ("tag\u{E0041}", "an invisible format character (U+E0041"),
        ] {
            let e = bounded("oauth_client", value).unwrap_err().to_string();
            assert!(e.starts_with("oauth_client: it holds "), "{e}");
            assert!(e.contains(named), "{named}: {e}");
            assert!(!e.contains(value), "echoed the value: {e}");
        }
        // Other scripts, emoji, spaces and punctuation are ids like any other.
        for ok in ["Acme \"EU\" 👍", "ünïcødé-клиент-客户", "a b.c_d-e:f", ""] {
            assert_eq!(bounded("client_id", ok).unwrap(), ok);
        }
    }
}
