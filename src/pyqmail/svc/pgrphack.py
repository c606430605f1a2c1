"""pgrphack: run a program in a separate process group (daemontools pgrphack(8)).

usage: pgrphack child

Starts a new session (and so a new process group) with setsid, then execs
child, found on $PATH. Exit 100 for usage, 111 if child cannot run;
otherwise child's own exit code.
"""

from __future__ import annotations

import os

from pyqmail.entry import program
from pyqmail.errors import describe
from pyqmail.strerr import Die
from pyqmail.svc import pathexec

FATAL = b"pgrphack: fatal: "
USAGE = b"pgrphack: usage: pgrphack child"
EXIT_USAGE = 100
EXIT_TROUBLE = 111


def _main(argv: list[str]) -> int:
    if len(argv) < 2:
        raise Die(EXIT_USAGE, USAGE)
    try:
        os.setsid()
    except OSError:
        pass  # already a group leader: daemontools ignores setsid's answer too
    child = [os.fsencode(a) for a in argv[1:]]
    err = pathexec.run(child)
    raise Die(EXIT_TROUBLE, FATAL + b"unable to run " + child[0] + b": " + describe(err).encode())


@program("pgrphack", crash=EXIT_TROUBLE)
def main(argv: list[str]) -> int:
    """Exec child in a new process group; return 100 or 111 only if it cannot."""
    try:
        return _main(argv)
    except Die as d:
        return d.report()
