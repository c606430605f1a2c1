"""qmail-smtpd's TLS: the server context from the qmail-tls patch's control files, and client certificates.

This module imports ssl; qmail-smtpd imports it only when a client says
STARTTLS (or $SMTPS is set), so a plain-text session never loads OpenSSL.

Control files (read at each STARTTLS, as the patch does):
- control/servercert.pem: the certificate, its chain and the private key in one file;
- control/tlsserverciphers: OpenSSL cipher strings, one a line, joined with ':' (overridden
  by $TLSCIPHERS); they govern TLS 1.2 and older (Python's ssl cannot set TLS 1.3 suites);
  without either, Python's default list stays;
- control/dh2048.pem: DH parameters, when present (otherwise OpenSSL's built-in groups);
- control/tlsclients: e-mail addresses; when it has any and control/clientca.pem loads, the
  client is asked for a certificate, verified against clientca.pem (and against the CRLs of
  control/clientcrl.pem when that file loads); a verified certificate whose subject's
  emailAddress is in tlsclients gets RELAYCLIENT.
"""

from __future__ import annotations

import os
import ssl

from pyqmail import control

SERVERCERT = "control/servercert.pem"
CLIENTCA = "control/clientca.pem"
CLIENTCRL = "control/clientcrl.pem"
DHPARAMS = "control/dh2048.pem"
CIPHERS = "tlsserverciphers"
CLIENTS = "tlsclients"


class Unusable(Exception):
    """The server certificate cannot be used; args: (what, reason), the patch's words ("missing certificate")."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(what, why)
        self.what = what
        self.why = why


def _why(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        if e.reason:
            return str(e.reason).lower().replace("_", " ")
        text = str(e.args[1]) if len(e.args) > 1 else str(e)  # '[SSL] PEM lib (_ssl.c:3905)'
        if text.startswith("[") and "] " in text:
            text = text.split("] ", 1)[1]
        return text.split(" (_ssl.c", 1)[0].lower()
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def ciphers(env: dict[bytes, bytes] | os._Environ[bytes]) -> str | None:
    """Return $TLSCIPHERS, else control/tlsserverciphers' lines joined with ':', else None."""
    x = env.get(b"TLSCIPHERS")
    if x is not None:
        return x.decode("latin-1") or None
    lines = control.read_lines(CIPHERS)  # ControlError when unreadable: qmail-smtpd's 421
    return ":".join(lines) if lines else None


def clients() -> frozenset[bytes]:
    """Return the addresses of control/tlsclients (empty if missing); ControlError if unreadable."""
    lines = control.read_lines(CLIENTS)
    return frozenset(x.encode("latin-1") for x in lines or ())


def server_context(cipher_list: str | None, ask_client_cert: bool) -> ssl.SSLContext:
    """Return the server context for this session; raise Unusable when servercert.pem cannot be used."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(SERVERCERT)
    except OSError as e:  # ssl.SSLError included
        what = "missing certificate"
        if isinstance(e, ssl.SSLError):
            try:
                with open(SERVERCERT, "rb") as f:
                    data = f.read(1 << 20)
            except OSError:
                data = b""
            if b"-----BEGIN CERTIFICATE-----" in data:
                what = "no valid RSA private key"  # the patch's words, whatever the key's type
        raise Unusable(what, _why(e)) from None
    # One TLS 1.3 session ticket (it can never be used: each child has its own ticket key; the
    # patch turns the session cache off). Sent at once after the client's Finished, it carries
    # the TCP ACK a client waits for (Nagle) before its first command; with none, each
    # STARTTLS session waited for the delayed ACK: +20 to 40 ms (bench/smtpd.py --tls).
    ctx.num_tickets = 1
    if cipher_list:
        try:
            ctx.set_ciphers(cipher_list)
        except ssl.SSLError:
            pass  # safe: the patch ignores SSL_set_cipher_list's failure too; the defaults stay
    try:
        ctx.load_dh_params(DHPARAMS)
    except (OSError, ValueError):
        pass  # safe: absent or unusable, OpenSSL's built-in groups are used (the patch's fallback)
    if ask_client_cert:
        try:
            ctx.load_verify_locations(cafile=CLIENTCA)
        except (OSError, ValueError):
            return ctx  # the patch: no client CA list, no certificate asked for
        try:
            ctx.load_verify_locations(cafile=CLIENTCRL)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
        except (OSError, ValueError):
            pass  # safe: without a CRL file, certificates are not checked for revocation (the patch)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def cert_email(tls: ssl.SSLObject) -> bytes | None:
    """Return the emailAddress of the client's verified certificate's subject, or None."""
    cert = tls.getpeercert()
    if not cert:
        return None
    subject: tuple[tuple[tuple[str, str], ...], ...] = cert.get("subject", ())  # type: ignore[assignment]
    for rdn in subject:
        for key, value in rdn:
            if key == "emailAddress" and value:
                return value.encode("utf-8", "replace")
    return b""


def cipher_name(tls: ssl.SSLObject) -> bytes:
    """Return the negotiated cipher's OpenSSL name (as SSL_get_cipher)."""
    c = tls.cipher()
    return (c[0] if c else "unknown").encode("ascii", "replace")
