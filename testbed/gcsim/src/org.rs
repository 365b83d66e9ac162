//! One simulated org's rate limiting: the per-token windows, the endpoint
//! families' windows (hidden limits, their schedule, the concurrency limit),
//! blocks and escalation, the unmanaged consumer, and the counters the
//! control plane reports. Plain Rust with simulated time passed in; the
//! HTTP side lives in `server`.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

use crate::config::{Family, LimitKind, OrgConfig, RetryAfter, UnmanagedPattern};

/// Why a request was refused, and when to come back (simulated ms).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Refusal {
    /// `token`, `family:<name>`, `concurrency:<name>`, `blocked:<what>`, or
    /// an endpoint's own (`jobs:running`, `jobs:submits`).
    pub(crate) reason: String,
    /// The documented limit the refusal is about (for the 429 body); None
    /// for a concurrency refusal, whose limit is documented nowhere.
    pub(crate) limit: Option<u64>,
    /// Simulated ms until the caller may try again.
    pub(crate) retry_after_ms: f64,
}

/// What the org answered one request.
#[derive(Debug)]
pub(crate) struct Decision {
    /// `Ok(families whose concurrency slot the request now holds)`.
    pub(crate) verdict: Result<Vec<usize>, Refusal>,
    /// What the `inin-ratelimit-*` headers say, if a limit that tells
    /// applies (`None`: no such headers).
    pub(crate) told: Option<Told>,
}

/// The `inin-ratelimit-*` headers: one limit, after this request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Told {
    /// `inin-ratelimit-allowed`: permits (a token bucket: its capacity).
    pub(crate) allowed: u64,
    /// `inin-ratelimit-count`: used now (a token bucket: tokens missing).
    pub(crate) count: u64,
    /// `inin-ratelimit-reset`: simulated ms until the window ends (a token
    /// bucket: until it is full; a sliding log: until its oldest request
    /// leaves it).
    pub(crate) reset_ms: f64,
}

impl Told {
    fn remaining(&self) -> u64 {
        self.allowed.saturating_sub(self.count)
    }
}

/// A family's admission state besides its windows' counts.
#[derive(Clone, Debug)]
enum Limiter {
    /// Fixed windows: the current window's served count is the state.
    Fixed,
    /// Tokens now (may be fractional), as of simulated ms `at`.
    Bucket { tokens: f64, at: f64 },
    /// When each request of the last window was served (fleet and
    /// unmanaged), oldest first.
    Log(VecDeque<f64>),
}

/// Float slack of the token bucket: a caller who waits the Retry-After it
/// was given finds the token there.
const EPSILON: f64 = 1e-6;

/// A block on a token or a family, with its escalation.
#[derive(Clone, Copy, Debug, Default)]
struct Block {
    /// Simulated ms; requests before it are refused.
    until: f64,
    /// The last penalty given for hammering (0: none since the block began).
    penalty: f64,
}

impl Block {
    /// At `now`: `Some(retry after)` if blocked, extending the block by the
    /// next penalty (hammering); `None` (and the penalty reset) if not.
    fn hammer(&mut self, now: f64, base: f64, max: f64) -> Option<f64> {
        if now < self.until {
            self.penalty = if self.penalty == 0.0 {
                base
            } else {
                (self.penalty * 2.0).min(max)
            };
            self.until = self.until.max(now + self.penalty);
            Some(self.until - now)
        } else {
            self.penalty = 0.0;
            None
        }
    }
}

/// One window of one family, as `/_sim/stats` reports it.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct WindowStats {
    pub(crate) index: u64,
    pub(crate) start_ms: u64,
    pub(crate) enforced_permits: u64,
    pub(crate) max_concurrent: Option<u64>,
    pub(crate) served_fleet: u64,
    pub(crate) served_unmanaged: u64,
    pub(crate) refused_fleet: u64,
    pub(crate) refused_unmanaged: u64,
}

impl WindowStats {
    fn served(&self) -> u64 {
        self.served_fleet + self.served_unmanaged
    }
}

/// A family's live state.
#[derive(Clone, Debug)]
struct FamilyState {
    family: Family,
    /// Enforced permits per window now.
    hidden: u64,
    max_concurrent: Option<u64>,
    in_flight: u64,
    /// The schedule's next step.
    next_step: usize,
    /// Set through the control plane; wins over the config's steps.
    unmanaged_override: Option<u64>,
    /// The unmanaged consumer's requests in the current window: planned, sent.
    unmanaged_planned: u64,
    unmanaged_sent: u64,
    /// Every window from 0 to the current one (never empty).
    windows: Vec<WindowStats>,
    block: Block,
    limiter: Limiter,
}

impl FamilyState {
    fn new(family: Family) -> FamilyState {
        let limiter = match family.kind {
            LimitKind::FixedWindow => Limiter::Fixed,
            // A fresh bucket is full.
            LimitKind::TokenBucket => Limiter::Bucket {
                tokens: family.burst.unwrap_or(family.hidden) as f64,
                at: 0.0,
            },
            LimitKind::SlidingLog => Limiter::Log(VecDeque::new()),
        };
        let mut state = FamilyState {
            limiter,
            hidden: family.hidden,
            max_concurrent: family.max_concurrent,
            family,
            in_flight: 0,
            next_step: 0,
            unmanaged_override: None,
            unmanaged_planned: 0,
            unmanaged_sent: 0,
            windows: Vec::new(),
            block: Block::default(),
        };
        state.open_window(0);
        state
    }

    fn current(&mut self) -> &mut WindowStats {
        let last = self.windows.len() - 1;
        &mut self.windows[last]
    }

    fn window_end(&self) -> f64 {
        (self.windows.len() as u64 * self.family.window_ms) as f64
    }

    /// Token bucket: its capacity.
    fn capacity(&self) -> f64 {
        self.family.burst.unwrap_or(self.hidden) as f64
    }

    /// Token bucket: tokens per simulated ms.
    fn rate(&self) -> f64 {
        self.hidden as f64 / self.family.window_ms as f64
    }

    /// Token bucket: adds the tokens earned up to `now`.
    fn refill(&mut self, now: f64) {
        let (capacity, rate) = (self.capacity(), self.rate());
        if let Limiter::Bucket { tokens, at } = &mut self.limiter {
            if now > *at {
                *tokens = (*tokens + (now - *at) * rate).min(capacity);
                *at = now;
            }
        }
    }

    /// `Ok` if the limit admits one more request at `now`, else `Err(the
    /// simulated time it next would)`. Takes nothing (see [`Self::take`]).
    fn room(&mut self, now: f64) -> Result<(), f64> {
        self.refill(now);
        let window = self.family.window_ms as f64;
        let hidden = self.hidden;
        let rate = self.rate();
        let end = self.window_end();
        let served = self.windows.last().map_or(0, WindowStats::served);
        match &mut self.limiter {
            Limiter::Fixed if served < hidden => Ok(()),
            Limiter::Fixed => Err(end),
            Limiter::Bucket { tokens, .. } if *tokens >= 1.0 - EPSILON => Ok(()),
            Limiter::Bucket { tokens, .. } if rate > 0.0 => Err(now + (1.0 - *tokens) / rate),
            Limiter::Bucket { .. } => Err(now + window),
            Limiter::Log(log) => {
                while log.front().is_some_and(|&t| t + window <= now) {
                    log.pop_front();
                }
                if (log.len() as u64) < hidden {
                    Ok(())
                } else {
                    // Room once all but hidden − 1 of the log have left.
                    let k = log.len() - hidden as usize;
                    Err(log.get(k).map_or(now + window, |t| t + window))
                }
            }
        }
    }

    /// Counts one admitted request against the limit at `now` (after
    /// [`Self::room`] said yes; fixed windows count in their stats).
    fn take(&mut self, now: f64) {
        match &mut self.limiter {
            Limiter::Fixed => {}
            Limiter::Bucket { tokens, .. } => *tokens = (*tokens - 1.0).max(0.0),
            Limiter::Log(log) => log.push_back(now),
        }
    }

    /// What the headers say about this limit at `now`.
    fn told(&mut self, now: f64) -> Told {
        // Prunes the log and refills the bucket.
        let _ = self.room(now);
        let (capacity, rate) = (self.capacity(), self.rate());
        let window = self.family.window_ms as f64;
        match &self.limiter {
            Limiter::Fixed => Told {
                allowed: self.hidden,
                count: self.windows.last().map_or(0, WindowStats::served),
                reset_ms: self.window_end() - now,
            },
            Limiter::Bucket { tokens, .. } => Told {
                allowed: capacity as u64,
                count: (capacity - (tokens + EPSILON).floor()).max(0.0) as u64,
                reset_ms: if rate > 0.0 {
                    (capacity - tokens).max(0.0) / rate
                } else {
                    window
                },
            },
            Limiter::Log(log) => Told {
                allowed: self.hidden,
                count: log.len() as u64,
                reset_ms: log.front().map_or(0.0, |t| t + window - now),
            },
        }
    }

    /// When the unmanaged consumer's request `sent` (of `planned`) in the
    /// current window falls, simulated ms from the window's start (always
    /// within the window).
    fn unmanaged_offset(&self, sent: u64, planned: u64) -> f64 {
        let window = self.family.window_ms as f64;
        match self.family.pattern {
            UnmanagedPattern::Steady | UnmanagedPattern::Ramping => {
                (sent as f64 + 0.5) * window / planned as f64
            }
            UnmanagedPattern::Bursty => {
                let index = self.windows.len() as u64 - 1;
                let start = unit(&self.family.name, index) * window / 2.0;
                let spacing = (window / 2.0 / planned as f64).min(10.0);
                start + sent as f64 * spacing
            }
        }
    }

    /// Starts window `index`.
    fn open_window(&mut self, index: u64) {
        let start_ms = index * self.family.window_ms;
        self.unmanaged_planned = self.unmanaged_override.unwrap_or_else(|| {
            let steps = &self.family.unmanaged;
            let Some(i) = steps.iter().rposition(|s| s.at_ms <= start_ms) else {
                return 0;
            };
            match (self.family.pattern, steps.get(i + 1)) {
                (UnmanagedPattern::Ramping, Some(next)) if next.at_ms > steps[i].at_ms => {
                    let (from, to) = (steps[i].per_window as f64, next.per_window as f64);
                    let f =
                        (start_ms - steps[i].at_ms) as f64 / (next.at_ms - steps[i].at_ms) as f64;
                    (from + (to - from) * f).round() as u64
                }
                _ => steps[i].per_window,
            }
        });
        self.unmanaged_sent = 0;
        self.windows.push(WindowStats {
            index,
            start_ms,
            enforced_permits: self.hidden,
            max_concurrent: self.max_concurrent,
            served_fleet: 0,
            served_unmanaged: 0,
            refused_fleet: 0,
            refused_unmanaged: 0,
        });
    }

    /// Plays every event due by `now`, in time order: the unmanaged
    /// consumer's requests (spread evenly through each window), hidden-limit
    /// steps, window ends.
    fn advance(&mut self, now: f64) {
        loop {
            let end = self.window_end();
            let start = end - self.family.window_ms as f64;
            let unmanaged_at = if self.unmanaged_sent < self.unmanaged_planned {
                start + self.unmanaged_offset(self.unmanaged_sent, self.unmanaged_planned)
            } else {
                f64::INFINITY
            };
            let step_at = self
                .family
                .schedule
                .get(self.next_step)
                .map_or(f64::INFINITY, |s| s.at_ms as f64);
            let next = unmanaged_at.min(step_at).min(end);
            if next > now {
                return;
            }
            if next == unmanaged_at {
                // Always before `end` (see `unmanaged_offset`).
                self.unmanaged_sent += 1;
                if self.room(next).is_ok() {
                    self.take(next);
                    self.current().served_unmanaged += 1;
                } else {
                    self.current().refused_unmanaged += 1;
                }
            } else if next == end {
                // A step at a window boundary belongs to the new window.
                let index = self.windows.len() as u64;
                self.open_window(index);
            } else if let Some(step) = self.family.schedule.get(self.next_step).copied() {
                self.next_step += 1;
                self.set_hidden(next, step.hidden_permits);
            }
        }
    }

    /// The enforced permits from `now` on (a token bucket keeps the
    /// tokens earned at the old rate, up to its new capacity).
    fn set_hidden(&mut self, now: f64, permits: u64) {
        self.refill(now);
        self.hidden = permits;
        self.current().enforced_permits = permits;
        let capacity = self.capacity();
        if let Limiter::Bucket { tokens, .. } = &mut self.limiter {
            *tokens = tokens.min(capacity);
        }
    }
}

/// A pseudo-random number in [0, 1) from a family's name and a window
/// index (the bursty consumer's burst time; the same every run).
fn unit(name: &str, index: u64) -> f64 {
    let mut x = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // splitmix64's finaliser.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// A token's live state.
#[derive(Clone, Debug, Default)]
struct TokenState {
    window: u64,
    count: u64,
    served: u64,
    refused: u64,
    block: Block,
}

/// A change through `POST /_sim/orgs/{org}/families/{name}`.
#[derive(Clone, Copy, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FamilyChange {
    pub(crate) hidden_permits: Option<u64>,
    pub(crate) max_concurrent: Option<u64>,
    pub(crate) unmanaged_per_window: Option<u64>,
}

/// One org. `Clone`: the paced yardstick tries a call on a copy to find
/// the soonest moment the upstream would serve it without refusing it.
#[derive(Clone, Debug)]
pub(crate) struct Org {
    token_permits: u64,
    token_window_ms: u64,
    token_tell: bool,
    token_retry_after: RetryAfter,
    escalation_base_ms: f64,
    escalation_max_ms: f64,
    families: Vec<FamilyState>,
    tokens: BTreeMap<String, TokenState>,
    refused_by_reason: BTreeMap<String, u64>,
    writes: BTreeMap<String, u64>,
    writes_total: u64,
}

impl Org {
    /// An org from its checked config.
    pub(crate) fn new(config: &OrgConfig, families: Vec<Family>, escalation: (u64, u64)) -> Org {
        Org {
            token_permits: config.token_permits,
            token_window_ms: config.token_window_ms,
            token_tell: config.token_tell,
            token_retry_after: config.token_retry_after,
            escalation_base_ms: escalation.0 as f64,
            escalation_max_ms: escalation.1 as f64,
            families: families.into_iter().map(FamilyState::new).collect(),
            tokens: BTreeMap::new(),
            refused_by_reason: BTreeMap::new(),
            writes: BTreeMap::new(),
            writes_total: 0,
        }
    }

    /// Plays everything due by `now` in every family.
    pub(crate) fn advance(&mut self, now: f64) {
        for f in &mut self.families {
            f.advance(now);
        }
    }

    /// Decides one request of OAuth client `client` at `now`, to an
    /// endpoint without a limit of its own (the server always goes through
    /// [`Self::admit_gated`]).
    #[cfg(test)]
    pub(crate) fn admit(&mut self, now: f64, client: &str, method: &str, path: &str) -> Decision {
        self.admit_gated(now, client, method, path, || Ok(()))
    }

    /// Decides one request of OAuth client `client` at `now`, with the
    /// endpoint's own limit checked last: `gate` runs only once every other
    /// limit admits the request. Its refusal is counted as theirs are and,
    /// like a concurrency refusal, blocks nothing.
    pub(crate) fn admit_gated(
        &mut self,
        now: f64,
        client: &str,
        method: &str,
        path: &str,
        gate: impl FnOnce() -> Result<(), Refusal>,
    ) -> Decision {
        let matching: Vec<usize> = self
            .families
            .iter()
            .enumerate()
            .filter(|(_, f)| f.family.routes.iter().any(|r| r.matches(method, path)))
            .map(|(i, _)| i)
            .collect();
        self.admit_to(now, client, &matching, gate)
    }

    /// The index of family `name`, for [`Self::admit_to`].
    pub(crate) fn family_index(&self, name: &str) -> Option<usize> {
        self.families.iter().position(|f| f.family.name == name)
    }

    /// The unmanaged consumer's requests family `index` refused so far
    /// (played up to the last time given).
    pub(crate) fn refused_unmanaged(&self, index: usize) -> u64 {
        self.families
            .get(index)
            .map_or(0, |f| f.windows.iter().map(|w| w.refused_unmanaged).sum())
    }

    /// What family `index` leaves everyone but its unmanaged consumer at
    /// `now`: its enforced permits less the consumer's planned requests,
    /// both of the current window, and the window's length in ms.
    pub(crate) fn left(&mut self, now: f64, index: usize) -> Option<(u64, u64)> {
        self.advance(now);
        let f = self.families.get(index)?;
        Some((
            f.hidden.saturating_sub(f.unmanaged_planned),
            f.family.window_ms,
        ))
    }

    /// Decides one request of `client` at `now` to the families at
    /// `matching` (the ones its route matches), `gate` as in
    /// [`Self::admit_gated`].
    pub(crate) fn admit_to(
        &mut self,
        now: f64,
        client: &str,
        matching: &[usize],
        gate: impl FnOnce() -> Result<(), Refusal>,
    ) -> Decision {
        self.advance(now);
        let token_window = self.token_window_ms as f64;
        let index = (now / token_window) as u64;
        let token_end = (index + 1) as f64 * token_window;
        let token = self.tokens.entry(client.to_owned()).or_default();
        if token.window != index {
            token.window = index;
            token.count = 0;
        }
        let limits = Limits {
            token_permits: self.token_permits,
            token_retry_after: self.token_retry_after,
            token_end,
            escalation: (self.escalation_base_ms, self.escalation_max_ms),
        };
        let verdict = decide(now, token, &mut self.families, matching, limits, gate);
        let counted = |w: &mut WindowStats| match &verdict {
            Ok(_) => w.served_fleet += 1,
            Err(_) => w.refused_fleet += 1,
        };
        for &i in matching {
            counted(self.families[i].current());
        }
        match &verdict {
            Ok(_) => {
                token.count += 1;
                token.served += 1;
            }
            Err(refusal) => {
                token.refused += 1;
                *self
                    .refused_by_reason
                    .entry(refusal.reason.clone())
                    .or_default() += 1;
            }
        }
        // The told limit with the least left (the token's on a tie).
        let token_told = self.token_tell.then_some(Told {
            allowed: self.token_permits,
            count: token.count,
            reset_ms: token_end - now,
        });
        let mut told = token_told;
        for &i in matching {
            let f = &mut self.families[i];
            if f.family.tell {
                let t = f.told(now);
                if told.is_none_or(|best| t.remaining() < best.remaining()) {
                    told = Some(t);
                }
            }
        }
        Decision { verdict, told }
    }

    /// Gives back the concurrency slots of a finished request.
    pub(crate) fn release(&mut self, slots: &[usize]) {
        for &i in slots {
            if let Some(f) = self.families.get_mut(i) {
                f.in_flight = f.in_flight.saturating_sub(1);
            }
        }
    }

    /// Stores one wrap-up write.
    pub(crate) fn store_write(&mut self, conversation: &str) {
        *self.writes.entry(conversation.to_owned()).or_default() += 1;
        self.writes_total += 1;
    }

    /// Conversation id → writes stored.
    pub(crate) fn writes(&self) -> &BTreeMap<String, u64> {
        &self.writes
    }

    /// Applies a control-plane change to family `name` at `now`; false if
    /// there is no such family.
    pub(crate) fn change(&mut self, now: f64, name: &str, change: FamilyChange) -> bool {
        self.advance(now);
        let Some(f) = self.families.iter_mut().find(|f| f.family.name == name) else {
            return false;
        };
        if let Some(permits) = change.hidden_permits {
            f.set_hidden(now, permits);
        }
        if let Some(max) = change.max_concurrent {
            f.max_concurrent = (max > 0).then_some(max);
            f.current().max_concurrent = f.max_concurrent;
        }
        if let Some(n) = change.unmanaged_per_window {
            f.unmanaged_override = Some(n);
            f.unmanaged_planned = n;
        }
        true
    }

    /// `(key, documented value)` of namespace `ns`, or `None` if unknown.
    pub(crate) fn namespace(&self, ns: &str) -> Option<Vec<(String, u64)>> {
        if ns == "platform-api" {
            return Some(vec![(
                "oauth-client-requests-per-window".into(),
                self.token_permits,
            )]);
        }
        let entities: Vec<(String, u64)> = self
            .families
            .iter()
            .filter(|f| f.family.namespace == ns)
            .map(|f| (f.family.name.clone(), f.family.documented))
            .collect();
        (!entities.is_empty()).then_some(entities)
    }

    /// The org's counters at `now`.
    pub(crate) fn stats(&mut self, now: f64, id: &str) -> OrgStats {
        self.advance(now);
        OrgStats {
            id: id.to_owned(),
            families: self
                .families
                .iter()
                .map(|f| FamilyStats {
                    name: f.family.name.clone(),
                    window_ms: f.family.window_ms,
                    kind: f.family.kind.as_str(),
                    burst: (f.family.kind == LimitKind::TokenBucket).then(|| f.capacity() as u64),
                    in_flight: f.in_flight,
                    windows: f.windows.clone(),
                })
                .collect(),
            tokens: self
                .tokens
                .iter()
                .map(|(client, t)| TokenStats {
                    client: client.clone(),
                    served: t.served,
                    refused: t.refused,
                })
                .collect(),
            refused_by_reason: self.refused_by_reason.clone(),
            writes: WriteStats {
                distinct: self.writes.len() as u64,
                total: self.writes_total,
            },
        }
    }
}

/// What [`decide`] checks a request against, besides the families.
#[derive(Clone, Copy)]
struct Limits {
    token_permits: u64,
    token_retry_after: RetryAfter,
    /// Simulated ms when the token's current window ends.
    token_end: f64,
    /// First and longest escalation penalty, simulated ms.
    escalation: (f64, f64),
}

/// The checks, in the documented order (blocks, concurrency, the token's
/// window, the families' windows, the endpoint's `gate`); takes concurrency
/// slots and sets blocks, counts nothing else.
fn decide(
    now: f64,
    token: &mut TokenState,
    families: &mut [FamilyState],
    matching: &[usize],
    limits: Limits,
    gate: impl FnOnce() -> Result<(), Refusal>,
) -> Result<Vec<usize>, Refusal> {
    let (base, max) = limits.escalation;
    if let Some(wait) = token.block.hammer(now, base, max) {
        return Err(Refusal {
            reason: "blocked:token".into(),
            limit: Some(limits.token_permits),
            retry_after_ms: limits.token_retry_after.round(wait),
        });
    }
    for &i in matching {
        let f = &mut families[i];
        if let Some(wait) = f.block.hammer(now, base, max) {
            return Err(Refusal {
                reason: format!("blocked:{}", f.family.name),
                limit: Some(f.family.documented),
                retry_after_ms: f.family.retry_after.round(wait),
            });
        }
    }
    for &i in matching {
        let f = &families[i];
        if f.max_concurrent.is_some_and(|max| f.in_flight >= max) {
            return Err(Refusal {
                reason: format!("concurrency:{}", f.family.name),
                limit: None,
                retry_after_ms: 1_000.0,
            });
        }
    }
    if token.count >= limits.token_permits {
        token.block.until = limits.token_end;
        return Err(Refusal {
            reason: "token".into(),
            limit: Some(limits.token_permits),
            retry_after_ms: limits.token_retry_after.round(limits.token_end - now),
        });
    }
    for &i in matching {
        let f = &mut families[i];
        if let Err(until) = f.room(now) {
            f.block.until = until;
            return Err(Refusal {
                reason: format!("family:{}", f.family.name),
                limit: Some(f.family.documented),
                retry_after_ms: f.family.retry_after.round(until - now),
            });
        }
    }
    gate()?;
    for &i in matching {
        families[i].take(now);
    }
    let slots: Vec<usize> = matching
        .iter()
        .copied()
        .filter(|&i| families[i].max_concurrent.is_some())
        .collect();
    for &i in &slots {
        families[i].in_flight += 1;
    }
    Ok(slots)
}

/// One org in `/_sim/stats`.
#[derive(Debug, Serialize)]
pub(crate) struct OrgStats {
    pub(crate) id: String,
    pub(crate) families: Vec<FamilyStats>,
    pub(crate) tokens: Vec<TokenStats>,
    pub(crate) refused_by_reason: BTreeMap<String, u64>,
    pub(crate) writes: WriteStats,
}

/// One family in `/_sim/stats`.
#[derive(Debug, Serialize)]
pub(crate) struct FamilyStats {
    pub(crate) name: String,
    pub(crate) window_ms: u64,
    /// `fixed_window`, `token_bucket` or `sliding_log`.
    pub(crate) kind: &'static str,
    /// Token bucket only: its capacity now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) burst: Option<u64>,
    pub(crate) in_flight: u64,
    pub(crate) windows: Vec<WindowStats>,
}

/// One token in `/_sim/stats`.
#[derive(Debug, Serialize)]
pub(crate) struct TokenStats {
    pub(crate) client: String,
    pub(crate) served: u64,
    pub(crate) refused: u64,
}

/// Stored writes in `/_sim/stats`.
#[derive(Debug, Serialize)]
pub(crate) struct WriteStats {
    pub(crate) distinct: u64,
    pub(crate) total: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        FamilyConfig, LimitKind, RetryAfter, ScheduleStep, SimConfig, UnmanagedPattern,
        UnmanagedStep,
    };

    const QUERY: &str = "/api/v2/analytics/conversations/details/query";

    fn org(families: Vec<FamilyConfig>, token_permits: u64) -> Org {
        let mut config = SimConfig::default().orgs.remove(0);
        config.token_permits = token_permits;
        config.families = families;
        let ready = config.families.iter().map(|f| f.ready().unwrap()).collect();
        Org::new(&config, ready, (1_000, 60_000))
    }

    fn analytics(hidden: u64, max_concurrent: Option<u64>) -> FamilyConfig {
        FamilyConfig {
            name: "analytics-query".into(),
            routes: vec!["POST /api/v2/analytics/**/query".into()],
            documented_permits: 60,
            hidden_permits: Some(hidden),
            max_concurrent,
            ..FamilyConfig::default()
        }
    }

    fn reason(d: &Decision) -> Option<&str> {
        d.verdict.as_ref().err().map(|r| r.reason.as_str())
    }

    #[test]
    fn hidden_limit_refuses_and_blocks_to_window_end_then_escalates() {
        let mut o = org(vec![analytics(3, None)], 300);
        for i in 0..3 {
            let d = o.admit(1_000.0 + f64::from(i), "c", "POST", QUERY);
            assert!(d.verdict.is_ok());
        }
        let d = o.admit(10_000.0, "c", "POST", QUERY);
        let r = d.verdict.unwrap_err();
        assert_eq!(r.reason, "family:analytics-query");
        assert_eq!(r.retry_after_ms, 50_000.0);
        // Another client hammers during the block: extended by 1 s, 2 s, ...
        // (never shortened), and the refusals consume nothing.
        assert_eq!(
            reason(&o.admit(59_500.0, "d", "POST", QUERY)),
            Some("blocked:analytics-query")
        );
        let d = o.admit(59_600.0, "d", "POST", QUERY);
        assert_eq!(d.verdict.unwrap_err().retry_after_ms, 2_000.0);
        // Blocked into the next window although it has room (to 64.5 s).
        let d = o.admit(60_500.0, "c", "POST", QUERY);
        assert_eq!(d.verdict.unwrap_err().retry_after_ms, 4_000.0);
        // After the block the penalty resets.
        assert!(o.admit(64_500.0, "c", "POST", QUERY).verdict.is_ok());
        let stats = o.stats(64_500.0, "org-a");
        let w = &stats.families[0].windows;
        assert_eq!((w[0].served_fleet, w[0].refused_fleet), (3, 3));
        assert_eq!((w[1].served_fleet, w[1].refused_fleet), (1, 1));
        assert_eq!(stats.refused_by_reason["blocked:analytics-query"], 3);
    }

    #[test]
    fn token_limit_and_headers() {
        let mut o = org(vec![], 2);
        let d = o.admit(100.0, "c", "GET", "/x");
        let t = d.told.unwrap();
        assert_eq!((t.count, t.reset_ms), (1, 59_900.0));
        o.admit(200.0, "c", "GET", "/x");
        let d = o.admit(300.0, "c", "GET", "/x");
        assert_eq!(reason(&d), Some("token"));
        assert_eq!(d.told.unwrap().count, 2);
        // Another token is not affected.
        assert!(o.admit(300.0, "e", "GET", "/x").verdict.is_ok());
        assert!(o.admit(60_000.0, "c", "GET", "/x").verdict.is_ok());
    }

    #[test]
    fn concurrency_refuses_without_blocking() {
        let mut o = org(vec![analytics(45, Some(2))], 300);
        let a = o.admit(0.0, "c", "POST", QUERY).verdict.unwrap();
        o.admit(0.0, "c", "POST", QUERY).verdict.unwrap();
        let r = o.admit(1.0, "c", "POST", QUERY).verdict.unwrap_err();
        assert_eq!(
            (r.reason.as_str(), r.retry_after_ms),
            ("concurrency:analytics-query", 1_000.0)
        );
        o.release(&a);
        assert!(o.admit(2.0, "c", "POST", QUERY).verdict.is_ok());
        // A GET of the same path is not in the family.
        assert!(o.admit(2.0, "c", "GET", QUERY).verdict.is_ok());
    }

    #[test]
    fn an_endpoints_own_refusal_counts_as_refused_and_consumes_nothing() {
        let mut o = org(vec![analytics(2, None)], 2);
        let jobs = || {
            Err(Refusal {
                reason: "jobs:running".into(),
                limit: Some(2),
                retry_after_ms: 1_000.0,
            })
        };
        let d = o.admit_gated(0.0, "c", "POST", QUERY, jobs);
        assert_eq!(reason(&d), Some("jobs:running"));
        // Neither the token's permit nor the family's was used, and nothing
        // is blocked.
        assert_eq!(d.told.unwrap().count, 0);
        for t in [1.0, 2.0] {
            assert!(o.admit(t, "c", "POST", QUERY).verdict.is_ok());
        }
        // Not asked when another limit refuses first.
        let d = o.admit_gated(3.0, "c", "POST", QUERY, || panic!("gate asked"));
        assert_eq!(reason(&d), Some("token"));
        let s = o.stats(3.0, "org-a");
        assert_eq!((s.tokens[0].served, s.tokens[0].refused), (2, 2));
        assert_eq!(s.refused_by_reason["jobs:running"], 1);
        let w = s.families[0].windows[0];
        assert_eq!((w.served_fleet, w.refused_fleet), (2, 2));
    }

    #[test]
    fn unmanaged_consumer_and_schedule_play_lazily_in_order() {
        let mut f = analytics(4, None);
        f.unmanaged = vec![
            UnmanagedStep {
                at_ms: 0,
                per_window: 2,
            },
            UnmanagedStep {
                at_ms: 120_000,
                per_window: 6,
            },
        ];
        f.schedule = vec![
            ScheduleStep {
                at_ms: 90_000,
                hidden_permits: 3,
            },
            ScheduleStep {
                at_ms: 180_000,
                hidden_permits: 5,
            },
        ];
        let mut o = org(vec![f], 300);
        // Window 0: the unmanaged requests at 15 s and 45 s, two fleet ones.
        assert!(o.admit(10_000.0, "c", "POST", QUERY).verdict.is_ok());
        assert!(o.admit(50_000.0, "c", "POST", QUERY).verdict.is_ok());
        assert!(o.admit(50_001.0, "c", "POST", QUERY).verdict.is_err());
        let s = o.stats(200_000.0, "org-a");
        let w = &s.families[0].windows;
        assert_eq!(w.len(), 4);
        assert_eq!((w[0].served_unmanaged, w[0].served_fleet), (2, 2));
        assert_eq!((w[1].enforced_permits, w[1].served_unmanaged), (3, 2));
        assert_eq!(w[2].enforced_permits, 3);
        assert_eq!((w[2].served_unmanaged, w[2].refused_unmanaged), (3, 3));
        // Window 3 (180–240 s) at 200 s: 6 planned, two due by then; the
        // step at its start is its own, not window 2's.
        assert_eq!(w[3].served_unmanaged, 2);
        assert_eq!(w[3].enforced_permits, 5);
    }

    #[test]
    fn control_plane_changes_take_effect_now() {
        let mut o = org(vec![analytics(45, Some(10))], 300);
        assert!(o.change(
            30_000.0,
            "analytics-query",
            FamilyChange {
                hidden_permits: Some(1),
                max_concurrent: Some(0),
                unmanaged_per_window: Some(0),
            }
        ));
        assert!(!o.change(30_000.0, "nope", FamilyChange::default()));
        assert!(o.admit(30_001.0, "c", "POST", QUERY).verdict.is_ok());
        assert!(o.admit(30_002.0, "c", "POST", QUERY).verdict.is_err());
        let s = o.stats(30_002.0, "org-a");
        let w = s.families[0].windows[0];
        assert_eq!((w.enforced_permits, w.max_concurrent), (1, None));
        assert_eq!(o.namespace("analytics").unwrap()[0].1, 60);
        assert!(o.namespace("users").is_none());
    }

    /// A family of `kind`: `permits` per `window_ms`, nothing else.
    fn limited(kind: LimitKind, permits: u64, window_ms: u64) -> FamilyConfig {
        FamilyConfig {
            kind,
            window_ms,
            ..analytics(permits, None)
        }
    }

    /// One client sending as fast as it is let (1 ms apart when served,
    /// at the Retry-After when refused) for `until` ms: when it was served.
    fn greedy(o: &mut Org, until: f64) -> Vec<f64> {
        let (mut t, mut served) = (0.0, Vec::new());
        while t < until {
            match o.admit(t, "c", "POST", QUERY).verdict {
                Ok(_) => {
                    served.push(t);
                    t += 1.0;
                }
                Err(r) => t += r.retry_after_ms,
            }
        }
        served
    }

    #[test]
    fn token_bucket_serves_its_burst_then_its_refill_rate() {
        let mut f = limited(LimitKind::TokenBucket, 60, 60_000);
        f.burst = Some(5);
        let mut o = org(vec![f], 1_000);
        for _ in 0..5 {
            assert!(o.admit(0.0, "c", "POST", QUERY).verdict.is_ok());
        }
        let r = o.admit(0.0, "c", "POST", QUERY).verdict.unwrap_err();
        assert_eq!(r.reason, "family:analytics-query");
        assert!((r.retry_after_ms - 1_000.0).abs() < 1e-6, "{r:?}");
        // One token a second after that; the block lasts to the token only.
        assert!(o.admit(1_000.0, "c", "POST", QUERY).verdict.is_ok());
        assert!(o.admit(1_500.0, "c", "POST", QUERY).verdict.is_err());
        // Served over 2 minutes: the burst and one a second, no more.
        let mut f = limited(LimitKind::TokenBucket, 60, 60_000);
        f.burst = Some(5);
        let mut o = org(vec![f], 1_000);
        let served = greedy(&mut o, 120_000.0);
        assert!((124..=126).contains(&served.len()), "{}", served.len());
        for (i, &t) in served.iter().enumerate() {
            // By time t at most burst + rate × t.
            assert!(i as f64 + 1.0 <= 5.0 + t / 1_000.0 + 1e-6, "{i} at {t}");
        }
    }

    #[test]
    fn token_bucket_default_burst_is_the_permits_and_stats_say_so() {
        let mut o = org(vec![limited(LimitKind::TokenBucket, 45, 60_000)], 1_000);
        let served = greedy(&mut o, 60_000.0);
        // 45 at once, then one every 1.33 s.
        assert!((88..=90).contains(&served.len()), "{}", served.len());
        let s = o.stats(60_000.0, "org-a");
        assert_eq!(
            (s.families[0].kind, s.families[0].burst),
            ("token_bucket", Some(45))
        );
    }

    #[test]
    fn sliding_log_never_serves_more_than_n_in_any_window() {
        let mut o = org(vec![limited(LimitKind::SlidingLog, 3, 10_000)], 1_000);
        for t in [0.0, 4_000.0, 8_000.0] {
            assert!(o.admit(t, "c", "POST", QUERY).verdict.is_ok());
        }
        let r = o.admit(9_000.0, "c", "POST", QUERY).verdict.unwrap_err();
        assert_eq!(r.retry_after_ms, 1_000.0);
        // The first request left the log at 10 s.
        assert!(o.admit(10_000.0, "c", "POST", QUERY).verdict.is_ok());
        assert!(o.admit(10_001.0, "c", "POST", QUERY).verdict.is_err());

        let mut o = org(vec![limited(LimitKind::SlidingLog, 5, 10_000)], 10_000);
        let served = greedy(&mut o, 60_000.0);
        assert!(served.len() >= 25, "{}", served.len());
        for pair in served.windows(6) {
            assert!(pair[5] - pair[0] >= 10_000.0, "{pair:?}");
        }
        // A fixed window lets 2N through across a boundary.
        let mut o = org(vec![limited(LimitKind::FixedWindow, 5, 10_000)], 10_000);
        for t in [9_000.0, 9_001.0, 9_002.0, 9_003.0, 9_004.0] {
            assert!(o.admit(t, "c", "POST", QUERY).verdict.is_ok());
        }
        let served = greedy(&mut o, 20_000.0);
        assert_eq!(served.len(), 5);
        assert!(served[4] - 9_000.0 < 10_000.0);
    }

    #[test]
    fn whole_second_retry_after_rounds_up() {
        assert_eq!(RetryAfter::WholeSeconds.round(1_333.3), 2_000.0);
        assert_eq!(RetryAfter::WholeSeconds.round(2_000.000_1), 2_000.0);
        assert_eq!(RetryAfter::WholeSeconds.round(0.4), 1_000.0);
        assert_eq!(RetryAfter::Exact.round(1_333.3), 1_333.3);
        let mut f = limited(LimitKind::TokenBucket, 45, 60_000);
        f.burst = Some(1);
        f.retry_after = RetryAfter::WholeSeconds;
        let mut o = org(vec![f], 1_000);
        assert!(o.admit(0.0, "c", "POST", QUERY).verdict.is_ok());
        let r = o.admit(0.0, "c", "POST", QUERY).verdict.unwrap_err();
        assert_eq!(r.retry_after_ms, 2_000.0);
        // The block itself ends at the token (1.33 s), not at the rounding.
        assert!(o.admit(1_334.0, "c", "POST", QUERY).verdict.is_ok());
    }

    #[test]
    fn headers_tell_only_limits_that_tell() {
        // Today's default: the token's limit only.
        let mut o = org(vec![analytics(45, None)], 300);
        let t = o.admit(0.0, "c", "POST", QUERY).told.unwrap();
        assert_eq!((t.allowed, t.count), (300, 1));
        // A silent org: no headers at all.
        let mut silent = SimConfig::default().orgs.remove(0);
        silent.token_tell = false;
        silent.families = vec![limited(LimitKind::TokenBucket, 45, 60_000)];
        let ready = silent.families.iter().map(|f| f.ready().unwrap()).collect();
        let mut o = Org::new(&silent, ready, (1_000, 60_000));
        assert_eq!(o.admit(0.0, "c", "POST", QUERY).told, None);
        // A family that tells, with less left than the token: its figures.
        let mut f = analytics(45, None);
        f.tell = true;
        let mut o = org(vec![f], 300);
        o.admit(0.0, "c", "POST", QUERY);
        let t = o.admit(1_000.0, "c", "POST", QUERY).told.unwrap();
        assert_eq!((t.allowed, t.count, t.reset_ms), (45, 2, 59_000.0));
        // Not on a route outside the family.
        let t = o.admit(1_000.0, "c", "GET", "/x").told.unwrap();
        assert_eq!(t.allowed, 300);
    }

    #[test]
    fn unmanaged_patterns() {
        let steps = vec![
            UnmanagedStep {
                at_ms: 0,
                per_window: 2,
            },
            UnmanagedStep {
                at_ms: 240_000,
                per_window: 10,
            },
        ];
        let mut f = analytics(100, None);
        f.unmanaged = steps.clone();
        f.unmanaged_pattern = UnmanagedPattern::Ramping;
        let mut o = org(vec![f], 300);
        let s = o.stats(360_000.0, "org-a");
        let per_window: Vec<u64> = s.families[0].windows[..6]
            .iter()
            .map(|w| w.served_unmanaged)
            .collect();
        assert_eq!(per_window, [2, 4, 6, 8, 10, 10]);
        // Bursty: a window's requests together, somewhere in its first half,
        // and the burst empties a token bucket.
        let mut f = limited(LimitKind::TokenBucket, 10, 60_000);
        f.unmanaged = vec![UnmanagedStep {
            at_ms: 0,
            per_window: 12,
        }];
        f.unmanaged_pattern = UnmanagedPattern::Bursty;
        let mut o = org(vec![f], 300);
        let s = o.stats(59_999.0, "org-a");
        let w = s.families[0].windows[0];
        assert_eq!(w.served_unmanaged + w.refused_unmanaged, 12);
        assert!(w.refused_unmanaged >= 1, "{w:?}");
        let burst = (0..12)
            .map(|k| o.families[0].unmanaged_offset(k, 12))
            .collect::<Vec<_>>();
        assert!(
            burst[11] - burst[0] <= 110.0 && burst[11] < 60_000.0,
            "{burst:?}"
        );
        // Steady: spread evenly (the default, as before).
        let mut f = limited(LimitKind::SlidingLog, 100, 60_000);
        f.unmanaged = steps;
        let o = org(vec![f], 300);
        assert_eq!(o.families[0].unmanaged_offset(1, 2), 45_000.0);
    }
}
