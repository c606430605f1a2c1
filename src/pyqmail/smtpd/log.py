"""qmail-smtpd's log lines on descriptor 2 (the service's multilog), for the checks."""

from __future__ import annotations

import os

_PRINTABLE = bytes(c if 32 <= c <= 126 else ord("?") for c in range(256))


def warn(text: bytes) -> None:
    """Write ``qmail-smtpd: text`` as one line to descriptor 2, in one write; a missing log is ignored."""
    try:
        os.write(2, b"qmail-smtpd: " + text + b"\n")
    except OSError:
        pass  # safe: no log to write to; the client has its reply either way


def field(data: bytes, most: int = 200) -> bytes:
    """Return data fit for one log line: cut at most bytes, bytes outside printable ASCII as '?'."""
    return data[:most].translate(_PRINTABLE)
