"""Side by side: pyqmail in root mode, Postfix, and C qmail, measured the same way (issue 17.5).

usage (as root): .venv/bin/python bench/compare.py [--quick] [--rounds R] [--systems LIST]
                 [--cqmail DIR] [--json FILE] [--keep]

Each system is installed and configured by the bench in a fresh directory under /tmp and
started on free 127.0.0.1 ports (never 25), its processes in a cgroup of their own
(bench/mta.py):

- pyqmail: `qmail init --home TMP bench.example.com`, run by `qmail up` (svscan, qmail-send,
  qmail-queued, qmail-rcptcheckd, tcpserver + qmail-smtpd as qmaild, exactly as it starts them);
- Postfix: Debian's package in a private instance (own config_directory, queue_directory and
  data_directory, inet_interfaces 127.0.0.1, master.cf without chroot, STARTTLS offered),
  local(8) delivering into a Maildir as pqtest;
- C qmail, only with --cqmail DIR: an installed qmail whose control files (me, locals,
  rcpthosts, defaultdomain, plusdomain, smtproutes) and users/assign the bench overwrites,
  run as its rc and run files would: `qmail-start ./Maildir/` and ucspi-tcp's
  `tcpserver -v -R -H -l FQDN -c 40 -u qmaild -g nofiles` (-H: see bench/mta.py).

Mail for the local recipient goes to a Maildir the bench made, delivered as the ordinary user
pqtest (qmail: users/assign, so the user's home is the bench's directory; Postfix:
mail_spool_directory ending in "/"). Mail for far.example goes to Postfix's smtp-sink on
127.0.0.1 (smtproutes; Postfix's relayhost).

The figures, one row each (issue 17's table):

- SMTP end to end: N messages (default 2000) of 4 KB sent by smtp-source (Debian's postfix
  package; a Python smtplib client when it is missing) over 10 parallel sessions, one
  connection per message; msgs/s from the first connection until the N-th file is in
  Maildir/new.
- CPU ms per SMTP message: the whole system's CPU over that run (from the first connection
  until the queue is empty again), from the cgroup (or /proc: the table says which), divided
  by N. The client (smtp-source) is outside the cgroup and not counted.
- fsyncs and processes per message: one more SMTP run (200 messages) with `strace -f` attached
  to every process of the system (`-p` for each pid of its cgroup), counting fsync, fdatasync,
  syncfs and sync_file_range calls, and process creations (fork, vfork, clone and clone3
  without CLONE_THREAD), divided by the messages; and the mean time of one sync call (strace
  -T), which says how much the disk (and everything else writing to it) made the system wait.
  strace slows the system: no rate is taken from this run. Once per system, not per round
  (the counts barely move).
- latency connect -> Maildir/new, p50/p90: 200 messages (4 KB) sent one at a time by smtplib;
  from just before connect() until inotify reports the file in Maildir/new. An unloaded
  system's latency.
- 1000 sequential injections: `qmail-inject RCPT` and `sendmail -t -i -f SENDER` (Postfix:
  its sendmail, postdrop) started by /bin/sh one after another, as root, message on stdin;
  msgs/s over the loop (the system delivers meanwhile); every message must then arrive.
- local queue drain: delivery held (pyqmail: svc -d send; C qmail: qmail-send stopped;
  Postfix: master.cf without qmgr, postfix reload), N messages (1000) queued (qmail-queue;
  Postfix: smtp-source), delivery released; msgs/s until the N-th file is in Maildir/new.
- remote queue drain: the same for far.example, to smtp-sink; until the queue is empty.
- PSS per idle SMTP connection: 20 connections opened and their greetings read; the
  processes holding the server side of those sockets (found through /proc/net/tcp and
  /proc/PID/fd) are read in /proc/PID/smaps_rollup; their PSS summed, divided by 20.

Every measurement runs R rounds (default 3), the systems alternating within a round and their
order rotating from round to round; the table shows the median and min-max of the rounds.
--quick: small counts and one round, for the test that keeps the script working
(tests/test_bench_compare.py). Every wait is bounded in time. The machine is shared: the
load average is printed before and after; figures taken under load are noisy.

Building a C qmail to compare with (notqmail, https://github.com/notqmail/notqmail), as root,
outside this repository; it needs qmail's users and groups (alias qmaild qmaill qmailp
qmailq qmailr qmails; qmail nofiles), as INSTALL.ids describes:

    git clone https://github.com/notqmail/notqmail /tmp/nq && cd /tmp/nq
    echo /tmp/cqmail > conf-qmail          # its home; the bench writes its control files
    make && make setup check
    .venv/bin/python bench/compare.py --cqmail /tmp/cqmail

ucspi-tcp's tcpserver must be installed (Debian: ucspi-tcp).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import select
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # imported by the test: appended, so bench/queue.py never hides the stdlib's
    sys.path.append(HERE)

import mta  # noqa: E402
from mta import REMOTE_RCPT, SENDER, BenchError, Mta, wait_until  # noqa: E402

SIZE = 4096
SESSIONS = 10
FULL = {"smtp": 2000, "strace": 200, "latency": 200, "inject": 1000, "local": 1000, "remote": 1000, "idle": 20}
QUICK = {"smtp": 100, "strace": 20, "latency": 10, "inject": 20, "local": 50, "remote": 50, "idle": 5}


def body(size: int = SIZE) -> bytes:
    """A message of size bytes with a typical header (LF line ends: the qmail-queue/inject form)."""
    head = (f"From: Bench <{SENDER}>\nTo: <bench@{mta.FQDN}>\nSubject: bench\n"
            "Date: 1 Jan 2000 00:00:00 -0000\nMessage-ID: <bench@bench.client>\n\n").encode()
    return (head + (b"x" * 75 + b"\n") * (size // 76 + 1))[:size - 1] + b"\n"


def clear(maildir: str) -> None:
    for sub in ("new", "cur", "tmp"):
        d = os.path.join(maildir, sub)
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))


def in_new(maildir: str) -> int:
    return len(os.listdir(os.path.join(maildir, "new")))


def wait_delivered(m: Mta, n: int, what: str) -> None:
    wait_until(lambda: in_new(m.maildir) >= n, 120 + n / 2, f"{m.name}: {n} messages in Maildir/new ({what})")


def wait_empty(m: Mta, what: str) -> None:
    wait_until(lambda: m.queued() == 0, 120, f"{m.name}: an empty queue ({what})")


# --- SMTP load ---------------------------------------------------------------------------------

def smtp_load(port: int, n: int, sessions: int, rcpt: str) -> None:
    """Send n messages of SIZE bytes to rcpt over sessions parallel sessions, one connection each."""
    if shutil.which("smtp-source"):
        # -l is the payload after smtp-source's own few header lines.
        p = subprocess.run(["smtp-source", "-4", "-s", str(sessions), "-m", str(n), "-l", str(SIZE),
                            "-M", "bench.client", "-f", SENDER, "-t", rcpt, f"127.0.0.1:{port}"],
                           capture_output=True, timeout=120 + n)
        if p.returncode != 0:
            raise BenchError(f"smtp-source exited {p.returncode}: {p.stderr.decode(errors='replace')[-500:]}")
        return
    msg = body().replace(b"\n", b"\r\n")
    errors: list[str] = []

    def client(todo: int) -> None:
        for _ in range(todo):
            try:
                with smtplib.SMTP("127.0.0.1", port, local_hostname="bench.client", timeout=60) as s:
                    s.sendmail(SENDER, [rcpt], msg)
            except (OSError, smtplib.SMTPException) as e:
                errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(n // sessions + (i < n % sessions),)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120 + n)
    if errors:
        raise BenchError(f"{len(errors)} SMTP errors: {errors[0]}")


def measure_smtp(m: Mta, n: int) -> dict[str, float]:
    """SMTP end to end into Maildir: msgs/s, and the whole system's CPU ms per message."""
    clear(m.maildir)
    cpu0 = m.acct.cpu_ns()
    t0 = time.monotonic()
    smtp_load(m.smtp_port, n, SESSIONS, m.rcpt)
    wait_until(lambda: in_new(m.maildir) >= n, 120 + n / 2, f"{m.name}: {n} messages in Maildir/new",
               poll=0.005)
    t1 = time.monotonic()
    wait_empty(m, "after the SMTP run")
    cpu = m.acct.cpu_ns() - cpu0
    return {"smtp_rate": n / (t1 - t0), "cpu_ms": cpu / n / 1e6}


# --- strace ------------------------------------------------------------------------------------

SYNCS = ("fsync", "fdatasync", "syncfs", "sync_file_range")
FORKS = ("fork", "vfork", "clone", "clone3")
CALL = re.compile(r"^(\d+)\s+(\w+)\((.*)")
RESUMED = re.compile(r"^\d+\s+<\.\.\. (\w+) resumed>")
SPENT = re.compile(r"<(\d+\.\d+)>\s*$")  # strace -T: the time spent in the call


def count_calls(trace: str) -> tuple[int, int, float]:
    """Return (sync calls, process creations, seconds spent in sync calls) in an `strace -f -T -o` file."""
    syncs = procs = 0
    spent = 0.0
    with open(trace, errors="replace") as f:
        for line in f:
            match = CALL.match(line)  # the start of a call ("<... resumed>" lines never match)
            name = match.group(2) if match else None
            if name is None:
                resumed = RESUMED.match(line)
                name = resumed.group(1) if resumed else None
                if name is None:
                    continue
            elif name in SYNCS:
                syncs += 1
            elif name in FORKS and "CLONE_THREAD" not in line:
                procs += 1
            took = SPENT.search(line)
            if name in SYNCS and took:
                spent += float(took.group(1))
    return syncs, procs, spent


def quiet_pids(m: Mta) -> list[int]:
    """Return the system's pids once the same set was read three times 0.2 s apart (10 s at most)."""
    last: list[int] = []
    same = 0
    deadline = time.monotonic() + 10
    while same < 3 and time.monotonic() < deadline:
        pids = sorted(m.acct.pids())
        same = same + 1 if pids == last else 1
        last = pids
        time.sleep(0.2)
    return last


def measure_strace(m: Mta, n: int, workdir: str) -> dict[str, float]:
    """fsyncs and processes created per SMTP message, strace -f attached to the whole system."""
    strace = shutil.which("strace")
    if strace is None:
        raise BenchError("strace missing (Debian: strace)")
    clear(m.maildir)
    trace = os.path.join(workdir, f"{m.name}.strace")
    pids = quiet_pids(m)
    argv = [strace, "-f", "-T", "-o", trace, "-e", "trace=" + ",".join(SYNCS + FORKS), "-e", "signal=none"]
    for pid in pids:
        argv += ["-p", str(pid)]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert proc.stderr is not None
    attached = gone = 0
    said = []
    deadline = time.monotonic() + 30
    # strace says "Process N attached" per thread it attaches to, or that a pid is gone (one
    # that was exiting): wait for a line about every pid.
    err = proc.stderr.fileno()
    buf = b""
    while attached + gone < len(pids) and time.monotonic() < deadline:
        ready, _, _ = select.select([err], [], [], 1.0)
        if ready:
            data = os.read(err, 65536)  # raw reads: a buffered readline would hide lines from select
            if not data:
                break
            *lines, buf = (buf + data).split(b"\n")
            for line in lines:
                said.append(line.decode(errors="replace") + "\n")
                attached += b" attached" in line
                gone += b"No such process" in line
    if attached + gone < len(pids) or attached < len(pids) / 2:
        proc.kill()
        proc.wait()
        raise BenchError(f"strace attached to {attached} of {len(pids)} processes of {m.name}: {''.join(said)[-1000:]}")
    drain = threading.Thread(target=lambda: proc.stderr.read() if proc.stderr else None, daemon=True)
    drain.start()
    try:
        smtp_load(m.smtp_port, n, SESSIONS, m.rcpt)
        wait_delivered(m, n, "under strace")
        wait_empty(m, "under strace")
    finally:
        proc.send_signal(signal.SIGINT)  # detach
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    syncs, procs, spent = count_calls(trace)
    os.unlink(trace)
    return {"fsync": syncs / n, "procs": procs / n, "fsync_ms": spent * 1000 / max(syncs, 1)}


# --- latency -----------------------------------------------------------------------------------

IN_CREATE, IN_MOVED_TO = 0x100, 0x80


class NewFiles:
    """inotify on a directory: files created in or moved into it."""

    def __init__(self, path: str) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if self.libc.inotify_add_watch(self.fd, path.encode(), IN_CREATE | IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")

    def wait(self, timeout: float) -> int:
        """Wait for events (up to timeout seconds); return how many files arrived."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return 0
        data = os.read(self.fd, 65536)
        got, i = 0, 0
        while i + 16 <= len(data):
            mask = int.from_bytes(data[i + 4:i + 8], "little")
            length = int.from_bytes(data[i + 12:i + 16], "little")
            got += bool(mask & (IN_CREATE | IN_MOVED_TO))
            i += 16 + length
        return got

    def close(self) -> None:
        os.close(self.fd)


def measure_latency(m: Mta, n: int) -> dict[str, float]:
    """Sequential messages: ms from connect() until the file appears in Maildir/new; p50, p90."""
    clear(m.maildir)
    msg = body().replace(b"\n", b"\r\n")
    watch = NewFiles(os.path.join(m.maildir, "new"))
    times = []
    try:
        for _ in range(n):
            t0 = time.monotonic()
            with smtplib.SMTP("127.0.0.1", m.smtp_port, local_hostname="bench.client", timeout=60) as s:
                s.sendmail(SENDER, [m.rcpt], msg)
            deadline = t0 + 60
            while not watch.wait(max(0.0, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise BenchError(f"{m.name}: a message not in Maildir/new after 60 s")
            times.append((time.monotonic() - t0) * 1000)
    finally:
        watch.close()
    wait_empty(m, "after the latency run")
    q = statistics.quantiles(times, n=10, method="inclusive")
    return {"p50": statistics.median(times), "p90": q[8]}


# --- injection, drains, idle connections ------------------------------------------------------------

def measure_inject(m: Mta, n: int, workdir: str) -> dict[str, float]:
    """n sequential injections from /bin/sh per injection program; msgs/s of each."""
    msgfile = os.path.join(workdir, "inject.msg")
    with open(msgfile, "wb") as f:
        f.write(body().replace(b"To: <bench@" + mta.FQDN.encode() + b">", f"To: <{m.rcpt}>".encode()))
    out = {}
    for label, argv in m.inject_commands().items():
        clear(m.maildir)
        command = " ".join(f"'{a}'" for a in argv)
        script = f'i=0; while [ $i -lt {n} ]; do {command} <"{msgfile}" || exit 1; i=$((i+1)); done'
        t0 = time.monotonic()
        p = subprocess.run(["/bin/sh", "-c", script], env={"PATH": "/usr/bin:/bin", "USER": "root"},
                           capture_output=True, timeout=120 + n)
        took = time.monotonic() - t0
        if p.returncode != 0:
            raise BenchError(f"{m.name} {label}: {p.stderr.decode(errors='replace')[-500:]}")
        wait_delivered(m, n, label)
        wait_empty(m, label)
        out[f"inject_{label}"] = n / took
    return out


def measure_drain(m: Mta, n: int, remote: bool) -> float:
    """Hold delivery, queue n messages, release; messages/s until all are delivered."""
    m.hold()
    try:
        clear(m.maildir)
        m.fill(n, REMOTE_RCPT if remote else m.rcpt, body())
        wait_until(lambda: m.queued() >= n, 120, f"{m.name}: {n} messages queued")
    finally:
        t0 = time.monotonic()
        m.release()
    if remote:
        wait_until(lambda: m.queued() == 0, 120 + n / 2, f"{m.name}: the remote queue drained", poll=0.005)
    else:
        wait_until(lambda: in_new(m.maildir) >= n, 120 + n / 2, f"{m.name}: {n} messages in Maildir/new", poll=0.005)
    took = time.monotonic() - t0
    wait_empty(m, "after the drain")
    return n / took


def _server_sockets(port: int, client_ports: set[int]) -> set[int]:
    """Return the inodes of the server side of 127.0.0.1:port's connections from client_ports."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # a dual-stack listener's side is in tcp6
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, remote = fields[1], fields[2]
                if int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) in client_ports:
                    inodes.add(int(fields[9]))
    return inodes


def _pss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise BenchError(f"no Pss in /proc/{pid}/smaps_rollup")


def measure_idle(m: Mta, k: int) -> dict[str, float]:
    """PSS (KiB) of the processes serving k idle SMTP connections, per connection."""
    conns = []
    try:
        for _ in range(k):
            c = socket.create_connection(("127.0.0.1", m.smtp_port), timeout=30)
            conns.append(c)
            got = b""
            while not got.endswith(b"\r\n"):
                data = c.recv(1000)
                if not data:
                    raise BenchError(f"{m.name}: connection closed before the greeting")
                got += data
            if not got.startswith(b"220"):
                raise BenchError(f"{m.name}: greeting {got!r}")
        inodes = _server_sockets(m.smtp_port, {c.getsockname()[1] for c in conns})
        holders = set()
        for pid in m.acct.pids():
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:[") and int(target[8:-1]) in inodes:
                        holders.add(pid)
            except (FileNotFoundError, ProcessLookupError):
                pass
        if not holders:
            raise BenchError(f"{m.name}: no process holds the server side of the idle connections")
        pss = sum(_pss(pid) for pid in holders)
        return {"pss": pss / k, "idle_procs": len(holders) / k}
    finally:
        for c in conns:
            c.close()


# --- the run -------------------------------------------------------------------------------------

ROWS = [
    ("smtp_rate", "SMTP end to end into Maildir, msgs/s", "{:.0f}"),
    ("cpu_ms", "whole MTA CPU per SMTP message, ms", "{:.1f}"),
    ("p50", "latency connect -> file in Maildir/new, p50 ms", "{:.1f}"),
    ("p90", "latency connect -> file in Maildir/new, p90 ms", "{:.1f}"),
    ("inject_qmail-inject", "sequential qmail-inject, msgs/s", "{:.0f}"),
    ("inject_sendmail", "sequential sendmail, msgs/s", "{:.0f}"),
    ("local_drain", "local queue drain, msgs/s", "{:.0f}"),
    ("remote_drain", "remote queue drain to a sink, msgs/s", "{:.0f}"),
    ("pss", "PSS per idle SMTP connection, KiB", "{:.0f}"),
    ("fsync", "fsync per message (SMTP -> Maildir)", "{:.2f}"),
    ("procs", "processes created per message", "{:.2f}"),
    ("fsync_ms", "ms per fsync call (strace -T, under the strace run's load)", "{:.1f}"),
]


def cell(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    med = fmt.format(statistics.median(values))
    if len(values) == 1:
        return med
    return f"{med} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def table(results: dict[str, dict[str, list[float]]], counts: dict[str, int]) -> str:
    names = list(results)
    rows = ["| figure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label, fmt in ROWS:
        if not any(results[n].get(key) for n in names):
            continue
        if key.startswith("inject"):
            label = f"{counts['inject']} " + label
        rows.append(f"| {label} | " + " | ".join(cell(results[n].get(key, []), fmt) for n in names) + " |")
    return "\n".join(rows)


def fsync_ms(directory: str, n: int = 30) -> tuple[float, float]:
    """Return the p50 and p90 ms of fsync after a 4 KB write in directory: what this disk gives."""
    path = os.path.join(directory, "fsync.probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    times = []
    try:
        for _ in range(n):
            os.write(fd, b"x" * 4096)
            t0 = time.perf_counter()
            os.fsync(fd)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        os.close(fd)
        os.unlink(path)
    return statistics.median(times), statistics.quantiles(times, n=10, method="inclusive")[8]


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="pyqmail, Postfix and C qmail measured side by side")
    ap.add_argument("--quick", action="store_true", help="small counts, one round (the test's run)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per measurement (default 3, --quick 1)")
    ap.add_argument("--systems", default="pyqmail,postfix", help="comma-separated: pyqmail, postfix (default both)")
    ap.add_argument("--cqmail", metavar="DIR", help="an installed C qmail to measure too (its control files rewritten)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the bench's directory (logs, homes)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("compare: run as root (root-mode installations, qmail's users, a private Postfix)", file=sys.stderr)
        return 2
    counts = QUICK if args.quick else FULL
    rounds = args.rounds or (1 if args.quick else 3)
    wanted = [s for s in args.systems.split(",") if s]
    for s in wanted:
        if s not in ("pyqmail", "postfix"):
            ap.error(f"unknown system {s!r}")
    if "postfix" in wanted and not mta.postfix_available():
        print("compare: Postfix missing (Debian: apt-get install postfix); use --systems pyqmail", file=sys.stderr)
        return 2
    sink_cmd = shutil.which("smtp-sink", path="/usr/sbin:/usr/bin")
    if sink_cmd is None:
        print("compare: smtp-sink missing (Debian's postfix package)", file=sys.stderr)
        return 2
    base = tempfile.mkdtemp(prefix="pyqmail-compare-", dir="/tmp")
    os.chmod(base, 0o755)
    sink_port = mta.free_port()
    # 256: the listen backlog; smtp-sink serves every session in one process (as nobody).
    sink = subprocess.Popen([sink_cmd, "-u", "nobody", "-4", f"127.0.0.1:{sink_port}", "256"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    systems: list[Mta] = []
    results: dict[str, dict[str, list[float]]] = {}
    try:
        wait_until(lambda: mta.port_open(sink_port), 30, "smtp-sink")
        for s in wanted:
            systems.append(mta.Pyqmail(base, sink_port) if s == "pyqmail" else mta.Postfix(base, sink_port))
        if args.cqmail:
            systems.append(mta.CQmail(base, args.cqmail, sink_port))
        hows = {m.name: m.acct.how for m in systems}
        disk = fsync_ms(base)
        for m in systems:
            m.start()
            results[m.name] = {}
        print(f"compare: {', '.join(results)}; {os.cpu_count()} CPUs, load {loadavg()}; counts {counts}, "
              f"{rounds} round(s); fsync p50 {disk[0]:.1f} ms p90 {disk[1]:.1f} ms; CPU from {'; '.join(f'{k}: {v}' for k, v in hows.items())}", flush=True)

        def record(m: Mta, got: dict[str, float]) -> None:
            for key, value in got.items():
                results[m.name].setdefault(key, []).append(value)
            print(f"  {m.name}: " + ", ".join(f"{k} {v:.2f}" for k, v in got.items()), flush=True)

        for r in range(rounds):
            order = systems[r % len(systems):] + systems[:r % len(systems)]
            print(f"round {r + 1} of {rounds}, load {loadavg()}", flush=True)
            for step in ("smtp", "latency", "inject", "local", "remote", "idle"):
                for m in order:
                    if step == "smtp":
                        record(m, measure_smtp(m, counts["smtp"]))
                    elif step == "latency":
                        record(m, measure_latency(m, counts["latency"]))
                    elif step == "inject":
                        record(m, measure_inject(m, counts["inject"], base))
                    elif step == "local":
                        record(m, {"local_drain": measure_drain(m, counts["local"], remote=False)})
                    elif step == "remote":
                        record(m, {"remote_drain": measure_drain(m, counts["remote"], remote=True)})
                    else:
                        record(m, measure_idle(m, counts["idle"]))
        print(f"strace runs, load {loadavg()}", flush=True)
        for m in systems:
            record(m, measure_strace(m, counts["strace"], base))
    finally:
        for m in systems:
            try:
                m.stop()
            except (BenchError, OSError, subprocess.SubprocessError) as e:
                print(f"compare: stopping {m.name}: {e}", file=sys.stderr)
                m.acct.kill()
        sink.terminate()
        sink.wait(timeout=30)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"compare: kept {base}")
    print(f"\nload after: {loadavg()}; fsync of a 4 KB write on this disk: p50 {disk[0]:.1f} ms, "
          f"p90 {disk[1]:.1f} ms; medians of {rounds} round(s) with min-max; "
          f"SMTP: {counts['smtp']} msgs of {SIZE} bytes over {SESSIONS} sessions, one connection each\n")
    print(table(results, counts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"counts": counts, "rounds": rounds, "cpu": hows, "fsync_ms": disk, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
