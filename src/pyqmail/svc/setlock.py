"""setlock: run a program with a file locked (daemontools setlock(8)).

usage: setlock [ -nNxX ] file program [ arg ... ]

Opens file for appending (creating it, mode 600), locks it with flock and
execs program (found on $PATH) with the lock held on an open descriptor, so
that the lock lasts until program and every process that inherits the
descriptor exit. -n: give up if someone else holds the lock; -N (the
default): wait for it. -x: if file cannot be opened or locked, exit 0
quietly; -X (the default): print an error and exit 111. Exit 100 for usage,
111 if program cannot run.
"""

from __future__ import annotations

import fcntl
import os

from pyqmail.entry import program
from pyqmail.errors import describe
from pyqmail.sgetopt import Getopt
from pyqmail.strerr import Die
from pyqmail.svc import pathexec

FATAL = b"setlock: fatal: "
USAGE = b"setlock: usage: setlock [ -nNxX ] file program [ arg ... ]"
EXIT_USAGE = 100
EXIT_TROUBLE = 111


def _main(argv: list[str]) -> int:
    nonblocking = False
    quiet = False
    opts = Getopt(argv, "nNxX")
    for opt, _arg in opts:
        if opt == "n":
            nonblocking = True
        elif opt == "N":
            nonblocking = False
        elif opt == "x":
            quiet = True
        elif opt == "X":
            quiet = False
        else:
            raise Die(EXIT_USAGE, USAGE)
    rest = opts.operands()
    if len(rest) < 2:
        raise Die(EXIT_USAGE, USAGE)
    file = os.fsencode(rest[0])
    try:
        # Not close-on-exec: the lock is held by the descriptor program inherits.
        fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o600)
    except OSError as e:
        if quiet:
            return 0
        raise Die(EXIT_TROUBLE, FATAL + b"unable to open " + file + b": " + describe(e).encode()) from None
    os.set_inheritable(fd, True)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if nonblocking else 0))
    except OSError as e:
        if quiet:
            return 0
        raise Die(EXIT_TROUBLE, FATAL + b"unable to lock " + file + b": " + describe(e).encode()) from None
    child = [os.fsencode(a) for a in rest[1:]]
    err = pathexec.run(child)
    raise Die(EXIT_TROUBLE, FATAL + b"unable to run " + child[0] + b": " + describe(err).encode())


@program("setlock", crash=EXIT_TROUBLE)
def main(argv: list[str]) -> int:
    """Exec program holding a lock on file; return 0, 100 or 111 only if it cannot."""
    try:
        return _main(argv)
    except Die as d:
        return d.report()
