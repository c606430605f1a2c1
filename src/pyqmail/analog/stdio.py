"""Descriptors for the qmailanalog programs: records from stdin, bytes to stdout."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

from pyqmail.analog.matchlog import read_lines

FD_IN = 0
FD_OUT = 1
EXIT_TROUBLE = 111  # columnt's and matchup's exit for trouble reading or writing


def records(fd: int = FD_IN) -> Iterator[bytes]:
    """Yield awk's records of fd: its lines without newlines, a last unended line included."""
    for line in read_lines(fd):
        if line.endswith(b"\n"):
            yield line[:-1]
        elif line:
            yield line


def write_all(fd: int, data: bytes) -> None:
    """Write all of data to fd."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def report(summary: Callable[[Iterable[bytes]], bytes]) -> int:
    """Run a z or x program: summary over stdin's records, written to stdout; return 0."""
    write_all(FD_OUT, summary(records()))
    return 0
