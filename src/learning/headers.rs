//! Rate-limit response headers: turns the headers an integration reports
//! after an upstream call into one [`RateLimitInfo`].
//!
//! Understood forms (names are case-insensitive):
//!
//! * `Retry-After`: delta-seconds (decimals such as `1.5` allowed) or an
//!   HTTP-date.
//! * Genesys Cloud: `inin-ratelimit-allowed` (limit), `inin-ratelimit-count`
//!   (used this window; remaining = allowed − count) and
//!   `inin-ratelimit-reset` (seconds).
//! * Gateways: `X-RateLimit-Limit`, `X-RateLimit-Remaining`,
//!   `X-RateLimit-Reset`.
//! * IETF drafts: `RateLimit-Limit` / `-Remaining` / `-Reset`, then
//!   `RateLimit: limit=100, remaining=50, reset=30` or
//!   `RateLimit: "default";r=50;t=30`, then
//!   `RateLimit-Policy: "default";q=100;w=60` (or `100;w=60`).
//!
//! Each field is taken from the first of these forms, in that order, that
//! supplies a usable value. A reset above 1 000 000 000 is a Unix time in
//! seconds. Durations are capped at [`MAX_DURATION`]. Parsing never fails
//! and never panics: values that don't parse are skipped with a `debug!`
//! log, so a later form can still supply the field.

use crate::api::REPORTED_HEADERS;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The longest duration [`parse`] reports; larger values are capped to it.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Resets above this many seconds are Unix times, not deltas.
const EPOCH_THRESHOLD: u64 = 1_000_000_000;

/// What the upstream's rate-limit headers say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitInfo {
    /// How long to wait before retrying (Retry-After).
    pub retry_after: Option<Duration>,
    /// The budget's size per window (requests).
    pub limit: Option<u64>,
    /// Requests left in the current window.
    pub remaining: Option<u64>,
    /// Time until the window resets (from the moment of parsing).
    pub reset: Option<Duration>,
    /// The window length, when the headers say it (RateLimit-Policy w=).
    pub window: Option<Duration>,
}

impl RateLimitInfo {
    /// True when no header was understood.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// True when the headers say the budget is used up (remaining == Some(0)).
    pub fn exhausted(&self) -> bool {
        self.remaining == Some(0)
    }
}

/// Parses headers (name, value) pairs; `now` converts HTTP-dates and epoch resets to durations.
pub(crate) fn parse<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    now: SystemTime,
) -> RateLimitInfo {
    let mut seen = Seen::default();
    for (name, value) in headers {
        if !seen.add(name, value, now) {
            tracing::debug!(
                header = name,
                value,
                "ignoring unparseable rate-limit header"
            );
        }
    }
    seen.finish()
}

/// The fields one header form supplied.
#[derive(Debug, Default, Clone, Copy)]
struct Fields {
    limit: Option<u64>,
    remaining: Option<u64>,
    reset: Option<Duration>,
    window: Option<Duration>,
}

/// Everything understood so far, per form; the first valid value wins
/// within a form.
#[derive(Debug, Default)]
struct Seen {
    retry_after: Option<Duration>,
    inin_count: Option<u64>,
    inin: Fields,
    x: Fields,
    ietf: Fields,
    structured: Fields,
    policy: Fields,
}

impl Seen {
    /// Records one header; false when it is a known header whose value
    /// doesn't parse.
    fn add(&mut self, name: &str, value: &str, now: SystemTime) -> bool {
        let name = name.trim().to_ascii_lowercase();
        if !REPORTED_HEADERS.contains(&name.as_str()) {
            return true;
        }
        match name.as_str() {
            "retry-after" => fill(&mut self.retry_after, retry_after(value, now)),
            "inin-ratelimit-allowed" => fill(&mut self.inin.limit, number(value)),
            "inin-ratelimit-count" => fill(&mut self.inin_count, number(value)),
            "inin-ratelimit-reset" => fill(&mut self.inin.reset, reset(value, now)),
            "x-ratelimit-limit" => fill(&mut self.x.limit, first_number(value)),
            "x-ratelimit-remaining" => fill(&mut self.x.remaining, number(value)),
            "x-ratelimit-reset" => fill(&mut self.x.reset, reset(value, now)),
            "ratelimit-limit" => fill(&mut self.ietf.limit, first_number(value)),
            "ratelimit-remaining" => fill(&mut self.ietf.remaining, number(value)),
            "ratelimit-reset" => fill(&mut self.ietf.reset, reset(value, now)),
            "ratelimit" => params(value, &mut self.structured, false, now),
            "ratelimit-policy" => params(value, &mut self.policy, true, now),
            _ => true,
        }
    }

    fn finish(self) -> RateLimitInfo {
        let inin = Fields {
            remaining: self
                .inin
                .limit
                .zip(self.inin_count)
                .map(|(a, c)| a.saturating_sub(c)),
            ..self.inin
        };
        let forms = [inin, self.x, self.ietf, self.structured, self.policy];
        let pick = |f: fn(&Fields) -> Option<u64>| forms.iter().find_map(f);
        let pick_duration = |f: fn(&Fields) -> Option<Duration>| forms.iter().find_map(f).map(cap);
        RateLimitInfo {
            retry_after: self.retry_after.map(cap),
            limit: pick(|f| f.limit),
            remaining: pick(|f| f.remaining),
            reset: pick_duration(|f| f.reset),
            window: pick_duration(|f| f.window),
        }
    }
}

/// Keeps the first valid value; false when `value` is `None`.
fn fill<T>(slot: &mut Option<T>, value: Option<T>) -> bool {
    match value {
        Some(v) => {
            slot.get_or_insert(v);
            true
        }
        None => false,
    }
}

fn cap(d: Duration) -> Duration {
    d.min(MAX_DURATION)
}

/// A non-negative integer of ASCII digits; too large saturates to `u64::MAX`.
fn number(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.parse().unwrap_or(u64::MAX))
}

/// The leading number of a list such as `100, 100;w=60`.
fn first_number(s: &str) -> Option<u64> {
    s.split([',', ';']).next().and_then(number)
}

/// Seconds as an integer or decimal (`30`, `1.5`, `.25`), uncapped.
fn seconds(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if (int.is_empty() && frac.is_empty()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs = if int.is_empty() { 0 } else { number(int)? };
    let frac = frac.get(..9).unwrap_or(frac);
    let nanos = frac
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(9)
        .fold(0u32, |n, b| n * 10 + u32::from(b - b'0'));
    Some(Duration::new(secs, nanos))
}

/// Delta-seconds or an HTTP-date.
fn retry_after(s: &str, now: SystemTime) -> Option<Duration> {
    seconds(s).or_else(|| {
        let at = httpdate::parse_http_date(s.trim()).ok()?;
        Some(at.duration_since(now).unwrap_or_default())
    })
}

/// Seconds until reset, or a Unix time when above [`EPOCH_THRESHOLD`].
fn reset(s: &str, now: SystemTime) -> Option<Duration> {
    let d = seconds(s)?;
    if d.as_secs() <= EPOCH_THRESHOLD {
        return Some(d);
    }
    Some(match UNIX_EPOCH.checked_add(d) {
        Some(at) => at.duration_since(now).unwrap_or_default(),
        None => d,
    })
}

/// A non-zero window length in seconds.
fn window(s: &str) -> Option<Duration> {
    seconds(s).filter(|d| !d.is_zero())
}

/// A tolerant parameter list: items split on `,` and `;`, each `key=value`
/// (value optionally quoted) or bare. With `bare_limit`, the first bare
/// number is the limit. False when nothing was understood or a known key's
/// value doesn't parse.
fn params(value: &str, into: &mut Fields, bare_limit: bool, now: SystemTime) -> bool {
    let (mut ok, mut understood) = (true, false);
    for item in value
        .split([',', ';'])
        .map(str::trim)
        .filter(|i| !i.is_empty())
    {
        let Some((key, v)) = item.split_once('=') else {
            if bare_limit && into.limit.is_none() {
                understood |= fill(&mut into.limit, number(item));
            }
            continue;
        };
        let v = v.trim().trim_matches('"');
        let parsed = match key.trim().to_ascii_lowercase().as_str() {
            "limit" | "q" => fill(&mut into.limit, number(v)),
            "remaining" | "r" => fill(&mut into.remaining, number(v)),
            "reset" | "t" => fill(&mut into.reset, reset(v, now)),
            "window" | "w" => fill(&mut into.window, window(v)),
            _ => continue,
        };
        ok &= parsed;
        understood |= parsed;
    }
    ok && understood
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn now() -> SystemTime {
        httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap()
    }

    fn p(headers: &[(&str, &str)]) -> RateLimitInfo {
        parse(headers.iter().copied(), now())
    }

    fn secs(s: u64) -> Option<Duration> {
        Some(Duration::from_secs(s))
    }

    #[test]
    fn genesys_success() {
        let info = p(&[
            ("inin-ratelimit-allowed", "300"),
            ("inin-ratelimit-count", "6"),
            ("inin-ratelimit-reset", "38"),
        ]);
        assert_eq!(
            info,
            RateLimitInfo {
                limit: Some(300),
                remaining: Some(294),
                reset: secs(38),
                ..Default::default()
            }
        );
        assert!(!info.exhausted());
    }

    #[test]
    fn genesys_throttled() {
        let info = p(&[
            ("Retry-After", "15"),
            ("inin-ratelimit-allowed", "300"),
            ("inin-ratelimit-count", "300"),
            ("inin-ratelimit-reset", "15"),
        ]);
        assert_eq!(info.retry_after, secs(15));
        assert_eq!(info.remaining, Some(0));
        assert!(info.exhausted());
    }

    #[test]
    fn count_above_allowed_saturates() {
        let info = p(&[
            ("inin-ratelimit-allowed", "300"),
            ("inin-ratelimit-count", "301"),
        ]);
        assert_eq!(info.remaining, Some(0));
    }

    #[test]
    fn names_are_case_insensitive() {
        let info = p(&[
            ("RETRY-AFTER", "2"),
            ("Inin-RateLimit-Allowed", "300"),
            ("ININ-RATELIMIT-COUNT", "100"),
            ("x-RateLimit-RESET", "9"),
        ]);
        assert_eq!(info.retry_after, secs(2));
        assert_eq!(info.limit, Some(300));
        assert_eq!(info.remaining, Some(200));
        assert_eq!(info.reset, secs(9));
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(
            p(&[("Retry-After", "1.5")]).retry_after,
            Some(Duration::from_millis(1500))
        );
        assert_eq!(p(&[("Retry-After", " 0 ")]).retry_after, secs(0));
        let later = p(&[("Retry-After", "Sun, 06 Nov 1994 08:49:52 GMT")]);
        assert_eq!(later.retry_after, secs(15));
        let past = p(&[("Retry-After", "Sun, 06 Nov 1994 08:00:00 GMT")]);
        assert_eq!(past.retry_after, secs(0));
        let huge = p(&[("Retry-After", "99999999999999999999999")]);
        assert_eq!(huge.retry_after, Some(MAX_DURATION));
        assert_eq!(p(&[("Retry-After", "172800")]).retry_after, secs(172_800));
    }

    #[test]
    fn x_ratelimit_and_epoch_reset() {
        // Epoch resets need a `now` after 2001 (above the threshold).
        let epoch = 1_700_000_000;
        let now = UNIX_EPOCH + Duration::from_secs(epoch);
        let future = (epoch + 42).to_string();
        let info = parse(
            [
                ("X-RateLimit-Limit", "100"),
                ("X-RateLimit-Remaining", "7"),
                ("X-RateLimit-Reset", future.as_str()),
            ],
            now,
        );
        assert_eq!(
            (info.limit, info.remaining, info.reset),
            (Some(100), Some(7), secs(42))
        );
        let past = (epoch - 42).to_string();
        assert_eq!(
            parse([("X-RateLimit-Reset", past.as_str())], now).reset,
            secs(0)
        );
        let far = parse([("X-RateLimit-Reset", "18446744073709551615")], now);
        assert_eq!(far.reset, Some(MAX_DURATION));
        assert_eq!(p(&[("X-RateLimit-Reset", "30")]).reset, secs(30));
    }

    #[test]
    fn ietf_separate_headers() {
        let info = p(&[
            ("RateLimit-Limit", "100, 100;w=60"),
            ("RateLimit-Remaining", "50"),
            ("RateLimit-Reset", "30"),
        ]);
        assert_eq!(
            (info.limit, info.remaining, info.reset),
            (Some(100), Some(50), secs(30))
        );
    }

    #[test]
    fn ietf_draft_07() {
        let info = p(&[("RateLimit", "limit=100, remaining=50, reset=30")]);
        assert_eq!(
            (info.limit, info.remaining, info.reset),
            (Some(100), Some(50), secs(30))
        );
        assert_eq!(info.window, None);
    }

    #[test]
    fn ietf_structured() {
        let info = p(&[
            ("RateLimit", "\"default\";r=50;t=30"),
            ("RateLimit-Policy", "\"default\";q=100;w=60"),
        ]);
        assert_eq!(
            info,
            RateLimitInfo {
                limit: Some(100),
                remaining: Some(50),
                reset: secs(30),
                window: secs(60),
                ..Default::default()
            }
        );
        let bare = p(&[("RateLimit-Policy", "100;w=60")]);
        assert_eq!((bare.limit, bare.window), (Some(100), secs(60)));
        let quoted = p(&[("ratelimit", "r=\"5\"; t = 3 ; unknown=x")]);
        assert_eq!((quoted.remaining, quoted.reset), (Some(5), secs(3)));
    }

    #[test]
    fn precedence() {
        let info = p(&[
            ("RateLimit", "limit=10, remaining=1, reset=1"),
            ("X-RateLimit-Limit", "100"),
            ("X-RateLimit-Remaining", "90"),
            ("X-RateLimit-Reset", "20"),
            ("inin-ratelimit-allowed", "300"),
            ("inin-ratelimit-count", "6"),
            ("inin-ratelimit-reset", "38"),
            ("RateLimit-Policy", "q=5;w=60"),
        ]);
        assert_eq!(
            (info.limit, info.remaining, info.reset, info.window),
            (Some(300), Some(294), secs(38), secs(60))
        );
        // A bad inin value falls through to the next form.
        let info = p(&[
            ("inin-ratelimit-allowed", "abc"),
            ("X-RateLimit-Limit", "100"),
        ]);
        assert_eq!(info.limit, Some(100));
    }

    #[test]
    fn malformed_values_are_ignored() {
        for bad in [
            "abc", "-5", "", "1e999", "   ", "٣", "１０", "+5", "1.2.3", ".", "NaN",
        ] {
            let info = p(&[
                ("Retry-After", bad),
                ("inin-ratelimit-allowed", bad),
                ("X-RateLimit-Remaining", bad),
                ("X-RateLimit-Reset", "12"),
                ("RateLimit", bad),
                ("RateLimit-Policy", bad),
                ("RateLimit-Limit", "40"),
            ]);
            assert_eq!(
                info,
                RateLimitInfo {
                    limit: Some(40),
                    reset: secs(12),
                    ..Default::default()
                },
                "value {bad:?}"
            );
        }
        assert_eq!(p(&[("RateLimit-Policy", "q=100;w=0")]).window, None);
    }

    #[test]
    fn unrelated_headers_are_empty() {
        let info = p(&[("Content-Type", "application/json"), ("ETag", "\"x\"")]);
        assert!(info.is_empty());
        assert!(!info.exhausted());
        assert!(!p(&[("Retry-After", "0")]).is_empty());
    }

    #[test]
    fn every_reported_header_is_understood() {
        // A value no form accepts: a header the parser knows reports it as
        // unparseable; one it does not know would be silently accepted.
        for name in REPORTED_HEADERS {
            let mut seen = Seen::default();
            assert!(
                !seen.add(name, "not a value", SystemTime::now()),
                "{name} is forwarded by clients but not read by the parser"
            );
        }
    }

    const NAMES: &[&str] = &[
        "Retry-After",
        "inin-ratelimit-allowed",
        "inin-ratelimit-count",
        "inin-ratelimit-reset",
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
        "RateLimit-Limit",
        "RateLimit-Remaining",
        "RateLimit-Reset",
        "RateLimit",
        "RateLimit-Policy",
    ];

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(NAMES).prop_map(str::to_owned),
            any::<String>(),
        ]
    }

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[0-9 .,;=\"a-z-]{0,40}",
            any::<u64>().prop_map(|n| n.to_string()),
            "[A-Za-z]{3}, [0-9]{2} [A-Za-z]{3} [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT",
        ]
    }

    proptest! {
        #[test]
        fn never_panics(headers in proptest::collection::vec((name(), value()), 0..12), t in any::<u64>()) {
            let now = UNIX_EPOCH.checked_add(Duration::from_secs(t >> 30)).unwrap_or(UNIX_EPOCH);
            let info = parse(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())), now);
            for d in [info.retry_after, info.reset, info.window].into_iter().flatten() {
                prop_assert!(d <= MAX_DURATION);
            }
        }
    }
}
