"""preline(1): feed the message to a command with From_, Return-Path and Delivered-To lines on top.

The three lines are $UFLINE, $RPLINE and $DTLINE as qmail-local sets them;
-f, -r and -d leave one out (-F, -R, -D put it back). preline exits with the
command's exit code; 100 for usage, 111 for its own trouble.
"""

from __future__ import annotations

import os

from pyqmail import errors, spawn
from pyqmail.entry import program
from pyqmail.outbuf import Substdio
from pyqmail.sgetopt import Getopt
from pyqmail.tools import common
from pyqmail.tools.common import EXIT_PERM, EXIT_TEMP, Die

FATAL = b"preline: fatal: "
USAGE = b"preline: usage: preline cmd [ arg ... ]"
BUFSIZE = 8192  # qmail's SUBSTDIO_OUTSIZE/INSIZE


class _Buffered(Substdio):
    """qmail's buffered output to the command: what reaches the pipe, and when, as substdio does."""

    def bput(self, data: bytes) -> None:
        """Buffer data, writing full buffers; errors here are ignored, as qmail's bputs does."""
        self.buf += data
        while len(self.buf) > self.size:
            chunk, self.buf = bytes(self.buf[:self.size]), self.buf[self.size:]
            try:
                common.write_all(self.fd, chunk)
            except OSError:
                self.buf.clear()
                return


def _copy_input(out: _Buffered) -> None:
    while True:
        try:
            chunk = os.read(0, BUFSIZE)
        except OSError as e:
            raise common.fail(EXIT_TEMP, FATAL, b"unable to copy input: ", e) from None
        if not chunk:
            return
        try:
            out.put(chunk)
        except OSError as e:
            raise common.fail(EXIT_TEMP, FATAL, b"unable to copy input: ", e) from None


def preline(argv: list[str]) -> int:
    """Run preline; return its exit code or raise Die."""
    ufline = common.env("UFLINE")
    rpline = common.env("RPLINE")
    dtline = common.env("DTLINE")
    if ufline is None or rpline is None or dtline is None:
        raise Die(EXIT_PERM, USAGE)
    flags = {"f": True, "r": True, "d": True}
    g = Getopt(argv, "frdFRD")
    for c, _ in g:
        if c in "frd":
            flags[c] = False
        elif c in "FRD":
            flags[c.lower()] = True
        else:
            raise Die(EXIT_PERM, USAGE)
    cmd = g.operands()
    if not cmd:
        raise Die(EXIT_PERM, USAGE)
    try:
        r, w = os.pipe2(os.O_CLOEXEC)
    except OSError as e:
        raise common.fail(EXIT_TEMP, FATAL, b"unable to create pipe: ", e) from None
    try:
        pid = common.start(cmd, fds={0: r, 1: 1, 2: 2})
    except OSError as e:
        os.close(r)
        os.close(w)
        # The child could not exec: it reports as preline, from the child.
        what = b"unable to run " + common.b(cmd[0]) + b": "
        raise common.fail(EXIT_TEMP if errors.temporary(e) else EXIT_PERM, FATAL, what, e) from None
    os.close(r)
    out = _Buffered(w)
    if flags["f"]:
        out.bput(ufline)
    if flags["r"]:
        out.bput(rpline)
    if flags["d"]:
        out.bput(dtline)
    try:
        _copy_input(out)
        try:
            out.flush()
        except OSError:
            pass  # qmail's preline ignores the result of its last flush
    finally:
        os.close(w)
    code = spawn.wait(pid)
    if code < 0:
        raise Die(EXIT_TEMP, FATAL + b"child crashed")
    return code


@program("preline", crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Feed stdin, with the qmail-local lines on top, to the command in argv."""
    return common.run_tool(preline, argv)
