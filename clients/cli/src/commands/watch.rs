//! `quotactl watch`: the Watch streams (a tenant's followed to its next
//! leader, a broker's whose stream ended opened again once it answers), the
//! live rows kept from them, and the table redrawn or the JSON lines.

use super::cluster::{Cluster, Conn};
use super::print;
use crate::cli::{parse_broker_url, WatchArgs};
use crate::error::{short, Error};
use crate::table::{self, BucketKey};
use quota_broker::pb::{QuotaStatus, WatchRequest};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Duration;
use tokio::time::Instant;
use tokio_stream::{StreamExt, StreamMap};

/// Watch table mode coalesces updates arriving this close together into one redraw.
const REDRAW_EVERY: Duration = Duration::from_millis(100);

/// ANSI: cursor home, clear screen.
const CLEAR_SCREEN: &str = "\x1b[H\x1b[2J";

/// How long `watch --tenant` keeps looking for the tenant's leader after
/// its stream ended (a hand-over, a broker stopped, an election).
const FOLLOW_FOR: Duration = Duration::from_secs(30);
/// The pause between two looks while no broker leads the tenant.
const FOLLOW_PAUSE: Duration = Duration::from_millis(500);
/// How often `watch` over every tenant tries again a broker given whose
/// stream is not open (it stopped, restarted, or did not answer at first).
const REOPEN_EVERY: Duration = Duration::from_secs(2);
/// Bound on one such try, so a hung broker holds up the others' updates
/// no longer.
const REOPEN_TIMEOUT: Duration = Duration::from_secs(1);

/// The Watch streams of one `quotactl watch`, by their broker's URL. Of one
/// tenant (`tenant` set), a stream that ends (the tenant moved to another
/// broker, or its broker stopped) is opened again on the tenant's leader,
/// for at most [`FOLLOW_FOR`]; the new leader's snapshot follows. Of every
/// tenant, a broker whose stream ended (or that did not answer at first)
/// is tried again every [`REOPEN_EVERY`] while the others' streams go on:
/// restarted, it sends what it leads whole.
pub(super) struct Feed {
    pub(super) streams: StreamMap<String, tonic::Streaming<QuotaStatus>>,
    pub(super) tenant: Option<String>,
    /// The URL of the tenant's stream.
    pub(super) watched: Option<String>,
    /// A stream of the tenant ended: (its URL, the leader it named, why,
    /// since when the leader is looked for).
    pub(super) lost: Option<(String, Option<String>, String, Instant)>,
    /// The tenant's stream moved to another broker since the last look:
    /// what the old one sent is to be forgotten.
    pub(super) switched: bool,
    /// Of every tenant: the brokers given whose stream is not open, and
    /// when they are tried again.
    pub(super) dropped: Vec<String>,
    pub(super) reopen_at: Instant,
    /// Of every tenant: the brokers whose stream ended since the last
    /// look; what they sent is no longer live.
    pub(super) gone: Vec<String>,
}

impl Feed {
    /// The next update and the URL of the broker that sent it; `None`
    /// when every stream ended (never for one tenant, which is followed or
    /// fails).
    async fn next(&mut self, c: &mut Cluster) -> Option<Result<(String, QuotaStatus), Error>> {
        loop {
            if let Some(lost) = self.lost.clone() {
                if let Err(e) = self.follow(c, lost).await {
                    return Some(Err(e));
                }
            }
            if !self.dropped.is_empty() && Instant::now() >= self.reopen_at {
                self.reopen(c).await;
            }
            let reopen_at = (!self.dropped.is_empty()).then_some(self.reopen_at);
            let retry = async {
                match reopen_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let next = tokio::select! {
                next = self.streams.next() => next,
                () = retry => continue,
            };
            match next {
                Some((url, Ok(s))) => return Some(Ok((url, s))),
                Some((url, Err(status))) => {
                    let leader = status
                        .metadata()
                        .get(quota_broker::LEADER_METADATA)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| parse_broker_url(v).ok());
                    let error = Error::status(&url, status);
                    if self.tenant.is_none() {
                        self.streams.remove(&url);
                        self.gone.push(url.clone());
                    }
                    if self.tenant.is_none() && !self.streams.is_empty() {
                        // One broker of several ended its Watch (shutting
                        // down, or gone): the others' go on, and it is
                        // tried again.
                        eprintln!(
                            "quotactl: {}: the Watch ended ({}); watching the other brokers, \
                             and this one again once it answers",
                            short(&url),
                            one_line_why(&error.without_url())
                        );
                        self.dropped.push(url);
                        self.reopen_at = Instant::now() + REOPEN_EVERY;
                        continue;
                    }
                    // One broker given and no leader named: nowhere to
                    // follow the tenant to.
                    let nowhere = leader.is_none() && c.urls.len() < 2;
                    if self.tenant.is_none() || !error.try_another() || nowhere {
                        return Some(Err(error));
                    }
                    self.streams.remove(&url);
                    let why = match &leader {
                        Some(l) => format!("the tenant moved to {l}"),
                        None => one_line_why(&error.without_url()),
                    };
                    self.lost = Some((url, leader, why, Instant::now()));
                }
                None => {
                    // Ended without an error: its broker is shutting down.
                    // With no other broker given, so does the watch.
                    let (Some(_), Some(url), true) =
                        (&self.tenant, self.watched.take(), c.urls.len() > 1)
                    else {
                        return None;
                    };
                    let why = "its broker is shutting down".to_owned();
                    self.lost = Some((url, None, why, Instant::now()));
                }
            }
        }
    }

    /// Of every tenant: opens the Watch again on each broker whose stream
    /// is not open; one that does not answer is tried again later.
    async fn reopen(&mut self, c: &mut Cluster) {
        for url in std::mem::take(&mut self.dropped) {
            let opened = tokio::time::timeout(REOPEN_TIMEOUT, async {
                let conn = c.conn(&url).await.ok()?;
                let mut broker = conn.broker.clone();
                conn.call(broker.watch(WatchRequest::default())).await.ok()
            })
            .await
            .ok()
            .flatten();
            match opened {
                Some(stream) => {
                    eprintln!("quotactl: {}: watching it again", short(&url));
                    self.streams.insert(url, stream);
                }
                None => self.dropped.push(url),
            }
        }
        self.reopen_at = Instant::now() + REOPEN_EVERY;
    }

    /// Opens the tenant's stream again on its leader: first the one the
    /// ended stream named, else the brokers given.
    async fn follow(
        &mut self,
        c: &mut Cluster,
        (url, leader, why, since): (String, Option<String>, String, Instant),
    ) -> Result<(), Error> {
        let tenant = self.tenant.clone().unwrap_or_default();
        let mut looking = false;
        loop {
            let start = leader.clone().unwrap_or_else(|| {
                // The next broker given after the one that ended.
                let at = c.urls.iter().position(|u| *u == url).map_or(0, |i| i + 1);
                c.urls[at % c.urls.len()].clone()
            });
            let opened = c
                .call_at(start, &tenant, |conn| {
                    let mut broker = conn.broker.clone();
                    let tenant = tenant.clone();
                    async move { broker.watch(WatchRequest { tenant }).await }
                })
                .await;
            match opened {
                Ok((to, stream)) => {
                    eprintln!(
                        "quotactl: the Watch of tenant {tenant:?} on {url} ended ({why}); following it on {to}"
                    );
                    self.watched = Some(to.clone());
                    self.streams.insert(to, stream);
                    self.lost = None;
                    self.switched = true;
                    return Ok(());
                }
                Err(e) if worth_another_look(&e) && since.elapsed() < FOLLOW_FOR => {
                    // Not at once (a leader dead until its etcd lease runs
                    // out, etcd away): say so now, not only once found, so
                    // the figures on screen are not taken for live ones.
                    if !looking {
                        looking = true;
                        eprintln!(
                            "quotactl: the Watch of tenant {tenant:?} on {url} ended ({why}); \
                             looking for its leader for up to {} s (the figures shown are \
                             from before)",
                            FOLLOW_FOR.as_secs()
                        );
                    }
                    tokio::time::sleep(FOLLOW_PAUSE).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// After the tenant's stream moved to another broker: the old broker's
/// rows go (the new one's snapshot follows), the title names the new one.
fn forget_if_switched(
    feed: &mut Feed,
    state: &mut BTreeMap<BucketKey, QuotaStatus>,
    title: &mut String,
) {
    if std::mem::take(&mut feed.switched) {
        state.clear();
        *title = feed.streams.keys().cloned().collect::<Vec<_>>().join(",");
    }
}

/// Adds `s`, sent by `url`, to the table's rows, and drops the rows no
/// longer live: those of brokers whose stream ended, and those of `s`'s
/// tenant sent by another broker (it no longer leads the tenant).
pub(super) fn keep_live(
    feed: &mut Feed,
    state: &mut BTreeMap<BucketKey, QuotaStatus>,
    source: &mut BTreeMap<BucketKey, String>,
    url: String,
    s: QuotaStatus,
) {
    for gone in std::mem::take(&mut feed.gone) {
        source.retain(|key, from| {
            let live = *from != gone;
            if !live {
                state.remove(key);
            }
            live
        });
    }
    source.retain(|key, from| {
        let live = key.0 != s.tenant || *from == url;
        if !live {
            state.remove(key);
        }
        live
    });
    if s.scope == "oauth_client" {
        // A per-client bucket's unused row stands for it only while no
        // client's row is there: the two never hold at once.
        let stale: Vec<BucketKey> = state
            .iter()
            .filter(|(k, v)| {
                k.0 == s.tenant
                    && k.1 == s.bucket
                    && k.2 != s.oauth_client
                    && (s.unused || v.unused)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            state.remove(&k);
            source.remove(&k);
        }
    }
    let key = table::key(&s);
    source.insert(key.clone(), url);
    state.insert(key, s);
}

/// Whether no broker led the tenant for now (an election, a broker
/// stopping), rather than a refusal that a later look would meet again.
fn worth_another_look(e: &Error) -> bool {
    match e {
        Error::NoBroker { tried, .. } => tried.iter().all(|(_, e)| e.try_another()),
        e => e.try_another(),
    }
}

/// A reason on one line and at most 160 characters, for a note on stderr.
fn one_line_why(why: &str) -> String {
    let line = why.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(160) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line,
    }
}

pub(super) async fn watch(c: &mut Cluster, a: WatchArgs) -> Result<(), Error> {
    let open = |conn: &Conn, tenant: String| {
        let mut broker = conn.broker.clone();
        async move { broker.watch(WatchRequest { tenant }).await }
    };
    // Every stream, by its broker's URL.
    let mut streams = StreamMap::new();
    let partial = match &a.tenant {
        Some(t) => {
            let (url, stream) = c.call(t, |conn| open(conn, t.clone())).await?;
            streams.insert(url, stream);
            None
        }
        None => {
            let (answers, partial) = c.each(|conn| open(conn, String::new())).await?;
            for (url, stream) in answers {
                streams.insert(url, stream);
            }
            partial
        }
    };
    // Of every tenant: the brokers that did not answer are tried again.
    let dropped = match &a.tenant {
        Some(_) => Vec::new(),
        None => c
            .urls
            .iter()
            .filter(|u| !streams.contains_key(*u))
            .cloned()
            .collect(),
    };
    let title = streams.keys().cloned().collect::<Vec<_>>().join(",");
    let limit = a.count.unwrap_or(u64::MAX);
    let tty = std::io::stdout().is_terminal();
    let mut state: BTreeMap<BucketKey, QuotaStatus> = BTreeMap::new();
    let mut updates = 0u64;
    let watched = a.tenant.as_ref().and(streams.keys().next().cloned());
    let mut feed = Feed {
        watched,
        streams,
        tenant: a.tenant.clone(),
        lost: None,
        switched: false,
        dropped,
        reopen_at: Instant::now() + REOPEN_EVERY,
        gone: Vec::new(),
    };
    // Which broker sent each row: a tenant is led by one broker at a time,
    // so a row of it from another broker is no longer live, nor is any row
    // of a broker whose stream ended.
    let mut source: BTreeMap<BucketKey, String> = BTreeMap::new();
    let mut title = title;
    while updates < limit {
        let Some(first) = feed.next(c).await else {
            break;
        };
        let (url, first) = first?;
        updates += 1;
        if a.json {
            print(&format!("{}\n", table::status_json(&first)))?;
            continue;
        }
        forget_if_switched(&mut feed, &mut state, &mut title);
        keep_live(&mut feed, &mut state, &mut source, url, first);
        // Coalesce what arrives right after (the initial snapshot, bursts).
        let deadline = Instant::now() + REDRAW_EVERY;
        let mut ended = false;
        while updates < limit {
            match tokio::time::timeout_at(deadline, feed.next(c)).await {
                Err(_) => break,
                Ok(None) => {
                    ended = true;
                    break;
                }
                Ok(Some(s)) => {
                    let (url, s) = s?;
                    updates += 1;
                    forget_if_switched(&mut feed, &mut state, &mut title);
                    keep_live(&mut feed, &mut state, &mut source, url, s);
                }
            }
        }
        let body = table::render_status(state.values());
        if tty {
            print(&format!(
                "{CLEAR_SCREEN}quotactl watch {title}: {} buckets, {updates} updates (Ctrl-C to stop)\n\n{body}",
                state.len()
            ))?;
        } else {
            print(&format!("{body}\n"))?;
        }
        if ended {
            break;
        }
    }
    partial.map_or(Ok(()), Err)
}
