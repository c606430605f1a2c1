"""CPU of a local queue drain: qmail-send, qmail-lspawn, qmail-local (and workers), per message.

usage: python bench/lspawn_cpu.py [N] [--rounds R]

bench/drain.py's set-up (single-user home, N messages of 4 KB, concurrencylocal 10), drained
once with qmail-lspawn's per-user workers off ($PYQMAIL_LSPAWN_WORKERS=0: a child per
delivery) and once on, R rounds alternated. This process is a child subreaper, so the
workers that outlive qmail-lspawn are reaped here and their CPU is counted:
getrusage(RUSAGE_CHILDREN) user+system before and after each drain, per message; the
messages/s and the load average are printed with it. Run as root it drops to pqtest.
"""

from __future__ import annotations

import ctypes
import resource
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(__file__))

import drain  # noqa: E402

PR_SET_CHILD_SUBREAPER = 36


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def one(n: int, workers: str) -> tuple[float, float]:
    """Drain n messages with $PYQMAIL_LSPAWN_WORKERS=workers; return (ms CPU per message, msgs/s)."""
    home, maildir = drain.setup(10)
    drain.fill(home, n, 4096)
    os.environ["PYQMAIL_LSPAWN_WORKERS"] = workers
    before = cpu()
    elapsed = drain.drain(home, maildir, n)
    while True:  # the workers end when qmail-lspawn has: reap them here
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    used = cpu() - before
    shutil.rmtree(os.path.dirname(home), ignore_errors=True)
    return used / n * 1000, n / elapsed


def main() -> None:
    args = sys.argv[1:]
    rounds = 3
    if "--rounds" in args:
        i = args.index("--rounds")
        rounds = int(args[i + 1])
        del args[i:i + 2]
    n = int(args[0]) if args else 300
    if os.geteuid() == 0:
        drain.as_user("pqtest")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    for r in range(rounds):
        for workers in ("0", "10"):
            ms, rate = one(n, workers)
            print(f"round {r + 1} workers={workers:>2}: {ms:5.2f} ms CPU per message, {rate:4.0f} msgs/s, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
