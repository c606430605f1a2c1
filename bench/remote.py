"""Remote delivery speed: qmail-send, qmail-rspawn and qmail-remote feeding Postfix's smtp-sink.

usage: python bench/remote.py [N] [SIZE] [--user NAME] [--repeat R] [--concurrency C]

A fresh single-user home is filled with N messages (default 1000) of SIZE
bytes (default 4096) for a remote domain, one qmail-queue each; then
control/smtproutes sends every remote domain to smtp-sink (Debian's postfix
package, /usr/sbin/smtp-sink) on 127.0.0.1, control/concurrencyremote is C
(default 20), qmail-start is started, and the time until the log's N-th
"end msg" line is measured; delivered messages/s is printed (best and median
of R runs, default 3). Deliveries never run as root, so run as root the
bench drops to --user (default: pqtest).
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import common  # noqa: E402
from common import fresh_home  # noqa: E402
from drain import as_user  # noqa: E402

from pyqmail import spawn  # noqa: E402

SMTP_SINK = "/usr/sbin/smtp-sink"
RECIPIENT = b"sink@far.example"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_sink() -> tuple[subprocess.Popen[bytes], int]:
    """Start smtp-sink on 127.0.0.1 and wait until it accepts; return it and its port."""
    port = free_port()
    # 100: the listen backlog; smtp-sink serves every session in one process.
    proc = subprocess.Popen([SMTP_SINK, "-4", f"127.0.0.1:{port}", "100"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                c.recv(100)
            return proc, port
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


def setup(port: int, concurrency: int) -> str:
    home = fresh_home()
    with open(os.path.join(home, "control", "smtproutes"), "w") as f:
        f.write(f":[127.0.0.1]:{port}\n")
    with open(os.path.join(home, "control", "concurrencyremote"), "w") as f:
        f.write(f"{concurrency}\n")
    return home


def fill(home: str, n: int, size: int) -> None:
    """Queue n messages of size bytes to RECIPIENT, one qmail-queue each."""
    body = ((b"Subject: remote\n\n" + b"x" * 75 + b"\n") * (size // 92 + 1))[:size - 1] + b"\n"
    envelope = b"Fsender@bench.example.com\0T" + RECIPIENT + b"\0\0"
    common.queue_messages(home, n, body, envelope)


def deliver(home: str, n: int) -> tuple[float, int]:
    """Start qmail-start, wait for n 'end msg' lines, stop it; return (seconds, successes)."""
    ok = 0

    def line(text: bytes) -> None:
        nonlocal ok
        if b": success: " in text:
            ok += 1
        elif text.startswith(b"delivery "):  # say why, if anything but success happens
            print(text.decode("latin-1"), file=sys.stderr)

    env = {"PATH": f"{home}/bin:/usr/bin:/bin", "DNSCACHEIP": "127.0.0.1:9"}
    elapsed = common.run_send_until(home, n, env, line)
    return elapsed, ok


def main() -> None:
    args = sys.argv[1:]
    opts = {"--user": "pqtest", "--repeat": "3", "--concurrency": "20"}
    for name in list(opts):
        if name in args:
            i = args.index(name)
            opts[name] = args[i + 1]
            del args[i:i + 2]
    n = int(args[0]) if args else 1000
    size = int(args[1]) if len(args) > 1 else 4096
    repeat, concurrency = int(opts["--repeat"]), int(opts["--concurrency"])
    if not os.path.exists(SMTP_SINK):
        sys.exit(f"{SMTP_SINK} missing: install Debian's postfix (unconfigured)")
    if os.geteuid() == 0:
        as_user(opts["--user"])
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"remote: {n} messages of {size} bytes to smtp-sink on 127.0.0.1, concurrencyremote "
          f"{concurrency}, {os.cpu_count()} CPUs, load {load}", flush=True)
    sink, port = start_sink()
    rates = []
    try:
        for _ in range(repeat):
            home = setup(port, concurrency)
            fill(home, n, size)
            elapsed, ok = deliver(home, n)
            assert ok == n, f"{ok} of {n} messages delivered"
            rates.append(n / elapsed)
            shutil.rmtree(os.path.dirname(home), ignore_errors=True)
            print(f"  run: {n / elapsed:.0f} messages/s ({elapsed:.2f} s)", flush=True)
    finally:
        sink.terminate()
        sink.wait()
    print(f"concurrencyremote {concurrency}: best {max(rates):.0f} delivered messages/s, "
          f"median {statistics.median(rates):.0f} (n={repeat})")


if __name__ == "__main__":
    main()
