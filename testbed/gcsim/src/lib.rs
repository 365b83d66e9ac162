//! gcsim: a Genesys Cloud stand-in, the upstream the fleet scenario runs
//! against (the HTTP contract is testbed/gcsim/README.md). It shares no code
//! with the quota broker it is used to test.
//!
//! # Layout
//!
//! - `config`: the TOML config, its defaults and validation.
//! - `route`: the families' `"METHOD /path/glob"` route patterns.
//! - `org`: one org's limits (token and family windows, hidden limits and
//!   their schedule, concurrency, blocks and escalation, the unmanaged
//!   consumer) and counters; plain Rust, simulated time passed in.
//! - `data`: the deterministic analytics history and its details query.
//! - `jobs`: the asynchronous details jobs (submit, poll, cursor-paged
//!   results, delete) and their limits (running jobs, submissions per window).
//! - `paced`: one family played in process against calls at an even pace
//!   (the scenario's yardstick of what a pacing broker could be served).
//! - `log`: the bounded log of every request served and refused.
//! - `server`: the axum routes: auth → the org's decision → the endpoint's
//!   answer after its simulated latency (holding any concurrency slot) →
//!   the rate-limit headers; and the `/_sim` control plane.
//!
//! Time: the clock is `tokio::time::Instant` (tests may pause it); simulated
//! ms = real ms since start × `time_scale`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), gcsim::SimError> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let sim = gcsim::Sim::start(gcsim::SimConfig::default(), listener)?;
//! println!("http://{}", sim.addr());
//! sim.shutdown().await;
//! # Ok(()) }
//! ```

#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod config;
mod data;
mod error;
mod jobs;
mod log;
mod org;
mod paced;
mod route;
mod server;

pub use config::{
    FamilyConfig, LimitKind, OrgConfig, RetryAfter, ScheduleStep, SimConfig, UnmanagedPattern,
    UnmanagedStep, TIME_SCALES,
};
pub use error::SimError;
pub use jobs::JobsConfig;
pub use paced::{paced, soonest, Pollers, Soonest};
pub use server::{Sim, SimHandle};
