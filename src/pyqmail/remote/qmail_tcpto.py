"""qmail-tcpto: print TCP timeout table (qmail-tcpto(8)).

    qmail-tcpto

Prints, for each host in QMAILHOME/queue/lock/tcpto with a recent timeout,
``IP timed out N seconds ago; # recent timeouts: C``. Errors go to
descriptor 1 as qmail's do (``fatal: unable to ...: reason``), exit 111.
IPv6 hosts (lock/tcpto6, pyqmail's) follow in the same form, if that file exists.
"""

from __future__ import annotations

import fcntl
import ipaddress
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


def listing(buf: bytes, now: int, lay: tcpto.Layout = tcpto.V4) -> bytes:
    """Return qmail-tcpto's output for a table read at time now."""
    out = bytearray()
    for ip, count, when in tcpto.entries(buf, lay):
        ago = (now - when) & MASK64  # qmail prints the difference as an unsigned long
        text = f"{ip[0]}.{ip[1]}.{ip[2]}.{ip[3]}" if len(ip) == 4 else str(ipaddress.IPv6Address(ip))
        out += (f"{text} timed out {ago} seconds ago; "
                f"# recent timeouts: {count}\n").encode("ascii")
    return bytes(out)


def _read6() -> bytes:
    """Return lock/tcpto6 (b"" if it does not exist); raise OSError."""
    try:
        fd = os.open("tcpto6", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return b""  # a home made before IPv6: no IPv6 host timed out
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return os.read(fd, tcpto.V6.size)
    finally:
        os.close(fd)


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
    try:
        buf6 = _read6()
    except OSError as e:
        return _fatal("unable to read tcpto6", e)
    now = int(time.time())
    _write(listing(buf, now) + listing(buf6, now, tcpto.V6))
    return 0
