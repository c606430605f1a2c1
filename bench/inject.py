"""qmail-inject and sendmail: messages/s from a shell loop, one new process per message.

usage: python bench/inject.py [N] [SIZE]

Creates a fresh single-user home with `qmail init --single-user`, then runs
N sequential injections of a SIZE-byte message (default 1000 of 4096) from
/bin/sh, each a new process as a mail program would start it:
`qmail-inject rcpt`, `sendmail -t -i -f sender`, and, for comparison, the
bare interpreter start `python -IS -c pass` and `qmail-inject -n` (the header
work without queueing). Prints messages/s for each and
checks that every message reached the queue.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import fresh_home  # noqa: E402


def message(size: int) -> bytes:
    """Return a SIZE-byte message with a typical header."""
    head = (b"From: Bench Sender <sender@bench.example>\nTo: Bench Recipient <rcpt@bench.example>\n"
            b"Subject: bench\nDate: 1 Jan 2000 00:00:00 -0000\nMessage-ID: <bench@bench.example>\n\n")
    body = (b"x" * 75 + b"\n") * (size // 76 + 1)
    return (head + body)[:size - 1] + b"\n"


def loop(command: str, n: int, msgfile: str) -> float:
    """Run command n times from one shell with msgfile on stdin; return the seconds taken."""
    script = f'i=0; while [ $i -lt {n} ]; do {command} <"{msgfile}" || exit 1; i=$((i+1)); done'
    start = time.perf_counter()
    subprocess.run(["/bin/sh", "-c", script], check=True, env={"PATH": "/usr/bin:/bin", "USER": "bench"})
    return time.perf_counter() - start


def queued(home: str) -> int:
    return len(os.listdir(os.path.join(home, "queue", "todo")))


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
    home = fresh_home()
    bindir = os.path.join(home, "bin")
    with tempfile.NamedTemporaryFile(prefix="pyqmail-bench-msg-") as f:
        f.write(message(size))
        f.flush()
        base = loop(f"{sys.executable} -IS -c pass", n, f.name)
        print(f"python -IS -c pass:        {n / base:7.1f} starts/s    ({base / n * 1000:.2f} ms each)")
        took = loop(f"{bindir}/qmail-inject -n rcpt@bench.example >/dev/null", n, f.name)
        print(f"qmail-inject -n (no queue): {n / took:6.1f} messages/s  ({took / n * 1000:.2f} ms each, "
              f"{(took - base) / n * 1000:.2f} ms above the interpreter start)")
        for label, command in (("qmail-inject rcpt", f"{bindir}/qmail-inject rcpt@bench.example"),
                               ("sendmail -t -i -f sender", f"{bindir}/sendmail -t -i -f sender@bench.example")):
            before = queued(home)
            took = loop(command, n, f.name)
            got = queued(home) - before
            assert got == n, f"{label}: {got} of {n} messages queued"
            print(f"{label + ':':26} {n / took:7.1f} messages/s  ({took / n * 1000:.2f} ms each, "
                  f"{(took - base) / n * 1000:.2f} ms above the interpreter start)")


if __name__ == "__main__":
    main()
