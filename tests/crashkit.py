"""The crash harness's kit: a root-mode mail system in a temporary home, a recording SMTP sink,
a mixed load, a killer and the counts (tests/test_crash_harness.py).

The system is what `qmail up` runs (its own `services()` and `write_services()`),
with SMTP on a free port of 127.0.0.1 and no POP3 or QMTP, under svscan. svscan
runs below a small reaper process made a child subreaper (prctl), so that a
service orphaned by a killed supervise stays in our process tree: it can be
found, killed again, and reported if it outlives `qmail down`.

Every message carries an `X-Crash-Id:` header; a delivery is a file with that
id in a local user's Maildir (new/ or cur/) or a message the sink acknowledged
with 250 after DATA, counted per (id, recipient).
"""

from __future__ import annotations

import collections
import os
import pwd
import random
import re
import select
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from conftest import TEST_USER, VENV_BIN, expect, run, world_dir

FQDN = "crash.example.com"
LOCALS = ("loc1", "loc2")
REMOTE_DOMAIN = "far.example"
REMOTES = (f"r1@{REMOTE_DOMAIN}", f"r2@{REMOTE_DOMAIN}")
BOUNCE_USER = "bounce"
SENDER = f"{BOUNCE_USER}@{FQDN}"
# What the killer aims at, by the kernel's comm (pyqmail.proctitle makes it the program's name).
KINDS = ("qmail-send", "qmail-todo", "qmail-lspawn", "qmail-local", "qmail-rspawn", "qmail-remote", "qmail-clean",
         "qmail-queued", "qmail-queued-w", "qmail-queue", "tcpserver", "qmail-smtpd", "supervise", "multilog",
         "qmail-rcptcheck", "qmail-rcptchk-w", "qmail-lspawn-w", "qmail-getpw")  # qmail-rcptcheckd: the kernel
# keeps 15 bytes of a name; qmail-queued-w, qmail-rcptchk-w: their workers; qmail-lspawn-w: an idle per-user
# worker of qmail-lspawn (busy, it shows as qmail-local); qmail-getpw: a user lookup helper of
# qmail-lspawn or qmail-rcptcheckd (users/cdb misses)
# The whole system at rest: each daemon once (qmail-queued: the service's and qmail-start's -p one;
# qmail-clean: qmail-send's and qmail-todo's),
# a supervise for each of the 4 services (send, queued, smtpd, rcptcheckd) and their logs, a
# multilog for each log; qmail-queued's workers (qmail-queued-w) and qmail-rcptcheckd's
# (qmail-rcptchk-w) come and go with the load and are not counted.
WHOLE = {"svscan": 1, "supervise": 8, "multilog": 4, "qmail-send": 1, "qmail-lspawn": 1, "qmail-rspawn": 1,
         "qmail-clean": 2, "qmail-todo": 1, "qmail-queued": 2, "tcpserver": 1, "qmail-rcptcheck": 1}
ID_RE = re.compile(rb"^X-Crash-Id: (\S+)\r?$", re.M)

# The reaper: a child subreaper that starts svscan (its own session, as `qmail up`
# starts it), prints svscan's pid, reaps every orphan, and exits once its
# standard input is closed and it has no child left.
REAPER = r"""
import ctypes, os, select, sys
PR_SET_CHILD_SUBREAPER = 36
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    sys.exit("reaper: prctl failed")
svscan, services, errfile = sys.argv[1:4]
pid = os.fork()
if pid == 0:
    os.setsid()
    err = os.open(errfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0); os.dup2(err, 1); os.dup2(err, 2)
    os.execv(svscan, ["svscan", services])
sys.stdout.write(f"{pid}\n")
sys.stdout.flush()
stdin_open = True
while True:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        if not stdin_open:
            break
    if stdin_open:
        r, _, _ = select.select([0], [], [], 0.1)
        if r and not os.read(0, 100):
            stdin_open = False
    else:
        select.select([], [], [], 0.1)
"""


def proc_table() -> dict[int, tuple[str, int]]:
    """Return {pid: (comm, ppid)} of every process now in /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        left, right = stat.index(b"("), stat.rindex(b")")
        fields = stat[right + 2:].split()
        if fields[0] == b"Z":
            continue  # a zombie is dead already
        out[int(name)] = (stat[left + 1:right].decode("latin-1"), int(fields[1]))
    return out


def descendants(root: int, table: dict[int, tuple[str, int]] | None = None) -> dict[int, str]:
    """Return {pid: comm} of every living descendant of root."""
    table = proc_table() if table is None else table
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, (_, ppid) in table.items():
        children[ppid].append(pid)
    out: dict[int, str] = {}
    todo = list(children[root])
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out[pid] = table[pid][0]
        todo.extend(children[pid])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sink:
    """An SMTP server on 127.0.0.1 (a thread per connection) that records (id, recipient) before each 250."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.got: collections.Counter[tuple[str, str]] = collections.Counter()
        self.sessions = 0
        self.errors: list[str] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.sessions += 1
                self._conns.add(conn)
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(120)
            f = conn.makefile("rb")
            try:
                self._talk(conn, f)
            finally:
                f.close()
        except OSError:
            pass  # the client was killed: nothing was acknowledged
        except Exception as e:  # noqa: BLE001 - reported by the test, never a thread warning
            self.errors.append(repr(e))
        finally:
            with self.lock:
                self._conns.discard(conn)
            conn.close()

    def _talk(self, conn: socket.socket, f: object) -> None:
        readline: Callable[[int], bytes] = f.readline  # type: ignore[attr-defined]
        conn.sendall(b"220 sink ESMTP\r\n")
        rcpts: list[str] = []
        while True:
            line = readline(4096)
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"HELO", b"EHLO"):
                conn.sendall(b"250 sink\r\n")
            elif verb == b"MAIL":
                rcpts = []
                conn.sendall(b"250 ok\r\n")
            elif verb == b"RCPT":
                m = re.search(rb"<([^>]*)>", line)
                rcpts.append((m.group(1) if m else b"").decode("latin-1").lower())
                conn.sendall(b"250 ok\r\n")
            elif verb == b"DATA":
                conn.sendall(b"354 go ahead\r\n")
                data = []
                while True:
                    d = readline(65536)
                    if not d:
                        return  # cut in the middle: not acknowledged
                    if d == b".\r\n":
                        break
                    data.append(d)
                m = ID_RE.search(b"".join(data[:50]))
                mid = m.group(1).decode("latin-1") if m else "?"
                with self.lock:
                    for r in rcpts:
                        self.got[mid, r] += 1
                conn.sendall(b"250 ok\r\n")
            elif verb == b"RSET":
                rcpts = []
                conn.sendall(b"250 ok\r\n")
            elif verb == b"QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            else:
                conn.sendall(b"502 unimplemented\r\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        with self.lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@dataclass
class Sent:
    """One message the load tried to queue."""

    mid: str
    via: str                 # "smtp" or "inject"
    rcpts: tuple[str, ...]
    accepted: bool = False


@dataclass
class Counts:
    """What the harness found."""

    kills: collections.Counter[str] = field(default_factory=collections.Counter)
    tried: int = 0
    accepted: int = 0
    accepted_rcpts: int = 0
    delivered: int = 0          # distinct (id, recipient) of accepted messages delivered at least once
    lost: list[tuple[str, str]] = field(default_factory=list)
    duplicated: int = 0         # extra copies beyond the first
    unacknowledged: int = 0     # deliveries of messages whose client saw a failure (allowed)
    bounces: int = 0
    postmaster: int = 0
    via: collections.Counter[str] = field(default_factory=collections.Counter)
    load_seconds: float = 0.0
    drain_seconds: float = 0.0
    left_in_queue: dict[int, str] = field(default_factory=dict)
    left_processes: dict[int, str] = field(default_factory=dict)

    def queue_words(self) -> str:
        """Say what stays in the queue: how many messages in each state."""
        if not self.left_in_queue:
            return "nothing"
        by = collections.Counter(self.left_in_queue.values())
        words = [f"{n} {st}" for st, n in sorted(by.items())]
        return " ".join(words)

    def summary(self, seed: int) -> str:
        kinds = " ".join(f"{k}={self.kills[k]}" for k in KINDS if self.kills[k])
        return (f"crash harness: seed {seed}: {sum(self.kills.values())} kills ({kinds}) over "
                f"{self.load_seconds:.0f} s; tried {self.tried}, accepted {self.accepted} messages "
                f"({self.via['smtp']} smtp, {self.via['inject']} inject) = {self.accepted_rcpts} deliveries due; "
                f"delivered {self.delivered}, lost {len(self.lost)}, duplicated {self.duplicated}, "
                f"unacknowledged but delivered {self.unacknowledged}, bounces {self.bounces}, "
                f"postmaster {self.postmaster}; drained in {self.drain_seconds:.0f} s; "
                f"left in queue {self.queue_words()}; "
                f"processes left {self.left_processes or 'none'}")


class System:
    """A root-mode home under svscan in our process tree, with remote mail routed to a Sink."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.base = world_dir()
        self.home = self.base / "qmail"
        self.pw = pwd.getpwnam(TEST_USER)
        self.sink = Sink()
        self.smtp_port = free_port()
        self.reaper: subprocess.Popen[bytes] | None = None
        self.svscan = 0
        self._seen: dict[tuple[str, str], str] = {}
        self._install()

    def bin(self, name: str) -> str:
        return str(self.home / "bin" / name)

    def maildir(self, user: str) -> Path:
        return self.base / user / "Maildir"

    def _control(self, name: str, text: str) -> None:
        p = self.home / "control" / name
        p.write_text(text, encoding="latin-1")
        p.chmod(0o644)

    def _install(self) -> None:
        expect(run([VENV_BIN / "qmail", "init", "--home", self.home, FQDN]))
        uid, gid = self.pw.pw_uid, self.pw.pw_gid
        lines = []
        for user in (*LOCALS, BOUNCE_USER):
            for d in (self.base / user, self.maildir(user), *(self.maildir(user) / s for s in ("tmp", "new", "cur"))):
                d.mkdir()
                os.chown(d, uid, gid)
                d.chmod(0o700 if d != self.base / user else 0o755)
            lines.append(f"={user}:{TEST_USER}:{uid}:{gid}:{self.base / user}:::\n")
        (self.home / "users" / "assign").write_text("".join(lines) + ".\n")
        expect(run([self.bin("qmail-newu")]))
        self._control("smtproutes", f"{REMOTE_DOMAIN}:[127.0.0.1]:{self.sink.port}\n")
        # The load relays through qmail-smtpd from 127.0.0.1, as a tcprules file allows it.
        rules = self.home / "control" / "tcp.smtp"
        rules.write_text('127.0.0.1:allow,RELAYCLIENT=""\n:allow\n')
        cdb = self.home / "control" / "tcp.smtp.cdb"
        expect(run([self.bin("tcprules"), cdb, f"{cdb}.tmp"], input=rules.read_bytes()))
        os.chmod(cdb, 0o644)
        self._services()

    def _services(self) -> None:
        """Write the service directories `qmail up` writes, SMTP on 127.0.0.1 alone."""
        from pyqmail import home as _home
        from pyqmail.admin import up

        old = os.environ.get("QMAILHOME")
        os.environ["QMAILHOME"] = str(self.home)
        try:
            _home.reset()
            inst = _home.install()
            wanted = up.services(str(self.home), inst, up.Ports("127.0.0.1", self.smtp_port, 0, 0), FQDN)
            up.write_services(str(self.home), inst, wanted)
            alias = inst.users["alias"]
        finally:
            if old is None:
                del os.environ["QMAILHOME"]
            else:
                os.environ["QMAILHOME"] = old
            _home.reset()
        # Double bounces go to the alias user's ./Maildir/, as `qmail up` makes it.
        self.alias_maildir = Path(alias.home) / "Maildir"
        for sub in ("", "tmp", "new", "cur"):
            d = self.alias_maildir / sub
            d.mkdir(mode=0o700, exist_ok=True)
            os.chown(d, alias.uid, alias.gid)
        assert sorted(os.listdir(self.home / "service")) == ["queued", "rcptcheckd", "send", "smtpd"]

    def start(self) -> None:
        """Start svscan under the reaper and wait until SMTP answers and qmail-send logs its status."""
        (self.home / "run").mkdir(exist_ok=True)
        self.reaper = subprocess.Popen(
            [sys.executable, "-c", REAPER, self.bin("svscan"), str(self.home / "service"),
             str(self.base / "svscan.err")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={"PATH": f"{self.home}/bin:/usr/local/bin:/usr/bin:/bin"}, cwd="/")
        assert self.reaper.stdout is not None
        self.svscan = int(self.reaper.stdout.readline())
        self.reaper.stdout.close()
        # `qmail down` stops the svscan named here, then every service.
        (self.home / "run" / "svscan.pid").write_text(f"{self.svscan}\n")
        deadline = time.monotonic() + 60
        while not (self._smtp_ready() and self.send_log_has(b"status: local")):
            assert time.monotonic() < deadline, f"system did not start: {self.describe()}"
            time.sleep(0.1)

    def _smtp_ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=5) as c:
                c.settimeout(10)
                return c.recv(4).startswith(b"220")
        except OSError:
            return False

    def send_log_has(self, text: bytes) -> bool:
        try:
            return text in (self.home / "log" / "send" / "current").read_bytes()
        except FileNotFoundError:
            return False

    def processes(self) -> dict[int, str]:
        """Return {pid: comm} of every process of the running system (under the reaper)."""
        if self.reaper is None:
            return {}
        return descendants(self.reaper.pid)

    def census(self) -> dict[str, int]:
        """Return how many processes of each kind in WHOLE run now."""
        got = collections.Counter(self.processes().values())
        return {k: got[k] for k in WHOLE}

    def wait_whole(self, timeout: float) -> dict[str, int]:
        """Wait until the census is WHOLE (every killed daemon back, no orphan); return the last census."""
        deadline = time.monotonic() + timeout
        while (c := self.census()) != WHOLE and time.monotonic() < deadline:
            time.sleep(0.2)
        return c

    def describe(self) -> str:
        logs = []
        for name in ("send", "queued", "smtpd"):
            try:
                text = (self.home / "log" / name / "current").read_bytes()[-3000:]
            except FileNotFoundError:
                text = b"(no log)"
            logs.append(f"--- log/{name}:\n{text.decode('latin-1')}")
        try:
            err = (self.base / "svscan.err").read_text("latin-1")[-2000:]
        except FileNotFoundError:
            err = ""
        return f"processes {sorted(self.processes().values())}\n--- svscan.err:\n{err}\n" + "\n".join(logs)

    def alarm_send(self) -> None:
        """svc -a: qmail-send retries every deferred delivery now."""
        subprocess.run([self.bin("svc"), "-a", str(self.home / "service" / "send")], capture_output=True, timeout=30)

    def stop(self) -> dict[int, str]:
        """`qmail down`, then let the reaper go; return {pid: comm} of what was still running after it."""
        r = subprocess.run([VENV_BIN / "qmail", "down", "--home", self.home], capture_output=True, timeout=300)
        assert r.returncode == 0, r
        left = self.processes()
        left.pop(self.reaper.pid if self.reaper else 0, None)
        # Multilogs end when the last writer of their pipe is gone; give them a moment.
        deadline = time.monotonic() + 10
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = self.processes()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.reaper is not None:
            assert self.reaper.stdin is not None
            self.reaper.stdin.close()
            self.reaper.wait(30)
        return left

    def close(self) -> None:
        """Leave nothing behind, whatever happened."""
        if self.reaper is not None and self.reaper.poll() is None:
            for pid in self.processes():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if self.reaper.stdin is not None and not self.reaper.stdin.closed:
                self.reaper.stdin.close()
            try:
                self.reaper.wait(30)
            except subprocess.TimeoutExpired:
                self.reaper.kill()
                self.reaper.wait()
        self.sink.close()
        shutil.rmtree(self.base, ignore_errors=True)

    def mailbox_ids(self, user: str) -> list[str]:
        """Return the X-Crash-Id of every message in user's Maildir (new/ and cur/), once per file."""
        out = []
        for sub in ("new", "cur"):
            d = self.maildir(user) / sub
            for name in os.listdir(d):
                # A Maildir file never changes once in new/: read each one once.
                key = (user, name)
                mid = self._seen.get(key)
                if mid is None:
                    try:
                        with open(d / name, "rb") as f:
                            head = f.read(8192)
                    except FileNotFoundError:
                        continue
                    m = ID_RE.search(head)
                    mid = self._seen[key] = m.group(1).decode("latin-1") if m else "?"
                out.append(mid)
        return out

    def alias_count(self) -> int:
        return sum(len(os.listdir(self.alias_maildir / s)) for s in ("new", "cur"))

    def deliveries(self) -> collections.Counter[tuple[str, str]]:
        """Return how many times each (id, recipient) was delivered, locally or to the sink."""
        got: collections.Counter[tuple[str, str]] = collections.Counter()
        for user in LOCALS:
            for mid in self.mailbox_ids(user):
                got[mid, f"{user}@{FQDN}"] += 1
        with self.sink.lock:
            got.update(self.sink.got)
        return got

    def queue_left(self) -> dict[int, str]:
        """Return {message number: INTERNALS state} of what is in the queue, plus maildrop files as -1."""
        from queuefmt import messages

        left = messages(self.home / "queue")
        drops = [n for n in os.listdir(self.home / "maildrop") if not n.startswith(".")]
        if drops:
            left[-1] = f"maildrop: {len(drops)} files"
        return left


class Load:
    """Threads queueing messages: SMTP into qmail-smtpd, qmail-inject as the test user."""

    def __init__(self, system: System, seed: int, smtp_threads: int = 2, inject_threads: int = 2,
                 pace: float = 0.0) -> None:
        self.system = system
        self.pace = pace
        self.rng = random.Random(seed ^ 0x5EED)
        self.lock = threading.Lock()
        self.sent: list[Sent] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self._n = 0
        self._threads = [threading.Thread(target=self._loop, args=(self._smtp,), daemon=True)
                         for _ in range(smtp_threads)]
        self._threads += [threading.Thread(target=self._loop, args=(self._inject,), daemon=True)
                          for _ in range(inject_threads)]

    def _next(self, via: str) -> tuple[Sent, bytes]:
        with self.lock:
            self._n += 1
            n = self._n
            pool = [f"{u}@{FQDN}" for u in LOCALS] + list(REMOTES)
            rcpts = tuple(self.rng.sample(pool, self.rng.randint(1, 3)))
            size = self.rng.choice((200, 2000, 20000))
            s = Sent(f"{self.system.seed}.{n}", via, rcpts)
            self.sent.append(s)
        body = (b"x" * 70 + b"\n") * (size // 71 + 1)
        msg = (f"Subject: crash {s.mid}\nX-Crash-Id: {s.mid}\nTo: {', '.join(rcpts)}\n\n").encode() + body
        return s, msg

    def _loop(self, one: Callable[[], None]) -> None:
        while not self.stop.is_set():
            if self.pace:
                self.stop.wait(self.pace)
            try:
                one()
            except Exception as e:  # noqa: BLE001 - reported by the test, never a thread warning
                self.errors.append(repr(e))
                time.sleep(0.2)

    def _smtp(self) -> None:
        s, msg = self._next("smtp")
        try:
            with smtplib.SMTP("127.0.0.1", self.system.smtp_port, timeout=60) as c:
                refused = c.sendmail(SENDER, list(s.rcpts), msg.replace(b"\n", b"\r\n"))
        except (OSError, smtplib.SMTPException):
            # Refused, cut or killed: not accepted (it may still be delivered).
            time.sleep(0.05)
            return
        if refused:
            s.rcpts = tuple(r for r in s.rcpts if r not in refused)
        s.accepted = True

    def _inject(self) -> None:
        s, msg = self._next("inject")
        pw = self.system.pw
        try:
            r = subprocess.run([self.system.bin("qmail-inject"), f"-f{SENDER}", *s.rcpts], input=msg,
                               capture_output=True, timeout=120, cwd="/", env={"PATH": "/usr/bin:/bin"},
                               user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        except subprocess.TimeoutExpired:
            return
        s.accepted = r.returncode == 0

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(180)
            assert not t.is_alive(), "a load thread did not finish"


class Killer:
    """SIGKILL a random process of the system, of a random kind among those running."""

    def __init__(self, system: System, seed: int) -> None:
        self.system = system
        self.rng = random.Random(seed)
        self.kills: collections.Counter[str] = collections.Counter()
        self.log: list[tuple[float, str, int]] = []

    def kill_one(self) -> str:
        """Kill one process; return its kind ("" if none of KINDS runs)."""
        mine = os.getpid()
        table = proc_table()
        ours = descendants(mine, table)
        by_kind: dict[str, list[int]] = collections.defaultdict(list)
        for pid, comm in ours.items():
            if comm in KINDS:
                by_kind[comm].append(pid)
        if not by_kind:
            return ""
        kind = self.rng.choice(sorted(by_kind))
        pid = self.rng.choice(sorted(by_kind[kind]))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return ""
        self.kills[kind] += 1
        self.log.append((time.monotonic(), kind, pid))
        return kind


def settle(system: System, load: Load, deadline: float) -> tuple[bool, collections.Counter[tuple[str, str]]]:
    """Wait until every accepted delivery is made and the queue holds nothing to deliver; True if so."""
    due = {(s.mid, r) for s in load.sent if s.accepted for r in s.rcpts}
    last_alarm = 0.0
    while True:
        got = system.deliveries()
        left = {n: st for n, st in system.queue_left().items() if st != "S2" and st != "S3"}
        if due <= set(got) and not left:
            return True, got
        if time.monotonic() > deadline:
            return False, got
        if time.monotonic() - last_alarm > 5:
            # Deferred deliveries wait for qmail-send's schedule (100 s and more): retry now.
            system.alarm_send()
            last_alarm = time.monotonic()
        time.sleep(0.5)


def count(system: System, load: Load, got: collections.Counter[tuple[str, str]], kills: collections.Counter[str]) -> Counts:
    c = Counts(kills=kills)
    c.tried = len(load.sent)
    due: set[tuple[str, str]] = set()
    for s in load.sent:
        if s.accepted:
            c.accepted += 1
            c.via[s.via] += 1
            due |= {(s.mid, r) for r in s.rcpts}
    c.accepted_rcpts = len(due)
    c.delivered = len(due & set(got))
    c.lost = sorted(due - set(got))
    c.duplicated = sum(n - 1 for n in got.values() if n > 1)
    c.unacknowledged = sum(1 for k in got if k not in due)
    c.bounces = len(system.mailbox_ids(BOUNCE_USER))
    c.postmaster = system.alias_count()
    return c


def wait_select(seconds: float) -> None:
    """Sleep without being cut short by a signal."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        select.select([], [], [], left)
