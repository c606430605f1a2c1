"""SMTP -> Maildir in root mode, counted: fsyncs and processes per message (strace -f -c).

usage: python bench/pathcount.py [N] [K] [--no-strace] [--user NAME]

As root: `qmail up` of a fresh root-mode home (send, queued and smtpd services under
svscan, as an administrator runs them) is started; once it is up and settled, every
process of its session is attached by `strace -f -c -e trace=...` (so start-up is
not counted, and children are followed), N messages of 4 KB (default 400) are sent over K parallel SMTP sessions (default 10,
one connection per message) to NAME@ the home's name (default pqtest, the tests'
ordinary user: a passwd user, so qmail-lspawn's getpw lookup is on the path), and
once all N are in NAME's Maildir/new (found by a tag in the subject) the system is
stopped with `qmail down` and strace's summary is read. Prints per message: fsync and
fdatasync calls, processes created (clone/fork/vfork, threads excluded: no daemon
uses threads), execve calls, and the messages/s of the run (slowed by strace: the
counts are what this bench is for; --no-strace gives a wall figure, still noisy).
--paths: fsyncs by path and processes by parent instead of totals. --perf: the
totals from perf's in-kernel counters (fsync, fdatasync, forks) instead of strace,
which slows the daemons so much that group commit hardly batches.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

BIN = os.path.dirname(sys.executable)
SIZE = 4096
PERF_EVENTS = "syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync,sched:sched_process_fork"
TRACED = "fsync,fdatasync,sync_file_range,syncfs,sync,clone,clone3,fork,vfork,execve"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as c:
        return c.connect_ex(("127.0.0.1", port)) == 0


def wait_for(pred, timeout: float = 60.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def user_maildir(user: str) -> str:
    pw = pwd.getpwnam(user)
    top = os.path.join(pw.pw_dir, "Maildir")
    for d in (pw.pw_dir, top, *(os.path.join(top, s) for s in ("tmp", "new", "cur"))):
        if not os.path.isdir(d):
            os.mkdir(d, 0o700)
            os.chown(d, pw.pw_uid, pw.pw_gid)
    return top


class Counter:
    """Counts the files of maildir/new holding tag that appeared after it was made."""

    def __init__(self, maildir: str, tag: bytes) -> None:
        self.new = os.path.join(maildir, "new")
        self.seen = set(os.listdir(self.new))
        self.tag = tag
        self.mine: list[str] = []

    def count(self) -> int:
        for name in os.listdir(self.new):
            if name in self.seen:
                continue
            self.seen.add(name)
            try:
                with open(os.path.join(self.new, name), "rb") as f:
                    if self.tag in f.read(2048):
                        self.mine.append(name)
            except FileNotFoundError:
                pass  # another reader moved it to cur/: not one of ours
        return len(self.mine)

    def remove(self) -> None:
        for name in self.mine:
            os.unlink(os.path.join(self.new, name))


def send_all(port: int, rcpt: str, n: int, k: int, tag: str) -> None:
    body = f"Subject: {tag}\r\n\r\n" + ("x" * 75 + "\r\n") * (SIZE // 77)
    lock = threading.Lock()
    left = [n]
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=120) as s:
                    assert s.sendmail("bench@example.org", [rcpt], body) == {}
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    threads = [threading.Thread(target=worker) for _ in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def tree_pids(root: int) -> list[int]:
    """Return root and the pids of all its descendants."""
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(name)] = int(fields[1])
    tree = [root]
    for pid in tree:
        tree.extend(p for p, pp in parent.items() if pp == pid)
    return tree


def summary(path: str) -> dict[str, int]:
    """Return the calls column of strace -c's table by syscall name."""
    calls: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
            if m:
                calls[m.group(2)] = int(m.group(1))
    return calls


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 400
    k = int(args[1]) if len(args) > 1 else 10
    user = sys.argv[sys.argv.index("--user") + 1] if "--user" in sys.argv else "pqtest"
    use_strace = "--no-strace" not in sys.argv
    if os.geteuid() != 0:
        sys.exit("pathcount: run as root (a root-mode home, delivery as a passwd user)")
    base = tempfile.mkdtemp(prefix="pyqmail-pathcount-")
    os.chmod(base, 0o755)
    home = os.path.join(base, "qmail")
    port = free_port()
    out = os.path.join(base, "strace.out")
    cmd = [os.path.join(BIN, "qmail"), "up", "--home", home, "--smtp-port", str(port), "--pop3-port", "0",
           "--qmtp-port", "0", "--submission-port", "0", "--smtps-port", "0", "--pop3s-port", "0"]
    env = {"PATH": "/usr/bin:/bin"}
    maildir = user_maildir(user)
    up = subprocess.Popen(cmd, env=env, cwd=base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True)
    counter = None
    tracer = None
    start_names: dict[str, str] = {}
    try:
        assert up.stdout is not None
        for line in up.stdout:
            if b"stop with" in line:
                break
        assert wait_for(lambda: port_open(port), 120), "smtpd did not come up"
        assert wait_for(lambda: os.path.exists(os.path.join(home, "run", "qmail-queue.sock")), 120)
        time.sleep(1.0)  # let the daemons settle: their start-up is not per message
        me = open(os.path.join(home, "control", "me")).read().strip()
        tag = f"pathcount-{uuid.uuid4()}"
        counter = Counter(maildir, tag.encode())
        if use_strace:
            pids = tree_pids(up.pid)
            for pid in pids:
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        start_names[str(pid)] = f.read().strip()
                except OSError:
                    pass
            print(f"tracing {len(pids)} processes", flush=True)
            how = ["-y"] if "--paths" in sys.argv else ["-c"]
            traced = TRACED + ",prctl" if "--paths" in sys.argv else TRACED
            if "--perf" in sys.argv:
                # In-kernel counters: far less slowdown than strace, so batching shows as under load.
                tracer = subprocess.Popen(["perf", "stat", "-x", ",", "-o", out, "-e", PERF_EVENTS,
                                           "-p", ",".join(map(str, pids))])
            else:
                tracer = subprocess.Popen(["strace", "-f", "-qq", *how, "-o", out, "-e", f"trace={traced}",
                                           *(a for p in pids for a in ("-p", str(p)))])
            time.sleep(2.0)  # attaching is asynchronous
        start = time.perf_counter()
        send_all(port, f"{user}@{me}", n, k, tag)
        assert wait_for(lambda: counter.count() >= n, 600), f"{counter.count()} of {n} delivered"
        took = time.perf_counter() - start
        if tracer is not None:
            tracer.send_signal(2)
            tracer.wait(timeout=60)
    finally:
        if tracer is not None and tracer.poll() is None:
            tracer.kill()
            tracer.wait()
        subprocess.run([os.path.join(BIN, "qmail"), "down", "--home", home], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
        try:
            up.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, 9)
            up.wait()
        if counter is not None:
            counter.remove()
    print(f"{n} messages over {k} sessions, root mode: {n / took:.1f} messages/s"
          f"{' (under strace)' if use_strace else ''}")
    if use_strace and "--perf" in sys.argv:
        counts = {}
        with open(out) as f:
            for line in f:
                fields = line.strip().split(",")
                if len(fields) > 2 and fields[0].isdigit():
                    counts[fields[2]] = int(fields[0])
        syncs = counts.get("syscalls:sys_enter_fsync", 0) + counts.get("syscalls:sys_enter_fdatasync", 0)
        print(f"perf: {counts}")
        print(f"per message: fsync {syncs / n:.2f}, processes {counts.get('sched:sched_process_fork', 0) / n:.2f}")
    elif use_strace and "--paths" in sys.argv:
        by_path: dict[str, int] = {}
        with open(out) as f:
            for line in f:
                m = re.search(r"(fsync|fdatasync)\(\d+<([^>]*)>", line)
                if m:
                    key = re.sub(r"\d+", "N", m.group(2).replace(home, "HOME"))
                    by_path[key] = by_path.get(key, 0) + 1
        for key, count in sorted(by_path.items(), key=lambda kv: -kv[1]):
            print(f"{count / n:6.2f} per message  {key}")
        # Processes by the name of their parent (its last prctl PR_SET_NAME: setproctitle).
        names = dict(start_names)
        parents: list[str] = []
        with open(out) as f:
            for line in f:
                pid = line.split(None, 1)[0]
                m = re.search(r'PR_SET_NAME, "([^"]*)"', line)
                if m:
                    names[pid] = m.group(1)
                if re.search(r"(clone3?|v?fork)(\(| resumed>).*= \d+$", line):
                    parents.append(pid)
        forks: dict[str, int] = {}
        for pid in parents:
            forks[names.get(pid, "?")] = forks.get(names.get(pid, "?"), 0) + 1
        for key, count in sorted(forks.items(), key=lambda kv: -kv[1]):
            print(f"{count / n:6.2f} processes per message forked by {key}")
    elif use_strace:
        calls = summary(out)
        syncs = sum(calls.get(c, 0) for c in ("fsync", "fdatasync", "sync_file_range", "syncfs", "sync"))
        procs = sum(calls.get(c, 0) for c in ("clone", "clone3", "fork", "vfork"))
        print(f"whole run: {calls}")
        print(f"per message: fsync {syncs / n:.2f}, processes {procs / n:.2f}, execve {calls.get('execve', 0) / n:.2f}")
    if "--keep" in sys.argv:
        print(base)
    else:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
