//! The analytics history of an org: a day of deterministic conversations
//! (the same seed and org give the same set), the details query over it
//! (interval and paging), and the ISO-8601 timestamps it speaks.
//!
//! The date arithmetic is hand-written (days from a civil date, Howard
//! Hinnant's algorithm): three small functions for one timestamp format do
//! not justify a date-time crate in the build.

use serde::Serialize;
use serde_json::json;

/// Queues the conversations are spread over.
const QUEUES: usize = 8;
/// One day, ms.
const DAY_MS: i64 = 86_400_000;

/// One conversation of the history.
#[derive(Clone, Debug)]
struct Conversation {
    id: String,
    /// Unix ms.
    start: i64,
    /// Unix ms.
    end: i64,
    inbound: bool,
    division: u8,
}

/// The org's conversations, sorted by start then id.
#[derive(Debug)]
pub(crate) struct History {
    conversations: Vec<Conversation>,
}

/// A conversation as the details query returns it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ConversationJson {
    conversation_id: String,
    /// Always there, but for the malformed-pages fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    conversation_start: Option<String>,
    conversation_end: String,
    originating_direction: &'static str,
    division_ids: [String; 1],
    /// One customer participant: its session's media type, and a segment
    /// with the queue and wrap-up code.
    participants: [serde_json::Value; 1],
}

/// A details-query page.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DetailsPage {
    #[serde(skip_serializing_if = "Option::is_none")]
    conversations: Option<Vec<ConversationJson>>,
    total_hits: u64,
}

impl DetailsPage {
    /// Drops the page's last row (a fault: `totalHits` is left as it was).
    pub(crate) fn drop_last(&mut self) {
        if let Some(rows) = &mut self.conversations {
            rows.pop();
        }
    }

    /// Takes the first row's `conversationStart` away (a fault: a record
    /// the API documents as always having one).
    pub(crate) fn garble_first(&mut self) {
        if let Some(first) = self
            .conversations
            .as_mut()
            .and_then(|rows| rows.first_mut())
        {
            first.conversation_start = None;
        }
    }

    /// Puts a NUL character at the end of the first row's `queueId` and
    /// `wrapUpCode` (a fault: JSON can carry one, PostgreSQL's `TEXT`
    /// cannot hold one).
    pub(crate) fn nul_in_first(&mut self) {
        let Some(segment) = self
            .conversations
            .as_mut()
            .and_then(|rows| rows.first_mut())
            .and_then(|first| first.participants[0].pointer_mut("/sessions/0/segments/0"))
            .and_then(serde_json::Value::as_object_mut)
        else {
            return;
        };
        for key in ["queueId", "wrapUpCode"] {
            if let Some(serde_json::Value::String(v)) = segment.get_mut(key) {
                v.push('\0');
            }
        }
    }

    /// Rows on the page (they decide the query's latency).
    pub(crate) fn rows(&self) -> usize {
        self.conversations.as_ref().map_or(0, Vec::len)
    }
}

impl History {
    /// `count` conversations starting on each of `days` days from `day`
    /// (Unix ms of its midnight), drawn from a generator seeded by `seed`
    /// and `org` (the first day's are the same whatever `days` is).
    pub(crate) fn generate(seed: u64, org: &str, day: i64, days: u64, count: u64) -> History {
        // FNV-1a of the org id: a stable hash (std's is randomly keyed).
        let org_hash = org.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let mut rng = fastrand::Rng::with_seed(seed ^ org_hash);
        let mut conversations = Vec::new();
        for d in 0..days as i64 {
            let midnight = day + d * DAY_MS;
            let mut today: Vec<Conversation> = (0..count)
                .map(|_| {
                    let start = midnight + rng.i64(0..DAY_MS);
                    let id = uuid_like(&mut rng);
                    Conversation {
                        id,
                        start,
                        end: start + rng.i64(30_000..1_800_000),
                        inbound: rng.u8(..10) < 7,
                        division: rng.u8(..4),
                    }
                })
                .collect();
            today.sort_by(|a, b| (a.start, &a.id).cmp(&(b.start, &b.id)));
            conversations.append(&mut today);
        }
        History { conversations }
    }

    /// The page `page` (from 1) of `page_size` among conversations starting
    /// in `[from, to)`.
    pub(crate) fn query(&self, from: i64, to: i64, page_size: usize, page: usize) -> DetailsPage {
        let skip = (page - 1).saturating_mul(page_size);
        let rows = self.slice(from, to, skip, page_size);
        DetailsPage {
            conversations: (!rows.is_empty()).then_some(rows),
            total_hits: self.count(from, to) as u64,
        }
    }

    /// The page `page` as it reads once one conversation before it (the
    /// interval's first) was removed since the pages before it were read:
    /// every row one place further, one hit fewer.
    pub(crate) fn query_shifted(
        &self,
        from: i64,
        to: i64,
        page_size: usize,
        page: usize,
    ) -> DetailsPage {
        let skip = (page - 1).saturating_mul(page_size).saturating_add(1);
        let rows = self.slice(from, to, skip, page_size);
        DetailsPage {
            conversations: (!rows.is_empty()).then_some(rows),
            total_hits: (self.count(from, to) as u64).saturating_sub(1),
        }
    }

    /// The conversations starting in `[from, to)`.
    fn hits(&self, from: i64, to: i64) -> &[Conversation] {
        let lo = self.conversations.partition_point(|c| c.start < from);
        let hi = self.conversations.partition_point(|c| c.start < to).max(lo);
        &self.conversations[lo..hi]
    }

    /// How many conversations start in `[from, to)`.
    pub(crate) fn count(&self, from: i64, to: i64) -> usize {
        self.hits(from, to).len()
    }

    /// At most `limit` conversations starting in `[from, to)`, from the
    /// `skip`th on.
    pub(crate) fn slice(
        &self,
        from: i64,
        to: i64,
        skip: usize,
        limit: usize,
    ) -> Vec<ConversationJson> {
        let hits = self.hits(from, to);
        hits.get(skip..)
            .unwrap_or_default()
            .iter()
            .take(limit)
            .map(Conversation::json)
            .collect()
    }

    /// Every conversation id, in history order.
    pub(crate) fn ids(&self) -> Vec<&str> {
        self.conversations.iter().map(|c| c.id.as_str()).collect()
    }

    /// The ids of the conversations starting in `[from, to)`, in history
    /// order.
    pub(crate) fn ids_in(&self, from: i64, to: i64) -> Vec<&str> {
        self.hits(from, to).iter().map(|c| c.id.as_str()).collect()
    }
}

impl Conversation {
    fn json(&self) -> ConversationJson {
        // Media, queue and wrap-up follow from the id (no draw from the
        // generator, so the same seed keeps giving the same conversations).
        let n = self.id.bytes().fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        });
        let media = ["voice", "chat", "email", "message"][n % 4];
        let queue = format!("queue-{}", n / 4 % QUEUES);
        let wrap_up = format!("wrapup-{}", n / 32 % 5);
        ConversationJson {
            conversation_id: self.id.clone(),
            conversation_start: Some(format_ms(self.start)),
            conversation_end: format_ms(self.end),
            originating_direction: if self.inbound { "inbound" } else { "outbound" },
            division_ids: [format!("division-{}", self.division)],
            participants: [json!({
                "purpose": "customer",
                "sessions": [{
                    "mediaType": media,
                    "segments": [{
                        "segmentType": "interact",
                        "queueId": queue,
                        "wrapUpCode": wrap_up,
                    }],
                }],
            })],
        }
    }
}

/// A random version-4-shaped UUID from `rng` (ids only need the shape; a
/// uuid crate would add a dependency for one format string).
pub(crate) fn uuid_like(rng: &mut fastrand::Rng) -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        rng.u32(..),
        rng.u16(..),
        rng.u16(..0x1000),
        rng.u16(0x8000..0xc000),
        rng.u64(..1 << 48)
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day count (inverse of [`days_from_civil`]).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// `YYYY-MM-DD` → Unix ms of its midnight UTC.
pub(crate) fn parse_day(s: &str) -> Option<i64> {
    let mut parts = s.splitn(3, '-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let d: i64 = parts.next()?.parse().ok()?;
    if s.len() != 10 || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let days = days_from_civil(y, m, d);
    // Rejects 2026-02-30 and the like.
    (civil_from_days(days) == (y, m, d)).then_some(days * DAY_MS)
}

/// `YYYY-MM-DDTHH:MM:SS[.sss]Z` → Unix ms.
pub(crate) fn parse_timestamp(s: &str) -> Option<i64> {
    let (date, time) = s.split_once('T')?;
    let time = time.strip_suffix('Z')?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut parts = hms.splitn(3, ':');
    let h: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let sec: i64 = parts.next()?.parse().ok()?;
    if hms.len() != 8 || h > 23 || m > 59 || sec > 59 {
        return None;
    }
    let ms = match frac.len() {
        0 => 0,
        1..=3 if frac.bytes().all(|b| b.is_ascii_digit()) => {
            frac.parse::<i64>().ok()? * 10i64.pow(3 - frac.len() as u32)
        }
        _ => return None,
    };
    Some(parse_day(date)? + ((h * 60 + m) * 60 + sec) * 1000 + ms)
}

/// Unix ms → `YYYY-MM-DDTHH:MM:SS.sssZ`.
pub(crate) fn format_ms(ms: i64) -> String {
    let (y, m, d) = civil_from_days(ms.div_euclid(DAY_MS));
    let t = ms.rem_euclid(DAY_MS);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        t / 3_600_000,
        t / 60_000 % 60,
        t / 1000 % 60,
        t % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        let t = parse_timestamp("2026-11-01T13:05:09.250Z").unwrap();
        assert_eq!(format_ms(t), "2026-11-01T13:05:09.250Z");
        assert_eq!(parse_day("1970-01-01"), Some(0));
        assert_eq!(
            parse_timestamp("2024-02-29T00:00:00Z"),
            Some(1_709_164_800_000)
        );
        for bad in [
            "2026-11-01 00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_nul_fault_marks_the_first_rows_queue_and_wrap_up_only() {
        let day = parse_day("2026-11-01").unwrap();
        let h = History::generate(3, "org-a", day, 1, 100);
        let mut page = h.query(day, day + DAY_MS, 10, 1);
        page.nul_in_first();
        let rows = serde_json::to_value(&page).unwrap();
        let segment = |row: usize| {
            rows["conversations"][row]["participants"][0]["sessions"][0]["segments"][0].clone()
        };
        for key in ["queueId", "wrapUpCode"] {
            assert!(segment(0)[key].as_str().unwrap().ends_with('\0'), "{key}");
            assert!(!segment(1)[key].as_str().unwrap().contains('\0'), "{key}");
        }
        assert!(serde_json::to_string(&page).unwrap().contains("\\u0000"));
    }

    #[test]
    fn ids_in_an_interval_are_the_queries_hits() {
        let day = parse_day("2026-11-01").unwrap();
        let h = History::generate(3, "org-a", day, 1, 500);
        let hour = 3_600_000;
        let mut all = Vec::new();
        for k in 0..24 {
            let (from, to) = (day + k * hour, day + (k + 1) * hour);
            let ids = h.ids_in(from, to);
            assert_eq!(ids.len(), h.count(from, to));
            all.extend(ids);
        }
        assert_eq!(all, h.ids());
    }

    #[test]
    fn same_seed_same_history_and_pages_cover_it() {
        let day = parse_day("2026-11-01").unwrap();
        let a = History::generate(7, "org-a", day, 1, 1_000);
        let b = History::generate(7, "org-a", day, 1, 1_000);
        let c = History::generate(7, "org-b", day, 1, 1_000);
        let ids = |h: &History| {
            h.conversations
                .iter()
                .map(|c| c.id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&a), ids(&b));
        assert_ne!(ids(&a), ids(&c));

        let (from, to) = (day + 3_600_000, day + 7_200_000);
        let first = a.query(from, to, 10, 1);
        let hits = first.total_hits as usize;
        assert!((20..80).contains(&hits), "{hits} in one hour of 1,000/day");
        let mut seen = Vec::new();
        for page in 1.. {
            let p = a.query(from, to, 10, page);
            let Some(rows) = p.conversations else { break };
            for r in rows {
                let start = parse_timestamp(r.conversation_start.as_deref().unwrap()).unwrap();
                assert!((from..to).contains(&start));
                seen.push(r.conversation_id);
            }
        }
        assert_eq!(seen.len(), hits);
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), hits, "pages overlap");
    }
}
