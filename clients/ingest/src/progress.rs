//! What a person watching sees: a progress bar (blocks done of total,
//! records, the current rate, 429s, ETA once a block is done, and how the
//! latest block in progress goes: its job submitted, running, read) when
//! stderr is a terminal; otherwise plain lines (logs, CI): one per
//! finished block, and one when a block's job is submitted, done, or
//! still running every half minute. Writes nothing when quiet.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::plan::Block;
use crate::source::Step;

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Display {
    /// A bar on a terminal, lines otherwise.
    Auto,
    /// Nothing.
    Quiet,
}

/// Progress of one run (shared by its workers).
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    lines: bool,
    total: u64,
    started: Instant,
    blocks: AtomicU64,
    records: AtomicU64,
    /// The bar's totals, then the latest step of a block in progress.
    shown: std::sync::Mutex<(String, String)>,
}

impl Progress {
    /// Progress over `total` blocks to fetch.
    pub(crate) fn new(total: u64, display: Display) -> Progress {
        let terminal = display == Display::Auto && std::io::stderr().is_terminal();
        let bar = terminal.then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            // A template of our own: the literal one is known good, so a
            // failure here is a bug worth falling back from, not failing on.
            // The ETA is ours (in the message): indicatif's says 0s
            // before the first block is done.
            if let Ok(style) =
                ProgressStyle::with_template("{bar:20} {pos}/{len} blocks  {wide_msg}")
            {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        Progress {
            bar,
            lines: display == Display::Auto && !terminal,
            total,
            started: Instant::now(),
            blocks: AtomicU64::new(0),
            records: AtomicU64::new(0),
            shown: std::sync::Mutex::new((
                "0 records  ETA after the first block".into(),
                String::new(),
            )),
        }
    }

    /// How `block`'s fetch goes.
    pub(crate) fn step(&self, block: Block, step: Step) {
        if let Some(bar) = &self.bar {
            self.show(bar, |shown| shown.1 = format!("{block}: {step}"));
        } else if self.lines {
            let notable = match step {
                Step::Submitted | Step::Fulfilled { .. } => true,
                // A poll at most every 30 s: about a line each.
                Step::Pending { for_s } => for_s >= 30,
                Step::Paged { .. } => false,
            };
            if notable {
                let _ = writeln!(std::io::stderr(), "{block}: {step}");
            }
        }
    }

    /// `block` is stored with `records`; `throttled` 429s so far.
    pub(crate) fn block_done(&self, block: Block, records: u64, throttled: u64) {
        let blocks = self.blocks.fetch_add(1, Ordering::Relaxed) + 1;
        let all = self.records.fetch_add(records, Ordering::Relaxed) + records;
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = all as f64 / elapsed;
        let left = self.total.saturating_sub(blocks);
        let eta = elapsed / blocks as f64 * left as f64;
        if let Some(bar) = &self.bar {
            bar.set_position(blocks);
            self.show(bar, |shown| {
                shown.0 = format!("{all} records  {rate:.0}/s  {throttled} 429s  ETA {eta:.0}s");
            });
        } else if self.lines {
            // The tool's own output on stderr, one line per block.
            let _ = writeln!(
                std::io::stderr(),
                "{block}: {records} records; {blocks}/{} blocks, {all} records, {rate:.0}/s, {throttled} 429s, ETA {eta:.0}s",
                self.total
            );
        }
    }

    /// Changes the bar's totals or step with `change`, and shows both.
    fn show(&self, bar: &ProgressBar, change: impl FnOnce(&mut (String, String))) {
        let mut shown = self
            .shown
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        change(&mut shown);
        bar.set_message(format!("{}  {}", shown.0, shown.1));
    }

    /// Ends the bar.
    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
