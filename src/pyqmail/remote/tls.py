"""qmail-remote's client TLS: contexts from the control files, the peer's chain, the session's name.

The connection is pyqmail.net's Conn (qmail-remote's Smtp holds one): its starttls() shakes
hands on the socket under qmail's timeout, through a MemoryBIO, and leaves the ssl.SSLObject
in `conn.tls`, which `peer_chain` and `describe` read. OpenSSL does the cryptography.

Control files (the qmail-tls patch's): control/clientcert.pem (certificate and key offered when
a server asks; an unusable file is ignored, as the patch does), control/tlsclientciphers
(OpenSSL cipher strings, one a line, joined with ':'; they govern TLS 1.2 and older: Python's
ssl module cannot set TLS 1.3 suites).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

CLIENTCERT = "control/clientcert.pem"
CIPHERS = "tlsclientciphers"


@dataclass(frozen=True, slots=True)
class Settings:
    """What the control files say about every TLS connection qmail-remote makes."""

    ciphers: str | None  # None: OpenSSL's defaults
    clientcert: str | None  # the path, when the file exists


def context(settings: Settings, cafile: str | None = None, system_cas: bool = False,
            hostname_check: bool = False) -> ssl.SSLContext:
    """Return a client context: no verification, or verification against cafile or the system's CAs.

    Raises ssl.SSLError or OSError if cafile cannot be loaded.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if settings.ciphers:
        try:
            ctx.set_ciphers(settings.ciphers)
        except ssl.SSLError:
            pass  # the patch ignores SSL_set_cipher_list's failure too: OpenSSL's defaults stay
    if settings.clientcert is not None:
        try:
            ctx.load_cert_chain(settings.clientcert)
        except (ssl.SSLError, OSError):
            pass  # as the patch: "let the other side complain if it needs a cert and we don't have one"
    if cafile is not None or system_cas:
        if cafile is not None:
            ctx.load_verify_locations(cafile=cafile)
        else:
            ctx.load_default_certs()  # honours $SSL_CERT_FILE / $SSL_CERT_DIR (OpenSSL's default paths)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = hostname_check
    return ctx


def reason(e: ssl.SSLError) -> str:
    """Return OpenSSL's short reason for e (e.g. 'wrong version number')."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return str(e.verify_message)
    if e.reason:
        return str(e.reason).lower().replace("_", " ")
    return str(e)


def peer_chain(tls: ssl.SSLObject | ssl.SSLSocket) -> list[bytes]:
    """Return the certificates the peer sent, leaf first, in DER (empty if none)."""
    get = getattr(tls, "get_unverified_chain", None)  # Python 3.13+
    if get is not None:
        return [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]
                for c in get() or []]
    obj = getattr(tls, "_sslobj", None)  # 3.10-3.12 have the same method unexported
    get = getattr(obj, "get_unverified_chain", None)
    if get is not None:
        return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in get() or []]  # type: ignore[attr-defined]
    leaf = tls.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def describe(tls: ssl.SSLObject | ssl.SSLSocket) -> str:
    """Return 'VERSION CIPHER' of an established connection."""
    cipher = tls.cipher()
    return f"{tls.version() or 'TLS'} {cipher[0] if cipher else 'unknown'}"
