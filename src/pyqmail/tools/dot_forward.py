"""dot-forward(1) (0.71): follow a sendmail-style .forward file under qmail.

``dot-forward [ -nN ] file ...`` uses the first file that exists and is not
empty: addresses are forwarded (sender $NEWSENDER, $DTLINE on top), ``|cmd``
entries get the message with $UFLINE, $RPLINE and $DTLINE on top, and $USER
or $USER@$HOST means direct delivery. Exit 99 when the file acted, 0 for
direct delivery or no usable file, 100/111 for failures. -n prints the
instructions instead of following them.
"""

from __future__ import annotations

import os

from pyqmail import home as _home
from pyqmail import rfc822, spawn
from pyqmail.entry import program
from pyqmail.local import dotqmail
from pyqmail.sgetopt import Getopt
from pyqmail.tools import common
from pyqmail.tools.common import EXIT_IGNORE, EXIT_OK, EXIT_PERM, EXIT_TEMP, Die

FATAL = b"dot-forward: fatal: "
INFO = b"dot-forward: info: "
USAGE = b"dot-forward: usage: dot-forward [ -nN ] file ..."
MAX_FILE = 1 << 24


class Controls:
    """The control files dot-forward qualifies addresses with."""

    def __init__(self) -> None:
        self.me = b"me"
        self.defaultdomain = b"me"
        self.defaulthost = b"me"
        self.plusdomain = b"me"


def _control_line(name: str) -> bytes | None:
    try:
        with open(name, "rb") as f:
            data = f.read(MAX_FILE)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise common.fail(EXIT_TEMP, FATAL, b"unable to read controls: ", e) from None
    return data.split(b"\n", 1)[0].rstrip(b" \t")


def read_controls() -> Controls:
    """Read control/me, defaultdomain, defaulthost and plusdomain from QMAILHOME; raise Die on trouble."""
    try:
        here = os.open(".", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise common.fail(EXIT_TEMP, FATAL, b"unable to open current directory: ", e) from None
    try:
        qhome = _home.home()
        try:
            os.chdir(qhome)
        except OSError as e:
            raise common.fail(EXIT_TEMP, FATAL, b"unable to chdir to " + common.b(qhome) + b": ", e) from None
        c = Controls()
        me = _control_line("control/me")
        if me is not None:
            c.me = me
        c.defaultdomain = _or(_control_line("control/defaultdomain"), c.me)
        c.defaulthost = _or(_control_line("control/defaulthost"), c.me)
        c.plusdomain = _or(_control_line("control/plusdomain"), c.me)
        try:
            os.fchdir(here)
        except OSError as e:
            raise common.fail(EXIT_TEMP, FATAL, b"unable to set current directory: ", e) from None
        return c
    finally:
        os.close(here)


def _or(value: bytes | None, default: bytes) -> bytes:
    return default if value is None else value


def _diff(a: bytes, b: bytes) -> bool:
    return a.lower() != b.lower()  # A-Z only, as qmail's case_diffb


class DotForward:
    """One run of dot-forward over its files."""

    def __init__(self, doit: bool, controls: Controls) -> None:
        self.doit = doit
        self.controls = controls
        self.ufline = b""
        self.rpline = b""
        self.dtline = b""
        self.sender = b""
        self.user = b""
        self.host = b""
        self.targets: list[bytes] = []
        self.acted = False
        self.direct = False

    def qualify(self, address: bytes, hasat: bool) -> bytes:
        """Complete an address as qmail-header(5) says (defaulthost, plusdomain, defaultdomain)."""
        c = self.controls
        if not hasat:
            address += b"@" + c.defaulthost
        if address.endswith(b"+"):
            address = address[:-1] + b"." + c.plusdomain
        at = address.rfind(b"@")
        if b"." not in address[max(at, 0):]:
            address += b"." + c.defaultdomain
        return address

    def got_address(self, toks: list[rfc822.Token]) -> None:
        """Act on one address of the file."""
        address = rfc822.unquote(toks)
        hasat = any(kind == rfc822.AT for kind, _ in toks)
        if not address:
            return
        user, host = self.user, self.host
        if not hasat and len(address) == len(user) and not _diff(address, user):
            self.acted = self.direct = True
            return
        if hasat and len(address) == len(user) + 1 + len(host):
            if (not _diff(address[:len(user)], user) and address[len(user):len(user) + 1] == b"@"
                    and not _diff(address[len(user) + 1:], host)):
                self.acted = self.direct = True
                return
        if not hasat and address[:1] == b"/":
            raise Die(EXIT_TEMP, FATAL + b"file delivery " + address.split(b"\0", 1)[0] + b" not supported")
        if not hasat and address[:1] == b"|":
            self.acted = True
            self.run(address[1:].split(b"\0", 1)[0])
            return
        address = self.qualify(address, hasat).split(b"\0", 1)[0]
        self.targets.append(address)
        if not self.doit:
            common.warn(b"forward " + address)

    def run(self, cmd: bytes) -> None:
        """Feed the message to /bin/sh -c cmd; exit for its failure; rewind stdin after."""
        if not self.doit:
            common.warn(b"pipe through " + cmd)
            return
        try:
            r, w = os.pipe2(os.O_CLOEXEC)
        except OSError as e:
            raise common.fail(EXIT_TEMP, FATAL, b"unable to create pipe: ", e) from None
        try:
            pid = spawn.spawn("/bin/sh", ["/bin/sh", "-c", os.fsdecode(cmd)], env=dict(os.environ),
                              fds={0: r, 1: 1, 2: 2}, fast=False)
        except OSError as e:
            os.close(w)
            raise common.fail(EXIT_TEMP, FATAL, b"unable to run /bin/sh: ", e) from None
        finally:
            os.close(r)
        try:
            # Write errors are ignored (the command may not read it all);
            # read errors are fatal.
            self._blind(w, self.ufline + self.rpline + self.dtline)
            common.copy_stdin(FATAL, lambda chunk: self._blind(w, chunk))
        finally:
            os.close(w)
        code = spawn.wait(pid)
        if code < 0:
            raise Die(EXIT_TEMP, FATAL + b"child crashed")
        if code in dotqmail.PROGRAM_HARD:
            raise Die(EXIT_PERM, None)
        if code != 0:
            raise Die(EXIT_TEMP, None)
        try:
            os.lseek(0, 0, os.SEEK_SET)
        except OSError as e:
            raise common.fail(EXIT_TEMP, FATAL, b"unable to rewind input: ", e) from None

    @staticmethod
    def _blind(fd: int, data: bytes) -> None:
        try:
            common.write_all(fd, data)
        except OSError:
            pass  # safe: a blind copy for -n/-N output only; the delivery's result does not depend on it

    def parse_line(self, line: bytes) -> None:
        """Act on the addresses of one line, right to left as dot-forward does."""
        toks = rfc822.tokenize(line)
        if toks is None:
            raise Die(EXIT_TEMP, FATAL + b"unable to parse this line: " + line.split(b"\0", 1)[0])
        addr: list[rfc822.Token] = []  # right to left

        def flush() -> None:
            if addr:
                got = list(reversed(addr))
                addr.clear()
                self.got_address(got)

        wordok = True
        t = len(toks)
        while t > 0:
            t -= 1
            tok = toks[t]
            kind = tok[0]
            if kind in (rfc822.SEMI, rfc822.COLON, rfc822.COMMENT):
                continue
            if kind == rfc822.RIGHT:
                flush()
                while t > 0 and toks[t - 1][0] != rfc822.LEFT:
                    t -= 1
                    addr.append(toks[t])
                got = list(reversed(addr))
                addr.clear()
                self.got_address(got)
                if t <= 0:
                    raise Die(EXIT_TEMP, FATAL + b"unable to parse this line: " + line.split(b"\0", 1)[0])
                t -= 1
                while t > 0 and toks[t - 1][0] in rfc822.PHRASE:
                    t -= 1
                wordok = False
            elif kind in (rfc822.ATOM, rfc822.QUOTE, rfc822.LITERAL):
                if not wordok:
                    flush()
                wordok = False
                addr.append(tok)
            elif kind == rfc822.COMMA:
                flush()
                wordok = True
            else:
                wordok = True
                addr.append(tok)
        flush()

    def forward(self) -> None:
        """Queue the message for the collected targets."""
        qp = common.queue_stdin(FATAL, self.sender, self.dtline, self.targets, b"unable to forward message: ")
        common.warn(INFO + b"qp " + qp)

    def try_file(self, fn: str) -> int | None:
        """Follow fn; return the exit code if it decided the delivery, None to try the next file."""
        try:
            with open(fn, "rb") as f:
                data = f.read(MAX_FILE)
        except FileNotFoundError:
            return None
        except OSError as e:
            what = b"unable to open " if not isinstance(e, IsADirectoryError) else b"unable to read "
            raise common.fail(EXIT_TEMP, FATAL, what + common.b(fn) + b": ", e) from None
        self.targets = []
        self.acted = self.direct = False
        start = 0
        while start < len(data):
            nl = data.find(b"\n", start)
            end = len(data) if nl == -1 else nl + 1
            line = data[start:end]
            start = end
            if line[:1] != b"#":
                self.parse_line(line)
        if self.targets:
            self.acted = True
            if self.doit:
                self.forward()
        if self.direct:
            if not self.doit:
                common.warn(b"direct delivery")
            return EXIT_OK
        if not self.acted:
            if not self.doit:
                common.warn(b"skipping empty file " + common.b(fn))
            return None
        return EXIT_IGNORE


def dot_forward(argv: list[str]) -> int:
    """Run dot-forward; return its exit code or raise Die."""
    doit = True
    g = Getopt(argv, "nN")
    for c, _ in g:
        if c == "n":
            doit = False
        elif c == "N":
            doit = True
        else:
            raise Die(EXIT_PERM, USAGE)
    df = DotForward(doit, Controls())
    df.ufline = common.env("UFLINE") or b""
    df.rpline = common.env("RPLINE") or b""
    df.dtline = common.env("DTLINE") or b""
    df.sender = common.env("NEWSENDER") or b""
    df.user = common.env("USER") or b""
    df.host = common.env("HOST") or b""
    df.controls = read_controls()
    for fn in g.operands():
        code = df.try_file(fn)
        if code is not None:
            return code
    if not doit:
        common.warn(b"direct delivery")
    return EXIT_OK


@program("dot-forward", crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Follow the first usable .forward-style file of argv."""
    return common.run_tool(dot_forward, argv)
