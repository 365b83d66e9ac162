//! Opening the queue's database: the queue URL and its SQLite file, the
//! lock file that keeps a SQLite queue to one serving relay, the pools a
//! serving relay writes through, the first PostgreSQL connection (for an
//! error that says why), and the single connection of a command that opens
//! a queue as it is.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Connection as _;

use super::shown;
use crate::error::RelayError;

/// How long a write waits for a PostgreSQL connection.
const PG_ACQUIRE: Duration = Duration::from_secs(2);
/// How long the first connection to PostgreSQL may take.
const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// How long a statement waits for SQLite's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The file of a SQLite queue URL (`sqlite:PATH`, `sqlite://PATH` or a bare
/// path); `None` for PostgreSQL (`postgres://`, `postgresql://`). Any other
/// URL scheme (`mysql://`) is an error, not a file name.
pub fn sqlite_path(url: &str) -> Result<Option<&str>, RelayError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(None);
    }
    if let Some(path) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        return Ok(Some(path));
    }
    if let Some((scheme, _)) = url.split_once("://") {
        let scheme: String = scheme.chars().take(20).collect();
        return Err(RelayError::Settings(format!(
            "the queue URL's scheme {scheme:?} is not supported: give a SQLite file \
             (sqlite:PATH or a path) or a postgres:// URL"
        )));
    }
    Ok(Some(url))
}

/// Takes `<path>.lock` for a serving relay: a second one on the same SQLite
/// file would release the first one's claims at its start and send their
/// records upstream again. (The CLI's inspections do not take it.) The
/// lock goes with the process, even a killed one.
pub(crate) fn lock_queue_file(path: &str) -> Result<std::fs::File, RelayError> {
    let lock_path = format!("{path}.lock");
    let (path, lock_shown) = (shown(path), shown(&lock_path));
    let io = |what: String| {
        move |source| RelayError::Io {
            what: what.clone(),
            source,
        }
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(format!("open the queue's lock file {lock_shown}")))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(RelayError::State(format!(
            "another relay uses the queue {path} (it holds {lock_shown}): one relay per SQLite \
             file; stop it first, or run several on PostgreSQL"
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(io(format!("lock the queue's lock file {lock_shown}"))(e))
        }
    }
}

/// Opens the SQLite queue at `path` (created if missing), `connections`
/// at most.
pub(super) async fn sqlite(path: &str, connections: u32) -> Result<SqlitePool, RelayError> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(BUSY_TIMEOUT);
    SqlitePoolOptions::new()
        .max_connections(connections)
        // A write SQLite rolled back by itself (disk full, I/O
        // error) leaves the driver's transaction count behind, and
        // that connection then refuses every BEGIN: close it, so
        // the pool opens a sound one once there is room again.
        .after_release(|conn, _| {
            Box::pin(async move { Ok(!sqlx::Connection::is_in_transaction(conn)) })
        })
        .connect_with(options)
        .await
        .map_err(|e| RelayError::db(&format!("open the SQLite queue {}", shown(path)), e))
}

/// One connection to the PostgreSQL queue at `url`, first, for its own
/// error (connection refused, no such database, a wrong password): a pool
/// would retry for its whole acquire timeout, then say only that it timed
/// out.
pub(super) async fn connect_postgres(url: &str) -> Result<PgConnection, RelayError> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e| RelayError::db("connect to PostgreSQL", e))?;
    connect_postgres_with(&options).await
}

/// [`connect_postgres`] with `options`.
async fn connect_postgres_with(options: &PgConnectOptions) -> Result<PgConnection, RelayError> {
    tokio::time::timeout(CONNECT_WAIT, PgConnection::connect_with(options))
        .await
        .map_err(|_| {
            let e = std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {} s", CONNECT_WAIT.as_secs()),
            );
            RelayError::db("connect to PostgreSQL", sqlx::Error::Io(e))
        })?
        .map_err(|e| RelayError::db("connect to PostgreSQL", e))
}

/// A pool of `connections` at most to the PostgreSQL queue at `url`.
pub(super) async fn postgres(url: &str, connections: u32) -> Result<PgPool, RelayError> {
    PgPoolOptions::new()
        .max_connections(connections)
        // A server gone away fails a write within this (sqlx's 30 s
        // default held every intake behind the writer's batch that long,
        // past any Data Action's timeout): intake answers 503 and the flow
        // retries.
        .acquire_timeout(PG_ACQUIRE)
        .connect(url)
        .await
        .map_err(|e| RelayError::db("connect to PostgreSQL", e))
}

/// The SQLite queue at `path` as it is, for
/// [`Queue::open_existing`](super::Queue::open_existing) (read-only if
/// `read_only`): one connection.
pub(super) async fn sqlite_existing(path: &str, read_only: bool) -> Result<SqlitePool, RelayError> {
    // Not created: a mistyped path would be a new, empty queue,
    // reported as all zeros.
    if !std::path::Path::new(path).exists() {
        return Err(RelayError::Settings(format!(
            "there is no queue at {}: give the --queue (or GC_RELAY_QUEUE) that \
             gc-relay serve uses",
            shown(path)
        )));
    }
    let options = SqliteConnectOptions::new()
        .filename(path)
        .read_only(read_only)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(BUSY_TIMEOUT);
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .map_err(|e| RelayError::db(&format!("open the SQLite queue {}", shown(path)), e))
}

/// The PostgreSQL queue at `url` as it is, for
/// [`Queue::open_existing`](super::Queue::open_existing) (its transactions
/// read-only if `read_only`): one connection.
pub(super) async fn postgres_existing(url: &str, read_only: bool) -> Result<PgPool, RelayError> {
    let connect = |e| RelayError::db("connect to PostgreSQL", e);
    let mut options: PgConnectOptions = url.parse().map_err(connect)?;
    if read_only {
        options = options.options([("default_transaction_read_only", "on")]);
    }
    // One connection first, as `serve` makes, for its own error
    // (connection refused, at once): the pool would retry for its
    // whole acquire timeout, then say only that it timed out.
    let first = connect_postgres_with(&options).await?;
    // A failed goodbye is no reason not to go on.
    let _ = first.close().await;
    PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(CONNECT_WAIT)
        .connect_with(options)
        .await
        .map_err(connect)
}
