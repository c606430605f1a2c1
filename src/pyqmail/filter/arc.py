"""ARC (RFC 8617) with dkimpy: verify the chain of an inbound message, seal a forwarded one.

qmail-dkim verifies on inbound mail (the result goes into its
Authentication-Results header as `arc=`) and seals mail that qmail-local
forwards off this host, from the Authentication-Results header it wrote
when the message came in (authserv-id control/me).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Callable


def verify(message: bytes, dnsfunc: Callable[..., bytes | None]) -> str:
    """Return the chain validation status of message: pass, fail or none."""
    import dkim

    try:
        cv, _results, _reason = dkim.ARC(message, logger=_quiet()).verify(dnsfunc=dnsfunc)
    except dkim.DKIMException:
        return "fail"
    if cv is None:
        return "fail"  # dkimpy: a chain that has ended (an earlier cv=fail)
    return cv.decode("ascii", "replace").lower() if isinstance(cv, bytes) else str(cv).lower()


def seal(message: bytes, selector: bytes, domain: bytes, key: bytes, srv_id: bytes) -> bytes:
    """Return the ARC set (ARC-Seal, ARC-Message-Signature, ARC-Authentication-Results) to put on top.

    Empty when message has no Authentication-Results header of srv_id (the
    chain cannot be continued: RFC 8617 5.1.1) or the key cannot seal.
    """
    import dkim

    try:
        signer = dkim.ARC(message, logger=_quiet(), linesep=b"\n")
        lines = signer.sign(selector, domain, key, srv_id, include_headers=signer.default_sign_headers())
    except dkim.DKIMException:
        return b""
    return b"".join(lines)


_logger: object | None = None


def _quiet() -> object:
    """A logger that drops dkimpy's messages (qmail-dkim reports in its own words)."""
    global _logger
    if _logger is None:
        import logging

        log = logging.getLogger("pyqmail.filter.dkimpy")
        log.addHandler(logging.NullHandler())
        log.propagate = False
        _logger = log
    return _logger
