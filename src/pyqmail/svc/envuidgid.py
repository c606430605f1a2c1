"""envuidgid: run a program with $GID and $UID set to an account's (daemontools envuidgid(8)).

usage: envuidgid account child

Exit 100 for usage, 111 for an unknown account or a program that cannot run.
"""

from __future__ import annotations

import os

from pyqmail.entry import program
from pyqmail.errors import describe
from pyqmail.strerr import Die
from pyqmail.svc import pathexec
from pyqmail.svc.setuidgid import EXIT_TROUBLE, EXIT_USAGE, lookup

FATAL = "envuidgid: fatal: "
USAGE = b"envuidgid: usage: envuidgid account child"


def _main(argv: list[str]) -> int:
    if len(argv) < 3:
        raise Die(EXIT_USAGE, USAGE)
    pw = lookup(argv[1], FATAL)
    # GID first, then UID: the order the variables take in the new environment.
    env = pathexec.changed_env([b"GID=%d" % pw.pw_gid, b"UID=%d" % pw.pw_uid])
    child = [os.fsencode(a) for a in argv[2:]]
    err = pathexec.run(child, env)
    raise Die(EXIT_TROUBLE, FATAL.encode() + b"unable to run " + child[0] + b": " + describe(err).encode())


@program("envuidgid", crash=EXIT_TROUBLE)
def main(argv: list[str]) -> int:
    """Run child with the account's GID and UID; return 100 or 111 only if it cannot."""
    try:
        return _main(argv)
    except Die as d:
        return d.report()
