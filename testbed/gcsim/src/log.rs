//! The traffic log: every fleet request the simulator served or refused,
//! in a bounded ring of the newest entries, read in pages by sequence
//! number (`GET /_sim/log?since=N`).

use std::collections::VecDeque;

use serde::Serialize;

/// Entries kept; older ones are dropped.
pub(crate) const CAPACITY: usize = 1_000_000;
/// Entries per page.
pub(crate) const PAGE: usize = 10_000;

/// One request.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Entry {
    pub(crate) seq: u64,
    /// Simulated ms of the decision.
    pub(crate) sim_ms: f64,
    pub(crate) org: String,
    pub(crate) client: String,
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) status: u16,
    /// Why it was refused (`None` when served).
    pub(crate) reason: Option<String>,
}

/// A page of the log.
#[derive(Debug, Serialize)]
pub(crate) struct Page {
    /// The `since` of the next page.
    pub(crate) next: u64,
    pub(crate) entries: Vec<Entry>,
}

/// The ring.
#[derive(Debug, Default)]
pub(crate) struct Log {
    entries: VecDeque<Entry>,
    next_seq: u64,
}

impl Log {
    /// Appends `entry`, giving it the next sequence number.
    pub(crate) fn push(&mut self, mut entry: Entry) {
        entry.seq = self.next_seq;
        self.next_seq += 1;
        if self.entries.len() == CAPACITY {
            self.entries.pop_front();
        }
        self.entries.push_back(entry);
    }

    /// Up to [`PAGE`] entries from sequence number `since` on (or the oldest
    /// kept, if `since` was dropped).
    pub(crate) fn page(&self, since: u64) -> Page {
        let first = self.entries.front().map_or(self.next_seq, |e| e.seq);
        let skip = since.saturating_sub(first) as usize;
        let entries: Vec<Entry> = self.entries.iter().skip(skip).take(PAGE).cloned().collect();
        let next = entries.last().map_or(since.max(first), |e| e.seq + 1);
        Page { next, entries }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            seq: 0,
            sim_ms: 0.0,
            org: "o".into(),
            client: "c".into(),
            method: "GET".into(),
            path: "/".into(),
            status: 200,
            reason: None,
        }
    }

    #[test]
    fn pages_follow_sequence_numbers() {
        let mut log = Log::default();
        for _ in 0..PAGE + 5 {
            log.push(entry());
        }
        let p = log.page(0);
        assert_eq!((p.entries.len(), p.next), (PAGE, PAGE as u64));
        let p = log.page(p.next);
        assert_eq!((p.entries.len(), p.entries[0].seq), (5, PAGE as u64));
        let p = log.page(p.next);
        assert!(p.entries.is_empty());
        assert_eq!(p.next, PAGE as u64 + 5);
    }
}
