"""qmail-remote's client TLS: contexts from the control files, a timed handshake, the peer's chain.

This is the one seam between qmail-remote and the ssl module (OpenSSL does the cryptography).
The connection itself stays qmail-remote's Smtp object: `handshake` turns its non-blocking
socket into a non-blocking SSLSocket with qmail's timeout on every wait, so moving qmail-remote
onto a shared transport later means replacing this module's two entry points.

Control files (the qmail-tls patch's): control/clientcert.pem (certificate and key offered when
a server asks; an unusable file is ignored, as the patch does), control/tlsclientciphers
(OpenSSL cipher strings, one a line, joined with ':'; they govern TLS 1.2 and older: Python's
ssl module cannot set TLS 1.3 suites).
"""

from __future__ import annotations

import select
import ssl
from dataclasses import dataclass

CLIENTCERT = "control/clientcert.pem"
CIPHERS = "tlsclientciphers"


class HandshakeFailed(Exception):
    """The TLS handshake failed; the message is OpenSSL's reason."""


class HandshakeTimeout(HandshakeFailed):
    """The TLS handshake stalled past the timeout."""


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


def _wait(sock: ssl.SSLSocket, write: bool, timeout: int) -> bool:
    p = select.poll()
    p.register(sock.fileno(), select.POLLOUT if write else select.POLLIN)
    return bool(p.poll(max(timeout, 0) * 1000))


def handshake(sock: object, ctx: ssl.SSLContext, server_hostname: str | None, timeout: int) -> ssl.SSLSocket:
    """Wrap the non-blocking socket sock and shake hands within timeout seconds per wait.

    server_hostname is sent as SNI (and checked when ctx checks names). Raises
    ssl.SSLCertVerificationError when ctx's verification fails, HandshakeTimeout when the peer
    stalls, HandshakeFailed for any other failure; the socket is then closed.
    """
    import socket

    assert isinstance(sock, socket.socket)
    tls = ctx.wrap_socket(sock, server_hostname=server_hostname, do_handshake_on_connect=False)
    try:
        while True:
            try:
                tls.do_handshake()
                return tls
            except ssl.SSLWantReadError:
                if not _wait(tls, False, timeout):
                    raise HandshakeTimeout("timed out") from None
            except ssl.SSLWantWriteError:
                if not _wait(tls, True, timeout):
                    raise HandshakeTimeout("timed out") from None
    except ssl.SSLCertVerificationError:
        tls.close()
        raise
    except ssl.SSLError as e:
        tls.close()
        raise HandshakeFailed(reason(e)) from e
    except OSError as e:
        tls.close()
        raise HandshakeFailed(e.strerror or str(e)) from e
    except BaseException:
        tls.close()
        raise


def reason(e: ssl.SSLError) -> str:
    """Return OpenSSL's short reason for e (e.g. 'wrong version number')."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return str(e.verify_message)
    if e.reason:
        return str(e.reason).lower().replace("_", " ")
    return str(e)


def peer_chain(tls: ssl.SSLSocket) -> list[bytes]:
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


def describe(tls: ssl.SSLSocket) -> str:
    """Return 'VERSION CIPHER' of an established connection."""
    cipher = tls.cipher()
    return f"{tls.version() or 'TLS'} {cipher[0] if cipher else 'unknown'}"
