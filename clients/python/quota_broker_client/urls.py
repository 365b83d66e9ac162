"""Broker urls: what a url given to QuotaBroker means (the "host:port"
gRPC dials, and whether it speaks TLS), a url that can never be connected
to refused as BadUrl, several urls given as a list or comma-separated, and
the hint a fallback warning adds when a url gives no port.
"""
import ipaddress
from urllib.parse import urlsplit

from . import errors


#: gRPC target forms other than "host:port", passed to gRPC as they are.
_GRPC_TARGET_SCHEMES = ("unix:", "unix-abstract:", "vsock:", "ipv4:", "ipv6:", "dns:")


#: A broker's gRPC port unless its ``server.listen`` says another.
BROKER_DEFAULT_PORT = 50051
#: Most characters of a url (or a part of one) an error shows: it is what
#: was given, however long.
_SHOWN_CHARS = 100


def _shown(text):
    """``text`` as an error shows it (quoted): as is, or cut after
    _SHOWN_CHARS characters with its length."""
    text = str(text)
    if len(text) <= _SHOWN_CHARS:
        return repr(text)
    return f"{text[:_SHOWN_CHARS]!r}… ({len(text)} characters)"


def _check_host_port(hostport, url):
    """Raises BadUrl when ``hostport`` (of the broker url ``url``) can never
    be connected to: gRPC would fail every call on it, which reads as a
    broker that is down (the fallback, for good) instead of a mistake."""
    if hostport.startswith(_GRPC_TARGET_SCHEMES):
        return
    def bad(why):
        return errors.BadUrl(f"broker url {_shown(url)}: {why} (give host:port, http://host:port "
                             "or https://host:port; an IPv6 address in brackets, [::1]:50051)")
    if hostport.startswith("["):
        host, closed, rest = hostport[1:].partition("]")
        if not closed:
            raise bad("no ']' closes the IPv6 address")
        if rest and not rest.startswith(":"):
            raise bad(f"{_shown(rest)} after the IPv6 address")
        port = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{_shown(host)} in brackets is not an IPv6 address") from None
    elif hostport.count(":") > 1:
        try:
            ipaddress.IPv6Address(hostport)  # a bare IPv6 address (gRPC's default port)
            return
        except ValueError:
            raise bad("more than one ':'") from None
    else:
        host, colon, port = hostport.partition(":")
        port = port if colon else None
        if any(c.isspace() or c in "/?#@[]" for c in host):
            raise bad("the host has characters a host name cannot have (a space, '/', '?', '#', "
                      "'@', '[' or ']')")
    if not host:
        raise bad("no host")
    # (At most 5 digits before int(): Python refuses to convert thousands.)
    if port is not None and not (port.isascii() and port.isdigit() and len(port.lstrip("0")) <= 5
                                 and 1 <= int(port) <= 65535):
        raise bad(f"the port {_shown(port)} is not a number from 1 to 65535")


def _target(url):
    """Returns (target, tls) for "host:port" (tls None: not said), "http://..." (False), "https://..." (True).

    A url that can never be connected to is BadUrl (a ValueError)."""
    if "://" not in url:
        _check_host_port(url, url)
        return url, None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "grpc", "grpcs"):
        raise errors.BadUrl(f"unsupported scheme in broker url {_shown(url)} (use http:// or "
                            "https://)")
    if not parts.netloc:
        raise errors.BadUrl(f"no host in broker url {_shown(url)}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        # gRPC dials host:port and calls its own paths: a path here would be dropped.
        raise errors.BadUrl(f"broker url {_shown(url)}: a gRPC broker url has no path, query or "
                            f"fragment (got {_shown(url[len(parts.scheme) + 3 + len(parts.netloc):])}); "
                            "give http://host:port or https://host:port")
    secure = parts.scheme in ("https", "grpcs")
    netloc = parts.netloc
    try:
        port = parts.port
    except ValueError:  # urllib's words: "Port could not be cast...", "Port out of range..."
        port = netloc.rpartition(":")[2]
        raise errors.BadUrl(f"broker url {_shown(url)}: the port {_shown(port)} is not a number "
                            "from 1 to 65535") from None
    if port is None:
        # No port (or an empty one): the scheme's.
        netloc = f"{netloc.rstrip(':')}:{443 if secure else 80}"
    _check_host_port(netloc, url)
    return netloc, secure


def _implicit_port(url):
    """The port a broker url that gives none is dialled on (the scheme's, 80
    for http://, 443 for https://; gRPC's default, 443, for a bare host), or
    None when it gives one (or is another gRPC target form). For a url that
    parses (see _target)."""
    if "://" in url:
        parts = urlsplit(url)
        try:
            if parts.port is not None:
                return None
        except ValueError:
            return None
        return 443 if parts.scheme in ("https", "grpcs") else 80
    if url.startswith(_GRPC_TARGET_SCHEMES):
        return None
    if url.startswith("["):
        return None if "]:" in url else 443
    if url.count(":") > 1 or ":" not in url:  # a bare IPv6 address, or a bare host
        return 443
    return None


def _no_port_hint(urls):
    """What a fallback warning adds when a broker url gives no port: the
    port used and the broker's default ("" when every url gives one)."""
    portless = [(u, p) for u in urls for p in [_implicit_port(u)] if p is not None]
    if not portless:
        return ""
    used = ", ".join(f"{_shown(u)} was dialled on port {p}" for u, p in portless)
    return (f"; the url gives no port, so {used}: a broker's gRPC port is "
            f"{BROKER_DEFAULT_PORT} unless its server.listen says another: give the port in the url "
            f"(host:{BROKER_DEFAULT_PORT})")


def _split_urls(url):
    """The broker urls of ``url``: a str (several comma-separated) or a list/tuple of str."""
    if isinstance(url, (bytes, bytearray)):
        url = url.decode("utf-8")
    items = [url] if isinstance(url, str) else list(url)
    urls = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"broker url must be a str, got {type(item).__name__}")
        urls.extend(u.strip() for u in item.split(",") if u.strip())
    if not urls:
        raise ValueError(f"no broker url given in {_shown(url)}")
    return urls
