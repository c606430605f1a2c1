"""tai64nlocal: turn TAI64N labels into local time (daemontools tai64nlocal(8)).

usage: tai64nlocal

A line starting with '@' and hex digits has that label replaced by the
local time 'YYYY-MM-DD HH:MM:SS.nnnnnnnnn'; the byte that ends the label
and the rest of the line pass unchanged, as do lines not starting with '@'.
Exit 0 at end of input, 111 without a message on trouble reading or writing.
"""

from __future__ import annotations

import os

from pyqmail.entry import program
from pyqmail.svc.tai64 import local, parse

EXIT_TROUBLE = 111
CHUNK = 1024
MAX_LINE = 1 << 20  # a label needs at most this much of a line in memory
FD_IN = 0
FD_OUT = 1


def convert(line: bytes) -> bytes:
    """Return one line (with or without its newline) as tai64nlocal prints it.

    daemontools takes every hex digit after '@' into the label, however few
    or many; where localtime cannot place the result the C program crashes,
    and we leave the line as it is instead.
    """
    if not line.startswith(b"@"):
        return line
    unix, nano, used = parse(line[1:])
    text = local(unix, nano)
    if text is None:
        return line
    return text + line[1 + used:]


def _write_all(fd: int, data: bytes) -> None:
    """Write all of data to fd."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def finish_partial(line: bytes) -> bytes:
    """Return what tai64nlocal writes for a final line without newline.

    The C program reads the label a byte at a time and exits at end of input
    while still inside it, so a partial line that is all label writes nothing.
    """
    if line.startswith(b"@") and parse(line[1:])[2] == len(line) - 1:
        return b""
    return convert(line)


@program("tai64nlocal", crash=EXIT_TROUBLE)
def main(argv: list[str]) -> int:
    """Convert stdin onto stdout until end of input."""
    pending = b""
    try:
        while True:
            data = os.read(FD_IN, CHUNK)
            if not data:
                break
            pending += data
            lines = pending.split(b"\n")
            pending = lines.pop()
            if lines:
                _write_all(FD_OUT, b"".join(convert(x) + b"\n" for x in lines))
            if len(pending) > MAX_LINE:
                # Past any label: the rest of a long line passes unchanged.
                head = convert(pending)
                _write_all(FD_OUT, head)
                pending = b""
                while True:
                    data = os.read(FD_IN, CHUNK)
                    if not data:
                        return 0
                    nl = data.find(b"\n")
                    if nl == -1:
                        _write_all(FD_OUT, data)
                        continue
                    _write_all(FD_OUT, data[:nl + 1])
                    pending = data[nl + 1:]
                    break
        lines = pending.split(b"\n")
        last = lines.pop()
        _write_all(FD_OUT, b"".join(convert(x) + b"\n" for x in lines) + finish_partial(last))
    except OSError:
        return EXIT_TROUBLE
    return 0
