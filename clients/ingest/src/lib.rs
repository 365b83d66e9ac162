//! gc-ingest: years of Genesys Cloud conversation details into a SQL
//! database, every upstream call leased through quota-broker as class
//! `batch`, with nothing lost and nothing duplicated.
//!
//! # Layout
//!
//! - `plan`: the range cut into hour or day [`Block`]s, the watermark
//!   (blocks newer than it are provisional), timestamps.
//! - `source`: a block's conversations from the details query (paged) or
//!   the details jobs (submit, poll, cursor-paged results), through
//!   [`gc_upstream::Upstream`] (OAuth, lease, call, report, retry).
//! - `sink`: SQLite or PostgreSQL: conversations upserted by id, one
//!   checkpoint row per block, block claims for several workers.
//! - `run`: the workers: claim → fetch → check against `totalHits` →
//!   store rows and checkpoint in one transaction; a failure of the sink
//!   halts them all (a value it refuses fails only its block); the
//!   [`Summary`], a failed run's too ([`RunFailed`]).
//! - `progress`: the bar on a terminal, plain lines otherwise; the
//!   [`Console`] other lines go through while it is shown.
//!
//! A killed run resumes where it stopped: blocks stored as done are never
//! fetched again, a block cut off mid-fetch left nothing behind.

#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod error;
mod plan;
mod progress;
mod run;
mod sink;
mod source;

pub use error::IngestError;
pub use plan::{blocks, format_ms, now_ms, parse_time, Block, BlockSize};
pub use progress::{Console, Display};
pub use run::{run, run_reporting, run_until, Plan, RunFailed, Summary};
pub use sink::{Checkpoint, Sink};
pub use source::{
    JobOptions, Source, SourceKind, Step, DEFAULT_JOB_WAIT, JOBS_PATH, JOB_SLOT_METHOD, QUERY_PATH,
};
