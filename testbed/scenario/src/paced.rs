//! `--paced PERCENT`: each `--upstream` file's analytics family played in
//! process against calls sent evenly at each percentage of what is left
//! for the fleet, with no broker (see `gcsim::paced`), measured as the
//! matrix measures a cell. The yardstick of what a broker that had learned
//! what is left exactly, and not when the unmanaged consumer sends, could
//! be served: a cell where no pace is served 97 % of what is left without
//! refusing the consumer is one no pacing broker can meet. `--rise-late
//! WINDOWS` follows a rise of what is left that late: what a broker that
//! finds a rise that late could be served. Beside each file, the
//! wallboards' polls played alone (`gcsim::soonest`): each sent the moment
//! the upstream would serve it, nothing else of the fleet in the way, the
//! least any broker that leaves the consumer its calls could make them
//! wait.

use std::fmt::Write as _;

use serde::Serialize;

use crate::cli::Spec;
use crate::confgen::{UpstreamFile, ANALYTICS, ORG};
use crate::error::Error;
use crate::fleet::{POLL_MS, WALLBOARDS};
use crate::measure::{goodput, ms_text, Goodput, WaitStats};
use crate::upstream::OrgStats;

/// One file at one pace.
#[derive(Debug, Serialize)]
pub(crate) struct Row {
    /// The upstream file's name (without `.toml`).
    pub(crate) upstream: String,
    /// The pace, a percentage of what is left.
    pub(crate) percent: f64,
    /// How many of the family's windows after a rise the pace follows it.
    pub(crate) rise_late_windows: f64,
    /// The paced calls refused in the counted windows.
    pub(crate) refused: u64,
    /// Counted as the matrix counts a cell.
    pub(crate) goodput: Goodput,
    /// The file's wallboard polls alone (the same for every pace).
    pub(crate) polls_alone: Alone,
}

/// The wallboards' polls alone against a file's analytics family, each
/// sent the soonest moment the upstream would serve it (see
/// `gcsim::soonest`): the least wait a broker could give them there.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct Alone {
    /// Their waits over the whole run, simulated ms.
    pub(crate) waits: WaitStats,
    /// The unmanaged consumer's requests refused, and all it sent, in the
    /// windows the matrix counts.
    pub(crate) unmanaged_refused: (u64, u64),
}

impl Row {
    /// The unmanaged consumer's requests refused, and all it sent.
    pub(crate) fn unmanaged_refused(&self) -> (u64, u64) {
        let g = &self.goodput;
        (
            g.unmanaged_refused,
            g.unmanaged_refused + g.unmanaged_served,
        )
    }
}

/// Every file × every `--rise-late` × every percentage of `spec`.
pub(crate) fn rows(spec: &Spec, percents: &[f64]) -> Result<Vec<Row>, Error> {
    let until_ms = spec.duration_s * 1000;
    let mut rows = Vec::new();
    for file in &spec.upstreams {
        let polls_alone = alone(file, until_ms)?;
        for &late in &spec.rise_late {
            for &percent in percents {
                rows.push(row(file, percent, late, until_ms, polls_alone)?);
            }
        }
    }
    Ok(rows)
}

/// `file`'s wallboard polls alone over `until_ms` simulated ms.
pub(crate) fn alone(file: &UpstreamFile, until_ms: u64) -> Result<Alone, Error> {
    let config = file.sim_config()?;
    let pollers = gcsim::Pollers {
        callers: WALLBOARDS,
        every_ms: POLL_MS,
    };
    let run = gcsim::soonest(&config, ORG, ANALYTICS, pollers, until_ms)
        .map_err(|e| Error::Usage(format!("--upstream {}: {e}", file.name)))?;
    let org = org_stats(file, run.stats)?;
    let g = goodput(org.families.iter().find(|f| f.name == ANALYTICS), until_ms);
    Ok(Alone {
        waits: WaitStats::of_waits(&run.waits_ms, run.unserved),
        unmanaged_refused: (
            g.unmanaged_refused,
            g.unmanaged_refused + g.unmanaged_served,
        ),
    })
}

/// `file` at `percent` of what is left, following a rise `rise_late`
/// windows late, over `until_ms` simulated ms.
pub(crate) fn row(
    file: &UpstreamFile,
    percent: f64,
    rise_late: f64,
    until_ms: u64,
    polls_alone: Alone,
) -> Result<Row, Error> {
    let config = file.sim_config()?;
    let window_ms = config
        .orgs
        .iter()
        .filter(|o| o.id == ORG)
        .flat_map(|o| &o.families)
        .find(|f| f.name == ANALYTICS)
        .map_or(60_000, |f| f.window_ms);
    let late_ms = (rise_late * window_ms as f64).round() as u64;
    let stats = gcsim::paced(&config, ORG, ANALYTICS, percent / 100.0, late_ms, until_ms)
        .map_err(|e| Error::Usage(format!("--upstream {}: {e}", file.name)))?;
    let org = org_stats(file, stats)?;
    let family = org.families.iter().find(|f| f.name == ANALYTICS);
    let g = goodput(family, until_ms);
    let refused = family.map_or(0, |f| {
        f.windows
            .iter()
            .filter(|w| g.windows.contains(&w.index))
            .map(|w| w.refused_fleet)
            .sum()
    });
    Ok(Row {
        upstream: file.name.clone(),
        percent,
        rise_late_windows: rise_late,
        refused,
        goodput: g,
        polls_alone,
    })
}

/// The org's counters an in-process run of `file` returned.
fn org_stats(file: &UpstreamFile, stats: serde_json::Value) -> Result<OrgStats, Error> {
    serde_json::from_value(stats).map_err(|e| {
        Error::Usage(format!(
            "--upstream {}: the in-process run's counters: {e}",
            file.name
        ))
    })
}

/// The table.
pub(crate) fn table(spec: &Spec, rows: &[Row]) -> String {
    let pct = |s: Option<f64>| s.map_or("-".into(), |s| format!("{:.1}%", 100.0 * s));
    let head = [
        "upstream",
        "paced",
        "rise followed",
        "served",
        "refused",
        "goodput/left",
        "goodput/avail",
        "unmanaged refused",
        "polls alone: p50/p99/max ms, unmanaged refused",
    ];
    let cells: Vec<[String; 9]> = rows
        .iter()
        .map(|r| {
            [
                r.upstream.clone(),
                format!("{}% of left", r.percent),
                if r.rise_late_windows == 0.0 {
                    "at once".into()
                } else {
                    format!("{} w late", r.rise_late_windows)
                },
                r.goodput.served_fleet.to_string(),
                r.refused.to_string(),
                pct(r.goodput.fair_share),
                pct(r.goodput.share),
                format!("{} of {}", r.unmanaged_refused().0, r.unmanaged_refused().1),
                alone_text(&r.polls_alone),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..head.len())
        .map(|i| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([head[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let _ = writeln!(out, "scenario paced: {}", spec.command);
    let _ = writeln!(
        out,
        "{} simulated s of calls to {ANALYTICS} sent evenly at a share of what is left for \
         the fleet, no broker; counted as the matrix counts (the first window left out); \
         beside them the {WALLBOARDS} wallboards' polls (one each every {:.0} s) alone, each \
         sent the soonest the upstream would serve it\n",
        spec.duration_s,
        POLL_MS / 1000.0
    );
    let line = |out: &mut String, row: &[&str]| {
        for (i, (c, w)) in row.iter().zip(&widths).enumerate() {
            if i == 0 {
                let _ = write!(out, "{c:<w$}");
            } else {
                let _ = write!(out, "  {c:>w$}");
            }
        }
        out.push('\n');
    };
    line(&mut out, &head);
    for r in &cells {
        line(&mut out, &r.iter().map(String::as_str).collect::<Vec<_>>());
    }
    out
}

/// The polls alone in a cell: "p50 / p99 / max, refused of sent", and
/// how many the upstream never served.
pub(crate) fn alone_text(a: &Alone) -> String {
    let w = &a.waits;
    let unserved = if w.unserved > 0 {
        format!(" ({} never served)", w.unserved)
    } else {
        String::new()
    };
    format!(
        "{} / {} / {}{unserved}, {} of {}",
        ms_text(w.p50_ms),
        ms_text(w.p99_ms),
        ms_text(w.max_ms),
        a.unmanaged_refused.0,
        a.unmanaged_refused.1
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Args;
    use clap::Parser;

    fn spec(extra: &[&str]) -> Spec {
        let dir = env!("CARGO_MANIFEST_DIR");
        let file = format!("{dir}/upstreams/sliding-log-bursty.toml");
        let mut argv = vec!["scenario", "--upstream", &file, "--duration", "600"];
        argv.extend_from_slice(extra);
        Args::parse_from(argv).resolve().unwrap()
    }

    #[test]
    fn on_the_bursty_sliding_log_every_even_pace_trades_the_consumers_refusals_for_goodput() {
        let spec = spec(&["--paced", "50,100"]);
        let rows = rows(&spec, spec.paced.as_deref().unwrap()).unwrap();
        assert_eq!(rows.len(), 2);
        let (slow, fast) = (&rows[0], &rows[1]);
        // Half of what is left leaves the consumer every burst; all that is
        // left is served, and refuses it some.
        assert_eq!(slow.unmanaged_refused().0, 0, "{slow:?}");
        assert!(slow.goodput.fair_share.unwrap() < 0.6, "{slow:?}");
        assert!(fast.goodput.fair_share.unwrap() > 0.95, "{fast:?}");
        assert!(fast.unmanaged_refused().0 > 0, "{fast:?}");
        // The wallboards' polls alone, leaving the consumer its calls,
        // wait seconds where two bursts fall in one span: no broker meets
        // the critical target there without pushing the consumer out.
        let alone = slow.polls_alone;
        assert_eq!(alone.unmanaged_refused, (0, 90), "{alone:?}");
        assert!(alone.waits.p99_ms > 1_000.0, "{alone:?}");
        assert_eq!(alone.waits.count, fast.polls_alone.waits.count);
        let table = table(&spec, &rows);
        assert!(table.contains("sliding-log-bursty"), "{table}");
        assert!(table.contains(&alone_text(&alone)), "{table}");
    }

    #[test]
    fn on_the_dropping_token_bucket_the_polls_alone_never_wait() {
        // After the drop the wallboards ask all that is left, yet the
        // bucket's stored permits serve each at once when nothing else of
        // the fleet is sent: the critical target is within reach there.
        let dir = env!("CARGO_MANIFEST_DIR");
        let file = format!("{dir}/upstreams/held-out/token-bucket-silent-dropping.toml");
        let spec = Args::parse_from(["scenario", "--upstream", &file, "--duration", "600"])
            .resolve()
            .unwrap();
        let alone = alone(&spec.upstreams[0], 600_000).unwrap();
        assert_eq!(alone.waits.unserved, 0, "{alone:?}");
        assert!(alone.waits.max_ms < 1.0, "{alone:?}");
        assert_eq!(alone.unmanaged_refused.0, 0, "{alone:?}");
    }

    #[test]
    fn a_rise_followed_later_is_served_less_and_says_so() {
        let dir = env!("CARGO_MANIFEST_DIR");
        let file = format!("{dir}/upstreams/held-out/fixed-silent-rising.toml");
        let argv = [
            "scenario",
            "--upstream",
            &file,
            "--duration",
            "600",
            "--paced",
            "100",
            "--rise-late",
            "0,2,4",
        ];
        let spec = Args::parse_from(argv).resolve().unwrap();
        let rows = rows(&spec, spec.paced.as_deref().unwrap()).unwrap();
        let got: Vec<f64> = rows.iter().map(|r| r.goodput.fair_share.unwrap()).collect();
        assert_eq!(rows.len(), 3);
        // 35 enforced less 8 rising to 50 less 8 at 150 s: each window the
        // rise goes unfollowed is 15 of about 380 left over the run.
        assert!(got[0] > 0.95, "{got:?}");
        for pair in got.windows(2) {
            let lost = pair[0] - pair[1];
            assert!((0.05..0.1).contains(&lost), "{got:?}");
        }
        assert!(
            rows.iter().all(|r| r.unmanaged_refused().0 == 0),
            "{rows:?}"
        );
        let table = table(&spec, &rows);
        assert!(
            table.contains("at once") && table.contains("4 w late"),
            "{table}"
        );
    }

    #[test]
    fn paced_percentages_must_be_positive_and_go_without_the_matrix() {
        let dir = env!("CARGO_MANIFEST_DIR");
        let file = format!("{dir}/upstreams/sliding-log-bursty.toml");
        let bad = |argv: &[&str]| {
            let mut all = vec!["scenario", "--upstream", &file];
            all.extend_from_slice(argv);
            Args::try_parse_from(all)
                .map_err(|e| e.to_string())
                .and_then(|a| a.resolve().map_err(|e| e.to_string()))
                .unwrap_err()
        };
        assert!(
            bad(&["--paced", "0"]).contains("--paced"),
            "{}",
            bad(&["--paced", "0"])
        );
        assert!(bad(&["--paced", "10", "--matrix"]).contains("--paced"));
        let late = bad(&["--paced", "100", "--rise-late=-1"]);
        assert!(late.contains("--rise-late"), "{late}");
        assert!(bad(&["--rise-late", "1"]).contains("--paced"));
    }
}
