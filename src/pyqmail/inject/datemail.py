"""datemail: sendmail with a Date header in local time (qmail's datemail script).

    datemail [ sendmail args ... ]

Runs QMAILHOME/bin/predate QMAILHOME/bin/sendmail args, as qmail's script
does with exec: the result is predate's, exit code or signal alike. If
predate cannot be run, datemail says so as the script's shell does and exits
127 (not found), 126 (not executable) or 2.
"""

from __future__ import annotations

import os

from pyqmail import home as _home
from pyqmail import spawn
from pyqmail.entry import program
from pyqmail.inject import script

EXIT_CRASH = 111
SCRIPT_EXEC_LINE = 3  # the exec is line 3 of the installed script


def _exit_as(code: int) -> int:
    """Return code, or die by the same signal if the program died by one (exec passes it on)."""
    if code < 0:
        import signal  # only here: its import is slow, and this path is rare

        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code  # not reached unless the signal is blocked
    return code


@program("datemail", crash=EXIT_CRASH)
def main(argv: list[str]) -> int:
    """Run datemail; return its exit code."""
    prog = os.fsencode(argv[0]) if argv else b"datemail"
    bindir = os.path.join(_home.home(), "bin")
    predate = os.path.join(bindir, "predate")
    child_argv = [predate, os.path.join(bindir, "sendmail"), *argv[1:]]
    try:
        pid = script.start(predate, child_argv, script.inherited_fds())
    except OSError as e:
        text, code = script.exec_failure(prog, SCRIPT_EXEC_LINE, predate, e, via_exec=True)
        script.complain(text)
        return code
    return _exit_as(spawn.wait(pid))
