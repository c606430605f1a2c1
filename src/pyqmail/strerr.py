"""djb's strerr: a message on descriptor 2, then an exit code.

`raise Die(code, text)` ends a program the way qmail's and ucspi-tcp's
strerr_die does: the text and a newline in one write (lost if it cannot be
written), then the exit code.
"""

from __future__ import annotations

import os


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
        pass  # safe: stderr gone; the caller's exit code carries the failure
