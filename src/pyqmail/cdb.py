"""Constant databases in D. J. Bernstein's cdb format, read and written.

The format: a 2048-byte header of 256 (position, slots) pairs, the records
(key length, data length, key, data), then 256 hash tables of (hash, position)
slots; all numbers are little-endian 32-bit. Files written here are read by
the C cdb tools (tcprules, qmail-newu) and the reverse.
"""

from __future__ import annotations

import mmap
import os
import struct

TYPE_CHECKING = False  # typing costs milliseconds per process start (qmail-smtpd opens morercpthosts.cdb)
if TYPE_CHECKING:
    from typing import BinaryIO, Iterator

_PAIR = struct.Struct("<LL")
HEADER_SIZE = 2048
MAX_SIZE = 0xFFFFFFFF


class CDBError(Exception):
    """The file is not a well-formed cdb."""


def cdb_hash(key: bytes) -> int:
    """Return the cdb hash of key."""
    h = 5381
    for c in key:
        h = ((h << 5) + h ^ c) & 0xFFFFFFFF
    return h


class Reader:
    """A cdb opened for lookups; every offset read is bounds-checked."""

    def __init__(self, data: bytes | mmap.mmap, allow_short: bool = False) -> None:
        # allow_short: read a file shorter than the header as C cdb does,
        # failing only a lookup whose reads pass the end (tcpserver -x).
        if len(data) < HEADER_SIZE and not allow_short:
            raise CDBError("file shorter than the cdb header")
        self._data = data
        self._size = len(data)

    @classmethod
    def open(cls, path: str) -> Reader:
        """Open path; raise FileNotFoundError if missing, CDBError if malformed."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise CDBError(f"{path}: shorter than the cdb header")
            return cls(mmap.mmap(fd, size, prot=mmap.PROT_READ))
        finally:
            os.close(fd)

    def close(self) -> None:
        """Release the mapping."""
        if isinstance(self._data, mmap.mmap):
            self._data.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pair(self, pos: int) -> tuple[int, int]:
        if pos < 0 or pos + 8 > self._size:
            raise CDBError("pointer past the end of the cdb")
        return _PAIR.unpack_from(self._data, pos)

    def find_all(self, key: bytes) -> Iterator[bytes]:
        """Yield the data of every record with this key, in file order."""
        h = cdb_hash(key)
        tpos, slots = self._pair((h & 0xFF) * 8)
        if slots == 0:
            return
        start = (h >> 8) % slots
        for i in range(slots):
            spos = tpos + ((start + i) % slots) * 8
            shash, rpos = self._pair(spos)
            if rpos == 0:
                return
            if shash != h:
                continue
            klen, dlen = self._pair(rpos)
            end = rpos + 8 + klen + dlen
            if end > self._size:
                raise CDBError("record past the end of the cdb")
            if klen == len(key) and self._data[rpos + 8:rpos + 8 + klen] == key:
                yield bytes(self._data[rpos + 8 + klen:end])

    def get(self, key: bytes) -> bytes | None:
        """Return the data of the first record with this key, or None."""
        for value in self.find_all(key):
            return value
        return None

    def __contains__(self, key: bytes) -> bool:
        return self.get(key) is not None

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Yield every (key, data) record in file order."""
        end_records = self._pair(0)[0]
        for i in range(256):
            end_records = min(end_records, self._pair(i * 8)[0])
        pos = HEADER_SIZE
        while pos < end_records:
            klen, dlen = self._pair(pos)
            end = pos + 8 + klen + dlen
            if end > end_records:
                raise CDBError("record past the end of the records")
            yield bytes(self._data[pos + 8:pos + 8 + klen]), bytes(self._data[pos + 8 + klen:end])
            pos = end


class Writer:
    """Build a cdb into an open binary file; call finish() to write the tables."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._f.seek(0)
        self._f.write(b"\0" * HEADER_SIZE)
        self._pos = HEADER_SIZE
        self._entries: list[list[tuple[int, int]]] = [[] for _ in range(256)]

    def add(self, key: bytes, data: bytes) -> None:
        """Append a record; raise CDBError if the file would pass 4 GB."""
        h = cdb_hash(key)
        self._entries[h & 0xFF].append((h, self._pos))
        self._f.write(_PAIR.pack(len(key), len(data)))
        self._f.write(key)
        self._f.write(data)
        self._pos += 8 + len(key) + len(data)
        if self._pos > MAX_SIZE:
            raise CDBError("cdb too large")

    def finish(self) -> None:
        """Write the hash tables and the header."""
        header = []
        tables = []
        pos = self._pos
        for bucket in self._entries:
            nslots = 2 * len(bucket)
            header.append((pos, nslots))
            slots = [(0, 0)] * nslots
            for h, rpos in bucket:
                i = (h >> 8) % nslots
                while slots[i][1] != 0:
                    i = (i + 1) % nslots
                slots[i] = (h, rpos)
            tables.append(b"".join(_PAIR.pack(*s) for s in slots))
            pos += nslots * 8
            if pos > MAX_SIZE:
                raise CDBError("cdb too large")
        self._f.write(b"".join(tables))
        self._f.seek(0)
        self._f.write(b"".join(_PAIR.pack(*p) for p in header))
        self._f.flush()


def write_atomic(path: str, records: list[tuple[bytes, bytes]] | Iterator[tuple[bytes, bytes]],
                 tmp: str | None = None, mode: int = 0o644) -> None:
    """Write records to path through tmp (default path + '.tmp'), fsync'd, then rename."""
    from pyqmail import durable

    tmp = tmp or path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        w = Writer(f)
        for key, data in records:
            w.add(key, data)
        w.finish()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    durable.fsync_dir(os.path.dirname(path) or ".")
