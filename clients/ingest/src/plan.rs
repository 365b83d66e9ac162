//! What a run covers: the range cut into hour or day blocks, which of them
//! are final (older than the watermark), and the ISO-8601 timestamps the
//! analytics API speaks. Plain values with the clock passed in.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::IngestError;

/// One hour, ms.
const HOUR_MS: i64 = 3_600_000;

/// How long a block is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockSize {
    /// One hour: the details query's natural unit (a few pages each).
    Hour,
    /// One day: the jobs API's (one job, a few result pages).
    Day,
}

impl BlockSize {
    /// The length, ms.
    pub fn ms(self) -> i64 {
        match self {
            BlockSize::Hour => HOUR_MS,
            BlockSize::Day => 24 * HOUR_MS,
        }
    }
}

impl FromStr for BlockSize {
    type Err = String;

    fn from_str(s: &str) -> Result<BlockSize, String> {
        match s {
            "hour" => Ok(BlockSize::Hour),
            "day" => Ok(BlockSize::Day),
            _ => Err("a block is \"hour\" or \"day\"".into()),
        }
    }
}

/// A half-open interval `[start, end)` of Unix ms: one unit of work, of
/// checkpointing and of the `totalHits` check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Block {
    /// Unix ms, included.
    pub start: i64,
    /// Unix ms, excluded.
    pub end: i64,
}

impl Block {
    /// `"<start>/<end>"` as the analytics API takes it.
    pub fn interval(&self) -> String {
        format!("{}/{}", format_ms(self.start), format_ms(self.end))
    }

    /// Whether no conversation in it can still change at `now`: it ended
    /// at least `watermark` ago.
    pub fn is_final(&self, now_ms: i64, watermark: Duration) -> bool {
        self.end <= now_ms.saturating_sub(i64::try_from(watermark.as_millis()).unwrap_or(i64::MAX))
    }
}

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.interval())
    }
}

/// `[from, to)` cut into blocks of `size`, aligned to `from`; the last one
/// is cut short at `to`.
pub fn blocks(from: i64, to: i64, size: BlockSize) -> Vec<Block> {
    let step = size.ms();
    let mut out = Vec::new();
    let mut start = from;
    while start < to {
        let end = (start + step).min(to);
        out.push(Block { start, end });
        start = end;
    }
    out
}

/// An ISO-8601 / RFC 3339 timestamp (`2026-11-01T00:00:00Z`, with or
/// without fraction or offset) or a bare date (`2026-11-01`, midnight UTC)
/// → Unix ms.
pub fn parse_time(s: &str) -> Result<i64, IngestError> {
    let bad = || {
        IngestError::Usage(format!(
            "{:?} is not a date (YYYY-MM-DD) or an RFC 3339 time (YYYY-MM-DDTHH:MM:SSZ)",
            clip(s)
        ))
    };
    let full;
    let text = if s.len() == 10 {
        full = format!("{s}T00:00:00Z");
        &full
    } else {
        s
    };
    let t = OffsetDateTime::parse(text, &Rfc3339).map_err(|_| bad())?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|_| bad())
}

/// Unix ms → `2026-11-01T00:00:00.000Z`.
pub fn format_ms(ms: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// Unix ms now.
pub fn now_ms() -> i64 {
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
    i64::try_from(nanos / 1_000_000).unwrap_or(i64::MAX)
}

/// At most 40 characters of `s`, for messages that quote input.
pub(crate) fn clip(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_tile_the_range_and_the_last_is_cut_short() {
        let from = parse_time("2026-11-01").unwrap();
        let to = parse_time("2026-11-02T05:30:00Z").unwrap();
        let hours = blocks(from, to, BlockSize::Hour);
        assert_eq!(hours.len(), 30);
        assert_eq!(hours[0].start, from);
        assert_eq!(hours[29].end, to);
        assert!(hours.windows(2).all(|w| w[0].end == w[1].start));
        let days = blocks(from, to, BlockSize::Day);
        assert_eq!(days.len(), 2);
        assert_eq!(days[1].end - days[1].start, 5 * HOUR_MS + HOUR_MS / 2);
        assert_eq!(
            days[0].interval(),
            "2026-11-01T00:00:00.000Z/2026-11-02T00:00:00.000Z"
        );
    }

    #[test]
    fn only_blocks_older_than_the_watermark_are_final() {
        let b = Block {
            start: 0,
            end: HOUR_MS,
        };
        let four_hours = Duration::from_secs(4 * 3600);
        assert!(b.is_final(5 * HOUR_MS, four_hours));
        assert!(!b.is_final(5 * HOUR_MS - 1, four_hours));
    }

    #[test]
    fn times_parse_and_format() {
        assert_eq!(parse_time("1970-01-01").unwrap(), 0);
        let t = parse_time("2026-11-01T13:05:09.25Z").unwrap();
        assert_eq!(format_ms(t), "2026-11-01T13:05:09.250Z");
        assert_eq!(parse_time("2026-11-01T14:05:09.25+01:00").unwrap(), t);
        for bad in ["yesterday", "2026-13-01", "2026-11-01 00:00:00"] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }
}
