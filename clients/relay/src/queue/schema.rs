//! The queue's tables and indexes, on SQLite and on PostgreSQL, and the
//! migrations that bring a queue written by an earlier version to this
//! one (on PostgreSQL without stopping the relays that use it); and the
//! check that a queue opened as it is has what `status` and `dlq` read.

use std::time::Duration;

use sqlx::postgres::PgConnection;
use sqlx::sqlite::SqlitePool;
use sqlx::Connection as _;

use super::sql::HELD_MS;
use super::{with_pool, Db};
use crate::error::RelayError;

/// How long a statement of the PostgreSQL migration waits for a lock
/// before it gives up (the relay then serves with the indexes there are).
pub(super) const MIGRATION_LOCK_WAIT: Duration = Duration::from_secs(5);

/// The tables and columns `status` and `dlq` read.
const READ_COLUMNS: [(&str, &[&str]); 2] = [
    (
        "relay_records",
        &[
            "id",
            "idem_key",
            "order_key",
            "method",
            "path",
            "body",
            "bytes",
            "state",
            "attempts",
            "received_ms",
            "not_before_ms",
            "lease_owner",
            "lease_until_ms",
            "done_ms",
        ],
    ),
    (
        "relay_dead_letters",
        &["record_id", "status", "answer", "dead_ms"],
    ),
];

/// The queue's tables, `id` being its primary key's definition.
fn tables(id: &str) -> [String; 2] {
    [
        format!(
            "CREATE TABLE IF NOT EXISTS relay_records ( \
               {id}, \
               idem_key TEXT NOT NULL UNIQUE, \
               order_key TEXT NOT NULL, \
               method TEXT NOT NULL, \
               path TEXT NOT NULL, \
               body TEXT, \
               bytes BIGINT NOT NULL, \
               state TEXT NOT NULL, \
               attempts BIGINT NOT NULL DEFAULT 0, \
               received_ms BIGINT NOT NULL, \
               not_before_ms BIGINT NOT NULL, \
               lease_owner TEXT, \
               lease_until_ms BIGINT, \
               done_ms BIGINT)"
        ),
        "CREATE TABLE IF NOT EXISTS relay_dead_letters ( \
           record_id BIGINT PRIMARY KEY, \
           status BIGINT NOT NULL, \
           answer TEXT NOT NULL, \
           dead_ms BIGINT NOT NULL)"
            .into(),
    ]
}

/// The queue's indexes: name, table, columns.
pub(super) const INDEXES: [(&str, &str, &str); 4] = [
    // The claim's candidates, due first; and the state's records (claims
    // to give back, records to prune, the figures).
    (
        "relay_records_due",
        "relay_records",
        "state, not_before_ms, id",
    ),
    // Whether an older record of a key is open: one probe per state, not
    // a walk through the key's delivered history.
    (
        "relay_records_order_state",
        "relay_records",
        "order_key, state, id",
    ),
    // The figures of the records pending or in flight (`/status`, the
    // recount) read from the index alone, not from every record.
    (
        "relay_records_open",
        "relay_records",
        "state, received_ms, bytes",
    ),
    ("relay_dead_letters_age", "relay_dead_letters", "dead_ms"),
];

/// Indexes of queues written before [`INDEXES`], superseded by them.
pub(super) const SUPERSEDED: [&str; 2] = ["relay_records_state", "relay_records_order"];

/// Holds the records behind each dead letter of a SQLite queue written by
/// a version that did not: one relay per file, so nothing races it. (The
/// release of held records with nothing ahead follows at every open, see
/// [`Queue::release_stranded`](super::Queue::release_stranded).)
pub(super) async fn hold_sqlite(pool: &SqlitePool) -> Result<(), RelayError> {
    let what = |e| RelayError::db("hold the records behind dead letters", e);
    let dead: Option<i64> =
        sqlx::query_scalar("SELECT id FROM relay_records WHERE state = 'dead' LIMIT 1")
            .fetch_optional(pool)
            .await
            .map_err(what)?;
    if dead.is_some() {
        sqlx::query(
            "UPDATE relay_records SET not_before_ms = ? \
             WHERE state = 'pending' AND not_before_ms < ? \
               AND EXISTS (SELECT 1 FROM relay_records d WHERE d.order_key = relay_records.order_key \
                 AND d.state = 'dead' AND d.id < relay_records.id)",
        )
        .bind(HELD_MS)
        .bind(HELD_MS)
        .execute(pool)
        .await
        .map_err(what)?;
    }
    Ok(())
}

/// Brings a SQLite queue to this version: one relay per file (its lock
/// file), so plain statements lock nobody else out.
pub(super) async fn migrate_sqlite(pool: &SqlitePool) -> Result<(), RelayError> {
    let mut statements = tables("id INTEGER PRIMARY KEY AUTOINCREMENT").to_vec();
    for (name, table, columns) in INDEXES {
        statements.push(format!(
            "CREATE INDEX IF NOT EXISTS {name} ON {table} ({columns})"
        ));
    }
    for name in SUPERSEDED {
        statements.push(format!("DROP INDEX IF EXISTS {name}"));
    }
    for s in &statements {
        sqlx::raw_sql(s)
            .execute(pool)
            .await
            .map_err(|e| RelayError::db("create the queue's tables", e))?;
    }
    Ok(())
}

/// Brings a PostgreSQL queue, which other relays may be using, to this
/// version without stopping them: the tables are created only in a new
/// database, and indexes are built `CONCURRENTLY` (intake and claims go
/// on). Every wait for a lock is cut at `lock_wait`: a build that runs
/// into it is given up, logged, and tried again at the next start (an
/// index such a build left invalid is dropped and built again), and the
/// relay serves meanwhile with the indexes there are.
///
/// The superseded indexes are left in place: a relay of a previous
/// release (in a rolling deploy, or a rollback) creates them at its start
/// with a plain `CREATE INDEX`, which would hold every relay's intake for
/// the whole build of an index dropped under it. An operator drops them
/// once no relay of a previous release runs.
pub(super) async fn migrate_postgres(
    conn: &mut PgConnection,
    lock_wait: Duration,
) -> Result<(), RelayError> {
    let what = |e| RelayError::db("create the queue's tables", e);
    sqlx::query(&format!("SET lock_timeout = {}", lock_wait.as_millis()))
        .execute(&mut *conn)
        .await
        .map_err(what)?;
    let exist: bool = sqlx::query_scalar(
        "SELECT to_regclass('relay_records') IS NOT NULL \
           AND to_regclass('relay_dead_letters') IS NOT NULL",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(what)?;
    if !exist {
        // Relays started at once on a new database create them one after
        // the other (the lock a previous release takes for the same).
        let mut tx = conn.begin().await.map_err(what)?;
        sqlx::query("SELECT pg_advisory_xact_lock(7311)")
            .execute(&mut *tx)
            .await
            .map_err(what)?;
        for s in tables("id BIGSERIAL PRIMARY KEY") {
            sqlx::query(&s).execute(&mut *tx).await.map_err(what)?;
        }
        tx.commit().await.map_err(what)?;
    }
    // One relay builds at a time; held until this connection closes. A
    // relay that finds it taken serves without waiting for the build.
    let builder: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(7312)")
        .fetch_one(&mut *conn)
        .await
        .map_err(what)?;
    if !builder {
        tracing::info!("another relay is building the queue's indexes; serving meanwhile");
        return Ok(());
    }
    for (name, table, columns) in INDEXES {
        match build_index(conn, name, table, columns).await {
            Ok(()) => {}
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
                tracing::warn!(
                    index = name,
                    lock_wait_ms = lock_wait.as_millis() as u64,
                    "the queue's index was not built: a lock was held longer than the wait; \
                     serving without it, and building it at the next start"
                );
                return Ok(());
            }
            Err(e) => {
                return Err(RelayError::db(
                    &format!("build the queue's index {name}"),
                    e,
                ))
            }
        }
    }
    Ok(())
}

/// Builds index `name` of `table` on `columns` concurrently, unless it is
/// there and valid; one an interrupted build left invalid is dropped first.
async fn build_index(
    conn: &mut PgConnection,
    name: &str,
    table: &str,
    columns: &str,
) -> Result<(), sqlx::Error> {
    let valid: Option<bool> =
        sqlx::query_scalar("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)")
            .bind(name)
            .fetch_optional(&mut *conn)
            .await?;
    match valid {
        Some(true) => return Ok(()),
        Some(false) => {
            sqlx::query(&format!("DROP INDEX CONCURRENTLY IF EXISTS {name}"))
                .execute(&mut *conn)
                .await?;
        }
        None => {}
    }
    tracing::info!(index = name, "building the queue's index");
    sqlx::query(&format!(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table} ({columns})"
    ))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The first table or column in [`READ_COLUMNS`] that the queue lacks, as
/// `table` or `table.column`.
pub(super) async fn missing_column(db: &Db) -> Result<Option<String>, RelayError> {
    let sql = match db {
        Db::Sqlite(_) => "SELECT name FROM pragma_table_info(?)",
        Db::Postgres(_) => {
            "SELECT attname::text FROM pg_attribute \
             WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped"
        }
    };
    let what = |e| RelayError::db("read the queue's tables", e);
    for (table, wanted) in READ_COLUMNS {
        let have: Vec<String> = with_pool!(db, pool => {
            sqlx::query_scalar(sql).bind(table).fetch_all(pool).await.map_err(what)?
        });
        if have.is_empty() {
            return Ok(Some(table.to_owned()));
        }
        if let Some(column) = wanted.iter().find(|c| !have.iter().any(|h| h == *c)) {
            return Ok(Some(format!("{table}.{column}")));
        }
    }
    Ok(None)
}
