"""Shared bits of the bench scripts: a fresh single-user home and timing."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

BIN = os.path.dirname(sys.executable)


def fresh_home(fqdn: str = "bench.example.com") -> str:
    """Create a single-user installation in a temporary directory; return its path."""
    base = tempfile.mkdtemp(prefix="pyqmail-bench-")
    os.chmod(base, 0o755)
    home = os.path.join(base, "qmail")
    subprocess.run([os.path.join(BIN, "qmail"), "init", "--single-user", "--home", home, fqdn],
                   check=True, stdout=subprocess.DEVNULL)
    return home


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    """Return the wall time of each of repeat calls of fn."""
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def report(label: str, samples: list[float], unit: str = "ms", scale: float = 1000.0) -> float:
    """Print min/median/max of samples; return the median (unscaled)."""
    med = statistics.median(samples)
    print(f"{label}: median {med * scale:.3f} {unit}  min {min(samples) * scale:.3f}  "
          f"max {max(samples) * scale:.3f}  (n={len(samples)})")
    return med


def queue_messages(home: str, n: int, body: bytes, envelope: bytes) -> None:
    """Queue n copies of body with envelope, one QMAILHOME/bin/qmail-queue each (fork fast path)."""
    from pyqmail import spawn

    prog = os.path.join(home, "bin", "qmail-queue")
    for _ in range(n):
        mr, mw = os.pipe()
        er, ew = os.pipe()
        pid = spawn.spawn(prog, [prog], env={"PATH": "/usr/bin:/bin"}, fds={0: mr, 1: er, 2: 2})
        os.close(mr)
        os.close(er)
        os.write(mw, body)
        os.close(mw)
        os.write(ew, envelope)
        os.close(ew)
        assert spawn.wait(pid) == 0


def run_send_until(home: str, n: int, env: dict[str, str],
                   on_line: Callable[[bytes], None] | None = None) -> float:
    """Start qmail-start, read its log until n 'end msg' lines (600 s at most), stop it; return the seconds."""
    import select
    import signal

    from pyqmail import spawn

    log_r, log_w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    start = time.perf_counter()
    pid = spawn.spawn(os.path.join(home, "bin", "qmail-start"), ["qmail-start", "./Maildir/"], env=env,
                      fds={0: null, 1: log_w, 2: 2})
    os.close(log_w)
    os.close(null)
    ended = 0
    buf = b""
    deadline = time.monotonic() + 600
    while ended < n and time.monotonic() < deadline:
        select.select([log_r], [], [], 1.0)
        data = os.read(log_r, 1 << 16)
        if not data:
            break
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            ended += line.startswith(b"end msg ")
            if on_line is not None:
                on_line(line)
    elapsed = time.perf_counter() - start
    os.kill(pid, signal.SIGTERM)
    while os.read(log_r, 1 << 16):
        pass
    os.close(log_r)
    spawn.wait(pid)
    return elapsed
