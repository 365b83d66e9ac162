//! The HTTP port's event feed (`/events`): the token it needs and the
//! tenants it shows, the last minutes sent to a page opened later, the
//! instances of a per-client bucket and what dropped ones counted, the
//! session cookie a page trades its token for, a busy bucket sent at most
//! twice a second, and a token's cap on open feeds.

use super::{
    chunk, config, get, next_of, open, send, start, tokens_config, with_token, LIMIT, TOKEN,
};
use crate::harness::req;
use std::time::Duration;
use tokio::io::BufReader;
use tokio::net::TcpStream;

/// Reads server-sent events until a `bucket` event satisfies `pred`.
async fn next_event(
    reader: &mut BufReader<TcpStream>,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    next_of(reader, "bucket", pred).await
}

#[tokio::test]
async fn the_event_feed_needs_a_token_and_shows_only_its_tenants() {
    let b = start(&config(&tokens_config())).await;
    let none = get(b.http, "/events", &[]).await;
    assert_eq!(none.status, 401, "{}", none.body);
    assert!(none.body.contains("#token="), "{}", none.body);
    assert!(
        none.body.starts_with("no token;"),
        "HTTP words: {}",
        none.body
    );
    let wrong = get(b.http, "/events?token=nope", &[]).await;
    assert_eq!(wrong.status, 401);
    let other = get(b.http, &format!("/events?tenant=u&token={TOKEN}"), &[]).await;
    assert_eq!(other.status, 403, "{}", other.body);
    // Counted where gRPC's refusals are, with the code gRPC would say.
    let metrics = get(b.http, "/metrics", &[]).await.body;
    for line in [
        "quota_broker_rpc_refusals_total{method=\"/events\",code=\"unauthenticated\"} 2",
        "quota_broker_rpc_refusals_total{method=\"/events\",code=\"permission_denied\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line} in:\n{metrics}"
        );
    }

    let bearer = format!("Bearer {TOKEN}");
    let (head, mut feed) = open(b.http, "/events", &[("Authorization", &bearer)]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    let first = next_event(&mut feed, |_| true).await;
    assert_eq!(first["tenant"], "t", "only tenant t is visible: {first}");
    assert_eq!(first["bucket"], "users");
    assert_eq!(first["granted_total"], 0);

    // A grant on t arrives as a change, on the same feed Watch uses.
    let mut client = b.client();
    let mut r = req("GET", "/api/v2/users/1", 0);
    r.tenant = "t".into();
    assert!(
        client
            .acquire(with_token(r, TOKEN))
            .await
            .unwrap()
            .into_inner()
            .granted
    );
    let changed = next_event(&mut feed, |v| v["granted_total"] == 1).await;
    assert_eq!(changed["tenant"], "t");
    assert_eq!(changed["in_flight"], 1);
    assert_eq!(changed["max_in_flight"], 5);
    drop(feed);
    b.stop().await;
}

/// Reads a feed's opening `history` events (up to its first `bucket`
/// event).
async fn history_of(reader: &mut BufReader<TcpStream>) -> Vec<serde_json::Value> {
    tokio::time::timeout(LIMIT, async {
        let (mut pending, mut out) = (String::new(), Vec::new());
        loop {
            let c = chunk(reader).await.expect("the event feed ended early");
            pending.push_str(&c);
            while let Some(end) = pending.find("\n\n") {
                let event: String = pending.drain(..end + 2).collect();
                if event.lines().any(|l| l == "event: bucket") {
                    return out;
                }
                if event.lines().any(|l| l == "event: history") {
                    let data = event.lines().find_map(|l| l.strip_prefix("data: "));
                    out.push(serde_json::from_str(data.unwrap_or_default()).unwrap());
                }
            }
        }
    })
    .await
    .expect("the feed's history came within the limit")
}

/// Moves a paused clock on by `d` a tenth of a second at a time, letting
/// the broker's tasks run at each step, so the history's sampler takes each
/// of its ticks on the way (one `advance` of the whole would wake it once).
async fn pass_in_steps(d: Duration) {
    let step = Duration::from_millis(100);
    for _ in 0..d.as_millis() / step.as_millis() {
        tokio::time::advance(step).await;
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_page_opened_later_is_sent_the_last_minutes_of_its_tenants() {
    let b = start(&config(&tokens_config())).await;
    let bearer = format!("Bearer {TOKEN}");
    let mut client = b.client();
    let grant = || {
        let mut r = req("GET", "/api/v2/users/1", 0);
        r.tenant = "t".into();
        let mut client = client.clone();
        async move {
            client
                .acquire(with_token(r, TOKEN))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let first = grant().await;
    assert!(first.granted, "{}", first.reason);
    pass_in_steps(Duration::from_secs(4)).await;
    assert!(grant().await.granted);
    pass_in_steps(Duration::from_secs(4)).await;
    // Just before the page opens: it still sees this.
    let release = quota_broker::pb::ReleaseRequest {
        lease_id: first.lease_id,
        ..Default::default()
    };
    client.release(with_token(release, TOKEN)).await.unwrap();

    let (head, mut feed) = open(b.http, "/events", &[("Authorization", &bearer)]).await;
    assert_eq!(head.status, 200);
    let history = history_of(&mut feed).await;
    assert_eq!(history.len(), 1, "only tenant t's one bucket: {history:?}");
    let h = &history[0];
    assert_eq!((&h["tenant"], &h["bucket"]), (&"t".into(), &"users".into()));
    // [ms ago, allowed/min, configured/min, granted, 429s, in flight, max]
    let points = h["points"].as_array().unwrap();
    let at = |granted: u64| {
        points
            .iter()
            .find(|p| p[3] == granted)
            .unwrap_or_else(|| panic!("no point with {granted} granted: {points:?}"))
    };
    assert!(
        at(1)[0].as_u64() >= Some(at(2)[0].as_u64().unwrap() + 2_000),
        "one grant, then two, steps apart: {points:?}"
    );
    assert_eq!(at(1)[5], 1, "{points:?}");
    let last = points.last().unwrap();
    assert_eq!(
        (&last[3], &last[5], &last[6]),
        (&2.into(), &1.into(), &5.into())
    );
    assert_eq!(last[0], 0, "read as the page opened: {points:?}");
    assert_eq!(last[2], 2.0);
    drop(feed);
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_feed_says_which_instances_exist_and_what_dropped_ones_counted() {
    let b = start(
        "[server]\nshutdown_grace_ms = 2000\nstate_dir = \"\"\n[[tenants]]\nid = \"t\"\n\
         [[tenants.buckets]]\nname = \"routing\"\nscope = \"oauth_client\"\n\
         routes = [\"GET /api/v2/routing/**\"]\npermits = 60\nwindow_ms = 60000\n",
    )
    .await;
    let client = b.client();
    let grant = |oauth_client: &str| {
        let mut r = req("GET", "/api/v2/routing/queues", 0);
        r.tenant = "t".into();
        r.oauth_client = oauth_client.into();
        let mut client = client.clone();
        async move { client.acquire(r).await.unwrap().into_inner().granted }
    };
    assert!(grant("a").await && grant("a").await && grant("b").await);
    // Idle and full again: the broker drops both instances (Watch does
    // not say so), keeping what they counted for the bucket's totals.
    // On the paused clock: it advances through every timer due meanwhile.
    tokio::time::sleep(Duration::from_secs(180)).await; // paused
    assert!(grant("c").await);
    let (head, mut feed) = open(b.http, "/events", &[]).await;
    assert_eq!(head.status, 200);
    let census = next_of(&mut feed, "instances", |_| true).await;
    assert_eq!(
        census["instances"],
        serde_json::json!(["t/routing/c"]),
        "{census}"
    );
    assert_eq!(
        census["retired"],
        serde_json::json!([{"tenant": "t", "bucket": "routing", "granted": 3, "throttled": 0}]),
        "{census}"
    );
    // Re-created at 0 on its next call.
    assert!(grant("a").await);
    let again = next_event(&mut feed, |v| v["oauth_client"] == "a").await;
    assert_eq!(again["granted_total"], 1);
    drop(feed);
    b.stop().await;
}

#[tokio::test]
async fn the_page_trades_its_token_for_a_cookie_only_the_feed_gets() {
    let b = start(&config(&tokens_config())).await;
    let post = |headers: Vec<(&'static str, String)>| async move {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (head, _) = send(b.http, "POST", "/session", &h).await;
        head
    };
    let none = post(vec![]).await;
    assert_eq!(none.status, 401);
    let wrong = post(vec![("Authorization", "Bearer nope".into())]).await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.header("set-cookie").is_none());

    // The scheme in any case, as gRPC takes it.
    let ok = post(vec![("Authorization", format!("bearer  {TOKEN}"))]).await;
    assert_eq!(ok.status, 204);
    let cookie = ok
        .header("set-cookie")
        .expect("a session cookie")
        .to_owned();
    let name = format!("qb_session_{}", b.http.port());
    assert!(cookie.starts_with(&format!("{name}=")), "{cookie}");
    for attribute in ["Path=/events", "HttpOnly", "SameSite=Strict", "Max-Age="] {
        assert!(cookie.contains(attribute), "{attribute} in {cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain HTTP: {cookie}");
    let pair = cookie.split(';').next().unwrap();
    // Not the token: it is no gRPC credential.
    assert!(!pair.contains(TOKEN) && !pair.contains("t-only"), "{pair}");
    let mut r = req("GET", "/api/v2/users/1", 0);
    r.tenant = "t".into();
    let value = pair.split_once('=').unwrap().1;
    let err = b.client().acquire(with_token(r, value)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // The feed with the cookie alone: the token's tenants only, and the
    // session renewed.
    let (head, mut feed) = open(b.http, "/events", &[("Cookie", pair)]).await;
    assert_eq!(head.status, 200);
    assert!(
        head.header("set-cookie")
            .is_some_and(|c| c.starts_with(&format!("{name}="))),
        "renewed: {:?}",
        head.headers
    );
    let first = next_event(&mut feed, |_| true).await;
    assert_eq!(first["tenant"], "t", "{first}");
    drop(feed);
    let (head, _feed) = open(
        b.http,
        "/events?tenant=u",
        &[("Cookie", &format!("other=1; {pair}"))],
    )
    .await;
    assert_eq!(head.status, 403, "scoped to t, not u");
    // Under another port's name (another broker's dashboard on this
    // host), it is not this broker's.
    let elsewhere = pair.replacen(&name, "qb_session_1", 1);
    let refused = get(b.http, "/events", &[("Cookie", &elsewhere)]).await;
    assert_eq!(refused.status, 401, "{}", refused.body);
    // Forged or stale: refused, saying what to do; a token in the query
    // goes before it.
    let forged = format!("{name}=0.99999999999.00");
    let refused = get(b.http, "/events", &[("Cookie", &forged)]).await;
    assert_eq!(refused.status, 401);
    assert!(refused.body.contains("#token="), "{}", refused.body);
    let (head, _feed) = open(
        b.http,
        &format!("/events?token={TOKEN}"),
        &[("Cookie", &forged)],
    )
    .await;
    assert_eq!(head.status, 200);
    // Behind a TLS-terminating proxy the cookie is Secure; DELETE ends it.
    let proxied = post(vec![
        ("Authorization", format!("Bearer {TOKEN}")),
        ("X-Forwarded-Proto", "https".into()),
    ])
    .await;
    assert!(proxied
        .header("set-cookie")
        .is_some_and(|c| c.ends_with("; Secure")));
    let (gone, _) = send(b.http, "DELETE", "/session", &[]).await;
    assert_eq!(gone.status, 204);
    assert!(gone
        .header("set-cookie")
        .is_some_and(|c| c.starts_with(&format!("{name}=;")) && c.contains("Max-Age=0")));
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_event_feed_sends_a_busy_bucket_at_most_twice_a_second() {
    let b = start(
        "[server]\nshutdown_grace_ms = 2000\nstate_dir = \"\"\n[[tenants]]\nid = \"t\"\n\
         [[tenants.buckets]]\nname = \"users\"\nroutes = [\"GET /api/v2/users/**\"]\n\
         permits = 6000\nwindow_ms = 60000\nburst = 100\n",
    )
    .await;
    let (head, mut feed) = open(b.http, "/events", &[]).await;
    assert_eq!(head.status, 200);
    next_event(&mut feed, |v| v["granted_total"] == 0).await;
    let mut client = b.client();
    // A grant every 50 ms for two seconds.
    for _ in 0..40 {
        let mut r = req("GET", "/api/v2/users/1", 0);
        r.tenant = "t".into();
        assert!(client.acquire(r).await.unwrap().into_inner().granted);
        tokio::time::sleep(Duration::from_millis(50)).await; // paused clock
    }
    let mut seen = 0;
    loop {
        let e = next_event(&mut feed, |_| true).await;
        seen += 1;
        if e["granted_total"] == 40 {
            break;
        }
    }
    assert!((3..=6).contains(&seen), "{seen} events for 2 s of grants");
    drop(feed);
    b.stop().await;
}

#[tokio::test]
async fn a_token_holds_at_most_its_watch_streams_of_event_feeds() {
    let capped = format!("{}max_watch_streams = 2\n", tokens_config());
    let b = start(&config(&capped)).await;
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let (first, feed) = open(b.http, "/events", &auth).await;
    let (second, _kept) = open(b.http, "/events", &auth).await;
    assert_eq!((first.status, second.status), (200, 200));
    let over = get(b.http, "/events", &auth).await;
    assert_eq!(over.status, 429, "{}", over.body);
    assert!(over.body.contains("max_watch_streams"), "{}", over.body);
    assert!(
        over.body
            .contains("\"t-reader\" already has 2 Watch streams"),
        "{}",
        over.body
    );
    assert_eq!(over.header("retry-after"), Some("1"), "{:?}", over.headers);
    // A feed that ends gives its place back.
    drop(feed);
    let reopened = tokio::time::timeout(LIMIT, async {
        loop {
            let (head, feed) = open(b.http, "/events", &auth).await;
            if head.status == 200 {
                return feed;
            }
            assert_eq!(head.status, 429);
        }
    })
    .await
    .expect("the closed feed's place came back");
    drop(reopened);
    b.stop().await;
}
