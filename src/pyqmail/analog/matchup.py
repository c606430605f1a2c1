"""matchup: match qmail-send's delivery reports with their starts and messages (qmailanalog).

usage: matchup < log 5> pending

stdin is qmail-send's log, each line starting with a timestamp: numeric
'seconds.fraction' (accustamp, tai64n2tai) or multilog's TAI64N '@' label.
stdout gets one m line per finished message and one d line per finished
delivery (summaries.py reads them); warnings and alerts pass through, other
unknown lines come out behind '? '. At the end the messages and deliveries
still open are written to descriptor 5 in matchup's input format, so that
`cat pending new-log | matchup 5>next` carries them over. As in qmailanalog,
without descriptor 5 that last write fails: exit 111 after stdout is written.
"""

from __future__ import annotations

from pyqmail.analog.matchlog import Matchup
from pyqmail.analog.stdio import EXIT_TROUBLE, FD_IN, FD_OUT, write_all
from pyqmail.entry import program
from pyqmail.errors import describe
from pyqmail.strerr import Die

FD_PENDING = 5
FATAL = b"matchup: fatal: "
FLUSH_AT = 1 << 16


def _write(fd: int, data: bytes, what: bytes) -> None:
    """Write data to fd; die naming what on failure."""
    try:
        write_all(fd, data)
    except OSError as e:
        raise Die(EXIT_TROUBLE, FATAL + b"unable to write " + what + b": " + describe(e).encode()) from e


def _run() -> None:
    """Match stdin onto stdout and descriptor 5."""
    from pyqmail.analog.matchlog import read_lines

    m = Matchup()
    out: list[bytes] = []
    size = 0
    last = b""
    try:
        for line in read_lines(FD_IN):
            if not line.endswith(b"\n"):
                last = line  # matchup ignores an unended last line but hands it on through fd 5
                break
            text = m.line(line)
            if text:
                out.append(text)
                size += len(text)
                if size >= FLUSH_AT:
                    _write(FD_OUT, b"".join(out), b"output")
                    out, size = [], 0
    except OSError as e:
        raise Die(EXIT_TROUBLE, FATAL + b"unable to read input: " + describe(e).encode()) from e
    _write(FD_OUT, b"".join(out), b"output")
    _write(FD_PENDING, m.pending(last), b"fd 5")


@program("matchup", crash=EXIT_TROUBLE)
def main(argv: list[str]) -> int:
    """Run matchup over stdin."""
    try:
        _run()
    except Die as d:
        return d.report()
    return 0
