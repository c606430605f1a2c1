"""The qmail-queue interface (qmail-queue(8)): its descriptors, its envelope, its spool.

Every program that is a qmail-queue (qmail-queue itself, qmail-smtpc,
qmail-qmqpc, qmail-qfilter and the filters of pyqmail.filter) reads the
envelope here: `F sender NUL (T recipient NUL)* NUL` on descriptor 1, one
bounded address at a time, with qmail-queue's exits for a bad one (11 past
ADDR_MAX, 91 for a wrong letter, 54 when it ends early). `write_envelope`
makes the same bytes; `Spool` holds a message of any size in bounded memory
(the rest in an unnamed temporary file). The queueing client, the other half
of the interface, is pyqmail.queue.qq.
"""

from __future__ import annotations

import os

from pyqmail import durable

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

FD_MESSAGE = 0
FD_ENVELOPE = 1
FD_ERRSTR = 6
ADDR_MAX = 1003  # bytes of an envelope address, its terminating NUL included
CHUNK = 65536

# qmail-queue(8) exit codes the readers and the spool give (pyqmail.queue.exits names them all).
ADDR_TOO_LONG = 11
NOMEM = 51
WRITE_ERROR = 53
READ_ERROR = 54
ENVELOPE_FORMAT = 91


class Exit(Exception):
    """End with this qmail-queue exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Reader:
    """Read an envelope from a descriptor, one bounded address at a time.

    Nothing past one address (addr_max bytes, its NUL included) and one read
    is held. Exit(54) on a read error, Exit(early) when the envelope ends
    before its final NUL (qmail-queue: 54; qmail-qmqpc: 91, as C's), Exit(11)
    for an address longer than addr_max, Exit(91) for a field that is not
    F first, then T, then the final NUL. wait, if given, is called with the
    descriptor before every read (qmail-queued's watch on its client).
    """

    def __init__(self, fd: int, wait: Callable[[int], None] | None = None,
                 early: int = READ_ERROR, addr_max: int = ADDR_MAX, limit: int | None = None) -> None:
        self._fd = fd
        self._buf = b""
        self._pos = 0
        self._wait = wait
        self._early = early
        self._addr_max = addr_max
        # At most limit bytes are read: what lies past them is as if the input ended
        # there (qmail-queued's pickup: a drop file its owner grows while it is read).
        self._left = -1 if limit is None else limit

    def _fill(self) -> None:
        if self._wait is not None:
            self._wait(self._fd)
        if self._left == 0:
            raise Exit(self._early)
        try:
            data = os.read(self._fd, CHUNK if self._left < 0 else min(CHUNK, self._left))
        except OSError:
            raise Exit(READ_ERROR) from None
        if not data:
            raise Exit(self._early)
        if self._left > 0:
            self._left -= len(data)
        self._buf = self._buf[self._pos:] + data
        self._pos = 0

    def byte(self) -> int:
        """Return the next byte."""
        if self._pos >= len(self._buf):
            self._fill()
        b = self._buf[self._pos]
        self._pos += 1
        return b

    def address(self) -> bytes:
        """Return the next address with its NUL; Exit(11) past addr_max bytes."""
        while True:
            end = self._buf.find(b"\0", self._pos, self._pos + self._addr_max)
            if end != -1:
                addr = self._buf[self._pos:end + 1]
                self._pos = end + 1
                return addr
            if len(self._buf) - self._pos >= self._addr_max:
                raise Exit(ADDR_TOO_LONG)
            self._fill()

    def fields(self) -> Iterator[tuple[bytes, bytes]]:
        """Yield (b"F", sender NUL), then (b"T", recipient NUL) for each recipient, up to the final NUL."""
        if self.byte() != 0x46:  # F
            raise Exit(ENVELOPE_FORMAT)
        yield b"F", self.address()
        while True:
            kind = self.byte()
            if kind == 0:
                return
            if kind != 0x54:  # T
                raise Exit(ENVELOPE_FORMAT)
            yield b"T", self.address()


def read_envelope(fd: int, early: int = READ_ERROR) -> tuple[bytes, list[bytes]]:
    """Read the whole envelope on fd; return the sender and the recipients, without NULs (Exit as Reader)."""
    it = Reader(fd, early=early).fields()
    sender = next(it)[1][:-1]
    return sender, [addr[:-1] for _, addr in it]


def envelope_bytes(sender: bytes, recipients: Iterable[bytes]) -> bytes:
    """Return the envelope qmail-queue reads on descriptor 1 for sender and recipients."""
    return b"F" + sender + b"\0" + b"".join(b"T" + r + b"\0" for r in recipients) + b"\0"


class Spool:
    """Bytes of any size: the first `keep` in memory, the rest in an unnamed temporary file.

    A qmail-queue that must see the whole message before passing it on
    (qmail-smtpc, qmail-qmqpc, qmail-qfilter, the filters) reads it into a
    Spool: memory stays bounded. Exit(53) when the file cannot be made or
    written, Exit(54) when the input cannot be read, Exit(51) for lack of memory.
    """

    __slots__ = ("head", "fd", "size", "keep")

    def __init__(self, keep: int = 0) -> None:
        self.head = bytearray()
        self.fd = -1
        self.size = 0
        self.keep = keep

    def _file(self) -> int:
        if self.fd == -1:
            import tempfile

            try:
                f = tempfile.TemporaryFile()
            except OSError:
                raise Exit(WRITE_ERROR) from None
            self.fd = os.dup(f.fileno())
            os.set_inheritable(self.fd, False)
            f.close()
        return self.fd

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append data."""
        self.size += len(data)
        if self.fd == -1 and len(self.head) + len(data) <= self.keep:
            self.head += data
            return
        fd = self._file()
        try:
            durable.write_all(fd, data)
        except OSError:
            raise Exit(WRITE_ERROR) from None

    def slurp(self, fd: int) -> None:
        """Append what fd holds, up to its end."""
        while True:
            try:
                chunk = os.read(fd, CHUNK)
            except MemoryError:
                raise Exit(NOMEM) from None
            except OSError:
                raise Exit(READ_ERROR) from None
            if not chunk:
                return
            self.write(chunk)

    def chunks(self) -> Iterator[bytes]:
        """Yield the bytes from the start, CHUNK at a time (Exit(54) if the file cannot be read back)."""
        if self.head:
            yield bytes(self.head)
        if self.fd == -1:
            return
        offset = 0
        while True:
            try:
                data = os.pread(self.fd, CHUNK, offset)
            except OSError:
                raise Exit(READ_ERROR) from None
            if not data:
                return
            offset += len(data)
            yield data

    def rewound(self) -> int:
        """Return a descriptor holding every byte, at its start (the memory part moved into the file)."""
        if self.head or self.fd == -1:
            head = bytes(self.head)
            self.head.clear()
            old, self.fd, size = self.fd, -1, self.size
            self.size = 0
            self.keep = 0
            self.write(head)
            if old != -1:
                offset = 0
                try:
                    while True:
                        data = os.pread(old, CHUNK, offset)
                        if not data:
                            break
                        offset += len(data)
                        self.write(data)
                finally:
                    os.close(old)
            self._file()
            self.size = size
        try:
            os.lseek(self.fd, 0, os.SEEK_SET)
        except OSError:
            raise Exit(WRITE_ERROR) from None
        return self.fd

    def close(self) -> None:
        """Drop the bytes."""
        if self.fd != -1:
            os.close(self.fd)
            self.fd = -1
        self.head.clear()


def spool(fd: int, head: bytes = b"") -> int:
    """Copy head and then fd's bytes to an unnamed temporary file; return its descriptor, at its start."""
    s = Spool()
    try:
        s.write(head)
        s.slurp(fd)
        return s.rewound()
    except BaseException:
        s.close()
        raise
