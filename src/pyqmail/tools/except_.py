"""except(1): run a program and reverse its success: 0 becomes 100, 111 stays, others become 0.

``except program [ arg ... ]``: useful in .qmail to bounce when a program
succeeds. The program name is ``except`` (a Python keyword, hence the module name).
"""

from __future__ import annotations

from pyqmail.entry import program
from pyqmail.tools import common
from pyqmail.tools.common import EXIT_OK, EXIT_PERM, EXIT_TEMP, Die

FATAL = b"except: fatal: "
USAGE = b"except: usage: except program [ arg ... ]"


def except_(argv: list[str]) -> Die:
    """Run argv[1:]; return the Die that ends the program, or raise it."""
    if len(argv) < 2:
        return Die(EXIT_PERM, USAGE)
    code = common.run_condition(argv[1:], FATAL)
    return Die(EXIT_PERM if code == 0 else EXIT_OK, None)


@program("except", crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Run argv[1:] with its success and permanent failure swapped."""
    return common.run_tool(except_, argv)
