"""POP3 as qmail-popup and qmail-pop3d speak it: replies, command lines, timed descriptor I/O.

Both programs read a command line up to LF (a CR before it is dropped), cut it
at its first NUL as C strings are, take the verb up to the first space and the
argument after the run of spaces, and compare verbs without regard to case.
"""

from __future__ import annotations

import os
import select

OK = b"+OK \r\n"
TIMEOUT = 1200.0  # both man pages: a 20-minute idle timeout
MAX_LINE = 4096  # bytes kept of a command line; the rest of a longer line is read and dropped
_CHUNK = 128  # qmail reads its input in 128-byte pieces; what it has read past a line is its own


def err(text: str) -> bytes:
    """Return the reply "-ERR text" with its CRLF."""
    return b"-ERR " + text.encode("latin-1") + b"\r\n"


def split_command(line: bytes) -> tuple[bytes, bytes]:
    """Return (verb in lower case, argument) of a command line without its LF."""
    if line.endswith(b"\r"):
        line = line[:-1]
    line = line.split(b"\0", 1)[0]
    verb, _, arg = line.partition(b" ")
    return verb.lower(), arg.lstrip(b" ")


def scan_ulong(s: bytes) -> tuple[int, int]:
    """Return (value, digits used) of the decimal number s starts with; (0, 0) if none."""
    n = 0
    while n < len(s) and 48 <= s[n] <= 57:
        n += 1
    if n == 0:
        return 0, 0
    # An unsigned long wraps as qmail's scan_ulong does.
    return int(s[:n]) % (1 << 64), n


class Closed(Exception):
    """The peer went away, an I/O error happened, or the idle timeout passed."""


class LineReader:
    """Read command lines from a descriptor, at most MAX_LINE bytes kept of each."""

    def __init__(self, fd: int, timeout: float = TIMEOUT, limit: int = MAX_LINE) -> None:
        self.fd = fd
        self.timeout = timeout
        self.limit = limit
        self._buf = b""

    def _fill(self) -> bytes:
        try:
            ready, _, _ = select.select([self.fd], [], [], self.timeout)
            if not ready:
                raise Closed("timeout")
            data = os.read(self.fd, _CHUNK)
        except OSError as e:
            raise Closed(str(e)) from e
        if not data:
            raise Closed("end of input")
        return data

    def readline(self) -> bytes:
        """Return the next line without its LF; raise Closed at end of input or timeout."""
        kept = b""
        over = False
        while True:
            if not self._buf:
                self._buf = self._fill()
            nl = self._buf.find(b"\n")
            piece = self._buf if nl < 0 else self._buf[:nl]
            self._buf = b"" if nl < 0 else self._buf[nl + 1:]
            if not over:
                room = self.limit - len(kept)
                if len(piece) > room:
                    piece, over = piece[:room], True
                kept += piece
            if nl >= 0:
                return kept


def write_all(fd: int, data: bytes, timeout: float = TIMEOUT) -> None:
    """Write all of data to fd; raise Closed on error or when fd stays unwritable for timeout."""
    view = memoryview(data)
    try:
        while view:
            _, ready, _ = select.select([], [fd], [], timeout)
            if not ready:
                raise Closed("timeout")
            n = os.write(fd, view)
            view = view[n:]
    except OSError as e:
        raise Closed(str(e)) from e
