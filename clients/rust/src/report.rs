//! Outcomes the broker is told: reports of upstream calls (with what a 429
//! says: its Retry-After, a body about requests in flight), and the reports
//! and releases kept while the broker was away, sent once a probe finds it
//! back.

use crate::call::new_key;
use crate::error::{is_unreachable, may_have_reached_a_broker, ClientError, RpcError};
use crate::fallback::Route;
use crate::release::without_adoption;
use crate::tls::tls_refusal;
use crate::{BrokerClient, Call};
use quota_broker::pb::{ReleaseRequest, ReportRequest};
use quota_broker::REPORTED_HEADERS;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

impl BrokerClient {
    /// Reports an upstream outcome for `call` (outside any lease).
    pub async fn report(
        &self,
        call: &Call,
        lease_id: &str,
        status: u16,
        headers: &http::HeaderMap,
    ) -> Result<(), ClientError> {
        self.report_outcome(call, lease_id, status, headers, false)
            .await
    }

    /// [`BrokerClient::report`], saying whether a 429 was about requests
    /// in flight rather than rate (see [`says_concurrency`]): the broker
    /// then lowers the call's learned concurrency limit instead of its rate.
    pub async fn report_outcome(
        &self,
        call: &Call,
        lease_id: &str,
        status: u16,
        headers: &http::HeaderMap,
        concurrency_limited: bool,
    ) -> Result<(), ClientError> {
        let held = if status == 429 {
            headers.get(http::header::RETRY_AFTER).and_then(retry_after)
        } else {
            None
        };
        let headers = headers
            .iter()
            .filter(|(k, _)| REPORTED_HEADERS.contains(&k.as_str()))
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        let req = ReportRequest {
            tenant: call.tenant.clone(),
            lease_id: lease_id.to_owned(),
            method: call.method.clone(),
            path: call.path.clone(),
            oauth_client: call.oauth_client.clone(),
            http_status: u32::from(status),
            retry_after_ms: 0,
            headers,
            concurrency_limited: concurrency_limited && status == 429,
            // Kept with the report: sent again after no answer, it counts
            // once even if the broker received the first.
            idempotency_key: new_key(),
        };
        // Falling back: kept for when the broker is back, without waiting
        // on it (it is probed in the background); the upstream's
        // Retry-After holds the local limiter too.
        // (The route read first: the fallback's lock is not held below.)
        let route = self.fallback().route();
        if let Route::Local { probe } = route {
            if probe {
                self.probe_in_background();
            }
            if let Some(wait) = held {
                self.fallback().throttled(wait);
            }
            self.kept().keep(req);
            return Ok(());
        }
        let answer = self
            .rpc(|mut c| {
                let req = self.request(req.clone());
                async move { c.report(req).await }
            })
            .await;
        // Not a broker: an error, the report not kept for it.
        let answer = match answer {
            Ok(r) => Ok(r),
            Err(e) => Err(e.status()?),
        };
        match answer {
            Ok(_) => Ok(()),
            Err(s) if tls_refusal(&s).is_some() => {
                Err(ClientError::Tls(tls_refusal(&s).unwrap_or_default()))
            }
            // The broker is away: it hears of this once it is back, and
            // the fallback the next call enters keeps to the Retry-After.
            Err(s) if is_unreachable(&s) => {
                if let Some(wait) = held {
                    self.fallback().throttled(wait);
                }
                self.kept().keep(req);
                Ok(())
            }
            Err(s) => Err(s.into()),
        }
    }

    /// Sends the outcomes kept while the broker was unreachable, oldest
    /// first; returns how many were sent. Stops (keeping the rest) when the
    /// broker is unreachable again. The client also does this by itself,
    /// in the background, when the broker answers again.
    pub async fn flush_reports(&self) -> usize {
        loop {
            let next = self.kept().next_release();
            let Some(req) = next else {
                break;
            };
            let reached = AtomicBool::new(false);
            match self.send_release_adopting(&req, &reached).await {
                // Away again, or over this caller's request rate: later.
                Err(RpcError::Status(s))
                    if is_unreachable(&s) || s.code() == tonic::Code::ResourceExhausted =>
                {
                    if may_have_reached_a_broker(&s) {
                        reached.store(true, Ordering::Release);
                    }
                    self.kept()
                        .put_back_release(without_adoption(req, &reached));
                    return 0;
                }
                Err(s) => tracing::debug!(error = %s, "a kept release was refused"),
                Ok(_) => {}
            }
        }
        let mut sent = 0;
        loop {
            let Some(report) = self.kept().next() else {
                return sent;
            };
            let answer = self
                .rpc(|mut c| {
                    let req = self.request(report.clone());
                    async move { c.report(req).await }
                })
                .await;
            match answer {
                Ok(_) => sent += 1,
                Err(RpcError::Status(s)) if is_unreachable(&s) => {
                    self.kept().put_back(report);
                    return sent;
                }
                // Refused for good (e.g. a bucket no longer configured).
                Err(s) => tracing::debug!(error = %s, "a kept report was refused; dropped"),
            }
        }
    }

    /// Probes the broker (one probe at a time) while falling back; when a
    /// broker answers, calls go to it again and what was kept is sent. The
    /// probe is a Release of no lease: any answer but "unreachable" says a
    /// broker is back, and it changes nothing there.
    pub(crate) fn probe_in_background(&self) {
        if self.inner.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let client = self.clone();
        tokio::spawn(async move {
            let answer = client.send_release(&ReleaseRequest::default()).await;
            client.inner.probing.store(false, Ordering::Release);
            // A handshake that cannot succeed (a certificate rotated to one
            // this client does not trust), or a server that is not a
            // broker, counts as an answer: the next call says so instead of
            // running on the fallback rate for good.
            let away = matches!(&answer,
                Err(RpcError::Status(s)) if is_unreachable(s) && tls_refusal(s).is_none());
            if !away {
                client.fallback().broker_answered();
                client.send_kept_in_background();
            }
        });
    }

    pub(crate) fn send_kept_in_background(&self) {
        if self.kept().is_empty() {
            return;
        }
        let client = self.clone();
        // Ends by itself once the kept reports are sent or the broker is
        // away again.
        tokio::spawn(async move {
            let sent = client.flush_reports().await;
            if sent > 0 {
                tracing::info!(sent, "outcomes kept during the broker's absence reported");
            }
        });
    }
}

/// A Retry-After value (delta seconds or an HTTP-date) as a wait from now,
/// at most 15 minutes (as the broker caps a freeze).
fn retry_after(value: &http::HeaderValue) -> Option<Duration> {
    const MOST: Duration = Duration::from_secs(15 * 60);
    let text = value.to_str().ok()?.trim();
    if let Ok(secs) = text.parse::<f64>() {
        return (secs.is_finite() && secs > 0.0).then(|| Duration::from_secs_f64(secs.min(900.0)));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    let wait = at.duration_since(std::time::SystemTime::now()).ok()?;
    Some(wait.min(MOST))
}

/// Whether a 429's body says the refusal is about concurrent requests
/// (Genesys Cloud and most APIs word it "concurrent" / "concurrency"), so
/// it can be reported with [`Lease::report_concurrency_429`].
///
/// [`Lease::report_concurrency_429`]: crate::Lease::report_concurrency_429
pub fn says_concurrency(body: &[u8]) -> bool {
    const WORD: &[u8] = b"concurren";
    body.windows(WORD.len())
        .any(|w| w.eq_ignore_ascii_case(WORD))
}

#[cfg(test)]
mod tests {
    use super::says_concurrency;

    #[test]
    fn a_concurrency_refusal_is_recognised_by_its_wording() {
        assert!(says_concurrency(
            b"{\"message\":\"Rate limit exceeded the maximum. [concurrency:analytics]\"}"
        ));
        assert!(says_concurrency(b"Too many CONCURRENT requests"));
        assert!(!says_concurrency(
            b"Rate limit exceeded the maximum. [family:analytics]"
        ));
        assert!(!says_concurrency(b""));
    }
}
