//! Learning from reported throttling, end to end in one tenant: a fleet of
//! leased clients converges against an upstream model with a hidden limit
//! and an unmanaged consumer (in-process, on a simulated clock).

use super::{AcquireArgs, Decision, TenantState};
use crate::config::Settings;
use crate::learning::parse_headers;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// A fixed-window upstream like Genesys Cloud's: `limit` per `window`
/// (the clients are not told it), `inin-ratelimit-*` headers on every
/// answer, 429 with Retry-After once the window's budget is spent.
struct Upstream {
    limit: u64,
    window: Duration,
    window_start: Instant,
    used: u64,
    /// Whether the headers describe this limit. When not, as with a Genesys
    /// endpoint-family limit, only a 429's Retry-After tells of it.
    reveal: bool,
}

impl Upstream {
    fn call(&mut self, now: Instant) -> (u32, Vec<(String, String)>) {
        while now >= self.window_start + self.window {
            self.window_start += self.window;
            self.used = 0;
        }
        let reset = (self.window_start + self.window - now).as_secs_f64().ceil() as u64;
        let status = if self.used >= self.limit {
            429
        } else {
            self.used += 1;
            200
        };
        let mut h = Vec::new();
        if self.reveal {
            h.push(("inin-ratelimit-allowed".to_owned(), self.limit.to_string()));
            h.push(("inin-ratelimit-count".to_owned(), self.used.to_string()));
            h.push(("inin-ratelimit-reset".to_owned(), reset.to_string()));
        }
        if status == 429 {
            h.push(("Retry-After".to_owned(), reset.to_string()));
        }
        (status, h)
    }

    fn window_of(&self, t0: Instant, now: Instant) -> usize {
        ((now - t0).as_secs_f64() / self.window.as_secs_f64()) as usize
    }
}

/// An upstream answer on its way back: (arrival, status, headers).
type Answer = (Instant, u32, Vec<(String, String)>);

#[derive(Default, Clone, Copy, Debug)]
struct WindowStats {
    ok: u64,
    throttled: u64,
    unmanaged_ok: u64,
}

/// Runs `windows` windows of 4 greedy broker-leased clients (300 ms upstream
/// latency) plus an unmanaged consumer spending `unmanaged` per window
/// against an upstream whose real limit is `hidden` per minute, while the
/// broker is configured with the documented 60 per minute.
fn simulate(hidden: u64, unmanaged: u64, windows: usize, reveal: bool) -> Vec<WindowStats> {
    let settings = Settings::from_toml(
        r#"
        [[tenants]]
        id = "org"
        [[tenants.buckets]]
        name = "analytics"
        routes = ["* /api/v2/analytics/**"]
        permits = 60
        window_ms = 60000
        burst = 10
        "#,
    )
    .unwrap();
    let t0 = Instant::now();
    let mut broker = TenantState::new(0, &settings.tenants[0], &settings, Default::default(), t0);
    let window = Duration::from_secs(60);
    let mut up = Upstream {
        limit: hidden,
        window,
        window_start: t0,
        used: 0,
        reveal,
    };
    let step = Duration::from_millis(10);
    let latency = Duration::from_millis(300);
    let unmanaged_every = window / unmanaged.max(1) as u32;
    let mut next_unmanaged = t0 + unmanaged_every / 2;
    let args = AcquireArgs {
        client_id: "ingest".into(),
        class: "batch".into(),
        method: "POST".into(),
        path: "/api/v2/analytics/conversations/details/query".into(),
        oauth_client: "oc".into(),
        permits: 1,
        idempotency_key: String::new(),
    };
    // Per client: the answer it waits for (arrival, status, headers).
    let mut in_flight: Vec<Option<Answer>> = vec![None; 4];
    let mut stats = vec![WindowStats::default(); windows];
    let mut now = t0;
    while now < t0 + window * windows as u32 {
        if unmanaged > 0 && now >= next_unmanaged {
            let (status, _) = up.call(now);
            if status == 200 {
                stats[up.window_of(t0, now)].unmanaged_ok += 1;
            }
            next_unmanaged += unmanaged_every;
        }
        for slot in in_flight.iter_mut() {
            if let Some((at, status, h)) = slot.as_ref() {
                if *at <= now {
                    let info = parse_headers(
                        h.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                        SystemTime::now(),
                    );
                    broker
                        .report(
                            ("POST", &args.path, "oc"),
                            *status,
                            info.retry_after,
                            &info,
                            now,
                        )
                        .unwrap();
                    *slot = None;
                }
            }
            if slot.is_none() {
                if let Decision::Granted(_) =
                    broker.acquire(&args, Some(Duration::ZERO), now).unwrap()
                {
                    let (status, h) = up.call(now);
                    let w = &mut stats[up.window_of(t0, now)];
                    if status == 200 {
                        w.ok += 1
                    } else {
                        w.throttled += 1
                    }
                    *slot = Some((now + latency, status, h));
                }
            }
        }
        broker.tick(now);
        now += step;
    }
    stats
}

/// The window from which on every window used at least `share` of what the
/// upstream had left for the broker's clients.
fn converged_from(stats: &[WindowStats], hidden: u64, share: f64) -> Option<usize> {
    let good = |w: &WindowStats| w.ok as f64 >= share * (hidden - w.unmanaged_ok) as f64;
    (0..stats.len()).find(|&k| stats[k..].iter().all(good))
}

#[test]
fn fleet_converges_under_a_hidden_limit_and_an_unmanaged_consumer() {
    // When the headers are silent about the limit, each probe for more
    // capacity ends in a 429 and a freeze, and the window after it starts
    // late (Retry-After, jitter, the batch class's reserve): those windows
    // use 85-90%.
    for (hidden, unmanaged, reveal, share) in [
        (54, 9, true, 0.9),
        (45, 0, true, 0.9),
        (60, 15, true, 0.9),
        (45, 9, false, 0.85),
        (30, 0, false, 0.85),
    ] {
        let stats = simulate(hidden, unmanaged, 12, reveal);
        let k = converged_from(&stats, hidden, share);
        let after: Vec<_> = stats[k.unwrap_or(0)..].to_vec();
        let ok: u64 = after.iter().map(|w| w.ok).sum();
        let throttled: u64 = after.iter().map(|w| w.throttled).sum();
        let left: u64 = after.iter().map(|w| hidden - w.unmanaged_ok).sum();
        eprintln!(
            "hidden {hidden}/min, unmanaged {unmanaged}/min, headers {}: converged from window {k:?}; after: \
             used {ok} of {left} left ({:.1}%), 429 ratio {:.2}%; per window {stats:?}",
            if reveal { "tell" } else { "silent" },
            100.0 * ok as f64 / left as f64,
            100.0 * throttled as f64 / (ok + throttled).max(1) as f64,
        );
        assert!(
            k.is_some_and(|k| k <= 2),
            "did not converge within two windows: {stats:?}"
        );
        assert!(
            throttled as f64 <= 0.01 * (ok + throttled) as f64,
            "429 ratio after convergence above 1%: {stats:?}"
        );
    }
}
