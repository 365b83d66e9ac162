//! `--matrix`: the fleet against every `--upstream` file × every seed (broker
//! mode by default), one row per cell with a few of the report's figures.

use std::fmt::Write as _;

use serde::Serialize;

use crate::cli::{ModeName, Spec};
use crate::measure::ms_text;
use crate::report::{
    change_label, max_429, max_reconverge_windows, Report, MAX_CRITICAL_P99_MS, MIN_GOODPUT_OF_LEFT,
};
use crate::run::ModeResult;

/// One upstream × seed × mode.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Cell {
    /// The upstream file's name (without `.toml`).
    pub(crate) upstream: String,
    /// Seed.
    pub(crate) seed: u64,
    /// Mode.
    pub(crate) mode: ModeName,
    /// Analytics served to the fleet / (enforced − the unmanaged consumer's
    /// requests, served or not), over the run's whole windows.
    pub(crate) goodput_of_left: Option<f64>,
    /// Analytics served to the fleet / (enforced − what the unmanaged
    /// consumer was served).
    pub(crate) goodput_of_available: Option<f64>,
    /// The unmanaged consumer's analytics requests refused, and all it
    /// sent, over the same windows: goodput/left above 100 % with refusals
    /// here is budget the fleet took from it.
    pub(crate) unmanaged_refused: (u64, u64),
    /// The fleet's 429s / its requests (every family).
    pub(crate) ratio_429: f64,
    /// The fleet's 429s.
    pub(crate) refused: u64,
    /// Critical waits (sim ms) of calls in windows where the fleet took no
    /// analytics 429: p50, p99, count.
    pub(crate) critical_outside: (f64, f64, u64),
    /// Critical waits of calls that began or ended in a window where it
    /// took one (the upstream's blocks).
    pub(crate) critical_inside: (f64, f64, u64),
    /// Batch (ingestion) p99 wait, sim ms (`None`: no batch call).
    pub(crate) batch_p99_ms: Option<f64>,
    /// Ingest and write records lost.
    pub(crate) records_lost: u64,
    /// Records the drain deadline left for the next run (see
    /// [`crate::measure::Records::unfinished`]); not a miss, but shown.
    pub(crate) records_unfinished: u64,
    /// Requests the upstream served beyond a limit (0 by construction).
    pub(crate) served_over: u64,
    /// The upstream file's analytics family in a line.
    pub(crate) upstream_summary: String,
    /// Whether what is left for the fleet moves during the run (a hidden
    /// limit change, an unmanaged consumer that changes its pace).
    pub(crate) limit_moves: bool,
    /// Re-convergence after each change of the hidden limit.
    pub(crate) reconverged: Vec<Reconverged>,
    /// The targets this cell misses, and by how much (see [`TARGETS`]).
    pub(crate) misses: Vec<String>,
    /// The yardstick: the same upstream with calls paced evenly at all
    /// that is left, no broker (`--paced 100`): its goodput of what is
    /// left, and the unmanaged consumer's requests it refused of all sent.
    pub(crate) exact_pace: Option<(Option<f64>, (u64, u64))>,
    /// The other yardstick: the wallboards' polls alone, each sent the
    /// soonest the upstream would serve it (see [`crate::paced::Alone`]).
    pub(crate) polls_alone: Option<crate::paced::Alone>,
}

/// How soon the fleet used the org well again after a limit change.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Reconverged {
    /// The change, e.g. "45→30 at 150 s".
    pub(crate) change: String,
    /// Windows from the change until a window met the bar (`None`: never).
    pub(crate) windows_after: Option<f64>,
    /// Whether a whole window after the change lies within the run.
    pub(crate) measurable: bool,
    /// Windows from the change to the end of the run's last whole window.
    pub(crate) windows_in_run: f64,
    /// The target, in windows.
    pub(crate) target: f64,
}

impl Reconverged {
    /// Neither met nor missed: not re-converged by the end of a run that
    /// ends before the target does.
    fn pending(&self) -> bool {
        self.windows_after.is_none() && self.windows_in_run < self.target
    }
}

/// The fleet's targets, per cell.
pub(crate) const TARGETS: &str = "targets per cell: 429 ratio <= 0.5% where the limit does not move, \
     <= 1% where it moves; goodput >= 97% of what the unmanaged consumer left; critical p99 <= 50 ms \
     outside upstream blocks; re-converged within 2 windows of a limit drop, 4 of a rise; 0 records lost";

impl Cell {
    /// What this cell misses of [`TARGETS`].
    fn misses(&self) -> Vec<String> {
        let mut out = Vec::new();
        let max_429 = max_429(self.limit_moves);
        if self.ratio_429 > max_429 {
            out.push(format!(
                "429s +{:.2} pt",
                100.0 * (self.ratio_429 - max_429)
            ));
        }
        if let Some(g) = self.goodput_of_left.filter(|&g| g < MIN_GOODPUT_OF_LEFT) {
            // Where an exact even pace misses too, or meets the target only
            // by refusing the unmanaged consumer, the miss is the upstream's
            // as much as the broker's: said beside it.
            let exact = match self.exact_pace {
                Some((Some(e), _)) if e < MIN_GOODPUT_OF_LEFT => {
                    format!(" (exact pace -{:.1} pt)", 100.0 * (MIN_GOODPUT_OF_LEFT - e))
                }
                Some((Some(_), (refused, sent))) if refused > 0 => {
                    format!(" (exact pace meets it refusing the consumer {refused} of {sent})")
                }
                _ => String::new(),
            };
            out.push(format!(
                "goodput -{:.1} pt{exact}",
                100.0 * (MIN_GOODPUT_OF_LEFT - g)
            ));
        }
        let (_, p99, n) = self.critical_outside;
        if n > 0 && p99 > MAX_CRITICAL_P99_MS {
            // Where the polls wait even alone, sent the moment the upstream
            // would serve them, no broker can meet the target: said beside it.
            let alone = match self.polls_alone {
                Some(a) if a.waits.p99_ms > MAX_CRITICAL_P99_MS => {
                    format!(" (polls alone p99 {:.0} ms)", a.waits.p99_ms)
                }
                _ => String::new(),
            };
            out.push(format!(
                "critical p99 +{:.0} ms{alone}",
                p99 - MAX_CRITICAL_P99_MS
            ));
        }
        for r in self
            .reconverged
            .iter()
            .filter(|r| r.measurable && !r.pending())
        {
            match r.windows_after {
                None => out.push(format!("never re-converged after {}", r.change)),
                Some(w) if w > r.target => {
                    out.push(format!("re-converge +{:.1} windows", w - r.target))
                }
                Some(_) => {}
            }
        }
        if self.records_lost > 0 {
            out.push(format!("{} lost", self.records_lost));
        }
        out
    }
}

impl Cell {
    fn new(upstream: &str, seed: u64, report: &Report, m: &ModeResult) -> Cell {
        let summary = report.upstream.as_deref().unwrap_or("generated");
        let q = &m.critical_quiet;
        let wait = |w: &crate::measure::WaitStats| (w.p50_ms, w.p99_ms, w.count);
        let mut cell = Cell {
            upstream: upstream.to_owned(),
            seed,
            mode: m.mode,
            goodput_of_left: m.analytics.fair_share,
            goodput_of_available: m.analytics.share,
            unmanaged_refused: (
                m.analytics.unmanaged_refused,
                m.analytics.unmanaged_refused + m.analytics.unmanaged_served,
            ),
            ratio_429: m.requests.ratio,
            refused: m.requests.refused,
            critical_outside: wait(&q.waits),
            critical_inside: wait(&q.loud_waits),
            batch_p99_ms: m
                .wait
                .get("batch")
                .filter(|w| w.count > 0)
                .map(|w| w.p99_ms),
            records_lost: m.records.ingest.lost + m.records.writes.lost,
            records_unfinished: m.records.ingest.unfinished + m.records.writes.unfinished,
            served_over: m.limits.iter().map(|l| l.served_over).sum(),
            upstream_summary: summary.to_owned(),
            limit_moves: report.moves,
            reconverged: m
                .convergence
                .iter()
                .map(|c| Reconverged {
                    change: change_label(&c.change),
                    windows_after: c.windows_after,
                    measurable: c.measurable,
                    windows_in_run: c.windows_in_run,
                    target: max_reconverge_windows(&c.change),
                })
                .collect(),
            misses: Vec::new(),
            exact_pace: None,
            polls_alone: None,
        };
        cell.misses = cell.misses();
        cell
    }
}

/// Every cell of a matrix run.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Matrix {
    /// The command line.
    pub(crate) command: String,
    /// Simulated seconds of production per cell.
    pub(crate) duration_s: u64,
    /// Simulated seconds per real second.
    pub(crate) time_scale: f64,
    /// Upstream × seed × mode, in the order run.
    pub(crate) cells: Vec<Cell>,
    /// Upstream × seed runs that did not complete, with their error.
    pub(crate) failed: Vec<FailedCell>,
}

/// An upstream × seed run that failed (every mode of it).
#[derive(Clone, Debug, Serialize)]
pub(crate) struct FailedCell {
    /// The upstream file's name.
    pub(crate) upstream: String,
    /// Seed.
    pub(crate) seed: u64,
    /// Why it failed.
    pub(crate) error: String,
}

impl Matrix {
    /// An empty matrix for `spec`.
    pub(crate) fn new(spec: &Spec) -> Matrix {
        Matrix {
            command: spec.command.clone(),
            duration_s: spec.duration_s,
            time_scale: spec.scale,
            cells: Vec::new(),
            failed: Vec::new(),
        }
    }

    /// A run that failed: reported under the table, the others kept.
    pub(crate) fn fail(&mut self, upstream: &str, seed: u64, error: String) {
        self.failed.push(FailedCell {
            upstream: upstream.to_owned(),
            seed,
            error,
        });
    }

    /// The cells of one run (one per mode), with the upstream's exact pace
    /// (see [`Cell::exact_pace`]).
    pub(crate) fn add(
        &mut self,
        upstream: &str,
        seed: u64,
        report: &Report,
        exact_pace: Option<&crate::paced::Row>,
    ) {
        for m in &report.modes {
            let mut cell = Cell::new(upstream, seed, report, m);
            cell.exact_pace = exact_pace.map(|r| (r.goodput.fair_share, r.unmanaged_refused()));
            cell.polls_alone = exact_pace.map(|r| r.polls_alone);
            cell.misses = cell.misses();
            self.cells.push(cell);
        }
    }

    /// The JSON object.
    pub(crate) fn json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The table: one row per cell, then each upstream's summary.
    pub(crate) fn table(&self) -> String {
        let pct = |s: Option<f64>| s.map_or("-".into(), |s| format!("{:.1}%", 100.0 * s));
        let waits = |(p50, p99, n): (f64, f64, u64)| {
            if n == 0 {
                "- (0)".into()
            } else {
                format!("{} / {} ({n})", ms_text(p50), ms_text(p99))
            }
        };
        let head = [
            "upstream",
            "seed",
            "mode",
            "goodput/left",
            "goodput/avail",
            "unmanaged refused",
            "429s (ratio)",
            "critical p50/p99 outside blocks",
            "critical p50/p99 inside",
            "batch p99",
            "lost",
            "over limit",
            "re-converged",
            "exact pace: goodput/left, unmanaged refused",
            "polls alone: p50/p99/max, unmanaged refused",
            "misses",
        ];
        let rows: Vec<Vec<String>> = self
            .cells
            .iter()
            .map(|c| {
                vec![
                    c.upstream.clone(),
                    c.seed.to_string(),
                    c.mode.as_str().to_owned(),
                    pct(c.goodput_of_left),
                    pct(c.goodput_of_available),
                    format!("{} of {}", c.unmanaged_refused.0, c.unmanaged_refused.1),
                    format!("{} ({:.2}%)", c.refused, 100.0 * c.ratio_429),
                    waits(c.critical_outside),
                    waits(c.critical_inside),
                    c.batch_p99_ms.map_or("-".into(), ms_text),
                    if c.records_unfinished > 0 {
                        format!("{} (+{} unfinished)", c.records_lost, c.records_unfinished)
                    } else {
                        c.records_lost.to_string()
                    },
                    c.served_over.to_string(),
                    reconverged(&c.reconverged),
                    c.exact_pace.map_or("-".into(), |(g, (refused, sent))| {
                        format!("{}, {refused} of {sent}", pct(g))
                    }),
                    c.polls_alone
                        .as_ref()
                        .map_or("-".into(), crate::paced::alone_text),
                    if c.misses.is_empty() {
                        "-".into()
                    } else {
                        c.misses.join(", ")
                    },
                ]
            })
            .collect();
        let widths: Vec<usize> = (0..head.len())
            .map(|i| {
                rows.iter()
                    .map(|r| r[i].chars().count())
                    .chain([head[i].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        let _ = writeln!(out, "scenario matrix: {}", self.command);
        let _ = writeln!(
            out,
            "{} s simulated per cell at time scale {}; waits in simulated ms\n",
            self.duration_s, self.time_scale
        );
        let line = |out: &mut String, cells: &[&str]| {
            for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
                let sep = if i == 0 { "" } else { "  " };
                if i < 3 || i == cells.len() - 1 {
                    let _ = write!(out, "{sep}{c:<w$}");
                } else {
                    let _ = write!(out, "{sep}{c:>w$}");
                }
            }
            out.push('\n');
        };
        line(&mut out, &head);
        for r in &rows {
            line(&mut out, &r.iter().map(String::as_str).collect::<Vec<_>>());
        }
        if !self.failed.is_empty() {
            let _ = writeln!(out, "\nfailed cells (not in the table):");
            for f in &self.failed {
                let _ = writeln!(out, "  {} seed {}: {}", f.upstream, f.seed, f.error);
            }
        }
        let _ = writeln!(out, "\n{TARGETS}\n");
        let mut seen = Vec::new();
        for c in &self.cells {
            if !seen.contains(&&c.upstream) {
                seen.push(&c.upstream);
                let _ = writeln!(out, "{}", c.upstream_summary);
            }
        }
        out
    }
}

/// The re-converged column: windows after each change ("-": no change).
fn reconverged(r: &[Reconverged]) -> String {
    if r.is_empty() {
        return "-".into();
    }
    r.iter()
        .map(|r| match (r.measurable, r.windows_after) {
            (false, _) => "n/a".to_owned(),
            (true, None) if r.pending() => format!("not in {:.1} w", r.windows_in_run),
            (true, None) => "never".to_owned(),
            (true, Some(w)) => format!("{w:.1} w"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(reconverged: Vec<Reconverged>) -> Cell {
        let mut c = Cell {
            upstream: "u".into(),
            seed: 1,
            mode: ModeName::Broker,
            goodput_of_left: Some(0.99),
            goodput_of_available: Some(0.99),
            unmanaged_refused: (0, 10),
            ratio_429: 0.001,
            refused: 1,
            critical_outside: (1.0, 10.0, 100),
            critical_inside: (1.0, 10.0, 10),
            batch_p99_ms: Some(100.0),
            records_lost: 0,
            records_unfinished: 0,
            served_over: 0,
            upstream_summary: String::new(),
            limit_moves: true,
            reconverged,
            misses: Vec::new(),
            exact_pace: None,
            polls_alone: None,
        };
        c.misses = c.misses();
        c
    }

    fn after(windows_after: Option<f64>, measurable: bool, target: f64) -> Reconverged {
        Reconverged {
            change: "45→30 at 150 s".into(),
            windows_after,
            measurable,
            windows_in_run: 4.0,
            target,
        }
    }

    #[test]
    fn a_goodput_miss_says_what_an_exact_pace_gets_there() {
        let with = |exact: Option<(Option<f64>, (u64, u64))>| {
            let mut c = cell(vec![]);
            c.goodput_of_left = Some(0.853);
            c.exact_pace = exact;
            c.misses()
        };
        assert_eq!(with(None), ["goodput -11.7 pt"]);
        assert_eq!(with(Some((Some(1.0), (0, 30)))), ["goodput -11.7 pt"]);
        assert_eq!(
            with(Some((Some(0.947), (16, 40)))),
            ["goodput -11.7 pt (exact pace -2.3 pt)"]
        );
        assert_eq!(
            with(Some((Some(0.98), (5, 40)))),
            ["goodput -11.7 pt (exact pace meets it refusing the consumer 5 of 40)"]
        );
    }

    #[test]
    fn a_critical_miss_says_how_long_the_polls_wait_alone() {
        let with = |p99_alone: Option<f64>| {
            let mut c = cell(vec![]);
            c.critical_outside = (900.0, 11_133.0, 121);
            c.polls_alone = p99_alone.map(|p99_ms| crate::paced::Alone {
                waits: crate::measure::WaitStats {
                    count: 180,
                    unserved: 0,
                    p50_ms: 0.0,
                    p99_ms,
                    max_ms: p99_ms,
                },
                unmanaged_refused: (0, 90),
            });
            c.misses()
        };
        assert_eq!(with(None), ["critical p99 +11083 ms"]);
        // Alone at once: the wait is the broker's.
        assert_eq!(with(Some(0.0)), ["critical p99 +11083 ms"]);
        assert_eq!(
            with(Some(4_200.0)),
            ["critical p99 +11083 ms (polls alone p99 4200 ms)"]
        );
        let mut c = cell(vec![]);
        c.polls_alone = Some(crate::paced::Alone {
            waits: crate::measure::WaitStats {
                count: 180,
                unserved: 2,
                p50_ms: 0.0,
                p99_ms: 4_200.0,
                max_ms: 31_000.0,
            },
            unmanaged_refused: (3, 90),
        });
        let matrix = Matrix {
            command: "scenario --matrix".into(),
            duration_s: 600,
            time_scale: 10.0,
            cells: vec![c],
            failed: vec![],
        };
        let table = matrix.table();
        assert!(
            table.contains("0.0 / 4200 / 31000 (2 never served), 3 of 90"),
            "{table}"
        );
    }

    #[test]
    fn a_slow_or_missing_reconvergence_is_a_miss_and_shows_in_its_column() {
        assert!(cell(vec![after(Some(2.0), true, 2.0)]).misses.is_empty());
        assert_eq!(
            cell(vec![after(Some(3.5), true, 2.0)]).misses,
            ["re-converge +1.5 windows"]
        );
        assert_eq!(
            cell(vec![after(None, true, 4.0)]).misses,
            ["never re-converged after 45→30 at 150 s"]
        );
        assert!(cell(vec![after(None, false, 4.0)]).misses.is_empty());
        assert_eq!(reconverged(&[]), "-");
        assert_eq!(
            reconverged(&[
                after(Some(2.0), true, 2.0),
                after(None, true, 4.0),
                after(None, false, 4.0)
            ]),
            "2.0 w, never, n/a"
        );
    }

    #[test]
    fn a_failed_cell_is_listed_and_the_others_kept() {
        let mut m = Matrix {
            command: "scenario --matrix".into(),
            duration_s: 120,
            time_scale: 60.0,
            cells: vec![cell(Vec::new())],
            failed: Vec::new(),
        };
        m.fail("broken", 3, "simulator stats: no answer".into());
        let table = m.table();
        assert!(table.contains("\nu "), "{table}");
        assert!(
            table.contains(
                "failed cells (not in the table):\n  broken seed 3: simulator stats: no answer"
            ),
            "{table}"
        );
        let json: serde_json::Value = serde_json::from_str(&m.json()).unwrap();
        assert_eq!(json["cells"].as_array().unwrap().len(), 1);
        assert_eq!(json["failed"][0]["upstream"], "broken");
        assert_eq!(json["failed"][0]["error"], "simulator stats: no answer");
    }

    #[test]
    fn a_run_that_ends_before_the_target_does_neither_meets_nor_misses_it() {
        let rise = |windows_after, windows_in_run| Reconverged {
            change: "35→50 at 150 s".into(),
            windows_after,
            measurable: true,
            windows_in_run,
            target: 4.0,
        };
        assert!(cell(vec![rise(None, 2.5)]).misses.is_empty());
        assert_eq!(reconverged(&[rise(None, 2.5)]), "not in 2.5 w");
        assert_eq!(
            cell(vec![rise(None, 4.5)]).misses,
            ["never re-converged after 35→50 at 150 s"]
        );
        assert!(cell(vec![rise(Some(2.0), 2.5)]).misses.is_empty());
    }
}
