"""qmail-tcpok: clear TCP timeout table (qmail-tcpok(8)).

    qmail-tcpok

Overwrites QMAILHOME/queue/lock/tcpto with zeros, so that qmail-remote
tries every host again; lock/tcpto6 (IPv6 hosts, pyqmail's) too, if it exists. Exit 0, or 111 with a message on descriptor 2.
"""

from __future__ import annotations

import fcntl
import os

from pyqmail import errors
from pyqmail import home as _home
from pyqmail.entry import program
from pyqmail.remote import tcpto

FATAL = "qmail-tcpok: fatal: "
EXIT_FATAL = 111


def _fatal(what: str, e: OSError) -> int:
    msg = f"{FATAL}{what}: {errors.describe(e)}\n".encode("latin-1", "replace")
    try:
        os.write(2, msg)
    except OSError:
        pass  # nowhere left to complain
    return EXIT_FATAL


@program("qmail-tcpok", crash=EXIT_FATAL)
def main(argv: list[str]) -> int:
    """Zero the timeout table; exit 0, or 111 if it cannot be cleared."""
    qmail_home = _home.home()
    try:
        os.chdir(qmail_home)
    except OSError as e:
        return _fatal(f"unable to chdir to {qmail_home}", e)
    try:
        os.chdir("queue/lock")
    except OSError as e:
        return _fatal(f"unable to chdir to {qmail_home}/queue/lock", e)
    try:
        fd = os.open("tcpto", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        return _fatal(f"unable to write {qmail_home}/queue/lock/tcpto", e)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            return _fatal(f"unable to lock {qmail_home}/queue/lock/tcpto", e)
        try:
            data = b"\0" * tcpto.SIZE
            while data:
                data = data[os.write(fd, data):]
        except OSError as e:
            return _fatal(f"unable to clear {qmail_home}/queue/lock/tcpto", e)
    finally:
        os.close(fd)
    try:
        fd = os.open("tcpto6", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0  # a home made before IPv6
    except OSError as e:
        return _fatal(f"unable to write {qmail_home}/queue/lock/tcpto6", e)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = b"\0" * tcpto.V6.size
            while data:
                data = data[os.write(fd, data):]
        except OSError as e:
            return _fatal(f"unable to clear {qmail_home}/queue/lock/tcpto6", e)
    finally:
        os.close(fd)
    return 0
