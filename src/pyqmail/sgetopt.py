"""qmail's getopt (sgetopt/subgetopt): option parsing with qmail's exact behaviour.

Options end at the first argument not starting with '-', at '-' alone (which
stays an argument) and after '--'. An unknown option, or one missing its
argument, is returned as '?' after printing qmail's complaint on stderr:
``prog: illegal option -- x`` or ``prog: option requires an argument -- x``,
prog being the last component of argv[0].
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Iterator


class Getopt:
    """Walk the options of argv; `optind` is the first operand once iteration ends."""

    def __init__(self, argv: list[str], opts: str, complain: bool = True) -> None:
        self.argv = argv
        self.opts = opts
        self.complain = complain
        self.optind = 1
        self._pos = 0
        self.optarg: str | None = None
        prog = argv[0] if argv else ""
        self.progname = prog.rsplit("/", 1)[-1]

    def _takes_arg(self, c: str) -> bool | None:
        i = 0
        opts = self.opts
        while i < len(opts):
            if opts[i] == c and c != ":":
                return i + 1 < len(opts) and opts[i + 1] == ":"
            i += 1
            if i < len(opts) and opts[i] == ":":
                i += 1
        return None

    def next(self) -> str | None:
        """Return the next option letter, '?' for a problem, or None when options end."""
        argv = self.argv
        self.optarg = None
        if self.optind >= len(argv):
            return None
        if self._pos and self._pos >= len(argv[self.optind]):
            self.optind += 1
            self._pos = 0
            if self.optind >= len(argv):
                return None
        arg = argv[self.optind]
        if not self._pos:
            if arg[:1] != "-":
                return None
            self._pos = 1
            if len(arg) < 2 or arg[1] == "-":
                if len(arg) >= 2:
                    self.optind += 1
                self._pos = 0
                return None
        c = arg[self._pos]
        self._pos += 1
        takes = self._takes_arg(c)
        if takes is None:
            return self._problem(c, illegal=True)
        if takes:
            rest = arg[self._pos:]
            self.optind += 1
            self._pos = 0
            if rest:
                self.optarg = rest
            else:
                if self.optind >= len(argv):
                    return self._problem(c, illegal=False)
                self.optarg = argv[self.optind]
                self.optind += 1
        return c

    def skip_rest(self) -> None:
        """Skip what is left of the current word (an optional argument glued to an option)."""
        if self._pos and self.optind < len(self.argv):
            self._pos = len(self.argv[self.optind])

    def _problem(self, c: str, illegal: bool) -> str:
        if self.complain:
            what = ": illegal option -- " if illegal else ": option requires an argument -- "
            msg = self.progname + what + c + "\n"
            try:
                os.write(2, os.fsencode(msg))
            except OSError:
                pass  # safe: stderr gone; the caller still gets '?' and fails
        return "?"

    def __iter__(self) -> Iterator[tuple[str, str | None]]:
        while True:
            c = self.next()
            if c is None:
                return
            yield c, self.optarg

    def operands(self) -> list[str]:
        """Return the arguments after the options."""
        return self.argv[self.optind:]
