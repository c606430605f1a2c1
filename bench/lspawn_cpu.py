"""CPU of a local queue drain: qmail-send, qmail-lspawn, qmail-local (and workers), per message.

usage: python bench/lspawn_cpu.py [N] [--rounds R]

bench/drain.py's set-up (single-user home, N messages of 4 KB, concurrencylocal 10), drained
once with qmail-lspawn's per-user workers off ($PYQMAIL_LSPAWN_WORKERS=0: a child per
delivery) and once on, R rounds alternated. This process is a child subreaper, so the
workers that outlive qmail-lspawn are reaped here and their CPU is counted:
getrusage(RUSAGE_CHILDREN) user+system before and after each drain, per message; the
messages/s and the load average are printed with it. Run as root it drops to pqtest.

Then the same without qmail-send: qmail-lspawn alone, fed the N deliveries by this
process (10 at a time, as qmail-send would), into the Maildir and to a .qmail holding
only a comment (qmail-local's process cost without the Maildir's writes and fsyncs):
CPU of qmail-lspawn's whole tree per delivery.

--miss: the direct runs only, with users/cdb removed, so that every delivery's user is
found by qmail-getpw's rules (no passwd user "bench": the alias user, whose
alias/.qmail-bench names the same Maildir or holds the comment).
"""

from __future__ import annotations

import ctypes
import resource
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(__file__))

import drain  # noqa: E402

from pyqmail.send import spawnproto  # noqa: E402

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


def direct(n: int, workers: str, what: str, concurrency: int = 10, miss: bool = False) -> float:
    """Run n deliveries through qmail-lspawn alone (what: "maildir" or "comment"); return ms CPU per delivery.

    miss: no users/cdb, the user found by qmail-getpw's rules (the alias user's .qmail-bench).
    """
    import subprocess

    home, maildir = drain.setup(10)
    dotqmail = os.path.join(os.path.dirname(maildir), ".qmail")
    if miss:
        os.unlink(os.path.join(home, "users", "cdb"))
        dotqmail = os.path.join(home, "alias", ".qmail-bench")
    if what == "comment" or miss:
        with open(dotqmail, "w") as f:
            f.write("#\n" if what == "comment" else maildir + "/\n")
        os.chmod(dotqmail, 0o644)
    drain.fill(home, n, 4096)
    mess = os.path.join(home, "queue", "mess")
    ids = [f"{d}/{m}".encode() for d in os.listdir(mess) for m in os.listdir(os.path.join(mess, d))]
    env = {"PATH": "/usr/bin:/bin", "PYQMAIL_LSPAWN_WORKERS": workers}
    before = cpu()
    p = subprocess.Popen([os.path.join(home, "bin", "qmail-lspawn"), "./Maildir/"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, env=env)
    assert p.stdin is not None and p.stdout is not None
    p.stdout.read(1)
    reports = spawnproto.ReportReader()
    free = list(range(concurrency))
    pending = list(ids)
    done = 0
    while done < len(ids):
        while free and pending:
            p.stdin.write(spawnproto.command(free.pop(), pending.pop(), b"s@x", b"bench@" + drain.FQDN.encode()))
        p.stdin.flush()
        for slot, report in reports.feed(os.read(p.stdout.fileno(), 65536)):
            assert report.startswith(b"K"), report
            free.append(slot)
            done += 1
    p.stdin.close()
    p.wait()
    p.stdout.close()
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    used = cpu() - before
    shutil.rmtree(os.path.dirname(home), ignore_errors=True)
    return used / n * 1000


def main() -> None:
    args = sys.argv[1:]
    rounds = 3
    if "--rounds" in args:
        i = args.index("--rounds")
        rounds = int(args[i + 1])
        del args[i:i + 2]
    miss = "--miss" in args
    if miss:
        args.remove("--miss")
    n = int(args[0]) if args else 300
    if os.geteuid() == 0:
        drain.as_user("pqtest")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    for r in range(0 if miss else rounds):
        for workers in ("0", "10"):
            ms, rate = one(n, workers)
            print(f"round {r + 1} workers={workers:>2}: {ms:5.2f} ms CPU per message, {rate:4.0f} msgs/s, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    for what in ("maildir", "comment"):
        for r in range(rounds):
            for workers in ("0", "10"):
                ms = direct(n, workers, what, miss=miss)
                print(f"qmail-lspawn alone{' (users/cdb miss)' if miss else ''}, {what:7}, round {r + 1} workers={workers:>2}: {ms:5.2f} ms CPU per delivery, "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
