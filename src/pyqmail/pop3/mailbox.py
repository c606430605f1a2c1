"""The Maildir as qmail-pop3d sees it: a list of messages in order of mtime, and how one is sent.

Reading a Maildir for POP (maildir(5)): tmp/ files not accessed for 36 hours
are removed; new/ then cur/ are scanned, skipping names starting with a dot
and files modified in the current second (they may still be arriving in the
same second as the scan); the messages are ordered by mtime through a binary
heap with qmail's tie rules, so messages of the same second come out in the
same order as qmail's.
"""

from __future__ import annotations

import os
from pyqmail.local.maildir import clean_tmp as clean_tmp  # qmail's maildir_clean

SCAN_DIRS = ("new", "cur")
COPY_CHUNK = 65536


class ScanError(Exception):
    """new/ or cur/ could not be listed."""


class Message:
    """One message of the session: its name relative to the Maildir, size, deletion mark."""

    __slots__ = ("fn", "size", "deleted")

    def __init__(self, fn: str, size: int) -> None:
        self.fn = fn
        self.size = size
        self.deleted = False

    @property
    def uid(self) -> bytes:
        """Return the UIDL: the name without its directory and without the info after ':'."""
        return os.fsencode(self.fn[4:].split(":", 1)[0])


def _heap_push(heap: list[tuple[int, int]], item: tuple[int, int]) -> None:
    # qmail's prioq: sift up while the parent's time is strictly later.
    heap.append(item)
    j = len(heap) - 1
    while j:
        parent = (j - 1) // 2
        if heap[parent][0] <= item[0]:
            break
        heap[j] = heap[parent]
        j = parent
    heap[j] = item


def _heap_pop(heap: list[tuple[int, int]]) -> tuple[int, int]:
    # qmail's prioq: move the last element down from the root, preferring the
    # left child on ties, and stopping as soon as it is no later than a child.
    top = heap[0]
    last = heap.pop()
    n = len(heap)
    if not n:
        return top
    i = 0
    while True:
        j = 2 * i + 2
        if j > n:
            break
        if j == n or heap[j - 1][0] <= heap[j][0]:
            j -= 1
        if last[0] <= heap[j][0]:
            break
        heap[i] = heap[j]
        i = j
    heap[i] = last
    return top


def order(entries: list[tuple[str, int]]) -> list[str]:
    """Return the names of entries (name, mtime), in scan order, as qmail's heap yields them."""
    heap: list[tuple[int, int]] = []
    for index, (_, mtime) in enumerate(entries):
        _heap_push(heap, (mtime, index))
    out = []
    while heap:
        out.append(entries[_heap_pop(heap)[1]][0])
    return out


def scan(now: int) -> list[Message]:
    """Return the messages of the current Maildir; raise ScanError if new/ or cur/ is unreadable."""
    entries: list[tuple[str, int]] = []
    for sub in SCAN_DIRS:
        try:
            with os.scandir(sub) as it:
                for d in it:
                    if d.name.startswith("."):
                        continue
                    fn = sub + "/" + d.name
                    try:
                        mtime = os.stat(fn).st_mtime_ns // 1_000_000_000  # whole seconds, as time_t
                    except OSError:
                        continue
                    if mtime < now:
                        entries.append((fn, mtime))
        except OSError as e:
            raise ScanError(f"unable to scan $MAILDIR/{sub}: {e.strerror}") from e
    messages = []
    for fn in order(entries):
        try:
            size = os.stat(fn).st_size
        except OSError:
            size = 0
        messages.append(Message(fn, size))
    return messages


class Blaster:
    """Turn a message into POP3 lines: CRLF, dot-stuffing, TOP's line limit, qmail's extra blank line.

    It streams: a line of any length passes through in pieces, never held whole.
    """

    def __init__(self, limit: int = 0) -> None:
        # limit 0: the whole message; n + 1: the header and n body lines (TOP n).
        self.limit = limit
        self.inheaders = True
        self.at_start = True
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """Return the output for the next piece of the message (nothing once the limit is reached)."""
        out = []
        pos = 0
        while pos < len(data) and not self.done:
            if self.at_start:
                if self.limit and not self.inheaders:
                    self.limit -= 1
                    if not self.limit:
                        self.done = True
                        break
                if data[pos] == 10:  # an empty line ends the header
                    self.inheaders = False
                    out.append(b"\r\n")
                    pos += 1
                    continue
                if data[pos] == 46:  # "."
                    out.append(b".")
                self.at_start = False
            nl = data.find(b"\n", pos)
            if nl < 0:
                out.append(data[pos:])
                break
            out.append(data[pos:nl])
            out.append(b"\r\n")
            self.at_start = True
            pos = nl + 1
        return b"".join(out)

    def end(self) -> bytes:
        """Return the output for the end of the message: its unfinished last line's CRLF, the terminator."""
        out = b"" if self.at_start or self.done else b"\r\n"
        return out + b"\r\n.\r\n"
