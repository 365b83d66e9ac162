//! The primitives a tenant's decision is made of, each pure with the clock
//! passed in: a token bucket and concurrency slots (`bucket`), the lease
//! table with its expiry order (`lease`), route patterns and their cache
//! (`route`), and the waiting queue with its fair-share order
//! (`scheduler`).

mod bucket;
mod lease;
mod route;
mod scheduler;

pub(crate) use bucket::{Slots, TokenBucket};
pub(crate) use lease::{tenant_tag, Lease, LeaseId, LeaseTable};
pub(crate) use route::{normalize_path, Route, RouteCache, MAX_METHOD_LEN};
pub(crate) use scheduler::{place_bit, ClassShape, Hold, Holds, Offer, Queue, Rest, Waiter};
