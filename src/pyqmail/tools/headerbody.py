"""A message split into header fields and body lines the way qmail's tools see it (headerbody, hfield).

A header field is a line with a valid name before a colon, plus its
continuation lines; a leading ``From `` line becomes ``MBOX-Line: From ...``;
the header ends at a blank line or at the first line that is not a field
(which then starts the body after a blank line is supplied). A final line
without a newline gets one.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

BUFSIZE = 8192


def lines_of_fd(fd: int) -> Iterator[bytes]:
    """Yield the lines of fd with their newlines; a final partial line gets one (getsa).

    Raise OSError on a read error.
    """
    pending = b""
    while True:
        chunk = os.read(fd, BUFSIZE)
        if not chunk:
            if pending:
                yield pending + b"\n"
            return
        pending += chunk
        start = 0
        while True:
            nl = pending.find(b"\n", start)
            if nl == -1:
                break
            yield pending[start:nl + 1]
            start = nl + 1
        pending = pending[start:]


def lines_of(data: bytes) -> Iterator[bytes]:
    """Yield the lines of data as lines_of_fd would."""
    start = 0
    while start < len(data):
        nl = data.find(b"\n", start)
        if nl == -1:
            yield data[start:] + b"\n"
            return
        yield data[start:nl + 1]
        start = nl + 1


def hfield_valid(line: bytes) -> bool:
    """Return True if line starts a header field: a nonempty name of printable non-space bytes, then a colon."""
    colon = line.find(b":")
    if colon == -1:
        return False
    name = line[:colon].rstrip(b" \t")
    return bool(name) and all(32 < c < 127 for c in name)


def hfield_is(field: bytes, name: bytes) -> bool:
    """Return True if field's name is name (given lowercase; letters match either case), spaces before the colon allowed."""
    if len(field) < len(name):
        return False
    for i, ch in enumerate(name):
        c = field[i]
        if c != ch and (ch == ord("-") or ch - 32 != c):
            return False
    rest = field[len(name):]
    stripped = rest.lstrip(b" \t")
    return stripped[:1] == b":"


def hfield_skipname(field: bytes) -> int:
    """Return the offset of the field's value: past the colon and any following white space."""
    i = field.find(b":")
    i = len(field) if i == -1 else i + 1
    while i < len(field) and field[i] in b"\t\n\r ":
        i += 1
    return i


def headerbody(lines: Iterator[bytes], dohf: Callable[[bytes], None], hdone: Callable[[], None],
               dobl: Callable[[bytes], None]) -> None:
    """Feed header fields to dohf, then call hdone, then feed body lines to dobl."""
    lines = iter(lines)
    field: bytes | None = None
    for nextline in lines:
        if field is not None:
            if nextline[:1] in (b" ", b"\t"):
                field += nextline
                continue
            dohf(field)
            field = None
        if nextline == b"\n":
            hdone()
            dobl(nextline)
            break
        if nextline.startswith(b"From "):
            field = b"MBOX-Line: " + nextline
        elif hfield_valid(nextline):
            field = nextline
        else:
            hdone()
            dobl(b"\n")
            dobl(nextline)
            break
    else:
        if field is not None:
            dohf(field)
        hdone()
        return
    for line in lines:
        dobl(line)
