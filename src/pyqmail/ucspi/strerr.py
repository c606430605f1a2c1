"""ucspi-tcp's messages: ``prog: fatal: what: error text`` on descriptor 2, then an exit code."""

from __future__ import annotations

import errno
import os

from pyqmail import errors
from pyqmail.strerr import Die as Die, warn as warn  # one strerr for every program

EXIT_USAGE = 100
EXIT_TEMP = 111

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pyqmail import cdb


def describe(e: OSError | cdb.CDBError) -> bytes:
    """Return djb's words for a failed call; a malformed cdb is cdb's 'protocol error'."""
    if isinstance(e, OSError) and e.errno != errno.EPROTO:
        return errors.describe(e).encode()
    return b"protocol error"


def arg(s: str) -> bytes:
    """Return the bytes of an argv or environment string."""
    return os.fsencode(s)
