"""qmail-queued: sequential local injections through its socket, and its CPU per message.

usage: python bench/queued.py [N] [SIZE]   (as root)

Creates a fresh root-mode home (`qmail init`), starts its qmail-queued as root
(it becomes qmailq) without qmail-send, and runs N sequential `qmail-inject
rcpt` of a SIZE-byte message (default 200 of 4096) from /bin/sh as the tests'
ordinary user pqtest, each a new process that hands its message to
qmail-queued. Prints messages/s, qmail-queued's CPU per message (its own and
its children's: user + system from /proc, workers still alive included) and
how many processes it forked meanwhile (its children's pids, seen every
millisecond; a child that lived less than that may be missed), and checks
that every message reached the queue. The pyqmail measured is the one the
interpreter imports: PYTHONPATH=OTHER/src measures another tree.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))

from inject import message  # noqa: E402

BIN = os.path.dirname(sys.executable)
USER = "pqtest"
TICK = os.sysconf("SC_CLK_TCK")


def cpu(pid: int) -> float:
    """Return pid's CPU seconds: its own and its reaped children's, user and system."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()
    return sum(int(x) for x in fields[11:15]) / TICK


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def tree_cpu(pid: int) -> float:
    total = cpu(pid)
    for child in children(pid):
        try:
            total += cpu(child)
        except OSError:
            pass  # ended meanwhile: counted in the parent's reaped children once reaped
    return total


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("bench/queued.py: run as root (a root-mode home, injections as pqtest)")
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
    base = tempfile.mkdtemp(prefix="pyqmail-bench-")
    os.chmod(base, 0o755)
    home = os.path.join(base, "qmail")
    subprocess.run([os.path.join(BIN, "qmail"), "init", "--home", home, "bench.example.com"], check=True,
                   stdout=subprocess.DEVNULL)
    sock = os.path.join(home, "run", "qmail-queue.sock")
    server = subprocess.Popen([os.path.join(home, "bin", "qmail-queued")], env={"PATH": "/usr/bin:/bin"},
                              stdin=subprocess.DEVNULL)
    try:
        while not os.path.exists(sock):
            assert server.poll() is None, "qmail-queued ended"
            time.sleep(0.01)
        time.sleep(0.5)
        pw = pwd.getpwnam(USER)
        with tempfile.NamedTemporaryFile(prefix="pyqmail-bench-msg-", dir=base) as f:
            f.write(message(size))
            f.flush()
            os.chmod(f.name, 0o644)
            seen: set[int] = set(children(server.pid))
            before = set(seen)
            stop = threading.Event()

            def watch() -> None:
                while not stop.is_set():
                    seen.update(children(server.pid))
                    time.sleep(0.001)

            t = threading.Thread(target=watch)
            t.start()
            script = (f'i=0; while [ $i -lt {n} ]; do {home}/bin/qmail-inject rcpt@bench.example <"{f.name}" '
                      f'|| exit 1; i=$((i+1)); done')
            c0 = tree_cpu(server.pid)
            start = time.perf_counter()
            subprocess.run(["/bin/sh", "-c", script], check=True, user=pw.pw_uid, group=pw.pw_gid,
                           extra_groups=[], env={"PATH": "/usr/bin:/bin", "USER": USER})
            took = time.perf_counter() - start
            time.sleep(0.05)  # the last worker's DONE, the last child's exit
            c1 = tree_cpu(server.pid)
            stop.set()
            t.join()
        todo = len(os.listdir(os.path.join(home, "queue", "todo")))
        assert todo == n, f"{todo} of {n} queued"
        forked = len(seen - before)
        print(f"{n} sequential qmail-inject as {USER}: {n / took:.1f} messages/s ({took / n * 1000:.2f} ms each); "
              f"qmail-queued {(c1 - c0) / n * 1000:.2f} ms CPU per message; {forked} processes forked "
              f"({forked / n:.3f} per message)")
    finally:
        server.terminate()
        server.wait(30)
        subprocess.run(["rm", "-rf", base], check=False)


if __name__ == "__main__":
    main()
