"""Genesys Cloud Python SDK (PureCloudPlatformClientV2) adapter.

    import PureCloudPlatformClientV2 as gc
    from quota_broker_client import QuotaBroker
    from quota_broker_client.genesys import instrument

    api_client = gc.api_client.ApiClient().get_client_credentials_token(CLIENT_ID, SECRET)
    with QuotaBroker("127.0.0.1:50051") as broker:  # close() sends outcomes kept in an outage
        instrument(api_client, broker, tenant="demo", client_id="ingest-1", oauth_client=CLIENT_ID)
        gc.ConversationsApi(api_client).post_analytics_conversations_details_query(body)  # leased + reported

How it hooks in (SDK source, PureCloudPlatformClientV2 >= ~200): every HTTP
request of an ``ApiClient`` (API calls from ``call_api`` and the OAuth token
requests) goes through ``api_client.get_http_client().request(
HttpRequestOptions)``; the default ``DefaultHttpClient`` hands it to
``rest.RESTClientObject``, which sends it with a ``urllib3.PoolManager``
and raises ``rest.ApiException`` (``status``, ``headers``) for any status
outside 200-205. ``instrument`` installs, with ``ApiClient.set_http_client``,
a ``LeasedHttpClient`` around the existing http client: it acquires a lease
for the request's method and URL path, sends it, reports the status and
headers (of the response or of the ApiException) and releases the lease.

Retries: ``RESTClientObject`` builds its PoolManager with
``urllib3.util.Retry()`` (total=10) and every method allowed, so urllib3
silently sleeps out a 429's Retry-After and sends the request again; the
broker would never see the 429. ``instrument`` replaces that pool manager's
retries with ``NO_RETRIES`` (no retries on errors or statuses; redirects
still followed), so each HTTP attempt is one lease and one report.

Timeout: ``RESTClientObject`` never passes the http client's ``timeout``
to urllib3, so an upstream that accepts and never answers would hold the
call, and its lease's slots (renewed in the background), forever.
The adapter puts the timeout on the pool manager (``connection_pool_kw``,
as ``urllib3.Timeout(total=...)``): the wrapper's ``timeout``, taken from
the wrapped client at ``instrument`` and changed with ``set_timeout(ms)``,
in milliseconds: the SDK states no unit, and its default,
``AbstractHttpClient.timeout = 16000``, is 16 s in milliseconds (16000 s
would be four and a half hours). A value under 1000 (``set_timeout(30)``:
seconds meant?) or over an hour is applied as given and logged as a
warning; 0 is no timeout. A call past it raises urllib3's
``MaxRetryError`` whatever its method (``NO_RETRIES`` lets no method
retry a read error), whose ``reason`` is a ``ReadTimeoutError`` (or a
``ConnectTimeoutError``).

Broker unreachable: the leases come from the QuotaBroker's local fallback
limiter (half the rate granted over the last minute, at least 6/min, never
unlimited; see ``quota_broker_client.FallbackSettings``), and the outcomes
are kept and reported when the broker is back. A caller that retries a 429
at once is paced by the same limiter (which also waits out the 429's
Retry-After).
"""
import logging
from urllib.parse import urlsplit

import urllib3

from . import errors
from .client import QuotaBroker, says_concurrency  # noqa: F401  (QuotaBroker: for type references in docs)

log = logging.getLogger("quota_broker_client.genesys")

try:  # the SDK is an optional dependency (pip install 'quota-broker-client[genesys]')
    from PureCloudPlatformClientV2.abstract_http_client import AbstractHttpClient as _Base
    from PureCloudPlatformClientV2.rest import ApiException
except ImportError:  # pragma: no cover - exercised only without the extra
    _Base = object
    ApiException = None

#: What the adapter puts in place of the SDK's ``urllib3.util.Retry()``:
#: no retries on connection/read errors or statuses (429/503 with
#: Retry-After included), redirects followed as before.
#: ``allowed_methods=None``: a read error (a read timeout) ends the retries
#: at once for every method, so it comes out as ``MaxRetryError`` whatever
#: the method (urllib3 re-raises a bare ``ReadTimeoutError`` for a method
#: outside ``allowed_methods``, such as POST, by default); no status is
#: retried either way (``status=0``, no ``status_forcelist``).
NO_RETRIES = urllib3.util.Retry(
    total=None,
    connect=0,
    read=0,
    status=0,
    other=0,
    redirect=10,
    allowed_methods=None,
    raise_on_status=False,
    respect_retry_after_header=False,
)


def default_should_lease(method, path):
    """Leases Genesys Cloud API calls (``/api/...``), not the OAuth token requests.

    ``path`` is the request's path after the ApiClient's base path (the
    path of its ``host``, or of its API gateway's ``path_params_api``).
    """
    return path.startswith("/api/")


def _is_oauth_path(path):
    return "/oauth/" in path or path.endswith("/oauth")


def api_base_path(api_client):
    """The path the ApiClient puts before ``/api/v2/...``: its ``host``'s path, or its
    gateway's (``set_gateway(..., path_params_api)``); "" when none."""
    if api_client is None:
        return ""
    try:
        base = api_client.get_conf_url("api", api_client.host)
    except Exception:  # an SDK without get_conf_url, or a half-configured gateway
        base = getattr(api_client, "host", "") or ""
    return (urlsplit(base).path or "").rstrip("/")


#: The SDK's default http client timeout (AbstractHttpClient.timeout), in milliseconds.
DEFAULT_TIMEOUT_MS = 16000
#: Timeouts outside this range (milliseconds) are applied but logged as a
#: warning: under a second reads like seconds given by mistake, over an
#: hour like a conversion done twice. 0 (no timeout) is not warned about.
PLAUSIBLE_TIMEOUT_MS = (1000, 3_600_000)


def check_timeout_ms(timeout):
    """An http client timeout in milliseconds (0: none), or ValueError;
    logs a warning for an implausible one (see PLAUSIBLE_TIMEOUT_MS)."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout != timeout:
        raise ValueError(f"set_timeout: the timeout must be a number of milliseconds, got {timeout!r}")
    if timeout < 0:
        raise ValueError(f"set_timeout({timeout!r}): the timeout is in milliseconds, >= 0 (0: no timeout)")
    low, high = PLAUSIBLE_TIMEOUT_MS
    if 0 < timeout < low:
        log.warning("set_timeout(%g): the SDK's timeout is in milliseconds (its default is %d), so "
                    "calls time out after %g ms; for %g seconds pass set_timeout(%d)",
                    timeout, DEFAULT_TIMEOUT_MS, timeout, timeout, round(timeout * 1000))
    elif timeout > high:
        log.warning("set_timeout(%g): %g ms is over an hour; the SDK's timeout is in milliseconds "
                    "(its default is %d)", timeout, timeout, DEFAULT_TIMEOUT_MS)
    return timeout


def apply_timeout(http_client, timeout_ms):
    """Makes an SDK http client's urllib3 requests time out after ``timeout_ms``. True if done."""
    rest = getattr(http_client, "rest_client", None)
    pool = getattr(rest, "pool_manager", None)
    kw = getattr(pool, "connection_pool_kw", None)
    if kw is None:
        return False
    kw["timeout"] = urllib3.Timeout(total=timeout_ms / 1000.0) if timeout_ms else urllib3.Timeout()
    pool.clear()  # pools made before carry the old timeout
    return True


def disable_retries(http_client):
    """Turns off urllib3 retries in an SDK http client (DefaultHttpClient). True if done."""
    rest = getattr(http_client, "rest_client", None)
    pool = getattr(rest, "pool_manager", None)
    kw = getattr(pool, "connection_pool_kw", None)
    if kw is None:
        return False
    kw["retries"] = NO_RETRIES
    # Pools created before the change carry their own Retry; drop them.
    pool.clear()
    return True


class LeasedHttpClient(_Base):
    """An SDK http client that wraps another one with Acquire/Report/Release.

    ``oauth_client``: the OAuth client id the ApiClient's token belongs to
    (selects per-OAuth-client buckets); None falls back to
    ``api_client.client_id`` when the SDK knows it (code-authorization flows).
    A NotGranted (no capacity within ``max_wait_ms``) propagates to the call
    site, as do the broker's errors. An unreachable broker is not an error:
    the broker client's local fallback limiter paces the calls.
    """

    def __init__(self, inner, broker, tenant, *, client_id, oauth_client=None, api_client=None,
                 priority_class="", max_wait_ms=None, should_lease=default_should_lease, **removed):
        _reject_removed(removed, "LeasedHttpClient")
        if _Base is not object:
            super().__init__()
        self.inner = inner
        self.broker = broker
        self.tenant = tenant
        self.client_id = client_id
        self.oauth_client = oauth_client
        self.api_client = api_client
        self.priority_class = priority_class
        self.max_wait_ms = max_wait_ms
        self.should_lease = should_lease
        self._warned_unleased = False
        self.retries_disabled = disable_retries(inner)
        if not self.retries_disabled:
            log.warning(
                "could not find urllib3 retries in %r; make sure it does not retry 429s itself",
                type(inner).__name__,
            )
        # The hooks run here, around the leased call: a post-request hook that
        # raises must not lose the report of a call the upstream served.
        self.pre_hook = getattr(inner, "pre_hook", None)
        self.post_hook = getattr(inner, "post_hook", None)
        if self.pre_hook is not None or self.post_hook is not None:
            inner.pre_hook = inner.post_hook = None
        # The SDK's own http client holds milliseconds (0: none); another
        # http client's timeout that is no number is left to it.
        timeout = getattr(inner, "timeout", None)
        number = isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
        self.timeout = check_timeout_ms(timeout) if number else DEFAULT_TIMEOUT_MS
        self.timeout_applied = apply_timeout(inner, self.timeout)

    def set_timeout(self, timeout):
        """Milliseconds (the unit of the SDK's default, 16000), applied to the
        urllib3 requests; 0 is no timeout. A value under 1000 or over an
        hour is applied, and logged as a warning (seconds meant?)."""
        check_timeout_ms(timeout)
        if _Base is not object:
            super().set_timeout(timeout)
        self.timeout = timeout
        setter = getattr(self.inner, "set_timeout", None)
        if callable(setter):
            setter(timeout)
        self.timeout_applied = apply_timeout(self.inner, timeout)

    # set_pre_request_hook / set_post_request_hook: the SDK's (AbstractHttpClient),
    # kept on this wrapper, which runs them: the pre-request hook before the
    # lease (it may change the URL), the post-request hook after the report.

    def _oauth_client(self):
        if self.oauth_client is not None:
            return self.oauth_client
        return getattr(self.api_client, "client_id", "") or ""

    def api_path(self, url):
        """The path the broker routes on: the URL's path after the ApiClient's base path
        (a gateway's or ``host``'s path prefix), so ``/genesys/api/v2/x`` is ``/api/v2/x``."""
        path = urlsplit(url).path or "/"
        prefix = api_base_path(self.api_client)
        if prefix and path.startswith(prefix + "/"):
            path = path[len(prefix):]
        return path

    def request(self, http_request_options):
        if callable(self.pre_hook):
            http_request_options = self.pre_hook(http_request_options)
        response = self._request(http_request_options)
        if callable(self.post_hook):
            response = self.post_hook(response)
        return response

    def _request(self, http_request_options):
        method = str(http_request_options.method).upper()
        path = self.api_path(http_request_options.url)
        if not self.should_lease(method, path):
            self._warn_unleased(method, path)
            return self.inner.request(http_request_options)
        oauth_client = self._oauth_client()
        # Broker unreachable: a fallback lease from the local limiter (paced, never unlimited).
        ctx = self.broker.lease(self.tenant, method, path, client_id=self.client_id,
                                oauth_client=oauth_client, priority_class=self.priority_class,
                                max_wait_ms=self.max_wait_ms)
        lease = ctx.__enter__()
        exc_info = (None, None, None)
        try:
            try:
                response = self.inner.request(http_request_options)
            except Exception as e:  # ApiException carries status and headers
                status = getattr(e, "status", None)
                if ApiException is not None and isinstance(e, ApiException) and status:
                    self._report(lease, status, getattr(e, "headers", None),
                                 getattr(e, "body", None))
                raise
            self._report(lease, response.status, _response_headers(response))
            return response
        except BaseException as e:
            exc_info = (type(e), e, e.__traceback__)
            raise
        finally:
            ctx.__exit__(*exc_info)

    def _warn_unleased(self, method, path):
        # With the default rule, a request that is neither an API call nor an
        # OAuth request is most likely an API call under a path prefix the
        # adapter does not know of: say so once rather than send calls unleased silently.
        if self._warned_unleased or self.should_lease is not default_should_lease or _is_oauth_path(path):
            return
        self._warned_unleased = True
        log.warning("%s %s goes out unleased: its path, after the ApiClient's base path %r, does not "
                    "start with /api/ (a host or gateway path the adapter does not see? pass "
                    "should_lease= to choose what is leased); not logged again",
                    method, path, api_base_path(self.api_client))

    def _report(self, lease, status, headers, body=None):
        if not 100 <= int(status) <= 599:
            return
        concurrency = int(status) == 429 and says_concurrency(body)
        try:
            # Kept for later while the broker is unreachable.
            lease.report(int(status), headers, concurrency_limited=concurrency)
        except errors.QuotaBrokerError as e:
            # The call itself went through; losing one report must not fail it.
            log.warning("reporting %s %s -> %s failed: %s", lease.method, lease.path, status, e)


def _response_headers(response):
    getheaders = getattr(response, "getheaders", None)
    if callable(getheaders):
        return getheaders()
    return getattr(response, "headers", None)


def _reject_removed(kwargs, where):
    if "fail_open" in kwargs:
        raise TypeError(
            f"{where}: fail_open was removed: an unreachable broker no longer lets calls go out "
            "unleased (unlimited); the QuotaBroker client paces them with its local fallback "
            "limiter instead (QuotaBroker(..., fallback=FallbackSettings(...)))"
        )
    if kwargs:
        raise TypeError(f"{where}() got unexpected keyword arguments: {', '.join(sorted(kwargs))}")


def instrument(api_client, broker, tenant, *, client_id, oauth_client=None, priority_class="",
               max_wait_ms=None, should_lease=default_should_lease, **removed):
    """Makes every HTTP request of ``api_client`` leased and reported; returns the wrapper.

    Also turns off the SDK's urllib3 retries (see the module docstring).
    Calling it twice on the same ApiClient is a no-op returning the wrapper
    (the first call's settings stay; different ones are logged as a warning).
    While the broker is unreachable, ``broker``'s local fallback limiter
    paces the calls (``fail_open`` is gone: never unlimited).
    """
    _reject_removed(removed, "instrument")
    current = api_client.get_http_client()
    if isinstance(current, LeasedHttpClient):
        asked = dict(broker=broker, tenant=tenant, client_id=client_id, oauth_client=oauth_client,
                     priority_class=priority_class, max_wait_ms=max_wait_ms, should_lease=should_lease)
        differ = sorted(k for k, v in asked.items() if getattr(current, k) is not v and getattr(current, k) != v)
        if differ:
            log.warning("instrument(): this ApiClient is already instrumented; keeping its first "
                        "settings, ignoring the different %s", ", ".join(differ))
        return current
    wrapper = LeasedHttpClient(current, broker, tenant, client_id=client_id,
                               oauth_client=oauth_client, api_client=api_client,
                               priority_class=priority_class, max_wait_ms=max_wait_ms,
                               should_lease=should_lease)
    api_client.set_http_client(wrapper)
    return wrapper
