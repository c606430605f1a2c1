"""forward(1): queue the message, with $DTLINE on top, for the addresses in argv.

The envelope sender is $NEWSENDER. On success forward prints
``forward: qp N`` (N the qmail-queue pid) on stderr and exits 0; a
permanent qmail-queue failure exits 100, anything else 111.
"""

from __future__ import annotations

from pyqmail.entry import program
from pyqmail.tools import common
from pyqmail.tools.common import EXIT_OK, EXIT_PERM, EXIT_TEMP, Die

FATAL = b"forward: fatal: "


def forward(argv: list[str]) -> Die:
    """Queue stdin for argv[1:]; return the Die that ends the program, or raise it."""
    sender = common.need_env("NEWSENDER", EXIT_PERM, FATAL)
    dtline = common.need_env("DTLINE", EXIT_PERM, FATAL)
    qp = common.queue_stdin(FATAL, sender, dtline, [common.b(a) for a in argv[1:]])
    return Die(EXIT_OK, b"forward: qp " + qp)


@program("forward", crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Forward stdin to argv[1:]."""
    return common.run_tool(forward, argv)
