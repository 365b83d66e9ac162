//! quota-broker: one broker per organisation's fleet of API consumers. It
//! holds the upstream's rate-limit budget (token buckets and concurrency
//! slots) and grants leases on it over gRPC, so integrations stop
//! discovering the limit one 429 at a time.
//!
//! # Layout
//!
//! ```text
//!  gRPC ──► service.rs / admin.rs   auth.rs (bearer tokens) → decode + validate, encode;
//!              │  stream.rs         BrokerError → Status; stream.rs: LeaseStream sessions
//!              ▼
//!           broker.rs               Broker handle: tenants, waits, driver tasks, Watch feed,
//!              │                    state files (state.rs); one lock per tenant, never
//!              ▼                    held across .await
//!           tenant.rs               one tenant's decision: class + reserve → route → buckets
//!        ┌─────┼──────────┬────────────┐          → all-or-none grant; learning from reports
//!   bucket.rs  lease.rs   scheduler.rs  adaptive.rs + headers.rs
//!   token bucket  slot      waiting queue  freeze, effective rate,
//!   + slots       leases    (weighted fair  budget view; header
//!                 + expiry  share, per-client parsing
//!                           round robin)
//! ```
//!
//! A request flows: `service` authenticates and validates it →
//! `Broker::acquire` locks the tenant → `TenantState::try_acquire` resolves
//! the class and its reserve, matches routes (`route.rs`, cached), checks
//! every bucket and takes from all or none → on "not now" with a wait, the
//! request parks in the queue and the tenant's driver grants it the moment
//! capacity frees (release, expiry, refill time, end of a freeze), or the
//! wait ends with `granted = false` and a retry time. A `Report` goes to
//! `TenantState::report`, which attributes a 429 and the rate-limit headers to
//! one bucket and applies the learning rules. `config.rs` turns TOML + env
//! into validated settings; `server.rs` wires services, health, reflection and
//! shutdown; `main.rs` is the process.

#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

pub mod adaptive;
pub mod admin;
pub mod auth;
pub mod broker;
pub mod bucket;
pub mod config;
pub mod error;
pub mod headers;
pub mod lease;
pub mod route;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod state;
mod stream;
pub mod tenant;

/// Generated protobuf types and gRPC stubs of `quota.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    tonic::include_proto!("quota.v1");

    /// Encoded descriptor set of `quota.v1`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/quota_v1_descriptor.bin"));
}

pub use broker::Broker;
pub use config::Settings;
pub use error::BrokerError;
