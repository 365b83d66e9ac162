//! Client for quota-broker: wrap each upstream HTTP call in a lease.
//!
//! - [`BrokerClient::acquire`] asks the broker for a [`Lease`] for one
//!   [`Call`]; the lease renews its concurrency slot in the background while
//!   held and releases it when dropped.
//! - [`Lease::report`] tells the broker how the call went (status,
//!   Retry-After and the rate-limit headers), which is how the whole fleet
//!   learns from one integration's 429.
//! - [`LeaseLayer`] is a `tower::Layer` that does both around every request
//!   of an HTTP client service, with no code at the call site.
//! - When the broker cannot be reached, the client falls back to a local
//!   limiter (governor) at a conservative rate — a fraction of the rate it was
//!   recently granted, never less than a configured floor and never
//!   unlimited — logs that once, and goes back to the broker when it answers.
//! - `https://` URLs speak TLS: the platform's trusted roots by default, or
//!   a private CA and a client certificate (mutual TLS) with [`ClientTls`]
//!   and [`BrokerClient::connect_with`].
//! - A broker that is overloaded answers [`ClientError::Overloaded`] with the
//!   time to wait before retrying.
//! - A cluster of brokers: give several URLs, comma-separated; calls go to
//!   the tenant's leader, following a broker's redirect, and to the next
//!   broker when one is down.
//! - A broker address that can never work is an error, not an outage run
//!   on the fallback rate for good: a URL that does not parse is
//!   [`ClientError::Url`] when the client is built; a server that answers
//!   but is not a quota-broker's gRPC port (another gRPC service, an HTTP/1
//!   server such as the broker's own HTTP port, a TLS port addressed with
//!   `http://`) is [`ClientError::NotABroker`] on every call, logged once
//!   per address at ERROR (in a list of brokers it is passed over for
//!   [`RECHECK_NOT_A_BROKER`], then tried again).
//!
//! ```no_run
//! use quota_broker_client::{BrokerClient, Call};
//! # async fn run() -> Result<(), quota_broker_client::ClientError> {
//! let broker = BrokerClient::connect("http://127.0.0.1:50051", None)?;
//! let call = Call::new("demo", "POST", "/api/v2/analytics/conversations/details/query")
//!     .client_id("ingest-1")
//!     .oauth_client("my-oauth-client")
//!     .class("batch");
//! let lease = broker.acquire(&call).await?;
//! // ... make the upstream call, then:
//! let headers = http::HeaderMap::new();
//! lease.report(200, &headers).await?;
//! drop(lease); // releases the slot
//! # Ok(()) }
//! ```
//!
//! Over TLS, with a private CA and a client certificate:
//!
//! ```no_run
//! use quota_broker_client::{BrokerClient, ClientTls, ConnectOptions};
//! # fn run() -> Result<(), quota_broker_client::ClientError> {
//! let tls = ClientTls::from_files(
//!     Some("ca.pem".as_ref()),
//!     Some(("client.pem".as_ref(), "client.key".as_ref())),
//! )?;
//! let broker = BrokerClient::connect_with(
//!     "https://broker.internal:50051",
//!     ConnectOptions::new().token("my-token").tls(tls),
//! )?;
//! # Ok(()) }
//! ```

#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod address;
mod call;
mod client;
mod error;
mod fallback;
mod kept;
mod layer;
mod lease;
mod pem;
mod release;
mod report;
mod route;
mod tls;

pub use address::{check_broker_address, not_a_grpc_port, NotAGrpcPort};
pub use call::Call;
pub use client::{BrokerClient, ConnectOptions, FALLBACK_MAX_WAIT};
pub use error::{error_chain, ClientError};
pub use fallback::FallbackSettings;
pub use layer::{LeaseLayer, LeaseService, LeaseServiceError, LeasedBody};
pub use lease::Lease;
pub use report::says_concurrency;
pub use route::RECHECK_NOT_A_BROKER;
pub use tls::{check_pem_certificates, check_pem_private_key, ClientTls};

/// The tonic this crate is built on, for matching [`ClientError::Refused`]'s
/// status code without a tonic dependency of your own at the same version.
pub use tonic;
