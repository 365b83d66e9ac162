"""Python client for quota-broker (package quota.v1).

    from quota_broker_client import QuotaBroker

    with QuotaBroker("127.0.0.1:50051", token=None) as broker:
        with broker.lease("demo", "POST", "/api/v2/analytics/conversations/details/query",
                          client_id="ingest-1") as lease:
            resp = do_the_call()
            lease.report(resp.status, resp.headers)

While the broker is unreachable, leases come from a conservative local
limiter (``FallbackSettings``) and outcomes are reported when it is back.
``https://`` urls speak TLS (``ca_cert=``, ``client_cert=``/``client_key=``
for a private CA and mutual TLS); a broker over this caller's request rate
raises ``Overloaded`` (wait its ``retry_after_ms``). For a cluster of
brokers pass several urls (a list, or comma-separated): calls follow the
tenant's leader (``x-quota-broker-leader``) and move on from a broker that
does not answer, or from an address that is not a broker (tried again after
``RECHECK_NOT_A_BROKER_S``).
The Genesys Cloud SDK adapter is ``quota_broker_client.genesys``.

Make one QuotaBroker per process and share it (it is thread-safe); clients
made per request or per job still share the fallback of their brokers.
Every call blocks its thread: from asyncio, ``await asyncio.to_thread(...)``.
"""
from .client import QuotaBroker, says_concurrency
from .connections import RECHECK_NOT_A_BROKER_S
from .leases import Lease
from .timeouts import DEFAULT_CHANNEL_OPTIONS
from .watch import WatchStream
from .errors import (
    BadToken,
    BadUrl,
    BrokerRpcError,
    Closed,
    ConfigError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotABroker,
    NotFound,
    NotGranted,
    Overloaded,
    PermissionDenied,
    QuotaBrokerError,
    TlsError,
    Unauthenticated,
    Unavailable,
)
from .fallback import FallbackSettings, SystemClock
from .headers import rate_limit_headers, retry_after_ms
from .quota.v1 import broker_pb2 as pb

__version__ = "0.1.0"

__all__ = [
    "QuotaBroker", "Lease", "WatchStream", "pb", "FallbackSettings", "SystemClock",
    "DEFAULT_CHANNEL_OPTIONS", "RECHECK_NOT_A_BROKER_S",
    "QuotaBrokerError", "NotGranted", "BrokerRpcError", "Closed", "InvalidArgument", "NotFound",
    "FailedPrecondition", "Unauthenticated", "PermissionDenied", "Unavailable",
    "DeadlineExceeded", "Internal", "Overloaded", "ConfigError", "TlsError", "BadUrl", "BadToken",
    "NotABroker",
    "rate_limit_headers", "retry_after_ms",
    "says_concurrency",
]
