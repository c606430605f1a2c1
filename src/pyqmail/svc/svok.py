"""svok: is supervise running for a service? (daemontools svok(8)).

usage: svok dir

Exit 0 if supervise is running in dir, 100 if not, 111 on trouble.
"""

from __future__ import annotations

import errno
import os

from pyqmail.entry import program
from pyqmail.errors import describe
from pyqmail.strerr import Die
from pyqmail.svc.status import OK

FATAL = "svok: fatal: "
USAGE = b"svok: usage: svok dir"
EXIT_OK = 0
EXIT_NO = 100
EXIT_TROUBLE = 111


def _main(argv: list[str]) -> int:
    if len(argv) < 2:
        raise Die(EXIT_NO, USAGE)
    d = argv[1]
    try:
        os.chdir(d)
    except OSError as e:
        raise Die(EXIT_TROUBLE, os.fsencode(FATAL + "unable to chdir to " + d + ": " + describe(e))) from None
    try:
        # supervise keeps the ok FIFO open for reading: a non-blocking writer gets ENXIO without it.
        os.close(os.open(OK, os.O_WRONLY | os.O_NONBLOCK))
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENXIO):
            return EXIT_NO
        raise Die(EXIT_TROUBLE, os.fsencode(FATAL + "unable to open " + d + "/supervise/ok: " + describe(e))) from None
    return EXIT_OK


@program("svok", crash=EXIT_TROUBLE)
def main(argv: list[str]) -> int:
    """Return 0 if supervise runs in argv[1], 100 if not, 111 if that cannot be told."""
    try:
        return _main(argv)
    except Die as d:
        return d.report()
