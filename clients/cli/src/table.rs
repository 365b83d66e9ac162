//! Pure formatting of bucket states and priority classes: the aligned status
//! table, its cells, and the JSON forms. No I/O, so all of it is unit-tested.

use quota_broker::pb::{PriorityClass, QuotaStatus};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Column titles of the status table, in order.
pub const HEADERS: [&str; 10] = [
    "TENANT",
    "BUCKET",
    "RATE/MIN CFG/EFF",
    "LEARNED",
    "TOKENS",
    "IN FLIGHT",
    "WAITING",
    "429",
    "FROZEN",
    "PAUSED",
];

/// Columns whose cells are right-aligned (numbers).
const RIGHT_ALIGNED: [bool; 10] = [
    false, false, true, true, true, true, false, true, false, false,
];

/// Identifies one bucket instance: (tenant, bucket, oauth_client).
pub type BucketKey = (String, String, String);

/// The key a Watch update is merged under.
pub fn key(s: &QuotaStatus) -> BucketKey {
    (s.tenant.clone(), s.bucket.clone(), s.oauth_client.clone())
}

/// Renders the status table (header row and one row per bucket, in the
/// given order), every line ending in `\n`.
pub fn render_status<'a>(statuses: impl IntoIterator<Item = &'a QuotaStatus>) -> String {
    let rows: Vec<Vec<String>> = statuses.into_iter().map(row).collect();
    render(&HEADERS, &RIGHT_ALIGNED, &rows)
}

/// Sorts bucket states by tenant, bucket and OAuth client, for a stable table.
pub fn sort(statuses: &mut [QuotaStatus]) {
    statuses.sort_by_key(key);
}

/// The cells of one bucket's row.
pub fn row(s: &QuotaStatus) -> Vec<String> {
    vec![
        s.tenant.clone(),
        bucket_name(s),
        rate(s.configured_rate_per_min, s.effective_rate_per_min),
        if s.learned_limit_per_min > 0.0 {
            number(s.learned_limit_per_min)
        } else {
            "-".into()
        },
        tokens(s),
        held(s),
        waiting(&s.waiting),
        percent(s.throttle_ratio),
        until(s.frozen_until_ms, s.at_ms),
        paused(s),
    ]
}

/// `-`, `paused`, or `paused: REASON` (the reason cut to 40 characters; the
/// whole of it in `--json`).
fn paused(s: &QuotaStatus) -> String {
    match (s.paused, s.pause_reason.trim()) {
        (false, _) => "-".into(),
        (true, "") => "paused".into(),
        (true, why) => {
            let why = why.split_whitespace().collect::<Vec<_>>().join(" ");
            match why.char_indices().nth(40) {
                Some((at, _)) => format!("paused: {}…", &why[..at]),
                None => format!("paused: {why}"),
            }
        }
    }
}

/// Slots held out of the limit, and of them how many are held over from
/// the run before a crash (`5/8 (3 held over)`): nobody known holds those,
/// and they free as renewals claim them or one lease TTL passes.
fn held(s: &QuotaStatus) -> String {
    let slots = in_flight(s.in_flight, s.max_in_flight);
    if s.held_over > 0 {
        format!("{slots} ({} held over)", s.held_over)
    } else {
        slots
    }
}

/// The bucket name, with the OAuth client for per-client instances:
/// `per-client [my-app]`, `per-client [no client]` for the instance shared
/// by callers that name none, and `per-client [unused]` for a per-client
/// bucket no client uses now (its row shows a fresh instance's figures).
pub fn bucket_name(s: &QuotaStatus) -> String {
    if s.unused {
        format!("{} [unused]", s.bucket)
    } else if !s.oauth_client.is_empty() {
        format!("{} [{}]", s.bucket, s.oauth_client)
    } else if s.scope == "oauth_client" {
        format!("{} [no client]", s.bucket)
    } else {
        s.bucket.clone()
    }
}

/// `configured/effective` per minute; `-` for a bucket without a rate.
pub fn rate(configured: f64, effective: f64) -> String {
    if configured <= 0.0 && effective <= 0.0 {
        "-".into()
    } else {
        format!("{}/{}", number(configured), number(effective))
    }
}

/// Tokens available out of the burst, e.g. `7.5/10`, and what the upstream
/// said is left when that is less (the broker grants no more than it):
/// `300.0/300 (295 upstream)`; `-` without a rate.
pub fn tokens(s: &QuotaStatus) -> String {
    if s.burst == 0 && s.configured_rate_per_min <= 0.0 {
        "-".into()
    } else if s.upstream_remaining >= 0 && (s.upstream_remaining as f64) < s.tokens_available {
        format!(
            "{:.1}/{} ({} upstream)",
            s.tokens_available, s.burst, s.upstream_remaining
        )
    } else {
        format!("{:.1}/{}", s.tokens_available, s.burst)
    }
}

/// Slots held out of the limit, e.g. `3/8`; `-` without a concurrency limit.
pub fn in_flight(in_flight: u32, max: u32) -> String {
    if max == 0 && in_flight == 0 {
        "-".into()
    } else {
        format!("{in_flight}/{max}")
    }
}

/// Waiting requests per class, by class name: `batch:3 critical:1`; `-` when
/// nobody waits.
pub fn waiting<S: std::hash::BuildHasher>(w: &std::collections::HashMap<String, u32, S>) -> String {
    let sorted: BTreeMap<&String, &u32> = w.iter().filter(|(_, n)| **n > 0).collect();
    if sorted.is_empty() {
        return "-".into();
    }
    sorted
        .iter()
        .map(|(class, n)| format!("{class}:{n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A 0.0-1.0 ratio as a percentage with two decimals: `0.70%`.
pub fn percent(ratio: f64) -> String {
    if ratio.is_finite() {
        format!("{:.2}%", ratio * 100.0)
    } else {
        "-".into()
    }
}

/// A rate without needless decimals: `60`, `42.5`.
pub fn number(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if (v - v.round()).abs() < 0.05 {
        format!("{:.0}", v.round())
    } else {
        format!("{v:.1}")
    }
}

/// When a deadline (unix ms) lies after `now_ms`: `in 12.3s`, `in 5m03s`,
/// `in 1h02m`; `-` when it is 0 or past.
pub fn until(deadline_ms: u64, now_ms: u64) -> String {
    if deadline_ms == 0 || deadline_ms <= now_ms {
        return "-".into();
    }
    let ms = deadline_ms - now_ms;
    if ms < 60_000 {
        format!("in {}.{}s", ms / 1000, (ms % 1000) / 100)
    } else if ms < 3_600_000 {
        format!("in {}m{:02}s", ms / 60_000, (ms % 60_000) / 1000)
    } else {
        format!("in {}h{:02}m", ms / 3_600_000, (ms % 3_600_000) / 60_000)
    }
}

/// Lays out rows under headers in columns two spaces apart. Widths count
/// characters; the last column is not padded.
pub fn render(headers: &[&str], right: &[bool], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for cells in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            let pad = w.saturating_sub(cell.chars().count());
            if i > 0 {
                line.push_str("  ");
            }
            if right.get(i).copied().unwrap_or(false) {
                line.extend(std::iter::repeat_n(' ', pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Every field of a bucket state, named as in the proto (snake_case).
/// `waiting` is an object of class to count, sorted by class.
pub fn status_json(s: &QuotaStatus) -> Value {
    let waiting: BTreeMap<&String, &u32> = s.waiting.iter().collect();
    json!({
        "tenant": s.tenant,
        "bucket": s.bucket,
        "configured_rate_per_min": s.configured_rate_per_min,
        "effective_rate_per_min": s.effective_rate_per_min,
        "tokens_available": s.tokens_available,
        "in_flight": s.in_flight,
        "max_in_flight": s.max_in_flight,
        "frozen_until_ms": s.frozen_until_ms,
        "waiting": waiting,
        "granted_total": s.granted_total,
        "throttled_total": s.throttled_total,
        "at_ms": s.at_ms,
        "oauth_client": s.oauth_client,
        "scope": s.scope,
        "burst": s.burst,
        "reports_total": s.reports_total,
        "paused": s.paused,
        "pause_reason": s.pause_reason,
        "learned_limit_per_min": s.learned_limit_per_min,
        "throttle_ratio": s.throttle_ratio,
        "cooldown_until_ms": s.cooldown_until_ms,
        "upstream_remaining": s.upstream_remaining,
        "unused": s.unused,
        "held_over": s.held_over,
    })
}

/// A priority class as JSON, fields named as in the proto.
pub fn class_json(c: &PriorityClass) -> Value {
    json!({
        "name": c.name,
        "order": c.order,
        "weight": c.weight,
        "reserve": c.reserve,
        "default_max_wait_ms": c.default_max_wait_ms,
    })
}

/// A priority class as a one-row table.
pub fn render_class(c: &PriorityClass) -> String {
    render_classes(std::slice::from_ref(c), None)
}

/// Priority classes as a table, the default one marked when given.
pub fn render_classes(classes: &[PriorityClass], default_class: Option<&str>) -> String {
    let rows: Vec<Vec<String>> = classes
        .iter()
        .map(|c| {
            let mut name = c.name.clone();
            if default_class == Some(c.name.as_str()) {
                name.push_str(" (default)");
            }
            vec![
                name,
                c.order.to_string(),
                c.weight.to_string(),
                percent(c.reserve),
                format!("{} ms", c.default_max_wait_ms),
            ]
        })
        .collect();
    render(
        &["CLASS", "ORDER", "WEIGHT", "RESERVE", "DEFAULT MAX WAIT"],
        &[false, true, true, true, true],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn status(bucket: &str) -> QuotaStatus {
        QuotaStatus {
            tenant: "demo".into(),
            bucket: bucket.into(),
            configured_rate_per_min: 60.0,
            effective_rate_per_min: 42.0,
            tokens_available: 7.54,
            in_flight: 3,
            max_in_flight: 8,
            frozen_until_ms: 1_012_300,
            waiting: HashMap::from([("critical".into(), 1), ("batch".into(), 3)]),
            at_ms: 1_000_000,
            scope: "org".into(),
            burst: 10,
            throttle_ratio: 0.007,
            upstream_remaining: -1,
            ..Default::default()
        }
    }

    #[test]
    fn cells() {
        assert_eq!(rate(60.0, 42.0), "60/42");
        assert_eq!(rate(60.0, 42.54), "60/42.5");
        assert_eq!(rate(0.0, 0.0), "-");
        assert_eq!(in_flight(3, 8), "3/8");
        assert_eq!(in_flight(0, 0), "-");
        assert_eq!(percent(0.007), "0.70%");
        assert_eq!(percent(0.0), "0.00%");
        assert_eq!(percent(f64::NAN), "-");
        assert_eq!(number(300.0), "300");
        assert_eq!(number(f64::INFINITY), "-");
        let none: HashMap<String, u32> = HashMap::from([("batch".into(), 0)]);
        assert_eq!(waiting(&none), "-");
        assert_eq!(waiting(&status("x").waiting), "batch:3 critical:1");
        let mut s = status("x");
        assert_eq!(tokens(&s), "7.5/10");
        s.upstream_remaining = 5;
        assert_eq!(tokens(&s), "7.5/10 (5 upstream)");
        s.upstream_remaining = 8;
        assert_eq!(tokens(&s), "7.5/10", "more left upstream than here");
    }

    #[test]
    fn relative_times() {
        assert_eq!(until(0, 1_000), "-");
        assert_eq!(until(1_000, 1_000), "-");
        assert_eq!(until(900, 1_000), "-");
        assert_eq!(until(13_300, 1_000), "in 12.3s");
        assert_eq!(until(1_000 + 303_000, 1_000), "in 5m03s");
        assert_eq!(until(1_000 + 3_720_000, 1_000), "in 1h02m");
    }

    #[test]
    fn bucket_names_show_the_oauth_client() {
        let mut s = status("per-client");
        assert_eq!(bucket_name(&s), "per-client");
        s.scope = "oauth_client".into();
        assert_eq!(bucket_name(&s), "per-client [no client]");
        s.oauth_client = "my-app".into();
        assert_eq!(bucket_name(&s), "per-client [my-app]");
        s.oauth_client.clear();
        s.unused = true;
        assert_eq!(bucket_name(&s), "per-client [unused]");
    }

    #[test]
    fn slots_held_over_from_a_crash_are_shown_apart() {
        let mut s = status("slots");
        assert_eq!(held(&s), "3/8");
        s.held_over = 2;
        assert_eq!(held(&s), "3/8 (2 held over)");
    }

    #[test]
    fn table_is_aligned() {
        let mut jobs = status("analytics-jobs");
        jobs.configured_rate_per_min = 0.0;
        jobs.effective_rate_per_min = 0.0;
        jobs.burst = 0;
        jobs.frozen_until_ms = 0;
        jobs.waiting.clear();
        jobs.paused = true;
        let out = render_status([&status("org"), &jobs]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("TENANT  BUCKET          RATE/MIN CFG/EFF"));
        assert!(lines[1].contains("60/42"), "{out}");
        assert!(lines[1].contains("7.5/10"), "{out}");
        assert!(lines[1].contains("batch:3 critical:1"), "{out}");
        assert!(lines[1].contains("0.70%"), "{out}");
        assert!(lines[1].contains("in 12.3s"), "{out}");
        assert!(lines[2].ends_with("paused"), "{out}");
        jobs.pause_reason = "warehouse maintenance until 14:00\n".into();
        let out = render_status([&jobs]);
        assert!(
            out.ends_with("  paused: warehouse maintenance until 14:00\n"),
            "{out}"
        );
        jobs.pause_reason = "x".repeat(100);
        let out = render_status([&jobs]);
        assert!(
            out.ends_with(&format!("paused: {}…\n", "x".repeat(40))),
            "{out}"
        );
        // Every column starts at the same offset on every line.
        let col = |line: &str, text: &str| line.find(text).unwrap();
        assert_eq!(col(lines[0], "BUCKET"), col(lines[1], "org"));
        assert_eq!(col(lines[1], "org"), col(lines[2], "analytics-jobs"));
        assert_eq!(col(lines[0], "WAITING"), col(lines[1], "batch:3"));
        // Right-aligned numbers end where their header ends.
        let end = |line: &str, text: &str| line.find(text).unwrap() + text.len();
        assert_eq!(end(lines[0], "IN FLIGHT"), end(lines[1], "3/8"));
    }

    #[test]
    fn render_pads_by_characters() {
        let out = render(
            &["A", "B"],
            &[false, false],
            &[vec!["é".into(), "x".into()], vec!["ab".into(), "y".into()]],
        );
        assert_eq!(out, "A   B\né   x\nab  y\n");
    }

    #[test]
    fn sorted_by_key() {
        let mut v = vec![status("b"), status("a")];
        v[0].oauth_client = "z".into();
        sort(&mut v);
        assert_eq!(v[0].bucket, "a");
    }

    #[test]
    fn json_has_every_field() {
        let v = status_json(&status("org"));
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 24);
        assert_eq!(v["waiting"]["batch"], 3);
        assert_eq!(v["upstream_remaining"], -1);
        assert_eq!(v["configured_rate_per_min"], 60.0);
        let c = class_json(&PriorityClass {
            name: "reports".into(),
            order: 1,
            weight: 3,
            reserve: 0.05,
            default_max_wait_ms: 1000,
        });
        assert_eq!(c["default_max_wait_ms"], 1000);
    }

    #[test]
    fn class_table() {
        let out = render_class(&PriorityClass {
            name: "reports".into(),
            order: 1,
            weight: 3,
            reserve: 0.05,
            default_max_wait_ms: 1000,
        });
        assert!(out.contains("reports"), "{out}");
        assert!(out.contains("5.00%"), "{out}");
        assert!(out.contains("1000 ms"), "{out}");
    }
}
