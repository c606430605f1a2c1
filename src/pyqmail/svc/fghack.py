"""fghack: an anti-backgrounding tool (daemontools fghack(8)).

usage: fghack child

Runs child (found on $PATH) with a pipe's write end on 31 descriptors (the
lowest free ones: 3 to 33 when only 0-2 are open), reads and discards whatever arrives on the pipe, and exits once
every copy of those descriptors is closed: a daemon that forks into the
background keeps them open, so fghack stays in the foreground for as long
as the daemon lives (and supervise can watch it). Exit code: child's,
111 if child was killed by a signal ("child crashed") or cannot run, 100
for usage.
"""

from __future__ import annotations

import fcntl
import os

from pyqmail.entry import program
from pyqmail.errors import describe
from pyqmail.strerr import Die
from pyqmail.svc import pathexec

FATAL = b"fghack: fatal: "
USAGE = b"fghack: usage: fghack child"
EXIT_USAGE = 100
EXIT_TROUBLE = 111
DUPS = 30  # extra copies of the write end, as daemontools 0.76's fghack makes


def _child(argv: list[bytes], read_end: int, write_end: int) -> None:
    os.close(read_end)
    os.set_inheritable(write_end, True)
    for _ in range(DUPS):
        # The lowest free descriptor, as dup() gives it in C (os.dup's would be close-on-exec).
        fcntl.fcntl(write_end, fcntl.F_DUPFD, 0)
    err = pathexec.run(argv)
    Die(EXIT_TROUBLE, FATAL + b"unable to run " + argv[0] + b": " + describe(err).encode()).report()
    os._exit(EXIT_TROUBLE)


def _main(argv: list[str]) -> int:
    if len(argv) < 2:
        raise Die(EXIT_USAGE, USAGE)
    child = [os.fsencode(a) for a in argv[1:]]
    try:
        read_end, write_end = os.pipe()
    except OSError as e:
        raise Die(EXIT_TROUBLE, FATAL + b"unable to create pipe: " + describe(e).encode()) from None
    pid = os.fork()
    if pid == 0:
        try:
            _child(child, read_end, write_end)
        finally:
            os._exit(EXIT_TROUBLE)
    os.close(write_end)
    while True:
        try:
            if not os.read(read_end, 4096):
                break
        except InterruptedError:
            continue
    os.close(read_end)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if not os.WIFEXITED(status):
        raise Die(EXIT_TROUBLE, FATAL + b"child crashed")
    return os.WEXITSTATUS(status)


@program("fghack", crash=EXIT_TROUBLE)
def main(argv: list[str]) -> int:
    """Run child, wait until it and what it left behind close the pipe; return child's exit code."""
    try:
        return _main(argv)
    except Die as d:
        return d.report()
