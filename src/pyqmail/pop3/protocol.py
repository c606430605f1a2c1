"""POP3 as qmail-popup and qmail-pop3d speak it: replies, command lines, the client connection (pyqmail.net).

Both programs read a command line up to LF (a CR before it is dropped), cut it
at its first NUL as C strings are, take the verb up to the first space and the
argument after the run of spaces, and compare verbs without regard to case.
"""

from __future__ import annotations

import os

from pyqmail import net

OK = b"+OK \r\n"
TIMEOUT = 1200.0  # both man pages: a 20-minute idle timeout
MAX_LINE = 4096  # bytes kept of a command line; the rest of a longer line is read and dropped
_CHUNK = 128  # qmail reads its input in 128-byte pieces; what it has read past a line is its own
READ_SIZE = 65536  # what qmail-pop3d and a TLS session read at once
OUT_MAX = 65536  # replies held before they are sent (else before the next read)
TIMEOUT_ENV = "PYQMAIL_POP3_TIMEOUT"


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


def timeout() -> float:
    """Return the idle timeout: TIMEOUT, or $PYQMAIL_POP3_TIMEOUT seconds (a test seam)."""
    x = os.environ.get(TIMEOUT_ENV, "")
    try:
        return float(x) if x else TIMEOUT
    except ValueError:
        return TIMEOUT


def connect(fd_in: int = 0, fd_out: int = 1, read_size: int = _CHUNK, seconds: float | None = None) -> net.Conn:
    """Return the client on fd_in/fd_out with the idle timeout on every wait (pyqmail.net)."""
    return net.Conn(fd_in, fd_out, timeout() if seconds is None else seconds, read_size=read_size,
                    out_max=OUT_MAX)


def readline(conn: net.Conn, limit: int = MAX_LINE) -> bytes:
    """Return the next command line without its LF, at most limit bytes of it; NetError at the end or timeout."""
    return conn.line(limit)[:limit]


class LineReader:
    """Read command lines from a descriptor, at most limit bytes kept of each (readline raises Closed)."""

    def __init__(self, fd: int, timeout: float = TIMEOUT, limit: int = MAX_LINE) -> None:
        self.conn = net.Conn(fd, fd, timeout, read_size=_CHUNK)
        self.limit = limit

    def readline(self) -> bytes:
        """Return the next line without its LF; raise Closed at end of input or timeout."""
        try:
            return readline(self.conn, self.limit)
        except net.Timeout:
            raise Closed("timeout") from None
        except net.NetError as e:
            raise Closed(str(e)) from None
