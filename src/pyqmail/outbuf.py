"""Buffered report output, written the way qmail's substdio writes subfdout.

qmail's reporting programs (qmail-qread, qmail-showctl) put their lines into
a buffer, ignore write errors, and die by SIGPIPE when the reader of their
output goes away, as every C program does. Python ignores SIGPIPE, so
`Output` turns EPIPE back into death by SIGPIPE: `qmail-qread | head -1`
ends as quietly, and with the same status, as qmail's.

`Substdio` is the same buffer for programs that act on a failed write
(qmail-pw2u stops, preline reports it): it raises OSError.
"""

from __future__ import annotations

import errno
import os

from pyqmail.durable import write_all

BUFSIZE = 8192  # qmail's SUBSTDIO_OUTSIZE


def die_by_sigpipe() -> None:
    """Terminate this process by SIGPIPE, as a C program writing to a closed pipe would."""
    import signal  # only here: its import is slow, and this path is rare

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)


class Output:
    """A write buffer on a descriptor; write errors drop the data, EPIPE kills the process."""

    def __init__(self, fd: int = 1, size: int = BUFSIZE) -> None:
        self.fd = fd
        self.size = size
        self._buf = bytearray()
        self.failed = False  # a write failed (other than EPIPE)

    def put(self, data: bytes | bytearray) -> None:
        """Buffer data, writing out whenever the buffer is full."""
        self._buf += data
        if len(self._buf) >= self.size:
            self.flush()

    def flush(self) -> None:
        """Write out the buffer; on failure the data is dropped, as substdio_flush does."""
        data = bytes(self._buf)
        self._buf.clear()
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.EPIPE:
                    die_by_sigpipe()
                self.failed = True
                return
            view = view[n:]


class Substdio:
    """qmail's substdio output buffer on a descriptor, writing exactly when substdio would.

    What has reached the descriptor when a program stops halfway depends on
    it. A failed write raises OSError; what _write is given is then lost.
    """

    def __init__(self, fd: int, size: int = BUFSIZE) -> None:
        self.fd = fd
        self.size = size
        self.buf = bytearray()

    def _write(self, data: bytes) -> None:
        write_all(self.fd, data)

    def put(self, data: bytes) -> None:
        """Buffer data; a piece too large for the space left goes out first, in size-byte writes."""
        if len(data) > self.size - len(self.buf):
            self.flush()
            while len(data) > self.size:
                self._write(data[:self.size])
                data = data[self.size:]
        self.buf += data

    def flush(self) -> None:
        """Write out the buffer."""
        if self.buf:
            data = bytes(self.buf)
            self.buf.clear()
            self._write(data)
