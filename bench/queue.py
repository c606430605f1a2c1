"""qmail-queue alone: messages/s through the fork fast path from a warm parent.

usage: python bench/queue.py [N] [SIZE]

Queues N messages of SIZE bytes (default 1000 of 4096) into a fresh
single-user home, one qmail-queue process each, started by spawn's
fork-and-call path, and prints messages/s and fsync calls per message
(counted by wrapping os.fsync in the parent, which the children inherit).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import fresh_home  # noqa: E402

from pyqmail import spawn  # noqa: E402


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
    home = fresh_home()
    prog = os.path.join(home, "bin", "qmail-queue")
    body = (b"Subject: bench\n\n" + b"x" * 75 + b"\n") * (size // 92 + 1)
    body = body[:size]
    envelope = b"Fsender@bench.example\0Trcpt@bench.example\0\0"

    count_r, count_w = os.pipe()
    os.set_blocking(count_r, False)
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        os.write(count_w, b".")
        real_fsync(fd)

    os.fsync = counting_fsync  # type: ignore[assignment]
    fsyncs = 0
    start = time.perf_counter()
    for _ in range(n):
        mr, mw = os.pipe()
        er, ew = os.pipe()
        pid = spawn.spawn(prog, [prog], env={"PATH": "/usr/bin:/bin"}, fds={0: mr, 1: er, 2: 2, count_w: count_w})
        os.close(mr)
        os.close(er)
        os.write(mw, body)
        os.close(mw)
        os.write(ew, envelope)
        os.close(ew)
        rc = spawn.wait(pid)
        assert rc == 0, rc
        try:
            fsyncs += len(os.read(count_r, 65536))
        except BlockingIOError:
            pass
    elapsed = time.perf_counter() - start
    try:
        fsyncs += len(os.read(count_r, 65536))
    except BlockingIOError:
        pass
    print(f"qmail-queue fast path: {n} messages of {size} bytes in {elapsed:.2f} s: "
          f"{n / elapsed:.0f} messages/s, {fsyncs / n:.1f} fsyncs per message")


if __name__ == "__main__":
    main()
