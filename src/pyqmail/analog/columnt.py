"""columnt: align the blank-separated columns of stdin (qmailanalog).

usage: columnt < table

Every column but the last is right-aligned and followed by two spaces.
Exit 111 on trouble reading or writing.
"""

from __future__ import annotations

import os

from pyqmail.analog.stdio import EXIT_TROUBLE, FD_IN, FD_OUT, write_all
from pyqmail.analog.summaries import columnt
from pyqmail.entry import program
from pyqmail.errors import describe
from pyqmail.strerr import Die

FATAL = b"columnt: fatal: "


def _slurp(fd: int) -> bytes:
    """Return all of fd (columnt needs every line before it can print the first)."""
    parts: list[bytes] = []
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except OSError as e:
            raise Die(EXIT_TROUBLE, FATAL + b"unable to read input: " + describe(e).encode()) from e
        if not data:
            return b"".join(parts)
        parts.append(data)


@program("columnt", crash=EXIT_TROUBLE)
def main(argv: list[str]) -> int:
    """Align stdin onto stdout."""
    try:
        out = columnt(_slurp(FD_IN))
        try:
            write_all(FD_OUT, out)
        except OSError as e:
            raise Die(EXIT_TROUBLE, FATAL + b"unable to write output: " + describe(e).encode()) from e
    except Die as d:
        return d.report()
    return 0
