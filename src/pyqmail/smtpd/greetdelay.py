"""qmail-smtpd's greeting delay and early-talker check: $SMTPD_GREETDELAY and $DROP_PRE_GREET, as
John Simpson's greetdelay patch (in sagredo's qmail), Postfix postscreen's pregreet test in qmail's words.

$SMTPD_GREETDELAY seconds (0, the default: none; beyond the patch, a decimal fraction
such as ``0.5`` is allowed) pass before the 220 line, unless $RELAYCLIENT is set. With $DROP_PRE_GREET set and not 0, a client that sends anything
in that time (RFC 5321 4.3.1: a client waits for the greeting) gets ``554 SMTP protocol
violation`` and the connection ends (exit 1), logged as ``GREETDELAY from IP: client sent
data before greeting``; one that goes away is logged as ``GREETDELAY from IP: client
disconnected``. Without $DROP_PRE_GREET, what an early client sent is read and dropped
(logged once, ``... ignoring``), and the session starts after the delay. Under SMTPS the
delay runs after the TLS handshake (the client speaks first in TLS).
"""

from __future__ import annotations

import select
import time

from pyqmail import wait as waiting
from pyqmail.net import Gone
from pyqmail.smtpd.log import field, warn
from pyqmail.ucspi.rules import scan_ulong

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from pyqmail.net import Conn

PRE_GREET = b"554 SMTP protocol violation\r\n"
POLL_MAX_MS = 1 << 30


def settings(env: Mapping[bytes, bytes]) -> tuple[float, bool]:
    """Return (the delay in seconds, drop early talkers) from the environment; (0, False) for a relay client."""
    x = env.get(b"SMTPD_GREETDELAY")
    if x is None or b"RELAYCLIENT" in env:
        return 0, False
    y = env.get(b"DROP_PRE_GREET")
    seconds, n = scan_ulong(x)
    delay: float = seconds
    if x[n:n + 1] == b"." and x[n + 1:n + 2].isdigit():  # beyond the patch: "0.5" is half a second
        fraction, m = scan_ulong(x[n + 1:n + 7])
        delay += fraction / 10 ** m
    return delay, y is not None and scan_ulong(y)[0] != 0


def _ready(conn: Conn, seconds: float) -> bool:
    """Return whether the client sent something within seconds (what TLS holds counts)."""
    if conn.buffered():
        return True
    return waiting.ready(conn.fd_in, select.POLLIN, min(int(seconds * 1000) + 1, POLL_MAX_MS))


def wait(conn: Conn, delay: float, drop: bool, ip: bytes,
         clock: Callable[[], float] = time.monotonic) -> bytes | None:
    """Let delay seconds pass before the greeting; return the reply that ends the session, or None.

    Raises Gone when the client goes away (logged when drop).
    """
    deadline = clock() + delay
    told = False
    while True:
        left = deadline - clock()
        if left <= 0 or not _ready(conn, left):
            return None
        try:
            if not conn.pending():
                conn.read()  # what it sent is not for us: the greeting has not been given
        except Gone:
            if drop:
                warn(b"GREETDELAY from " + field(ip) + b": client disconnected")
            raise
        if drop:
            warn(b"GREETDELAY from " + field(ip) + b": client sent data before greeting")
            return PRE_GREET
        if not told:
            told = True
            warn(b"GREETDELAY from " + field(ip) + b": client sent data before greeting. ignoring")
