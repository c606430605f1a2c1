"""splogger: make entries in syslog (splogger(8)).

usage: splogger [ tag [ fac ] ]

Each line of input becomes one syslog message, "STAMP TEXT", where STAMP
is the time the line began as seconds.microseconds; lines longer than 800
characters are folded, the continuation marked by a '+' after its stamp.
Priority LOG_ALERT for lines starting "alert:", LOG_WARNING for "warning:",
LOG_INFO otherwise; facility fac (numeric, default 2: mail). Unprintable
characters become '?'; blank lines are not logged.
"""

from __future__ import annotations

import os
import time

from pyqmail.entry import program

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

FOLD = 800
LOG_ALERT = 1
LOG_WARNING = 4
LOG_INFO = 6
_PRINTABLE = bytes(c if 32 <= c <= 126 else ord("?") for c in range(256))


def priority(line: bytes) -> int:
    """Return the syslog priority for a line of qmail's log."""
    if line.startswith(b"alert:"):
        return LOG_ALERT
    if line.startswith(b"warning:"):
        return LOG_WARNING
    return LOG_INFO


def stamp(now: float) -> bytes:
    """Return splogger's numerical timestamp: seconds.microseconds."""
    sec = int(now)
    return b"%d.%06d" % (sec, int((now - sec) * 1_000_000))


def messages(line: bytes, now: float) -> Iterator[tuple[int, bytes]]:
    """Yield the (priority, message) pairs one input line (without its newline) becomes."""
    if not line:
        return
    prio = priority(line)
    text = line.translate(_PRINTABLE)
    mark = b" "
    for i in range(0, len(text), FOLD):
        yield prio, stamp(now) + mark + text[i:i + FOLD]
        mark = b"+"


def run(fd: int, log: Callable[[int, bytes], None], clock: Callable[[], float] = time.time) -> None:
    """Read lines from fd until end of input and log each one's messages."""
    pending = b""
    started = 0.0
    while True:
        chunk = os.read(fd, 8192)
        if not chunk:
            break
        if not pending:
            started = clock()
        pending += chunk
        while True:
            nl = pending.find(b"\n")
            if nl == -1:
                break
            for prio, msg in messages(pending[:nl], started):
                log(prio, msg)
            pending = pending[nl + 1:]
            started = clock()
    for prio, msg in messages(pending, started):
        log(prio, msg)


@program("splogger", crash=111)
def main(argv: list[str]) -> int:
    """Feed descriptor 0 to syslog."""
    import syslog

    tag = argv[1] if len(argv) > 1 else "splogger"
    fac = 2
    if len(argv) > 2:
        digits = argv[2][:len(argv[2]) - len(argv[2].lstrip("0123456789"))]
        fac = int(digits) if digits else 0
    syslog.openlog(tag, 0, fac << 3)

    def log(prio: int, msg: bytes) -> None:
        syslog.syslog(prio, msg.decode("latin-1"))

    run(0, log)
    return 0
