"""Buffered report output, written the way qmail's substdio writes subfdout.

qmail's reporting programs (qmail-qread, qmail-showctl) put their lines into
a buffer, ignore write errors, and die by SIGPIPE when the reader of their
output goes away, as every C program does. Python ignores SIGPIPE, so
`Output` turns EPIPE back into death by SIGPIPE: `qmail-qread | head -1`
ends as quietly, and with the same status, as qmail's.
"""

from __future__ import annotations

import errno
import os

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
