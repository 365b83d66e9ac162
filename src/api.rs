//! The wire API that clients and the broker share: the generated `quota.v1`
//! types and gRPC stubs, and the names of the upstream response headers a
//! `Report` carries. This is all the crate builds without its `server`
//! feature, so a client links the API and none of the broker.

/// Generated protobuf types and gRPC stubs of `quota.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    tonic::include_proto!("quota.v1");

    /// Encoded descriptor set of `quota.v1`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/quota_v1_descriptor.bin"));
}

/// Response metadata of an UNAVAILABLE answer from a broker of a cluster
/// that does not lead the call's tenant: the leader's gRPC URL. Clients
/// send the call there.
pub const LEADER_METADATA: &str = "x-quota-broker-leader";

/// The canonical upper-case name of a gRPC code, e.g. `PERMISSION_DENIED`:
/// what the broker's documentation and logs say, not tonic's description.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Upstream response headers the broker learns from, lower case. Clients
/// forward these (compared case-insensitively) in `ReportRequest.headers`;
/// the broker's header parser reads exactly these, so one list serves both
/// sides and a header cannot be understood by one and dropped by the other.
pub const REPORTED_HEADERS: &[&str] = &[
    "retry-after",
    "inin-ratelimit-allowed",
    "inin-ratelimit-count",
    "inin-ratelimit-reset",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "ratelimit",
    "ratelimit-policy",
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
];
