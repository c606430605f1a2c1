"""condredirect(1): if a program says so, redirect the message to a new address.

``condredirect newaddress program [ arg ... ]`` runs program on the message.
Exit 0 from it: the message is queued for newaddress (sender $SENDER, with
$DTLINE on top) and condredirect exits 99 so qmail-local does nothing more;
exit 111: temporary failure; any other exit: condredirect exits 0.
"""

from __future__ import annotations

import os

from pyqmail.entry import program
from pyqmail.tools import common
from pyqmail.tools.common import EXIT_IGNORE, EXIT_OK, EXIT_PERM, EXIT_TEMP, Die

FATAL = b"condredirect: fatal: "
USAGE = b"condredirect: usage: condredirect newaddress program [ arg ... ]"


def condredirect(argv: list[str]) -> Die:
    """Run the test program, then redirect or not; return the Die that ends the program, or raise it."""
    if len(argv) < 3:
        return Die(EXIT_PERM, USAGE)
    if common.run_condition(argv[2:], FATAL) != 0:
        return Die(EXIT_OK, None)
    try:
        os.lseek(0, 0, os.SEEK_SET)
    except OSError as e:
        return common.fail(EXIT_TEMP, FATAL, b"unable to rewind: ", e)
    sender = common.need_env("SENDER", EXIT_PERM, FATAL)
    dtline = common.need_env("DTLINE", EXIT_PERM, FATAL)
    qp = common.queue_stdin(FATAL, sender, dtline, [common.b(argv[1])])
    return Die(EXIT_IGNORE, b"condredirect: qp " + qp)


@program("condredirect", crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Redirect stdin to argv[1] if the program argv[2:] exits 0."""
    return common.run_tool(condredirect, argv)
