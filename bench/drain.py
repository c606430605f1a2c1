"""Draining the queue: qmail-send, qmail-lspawn and qmail-local delivering to one Maildir.

usage: python bench/drain.py [N] [SIZE] [--user NAME] [--repeat R]

For each concurrencylocal in 1, 10 and 50: a fresh single-user home is
filled with N messages (default 500) of SIZE bytes (default 4096) through
qmail-queue, then qmail-start is started and the time until all N are in
Maildir/new (the log's N-th "end msg") is measured; messages/s is printed
(best and median of R runs, default 3: the figures move with the machine's
load, which is printed too).
A last, separate run counts the fsync calls of every process of the
delivery side (qmail-send, qmail-lspawn, qmail-local and their children)
by wrapping os.fsync before qmail-start is forked, and prints fsyncs per
message. Deliveries never run as root, so run as root the bench drops to
--user (default: pqtest, the tests' ordinary user).
"""

from __future__ import annotations

import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

import common  # noqa: E402
from common import BIN  # noqa: E402

from pyqmail import spawn  # noqa: E402

FQDN = "bench.example.com"


def fresh_home(base: str) -> str:
    home = os.path.join(base, "qmail")
    subprocess.run([os.path.join(BIN, "qmail"), "init", "--single-user", "--home", home, FQDN],
                   check=True, stdout=subprocess.DEVNULL)
    return home


def setup(concurrency: int) -> tuple[str, str]:
    """Make a home and a user directory with a Maildir; return (home, maildir)."""
    base = tempfile.mkdtemp(prefix="pyqmail-drain-")
    os.chmod(base, 0o755)
    home = fresh_home(base)
    user_home = os.path.join(base, "user")
    maildir = os.path.join(user_home, "Maildir")
    for d in (user_home, maildir, *(os.path.join(maildir, s) for s in ("tmp", "new", "cur"))):
        os.mkdir(d, 0o755 if d == user_home else 0o700)
    pw = pwd.getpwuid(os.getuid())
    with open(os.path.join(home, "users", "assign"), "w") as f:
        f.write(f"=bench:{pw.pw_name}:{pw.pw_uid}:{pw.pw_gid}:{user_home}:::\n.\n")
    assert spawn.run(os.path.join(home, "bin", "qmail-newu"), ["qmail-newu"]) == 0
    with open(os.path.join(home, "control", "concurrencylocal"), "w") as f:
        f.write(f"{concurrency}\n")
    return home, maildir


def fill(home: str, n: int, size: int) -> None:
    """Queue n messages of size bytes to bench@FQDN, one qmail-queue each (fork fast path)."""
    body = (b"Subject: drain\n\n" + b"x" * 75 + b"\n") * (size // 92 + 1)
    body = body[:size]
    envelope = b"Fsender@elsewhere.example\0Tbench@" + FQDN.encode() + b"\0\0"
    common.queue_messages(home, n, body, envelope)


def drain(home: str, maildir: str, n: int) -> float:
    """Start qmail-start, wait for n 'end msg' lines, stop it; return the seconds taken."""
    elapsed = common.run_send_until(home, n, {"PATH": f"{home}/bin:/usr/bin:/bin"})
    got = len(os.listdir(os.path.join(maildir, "new")))
    assert got == n, f"{got} of {n} messages delivered"
    return elapsed


def count_fsyncs(n: int, size: int) -> float:
    """Return the fsync calls per message of the delivery side (qmail-send and below)."""
    home, maildir = setup(10)
    fill(home, n, size)
    counter = os.path.join(os.path.dirname(home), "fsyncs")
    open(counter, "wb").close()
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        c = os.open(counter, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(c, b".")
        finally:
            os.close(c)
        real_fsync(fd)

    os.fsync = counting_fsync  # type: ignore[assignment]
    try:
        drain(home, maildir, n)
    finally:
        os.fsync = real_fsync  # type: ignore[assignment]
    count = os.path.getsize(counter)
    shutil.rmtree(os.path.dirname(home), ignore_errors=True)
    return count / n


def as_user(name: str) -> None:
    """Become user name (for a run as root: deliveries never run as root)."""
    pw = pwd.getpwnam(name)
    os.setgroups([pw.pw_gid])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    os.environ["HOME"] = pw.pw_dir
    os.chdir("/")


def main() -> None:
    args = sys.argv[1:]
    user = "pqtest"
    repeat = 3
    if "--user" in args:
        i = args.index("--user")
        user = args[i + 1]
        del args[i:i + 2]
    if "--repeat" in args:
        i = args.index("--repeat")
        repeat = int(args[i + 1])
        del args[i:i + 2]
    n = int(args[0]) if args else 500
    size = int(args[1]) if len(args) > 1 else 4096
    if os.geteuid() == 0:
        as_user(user)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"drain: {n} messages of {size} bytes, one local Maildir, {os.cpu_count()} CPUs, load {load}")
    for concurrency in (1, 10, 50):
        rates = []
        for _ in range(repeat):
            home, maildir = setup(concurrency)
            fill(home, n, size)
            rates.append(n / drain(home, maildir, n))
            shutil.rmtree(os.path.dirname(home), ignore_errors=True)
        print(f"concurrencylocal {concurrency:>2}: best {max(rates):4.0f} messages/s, "
              f"median {statistics.median(rates):4.0f} (n={repeat})", flush=True)
    print(f"fsyncs per message (qmail-send, qmail-lspawn, qmail-local): {count_fsyncs(min(n, 200), size):.1f}")


if __name__ == "__main__":
    main()
