"""TLS settings for the broker's gRPC port: PEM inputs, checks, channel credentials.

``QuotaBroker(..., ca_cert=..., client_cert=..., client_key=...)`` takes each
as PEM ``bytes``, a ``str`` holding PEM (it contains ``-----BEGIN``), or a
file path (``str`` or ``os.PathLike``). They are read and checked when the
client is built (with the standard library's ``ssl``): gRPC itself accepts
anything and only fails the handshake later, which would look like an
unreachable broker and send the client into its local fallback.
"""
import os
import ssl
import tempfile

import grpc

from .errors import TlsError

_BEGIN = "-----BEGIN"
_CERTIFICATE = "-----BEGIN CERTIFICATE-----"
_ENCRYPTED_KEY = "-----BEGIN ENCRYPTED PRIVATE KEY-----"


class _Pem:
    """PEM text and where it came from (``path`` is None for in-memory PEM)."""

    def __init__(self, data, what, path=None):
        self.data = data
        self.what = what
        self.path = path

    @property
    def source(self):
        return f"{self.what} {self.path}" if self.path else f"{self.what} (given as PEM)"

    @property
    def text(self):
        try:
            return self.data.decode("ascii")
        except UnicodeDecodeError:
            raise TlsError(f"{self.source}: not PEM (non-ASCII content)") from None


def load_pem(value, what):
    """A :class:`_Pem` from PEM bytes, a str holding PEM, or a path; None for None."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _Pem(bytes(value), what)
    if isinstance(value, str) and _BEGIN in value:
        return _Pem(value.encode("utf-8"), what)
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        try:
            with open(path, "rb") as f:
                return _Pem(f.read(), what, path)
        except OSError as e:
            raise TlsError(f"cannot read {what} {path}: {e.strerror or e}") from None
    raise TypeError(f"{what} must be PEM bytes, a PEM str or a file path, got {type(value).__name__}")


def _check_ca(ca):
    text = ca.text
    if _CERTIFICATE not in text:
        raise TlsError(f"{ca.source}: no PEM certificate (-----BEGIN CERTIFICATE-----)")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except (ssl.SSLError, ValueError) as e:
        raise TlsError(f"{ca.source}: not a usable CA certificate: {e}") from None


def _check_identity(cert, key):
    if _CERTIFICATE not in cert.text:
        raise TlsError(f"{cert.source}: no PEM certificate (-----BEGIN CERTIFICATE-----)")
    key_text = key.text
    if _ENCRYPTED_KEY in key_text or "Proc-Type: 4,ENCRYPTED" in key_text:
        raise TlsError(f"{key.source}: an encrypted private key, which gRPC cannot use; "
                       "decrypt it (e.g. `openssl pkey -in KEY -out KEY.plain`)")
    if "PRIVATE KEY-----" not in key_text:
        raise TlsError(f"{key.source}: no PEM private key (-----BEGIN PRIVATE KEY-----)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)

    def no_password():
        raise TlsError(f"{key.source}: the private key asks for a password, which gRPC cannot give")

    try:
        if cert.path and key.path:
            ctx.load_cert_chain(cert.path, key.path, password=no_password)
            return
        # ssl loads a chain only from files: a private temporary directory
        # (mode 0700), removed right after the check.
        with tempfile.TemporaryDirectory(prefix="quota-broker-tls-") as d:
            cert_path = os.path.join(d, "cert.pem")
            key_path = os.path.join(d, "key.pem")
            for path, data in ((cert_path, cert.data), (key_path, key.data)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            ctx.load_cert_chain(cert_path, key_path, password=no_password)
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e) or "key values mismatch" in str(e):
            raise TlsError(f"{key.source} does not fit the certificate in {cert.source}") from None
        raise TlsError(f"{cert.source} / {key.source}: not a usable certificate and key: {e}") from None


def channel_credentials(ca_cert=None, client_cert=None, client_key=None):
    """``grpc.ssl_channel_credentials`` from checked PEM inputs.

    ``ca_cert`` None trusts gRPC's default roots; ``client_cert`` and
    ``client_key`` (both or neither) are presented for mutual TLS.
    """
    if (client_cert is None) != (client_key is None):
        raise TlsError("client_cert and client_key go together (mutual TLS needs both)")
    ca = load_pem(ca_cert, "CA certificate")
    cert = load_pem(client_cert, "client certificate")
    key = load_pem(client_key, "client key")
    if ca is not None:
        _check_ca(ca)
    if cert is not None:
        _check_identity(cert, key)
    return grpc.ssl_channel_credentials(
        root_certificates=ca.data if ca is not None else None,
        private_key=key.data if key is not None else None,
        certificate_chain=cert.data if cert is not None else None,
    )
