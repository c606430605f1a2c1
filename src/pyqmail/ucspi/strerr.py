"""ucspi-tcp's messages: ``prog: fatal: what: error text`` on descriptor 2, then an exit code."""

from __future__ import annotations

import errno
import os

from pyqmail import errors

EXIT_USAGE = 100
EXIT_TEMP = 111

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pyqmail import cdb


class Die(Exception):
    """End the program with code after writing text (if any) and a newline to descriptor 2."""

    def __init__(self, code: int, text: bytes | None = None) -> None:
        super().__init__(text)
        self.code = code
        self.text = text

    def report(self) -> int:
        """Write the message; return the exit code."""
        if self.text is not None:
            warn(self.text)
        return self.code


def warn(text: bytes) -> None:
    """Write text and a newline to descriptor 2 in one write (lost if it cannot be written)."""
    try:
        os.write(2, text + b"\n")
    except OSError:
        pass


def describe(e: OSError | cdb.CDBError) -> bytes:
    """Return djb's words for a failed call; a malformed cdb is cdb's 'protocol error'."""
    if isinstance(e, OSError) and e.errno != errno.EPROTO:
        return errors.describe(e).encode()
    return b"protocol error"


def arg(s: str) -> bytes:
    """Return the bytes of an argv or environment string."""
    return os.fsencode(s)
