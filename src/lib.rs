//! quota-broker: one broker per organisation's fleet of API consumers. It
//! holds the upstream's rate-limit budget (token buckets and concurrency
//! slots) and grants leases on it over gRPC, so integrations stop
//! discovering the limit one 429 at a time.
//!
//! Without its default `server` feature the crate is only the wire API
//! ([`pb`] and [`REPORTED_HEADERS`]), which is what client crates link.
//!
//! # Layout
//!
//! ```text
//!  gRPC ──► grpc/        the only place tonic is served: codec (decode + validate,
//!             │          encode, BrokerError → Status), QuotaBroker / QuotaAdmin,
//!             │          LeaseStream sessions, serve() with health, reflection, shutdown;
//!             │          starting (the port answers "starting" until the broker has);
//!             │          observe (request ids on a span and in the response, latency);
//!             │          transport (accept loop, TLS, handshake deadline, connection
//!             │          caps; http1: HTTP/1 on this port answered 505; throttled:
//!             │          log lines at most once a period), overload (per-caller
//!             │          rates and Watch caps)
//!             │  auth.rs bearer tokens → Principal (tenant scopes, roles, limits)
//!             ▼
//!          broker/       the async runtime around the pure state: the handle and
//!             │          tenant registry, waits, one driver task per tenant, the
//!             │          Watch feed, operators' changes, state files
//!             ▼          (one std Mutex per tenant, never held across .await)
//!          tenant/       one tenant's pure state machine: instances, per-client
//!             │          registry, classes + reserves, decide, waiting, leases,
//!             │          learn, operate, restart (learning mode), status
//!      ┌──────┴───────┐
//!   limits/        learning/
//!   bucket, lease, adaptive rules, header parsing,
//!   route (paths   attribution, the
//!   normalised),   upstream's budget,
//!                  what it served
//!   scheduler
//!
//!  etcd ◄─► cluster/     cluster mode: membership, one leader per tenant
//!                        (rendezvous hashing, etcd leases), hand-over,
//!                        snapshots; the broker's side is broker/lead.rs
//!
//!  HTTP ──► http/        /metrics, the dashboard and its event feed (the
//!                        Watch feed as server-sent events), /healthz, /readyz
//!           metrics/     counters on the request path (each label set made
//!                        at first use), bucket gauges read at scrape time
//! ```
//!
//! Beside them: `config/` (TOML + env → validated [`Settings`]),
//! `clock.rs` (monotonic time ↔ wire milliseconds), `error.rs`
//! ([`BrokerError`]), `api.rs` (the wire API), `main.rs` (the process).
//!
//! An Acquire goes down the layers and back once: `grpc` authenticates and
//! decodes it → `Broker::acquire` locks the tenant → `TenantState::acquire`
//! resolves the class and its reserve, matches routes (cached), checks every
//! bucket and takes from all or none, and answers granted, denied (with a
//! retry time and a reason), or queued with a receiver → the broker awaits
//! that receiver outside the lock until the tenant's driver grants it (on a
//! release, an expiry, a refill, the end of a freeze) or the deadline
//! passes → `grpc` encodes the answer. A `Report` goes to
//! `TenantState::report`, which attributes a 429 and the rate-limit headers
//! to one bucket and applies the learning rules.

#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod api;
#[cfg(feature = "server")]
mod auth;
#[cfg(feature = "server")]
mod broker;
#[cfg(feature = "server")]
mod clock;
#[cfg(feature = "server")]
mod cluster;
#[cfg(feature = "server")]
mod config;
#[cfg(feature = "server")]
mod error;
#[cfg(feature = "server")]
mod grpc;
#[cfg(feature = "server")]
mod http;
#[cfg(feature = "server")]
mod learning;
#[cfg(feature = "server")]
mod limits;
#[cfg(feature = "server")]
mod metrics;
#[cfg(feature = "server")]
mod tenant;

pub use api::{code_name, pb, LEADER_METADATA, REPORTED_HEADERS};
#[cfg(feature = "server")]
pub use auth::hash_token;
#[cfg(feature = "server")]
pub use config::{unread_env_vars, ConfigError, LogFormat, Settings};
#[cfg(feature = "server")]
pub use error::BrokerError;
#[cfg(feature = "server")]
pub use grpc::{run, serve, Embedded, Listeners, ServerError, MAX_CONCURRENT_STREAMS};
#[cfg(feature = "server")]
pub use tenant::{AcquireArgs, Decision, Denial, Grant, Queued, TenantState};
