"""qmail-popup: read a POP username and password, then run subprogram (qmail-popup(8)).

Usage: qmail-popup hostname subprogram [args...]. The greeting carries the APOP
timestamp <pid.time@hostname>. USER then PASS, or APOP, hand the name, the
password (or digest) and the timestamp, each NUL-terminated, to subprogram on
descriptor 3; qmail-popup waits for it and exits 1, after "-ERR aack, child
crashed" or "-ERR authorization failed" if it did not exit 0. One attempt per
connection, as in qmail.
"""

from __future__ import annotations

import os
import time

from pyqmail.entry import program
from pyqmail.pop3.protocol import OK, Closed, LineReader, err, split_command, write_all

EXIT = 1  # qmail-popup's die(): every way out is exit 1
FD_IN = 0
FD_OUT = 1
FD_AUTH = 3

ERR_USAGE = err("usage: popup hostname subprogram")
ERR_PIPE = err("unable to open pipe")
ERR_WRITE = err("unable to write pipe")
ERR_FORK = err("unable to fork")
ERR_CRASHED = err("aack, child crashed")
ERR_BADAUTH = err("authorization failed")
ERR_SYNTAX = err("syntax error")
ERR_WANTUSER = err("USER first")
ERR_AUTHORIZ = err("authorization first")


def greeting(pid: int, now: int, hostname: bytes) -> tuple[bytes, bytes]:
    """Return (greeting line, APOP timestamp) for a session of pid started at now."""
    stamp = b"<%d.%d@" % (pid, now) + hostname + b">"
    return b"+OK " + stamp + b"\r\n", stamp


def _authenticate(childargs: list[str], user: bytes, password: bytes, stamp: bytes) -> bytes:
    """Run childargs with user, password and stamp on descriptor 3; return the final reply."""
    from pyqmail import spawn

    try:
        rfd, wfd = os.pipe()
    except OSError:
        return ERR_PIPE
    # The record (two lines of at most MAX_LINE bytes each) fits in a pipe's
    # buffer, so it is written before the child starts: a child that exits
    # without reading it cannot make the write fail.
    data = user + b"\0" + password + b"\0" + stamp + b"\0"
    try:
        write_all(wfd, data)
    except Closed:
        os.close(rfd)
        return ERR_WRITE
    finally:
        os.close(wfd)
    try:
        pid = spawn.spawn(childargs[0], childargs, fds={0: FD_IN, 1: FD_OUT, 2: 2, FD_AUTH: rfd})
    except OSError as e:
        # As exec failing in qmail's child: the child exits 1, read as a refusal.
        os.write(2, f"qmail-popup: unable to run {childargs[0]}: {e.strerror}\n".encode("utf-8", "replace"))
        return ERR_BADAUTH
    finally:
        os.close(rfd)
    code = spawn.wait(pid)
    if code < 0:
        return ERR_CRASHED
    if code != 0:
        return ERR_BADAUTH
    return b""


@program("qmail-popup", crash=EXIT)
def main(argv: list[str]) -> int:
    """Greet, read USER/PASS or APOP, run subprogram once; always exit 1."""
    out = FD_OUT
    if len(argv) < 3:
        try:
            write_all(out, ERR_USAGE)
        except Closed:
            pass
        return EXIT
    hostname = os.fsencode(argv[1])
    childargs = argv[2:]
    line, stamp = greeting(os.getpid(), int(time.time()), hostname)
    reader = LineReader(FD_IN)
    username: bytes | None = None
    try:
        write_all(out, line)
        while True:
            verb, arg = split_command(reader.readline())
            if verb == b"user":
                if not arg:
                    write_all(out, ERR_SYNTAX)
                    continue
                write_all(out, OK)
                username = arg
            elif verb == b"pass":
                if username is None:
                    write_all(out, ERR_WANTUSER)
                elif not arg:
                    write_all(out, ERR_SYNTAX)
                else:
                    reply = _authenticate(childargs, username, arg, stamp)
                    if reply:
                        write_all(out, reply)
                    return EXIT
            elif verb == b"apop":
                name, space, digest = arg.partition(b" ")
                if not space:
                    write_all(out, ERR_SYNTAX)
                    continue
                reply = _authenticate(childargs, name, digest, stamp)
                if reply:
                    write_all(out, reply)
                return EXIT
            elif verb == b"quit":
                write_all(out, OK)
                return EXIT
            elif verb == b"noop":
                write_all(out, OK)
            else:
                write_all(out, ERR_AUTHORIZ)
    except Closed:
        return EXIT
