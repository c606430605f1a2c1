"""Reading the whole of a descriptor, with a bound (qmail's slurpclose, without the close)."""

from __future__ import annotations

import os

CHUNK = 65536


def read_all(fd: int, limit: int) -> bytes | None:
    """Return the rest of fd; None if it is longer than limit bytes; raise OSError if a read fails."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = os.read(fd, CHUNK)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
