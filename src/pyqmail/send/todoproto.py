"""The pipes between qmail-send and qmail-todo (the ext-todo patch's protocol, and pyqmail's K and G).

qmail-todo to qmail-send, NUL-terminated records:
  L<text>   a line for qmail-send's activity record (text ends with its newline)
  D<c><N>   message N is preprocessed and committed (todo/N removed); c says
            where its recipients are: B both channels, L local, R remote, X none
  K<c><N>   pyqmail: message N is preprocessed but not committed; todo/N stays
            its durable record, and qmail-send keeps it (commits it, or
            removes todo/N first when it is finished)
  X         qmail-todo is exiting
qmail-send to qmail-todo: the bytes H (reread locals and virtualdomains) and X
(stop), and, pyqmail, G<N> NUL: the todo/N of kept message N is gone, so that
a todo/N of that number is a new message.
"""

from __future__ import annotations

from pyqmail.send.schedule import LOCAL, REMOTE

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

RECORD_MAX = 65536  # a log line or a number: a longer record is a broken peer

_WHERE = {(True, True): b"B", (True, False): b"L", (False, True): b"R", (False, False): b"X"}


def where(channels: tuple[int, ...]) -> bytes:
    """Return the channel letter (B, L, R, X) for a message's channels."""
    return _WHERE[(LOCAL in channels, REMOTE in channels)]


def channels_of(letter: int) -> tuple[int, ...] | None:
    """Return the channels a letter names; None for an unknown letter."""
    return {66: (LOCAL, REMOTE), 76: (LOCAL,), 82: (REMOTE,), 88: ()}.get(letter)


def done(messid: int, channels: tuple[int, ...], kept: bool = False) -> bytes:
    """Return the record saying message messid is preprocessed (committed, or kept)."""
    return (b"K" if kept else b"D") + where(channels) + b"%d\0" % messid


def logline(line: bytes) -> bytes:
    return b"L" + line.replace(b"\0", b"?") + b"\0"


EXITING = b"X\0"
REREAD = b"H"
STOP = b"X"


def gone(messid: int) -> bytes:
    return b"G%d\0" % messid


class Records:
    """Split a byte stream into NUL-terminated records; raise ValueError past RECORD_MAX."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> Iterator[bytes]:
        self.buf += data
        start = 0
        while True:
            end = self.buf.find(b"\0", start)
            if end == -1:
                break
            yield bytes(self.buf[start:end])
            start = end + 1
        del self.buf[:start]
        if len(self.buf) > RECORD_MAX:
            raise ValueError("record too long")


class Commands:
    """qmail-todo's reader of qmail-send's commands: H, X, and G<N> NUL."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[bytes, int]]:
        """Yield (letter, number): (b"H", 0), (b"X", 0), (b"G", N), (b"?", 0) for anything else."""
        self.buf += data
        while self.buf:
            c = self.buf[:1]
            if c in (REREAD, STOP):
                del self.buf[:1]
                yield bytes(c), 0
            elif c == b"G":
                end = self.buf.find(b"\0")
                if end == -1:
                    if len(self.buf) > 32:
                        del self.buf[:]
                        yield b"?", 0
                    return
                num = bytes(self.buf[1:end])
                del self.buf[:end + 1]
                yield (b"G", int(num)) if num.isdigit() and len(num) < 21 else (b"?", 0)
            else:
                del self.buf[:1]
                yield b"?", 0
