"""mailsubj: send a mail message with a subject line (mailsubj(1)).

    mailsubj subject recip ...

Feeds QMAILHOME/bin/qmail-inject "Subject: subject", "To: recip ...", an
empty line and then the body from standard input, the way qmail's script does
it with echo (dash's: backslash escapes are interpreted) and cat. Exits with
qmail-inject's exit code (128+N if signal N killed it, named on standard error
as dash names it); 2 without a subject;
127, 126 or 2 if qmail-inject cannot be run, with the shell's message.
"""

from __future__ import annotations

import os

from pyqmail import home as _home
from pyqmail.entry import program
from pyqmail.inject import script

EXIT_CRASH = 111
SCRIPT_SHIFT_LINE = 4  # lines of the installed script (two header lines on top)
SCRIPT_PIPE_LINE = 9


def message_head(subject: bytes, recips: list[bytes]) -> bytes:
    """Return the header the script's echo commands write."""
    return script.echo([b"Subject:", subject]) + script.echo([b"To:", *recips]) + script.echo([b""])


@program("mailsubj", crash=EXIT_CRASH)
def main(argv: list[str]) -> int:
    """Run mailsubj; return its exit code."""
    prog = os.fsencode(argv[0]) if argv else b"mailsubj"
    if len(argv) < 2:
        script.complain(prog + b": %d: shift: can't shift that many\n" % SCRIPT_SHIFT_LINE)
        return script.EXIT_SHELL
    inject = os.path.join(_home.home(), "bin", "qmail-inject")
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    fds = script.inherited_fds()
    fds[0] = rfd
    try:
        try:
            pid = script.start(inject, [inject], fds)
        except OSError as e:
            text, code = script.exec_failure(prog, SCRIPT_PIPE_LINE, inject, e, via_exec=False)
            script.complain(text)
            return code
        finally:
            os.close(rfd)
        err = script.feed(wfd, message_head(os.fsencode(argv[1]), [os.fsencode(a) for a in argv[2:]]))
        if err is not None:
            script.complain(b"cat: -: " + (err.strerror or "read error").encode() + b"\n")
    finally:
        os.close(wfd)
    return script.pipeline_status(pid)
