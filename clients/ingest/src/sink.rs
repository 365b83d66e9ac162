//! The warehouse side: SQLite (a file, the default) or PostgreSQL (a URL)
//! through sqlx's `Any` driver, so one set of statements serves both.
//!
//! Two tables. `conversations` holds each conversation once, keyed by its
//! id (an upsert: fetching a block again replaces, never duplicates), with
//! the raw JSON and the fields people query. `ingest_blocks` is the
//! checkpoint: one row per block with its status (`claimed`, `done`, or
//! `provisional` when newer than the watermark), records, `totalHits`,
//! how often it was fetched, and the claim (owner + expiry) through which
//! several workers split one range. A block's rows and its checkpoint are
//! written in one transaction, so a killed run leaves a block either done
//! or not started.
//!
//! The raw JSON is `TEXT`, not `JSONB`: the `Any` driver binds strings, and
//! one schema for both databases is worth more here than JSON operators.
//!
//! A NUL character in a queried field (JSON may carry one; PostgreSQL's
//! `TEXT` cannot hold one) is stored as the six characters `\u0000`, as
//! JSON writes it, in SQLite too so both sinks hold the same; `raw` keeps
//! the record as sent (JSON text escapes the NUL). Any other value the
//! database refuses (SQLSTATE class 22) fails its block, not the run.

use std::borrow::Cow;
use std::time::Duration;

use serde_json::Value;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use crate::error::IngestError;
use crate::plan::{parse_time, Block};

/// Rows per multi-row INSERT (9 binds each; far below both databases'
/// bind limits).
const ROWS_PER_INSERT: usize = 500;

/// How long a SQLite writer waits for another's transaction.
const SQLITE_BUSY_TIMEOUT: &str = "PRAGMA busy_timeout = 60000";

const SCHEMA: [&str; 4] = [
    "CREATE TABLE IF NOT EXISTS conversations (
        conversation_id TEXT PRIMARY KEY,
        conversation_start TEXT NOT NULL,
        conversation_end TEXT,
        start_ms BIGINT NOT NULL,
        direction TEXT,
        queue_id TEXT,
        wrap_up_code TEXT,
        media_type TEXT,
        raw TEXT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS conversations_start ON conversations (start_ms)",
    "CREATE TABLE IF NOT EXISTS ingest_blocks (
        block_start BIGINT NOT NULL,
        block_end BIGINT NOT NULL,
        status TEXT NOT NULL,
        records BIGINT NOT NULL DEFAULT 0,
        total_hits BIGINT,
        fetches BIGINT NOT NULL DEFAULT 0,
        mismatches BIGINT NOT NULL DEFAULT 0,
        owner TEXT,
        claim_expires_ms BIGINT NOT NULL DEFAULT 0,
        updated_ms BIGINT NOT NULL,
        PRIMARY KEY (block_start, block_end)
    )",
    "CREATE TABLE IF NOT EXISTS ingest_runs (
        owner TEXT PRIMARY KEY,
        run_id TEXT NOT NULL,
        seen_ms BIGINT NOT NULL
    )",
];

/// Serializes the schema's creation on PostgreSQL: a transaction-scoped
/// advisory lock (its key is gc-ingest's own; the function is in `FROM` so
/// the row is an integer, not a `void` the `Any` driver cannot read).
const SCHEMA_LOCK: &str = "SELECT 1 FROM pg_advisory_xact_lock(7312)";

/// A block's checkpoint, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The block.
    pub block: Block,
    /// `claimed`, `done` or `provisional`.
    pub status: String,
    /// Records stored by its last fetch.
    pub records: i64,
    /// Its `totalHits` at the last fetch (`None`: not said).
    pub total_hits: Option<i64>,
    /// Complete fetches stored.
    pub fetches: i64,
    /// Fetches that disagreed with `totalHits` and were fetched again.
    pub mismatches: i64,
}

/// A block's conversations and checkpoint, to store together.
pub struct Done<'a> {
    /// The block.
    pub block: Block,
    /// Its conversations.
    pub conversations: &'a [Value],
    /// What the upstream said it holds.
    pub total_hits: Option<u64>,
    /// Final (older than the watermark) or to fetch again next run.
    pub is_final: bool,
    /// Fetches that were thrown away for a `totalHits` mismatch.
    pub mismatches: u32,
}

/// The database (cheap to clone: a pool).
#[derive(Clone)]
pub struct Sink {
    pool: AnyPool,
    /// Longest one block's store may take (see [`Sink::open_with`]).
    store_timeout: Duration,
}

/// A block's store bound when none is set: a day's block of a busy org is
/// stored in seconds; ten minutes is a database that stopped answering.
pub(crate) const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest any other database call may take (a claim, the checkpoints, the
/// worker name's): each writes a row or reads a small table, so a minute is
/// a database that holds it; a store timeout below it bounds them too.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The fields people query, pulled from one conversation's JSON.
struct Fields<'a> {
    id: Cow<'a, str>,
    start: Cow<'a, str>,
    start_ms: i64,
    end: Option<Cow<'a, str>>,
    direction: Option<Cow<'a, str>>,
    queue: Option<Cow<'a, str>>,
    wrap_up: Option<Cow<'a, str>>,
    media: Option<Cow<'a, str>>,
}

/// `s` with each NUL character written `\u0000`, as JSON writes it.
fn without_nul(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\\u0000"))
    } else {
        Cow::Borrowed(s)
    }
}

impl<'a> Fields<'a> {
    fn of(c: &'a Value) -> Result<Fields<'a>, IngestError> {
        let text = |key: &str| c.get(key).and_then(Value::as_str);
        let id = text("conversationId")
            .filter(|id| !id.is_empty())
            .ok_or_else(|| IngestError::answer("conversation", "no conversationId"))?;
        let start = text("conversationStart")
            .ok_or_else(|| IngestError::answer("conversation", "no conversationStart"))?;
        let sessions = || {
            c.get("participants")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|p| p.get("sessions")?.as_array())
                .flatten()
        };
        let segment_field = |key: &str| {
            sessions()
                .filter_map(|s| s.get("segments")?.as_array())
                .flatten()
                .find_map(|seg| seg.get(key)?.as_str())
        };
        Ok(Fields {
            id: without_nul(id),
            start: without_nul(start),
            // The upstream's answer, not the caller's argument: a bad one
            // fails this block (given back, the run goes on), not the run.
            start_ms: parse_time(start).map_err(|_| {
                IngestError::answer("conversation", "conversationStart is not an RFC 3339 time")
            })?,
            end: text("conversationEnd").map(without_nul),
            direction: text("originatingDirection").map(without_nul),
            queue: segment_field("queueId").map(without_nul),
            wrap_up: segment_field("wrapUpCode").map(without_nul),
            media: sessions()
                .find_map(|s| s.get("mediaType")?.as_str())
                .map(without_nul),
        })
    }
}

fn checkpoint(row: &AnyRow) -> Result<Checkpoint, sqlx::Error> {
    Ok(Checkpoint {
        block: Block {
            start: row.try_get("block_start")?,
            end: row.try_get("block_end")?,
        },
        status: row.try_get("status")?,
        records: row.try_get("records")?,
        total_hits: row.try_get("total_hits")?,
        fetches: row.try_get("fetches")?,
        mismatches: row.try_get("mismatches")?,
    })
}

/// What a file name may hold as is in a `sqlite://` URL's path; anything
/// else (a space, `%`, `?`, `#`, non-ASCII) is percent-encoded, and the
/// driver decodes it back.
const FILE_PATH_CHARS: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The file `path` as the path of a `sqlite://` URL: made absolute (a
/// relative path's first part would read as the URL's host), each
/// character the URL would read as syntax encoded.
fn file_url_path(path: &str) -> Result<String, IngestError> {
    let absolute = std::path::absolute(path)
        .map_err(|e| IngestError::Usage(format!("the sink path cannot be made absolute: {e}")))?;
    let Some(absolute) = absolute.to_str() else {
        return Err(IngestError::Usage(
            "the sink path is not valid UTF-8".into(),
        ));
    };
    Ok(percent_encoding::utf8_percent_encode(absolute, FILE_PATH_CHARS).to_string())
}

impl Sink {
    /// Opens `target`: a `postgres://` URL, a `sqlite:` URL, or a file path
    /// (SQLite, created if missing); creates the tables if needed. Its
    /// store timeout is the default (see [`Sink::open_with`]).
    pub async fn open(target: &str) -> Result<Sink, IngestError> {
        Sink::open_with(target, DEFAULT_STORE_TIMEOUT).await
    }

    /// As [`Sink::open`], each block's store (its transaction, from taking
    /// a connection to the commit) bounded at `store_timeout`: past it the
    /// store fails as a sink error would, and the run ends with its summary
    /// instead of waiting for a database that holds the store (a lock
    /// another session keeps, a server or link that stopped answering) for
    /// ever. The store is an upsert: one whose commit reached the server
    /// anyway is stored again, unchanged, by the next run. Every other call,
    /// the tables' creation here among them (on PostgreSQL it waits for
    /// another worker's under a lock), is bounded by the lesser of it and a
    /// minute.
    pub async fn open_with(target: &str, store_timeout: Duration) -> Result<Sink, IngestError> {
        sqlx::any::install_default_drivers();
        let sqlite = !(target.starts_with("postgres://") || target.starts_with("postgresql://"));
        let url = if !sqlite {
            target.to_owned()
        } else if target.starts_with("sqlite:") {
            // Created if missing, as a bare path is, unless the URL says.
            match (target.contains("mode="), target.contains('?')) {
                (true, _) => target.to_owned(),
                (false, true) => format!("{target}&mode=rwc"),
                (false, false) => format!("{target}?mode=rwc"),
            }
        } else {
            format!("sqlite://{}?mode=rwc", file_url_path(target)?)
        };
        // One connection first, for its own error ("connection refused", "no
        // such directory"): the pool would retry it for its whole acquire
        // timeout and then say only that it timed out.
        {
            use sqlx::Connection as _;
            let first =
                tokio::time::timeout(Duration::from_secs(30), sqlx::AnyConnection::connect(&url))
                    .await
                    .map_err(|_| {
                        IngestError::Sink(sqlx::Error::Io(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the sink did not answer within 30 s",
                        )))
                    })??;
            first.close().await?;
        }
        let mut options = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 8 })
            .acquire_timeout(Duration::from_secs(30));
        if sqlite {
            // One writer at a time: a worker storing a day block waits for
            // another's transaction instead of failing after the default 5 s.
            options = options.after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query(SQLITE_BUSY_TIMEOUT).execute(conn).await?;
                    Ok(())
                })
            });
        }
        let pool = options.connect(&url).await?;
        if sqlite {
            // Several workers may share the file: readers never wait on
            // the writer (sqlx's default busy timeout covers writers).
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await?;
        }
        let sink = Sink {
            pool,
            store_timeout,
        };
        sink.bounded(|| "creating the sink's tables".to_owned(), async {
            if sqlite {
                for statement in SCHEMA {
                    sqlx::query(statement).execute(&sink.pool).await?;
                }
            } else {
                // Workers started at once on a new database would race
                // on the catalog (`IF NOT EXISTS` is no lock: the loser
                // fails on `pg_type_typname_nsp_index`): one creates,
                // the others wait for its commit and find the tables.
                let mut tx = sink.pool.begin().await?;
                sqlx::query(SCHEMA_LOCK).execute(&mut *tx).await?;
                for statement in SCHEMA {
                    sqlx::query(statement).execute(&mut *tx).await?;
                }
                tx.commit().await?;
            }
            Ok(())
        })
        .await?;
        Ok(sink)
    }

    /// Runs `call`, one database call other than a block's store, within
    /// the lesser of the store timeout and [`CALL_TIMEOUT`]; past it, an
    /// error naming `what` and the flag.
    async fn bounded<T>(
        &self,
        what: impl FnOnce() -> String,
        call: impl std::future::Future<Output = Result<T, IngestError>>,
    ) -> Result<T, IngestError> {
        let limit = self.store_timeout.min(CALL_TIMEOUT);
        tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
            Err(IngestError::Sink(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "{} did not finish within {} s (--store-timeout, at most a minute for a call \
                     other than a block's store): the database holds it (a lock, or it stopped \
                     answering)",
                    what(),
                    limit.as_secs_f64()
                ),
            ))))
        })
    }

    /// Every checkpoint, in block order.
    pub async fn checkpoints(&self) -> Result<Vec<Checkpoint>, IngestError> {
        self.bounded(|| "reading the checkpoints".to_owned(), async {
            let rows = sqlx::query(
                "SELECT block_start, block_end, status, records, total_hits, fetches, mismatches
                 FROM ingest_blocks ORDER BY block_start, block_end",
            )
            .fetch_all(&self.pool)
            .await?;
            Ok(rows.iter().map(checkpoint).collect::<Result<_, _>>()?)
        })
        .await
    }

    /// Takes worker name `owner` for run `run_id` (or keeps it: call it
    /// again as a heartbeat): `false` while another run holds it, that is
    /// it was seen after `stale_before_ms` and, when `dead` says so, its
    /// process is not known to be gone. Two runs under one name would both
    /// take the name's block claims and fetch every block twice.
    pub async fn take_worker_name(
        &self,
        owner: &str,
        run_id: &str,
        now_ms: i64,
        stale_before_ms: i64,
    ) -> Result<bool, IngestError> {
        self.bounded(|| "taking the worker name".to_owned(), async {
            let taken = sqlx::query(
                "INSERT INTO ingest_runs (owner, run_id, seen_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (owner) DO UPDATE SET run_id = $2, seen_ms = $3
                   WHERE ingest_runs.run_id = $2 OR ingest_runs.seen_ms < $4",
            )
            .bind(owner)
            .bind(run_id)
            .bind(now_ms)
            .bind(stale_before_ms)
            .execute(&self.pool)
            .await?;
            Ok(taken.rows_affected() == 1)
        })
        .await
    }

    /// Takes worker name `owner` from run `gone` (known to be over), if it
    /// still holds it: of two runs that found it gone, one gets it.
    pub async fn take_worker_name_from(
        &self,
        owner: &str,
        run_id: &str,
        gone: &str,
        now_ms: i64,
    ) -> Result<bool, IngestError> {
        self.bounded(
            || "taking the worker name from a run that is over".to_owned(),
            async {
                let taken = sqlx::query(
                    "UPDATE ingest_runs SET run_id = $2, seen_ms = $3
                     WHERE owner = $1 AND run_id = $4",
                )
                .bind(owner)
                .bind(run_id)
                .bind(now_ms)
                .bind(gone)
                .execute(&self.pool)
                .await?;
                Ok(taken.rows_affected() == 1)
            },
        )
        .await
    }

    /// Says run `run_id` is alive, holding worker name `owner`: `false`
    /// if it no longer does (another run took the name).
    pub async fn renew_worker_name(
        &self,
        owner: &str,
        run_id: &str,
        now_ms: i64,
    ) -> Result<bool, IngestError> {
        self.bounded(|| "renewing the worker name".to_owned(), async {
            let renewed =
                sqlx::query("UPDATE ingest_runs SET seen_ms = $3 WHERE owner = $1 AND run_id = $2")
                    .bind(owner)
                    .bind(run_id)
                    .bind(now_ms)
                    .execute(&self.pool)
                    .await?;
            Ok(renewed.rows_affected() == 1)
        })
        .await
    }

    /// The run that holds worker name `owner`, if any: its id and when it
    /// was last seen.
    pub async fn worker_name_holder(
        &self,
        owner: &str,
    ) -> Result<Option<(String, i64)>, IngestError> {
        self.bounded(|| "reading who holds the worker name".to_owned(), async {
            let row = sqlx::query("SELECT run_id, seen_ms FROM ingest_runs WHERE owner = $1")
                .bind(owner)
                .fetch_optional(&self.pool)
                .await?;
            Ok(match row {
                Some(r) => Some((r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)?)),
                None => None,
            })
        })
        .await
    }

    /// Gives worker name `owner` back at the end of run `run_id`.
    pub async fn release_worker_name(&self, owner: &str, run_id: &str) -> Result<(), IngestError> {
        self.bounded(|| "giving the worker name back".to_owned(), async {
            sqlx::query("DELETE FROM ingest_runs WHERE owner = $1 AND run_id = $2")
                .bind(owner)
                .bind(run_id)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }

    /// Claims `block` for `owner` until `now + ttl`: `true` if it is now
    /// ours (unclaimed, our own, or its claim expired) and not done.
    pub async fn claim(
        &self,
        block: Block,
        owner: &str,
        now_ms: i64,
        ttl: Duration,
    ) -> Result<bool, IngestError> {
        self.bounded(|| format!("claiming the block {block}", block = block.interval()), async {
            let expires = now_ms + ttl.as_millis() as i64;
            let claimed = sqlx::query(
                "INSERT INTO ingest_blocks (block_start, block_end, status, owner, claim_expires_ms, updated_ms)
                 VALUES ($1, $2, 'claimed', $3, $4, $5)
                 ON CONFLICT (block_start, block_end) DO UPDATE
                   SET status = 'claimed', owner = $3, claim_expires_ms = $4, updated_ms = $5
                   WHERE ingest_blocks.status <> 'done'
                     AND (ingest_blocks.status <> 'claimed'
                          OR ingest_blocks.owner = $3
                          OR ingest_blocks.claim_expires_ms < $5)",
            )
            .bind(block.start)
            .bind(block.end)
            .bind(owner)
            .bind(expires)
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
            Ok(claimed.rows_affected() == 1)
        })
        .await
    }

    /// Stores a block's conversations (upserts by id) and its checkpoint
    /// in one transaction, within the store timeout.
    pub async fn store(&self, done: Done<'_>, now_ms: i64) -> Result<(), IngestError> {
        let block = done.block.interval();
        tokio::time::timeout(self.store_timeout, self.store_now(done, now_ms))
            .await
            .unwrap_or_else(|_| {
                Err(IngestError::Sink(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "storing the block {block} did not finish within {} s \
                         (--store-timeout): the database holds it (a lock, or it stopped answering)",
                        self.store_timeout.as_secs_f64()
                    ),
                ))))
            })
    }

    async fn store_now(&self, done: Done<'_>, now_ms: i64) -> Result<(), IngestError> {
        let fields = done
            .conversations
            .iter()
            .map(Fields::of)
            .collect::<Result<Vec<_>, _>>()?;
        let mut tx = self.pool.begin().await?;
        for (chunk, raws) in fields
            .chunks(ROWS_PER_INSERT)
            .zip(done.conversations.chunks(ROWS_PER_INSERT))
        {
            let sql = upsert_sql(chunk.len());
            let mut q = sqlx::query(&sql);
            for (f, raw) in chunk.iter().zip(raws) {
                q = q
                    .bind(&*f.id)
                    .bind(&*f.start)
                    .bind(f.end.as_deref())
                    .bind(f.start_ms)
                    .bind(f.direction.as_deref())
                    .bind(f.queue.as_deref())
                    .bind(f.wrap_up.as_deref())
                    .bind(f.media.as_deref())
                    .bind(raw.to_string());
            }
            q.execute(&mut *tx).await?;
        }
        sqlx::query(
            "UPDATE ingest_blocks
             SET status = $3, records = $4, total_hits = $5, fetches = fetches + 1,
                 mismatches = mismatches + $6, owner = NULL, claim_expires_ms = 0, updated_ms = $7
             WHERE block_start = $1 AND block_end = $2",
        )
        .bind(done.block.start)
        .bind(done.block.end)
        .bind(if done.is_final { "done" } else { "provisional" })
        .bind(done.conversations.len() as i64)
        .bind(done.total_hits.map(|t| t as i64))
        .bind(i64::from(done.mismatches))
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Gives up `owner`'s claim on `block` (after a failure), so another
    /// worker or the next run takes it at once.
    pub async fn unclaim(&self, block: Block, owner: &str) -> Result<(), IngestError> {
        self.bounded(
            || {
                format!(
                    "giving the claim on the block {block} back",
                    block = block.interval()
                )
            },
            async {
                sqlx::query(
                    "UPDATE ingest_blocks SET claim_expires_ms = 0
                 WHERE block_start = $1 AND block_end = $2 AND owner = $3 AND status = 'claimed'",
                )
                .bind(block.start)
                .bind(block.end)
                .bind(owner)
                .execute(&self.pool)
                .await?;
                Ok(())
            },
        )
        .await
    }

    /// Every stored conversation id, sorted.
    pub async fn conversation_ids(&self) -> Result<Vec<String>, IngestError> {
        let rows =
            sqlx::query("SELECT conversation_id FROM conversations ORDER BY conversation_id")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<Result<_, _>>()?)
    }

    /// Stored conversations.
    pub async fn count(&self) -> Result<i64, IngestError> {
        let row = sqlx::query("SELECT COUNT(*) FROM conversations")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>(0)?)
    }

    /// Closes the pool (waits for its connections).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// `INSERT … ON CONFLICT (conversation_id) DO UPDATE` of `rows` rows, with
/// `$n` placeholders (both databases take them).
fn upsert_sql(rows: usize) -> String {
    const COLUMNS: usize = 9;
    let mut sql = String::from(
        "INSERT INTO conversations (conversation_id, conversation_start, conversation_end, start_ms, \
         direction, queue_id, wrap_up_code, media_type, raw) VALUES ",
    );
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 0..COLUMNS {
            if c > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("${}", r * COLUMNS + c + 1));
        }
        sql.push(')');
    }
    sql.push_str(
        " ON CONFLICT (conversation_id) DO UPDATE SET \
         conversation_start = excluded.conversation_start, conversation_end = excluded.conversation_end, \
         start_ms = excluded.start_ms, direction = excluded.direction, queue_id = excluded.queue_id, \
         wrap_up_code = excluded.wrap_up_code, media_type = excluded.media_type, raw = excluded.raw",
    );
    sql
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_queried_fields_come_from_the_documented_places() {
        let c = json!({
            "conversationId": "c1",
            "conversationStart": "2026-11-01T00:00:01.000Z",
            "conversationEnd": "2026-11-01T00:10:00.000Z",
            "originatingDirection": "inbound",
            "participants": [
                { "purpose": "ivr", "sessions": [{ "mediaType": "voice", "segments": [{}] }] },
                { "purpose": "agent", "sessions": [{ "segments": [
                    { "queueId": "q1" }, { "wrapUpCode": "w1" }
                ] }] }
            ]
        });
        let f = Fields::of(&c).unwrap();
        assert_eq!(f.id, "c1");
        assert_eq!(f.start_ms, parse_time("2026-11-01T00:00:01Z").unwrap());
        assert_eq!(
            (
                f.direction.as_deref(),
                f.queue.as_deref(),
                f.wrap_up.as_deref(),
                f.media.as_deref()
            ),
            (Some("inbound"), Some("q1"), Some("w1"), Some("voice"))
        );
        assert!(Fields::of(&json!({ "conversationStart": "2026-11-01" })).is_err());
        let garbled = json!({ "conversationId": "c", "conversationStart": "yesterday" });
        assert!(
            matches!(Fields::of(&garbled), Err(IngestError::Answer { .. })),
            "a bad time in an answer is the answer's fault, not a usage error"
        );
    }

    /// PostgreSQL's `TEXT` cannot hold a NUL: the queried fields write it
    /// as JSON does, and the raw JSON text escapes it on its own.
    #[test]
    fn a_nul_in_a_queried_field_is_written_as_json_writes_it() {
        let c = json!({
            "conversationId": "c\u{0}1",
            "conversationStart": "2026-11-01T00:00:01.000Z",
            "conversationEnd": "2026-11-01T00:10:00.000Z\u{0}",
            "originatingDirection": "in\u{0}bound",
            "participants": [{ "sessions": [{ "mediaType": "\u{0}voice", "segments": [
                { "queueId": "q1\u{0}", "wrapUpCode": "w\u{0}\u{0}1" }
            ] }] }]
        });
        let f = Fields::of(&c).unwrap();
        assert_eq!(f.id, "c\\u00001");
        assert_eq!(
            (
                f.end.as_deref(),
                f.direction.as_deref(),
                f.queue.as_deref(),
                f.wrap_up.as_deref(),
                f.media.as_deref()
            ),
            (
                Some("2026-11-01T00:10:00.000Z\\u0000"),
                Some("in\\u0000bound"),
                Some("q1\\u0000"),
                Some("w\\u0000\\u00001"),
                Some("\\u0000voice")
            )
        );
        let raw = c.to_string();
        assert!(
            !raw.contains('\0') && raw.contains(r#""q1\u0000""#),
            "{raw}"
        );
        assert_eq!(serde_json::from_str::<Value>(&raw).unwrap(), c);
    }

    #[tokio::test]
    async fn a_sink_file_is_created_under_exactly_the_name_given() {
        let dir = std::env::temp_dir().join(format!("gc-ingest-names-{}", std::process::id()));
        let dir = dir.join("sp ace");
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["pct%41.db", "q?x.db", "h#x.db", "é.db"] {
            let path = dir.join(name);
            let sink = Sink::open(path.to_str().unwrap()).await.unwrap();
            sink.close().await;
            assert!(path.exists(), "{name}: not created under its name");
        }
        assert!(!dir.join("pctA.db").exists());
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
        // A relative path's first part is a directory, not a URL's host.
        let url = file_url_path("sp ace/x.db").unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert!(url.starts_with('/'), "{url}");
        assert!(url.ends_with("/sp%20ace/x.db"), "{url}");
        assert!(url.len() > cwd.to_str().unwrap().len(), "{url}");
    }

    #[test]
    fn upsert_numbers_every_placeholder() {
        let sql = upsert_sql(2);
        assert!(sql.contains("($1, $2, $3, $4, $5, $6, $7, $8, $9), ($10,"));
        assert!(sql.contains("$18)"));
        assert!(!sql.contains("$19"));
    }

    #[tokio::test]
    async fn a_sqlite_url_creates_its_file_and_an_unreachable_database_says_why() {
        let path = std::env::temp_dir().join(format!("gc-ingest-url-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let sink = Sink::open(&format!("sqlite:{}", path.display()))
            .await
            .unwrap();
        sink.close().await;
        assert!(path.exists());
        let _ = std::fs::remove_file(&path);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let Err(e) = Sink::open(&format!("postgres://u:p@127.0.0.1:{port}/db")).await else {
            panic!("a sink from nowhere")
        };
        assert!(e.to_string().contains("refused"), "{e}");
    }

    #[tokio::test]
    async fn a_block_is_stored_once_claimed_once_and_upserted_on_refetch() {
        let dir = std::env::temp_dir().join(format!("gc-ingest-sink-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.db");
        let _ = std::fs::remove_file(&path);
        let sink = Sink::open(path.to_str().unwrap()).await.unwrap();
        let block = Block { start: 0, end: 10 };
        let ttl = Duration::from_secs(60);
        assert!(sink.claim(block, "a", 1, ttl).await.unwrap());
        assert!(!sink.claim(block, "b", 2, ttl).await.unwrap(), "a holds it");
        assert!(
            sink.claim(block, "b", 60_002, ttl).await.unwrap(),
            "expired"
        );
        let rows = [
            json!({ "conversationId": "x", "conversationStart": "1970-01-01T00:00:00.001Z" }),
            json!({ "conversationId": "y", "conversationStart": "1970-01-01T00:00:00.002Z" }),
        ];
        let done = |is_final| Done {
            block,
            conversations: &rows,
            total_hits: Some(2),
            is_final,
            mismatches: 0,
        };
        sink.store(done(false), 3).await.unwrap();
        assert!(sink.claim(block, "a", 4, ttl).await.unwrap(), "provisional");
        sink.store(done(true), 5).await.unwrap();
        assert!(!sink.claim(block, "a", 6, ttl).await.unwrap(), "done");
        assert_eq!(sink.conversation_ids().await.unwrap(), ["x", "y"]);
        let cp = sink.checkpoints().await.unwrap();
        assert_eq!(
            (cp[0].status.as_str(), cp[0].fetches, cp[0].records),
            ("done", 2, 2)
        );
        sink.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
