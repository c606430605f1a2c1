"""maildirmake(1): create a maildir: the directory and its tmp, new and cur, mode 700.

Exit 0 on success; 100 for usage; 111 with ``maildirmake: fatal: unable to
mkdir NAME/SUB: error`` if a directory cannot be made.
"""

from __future__ import annotations

import os

from pyqmail.entry import program
from pyqmail.tools import common
from pyqmail.tools.common import EXIT_PERM, EXIT_TEMP, Die

FATAL = b"maildirmake: fatal: "
USAGE = b"maildirmake: usage: maildirmake name"


def maildirmake(name: str) -> None:
    """Make the maildir name; raise Die on failure."""
    bname = common.b(name)
    try:
        os.mkdir(name, 0o700)
    except OSError as e:
        raise common.fail(EXIT_TEMP, FATAL, b"unable to mkdir " + bname + b": ", e) from None
    try:
        os.chdir(name)
    except OSError as e:
        raise common.fail(EXIT_TEMP, FATAL, b"unable to chdir to " + bname + b": ", e) from None
    for sub in ("tmp", "new", "cur"):
        try:
            os.mkdir(sub, 0o700)
        except OSError as e:
            raise common.fail(EXIT_TEMP, FATAL, b"unable to mkdir " + bname + b"/" + sub.encode() + b": ", e) from None


@program("maildirmake", crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Create the maildir argv[1]."""
    os.umask(0o077)
    if len(argv) < 2:
        return Die(EXIT_PERM, USAGE).report()
    try:
        maildirmake(argv[1])
    except Die as e:
        return e.report()
    return 0
