"""Exceptions raised by the quota-broker client."""
import grpc


class QuotaBrokerError(Exception):
    """Base class of every error this package raises."""


class NotGranted(QuotaBrokerError):
    """The broker answered ``granted = false``: not now, retry later.

    This is the broker's normal "no capacity within max_wait_ms" answer (a
    frozen or paused bucket, a full queue, a taken slot), not a failure.
    """

    def __init__(self, reason, retry_after_ms, buckets=()):
        self.reason = reason
        #: Earliest the request could be granted, in ms from now (a lower
        #: bound when it depends on slots being released).
        self.retry_after_ms = retry_after_ms
        #: Buckets that were considered.
        self.buckets = list(buckets)
        super().__init__(
            f"not granted: {reason or 'no reason given'} "
            f"(retry after {retry_after_ms} ms; buckets: {', '.join(self.buckets) or '-'})"
        )


class BrokerRpcError(QuotaBrokerError):
    """The broker (or the transport) answered with a gRPC error status."""

    #: For a call no broker answered after following the cluster, what
    #: happened when a broker sent it to a leader (which did not answer);
    #: None otherwise.
    what_happened = None

    def __init__(self, code, details, rpc_error=None):
        #: The ``grpc.StatusCode``.
        self.code = code
        #: The broker's message (names the offending field, tenant, bucket...).
        self.details = details
        self.rpc_error = rpc_error
        super().__init__(f"{code.name}: {details}")


class InvalidArgument(BrokerRpcError):
    """A field is missing or malformed, or an unknown priority class."""


class NotFound(BrokerRpcError):
    """Unknown tenant, no bucket matches the call, or Renew of a lease without a slot."""


class FailedPrecondition(BrokerRpcError):
    """More permits than a bucket can ever grant at once."""


class Unauthenticated(BrokerRpcError):
    """No bearer token, a malformed one, or one the broker does not know."""


class PermissionDenied(BrokerRpcError):
    """The token is not scoped to the tenant, or is not an admin token."""


class Unavailable(BrokerRpcError):
    """The broker is unreachable or shutting down."""


class DeadlineExceeded(BrokerRpcError):
    """The client-side deadline of the call ran out."""


class Internal(BrokerRpcError):
    """An admin change was applied but could not be saved."""


class Overloaded(BrokerRpcError):
    """RESOURCE_EXHAUSTED: the broker is over a limit for this caller; retry later.

    The broker answers this at once when a token (or a token-less peer IP)
    is over its request rate (``[overload] max_requests_per_sec``, or the
    token's own) or holds too many Watch streams. It is an answer, not an
    outage: ``acquire`` raises it instead of falling back to the local
    limiter. Wait ``retry_after_ms`` before the next call.
    """

    def __init__(self, code, details, rpc_error=None, retry_after_ms=None):
        #: Milliseconds to wait before retrying, from the broker's
        #: ``retry-after-ms`` response metadata; None when the answer carried
        #: none (e.g. a RESOURCE_EXHAUSTED raised by gRPC itself).
        self.retry_after_ms = retry_after_ms
        super().__init__(code, details, rpc_error)


class Closed(QuotaBrokerError):
    """The QuotaBroker was closed: it makes no more calls."""

    def __init__(self):
        super().__init__("the quota-broker client is closed")


class ConfigError(QuotaBrokerError, ValueError):
    """A setting given to QuotaBroker that can never work: a url
    (:class:`BadUrl`), the TLS settings (:class:`TlsError`), the token
    (:class:`BadToken`).

    Raised, never answered from the local fallback (which paces calls while
    a broker is down, and these never come up); a ``ValueError``.
    """


class TlsError(ConfigError):
    """The TLS settings given to QuotaBroker are unusable (a file, a certificate, a key).

    Checked when the client is built: gRPC itself would only fail the
    handshake, which looks like an unreachable broker.
    """


class BadToken(ConfigError):
    """The ``token`` given to QuotaBroker cannot be sent: it starts with
    "Bearer " (the client adds that itself), has characters gRPC metadata
    cannot carry (non-ASCII, control characters), or is too long for an
    HTTP/2 header. Checked when the client is built; the message names the
    parameter and the mistake, never the token.
    """


class BadUrl(ConfigError):
    """A broker url that can never work: it does not parse as ``host:port``
    (or ``http(s)://host:port``), or the server there is not a quota-broker's
    gRPC port (:class:`NotABroker`).

    Raised, never answered from the local fallback: the fallback paces calls
    while a broker is down, and this one will never be up.
    """


class NotABroker(BrokerRpcError, BadUrl):
    """The server at the url answers, but not as a quota-broker's gRPC port.

    Another gRPC service (UNIMPLEMENTED), or a server that does not speak
    gRPC over plaintext HTTP/2: an HTTP/1 server (a broker's HTTP port,
    ``server.http_listen``, serves metrics and probes, not gRPC) or a TLS
    port addressed without ``https://``. ``details`` says which and what to
    change; ``code`` is the gRPC status the call got.
    """


#: gRPC's words for a server whose first bytes are not HTTP/2's.
_NOT_HTTP2 = (
    "Trying to connect an http1.x server",
    "Expected SETTINGS frame as the first frame",
    "Failed parsing HTTP/2",
)


def not_a_broker(code, details):
    """Why an answer (gRPC ``code`` and ``details``) says the server is not a
    quota-broker's gRPC port, or None: it can be an outage (or no answer)."""
    text = details or ""
    if code == grpc.StatusCode.UNIMPLEMENTED and not _from_a_proxy_404(text):
        return ("it does not serve this quota-broker call (UNIMPLEMENTED): another gRPC service "
                "listens there, or a quota-broker older than this client")
    if code == grpc.StatusCode.UNAVAILABLE and any(s in text for s in _NOT_HTTP2):
        return ("it does not speak gRPC over plaintext HTTP/2: an HTTP/1 server (such as a "
                "broker's HTTP port, server.http_listen, which serves metrics and probes), or a TLS "
                "port addressed without https://")
    return None


def _from_a_proxy_404(details):
    """Whether UNIMPLEMENTED ``details`` are gRPC's reading of an HTTP 404 that
    carried no gRPC status: a proxy's answer (an ingress with no broker
    behind it while one restarts, most often), an outage, not another gRPC
    service."""
    return "status: 404" in (details or "")


def _not_a_broker_error(code, details, err, target):
    why = not_a_broker(code, details)
    where = f"the server at {target}" if target else "the server"
    return NotABroker(
        code,
        f"{where} is not a quota-broker's gRPC port: {why}; give the broker's gRPC address (its "
        f"server.listen, default 127.0.0.1:50051) [{(details or '')[:300]}]",
        err,
    )


def unreachable_hint(details, tls):
    """A hint on what to check when a broker does not answer in a way a
    mistaken url also causes (a warning's words, not an error: it may be an
    outage); "" when nothing says so."""
    text = details or ""
    if _from_a_proxy_404(text):
        return ("; is this the broker's gRPC port? an HTTP/2 server there answered 404: another "
                "service (the upstream itself?), or a proxy with no broker behind it yet")
    if "Domain name not found" in text:
        return "; the host name does not resolve: check it in the url"
    if tls and ("Handshake read failed" in text or "WRONG_VERSION_NUMBER" in text):
        return ("; the TLS handshake got no TLS answer: a broker serving plaintext is addressed "
                "as host:port or http://, not https://")
    if not tls and "Socket closed" in text:
        return ("; the connection was closed without an answer: a broker down, or a TLS port "
                "addressed without https://")
    return ""


def tls_refusal(details):
    """What to do about a TLS handshake that cannot succeed, from gRPC's words for it; None otherwise.

    A broker certificate this client does not trust or that names another
    host, or this client's certificate refused by the broker (mutual TLS):
    none of these mends by itself, so the call fails with it instead of
    falling back. A connection closed during the handshake ("Socket
    closed": plaintext to a TLS port, or a broker going down) cannot be
    told apart and is not one.
    """
    text = details or ""
    if "Hostname Verification Check failed" in text or "not in peer certificate" in text:
        hint = ("the broker's certificate does not name the host in the url: connect by a name "
                "it has, or give one with tls_server_name")
    elif "CERTIFICATE_VERIFY_FAILED" in text and "xpired" in text:
        hint = "the broker's certificate has expired: renew it on the broker"
    elif "CERTIFICATE_VERIFY_FAILED" in text:
        hint = "no CA this client trusts signed the broker's certificate: give the CA that did as ca_cert"
    elif "TSI_DATA_CORRUPTED" in text:
        hint = ("the broker refused this client's TLS handshake: under mutual TLS it takes only an "
                "unexpired certificate its client CA signed (client_cert, client_key)")
    else:
        return None
    return f"{hint} ({text[:300]})"


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
}

#: Response metadata in which the broker says how long to wait after an
#: overload refusal, in milliseconds.
RETRY_AFTER_MS_KEY = "retry-after-ms"


def _metadata_value(err, key):
    """The value of metadata ``key`` on an error, trailing first, then
    initial, as text; None where it has none (not every RpcError carries
    metadata)."""
    for getter in ("trailing_metadata", "initial_metadata"):
        fn = getattr(err, getter, None)
        if not callable(fn):
            continue
        try:
            md = fn() or ()
        except Exception:  # pragma: no cover - not every RpcError carries metadata
            continue
        for item in md:
            k, value = (item.key, item.value) if hasattr(item, "key") else item
            if str(k).lower() != key:
                continue
            if isinstance(value, (bytes, bytearray)):
                value = value.decode("ascii", "replace")
            return str(value)
    return None


def _metadata_retry_after_ms(err):
    """The ``retry-after-ms`` of an error's trailing (then initial) metadata, or None."""
    value = _metadata_value(err, RETRY_AFTER_MS_KEY)
    if value is None:
        return None
    try:
        ms = int(value.strip())
    except ValueError:
        return None
    return ms if ms >= 0 else None


def from_rpc_error(err, target=None):
    """Converts a ``grpc.RpcError`` into the matching BrokerRpcError subclass
    (:class:`NotABroker` for a server that is not a quota-broker's gRPC
    port; ``target``, the "host:port" called, is named in its message)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    if code is None:
        code = grpc.StatusCode.UNKNOWN
    if not_a_broker(code, details) is not None:
        return _not_a_broker_error(code, details, err, target)
    # The deadline, seen pass by the broker first: tonic answers the gRPC
    # timeout a call carries with CANCELLED "Timeout expired" (a race with
    # this client's own DEADLINE_EXCEEDED, won by the broker under load).
    if code == grpc.StatusCode.CANCELLED and details == "Timeout expired":
        code = grpc.StatusCode.DEADLINE_EXCEEDED
    if code == grpc.StatusCode.UNIMPLEMENTED and _from_a_proxy_404(details):
        return Unavailable(code, details or "", err)
    cls = _BY_CODE.get(code, BrokerRpcError)
    if cls is Overloaded:
        return Overloaded(code, details or "", err, retry_after_ms=_metadata_retry_after_ms(err))
    return cls(code, details or "", err)
