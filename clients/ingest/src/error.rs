//! Why an ingestion run stops: a bad argument, the sink, the upstream
//! (through the broker), or an answer it cannot use.

use gc_upstream::UpstreamError;

/// Why a run (or one block of it) failed.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// A command-line value or setting that cannot be used.
    #[error("{0}")]
    Usage(String),
    /// The database refused or failed.
    #[error("sink: {0}")]
    Sink(#[from] sqlx::Error),
    /// The upstream call could not be made (lease, login, transport).
    #[error("upstream: {0}")]
    Upstream(#[from] UpstreamError),
    /// The upstream answered with a status that retrying will not fix.
    #[error("{what} answered HTTP {status}: {message}")]
    Status {
        /// Which request.
        what: &'static str,
        /// The status.
        status: u16,
        /// The start of the body.
        message: String,
    },
    /// An answer that is not what the API documents.
    #[error("{what}: unexpected answer: {message}")]
    Answer {
        /// Which request.
        what: &'static str,
        /// What was wrong.
        message: String,
    },
    /// A job the upstream gave up on (FAILED, CANCELLED, EXPIRED).
    #[error("job for {interval} ended {state}")]
    JobFailed {
        /// The block's interval.
        interval: String,
        /// The job's last state.
        state: String,
    },
    /// A job not fulfilled within the wait allowed it: deleted upstream,
    /// its block left for the next run.
    #[error("job {job} for {interval} was not fulfilled within {waited_s} s (--job-wait): deleted upstream, the block is left for the next run")]
    JobTimedOut {
        /// The job's id.
        job: String,
        /// The block's interval.
        interval: String,
        /// The wait allowed, seconds.
        waited_s: u64,
    },
    /// A job's results gave a cursor they had given before: following it
    /// would read the same pages again, without end.
    #[error("job {job} for {interval}: results page {page} gave a cursor an earlier page gave; the job's results would repeat forever, so the block is left for the next run")]
    CursorRepeated {
        /// The job's id.
        job: String,
        /// The block's interval.
        interval: String,
        /// The results page that gave it (1: the first).
        page: u64,
    },
    /// A job's results went on for more pages than its count of records
    /// fills: following them would page without end.
    #[error("job {job} for {interval}: its results went on past page {pages}, {why}; they would page forever, so the block is left for the next run")]
    TooManyPages {
        /// The job's id.
        job: String,
        /// The block's interval.
        interval: String,
        /// The pages allowed, all read.
        pages: u64,
        /// Why that many: the job's count of records at the page size.
        why: String,
    },
    /// A worker panicked: a bug in gc-ingest, not in the sink or the
    /// upstream.
    #[error("a worker panicked ({0}): this is a bug in gc-ingest, please report it with the log; blocks stored so far are kept, run again to finish")]
    WorkerPanicked(String),
    /// Another run is working on this sink under the same worker name.
    #[error("{0}")]
    WorkerBusy(String),
    /// A block still disagreed with its `totalHits` after every attempt.
    #[error("block {interval}: {received} distinct records received, totalHits {total_hits}, after {attempts} attempts")]
    Mismatch {
        /// The block's interval.
        interval: String,
        /// Distinct records received in the last attempt.
        received: u64,
        /// What the upstream said there are.
        total_hits: u64,
        /// Attempts made.
        attempts: u32,
    },
}

impl IngestError {
    /// A database that could not be reached (down, restarting, not
    /// answering): the same run may pass later, unlike a refusal (a wrong
    /// password, a database that does not exist, a path that cannot be).
    pub fn may_pass_later(&self) -> bool {
        match self {
            IngestError::Sink(sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut) => true,
            // PostgreSQL starting up or shutting down (57P01–57P03), out of
            // connections or resources (class 53), or a connection broken
            // (class 08): the server is there and will take us later.
            IngestError::Sink(sqlx::Error::Database(e)) => sqlstate(&**e).is_some_and(|c| {
                c.starts_with("08") || c.starts_with("53") || c.starts_with("57P0")
            }),
            _ => false,
        }
    }

    /// An error about one block's records, not the sink or the run: a
    /// record the sink cannot read, or a value the database refuses
    /// (SQLSTATE class 22, data exception: a string too long for its
    /// column, a byte the encoding cannot hold). The block fails and the
    /// run goes on; failing the run would stop every run at that block.
    pub fn fails_only_its_block(&self) -> bool {
        match self {
            IngestError::Answer { .. } => true,
            IngestError::Sink(sqlx::Error::Database(e)) => {
                sqlstate(&**e).is_some_and(|c| c.starts_with("22"))
            }
            _ => false,
        }
    }

    /// A non-2xx answer, with at most 200 characters of its body.
    pub(crate) fn status(what: &'static str, status: u16, body: &str) -> IngestError {
        IngestError::Status {
            what,
            status,
            message: body.chars().take(200).collect(),
        }
    }

    /// A body that does not parse as documented.
    pub(crate) fn answer(what: &'static str, e: impl std::fmt::Display) -> IngestError {
        IngestError::Answer {
            what,
            message: e.to_string().chars().take(200).collect(),
        }
    }
}

/// The SQLSTATE of a PostgreSQL error: five digits or capitals. SQLite's
/// codes, as sqlx gives them (decimal numbers such as `531` or `5386`),
/// would read as SQLSTATE classes they are not.
fn sqlstate(e: &dyn sqlx::error::DatabaseError) -> Option<std::borrow::Cow<'_, str>> {
    if e.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        return None;
    }
    e.code().filter(|c| {
        c.len() == 5
            && c.bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
    })
}

#[cfg(test)]
mod tests {
    use super::IngestError;
    use std::borrow::Cow;

    /// A database error with only a SQLSTATE, as PostgreSQL sends one.
    #[derive(Debug)]
    struct Coded(&'static str);

    impl std::fmt::Display for Coded {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "SQLSTATE {}", self.0)
        }
    }

    impl std::error::Error for Coded {}

    impl sqlx::error::DatabaseError for Coded {
        fn message(&self) -> &str {
            self.0
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    /// A PostgreSQL that is starting, stopping or out of connections is a
    /// run to try again later (exit 1), not a refusal (exit 2).
    #[test]
    fn a_database_that_is_busy_or_restarting_may_pass_later() {
        let sink = |code| IngestError::Sink(sqlx::Error::Database(Box::new(Coded(code))));
        for code in ["57P03", "57P01", "53300", "08006"] {
            assert!(sink(code).may_pass_later(), "{code}");
        }
        // A wrong password, a database that does not exist.
        for code in ["28P01", "3D000", "42501"] {
            assert!(!sink(code).may_pass_later(), "{code}");
        }
    }

    /// SQLite's codes are decimal numbers (`531`: a commit hook's
    /// constraint, `5386`: a shared-memory I/O error): not SQLSTATEs of a
    /// database that is busy (class 53) or a connection broken (08).
    #[test]
    fn a_code_that_is_not_a_sqlstate_is_not_read_as_one() {
        let sink = |code| IngestError::Sink(sqlx::Error::Database(Box::new(Coded(code))));
        for code in [
            "531", "5386", "53", "0800", "5300", "08", "57P0", "53300X", "22",
        ] {
            assert!(!sink(code).may_pass_later(), "{code}");
            assert!(!sink(code).fails_only_its_block(), "{code}");
        }
    }

    /// A value PostgreSQL refuses (a NUL in a string, a string too long
    /// for its column) is about one block's records: that block fails and
    /// the run goes on, where a sink that is down or refuses us ends it.
    #[test]
    fn a_data_exception_fails_only_its_block() {
        let sink = |code| IngestError::Sink(sqlx::Error::Database(Box::new(Coded(code))));
        for code in ["22021", "22001", "22P02", "22003"] {
            assert!(sink(code).fails_only_its_block(), "{code}");
        }
        // Down or restarting, out of connections, a table missing, no
        // permission, a constraint.
        for code in ["57P01", "08006", "53300", "42P01", "42501", "23505"] {
            assert!(!sink(code).fails_only_its_block(), "{code}");
        }
        assert!(!IngestError::Sink(sqlx::Error::PoolTimedOut).fails_only_its_block());
        assert!(IngestError::answer("conversation", "no conversationStart").fails_only_its_block());
    }
}
