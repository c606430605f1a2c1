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


def line(service: str, now: int) -> bytes:
    """Return svstat's line for service at unix time now, newline included."""
    try:
        text = status.read(service).describe(now)
    except status.StatusError as e:
        text = str(e)
    return os.fsencode(service) + b": " + text.encode() + b"\n"


def _main(argv: list[str]) -> int:
    try:
        # daemontools opens the current directory to come back to it; it can fail.
        os.close(os.open(".", os.O_RDONLY | os.O_CLOEXEC))
    except OSError as e:
        raise Die(EXIT_TROUBLE, FATAL + b"unable to open current directory: " + describe(e).encode()) from None
    out = b"".join(line(service, int(time.time())) for service in argv[1:])
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
