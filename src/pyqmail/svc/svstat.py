"""svstat: print the status of services monitored by supervise (daemontools svstat(8)).

usage: svstat services...

One line per service: 'dir: up (pid N) S seconds', 'dir: down S seconds',
with ', normally down', ', normally up', ', paused', ', want up', ', want
down' as they apply, 'dir: supervise not running', or 'dir: unable to ...'.
Exit 0; 111 if the current directory cannot be opened.
"""

from __future__ import annotations

import os
import time

from pyqmail.entry import program
from pyqmail.errors import describe
from pyqmail.strerr import Die
from pyqmail.svc import status

FATAL = b"svstat: fatal: "
EXIT_TROUBLE = 111
FD_OUT = 1


class Reader:
    """svstat's reading of services, one after another through one status buffer."""

    def __init__(self) -> None:
        # daemontools' svstat keeps one static buffer: a short read leaves
        # old bytes behind it, and a failed read (a directory) passes for a
        # full one, showing the bytes of the service before (zeros at first).
        self.buf = bytearray(status.SIZE)

    def line(self, service: str, now: int) -> bytes:
        """Return svstat's line for service at unix time now, newline included."""
        try:
            normally_up, data = status.probe(service)
        except status.ReadFailed as e:
            normally_up, data = e.normally_up, bytes(self.buf)
        except status.StatusError as e:
            return self._line(service, str(e))
        self.buf[:len(data)] = data
        if len(data) < status.SIZE:
            return self._line(service, "unable to read supervise/status: bad format")
        return self._line(service, status.unpack(bytes(self.buf), normally_up).describe(now))

    @staticmethod
    def _line(service: str, text: str) -> bytes:
        return os.fsencode(service) + b": " + text.encode() + b"\n"


def _main(argv: list[str]) -> int:
    try:
        # daemontools opens the current directory to come back to it; it can fail.
        os.close(os.open(".", os.O_RDONLY | os.O_CLOEXEC))
    except OSError as e:
        raise Die(EXIT_TROUBLE, FATAL + b"unable to open current directory: " + describe(e).encode()) from None
    reader = Reader()
    out = b"".join(reader.line(service, int(time.time())) for service in argv[1:])
    try:
        while out:
            out = out[os.write(FD_OUT, out):]
    except OSError:
        pass  # svstat ignores a failed write: its exit code is 0 all the same
    return 0


@program("svstat", crash=EXIT_TROUBLE)
def main(argv: list[str]) -> int:
    """Print the status of each service; return 0 (111 if the current directory cannot be opened)."""
    try:
        return _main(argv)
    except Die as d:
        return d.report()
