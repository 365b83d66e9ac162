//! The output: one table (a column per mode) with the broker's targets
//! checked under it, or the same as one JSON object (`--json`). Targets are
//! reported, never asserted: a miss says by how much.

use std::fmt::Write as _;

use serde::Serialize;

use crate::chaos::ChaosResult;
use crate::cli::{ModeName, Spec};
use crate::cluster::{ClusterResult, Takeover};
use crate::confgen::{LimitChange, Plan, WINDOW_MS};
use crate::run::ModeResult;

/// One target of broker mode.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Target {
    /// What is measured.
    pub(crate) name: String,
    /// The bar.
    pub(crate) target: String,
    /// What broker mode got.
    pub(crate) value: String,
    /// Whether it met the bar (None: could not be measured in this run).
    pub(crate) met: Option<bool>,
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Report {
    /// The command line.
    pub(crate) command: String,
    /// Seed.
    pub(crate) seed: u64,
    /// Simulated seconds of production.
    pub(crate) duration_s: u64,
    /// Simulated seconds per real second.
    pub(crate) time_scale: f64,
    /// Window of every limit, simulated ms.
    pub(crate) window_ms: u64,
    /// Hidden-limit changes of the analytics family.
    pub(crate) changes: Vec<LimitChange>,
    /// Unmanaged consumer: (from simulated ms, requests per window).
    pub(crate) unmanaged: Vec<(u64, u64)>,
    /// Whether what is left for the fleet moves within the run (see
    /// [`Plan::moves`]): the 429 target is then 1 %, not 0.5 %.
    pub(crate) moves: bool,
    /// Whether it ramps between those steps, window by window.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) unmanaged_ramping: bool,
    /// `--upstream`: the file and its analytics family in a line (None:
    /// the generated org).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) upstream: Option<String>,
    /// Per mode, in the order run.
    pub(crate) modes: Vec<ModeResult>,
    /// Broker mode's targets (empty when it did not run).
    pub(crate) targets: Vec<Target>,
}

impl Report {
    /// The report of a run.
    pub(crate) fn new(spec: &Spec, plan: &Plan, modes: Vec<ModeResult>) -> Report {
        let moves = plan.moves();
        let targets = targets(&modes, moves);
        Report {
            command: spec.command.clone(),
            seed: spec.seed,
            duration_s: spec.duration_s,
            time_scale: spec.scale,
            window_ms: WINDOW_MS,
            changes: plan.changes.clone(),
            unmanaged: plan.unmanaged.clone(),
            moves,
            unmanaged_ramping: plan.upstream.as_ref().is_some_and(|f| f.ramping),
            upstream: plan.upstream.as_ref().map(|f| f.summary.clone()),
            modes,
            targets,
        }
    }

    /// The JSON object.
    pub(crate) fn json(&self) -> String {
        // Every field is plain data (strings, numbers, maps with string keys).
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The table.
    pub(crate) fn table(&self) -> String {
        let mut out = String::new();
        let changes: Vec<String> = self.changes.iter().map(change_label).collect();
        let unmanaged = unmanaged_steps(&self.unmanaged, self.unmanaged_ramping, self.window_ms);
        let _ = writeln!(out, "fleet scenario: {}", self.command);
        let _ = writeln!(
            out,
            "seed {}, {} s simulated ({} s real per mode + drain), time scale {}, windows {} s",
            self.seed,
            self.duration_s,
            (self.duration_s as f64 / self.time_scale).round(),
            self.time_scale,
            self.window_ms / 1000
        );
        if let Some(upstream) = &self.upstream {
            let _ = writeln!(out, "upstream {upstream}");
        }
        let hidden = match self.changes.first() {
            Some(c) => format!("hidden {}, {}", c.from, changes.join(", ")),
            None => "no hidden-limit change in the run".into(),
        };
        let _ = writeln!(
            out,
            "org-a analytics-query: documented 60, {hidden}; unmanaged {unmanaged}\n"
        );
        let mut rows: Vec<(String, Vec<String>)> = Vec::new();
        let mut row = |name: &str, f: &dyn Fn(&ModeResult) -> String| {
            rows.push((name.to_owned(), self.modes.iter().map(f).collect()));
        };
        row("analytics goodput (served/available)", &|m| {
            share(
                m.analytics.share,
                m.analytics.served_fleet,
                m.analytics.available,
            )
        });
        row("  vs what is left after unmanaged demand", &|m| {
            share(
                m.analytics.fair_share,
                m.analytics.served_fleet,
                m.analytics.fair_available,
            )
        });
        row("  unmanaged consumer served / refused", &|m| {
            format!(
                "{} / {}",
                m.analytics.unmanaged_served, m.analytics.unmanaged_refused
            )
        });
        row("writes goodput (demand-bound)", &|m| {
            share(m.writes.share, m.writes.served_fleet, m.writes.available)
        });
        row("upstream requests", &|m| m.requests.sent.to_string());
        row("429s (ratio)", &|m| {
            format!("{} ({:.2}%)", m.requests.refused, 100.0 * m.requests.ratio)
        });
        row("  of analytics queries (ratio)", &|m| {
            let a = m.requests.analytics;
            format!("{} ({})", a.refused, pct_2(share_of(a.refused, a.sent)))
        });
        row("  simulator: refused / requests", &|m| {
            format!("{} / {}", m.requests.sim_refused, m.requests.sim_total)
        });
        for class in ["critical", "interactive", "batch"] {
            row(&format!("wait p50 / p99 {class} (sim ms)"), &|m| {
                m.wait
                    .get(class)
                    .filter(|w| w.count > 0)
                    .map_or("-".into(), |w| {
                        let unserved = match w.unserved {
                            0 => String::new(),
                            n => format!(" ({n} never served)"),
                        };
                        format!("{} / {}{unserved}", ms(w.p50_ms), ms(w.p99_ms))
                    })
            });
        }
        row("  critical, windows without a 429", &|m| {
            let q = &m.critical_quiet;
            if q.waits.count == 0 {
                return format!("- (0 of {})", q.of);
            }
            format!(
                "{} / {} ({} of {})",
                ms(q.waits.p50_ms),
                ms(q.waits.p99_ms),
                q.waits.count,
                q.of
            )
        });
        row("ingest records exp/stored/dup/unfinished/lost", &|m| {
            let r = m.records.ingest;
            format!(
                "{}/{}/{}/{}/{}",
                r.expected, r.stored, r.duplicates, r.unfinished, r.lost
            )
        });
        row("write records exp/stored/dup/unfinished/lost", &|m| {
            let r = m.records.writes;
            format!(
                "{}/{}/{}/{}/{}",
                r.expected, r.stored, r.duplicates, r.unfinished, r.lost
            )
        });
        for (i, change) in self.changes.iter().enumerate() {
            row(
                &format!("re-converged after {}", change_label(change)),
                &|m| match m.convergence.get(i) {
                    Some(c) if !c.measurable => "n/a (run too short)".into(),
                    Some(c) if c.pending(max_reconverge_windows(&c.change)) => {
                        format!("not within the run's {:.1} windows", c.windows_in_run)
                    }
                    Some(c) => c
                        .windows_after
                        .map_or("never".into(), |w| format!("{w:.1} windows")),
                    None => "-".into(),
                },
            );
        }
        row("wallboard polls made / skipped", &|m| {
            format!("{} / {}", m.polls, m.polls_skipped)
        });
        row("leases granted / not granted", &|m| {
            m.leases
                .map_or("-".into(), |l| format!("{} / {}", l.granted, l.not_granted))
        });
        row("local refill-rate cuts", &|m| {
            m.rate_cuts.map_or("-".into(), |c| c.to_string())
        });
        row("real seconds", &|m| format!("{:.1}", m.real_s));
        if self.modes.iter().any(|m| m.chaos.is_some()) {
            chaos_rows(&mut row);
        }
        if self.modes.iter().any(|m| m.cluster.is_some()) {
            cluster_rows(&mut row);
        }

        let width = rows
            .iter()
            .map(|(n, _)| n.chars().count())
            .max()
            .unwrap_or(0);
        let col = self
            .modes
            .iter()
            .enumerate()
            .map(|(i, m)| {
                rows.iter()
                    .map(|(_, v)| v[i].chars().count())
                    .max()
                    .unwrap_or(0)
                    .max(m.mode.as_str().len())
            })
            .collect::<Vec<_>>();
        let _ = write!(out, "{:width$}", "");
        for (m, w) in self.modes.iter().zip(&col) {
            let _ = write!(out, "  {:>w$}", m.mode.as_str());
        }
        out.push('\n');
        for (name, values) in &rows {
            let _ = write!(out, "{name:width$}");
            for (v, w) in values.iter().zip(&col) {
                let _ = write!(out, "  {v:>w$}");
            }
            out.push('\n');
        }
        for m in &self.modes {
            let rejected = m.fleet.rejected_count;
            if rejected > 0 || m.fleet.unfinished_tasks > 0 {
                let _ = writeln!(
                    out,
                    "{}: {} calls rejected for good {:?}; {} tasks unfinished at the drain deadline",
                    m.mode.as_str(),
                    rejected,
                    m.fleet.rejected,
                    m.fleet.unfinished_tasks
                );
            }
        }
        if !self.targets.is_empty() {
            let _ = writeln!(out, "\nbroker targets:");
            for t in &self.targets {
                let verdict = match t.met {
                    Some(true) => "met",
                    Some(false) => "MISSED",
                    None => "n/a",
                };
                let _ = writeln!(
                    out,
                    "  {:<7} {:<44} {:<16} got {}",
                    verdict, t.name, t.target, t.value
                );
            }
        }
        out
    }
}

/// A cell of every mode's column.
type Cell<'a> = &'a dyn Fn(&ModeResult) -> String;
/// Adds a row: its name and how to fill each mode's cell.
type AddRow<'a> = dyn FnMut(&str, Cell<'_>) + 'a;

/// The rows of a chaos run (`--chaos-kill-at`): "-" for modes without it.
fn chaos_rows(row: &mut AddRow<'_>) {
    let secs = |ms: f64| format!("{:.1}", ms / 1000.0);
    row("chaos: broker SIGKILLed / listening (sim s)", &|m| {
        chaos_cell(m, |c| {
            format!("{} / {}", secs(c.killed_ms), secs(c.back_ms))
        })
    });
    row("  outage: broker down / fleet's (sim s)", &|m| {
        chaos_cell(m, |c| {
            format!("{} / {}", secs(c.broker_down_ms), secs(c.fleet_outage_ms))
        })
    });
    row("  restart attempts / permits granted after", &|m| {
        chaos_cell(m, |c| {
            let granted = c
                .granted_after_restart
                .map_or("no answer".into(), |n| n.to_string());
            format!("{} / {granted}", c.restart_attempts)
        })
    });
    row("  restart learning mode (broker's log)", &|m| {
        chaos_cell(m, |c| {
            let l = &c.broker_log;
            let state = match (l.learning_mode, l.learning_over) {
                (true, true) => "entered, ended",
                (true, false) => "entered",
                (false, _) => "not seen",
            };
            format!("{state}; {} adopted", l.leases_adopted)
        })
    });
    row("  fallback calls: broker down / back (429s)", &|m| {
        chaos_cell(m, |c| {
            let f = &c.fallback;
            format!("{} / {} ({})", f.while_down, f.after_back, f.refused)
        })
    });
    row("  requests before / during / window after / later", &|m| {
        chaos_cell(m, |c| c.phases.each(|p| p.requests))
    });
    row("  429s before / during / window after / later", &|m| {
        chaos_cell(m, |c| c.phases.each(|p| p.refused))
    });
    row("    of them on fallback leases", &|m| {
        chaos_cell(m, |c| c.phases.each(|p| p.refused_on_fallback))
    });
    // Families in the simulator's order: analytics, then writes.
    row("served beyond a limit (busiest windows)", &|m| {
        let over: u64 = m.limits.iter().map(|l| l.served_over).sum();
        let busiest: Vec<String> = m
            .limits
            .iter()
            .map(|l| format!("{}/{}", l.most_served, l.limit))
            .collect();
        format!("{over} ({})", busiest.join(", "))
    });
}

/// The rows of a `--cluster` run: "-" for modes without it.
fn cluster_rows(row: &mut AddRow<'_>) {
    let secs = |ms: f64| format!("{:.1}", ms / 1000.0);
    row("cluster: brokers / etcd lease TTL (real ms)", &|m| {
        cluster_cell(m, |c| format!("{} / {}", c.nodes, c.lease_ttl_real_ms))
    });
    row("  leader at the end (granted since it led)", &|m| {
        cluster_cell(m, |c| {
            format!(
                "{} ({})",
                c.leader_at_end.as_deref().unwrap_or("none"),
                c.granted_by_leader_at_end
                    .map_or("-".into(), |n| n.to_string())
            )
        })
    });
    let kill = |m: &ModeResult, f: &dyn Fn(&Takeover) -> String| {
        cluster_cell(m, |c| c.kill.as_ref().map_or("-".into(), f))
    };
    row("  leader SIGKILLed → new leader", &|m| {
        kill(m, &|k| {
            format!(
                "{} at {} → {} from {} (sim s)",
                k.killed,
                secs(k.killed_ms),
                k.new_leader,
                secs(k.leader_seen_ms)
            )
        })
    });
    row(
        "  take-over: kill → first grant (sim s / real ms)",
        &|m| {
            kill(m, &|k| match (k.takeover_ms, k.takeover_real_ms) {
                (Some(t), Some(r)) => format!("{} / {r:.0}", secs(t)),
                _ => "no grant after the kill".into(),
            })
        },
    );
    row(
        "  grants in the gap (must be 0) / in flight at kill",
        &|m| {
            kill(m, &|k| {
                format!("{} / {}", k.grants_in_gap, k.grants_in_flight_at_kill)
            })
        },
    );
    row("  fallback calls in the gap", &|m| {
        kill(m, &|k| k.fallback_calls_in_gap.to_string())
    });
    row("  killed broker restarted (sim s)", &|m| {
        kill(m, &|k| k.restarted_ms.map_or("no".into(), secs))
    });
}

/// A cluster row's cell: `f` of the mode's cluster figures, "-" without.
fn cluster_cell(m: &ModeResult, f: impl Fn(&ClusterResult) -> String) -> String {
    m.cluster.as_ref().map_or("-".into(), f)
}

/// A chaos row's cell: `f` of the mode's chaos figures, "-" without them.
fn chaos_cell(m: &ModeResult, f: impl Fn(&ChaosResult) -> String) -> String {
    m.chaos.as_ref().map_or("-".into(), f)
}

pub(crate) fn change_label(c: &LimitChange) -> String {
    format!("{}→{} at {} s", c.from, c.to, c.at_ms / 1000)
}

fn share(share: Option<f64>, served: u64, available: u64) -> String {
    match share {
        Some(s) => format!("{:.1}% ({served}/{available})", 100.0 * s),
        None => "-".into(),
    }
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// The unmanaged consumer's steps as gcsim plays them: a step counts from
/// the first window that starts at or after it, and a ramping consumer
/// moves window by window from one step's count to the next's.
fn unmanaged_steps(steps: &[(u64, u64)], ramping: bool, window_ms: u64) -> String {
    let starts = |at: u64| at.div_ceil(window_ms.max(1)) * window_ms.max(1) / 1000;
    let parts: Vec<String> = steps
        .iter()
        .enumerate()
        .map(|(i, &(at, n))| match steps.get(i + 1) {
            Some(&(next, to)) if ramping && to != n => format!(
                "{n} → {to}/window over the windows from {} s to {} s",
                starts(at),
                starts(next)
            ),
            _ => format!("{n}/window from {} s", starts(at)),
        })
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// Least goodput of what the unmanaged consumer left.
pub(crate) const MIN_GOODPUT_OF_LEFT: f64 = 0.97;
/// Most 429s per request where what is left for the fleet holds / moves.
pub(crate) const MAX_429_HOLDS: f64 = 0.005;
pub(crate) const MAX_429_MOVES: f64 = 0.01;
/// Longest critical p99 wait outside the upstream's blocks, sim ms.
pub(crate) const MAX_CRITICAL_P99_MS: f64 = 50.0;

/// Most windows to re-converge after a change of what is left: 2 after a
/// drop (a 429 says so at once), 4 after a rise (found by probing).
pub(crate) fn max_reconverge_windows(c: &LimitChange) -> f64 {
    if c.to < c.from {
        2.0
    } else {
        4.0
    }
}

/// The most 429s per request for a run whose limit `moves` or not.
pub(crate) fn max_429(moves: bool) -> f64 {
    if moves {
        MAX_429_MOVES
    } else {
        MAX_429_HOLDS
    }
}

/// Broker mode's targets, and its 429s against the baselines of the same
/// run. `moves`: what is left for the fleet changes during the run.
fn targets(modes: &[ModeResult], moves: bool) -> Vec<Target> {
    let Some(b) = modes.iter().find(|m| m.mode == ModeName::Broker) else {
        return Vec::new();
    };
    let mut t = Vec::new();
    let pct = |v: f64| format!("{:.1}%", 100.0 * v);
    // Of what the unmanaged consumer left: the baselines reach 100% of the
    // whole by pushing it out, which the broker must not do.
    let gp = b.analytics.fair_share;
    t.push(Target {
        name: "analytics goodput of what is left".into(),
        target: "≥ 97%".into(),
        value: gp.map_or("-".into(), |g| {
            let miss = if g < MIN_GOODPUT_OF_LEFT {
                format!(" ({:.1} points short)", 100.0 * (MIN_GOODPUT_OF_LEFT - g))
            } else {
                String::new()
            };
            format!("{}{miss}", pct(g))
        }),
        met: gp.map(|g| g >= MIN_GOODPUT_OF_LEFT),
    });
    let ratio = b.requests.ratio;
    let max_ratio = max_429(moves);
    t.push(Target {
        name: "429 ratio over the run".into(),
        target: if moves {
            "≤ 1% (moves)".into()
        } else {
            "≤ 0.5% (holds)".into()
        },
        value: format!(
            "{:.2}% ({} of {}; analytics alone {})",
            100.0 * ratio,
            b.requests.refused,
            b.requests.sent,
            pct_2(share_of(
                b.requests.analytics.refused,
                b.requests.analytics.sent
            ))
        ),
        met: Some(ratio <= max_ratio),
    });
    let lost = b.records.ingest.lost + b.records.writes.lost;
    t.push(Target {
        name: "records lost".into(),
        target: "0".into(),
        value: format!(
            "{lost} (ingest {}, writes {}; left unfinished for the next run: {})",
            b.records.ingest.lost,
            b.records.writes.lost,
            b.records.ingest.unfinished + b.records.writes.unfinished
        ),
        met: Some(lost == 0),
    });
    // Outside the upstream's blocks: inside one, no broker can do better
    // than the block.
    let quiet = &b.critical_quiet.waits;
    let all = b.wait.get("critical").map(|w| w.p99_ms);
    t.push(Target {
        name: "critical p99 outside blocks (sim ms)".into(),
        target: "≤ 50 ms".into(),
        value: if quiet.count == 0 {
            format!(
                "- (every window had a 429; all: {} ms)",
                all.map_or("-".into(), ms)
            )
        } else {
            format!(
                "{} ms (all windows: {} ms)",
                ms(quiet.p99_ms),
                all.map_or("-".into(), ms)
            )
        },
        met: (quiet.count > 0).then_some(quiet.p99_ms <= MAX_CRITICAL_P99_MS),
    });
    for c in &b.convergence {
        let windows = max_reconverge_windows(&c.change);
        let pending = c.pending(windows);
        t.push(Target {
            name: format!("re-converged after {}", change_label(&c.change)),
            target: format!("≤ {windows} windows"),
            value: if !c.measurable {
                "run too short".into()
            } else if pending {
                format!(
                    "not within the run's {:.1} windows (run longer to know)",
                    c.windows_in_run
                )
            } else {
                c.windows_after
                    .map_or("never".into(), |w| format!("{w:.1} windows"))
            },
            met: (c.measurable && !pending).then(|| c.windows_after.is_some_and(|w| w <= windows)),
        });
    }
    if let Some(c) = &b.chaos {
        t.push(Target {
            name: "chaos: broker restarted and granted again".into(),
            target: "yes".into(),
            value: format!(
                "{} ({} attempt(s), {} permits granted after)",
                if c.restarted { "yes" } else { "no" },
                c.restart_attempts,
                c.granted_after_restart
                    .map_or("no answer".into(), |n| n.to_string())
            ),
            met: Some(c.restarted),
        });
        let over: u64 = b.limits.iter().map(|l| l.served_over).sum();
        t.push(Target {
            name: "chaos: upstream served beyond a limit".into(),
            target: "0".into(),
            value: format!(
                "{over} (429s during the outage {}, in the window after {})",
                c.phases.during.refused, c.phases.after.refused
            ),
            met: Some(over == 0),
        });
    }
    if let Some(k) = b.cluster.as_ref().and_then(|c| c.kill.as_ref()) {
        t.push(Target {
            name: "cluster: another broker took the tenant over".into(),
            target: "yes".into(),
            value: format!(
                "{} → {} in {}",
                k.killed,
                k.new_leader,
                k.takeover_ms
                    .map_or("never".into(), |t| format!("{:.1} sim s", t / 1000.0))
            ),
            met: Some(k.new_leader_took_over),
        });
        t.push(Target {
            name: "cluster: grants during the take-over gap".into(),
            target: "0".into(),
            value: k.grants_in_gap.to_string(),
            met: Some(k.grants_in_gap == 0),
        });
    }
    let others: Vec<&ModeResult> = modes
        .iter()
        .filter(|m| !matches!(m.mode, ModeName::Broker | ModeName::Relay))
        .collect();
    if !others.is_empty() {
        let best_ratio = others
            .iter()
            .map(|m| m.requests.ratio)
            .fold(f64::INFINITY, f64::min);
        t.push(Target {
            name: "429 ratio below every baseline".into(),
            target: "< best baseline".into(),
            value: format!("{} vs {}", pct_2(ratio), pct_2(best_ratio)),
            met: Some(ratio < best_ratio),
        });
    }
    t
}

fn share_of(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn pct_2(v: f64) -> String {
    format!("{:.2}%", 100.0 * v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unmanaged_consumer_is_described_as_gcsim_plays_it() {
        // A step at 30 s counts from the window that starts at 60 s.
        assert_eq!(
            unmanaged_steps(&[(0, 4), (30_000, 12)], false, 60_000),
            "4/window from 0 s, 12/window from 60 s"
        );
        assert_eq!(
            unmanaged_steps(&[(0, 4), (120_000, 12)], true, 60_000),
            "4 → 12/window over the windows from 0 s to 120 s, 12/window from 120 s"
        );
        assert_eq!(unmanaged_steps(&[], false, 60_000), "none");
    }
}
