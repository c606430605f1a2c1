"""Start-up cost of a program started by spawn: fork-and-call versus exec.

usage: python bench/spawn.py [N]

Runs QMAILHOME/bin/qmail-queue (with QMAILHOME pointing nowhere, so it exits
61 right after start-up) N times each way from this warm parent
and prints the median wall time per start and the ratio.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import fresh_home, report, timed  # noqa: E402

from pyqmail import spawn  # noqa: E402


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    home = fresh_home()
    prog = os.path.join(home, "bin", "qmail-queue")
    devnull = os.open(os.devnull, os.O_RDONLY)

    def once(fast: bool) -> None:
        # A home that does not exist: qmail-queue starts, finds no home and
        # exits 61 before touching any file, so this times the start alone.
        pid = spawn.spawn(prog, [prog], env={"QMAILHOME": "/nonexistent"}, fds={0: devnull, 1: devnull, 2: 2},
                          fast=fast)
        rc = spawn.wait(pid)
        assert rc == 61, rc

    once(True)
    once(False)
    fast = report("fork-and-call start (qmail-queue)", timed(lambda: once(True), n))
    slow = report("exec start (qmail-queue)        ", timed(lambda: once(False), n))
    print(f"ratio exec/fork-and-call: {slow / fast:.1f}x")


if __name__ == "__main__":
    main()
