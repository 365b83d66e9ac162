//! A fleet that knows the limit: one family of one org played in process
//! (no server, no network, no broker) against calls sent evenly at a share
//! of what the family leaves besides its unmanaged consumer's demand, the
//! pace following the hidden limit and the consumer as they change. The
//! caller backs off for a refusal's Retry-After and otherwise keeps its
//! pace: what a broker that had learned what is left exactly, and nothing
//! more about the upstream (not when the consumer will send), would send.
//! What it is served at each share is a yardstick for the scenario's
//! cells: where no even pace is served what is left and leaves the
//! consumer its demand, no pacing broker can be. With `rise_late_ms` the
//! pace follows a rise of what is left only that long after it (a drop at
//! once): what a broker finding a rise that late could be served.

use crate::config::SimConfig;
use crate::error::SimError;
use crate::org::Org;

/// The OAuth client the paced calls are made as.
const CLIENT: &str = "paced";

/// Plays `until_ms` simulated ms of org `org` in `config` with calls to
/// family `family` paced evenly at `share` of what the family leaves in the
/// current window (its enforced permits less the unmanaged consumer's
/// planned requests), and returns the org's counters as `/_sim/stats` shows
/// them. A refused call holds the next one back until its Retry-After; a
/// call served takes no time (its concurrency slot, if any, is given back
/// at once); while nothing is left, the pace waits for the next window.
/// The pace follows what is left `rise_late_ms` after it rises (the lesser
/// of what is left now and what was left that long ago; before the start,
/// what was left at it), and at once when it drops.
pub fn paced(
    config: &SimConfig,
    org: &str,
    family: &str,
    share: f64,
    rise_late_ms: u64,
    until_ms: u64,
) -> Result<serde_json::Value, SimError> {
    if !(share.is_finite() && share > 0.0 && share <= 10.0) {
        return Err(SimError::Config(vec![format!(
            "a paced share must be above 0 and at most 10 (1 is all that is left), got {share}"
        )]));
    }
    let (mut sim, index) = org_family(config, org, family)?;
    let end = until_ms as f64;
    let late = rise_late_ms as f64;
    // What was left from each moment on, in time order, as the pace saw it.
    let mut seen: Vec<(f64, u64)> = Vec::new();
    // The interval at the pace of `at`; the first call half of one in.
    let mut interval = |sim: &mut Org, at: f64| -> f64 {
        let (now_left, window) = sim.left(at, index).unwrap_or((0, 60_000));
        if seen.last().is_none_or(|&(_, l)| l != now_left) {
            seen.push((at, now_left));
        }
        let then = at - late;
        let then_left = seen
            .iter()
            .rev()
            .find(|&&(t, _)| t <= then)
            .or(seen.first())
            .map_or(now_left, |&(_, l)| l);
        let left = now_left.min(then_left);
        let window = window.max(1) as f64;
        if left == 0 {
            // Nothing left: wait for the next window.
            (at / window).floor() * window + window - at
        } else {
            window / (share * left as f64)
        }
    };
    let mut at = interval(&mut sim, 0.0) / 2.0;
    while at < end {
        let decision = sim.admit_to(at, CLIENT, &[index], || Ok(()));
        let next = at + interval(&mut sim, at);
        at = match decision.verdict {
            Ok(slots) => {
                sim.release(&slots);
                next
            }
            Err(refusal) => next.max(at + refusal.retry_after_ms),
        };
    }
    stats(&mut sim, end, org)
}

/// Whether `sim` would serve a call to family `index` at `at` and, played
/// `window` ms further with nothing more sent, refuse the unmanaged
/// consumer no more than without the call.
fn serves_leaving_the_consumer(sim: &Org, index: usize, at: f64, window: f64) -> bool {
    let mut with = sim.clone();
    if with
        .admit_to(at, CLIENT, &[index], || Ok(()))
        .verdict
        .is_err()
    {
        return false;
    }
    let mut without = sim.clone();
    with.advance(at + window);
    without.advance(at + window);
    with.refused_unmanaged(index) <= without.refused_unmanaged(index)
}

/// Org `org` of `config`, fresh, and the index of its family `family`.
fn org_family(config: &SimConfig, org: &str, family: &str) -> Result<(Org, usize), SimError> {
    let ready = config.ready()?;
    let Some(found) = ready.into_iter().find(|o| o.config.id == org) else {
        return Err(SimError::Config(vec![format!(
            "no org {org:?} in the config"
        )]));
    };
    let sim = Org::new(
        found.config,
        found.families,
        (config.escalation_base_ms, config.escalation_max_ms),
    );
    let Some(index) = sim.family_index(family) else {
        return Err(SimError::Config(vec![format!(
            "org {org:?} has no family {family:?}"
        )]));
    };
    Ok((sim, index))
}

/// The org's counters at `end`, as `/_sim/stats` shows them.
fn stats(sim: &mut Org, end: f64, id: &str) -> Result<serde_json::Value, SimError> {
    serde_json::to_value(sim.stats(end, id)).map_err(|e| SimError::Io {
        what: "write the paced run's counters".into(),
        source: std::io::Error::other(e),
    })
}

/// Callers that each send one call every `every_ms`, the `i`-th of
/// `callers` from `every_ms × i / callers` on (the scenario's wallboards);
/// a caller whose call waited past its next moment skips the moments
/// passed meanwhile.
#[derive(Clone, Copy, Debug)]
pub struct Pollers {
    /// How many callers.
    pub callers: usize,
    /// Simulated ms between one caller's calls.
    pub every_ms: f64,
}

/// What [`soonest`] measured.
#[derive(Debug)]
pub struct Soonest {
    /// Each call's wait, simulated ms, in the order they were served.
    pub waits_ms: Vec<f64>,
    /// Calls the upstream would not serve before the run ended (their wait
    /// up to then is in `waits_ms`: a lower bound).
    pub unserved: u64,
    /// The org's counters at the end, as `/_sim/stats` shows them.
    pub stats: serde_json::Value,
}

/// Steps in which [`soonest`] looks for the moment the upstream would
/// serve a call: fine while the wait is short (the scenario's target is
/// 50 ms), coarser after.
const FINE_STEP_MS: f64 = 1.0;
const FINE_FOR_MS: f64 = 100.0;
const COARSE_STEP_MS: f64 = 25.0;

/// Plays `until_ms` simulated ms of org `org` with nothing of the fleet but
/// `pollers`' calls to family `family`, each sent the soonest moment the
/// upstream would serve it and, played on a window further with nothing
/// more sent, would refuse the unmanaged consumer nothing it would not
/// have refused anyway (tried on copies of the org, so the fleet is never
/// refused; first come, first served): about the least any broker that
/// leaves the consumer its calls could make them wait, with no other call
/// of its own in their way. (Each call is checked alone: a later call may
/// still take what the consumer needed, which the consumer's refusals
/// then show.) Each wait is found to within 1 ms while it is under
/// 100 ms, 25 ms after.
pub fn soonest(
    config: &SimConfig,
    org: &str,
    family: &str,
    pollers: Pollers,
    until_ms: u64,
) -> Result<Soonest, SimError> {
    if pollers.callers == 0 || !(pollers.every_ms.is_finite() && pollers.every_ms >= 1.0) {
        return Err(SimError::Config(vec![format!(
            "pollers need at least one caller and at least 1 ms between calls, got {} every {} ms",
            pollers.callers, pollers.every_ms
        )]));
    }
    let (mut sim, index) = org_family(config, org, family)?;
    let window = sim.left(0.0, index).map_or(60_000, |(_, w)| w) as f64;
    let end = until_ms as f64;
    let every = pollers.every_ms;
    let phase = |i: usize| every * i as f64 / pollers.callers as f64;
    // Each caller's next moment, as an index of its moments.
    let mut next: Vec<f64> = vec![0.0; pollers.callers];
    let due = |next: &[f64], i: usize| phase(i) + next[i] * every;
    let (mut waits_ms, mut unserved, mut last_served) = (Vec::new(), 0, 0.0_f64);
    // The caller due first, while its moment is within the run.
    let first = |next: &[f64]| {
        (0..pollers.callers)
            .map(|i| (i, due(next, i)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .filter(|&(_, at)| at < end)
    };
    while let Some((i, at)) = first(&next) {
        let mut t = at.max(last_served);
        loop {
            if t >= end {
                unserved += 1;
                break;
            }
            if serves_leaving_the_consumer(&sim, index, t, window) {
                if let Ok(slots) = sim.admit_to(t, CLIENT, &[index], || Ok(())).verdict {
                    sim.release(&slots);
                }
                break;
            }
            t += if t - at < FINE_FOR_MS {
                FINE_STEP_MS
            } else {
                COARSE_STEP_MS
            };
        }
        waits_ms.push(t.min(end) - at);
        last_served = t;
        // The caller's next moment at or after its call was served.
        next[i] = ((t - phase(i)) / every).ceil().max(next[i] + 1.0);
    }
    Ok(Soonest {
        waits_ms,
        unserved,
        stats: stats(&mut sim, end, org)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn windows(stats: &serde_json::Value) -> &Vec<serde_json::Value> {
        stats["families"][0]["windows"].as_array().unwrap()
    }

    fn sum(windows: &[serde_json::Value], key: &str) -> u64 {
        windows.iter().map(|w| w[key].as_u64().unwrap()).sum()
    }

    const ORG: &str = "[[orgs]]\nid = \"o\"\n\n  [[orgs.families]]\n  name = \"f\"\n  \
                       routes = [\"GET /x\"]\n  documented_permits = 60\n  window_ms = 60000\n";

    #[test]
    fn all_that_is_left_of_a_fixed_window_is_served_and_a_pace_over_it_is_refused() {
        let config = SimConfig::from_toml(&format!(
            "{ORG}  hidden_permits = 30\n  schedule = [{{ at_ms = 120000, hidden_permits = 20 }}]\n"
        ))
        .unwrap();
        let all = paced(&config, "o", "f", 1.0, 0, 300_000).unwrap();
        let w = windows(&all);
        assert_eq!(sum(w, "served_fleet"), 30 + 30 + 20 + 20 + 20, "{all}");
        assert_eq!(sum(w, "refused_fleet"), 0, "{all}");
        let over = paced(&config, "o", "f", 1.3, 0, 300_000).unwrap();
        let w = windows(&over);
        // What each window enforces served; the call over it refused and
        // the pace held back until the window's end.
        assert_eq!(sum(w, "served_fleet"), 120, "{over}");
        assert!(sum(w, "refused_fleet") >= 5, "{over}");
    }

    #[test]
    fn a_rise_followed_late_is_served_late_and_a_drop_at_once() {
        let rising = SimConfig::from_toml(&format!(
            "{ORG}  hidden_permits = 20\n  schedule = [{{ at_ms = 120000, hidden_permits = 40 }}]\n"
        ))
        .unwrap();
        let served = |config: &SimConfig, late_ms| {
            let stats = paced(config, "o", "f", 1.0, late_ms, 300_000).unwrap();
            let w = windows(&stats);
            (sum(w, "served_fleet"), sum(w, "refused_fleet"))
        };
        // The rise's window loses at most the call its first interval, at
        // the old pace, put off.
        let (now, refused) = served(&rising, 0);
        assert!((159..=160).contains(&now), "served {now}");
        assert_eq!(refused, 0);
        // Found a window late, the rise's first window is paced at the old
        // limit.
        let (late, refused) = served(&rising, 60_000);
        assert!((139..=140).contains(&late), "served {late}");
        assert_eq!(refused, 0);
        let (later, _) = served(&rising, 120_000);
        assert!((119..=120).contains(&later), "served {later}");
        let dropping = SimConfig::from_toml(&format!(
            "{ORG}  hidden_permits = 30\n  schedule = [{{ at_ms = 120000, hidden_permits = 20 }}]\n"
        ))
        .unwrap();
        assert_eq!(served(&dropping, 60_000), served(&dropping, 0));
        assert_eq!(served(&dropping, 0), (30 + 30 + 20 + 20 + 20, 0));
    }

    #[test]
    fn on_a_sliding_log_an_even_pace_refuses_a_bursty_consumer_what_it_leaves_on_average() {
        // 30 in any 60 s, the consumer 10 a window in one burst: 20 are
        // left a window, yet a span holding two bursts leaves 10.
        let config = SimConfig::from_toml(&format!(
            "{ORG}  hidden_permits = 30\n  kind = \"sliding_log\"\n  \
             unmanaged = [{{ at_ms = 0, per_window = 10 }}]\n  unmanaged_pattern = \"bursty\"\n"
        ))
        .unwrap();
        let at = |share| {
            let stats = paced(&config, "o", "f", share, 0, 600_000).unwrap();
            let w = windows(&stats);
            (sum(w, "served_fleet"), sum(w, "refused_unmanaged"))
        };
        assert_eq!(at(0.5), (100, 0));
        let (served, refused) = at(1.0);
        assert!(served >= 190, "served {served}");
        assert!(refused > 0, "an even 20 a minute left every burst room");
    }

    const WALLBOARDS: Pollers = Pollers {
        callers: 3,
        every_ms: 10_000.0,
    };

    #[test]
    fn calls_alone_wait_only_where_the_upstream_leaves_them_less_than_they_ask() {
        // 18 calls a minute; a fixed window of 12: six a window wait for
        // its end, the rest are served at once.
        let tight = SimConfig::from_toml(&format!("{ORG}  hidden_permits = 12\n")).unwrap();
        let run = soonest(&tight, "o", "f", WALLBOARDS, 300_000).unwrap();
        let at_once = run.waits_ms.iter().filter(|&&w| w == 0.0).count();
        let w = windows(&run.stats);
        assert_eq!(sum(w, "refused_fleet"), 0, "{:?}", run.stats);
        // Five windows of 12 served; the calls still waiting for the sixth
        // when the run ends are unserved, counted with their wait so far.
        assert_eq!(sum(w, "served_fleet"), 60, "{:?}", run.stats);
        assert_eq!(run.waits_ms.len() as u64, 60 + run.unserved);
        assert!((1..=3).contains(&run.unserved), "{}", run.unserved);
        // The first window's 12 at once; after it, what waited for a reset
        // takes part of the next window, and callers skip the moments passed.
        assert!((20..60).contains(&at_once), "{:?}", run.waits_ms);
        assert!(
            run.waits_ms.iter().any(|&w| w > 5_000.0),
            "{:?}",
            run.waits_ms
        );
        // A token bucket refilled at 28 a minute with 15 stored, a steady
        // consumer taking 10: the 18 left are exactly what the callers ask,
        // and sent alone they never wait.
        let even = SimConfig::from_toml(&format!(
            "{ORG}  hidden_permits = 28\n  kind = \"token_bucket\"\n  burst = 15\n  \
             unmanaged = [{{ at_ms = 0, per_window = 10 }}]\n"
        ))
        .unwrap();
        let run = soonest(&even, "o", "f", WALLBOARDS, 600_000).unwrap();
        assert_eq!(run.waits_ms.len(), 180);
        assert!(run.waits_ms.iter().all(|&w| w == 0.0), "{:?}", run.waits_ms);
        assert_eq!(
            sum(windows(&run.stats), "refused_unmanaged"),
            0,
            "{:?}",
            run.stats
        );
    }

    #[test]
    fn calls_alone_wait_rather_than_take_what_a_bursty_consumer_needs() {
        // 30 in any 60 s, the consumer's 10 a window in one burst: 20 left
        // on average, more than the callers' 18, yet a span holding two
        // bursts leaves 10, and calls sent at once would take from them.
        let config = SimConfig::from_toml(&format!(
            "{ORG}  hidden_permits = 30\n  kind = \"sliding_log\"\n  \
             unmanaged = [{{ at_ms = 0, per_window = 10 }}]\n  unmanaged_pattern = \"bursty\"\n"
        ))
        .unwrap();
        let run = soonest(&config, "o", "f", WALLBOARDS, 600_000).unwrap();
        let w = windows(&run.stats);
        assert_eq!(sum(w, "refused_unmanaged"), 0, "{:?}", run.stats);
        assert_eq!(sum(w, "refused_fleet"), 0, "{:?}", run.stats);
        let longest = run.waits_ms.iter().copied().fold(0.0, f64::max);
        assert!(longest > 5_000.0, "{:?}", run.waits_ms);
        // Most are served at once all the same.
        let at_once = run.waits_ms.iter().filter(|&&w| w == 0.0).count();
        assert!(at_once * 2 > run.waits_ms.len(), "{:?}", run.waits_ms);
    }

    #[test]
    fn unknown_names_and_bad_shares_say_what_is_wrong() {
        let config = SimConfig::from_toml(ORG).unwrap();
        let e = paced(&config, "p", "f", 1.0, 0, 60_000)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no org \"p\""), "{e}");
        let e = paced(&config, "o", "g", 1.0, 0, 60_000)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no family \"g\""), "{e}");
        let e = paced(&config, "o", "f", 0.0, 0, 60_000)
            .unwrap_err()
            .to_string();
        assert!(e.contains("above 0"), "{e}");
        let nobody = Pollers {
            callers: 0,
            every_ms: 1.0,
        };
        let e = soonest(&config, "o", "f", nobody, 60_000)
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least one caller"), "{e}");
        let e = soonest(&config, "p", "f", WALLBOARDS, 60_000)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no org \"p\""), "{e}");
    }
}
