"""tai64n: put a precise timestamp on each line (daemontools tai64n(8)).

usage: tai64n

Each line of input is written to stdout with '@', the TAI64N label of the
moment tai64n read its first byte, and a space in front. A partial final
line is stamped and left partial. Exit 0 at end of input, 111 without a
message on trouble reading or writing.
"""

from __future__ import annotations

import os
import time

from pyqmail.entry import program
from pyqmail.svc.tai64 import label

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

EXIT_TROUBLE = 111
CHUNK = 1024
FD_IN = 0
FD_OUT = 1


def stamp(data: bytes, at_line_start: bool, now: Callable[[], int]) -> tuple[bytes, bool]:
    """Stamp the lines of one chunk of input; return (output, whether the chunk ended a line).

    now() gives unix nanoseconds; it is asked once for each line begun in the chunk.
    """
    out = bytearray()
    for line in data.splitlines(keepends=True):
        if at_line_start:
            out += label(now()) + b" "
        out += line
        at_line_start = line.endswith(b"\n")
    return bytes(out), at_line_start


def _write_all(fd: int, data: bytes) -> None:
    """Write all of data to fd."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@program("tai64n", crash=EXIT_TROUBLE)
def main(argv: list[str]) -> int:
    """Stamp stdin onto stdout until end of input."""
    fresh = True
    while True:
        try:
            data = os.read(FD_IN, CHUNK)
            if not data:
                return 0
            out, fresh = stamp(data, fresh, time.time_ns)
            _write_all(FD_OUT, out)
        except OSError:
            return EXIT_TROUBLE
