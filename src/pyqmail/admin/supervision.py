"""Who supervises this home: svscan and supervise processes, and service directories running its programs.

A service belongs to a home when its `run` script names a program of the
home (a path under QMAILHOME/bin/, or QMAILHOME/rc as the book's qmail-send
run file execs). Service directories are looked for where svscan runs (a
process scan of /proc: comm or argv naming svscan or supervise, daemontools'
or ours; a process's cwd is its directory, readable as root or as its
owner), in `qmail up`'s QMAILHOME/service, in the usual /service,
/etc/service and /var/service, and in the svscan directories of the systemd
units under QMAILHOME/boot/systemd/. Each service's state is read as svstat
reads it (pyqmail.svc.status).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pyqmail.svc import status as svstatus

SCAN_DIRS = ("/service", "/etc/service", "/var/service")  # daemontools', runit's and others' habits
UP_SERVICES = "service"  # `qmail up`'s svscan directory in the home
SYSTEMD_DIR = "boot/systemd"
SUPERVISORS = ("svscan", "supervise")
RUN_MAX = 64 << 10  # bytes of a run script read
CMDLINE_MAX = 64 << 10
UNIT_MAX = 64 << 10
SERVICES_MAX = 1000  # svscan's own limit on services per directory


@dataclass(frozen=True, slots=True)
class Process:
    """A running svscan or supervise: its pid, kind and directory (None if unreadable)."""

    pid: int
    kind: str
    directory: str | None


@dataclass(slots=True)
class Service:
    """A service directory whose run script runs this home's programs."""

    directory: str
    scanner: Process | None = None  # the svscan running over its parent directory
    supervisor: Process | None = None  # the supervise running for it
    state: str = ""  # svstat's words
    running: bool = False  # a supervise runs for it
    up: bool = False  # and the service itself is up

    def where(self) -> str:
        """Return who supervises it, in words."""
        if self.scanner is not None:
            return f"svscan (pid {self.scanner.pid}) in {self.scanner.directory}"
        if self.supervisor is not None:
            return f"supervise (pid {self.supervisor.pid})"
        return "no supervise"


@dataclass(slots=True)
class Survey:
    """What supervises a home: its services, and every svscan/supervise seen."""

    home: str
    services: list[Service] = field(default_factory=list)
    processes: list[Process] = field(default_factory=list)

    def running(self, include_own: bool = True) -> list[Service]:
        """Return the services a supervise runs for; without include_own, not `qmail up`'s own."""
        own = os.path.join(self.home, UP_SERVICES)
        return [s for s in self.services if s.running and (include_own or os.path.dirname(s.directory) != own)]

    def scanners(self) -> dict[str, list[Process]]:
        """Return {directory: the svscan processes over it}."""
        out: dict[str, list[Process]] = {}
        for p in self.processes:
            if p.kind == "svscan" and p.directory is not None:
                out.setdefault(p.directory, []).append(p)
        return out


def _read(path: str, limit: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(limit)


def _kind(comm: str, argv: list[str]) -> tuple[str, int] | None:
    """Return (svscan|supervise, index of its name in argv) if the process is one; None otherwise."""
    for i, word in enumerate(argv[:3]):
        base = os.path.basename(word)
        if base in SUPERVISORS:
            return base, i
        if i == 0 and not base.startswith("python"):
            break  # argv[0] names the program; only an interpreter's script comes later
    if comm in SUPERVISORS:
        return comm, 0
    return None


def processes(proc: str = "/proc") -> list[Process]:
    """Return every svscan and supervise process visible in proc."""
    out: list[Process] = []
    try:
        names = [n for n in os.listdir(proc) if n.isdigit()]
    except OSError:
        return out
    for n in names:
        base = os.path.join(proc, n)
        try:
            comm = _read(os.path.join(base, "comm"), 64).decode("latin-1").strip()
            raw = _read(os.path.join(base, "cmdline"), CMDLINE_MAX)
        except OSError:
            continue  # gone meanwhile
        argv = [os.fsdecode(a) for a in raw.split(b"\0") if a]
        found = _kind(comm, argv)
        if found is None:
            continue
        kind, i = found
        try:
            directory: str | None = os.readlink(os.path.join(base, "cwd"))
        except OSError:
            # Another user's process: its cwd is hidden; an absolute argument still says where.
            arg = argv[i + 1] if len(argv) > i + 1 else ""
            directory = os.path.normpath(arg) if arg.startswith("/") else None
        out.append(Process(int(n), kind, directory))
    return sorted(out, key=lambda p: p.pid)


def runs_home_program(script: bytes, home: str) -> bool:
    """Return whether a run script names a program of home (HOME/bin/... or HOME/rc)."""
    import re

    text = script.decode("latin-1")
    for h in {home.rstrip("/"), os.path.realpath(home)}:
        if re.search(r"(?<![\w./-])" + re.escape(h) + r"/(bin/[\w.-]|rc(?![\w./-]))", text):
            return True
    return False


def unit_scan_dirs(home: str) -> list[str]:
    """Return the directories svscan runs over in the systemd units under HOME/boot/systemd."""
    top = os.path.join(home, SYSTEMD_DIR)
    try:
        units = sorted(n for n in os.listdir(top) if n.endswith(".service"))
    except OSError:
        return []
    out = []
    for u in units:
        try:
            text = _read(os.path.join(top, u), UNIT_MAX).decode("latin-1")
        except OSError:
            continue
        for line in text.splitlines():
            key, eq, value = line.strip().partition("=")
            if not eq or key.strip() != "ExecStart":
                continue
            words = value.strip().lstrip("-@+!:").split()
            for i, w in enumerate(words[:-1]):
                if os.path.basename(w) == "svscan" and words[i + 1].startswith("/"):
                    out.append(words[i + 1])
    return out


def _subdirs(top: str) -> list[str]:
    try:
        entries = sorted(e.name for e in os.scandir(top) if not e.name.startswith(".") and e.is_dir())
    except OSError:
        return []
    return [os.path.join(top, n) for n in entries[:SERVICES_MAX]]


def survey(home: str, now: int, procs: list[Process] | None = None, extra: tuple[str, ...] = ()) -> Survey:
    """Return the services of home found in every place supervision lives, with their state at now."""
    home = os.path.abspath(home)
    s = Survey(home, processes=processes() if procs is None else procs)
    tops = [os.path.join(home, UP_SERVICES), *SCAN_DIRS, *unit_scan_dirs(home), *extra]
    tops += [p.directory for p in s.processes if p.kind == "svscan" and p.directory]
    candidates: list[str] = []
    for top in tops:
        candidates += _subdirs(top)
    candidates += [p.directory for p in s.processes if p.kind == "supervise" and p.directory]
    seen: set[str] = set()
    scanners = s.scanners()
    by_dir = {p.directory: p for p in s.processes if p.kind == "supervise" and p.directory}
    for d in candidates:
        key = os.path.realpath(d)
        if key in seen:
            continue
        if os.path.basename(d) == "log" and os.path.isfile(os.path.join(os.path.dirname(d), "run")):
            continue  # a service's logger: reported with its service
        seen.add(key)
        try:
            script = _read(os.path.join(d, "run"), RUN_MAX)
        except OSError:
            continue
        if not runs_home_program(script, home):
            continue
        parent = os.path.dirname(d)
        svc = Service(d)
        for top, procs_over in scanners.items():
            if os.path.realpath(top) == os.path.realpath(parent):
                svc.scanner = procs_over[0]
        svc.supervisor = by_dir.get(d) or by_dir.get(key)
        try:
            st = svstatus.read(d)
        except svstatus.StatusError as e:
            svc.state = str(e)
        else:
            svc.state = st.describe(now)
            svc.running = True
            svc.up = st.pid != 0
        s.services.append(svc)
    return s


def lock_held(path: str) -> bool | None:
    """Return whether a process holds path's flock; None if there is no such file.

    Read from /proc/locks, so that the check never takes the lock itself: a
    qmail-queued or `qmail up` starting in that instant would see it held and
    refuse. Only where /proc/locks cannot be read is a free lock taken for a
    moment (LOCK_SH|LOCK_NB, dropped at once).
    """
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    held = _proc_locks_hold(st)
    if held is not None:
        return held
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _proc_locks_hold(st: os.stat_result) -> bool | None:
    """Return whether /proc/locks lists a FLOCK on st's file; None if it cannot be read."""
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", "rb") as f:
            text = f.read(1 << 22).decode("ascii", "replace")
    except OSError:
        return None
    for line in text.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; "->" marks a waiter, not a holder.
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == want:
            return True
    return False
