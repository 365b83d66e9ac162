//! What a person watching sees: a progress bar (blocks done of total,
//! records, the current rate, 429s, ETA once a block is done, and how the
//! latest block in progress goes: its job submitted, running, read) when
//! stderr is a terminal; otherwise plain lines (logs, CI): one per
//! finished block, one when a block's job is submitted or done, and one
//! every half minute while a block's job or details query still runs.
//! Writes nothing when quiet.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
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

/// Where a line for the person watching goes ("stopping: …" on a
/// signal): above the run's bar while one is shown (the bar is cleared,
/// the line written, the bar drawn again), not into the bar's line;
/// straight to stderr otherwise. A cheap-clone handle: the caller keeps
/// one and gives the run a clone in its [`crate::Plan`].
#[derive(Clone, Default)]
pub struct Console {
    /// The bar shown now. A std `Mutex`: held only to clone or swap the
    /// handle, never across an `.await` or while writing.
    bar: Arc<Mutex<Option<ProgressBar>>>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("bar", &self.shown().is_some())
            .finish()
    }
}

impl Console {
    /// Writes `line` to stderr, on a line of its own.
    pub fn say(&self, line: &str) {
        self.say_with(|| {
            let _ = writeln!(std::io::stderr(), "{line}");
        });
    }

    /// Runs `write` with the bar, if one is shown, out of the way.
    fn say_with(&self, write: impl FnOnce()) {
        match self.shown() {
            Some(bar) => bar.suspend(write),
            None => write(),
        }
    }

    fn shown(&self) -> Option<ProgressBar> {
        self.bar
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .filter(|bar| !bar.is_finished())
    }

    fn show(&self, bar: Option<ProgressBar>) {
        *self.bar.lock().unwrap_or_else(PoisonError::into_inner) = bar;
    }
}

/// Whether `step` gets a line of its own without a terminal: a job
/// submitted or done, and a job or a details query that still runs (about
/// every half minute: a job's poll comes at most 30 s apart, a query says
/// so every 30 s); not each page read.
fn on_a_line(step: Step) -> bool {
    match step {
        Step::Submitted | Step::Fulfilled { .. } | Step::Querying { .. } => true,
        Step::Pending { for_s } => for_s >= 30,
        Step::Paged { .. } => false,
    }
}

/// Progress of one run (shared by its workers).
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    console: Console,
    lines: bool,
    total: u64,
    started: Instant,
    blocks: AtomicU64,
    records: AtomicU64,
    /// The bar's totals, then the latest step of a block in progress.
    shown: std::sync::Mutex<(String, String)>,
}

impl Progress {
    /// Progress over `total` blocks to fetch; its bar (if any) is shown
    /// through `console` until [`Progress::finish`].
    pub(crate) fn new(total: u64, display: Display, console: &Console) -> Progress {
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
        console.show(bar.clone());
        Progress {
            bar,
            console: console.clone(),
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
        } else if self.lines && on_a_line(step) {
            let _ = writeln!(std::io::stderr(), "{block}: {step}");
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
                "{block}: {records} record{}; {blocks}/{} blocks, {all} records, {rate:.0}/s, {throttled} 429s, ETA {eta:.0}s",
                if records == 1 { "" } else { "s" },
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
            self.console.show(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A terminal that notes what is done to it (clones share the notes).
    #[derive(Clone, Debug, Default)]
    struct Screen(Arc<Mutex<Vec<String>>>);

    impl Screen {
        fn note(&self, what: String) -> std::io::Result<()> {
            self.0.lock().unwrap().push(what);
            Ok(())
        }

        fn notes(&self) -> Vec<String> {
            self.0.lock().unwrap().clone()
        }
    }

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            80
        }
        fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
            self.note(format!("up {n}"))
        }
        fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
            self.note(format!("down {n}"))
        }
        fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
            self.note(format!("right {n}"))
        }
        fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
            self.note(format!("left {n}"))
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.note(format!("line {s}"))
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.note(format!("str {s}"))
        }
        fn clear_line(&self) -> std::io::Result<()> {
            self.note("clear".into())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Without a terminal, a details query still running gets its line,
    /// as a job still running does; a page read does not.
    #[test]
    fn a_query_or_job_still_running_gets_a_line() {
        let querying = Step::Querying {
            for_s: 30,
            records: 0,
            of: None,
        };
        assert!(on_a_line(querying));
        assert!(on_a_line(Step::Pending { for_s: 31 }));
        assert!(!on_a_line(Step::Pending { for_s: 3 }));
        assert!(!on_a_line(Step::Paged {
            records: 100,
            of: Some(200)
        }));
    }

    #[test]
    fn a_line_said_while_the_bar_is_shown_goes_on_a_line_of_its_own() {
        let screen = Screen::default();
        let bar = ProgressBar::with_draw_target(
            Some(10),
            ProgressDrawTarget::term_like(Box::new(screen.clone())),
        );
        bar.tick();
        assert!(
            screen.notes().iter().any(|n| n.contains("0/10")),
            "{:?}",
            screen.notes()
        );
        let console = Console::default();
        console.show(Some(bar.clone()));
        // The notes before the line: the bar's last drawing, and whether
        // its line was cleared after it.
        let said = || {
            console.say_with(|| {
                let _ = screen.note("said".into());
            });
            let notes = screen.notes();
            let at = notes.iter().rposition(|n| n == "said").unwrap();
            let drawn = notes[..at].iter().rposition(|n| n.contains("0/10"));
            let cleared = notes[..at].iter().rposition(|n| n == "clear");
            (drawn, cleared)
        };
        let (drawn, cleared) = said();
        assert!(
            cleared > drawn,
            "written into the bar's line: {:?}",
            screen.notes()
        );
        // With the bar gone, nothing is drawn around the line.
        bar.finish_and_clear();
        screen.0.lock().unwrap().clear();
        assert_eq!(said(), (None, None), "{:?}", screen.notes());
    }
}
