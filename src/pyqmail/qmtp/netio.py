"""Netstring-speaking servers' connection and helpers: net.Conn under one session deadline, qmail's exits.

qmail-qmtpd and qmail-qmqpd stop after an hour whatever happens (qmail's
alarm(3600), exit 111), exit 0 when the client goes away or a write fails,
and send what they have to say before each read. The timed, buffered I/O
is pyqmail.net's; this module only maps its failures to those exits.
"""

from __future__ import annotations

import time

from pyqmail import net

U64 = (1 << 64) - 1
READ_SIZE = net.READ_SIZE
OUT_MAX = 65536  # replies held before they must be sent
EXIT_GONE = 0
EXIT_PROTOCOL = 100
EXIT_RESOURCES = 111
LEN_MAX = 200000000  # a length past this is refused as lack of resources


class Exit(Exception):
    """End the program with this exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _exit(e: net.NetError) -> Exit:
    # The deadline passing (reading or writing) is alarm(3600): 111; the client gone is 0.
    return Exit(EXIT_RESOURCES if isinstance(e, net.Timeout) else EXIT_GONE)


class Conn(net.Conn):
    """The client on two descriptors, read and written until a monotonic deadline; failures are Exit."""

    __slots__ = ()

    def __init__(self, fd_in: int, fd_out: int, seconds: float) -> None:
        super().__init__(fd_in, fd_out, None, deadline=time.monotonic() + seconds, out_max=OUT_MAX)

    def flush(self) -> None:
        """Send everything written so far; Exit(0) if the client cannot take it, Exit(111) past the deadline."""
        try:
            super().flush()
        except net.NetError as e:
            raise _exit(e) from None

    def read(self) -> bytes:
        """Send what is queued, then return the client's next bytes; Exit(0) at their end, Exit(111) past the deadline."""
        try:
            return super().read()
        except net.NetError as e:
            raise _exit(e) from None


def digit_step(n: int, ch: int) -> int:
    """Return 10 * n + (ch - '0') as qmail computes it: ch a signed char, n an unsigned long."""
    return (10 * n + (ch - 256 if ch >= 128 else ch) - 48) & U64


def netstring(data: bytes) -> bytes:
    """Return data as a netstring."""
    return b"%d:%s," % (len(data), data)
