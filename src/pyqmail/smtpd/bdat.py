"""CHUNKING (RFC 3030) in qmail-smtpd: the BDAT argument and the chunk filter, no I/O.

A BDAT chunk is exactly its declared number of bytes: no dot-stuffing, no end
line, and a bare LF is data. The queue keeps qmail's form of a message, lines
ending in LF, so CR LF becomes LF here as qmail's DATA path (blast) does it,
also when a chunk ends between the CR and the LF; any other CR is kept. While
in the header (up to the first empty line) a line starting with "Received" or
"Delivered" (any case) counts as a hop, as after DATA.
"""

from __future__ import annotations

SIZE_DIGITS = 18  # a chunk size longer than this is a syntax error (it could not be sent anyway)
HEAD = 9  # bytes of a line's start that decide whether it is a hop ("delivered")


def parse(arg: bytes) -> tuple[int, bool] | None:
    """Return (size, last) of a BDAT argument `n [LAST]`, or None when it is not that."""
    words = arg.split()
    if not 1 <= len(words) <= 2 or not words[0].isdigit() or len(words[0]) > SIZE_DIGITS:
        return None
    if len(words) == 2 and words[1].upper() != b"LAST":
        return None
    return int(words[0]), len(words) == 2


class Chunks:
    """Turn the chunks of one message into queue bytes; count hops and output size."""

    __slots__ = ("hops", "size", "_cr", "_inheader", "_head")

    def __init__(self) -> None:
        self.hops = 0
        self.size = 0  # bytes of message output so far
        self._cr = False  # the last chunk ended in CR: held back until the next byte is known
        self._inheader = True
        self._head: bytearray | None = bytearray()  # the current line's start while it may be a hop

    def feed(self, data: bytes) -> bytes:
        """Return the message bytes for the next piece of chunk data."""
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._cr = True
        out = data.replace(b"\r\n", b"\n")
        if self._inheader:
            self._scan(out)
        self.size += len(out)
        return out

    def end(self) -> bytes:
        """Return what is held back at the end of the message (a final CR)."""
        if not self._cr:
            return b""
        self._cr = False
        self.size += 1
        return b"\r"

    def _scan(self, out: bytes) -> None:
        """Follow line starts through the header: count hops, see its end."""
        pos = 0
        n = len(out)
        while pos < n and self._inheader:
            head = self._head
            if head is None:  # inside a line already judged: skip to its end
                nl = out.find(b"\n", pos)
                if nl == -1:
                    return
                self._head = bytearray()
                pos = nl + 1
                continue
            nl = out.find(b"\n", pos, pos + HEAD - len(head) + 1)
            if nl == -1:
                take = min(n - pos, HEAD - len(head))
                head += out[pos:pos + take]
                pos += take
                if len(head) >= HEAD:
                    self._judge(head)
                    self._head = None
                continue
            head += out[pos:nl]
            if not head:
                self._inheader = False  # the empty line: the header is over
            else:
                self._judge(head)
            self._head = bytearray()
            pos = nl + 1

    def _judge(self, head: bytearray) -> None:
        low = bytes(head).lower()
        if low.startswith(b"received") or low.startswith(b"delivered"):
            self.hops += 1
