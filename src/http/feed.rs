//! The dashboard's event feed, `/events`: server-sent events that start
//! with each visible instance's last minutes and which instances exist,
//! then follow the broker's Watch feed (coalesced per instance), with a
//! census of the instances every [`INSTANCES_EVERY`]; what a caller may
//! see follows the gRPC rules (see `access`), and each feed counts as a
//! Watch stream against the caller's cap (429) and every caller's,
//! `server.max_watch_streams` (503).

use super::access::{caller, new_session, refuse_caller};
use super::{history, refuse, Http};
use crate::broker::{Broker, TenantBucketStatus};
use crate::clock::{millis, Clock};
use crate::grpc::PeerInfo;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;

/// A comment on an idle feed this often, so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// The event feed sends each instance at most this often: the page keeps
/// one chart point per half second, and a per-client bucket of 300 busy
/// clients would otherwise send it some 600 events a second.
const FEED_COALESCE: Duration = Duration::from_millis(500);
/// The event feed says which instances exist this often.
const INSTANCES_EVERY: Duration = Duration::from_secs(15);

#[derive(Debug, Deserialize)]
pub(super) struct EventsQuery {
    #[serde(default)]
    tenant: String,
    #[serde(default)]
    token: String,
}

pub(super) async fn events(
    State(http): State<Http>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> Response {
    let response = feed(http.clone(), peer, headers, q);
    let status = response.status();
    if !status.is_success() {
        if let Some(m) = http.broker.metrics() {
            m.feed_refused(status.as_u16());
        }
    }
    response
}

/// The feed `events` answers with, or its refusal.
fn feed(
    http: Http,
    peer: SocketAddr,
    headers: HeaderMap,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                &format!(
                    "{}: /events takes ?tenant=ID and ?token=TOKEN, each at most once",
                    crate::error::clip_plain(&e.body_text())
                ),
            )
        }
    };
    let who = match caller(&http, "/events", peer, &headers, &q.token) {
        Ok(who) => who,
        Err(refused) => return *refused,
    };
    // A feed opened with the session renews it.
    let by_session =
        !http.auth.is_open() && headers.get(header::AUTHORIZATION).is_none() && q.token.is_empty();
    let renewed = by_session
        .then(|| new_session(&http, &headers, &who))
        .flatten();
    let tenant = (!q.tenant.is_empty()).then_some(q.tenant.as_str());
    if let Some(t) = tenant {
        if let Err(e) = who.may_access(t) {
            return refuse_caller("/events", peer, StatusCode::FORBIDDEN, &e.to_string());
        }
    }
    let permit = match http
        .overload
        .open_watch(&who, Some(&PeerInfo::new(Some(peer), false)))
    {
        Ok(permit) => permit,
        Err(capped) => {
            // The caller's own cap is its doing (429); every caller's
            // together is the broker's state (503).
            let code = if capped.is_broker_wide() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::TOO_MANY_REQUESTS
            };
            let status = tonic::Status::from(capped);
            let mut refused = refuse(code, status.message());
            // HTTP says when to come back in whole seconds.
            let ms = status
                .metadata()
                .get(crate::grpc::RETRY_AFTER_MS)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .unwrap_or(1_000);
            refused
                .headers_mut()
                .insert(header::RETRY_AFTER, ms.div_ceil(1_000).max(1).into());
            return refused;
        }
    };
    let only = tenant.map(str::to_owned);
    let viewer = who.clone();
    let shows = move |t: &str| only.as_deref().map_or_else(|| viewer.sees(t), |o| o == t);
    // Which instances exist now: the feed's first `instances` event, and
    // the instances whose last minutes it sends, read up to now (not to the
    // last step) and before the live feed's first snapshot, so that
    // snapshot is never older than the history.
    let (live, first_census) = census(&http.broker, &shows);
    http.history.sample(&http.broker, true);
    let now = tokio::time::Instant::now();
    let past: Vec<Result<Event, Infallible>> = http
        .history
        .series(&live, now)
        .iter()
        .map(|s| Ok(Event::default().event("history").data(s.to_json(now))))
        .collect();
    let rx = match http
        .broker
        .watch_every(tenant, |t| who.sees(t), FEED_COALESCE)
    {
        Ok(rx) => rx,
        // Another broker of the cluster leads it (or none does yet): a
        // retry may find it here, or the message says where it is led.
        Err(crate::error::BrokerError::NotLeader { tenant, leader }) => {
            // Its leader's gRPC address is what the cluster knows: the
            // dashboard is on that broker's HTTP port.
            let said = match leader {
                Some(url) => format!(
                    "this broker does not lead tenant {}; its leader is the broker at {} \
                     (its gRPC address): open the dashboard on that broker's HTTP port",
                    crate::error::clip(&tenant),
                    crate::error::clip(&url)
                ),
                None => crate::error::BrokerError::NotLeader {
                    tenant,
                    leader: None,
                }
                .to_string(),
            };
            let mut refused = refuse(StatusCode::SERVICE_UNAVAILABLE, &said);
            refused.headers_mut().insert(
                header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("5"),
            );
            return refused;
        }
        // Stopping: another broker (or this one restarted) will serve it.
        Err(e @ crate::error::BrokerError::ShuttingDown) => {
            let mut refused = refuse(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
            refused.headers_mut().insert(
                header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("5"),
            );
            return refused;
        }
        Err(e) => return refuse(StatusCode::NOT_FOUND, &e.to_string()),
    };
    let clock = http.broker.clock();
    let broker = http.broker.clone();
    // Which instances exist (Watch announces no removals: an idle OAuth
    // client's instance is dropped and re-created at 0) and what the
    // dropped ones had counted: at once, then every INSTANCES_EVERY, read
    // as each is sent.
    let later = futures_util::stream::unfold((), move |()| {
        let (broker, shows) = (broker.clone(), shows.clone());
        async move {
            tokio::time::sleep(INSTANCES_EVERY).await;
            Some((Ok(census(&broker, &shows).1), ()))
        }
    });
    // A feed of one tenant ends when it is led elsewhere: the page
    // reconnects, and is told where it is led (503).
    let live =
        tokio_stream::StreamExt::map_while(ReceiverStream::new(rx), Result::ok).map(move |s| {
            Ok::<_, Infallible>(Event::default().event("bucket").data(record(&s, clock)))
        });
    // The feed ends with the live part (the tenant led elsewhere, or the
    // broker shutting down), the census with it, so the page reconnects
    // and the HTTP port can shut down.
    let live = live
        .map(Some)
        .chain(futures_util::stream::once(std::future::ready(None)));
    let later = later
        .take_until(http.shutdown.clone().cancelled_owned())
        .map(Some);
    let merged = futures_util::stream::select(later, live)
        .take_while(|e| std::future::ready(e.is_some()))
        .filter_map(std::future::ready);
    let stream = futures_util::stream::iter(past)
        .chain(futures_util::stream::once(async { Ok(first_census) }))
        .chain(merged)
        .map(move |e| {
            // The feed holds its place under the cap until it ends.
            let _open = &permit;
            e
        });
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    if let Some(cookie) = renewed {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

/// Every instance of the tenants `shows` accepts, and the `instances`
/// event that says so (`"tenant/bucket/oauth client"`), with per bucket
/// what its dropped instances had counted and each tenant's classes.
/// Most tenants led by other brokers named in one census event.
const ELSEWHERE_LISTED: usize = 20;

fn census(broker: &Broker, shows: &dyn Fn(&str) -> bool) -> (HashSet<history::Key>, Event) {
    let (live, retired) = broker.list_with_retired();
    let live: Vec<&TenantBucketStatus> = live.iter().filter(|s| shows(&s.tenant)).collect();
    let set: HashSet<history::Key> = live.iter().map(|s| history::key_of(s)).collect();
    let mut keys: Vec<String> = set
        .iter()
        .map(|(tenant, bucket, client)| format!("{tenant}/{bucket}/{client}"))
        .collect();
    keys.sort_unstable();
    let retired: Vec<serde_json::Value> = retired
        .iter()
        .filter(|(t, _, _)| shows(t))
        .map(|(t, b, r)| {
            serde_json::json!({
                "tenant": t, "bucket": b, "granted": r.granted, "throttled": r.throttled,
            })
        })
        .collect();
    // Each shown tenant's classes: a class may not take of a bucket what
    // the classes served before it keep back (their reserves), so the page
    // can tell a bucket its waiters cannot draw from.
    let mut tenants: Vec<&str> = live.iter().map(|s| s.tenant.as_str()).collect();
    tenants.dedup();
    let classes: serde_json::Map<String, serde_json::Value> = tenants
        .into_iter()
        .filter(|t| shows(t))
        .filter_map(|t| {
            let (classes, _) = broker.classes(t).ok()?;
            let list: Vec<serde_json::Value> = classes
                .iter()
                .map(
                    |c| serde_json::json!({"name": c.name, "order": c.order, "reserve": c.reserve}),
                )
                .collect();
            Some((t.to_owned(), serde_json::Value::from(list)))
        })
        .collect();
    // Cluster mode: the shown tenants another broker leads, which this
    // broker's feed cannot show (the page names where they are led).
    let (elsewhere, elsewhere_total) = broker.led_elsewhere(shows, ELSEWHERE_LISTED);
    let elsewhere: Vec<serde_json::Value> = elsewhere
        .iter()
        .map(|(tenant, leader)| serde_json::json!({ "tenant": tenant, "leader": leader }))
        .collect();
    let event = Event::default().event("instances").data(
        serde_json::json!({
            "instances": keys, "retired": retired, "classes": classes,
            "elsewhere": elsewhere, "elsewhere_total": elsewhere_total,
        })
        .to_string(),
    );
    (set, event)
}

/// One bucket instance as the dashboard reads it (times relative to `at_ms`,
/// so the page needs no clock of its own in sync).
fn record(s: &TenantBucketStatus, clock: Clock) -> String {
    let b = &s.status;
    let frozen_ms = b
        .frozen_until
        .map_or(0, |u| millis(u.saturating_duration_since(s.at)));
    serde_json::json!({
        "tenant": s.tenant,
        "bucket": b.bucket,
        "scope": b.scope.as_str(),
        "oauth_client": b.oauth_client.as_deref().unwrap_or(""),
        "configured_per_min": b.configured_rate_per_min,
        "effective_per_min": b.effective_rate_per_min,
        "learned_per_min": b.learned_limit_per_min,
        "burst": b.burst,
        "tokens": b.tokens_available,
        "in_flight": b.in_flight,
        "held_over": b.held_over,
        "max_in_flight": b.max_in_flight,
        "waiting": b.waiting,
        "paused": b.paused.is_some(),
        "granted_total": b.granted_total,
        "throttled_total": b.throttled_total,
        "reports_total": b.reports_total,
        "frozen_ms": frozen_ms,
        "unused": b.unused,
        "at_ms": clock.unix_ms(s.at),
    })
    .to_string()
}
