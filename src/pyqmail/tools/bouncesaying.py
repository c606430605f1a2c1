"""bouncesaying(1): bounce the message with an error text, perhaps only if a program says so.

``bouncesaying error [ program [ arg ... ] ]``: without a program, print
error and exit 100 (qmail-local bounces with it). With one, run it: exit 0
bounces; 111 is a temporary failure; anything else exits 0.
"""

from __future__ import annotations

from pyqmail.entry import program
from pyqmail.tools import common
from pyqmail.tools.common import EXIT_OK, EXIT_PERM, EXIT_TEMP, Die

FATAL = b"bouncesaying: fatal: "
USAGE = b"bouncesaying: usage: bouncesaying error [ program [ arg ... ] ]"


def bouncesaying(argv: list[str]) -> Die:
    """Decide; return the Die that ends the program, or raise it."""
    if len(argv) < 2:
        return Die(EXIT_PERM, USAGE)
    if len(argv) >= 3 and common.run_condition(argv[2:], FATAL) != 0:
        return Die(EXIT_OK, None)
    return Die(EXIT_PERM, common.b(argv[1]))


@program("bouncesaying", crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Bounce with argv[1], unconditionally or if argv[2:] exits 0."""
    return common.run_tool(bouncesaying, argv)
