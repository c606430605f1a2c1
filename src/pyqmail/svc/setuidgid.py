"""setuidgid: run a program under an account's uid and gid (daemontools setuidgid(8)).

usage: setuidgid account child

Sets the supplementary groups to the account's gid alone, then the gid,
then the uid, and execs child (found on $PATH). Exit 100 for usage, 111
for an unknown account, a refused change or a program that cannot run.
"""

from __future__ import annotations

import os
import pwd

from pyqmail.entry import program
from pyqmail.errors import describe
from pyqmail.strerr import Die
from pyqmail.svc import pathexec

FATAL = "setuidgid: fatal: "
USAGE = "setuidgid: usage: setuidgid account child"
EXIT_USAGE = 100
EXIT_TROUBLE = 111


def lookup(account: str, fatal: str) -> pwd.struct_passwd:
    """Return the password entry of account; raise Die(111, 'unknown account') if there is none."""
    try:
        return pwd.getpwnam(account)
    except (KeyError, ValueError):  # ValueError: a name with a NUL byte cannot be looked up
        raise Die(EXIT_TROUBLE, os.fsencode(fatal + "unknown account " + account)) from None


def _main(argv: list[str]) -> int:
    if len(argv) < 3:
        raise Die(EXIT_USAGE, USAGE.encode())
    pw = lookup(argv[1], FATAL)
    try:
        os.setgroups([pw.pw_gid])
        os.setgid(pw.pw_gid)
    except OSError as e:
        raise Die(EXIT_TROUBLE, (FATAL + "unable to setgid: " + describe(e)).encode()) from None
    try:
        os.setuid(pw.pw_uid)
    except OSError as e:
        raise Die(EXIT_TROUBLE, (FATAL + "unable to setuid: " + describe(e)).encode()) from None
    child = [os.fsencode(a) for a in argv[2:]]
    err = pathexec.run(child)
    raise Die(EXIT_TROUBLE, FATAL.encode() + b"unable to run " + child[0] + b": " + describe(err).encode())


@program("setuidgid", crash=EXIT_TROUBLE)
def main(argv: list[str]) -> int:
    """Run child as account; return 100 or 111 only if it cannot."""
    try:
        return _main(argv)
    except Die as d:
        return d.report()
