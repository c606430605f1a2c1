"""qmail-tcpto: print TCP timeout table (qmail-tcpto(8)).

    qmail-tcpto

Prints, for each host in QMAILHOME/queue/lock/tcpto with a recent timeout,
``IP timed out N seconds ago; # recent timeouts: C``. Errors go to
descriptor 1 as qmail's do (``fatal: unable to ...: reason``), exit 111.
"""

from __future__ import annotations

import fcntl
import os
import time

from pyqmail import errors
from pyqmail import home as _home
from pyqmail.entry import program
from pyqmail.remote import tcpto

FD_OUT = 1
EXIT_FATAL = 111
MASK64 = 0xFFFFFFFFFFFFFFFF


def _fatal(what: str, e: OSError) -> int:
    _write(f"fatal: {what}: {errors.describe(e)}\n".encode("latin-1", "replace"))
    return EXIT_FATAL


def _write(data: bytes) -> None:
    while data:
        data = data[os.write(FD_OUT, data):]


def listing(buf: bytes, now: int) -> bytes:
    """Return qmail-tcpto's output for a table read at time now."""
    out = bytearray()
    for ip, count, when in tcpto.entries(buf):
        ago = (now - when) & MASK64  # qmail prints the difference as an unsigned long
        out += (f"{ip[0]}.{ip[1]}.{ip[2]}.{ip[3]} timed out {ago} seconds ago; "
                f"# recent timeouts: {count}\n").encode("ascii")
    return bytes(out)


@program("qmail-tcpto", crash=EXIT_FATAL)
def main(argv: list[str]) -> int:
    """Print the hosts that recently timed out; exit 0, or 111 if the table cannot be read."""
    try:
        os.chdir(_home.home())
        os.chdir("queue/lock")
    except OSError as e:
        return _fatal("unable to chdir", e)
    try:
        lockfd = os.open("tcpto", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        fd = os.open("tcpto", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        return _fatal("unable to open tcpto", e)
    try:
        try:
            fcntl.flock(lockfd, fcntl.LOCK_EX)
        except OSError as e:
            return _fatal("unable to lock tcpto", e)
        try:
            buf = os.read(fd, tcpto.SIZE)
        except OSError as e:
            return _fatal("unable to read tcpto", e)
    finally:
        os.close(fd)
        os.close(lockfd)
    _write(listing(buf, int(time.time())))
    return 0
