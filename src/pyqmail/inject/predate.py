"""predate: run a program with a Date header put on top of its input (qmail's predate).

    predate child [ arg ... ]

Runs child (found in $PATH as execvp finds it) with args, feeding it
"Date: 22 Nov 2026 16:23:38 +0100" in local time with a numeric zone, then
predate's own input. Exits with the child's exit code; 100 for usage; 111 if
the child cannot be run or crashes, with a message on standard error.
"""

from __future__ import annotations

import os
import time

from pyqmail import spawn
from pyqmail.entry import program
from pyqmail.inject import script

EXIT_USAGE = 100
EXIT_FATAL = 111
USAGE = b"predate: usage: predate child\n"
FATAL_PIPE = b"predate: fatal: unable to create pipe\n"
FATAL_EXEC = b"predate: fatal: unable to exec\n"
FATAL_WAIT = b"predate: fatal: wait failed\n"
FATAL_CRASH = b"predate: fatal: child crashed\n"

_MONTHS = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun",
           b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec")


def _seconds(tm: time.struct_time) -> int:
    """Return the seconds since 1970 that broken-down time tm names, read as UTC."""
    y, m = tm.tm_year, tm.tm_mon
    if m <= 2:
        y -= 1
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + tm.tm_mday - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    days = era * 146097 + doe - 719468
    return days * 86400 + tm.tm_hour * 3600 + tm.tm_min * 60 + tm.tm_sec


def date_header(now: int) -> bytes:
    """Return predate's Date line for second `now`: local time, zone as +hhmm/-hhmm."""
    utc = time.gmtime(now)
    local = time.localtime(now)
    # The zone is the difference of the two broken-down times, rounded to the
    # minute, as qmail computes it (not tm_gmtoff: they differ under leap-second zones).
    diff = _seconds(local) - _seconds(utc)
    sign = b"-" if diff < 0 else b"+"
    minutes = (abs(diff) + 30) // 60
    return b"Date: %d %s %d %02d:%02d:%02d %s%02d%02d\n" % (
        local.tm_mday, _MONTHS[local.tm_mon - 1], local.tm_year,
        local.tm_hour, local.tm_min, local.tm_sec, sign, minutes // 60, minutes % 60)


@program("predate", crash=EXIT_FATAL)
def main(argv: list[str]) -> int:
    """Run predate; return its exit code."""
    if len(argv) < 2:
        script.complain(USAGE)
        return EXIT_USAGE
    try:
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
    except OSError:
        script.complain(FATAL_PIPE)
        return EXIT_FATAL
    fds = script.inherited_fds()
    fds[0] = rfd
    try:
        try:
            pid = spawn.spawn(argv[1], argv[1:], env=dict(os.environ), fds=fds)
        except OSError:
            script.complain(FATAL_EXEC)
            return EXIT_FATAL
        finally:
            os.close(rfd)
        time.tzset()  # the zone of this process's environment, even when forked from another
        script.feed(wfd, date_header(int(time.time())))  # as qmail's copy loop: an input error ends the input
    finally:
        os.close(wfd)
    code = spawn.wait(pid)
    if code < 0:
        script.complain(FATAL_CRASH)
        return EXIT_FATAL
    return code
