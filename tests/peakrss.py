"""Run a program and report its peak memory: `python peakrss.py RESULT PROGRAM [ARG...]`.

The program is started by fork and exec from this small process (never from
the test's, whose memory the kernel would count in the child's high-water
mark across a vfork/exec), inherits descriptors and environment, and is
sent any TERM this process gets. When it ends, RESULT gets one line:
its exit code (negative for a signal) and ru_maxrss in KiB from wait4,
the largest resident set of the program and of every descendant it waited
for (tcpserver's connection children, qmail-queue).
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    result, argv = sys.argv[1], sys.argv[2:]
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(pid, signal.SIGTERM))
    _, status, usage = os.wait4(pid, 0)
    with open(result, "w", encoding="ascii") as f:
        f.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}\n")


if __name__ == "__main__":
    main()
