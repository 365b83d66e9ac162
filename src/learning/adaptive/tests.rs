use super::*;

const SEC: Duration = Duration::from_secs(1);

fn learner(now: Instant) -> Learner {
    Learner::new(60.0, Duration::from_secs(60), now)
}

#[test]
fn a_wave_of_identical_429s_cuts_once() {
    let s = LearnSettings::default();
    let t0 = Instant::now();
    let mut l = learner(t0);
    let mut cuts = 0;
    for i in 0..20 {
        let out = l.on_throttled(
            t0 + Duration::from_millis(i * 50),
            Some(15 * SEC),
            false,
            &s,
        );
        cuts += out
            .iter()
            .filter(|c| matches!(c, Learned::Cut { .. }))
            .count();
    }
    assert_eq!(cuts, 1);
    assert!((l.rate(t0, &s) - 42.0).abs() < 1e-9);
    assert!(l.frozen_until(t0).is_some_and(|f| f >= t0 + 15 * SEC));
    // After the episode, a new 429 is a new episode.
    let later = t0 + 20 * SEC;
    let out = l.on_throttled(later, Some(SEC), false, &s);
    assert!(out.iter().any(|c| matches!(c, Learned::Cut { .. })));
}

#[test]
fn an_operators_raise_applies_at_once_unless_a_429_cut_the_rate() {
    let s = LearnSettings::default();
    let t0 = Instant::now();
    let minute = Duration::from_secs(60);
    let mut l = learner(t0);
    // Lowered, then raised: nothing was learned, the rate follows.
    l.set_configured(30.0, minute);
    assert_eq!(l.rate(t0, &s), 30.0);
    l.set_configured(240.0, minute);
    assert_eq!(l.rate(t0, &s), 240.0);
    // A 429 cut it: a raise keeps the cut (it regrows from there).
    l.on_throttled(t0, Some(SEC), false, &s);
    let cut = l.rate(t0 + 2 * SEC, &s);
    assert!(cut < 240.0, "{cut}");
    l.set_configured(480.0, minute);
    assert_eq!(l.rate(t0 + 2 * SEC, &s), cut);
}

#[test]
fn a_429_without_retry_after_freezes_for_the_default() {
    let s = LearnSettings::default();
    let t0 = Instant::now();
    let mut l = learner(t0);
    l.on_throttled(t0, None, false, &s);
    assert_eq!(l.frozen_until(t0), Some(t0 + s.default_freeze));
    assert_eq!(l.frozen_until(t0 + s.default_freeze), None);
}

#[test]
fn a_429_with_the_budget_spent_freezes_without_cutting() {
    let s = LearnSettings::default();
    let t0 = Instant::now();
    let mut l = learner(t0);
    let out = l.on_throttled(t0, Some(20 * SEC), true, &s);
    assert_eq!(
        out,
        [Learned::Frozen {
            until: t0 + 20 * SEC
        }]
    );
    assert_eq!(l.rate(t0, &s), 60.0);
}

#[test]
fn success_regrows_additively_up_to_the_configured_rate() {
    let s = LearnSettings {
        probe_hold_windows: 0.0,
        ratio_threshold: 0.0,
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut l = learner(t0);
    l.on_throttled(t0, Some(SEC), false, &s);
    let cut = l.rate(t0, &s);
    // Frozen and in the episode: no growth.
    l.on_success(t0 + SEC / 2, &s);
    assert_eq!(l.rate(t0, &s), cut);
    let mut t = t0 + 4 * SEC;
    l.on_success(t, &s);
    for _ in 0..60 {
        t += SEC;
        l.on_success(t, &s);
    }
    // One window of successes regrows configured / recovery_windows.
    let grown = l.rate(t, &s) - cut;
    assert!(
        (grown - 60.0 / s.recovery_windows).abs() < 0.5,
        "grew {grown}"
    );
    for _ in 0..600 {
        t += SEC;
        l.on_success(t, &s);
    }
    assert_eq!(l.rate(t, &s), 60.0);
}

/// `n` successes evenly spread over `[from, from + over)`.
fn successes(l: &mut Learner, from: Instant, over: Duration, n: u32, s: &LearnSettings) {
    for k in 0..n {
        l.on_success(from + over * k / n, s);
    }
}

#[test]
fn a_429_cuts_to_what_the_upstream_window_served() {
    let s = LearnSettings::default();
    let t0 = Instant::now();
    let mut l = learner(t0);
    // The upstream window is [0 s, 60 s): 36 served in its first 40 s,
    // then a 429 saying it resets in 20 s.
    successes(&mut l, t0, 40 * SEC, 36, &s);
    let out = l.on_throttled(t0 + 40 * SEC, Some(20 * SEC), false, &s);
    assert!(
        out.iter()
            .any(|c| matches!(c, Learned::Cut { to, .. } if (to - 35.0).abs() < 1e-9)),
        "{out:?}"
    );
    // Successes before the window began do not count: 20 more served
    // from 60 s, in a window that now holds only 21.
    let t1 = t0 + 60 * SEC;
    successes(&mut l, t1, 30 * SEC, 20, &s);
    let mut l2 = l.clone();
    l.on_throttled(t1 + 30 * SEC, Some(30 * SEC), false, &s);
    // 19 is above two β steps from 35 (17.2): taken as measured.
    assert!((l.rate(t1 + 30 * SEC, &s) - 19.0).abs() < 1e-9);
    // A Retry-After longer than the window says nothing of the window.
    l2.on_throttled(t1 + 30 * SEC, Some(90 * SEC), false, &s);
    assert!((l2.rate(t1 + 30 * SEC, &s) - 35.0 * s.beta).abs() < 1e-9);
}

#[test]
fn a_window_fill_cuts_at_most_two_beta_steps_and_at_least_one_permit() {
    let s = LearnSettings::default();
    let t0 = Instant::now();
    let mut l = learner(t0);
    // Only 2 served before the 429: one odd window does not crash the rate.
    successes(&mut l, t0, SEC, 2, &s);
    l.on_throttled(t0 + 5 * SEC, Some(55 * SEC), false, &s);
    assert!((l.rate(t0, &s) - 60.0 * s.beta * s.beta).abs() < 1e-9);
    // 80 served at 60/min (a burst carried over): still one permit less.
    let mut l = learner(t0);
    successes(&mut l, t0, 50 * SEC, 80, &s);
    l.on_throttled(t0 + 50 * SEC, Some(10 * SEC), false, &s);
    assert!((l.rate(t0, &s) - 59.0).abs() < 1e-9);
}

#[test]
fn after_a_cut_growth_waits_for_the_hold_and_enough_calls() {
    let s = LearnSettings::default();
    let t0 = Instant::now();
    let mut l = learner(t0);
    successes(&mut l, t0, 40 * SEC, 36, &s);
    l.on_throttled(t0 + 40 * SEC, Some(20 * SEC), false, &s);
    let cut = l.rate(t0, &s);
    // Three windows after the reset (60 s + 180 s) at 35 calls a window:
    // held, even though 100 calls have been made by then.
    let mut t = t0 + 60 * SEC;
    successes(&mut l, t, 180 * SEC, 105, &s);
    t += 180 * SEC;
    assert_eq!(l.rate(t, &s), cut);
    // Past the hold, growth resumes, one window's worth per window.
    successes(&mut l, t, 60 * SEC, 35, &s);
    let grown = l.rate(t + 60 * SEC, &s) - cut;
    assert!(grown > 10.0 && grown <= 12.0 + 1e-9, "grew {grown}");

    // Past the hold but fewer than 1/ratio_threshold calls: still held.
    let mut l = learner(t0);
    successes(&mut l, t0, 40 * SEC, 36, &s);
    l.on_throttled(t0 + 40 * SEC, Some(20 * SEC), false, &s);
    successes(&mut l, t0 + 60 * SEC, 300 * SEC, 60, &s);
    assert_eq!(l.rate(t0 + 360 * SEC, &s), cut);
}

#[test]
fn never_below_the_floor() {
    let s = LearnSettings::default();
    let mut t = Instant::now();
    let mut l = learner(t);
    for _ in 0..100 {
        l.on_throttled(t, Some(SEC), false, &s);
        t += 10 * SEC;
    }
    assert_eq!(l.rate(t, &s), 60.0 * s.floor_fraction);
}

/// The floor bounds the learner's own cuts, not what the upstream
/// stated: 2 per 6 s (20/min) where 1200/min is configured and the
/// floor is 60/min is granted at 20/min, also after 429s.
#[test]
fn a_stated_limit_below_the_floor_wins_over_it() {
    let s = LearnSettings::default();
    let t0 = Instant::now();
    let mut l = Learner::new(1200.0, Duration::from_secs(6), t0);
    assert_eq!(l.rate(t0, &s), 1200.0);
    assert!(l.on_limit(20.0).is_some());
    assert_eq!(l.rate(t0, &s), 20.0);
    let mut t = t0;
    for _ in 0..20 {
        t += 10 * SEC;
        l.on_throttled(t, Some(SEC), false, &s);
    }
    assert_eq!(l.rate(t, &s), 20.0);
    // Without a stated limit the cuts stop at the floor.
    assert!(l.on_limit(1200.0).is_none());
    assert_eq!(l.rate(t, &s), 1200.0 * s.floor_fraction);
}

#[test]
fn ratio_backstop_cuts_20_percent_and_holds() {
    let s = LearnSettings::default();
    let t0 = Instant::now();
    let mut l = learner(t0);
    let ms = |m: u64| t0 + Duration::from_millis(m);
    for i in 0..100 {
        l.on_success(ms(i * 100), &s);
    }
    // 1 of 101: below 1%, a plain cut (the window served 100, so one
    // permit); a second report of the wave.
    l.on_throttled(ms(10_000), Some(SEC), false, &s);
    assert!((l.rate(ms(10_000), &s) - 59.0).abs() < 1e-9);
    l.on_throttled(ms(10_100), Some(SEC), false, &s);
    assert!(l.cooldown_until(ms(10_100)).is_none());
    // A new episode while 3 of 104 (2.9%) were 429s: the backstop cuts
    // what the episode's own cut left by a further 20%.
    l.on_success(ms(19_000), &s);
    let mut plain = l.clone();
    let no_backstop = LearnSettings {
        ratio_threshold: 1.0,
        ..s
    };
    plain.on_throttled(ms(20_000), Some(SEC), false, &no_backstop);
    l.on_throttled(ms(20_000), Some(SEC), false, &s);
    let t = ms(20_000);
    assert!(
        (l.rate(t, &s) - plain.rate(t, &s) * 0.8).abs() < 1e-9,
        "{} vs {}",
        l.rate(t, &s),
        plain.rate(t, &s)
    );
    assert!(l.cooldown_until(t).is_some());
    assert!((l.throttle_ratio(t, &s) - 3.0 / 104.0).abs() < 1e-9);
    let held = l.rate(t, &s);
    // Successes for ten minutes: held during the cooldown.
    let mut now = t + 5 * SEC;
    for _ in 0..600 {
        now += SEC;
        l.on_success(now, &s);
    }
    assert!((l.rate(now, &s) - held).abs() < 1e-9);
    // The ratio window forgot the 429s.
    assert_eq!(l.throttle_ratio(now, &s), 0.0);
    let after = t + s.cooldown + SEC;
    l.on_success(after, &s);
    l.on_success(after + 60 * SEC, &s);
    assert!(l.rate(after + 60 * SEC, &s) > held);
}

#[test]
fn learned_limit_caps_and_clears() {
    let s = LearnSettings::default();
    let t0 = Instant::now();
    let mut l = learner(t0);
    assert!(l.on_limit(45.0).is_some());
    assert!(l.on_limit(45.0).is_none(), "unchanged is not news");
    assert_eq!(l.rate(t0, &s), 45.0);
    assert!(l.on_limit(60.0).is_none());
    assert_eq!(l.rate(t0, &s), 60.0);
    assert_eq!(l.learned_limit(), None);
}

#[test]
fn persisted_state_restores() {
    let s = LearnSettings::default();
    let t0 = Instant::now();
    let mut l = learner(t0);
    l.on_limit(50.0);
    l.on_throttled(t0, Some(30 * SEC), false, &s);
    let mut fresh = learner(t0);
    fresh.restore(l.persisted());
    assert_eq!(fresh.rate(t0, &s), l.rate(t0, &s));
    assert_eq!(fresh.frozen_until(t0), l.frozen_until(t0));
    assert_eq!(fresh.learned_limit(), Some(50.0));
}

#[test]
fn the_ceiling_memory_survives_a_restart() {
    let s = LearnSettings::default();
    let t0 = Instant::now();
    let mut l = learner(t0);
    // Refused at about 45, confirmed once.
    (l.ceiling, l.ceiling_hits) = (Some(45.0), 1);
    // And seen refilling continuously.
    l.on_throttled(t0, Some(SEC), false, &s);
    l.on_throttled(t0 + 10 * SEC, Some(SEC), false, &s);
    assert!(l.refills_continuously());
    (l.ceiling, l.ceiling_hits) = (Some(45.0), 1);
    let p = l.persisted();
    assert_eq!(p.ceiling, Some((45.0, 1)));
    let mut fresh = learner(t0);
    assert!(!fresh.refills_continuously());
    fresh.restore(p);
    assert_eq!((fresh.ceiling, fresh.ceiling_hits), (Some(45.0), 1));
    assert!(fresh.refills_continuously());
    // So regrowth after the restart stops below it, as before it.
    let grown = fresh.ceiling_growth(40.0, 12.0, t0, &s);
    assert_eq!(grown, Some(45.0 * 0.95));
}

/// A fleet paced by the learner against a fixed-window upstream whose
/// capacity per window is `capacity(window)`, one step a second for
/// `windows` windows: (429s, successes) per window.
fn drive(s: &LearnSettings, windows: u64, capacity: impl Fn(u64) -> u64) -> Vec<(u64, u64)> {
    let t0 = Instant::now();
    let mut l = learner(t0);
    let mut out = vec![(0, 0); windows as usize];
    let mut credit = 0.0;
    for sec in 0..windows * 60 {
        let now = t0 + SEC * sec as u32;
        let w = (sec / 60) as usize;
        if l.frozen_until(now).is_some() {
            credit = 0.0;
            continue;
        }
        credit += l.rate(now, s) / 60.0;
        while credit >= 1.0 {
            credit -= 1.0;
            if out[w].1 < capacity(w as u64) {
                out[w].1 += 1;
                l.on_success(now, s);
            } else {
                out[w].0 += 1;
                let reset = SEC * (60 - (sec % 60)) as u32;
                l.on_throttled(now, Some(reset), false, s);
                credit = 0.0;
                break;
            }
        }
    }
    out
}

#[test]
fn a_confirmed_ceiling_is_probed_less_and_less_often() {
    let s = LearnSettings::default();
    let run = drive(&s, 120, |_| 45);
    let late: Vec<u64> = run[20..].iter().map(|w| w.0).collect();
    let throttled: u64 = late.iter().sum();
    let served: u64 = run[20..].iter().map(|w| w.1).sum();
    // 100 windows at a steady 45: one probe at most every
    // probe_max_windows (8) once confirmed.
    assert!(throttled <= 100 / 8 + 1, "429s per window: {late:?}");
    assert!(
        served as f64 >= 0.95 * 45.0 * 100.0,
        "served {served} of {}",
        45 * 100
    );
    // Without the memory (probing as soon as the hold ends, full step)
    // the same upstream refuses more.
    let forgetful = LearnSettings {
        probe_max_windows: 0.0,
        ..s
    };
    let more: u64 = drive(&forgetful, 120, |_| 45)[20..]
        .iter()
        .map(|w| w.0)
        .sum();
    assert!(more > throttled, "{more} vs {throttled}");
}

/// A fleet paced by the learner against a token bucket of `capacity`
/// (full at the start) refilled at `refill` a minute, shared with a
/// steady unmanaged consumer of `unmanaged` a minute; Retry-After is the
/// time to the next permit in whole seconds, rounded up. Steps of 100 ms
/// for `windows` windows: (429s, successes) per window and the rate at
/// the end.
fn drive_bucket(
    s: &LearnSettings,
    windows: u64,
    (capacity, refill, unmanaged): (f64, f64, f64),
) -> (Vec<(u64, u64)>, f64) {
    drive_bucket_by(s, windows, capacity, |_| refill, unmanaged)
}

/// `drive_bucket` with a refill a minute that is `refill(window)`.
fn drive_bucket_by(
    s: &LearnSettings,
    windows: u64,
    capacity: f64,
    refill: impl Fn(u64) -> f64,
    unmanaged: f64,
) -> (Vec<(u64, u64)>, f64) {
    let t0 = Instant::now();
    let mut l = learner(t0);
    let mut out = vec![(0, 0); windows as usize];
    let (mut level, mut credit, mut theirs) = (capacity, 0.0, 0.0);
    let step = Duration::from_millis(100);
    for k in 0..windows * 600 {
        let now = t0 + step * k as u32;
        let w = (k / 600) as usize;
        let refill = refill(w as u64);
        level = (level + refill / 600.0).min(capacity);
        theirs += unmanaged / 600.0;
        if theirs >= 1.0 && level >= 1.0 {
            theirs -= 1.0;
            level -= 1.0;
        }
        if l.frozen_until(now).is_some() {
            credit = 0.0;
            continue;
        }
        credit += l.rate(now, s) / 600.0;
        if credit >= 1.0 {
            credit -= 1.0;
            if level >= 1.0 {
                level -= 1.0;
                out[w].1 += 1;
                l.on_success(now, s);
            } else {
                out[w].0 += 1;
                let wait = ((1.0 - level) * 60.0 / refill).ceil().max(1.0);
                l.on_throttled(now, Some(Duration::from_secs_f64(wait)), false, s);
                credit = 0.0;
            }
        }
    }
    let end = t0 + step * (windows * 600) as u32;
    (out, l.rate(end, s))
}

#[test]
fn refusals_within_the_window_the_last_one_implied_cut_to_the_refill() {
    let s = LearnSettings::default();
    // Token buckets that start full, refilled continuously, shared with
    // a steady consumer that is not the fleet's: (capacity, refill,
    // theirs) a minute, and what that leaves the fleet.
    for (bucket, left) in [
        ((45.0, 45.0, 15.0), 30.0),
        ((60.0, 50.0, 15.0), 35.0),
        ((20.0, 45.0, 15.0), 30.0),
        ((45.0, 45.0, 0.0), 45.0),
    ] {
        let (run, rate) = drive_bucket(&s, 6, bucket);
        let throttled: u64 = run.iter().map(|w| w.0).sum();
        // The first refusal's window fill is inflated by the full
        // bucket; the next refusals come within the window it implied
        // and cut to what was served between refusals: no cascade of
        // cuts to a window fill that is still draining the bucket.
        assert!(throttled <= 4, "{bucket:?}: 429s per window: {run:?}");
        assert!(rate <= left + 1.0, "{bucket:?}: rate {rate}");
        // Once the bucket is drained, each window serves nearly all
        // that is left, not the measure of a refill cut short by the
        // freezes (28 of 30, 28 of 35, 26 of 30).
        assert!(
            run.iter().skip(3).all(|w| w.1 as f64 >= 0.9 * left),
            "{bucket:?}: (429s, served) per window: {run:?}"
        );
    }
}

#[test]
fn a_long_freeze_is_not_counted_as_time_the_upstream_refilled() {
    let s = LearnSettings::default();
    let t0 = Instant::now();
    let mut l = learner(t0);
    // A sliding log overfull after a drop: nothing for 30 s, then 30 a
    // minute as entries age out, until it refuses again.
    l.on_throttled(t0 + 10 * SEC, Some(30 * SEC), false, &s);
    for k in 0..6u32 {
        l.on_success(t0 + (41 + 2 * k) * SEC, &s);
    }
    let out = l.on_throttled(t0 + 52 * SEC, Some(2 * SEC), false, &s);
    let to = out.iter().find_map(|x| match x {
        Learned::Cut { to, .. } => Some(*to),
        _ => None,
    });
    // 6 served from a second before the freeze ended: 27.7 a minute,
    // not 6 over the 42 s since the first refusal (8.6).
    assert!(to.is_some_and(|r| (26.0..=32.0).contains(&r)), "{out:?}");
}

#[test]
fn only_a_straggler_of_the_episode_that_cut_restarts_the_measure() {
    let s = LearnSettings::default();
    let t0 = Instant::now();
    let mut l = learner(t0);
    l.on_throttled(t0, Some(SEC), false, &s);
    // A later episode that cut nothing (the budget the headers showed
    // spent), and a straggler of it.
    l.on_throttled(t0 + 30 * SEC, Some(45 * SEC), true, &s);
    l.on_throttled(t0 + 31 * SEC, Some(44 * SEC), true, &s);
    // A 429 whose implied window began after the cut but before that
    // straggler: no refusal of a descent came inside it.
    l.on_throttled(t0 + 79 * SEC, Some(SEC), false, &s);
    assert!(!l.refills_continuously());
}

#[test]
fn the_calls_a_freeze_released_at_a_reset_count_in_the_window_it_began() {
    let s = LearnSettings::default();
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut l = learner(t0);
    // A fixed window resets at 60 s; the 429's report reached the
    // broker 30 ms after the upstream answered, so the freeze ends at
    // 59.97 s and releases 3 queued calls then.
    l.on_throttled(t0 + 40 * SEC, Some(ms(19_970)), false, &s);
    for _ in 0..3 {
        l.on_success(t0 + ms(59_980), &s);
    }
    for k in 0..27u32 {
        l.on_success(t0 + ms(62_000 + 1_000 * u64::from(k)), &s);
    }
    // The next refusal's report lags 20 ms less: the window it
    // implies starts at 59.99 s, 10 ms after the 3 released calls.
    let out = l.on_throttled(t0 + 100 * SEC, Some(ms(19_990)), false, &s);
    let to = out.iter().find_map(|x| match x {
        Learned::Cut { to, .. } => Some(*to),
        _ => None,
    });
    // 30 served in the window: cut to 29, not to the 26 of the share
    // of their slot after 59.99 s.
    assert!(to.is_some_and(|r| (r - 29.0).abs() < 0.5), "{out:?}");
}

#[test]
fn a_rise_above_a_confirmed_ceiling_is_still_found() {
    let s = LearnSettings::default();
    let run = drive(&s, 80, |w| if w < 40 { 40 } else { 55 });
    // Found within probe_max_windows and a few windows of growth.
    let found = run[40..].iter().position(|w| w.1 >= 50).map(|i| i + 40);
    assert!(
        found.is_some_and(|w| w <= 40 + 8 + 4),
        "served per window: {:?}",
        run.iter().map(|w| w.1).collect::<Vec<_>>()
    );
}

/// At a low rate the hold's call budget (1/`ratio_threshold`
/// successful calls after a cut), not its windows, paces the probes:
/// on fixed windows of 16 a minute, 100 calls are 6 windows. A
/// smaller budget finds a rise sooner and pays for it in 429s.
#[test]
fn at_a_low_rate_the_call_budget_trades_429s_for_finding_a_rise() {
    let s = LearnSettings::default();
    let half = LearnSettings {
        ratio_threshold: 0.02,
        ..s
    };
    let steady = |s: &LearnSettings| {
        let run = drive(s, 120, |_| 16);
        let throttled: u64 = run[20..].iter().map(|w| w.0).sum();
        let served: u64 = run[20..].iter().map(|w| w.1).sum();
        (throttled, served)
    };
    let found = |s: &LearnSettings| {
        let run = drive(s, 60, |w| if w < 10 { 16 } else { 24 });
        run[10..].iter().position(|w| w.1 >= 22)
    };
    let ((cost, served), (cost_half, _)) = (steady(&s), steady(&half));
    let (rise, rise_half) = (found(&s), found(&half));
    // Over 100 windows: 14 429s (0.9 % of the calls), 95 % served; a
    // rise to 24 found 6 windows after it. Half the budget: 21 and 4.
    assert!(
        cost <= 15 && served >= 1_500,
        "{cost} 429s, {served} served"
    );
    assert!(rise.is_some_and(|w| w <= 6), "{rise:?}");
    assert!(cost_half > cost, "{cost_half} vs {cost}");
    assert!(
        rise_half.zip(rise).is_some_and(|(h, r)| h < r),
        "{rise_half:?} vs {rise:?}"
    );
}

/// On a token bucket the permits stored while the fleet cruised below the
/// refill pay for a probe for a while: the probe passes the ceiling
/// without a 429 and is refused well above it. What the upstream served
/// since its previous refusal tells that no rise was found: the ceiling
/// is confirmed and probed less and less often, as on fixed windows.
/// Over the 100 windows counted: 8, 8 and 8 429s (10, 26 and 18 when the
/// 429's rate was remembered as the ceiling).
#[test]
fn a_confirmed_ceiling_is_probed_less_and_less_often_on_a_token_bucket() {
    let s = LearnSettings::default();
    for bucket in [(45.0, 45.0, 15.0), (60.0, 50.0, 15.0), (45.0, 45.0, 0.0)] {
        let left = bucket.1 - bucket.2;
        let (run, _) = drive_bucket(&s, 120, bucket);
        let late: Vec<u64> = run[20..].iter().map(|w| w.0).collect();
        let throttled: u64 = late.iter().sum();
        let served: u64 = run[20..].iter().map(|w| w.1).sum();
        assert!(
            throttled <= 100 / 8 + 1,
            "{bucket:?}: 429s per window: {late:?}"
        );
        assert!(
            served as f64 >= 0.95 * left * 100.0,
            "{bucket:?}: served {served} of {}",
            left * 100.0
        );
    }
}

/// What a continuous upstream served since its previous refusal reads
/// low after a rise (the old refill and the overflow of a bucket the
/// fleet left full are in it): a measure above the ceiling a probe passed
/// is a rise, not a confirmation. A bucket of 45 refilled at 40 a minute,
/// the fleet alone, rising to 50 at window 40: back to serving 45 or more
/// by window 48 (with every measure up to 15 % above counted as a
/// confirmation: 43–44 a window until window 61).
#[test]
fn a_rise_on_a_token_bucket_is_found_within_eight_windows() {
    let s = LearnSettings::default();
    let (run, _) = drive_bucket_by(&s, 60, 45.0, |w| if w < 40 { 40.0 } else { 50.0 }, 0.0);
    let settled: Vec<u64> = run[48..56].iter().map(|w| w.1).collect();
    assert!(
        settled.iter().all(|&n| n >= 45),
        "served per window 48..56: {settled:?}"
    );
}

/// On an upstream seen refilling continuously, a 429 whose measure since
/// the last refusal says the upstream served the fleet at least the rate
/// refused is the empty bucket's jitter, not the rate's: the rate steps
/// down by a tenth of a permit, not a whole one. (A whole permit below a
/// class that asks exactly what is left starves it for the hold.)
#[test]
fn a_429_the_measure_does_not_blame_on_the_rate_cuts_a_tenth_of_a_permit() {
    let s = LearnSettings::default();
    let t0 = Instant::now();
    let mut l = learner(t0);
    let cut_to = |out: Vec<Learned>| {
        out.into_iter().find_map(|x| match x {
            Learned::Cut { to, .. } => Some(to),
            _ => None,
        })
    };
    l.on_throttled(t0 + 10 * SEC, Some(SEC), false, &s);
    // 10 served over the next 20 s, then refused again within the window
    // the first refusal implied: the descent measures about 28 a minute.
    for k in 0..10u32 {
        l.on_success(t0 + (12 + 2 * k) * SEC, &s);
    }
    let first = cut_to(l.on_throttled(t0 + 32 * SEC, Some(SEC), false, &s)).unwrap();
    assert!((26.0..31.0).contains(&first), "{first}");
    // The upstream then serves the fleet that rate and a little more
    // before it refuses again.
    for k in 0..12u32 {
        l.on_success(t0 + 34 * SEC + Duration::from_millis(1_700) * k, &s);
    }
    let second = cut_to(l.on_throttled(t0 + 55 * SEC, Some(SEC), false, &s)).unwrap();
    assert!(
        (first - second - 0.1).abs() < 1e-6,
        "{first} → {second}: a tenth of a permit"
    );
}
