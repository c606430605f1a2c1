"""forward(1): queue the message, with $DTLINE on top, for the addresses in argv.

The envelope sender is $NEWSENDER. On success forward prints
``forward: qp N`` (N the qmail-queue pid) on stderr and exits 0; a
permanent qmail-queue failure exits 100, anything else 111.
"""

from __future__ import annotations

import os

from pyqmail.entry import program
from pyqmail.tools import common
from pyqmail.tools.common import EXIT_OK, EXIT_PERM, EXIT_TEMP, Die

FATAL = b"forward: fatal: "


def queue_stdin(fatal: bytes, sender: bytes, dtline: bytes, recipients: list[bytes], ok_code: int,
                ok_prefix: bytes) -> Die:
    """Queue dtline + stdin from sender to recipients; return the Die that ends the program."""
    from pyqmail.queue.qq import QQ

    q = QQ()
    q.write(dtline)
    while True:
        try:
            chunk = os.read(0, 65536)
        except OSError as e:
            raise common.fail(EXIT_TEMP, fatal, b"unable to read message: ", e) from None
        if not chunk:
            break
        q.write(chunk)
    qp = str(q.pid).encode()
    report = q.close(sender, recipients)
    if report:
        return Die(EXIT_PERM if report[:1] == b"D" else EXIT_TEMP, fatal + report[1:])
    return Die(ok_code, ok_prefix + qp)


@program("forward", crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Forward stdin to argv[1:]."""
    sender = common.env("NEWSENDER")
    if sender is None:
        return Die(EXIT_PERM, FATAL + b"NEWSENDER not set").report()
    dtline = common.env("DTLINE")
    if dtline is None:
        return Die(EXIT_PERM, FATAL + b"DTLINE not set").report()
    try:
        end = queue_stdin(FATAL, sender, dtline, [common.b(a) for a in argv[1:]], EXIT_OK, b"forward: qp ")
    except Die as e:
        return e.report()
    return end.report()
