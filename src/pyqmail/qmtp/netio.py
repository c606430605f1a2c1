"""Netstring-speaking servers' I/O: buffered reads and writes under one session deadline.

qmail-qmtpd and qmail-qmqpd stop after an hour whatever happens (qmail's
alarm(3600), exit 111), exit 0 when the client goes away or a write fails,
and send what they have to say before each read.
"""

from __future__ import annotations

import os
import select
import time

U64 = (1 << 64) - 1
READ_SIZE = 65536
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


class Conn:
    """The client on two descriptors, read and written until a monotonic deadline."""

    __slots__ = ("fd_in", "fd_out", "deadline", "buf", "pos", "out")

    def __init__(self, fd_in: int, fd_out: int, seconds: float) -> None:
        self.fd_in = fd_in
        self.fd_out = fd_out
        self.deadline = time.monotonic() + seconds
        self.buf = b""
        self.pos = 0
        self.out = bytearray()

    def _wait(self, fd: int, event: int) -> None:
        left = self.deadline - time.monotonic()
        p = select.poll()
        p.register(fd, event)
        if left <= 0 or not p.poll(int(left * 1000) + 1):
            raise Exit(EXIT_RESOURCES)

    def put(self, data: bytes) -> None:
        """Queue data for the client; past OUT_MAX bytes send them now (qmail's full substdio buffer)."""
        self.out += data
        if len(self.out) >= OUT_MAX:
            self.flush()

    def flush(self) -> None:
        """Send everything written so far; Exit(0) if the client cannot take it."""
        while self.out:
            self._wait(self.fd_out, select.POLLOUT)
            try:
                n = os.write(self.fd_out, self.out[:READ_SIZE])
            except OSError:
                raise Exit(EXIT_GONE) from None
            del self.out[:n]

    def _fill(self) -> None:
        self.flush()
        self._wait(self.fd_in, select.POLLIN)
        try:
            data = os.read(self.fd_in, READ_SIZE)
        except OSError:
            raise Exit(EXIT_GONE) from None
        if not data:
            raise Exit(EXIT_GONE)
        self.buf = data
        self.pos = 0

    def byte(self) -> int:
        """Return the next byte from the client."""
        if self.pos >= len(self.buf):
            self._fill()
        c = self.buf[self.pos]
        self.pos += 1
        return c

    def chunk(self, most: int) -> bytes:
        """Return the next 1 to most bytes from the client (most > 0)."""
        if self.pos >= len(self.buf):
            self._fill()
        data = self.buf[self.pos:self.pos + most]
        self.pos += len(data)
        return data


def digit_step(n: int, ch: int) -> int:
    """Return 10 * n + (ch - '0') as qmail computes it: ch a signed char, n an unsigned long."""
    return (10 * n + (ch - 256 if ch >= 128 else ch) - 48) & U64


def netstring(data: bytes) -> bytes:
    """Return data as a netstring."""
    return b"%d:%s," % (len(data), data)
