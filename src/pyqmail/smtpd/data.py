"""The DATA phase of qmail-smtpd, as a pure filter from SMTP bytes to message bytes.

qmail's rules (blast() in qmail-smtpd): CR LF becomes LF; a CR not followed
by LF is kept; a line "." ends the message; a leading dot is removed unless
a CR follows it; an LF not preceded by CR anywhere (a bare LF) is fatal.
While in the header (up to the first empty line), every line starting with
"Received" or "Delivered" (any case) counts as a hop. Lines are never
buffered whole: a line longer than LONG_LINE goes out in pieces.
"""

from __future__ import annotations

LONG_LINE = 65536

# What feed() found.
MORE = 0  # wants more input
END = 1  # the message ended; the rest of the input is commands again
STRAY_NEWLINE = 2  # a bare LF: qmail drops the connection


class Blast:
    """Filter one message's SMTP DATA stream; collect output, hops and size."""

    __slots__ = ("out", "hops", "size", "_part", "_inheader", "_midline")

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.hops = 0
        self.size = 0  # bytes of message output so far
        self._part = bytearray()  # the current line so far, when it has no LF yet
        self._inheader = True
        self._midline = False  # the start of the current line has gone out already

    def take(self) -> bytes:
        """Return and forget the message bytes produced so far."""
        data = b"".join(self.out)
        self.out.clear()
        return data

    def _emit(self, data: bytes) -> None:
        if data:
            self.out.append(data)
            self.size += len(data)

    def _head(self, raw: bytes) -> bytes:
        """Handle the start of a raw line (hops, leading dot); return what to output of it."""
        if self._inheader:
            head = raw[:9].lower()
            if head.startswith(b"delivered"):
                self.hops += 1
            elif head.startswith(b"received"):
                self.hops += 1
        if raw[:1] == b"." and raw[1:2] != b"\r":
            return raw[1:]
        return raw

    def feed(self, data: bytes) -> tuple[int, int]:
        """Consume SMTP bytes; return (status, bytes of data used). Output goes to self.out."""
        if b"\n" not in data:
            # No line ends here: only the partial line grows (amortized, so a
            # client sending a byte at a time costs linear time).
            self._part += data
            if len(self._part) > LONG_LINE:
                self._send_partial()
            return MORE, len(data)
        buf = bytes(self._part) + data if self._part else data
        base = len(self._part)
        self._part = bytearray()
        pos = 0
        while True:
            nl = buf.find(b"\n", pos)
            if nl == -1:
                break
            line = buf[pos:nl]  # raw line, LF removed
            if not line.endswith(b"\r"):
                return STRAY_NEWLINE, nl + 1 - base
            if self._midline:
                self._midline = False
                self._emit(line[:-1] + b"\n")
            else:
                if self._inheader and line == b"\r":
                    self._inheader = False
                if line == b".\r":
                    return END, nl + 1 - base
                self._emit(self._head(line)[:-1] + b"\n")
            pos = nl + 1
        self._part += buf[pos:]
        if len(self._part) > LONG_LINE:
            self._send_partial()
        return MORE, len(data)

    def _send_partial(self) -> None:
        """Send most of a long line on; keep a final CR, which may start CR LF."""
        rest = bytes(self._part)
        keep = 1 if rest.endswith(b"\r") else 0
        piece = rest[:len(rest) - keep]
        if not self._midline:
            piece = self._head(piece)
            self._midline = True
        self._emit(piece)
        self._part = bytearray(rest[len(rest) - keep:])
