from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AcquireRequest(_message.Message):
    __slots__ = ("tenant", "client_id", "priority_class", "method", "path", "oauth_client", "permits", "max_wait_ms", "idempotency_key")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_CLASS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OAUTH_CLIENT_FIELD_NUMBER: _ClassVar[int]
    PERMITS_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    client_id: str
    priority_class: str
    method: str
    path: str
    oauth_client: str
    permits: int
    max_wait_ms: int
    idempotency_key: str
    def __init__(self, tenant: _Optional[str] = ..., client_id: _Optional[str] = ..., priority_class: _Optional[str] = ..., method: _Optional[str] = ..., path: _Optional[str] = ..., oauth_client: _Optional[str] = ..., permits: _Optional[int] = ..., max_wait_ms: _Optional[int] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class AcquireResponse(_message.Message):
    __slots__ = ("granted", "lease_id", "permits", "lease_expires_at_ms", "lease_ttl_ms", "retry_after_ms", "reason", "buckets")
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    PERMITS_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    granted: bool
    lease_id: str
    permits: int
    lease_expires_at_ms: int
    lease_ttl_ms: int
    retry_after_ms: int
    reason: str
    buckets: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, granted: bool = ..., lease_id: _Optional[str] = ..., permits: _Optional[int] = ..., lease_expires_at_ms: _Optional[int] = ..., lease_ttl_ms: _Optional[int] = ..., retry_after_ms: _Optional[int] = ..., reason: _Optional[str] = ..., buckets: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_id", "tenant", "acquire_key", "acquired_with")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ACQUIRE_KEY_FIELD_NUMBER: _ClassVar[int]
    ACQUIRED_WITH_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    tenant: str
    acquire_key: str
    acquired_with: AcquireRequest
    def __init__(self, lease_id: _Optional[str] = ..., tenant: _Optional[str] = ..., acquire_key: _Optional[str] = ..., acquired_with: _Optional[_Union[AcquireRequest, _Mapping]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: bool = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("lease_id", "extend_ms", "acquired_with")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    EXTEND_MS_FIELD_NUMBER: _ClassVar[int]
    ACQUIRED_WITH_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    extend_ms: int
    acquired_with: AcquireRequest
    def __init__(self, lease_id: _Optional[str] = ..., extend_ms: _Optional[int] = ..., acquired_with: _Optional[_Union[AcquireRequest, _Mapping]] = ...) -> None: ...

class RenewResponse(_message.Message):
    __slots__ = ("lease_expires_at_ms", "lease_ttl_ms")
    LEASE_EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    lease_expires_at_ms: int
    lease_ttl_ms: int
    def __init__(self, lease_expires_at_ms: _Optional[int] = ..., lease_ttl_ms: _Optional[int] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("tenant", "lease_id", "method", "path", "oauth_client", "http_status", "retry_after_ms", "headers", "concurrency_limited", "idempotency_key")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OAUTH_CLIENT_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_LIMITED_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    lease_id: str
    method: str
    path: str
    oauth_client: str
    http_status: int
    retry_after_ms: int
    headers: _containers.ScalarMap[str, str]
    concurrency_limited: bool
    idempotency_key: str
    def __init__(self, tenant: _Optional[str] = ..., lease_id: _Optional[str] = ..., method: _Optional[str] = ..., path: _Optional[str] = ..., oauth_client: _Optional[str] = ..., http_status: _Optional[int] = ..., retry_after_ms: _Optional[int] = ..., headers: _Optional[_Mapping[str, str]] = ..., concurrency_limited: bool = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("buckets", "attributed_to")
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTED_TO_FIELD_NUMBER: _ClassVar[int]
    buckets: _containers.RepeatedScalarFieldContainer[str]
    attributed_to: str
    def __init__(self, buckets: _Optional[_Iterable[str]] = ..., attributed_to: _Optional[str] = ...) -> None: ...

class LeaseStreamRequest(_message.Message):
    __slots__ = ("id", "acquire", "release", "renew", "report")
    ID_FIELD_NUMBER: _ClassVar[int]
    ACQUIRE_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    RENEW_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    id: int
    acquire: AcquireRequest
    release: ReleaseRequest
    renew: RenewRequest
    report: ReportRequest
    def __init__(self, id: _Optional[int] = ..., acquire: _Optional[_Union[AcquireRequest, _Mapping]] = ..., release: _Optional[_Union[ReleaseRequest, _Mapping]] = ..., renew: _Optional[_Union[RenewRequest, _Mapping]] = ..., report: _Optional[_Union[ReportRequest, _Mapping]] = ...) -> None: ...

class LeaseStreamResponse(_message.Message):
    __slots__ = ("id", "acquire", "release", "renew", "report", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    ACQUIRE_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    RENEW_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: int
    acquire: AcquireResponse
    release: ReleaseResponse
    renew: RenewResponse
    report: ReportResponse
    error: OperationError
    def __init__(self, id: _Optional[int] = ..., acquire: _Optional[_Union[AcquireResponse, _Mapping]] = ..., release: _Optional[_Union[ReleaseResponse, _Mapping]] = ..., renew: _Optional[_Union[RenewResponse, _Mapping]] = ..., report: _Optional[_Union[ReportResponse, _Mapping]] = ..., error: _Optional[_Union[OperationError, _Mapping]] = ...) -> None: ...

class OperationError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class QuotaStatus(_message.Message):
    __slots__ = ("tenant", "bucket", "configured_rate_per_min", "effective_rate_per_min", "tokens_available", "in_flight", "max_in_flight", "frozen_until_ms", "waiting", "granted_total", "throttled_total", "at_ms", "oauth_client", "scope", "burst", "reports_total", "paused", "learned_limit_per_min", "throttle_ratio", "cooldown_until_ms", "upstream_remaining", "pause_reason", "unused", "held_over")
    class WaitingEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    CONFIGURED_RATE_PER_MIN_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_RATE_PER_MIN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    FROZEN_UNTIL_MS_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    GRANTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    THROTTLED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    OAUTH_CLIENT_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    BURST_FIELD_NUMBER: _ClassVar[int]
    REPORTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    LEARNED_LIMIT_PER_MIN_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_RATIO_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_UNTIL_MS_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_REMAINING_FIELD_NUMBER: _ClassVar[int]
    PAUSE_REASON_FIELD_NUMBER: _ClassVar[int]
    UNUSED_FIELD_NUMBER: _ClassVar[int]
    HELD_OVER_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    bucket: str
    configured_rate_per_min: float
    effective_rate_per_min: float
    tokens_available: float
    in_flight: int
    max_in_flight: int
    frozen_until_ms: int
    waiting: _containers.ScalarMap[str, int]
    granted_total: int
    throttled_total: int
    at_ms: int
    oauth_client: str
    scope: str
    burst: int
    reports_total: int
    paused: bool
    learned_limit_per_min: float
    throttle_ratio: float
    cooldown_until_ms: int
    upstream_remaining: int
    pause_reason: str
    unused: bool
    held_over: int
    def __init__(self, tenant: _Optional[str] = ..., bucket: _Optional[str] = ..., configured_rate_per_min: _Optional[float] = ..., effective_rate_per_min: _Optional[float] = ..., tokens_available: _Optional[float] = ..., in_flight: _Optional[int] = ..., max_in_flight: _Optional[int] = ..., frozen_until_ms: _Optional[int] = ..., waiting: _Optional[_Mapping[str, int]] = ..., granted_total: _Optional[int] = ..., throttled_total: _Optional[int] = ..., at_ms: _Optional[int] = ..., oauth_client: _Optional[str] = ..., scope: _Optional[str] = ..., burst: _Optional[int] = ..., reports_total: _Optional[int] = ..., paused: bool = ..., learned_limit_per_min: _Optional[float] = ..., throttle_ratio: _Optional[float] = ..., cooldown_until_ms: _Optional[int] = ..., upstream_remaining: _Optional[int] = ..., pause_reason: _Optional[str] = ..., unused: bool = ..., held_over: _Optional[int] = ...) -> None: ...

class ListBucketsRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ListBucketsResponse(_message.Message):
    __slots__ = ("buckets",)
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    buckets: _containers.RepeatedCompositeFieldContainer[QuotaStatus]
    def __init__(self, buckets: _Optional[_Iterable[_Union[QuotaStatus, _Mapping]]] = ...) -> None: ...

class PriorityClass(_message.Message):
    __slots__ = ("name", "order", "weight", "reserve", "default_max_wait_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    RESERVE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    order: int
    weight: int
    reserve: float
    default_max_wait_ms: int
    def __init__(self, name: _Optional[str] = ..., order: _Optional[int] = ..., weight: _Optional[int] = ..., reserve: _Optional[float] = ..., default_max_wait_ms: _Optional[int] = ...) -> None: ...

class ListPriorityClassesRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ListPriorityClassesResponse(_message.Message):
    __slots__ = ("classes", "default_class")
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_CLASS_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedCompositeFieldContainer[PriorityClass]
    default_class: str
    def __init__(self, classes: _Optional[_Iterable[_Union[PriorityClass, _Mapping]]] = ..., default_class: _Optional[str] = ...) -> None: ...

class SetPriorityClassRequest(_message.Message):
    __slots__ = ("tenant", "reset")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    CLASS_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    reset: bool
    def __init__(self, tenant: _Optional[str] = ..., reset: bool = ..., **kwargs) -> None: ...

class SetPriorityClassResponse(_message.Message):
    __slots__ = ()
    CLASS_FIELD_NUMBER: _ClassVar[int]
    def __init__(self, **kwargs) -> None: ...

class SetBucketLimitRequest(_message.Message):
    __slots__ = ("tenant", "bucket", "permits", "window_ms", "burst", "max_in_flight", "reset")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    PERMITS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_MS_FIELD_NUMBER: _ClassVar[int]
    BURST_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    bucket: str
    permits: int
    window_ms: int
    burst: int
    max_in_flight: int
    reset: bool
    def __init__(self, tenant: _Optional[str] = ..., bucket: _Optional[str] = ..., permits: _Optional[int] = ..., window_ms: _Optional[int] = ..., burst: _Optional[int] = ..., max_in_flight: _Optional[int] = ..., reset: bool = ...) -> None: ...

class SetBucketLimitResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: QuotaStatus
    def __init__(self, status: _Optional[_Union[QuotaStatus, _Mapping]] = ...) -> None: ...

class PauseBucketRequest(_message.Message):
    __slots__ = ("tenant", "bucket", "reason")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    bucket: str
    reason: str
    def __init__(self, tenant: _Optional[str] = ..., bucket: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PauseBucketResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: QuotaStatus
    def __init__(self, status: _Optional[_Union[QuotaStatus, _Mapping]] = ...) -> None: ...

class ResumeBucketRequest(_message.Message):
    __slots__ = ("tenant", "bucket")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    bucket: str
    def __init__(self, tenant: _Optional[str] = ..., bucket: _Optional[str] = ...) -> None: ...

class ResumeBucketResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: QuotaStatus
    def __init__(self, status: _Optional[_Union[QuotaStatus, _Mapping]] = ...) -> None: ...

class ClearLearnedRequest(_message.Message):
    __slots__ = ("tenant", "bucket", "oauth_client")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    OAUTH_CLIENT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    bucket: str
    oauth_client: str
    def __init__(self, tenant: _Optional[str] = ..., bucket: _Optional[str] = ..., oauth_client: _Optional[str] = ...) -> None: ...

class ClearLearnedResponse(_message.Message):
    __slots__ = ("statuses",)
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedCompositeFieldContainer[QuotaStatus]
    def __init__(self, statuses: _Optional[_Iterable[_Union[QuotaStatus, _Mapping]]] = ...) -> None: ...
