"""svc: control services monitored by supervise (daemontools svc(8)).

usage: svc -udopchaitkx services...

Writes the option letters (each once, in order of first appearance) to each
service's supervise/control FIFO. A service that cannot be controlled gets a
warning; exit 0 unless the options are bad (100) or the starting directory
is lost (111).
"""

from __future__ import annotations

import errno
import os

from pyqmail.entry import program
from pyqmail.errors import describe
from pyqmail.sgetopt import Getopt
from pyqmail.strerr import Die, warn

FATAL = b"svc: fatal: "
WARNING = b"svc: warning: "
USAGE = (b"svc options: u up, d down, o once, x exit, p pause, c continue,"
         b" h hup, a alarm, i interrupt, t term, k kill")
OPTIONS = "udopchaitkx"
CONTROL = "supervise/control"
EXIT_USAGE = 100
EXIT_TROUBLE = 111


def commands(argv: list[str]) -> tuple[bytes, list[str]]:
    """Return (the control bytes, the services) argv names; raise Die(100) for a bad option."""
    opts = Getopt(argv, OPTIONS)
    data = ""
    for opt, _ in opts:
        if opt == "?":
            raise Die(EXIT_USAGE, USAGE)
        if opt not in data:
            data += opt
    return data.encode(), opts.operands()


def control(service: str, data: bytes) -> None:
    """Write data to the control FIFO of service (the current directory); warn on trouble."""
    name = os.fsencode(service)
    try:
        # Non-blocking: with no supervise reading, the open fails (ENXIO) instead of hanging.
        fd = os.open(CONTROL, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        why = b"supervise not running" if e.errno == errno.ENXIO else describe(e).encode()
        warn(WARNING + b"unable to control " + name + b": " + why)
        return
    try:
        os.set_blocking(fd, True)
        rest = memoryview(data)
        while rest:
            rest = rest[os.write(fd, rest):]
    except OSError as e:
        warn(WARNING + b"error writing commands to " + name + b": " + describe(e).encode())
    finally:
        os.close(fd)


def _main(argv: list[str]) -> int:
    data, services = commands(argv)
    try:
        orig = os.open(".", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise Die(EXIT_TROUBLE, FATAL + b"unable to open current directory: " + describe(e).encode()) from None
    for service in services:
        try:
            os.chdir(service)
        except OSError as e:
            warn(WARNING + b"unable to chdir to " + os.fsencode(service) + b": " + describe(e).encode())
        else:
            control(service, data)
        try:
            os.fchdir(orig)
        except OSError as e:
            raise Die(EXIT_TROUBLE, FATAL + b"unable to set directory: " + describe(e).encode()) from None
    return 0


@program("svc", crash=EXIT_TROUBLE)
def main(argv: list[str]) -> int:
    """Send the options as commands to each service's supervise; return 0, 100 or 111."""
    try:
        return _main(argv)
    except Die as d:
        return d.report()
