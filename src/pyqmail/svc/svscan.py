"""svscan: start and keep a supervise running for every service in a directory (daemontools svscan(8)).

usage: svscan [dir]

Every 5 seconds (at once on SIGALRM) svscan looks at dir (default: the
current directory) and starts `supervise sub` for each subdirectory sub
whose name does not start with '.' and that has none running. If sub/log is
a directory it also starts `supervise log` in sub, with a pipe from the
service's stdout to the log's stdin; the pipe outlives both (restarts lose
nothing). supervise is found on $PATH. Runs until killed; exit 111 if dir
cannot be entered.
"""

from __future__ import annotations

import os
import signal
import stat

from pyqmail.entry import program
from pyqmail.errors import describe
from pyqmail.spawn import spawn
from pyqmail.strerr import Die, warn
from pyqmail.svc.supervise import RESCAN_ENV, inherited_fds, knob

FATAL = b"svscan: fatal: "
WARNING = b"svscan: warning: "
EXIT_TROUBLE = 111
SERVICES = 1000
RESCAN = 5.0
NAME_MAX_FOR_LOG = 255  # daemontools looks for log/ only under names this short


class Service:
    """A service directory svscan knows, by device and inode (a rename keeps it)."""

    __slots__ = ("dev", "ino", "active", "pid", "pidlog", "pipe")

    def __init__(self, dev: int, ino: int) -> None:
        self.dev = dev
        self.ino = ino
        self.active = False
        self.pid = 0
        self.pidlog = 0
        self.pipe: tuple[int, int] | None = None  # (read end, write end) when there is a log


class Scanner:
    """svscan's table of services and one scan of the current directory."""

    def __init__(self) -> None:
        self.services: list[Service] = []

    def _start_supervise(self, argv: list[str], fds: dict[int, int], cwd: str | None, what: bytes) -> int:
        try:
            # Exec, never fork-and-call: started once per service, and each
            # supervise must be a process named supervise (ps, pgrep, pkill svscan).
            return spawn("supervise", argv, fds=fds, cwd=cwd, fast=False)
        except OSError as e:
            # daemontools' child would say this and exit 111; the next scan tries again.
            warn(WARNING + b"unable to start supervise " + what + b": " + describe(e).encode())
            return 0

    def start(self, name: bytes) -> None:
        """Make sure supervise (and its log's) runs for directory entry name."""
        if name.startswith(b"."):
            return
        fn = os.fsdecode(name)
        try:
            st = os.stat(name)
        except OSError as e:
            warn(WARNING + b"unable to stat " + name + b": " + describe(e).encode())
            return
        if not stat.S_ISDIR(st.st_mode):
            return
        svc = next((s for s in self.services if s.ino == st.st_ino and s.dev == st.st_dev), None)
        if svc is None:
            if len(self.services) >= SERVICES:
                warn(WARNING + b"unable to start " + name + b": running too many services")
                return
            svc = Service(st.st_dev, st.st_ino)
            haslog = False
            if len(name) <= NAME_MAX_FOR_LOG:
                try:
                    haslog = stat.S_ISDIR(os.stat(name + b"/log").st_mode)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    warn(WARNING + b"unable to stat " + name + b"/log: " + describe(e).encode())
                    return
            if haslog:
                try:
                    svc.pipe = os.pipe2(os.O_CLOEXEC)
                except OSError as e:
                    warn(WARNING + b"unable to create pipe for " + name + b": " + describe(e).encode())
                    return
            self.services.append(svc)
        svc.active = True
        if not svc.pid:
            fds = inherited_fds()
            if svc.pipe is not None:
                fds[1] = svc.pipe[1]
            svc.pid = self._start_supervise(["supervise", fn], fds, None, name)
        if svc.pipe is not None and not svc.pidlog:
            fds = inherited_fds()
            fds[0] = svc.pipe[0]
            svc.pidlog = self._start_supervise(["supervise", "log"], fds, fn, name + b"/log")

    def reap(self) -> None:
        """Forget the supervise processes that have exited."""
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for svc in self.services:
                if svc.pid == pid:
                    svc.pid = 0
                    break
                if svc.pidlog == pid:
                    svc.pidlog = 0
                    break

    def scan(self) -> None:
        """Reap, start what is missing, and drop services whose directory and processes are gone."""
        self.reap()
        for svc in self.services:
            svc.active = False
        try:
            with os.scandir(b".") as it:
                for entry in it:
                    self.start(entry.name)
        except OSError as e:
            warn(WARNING + b"unable to read directory: " + describe(e).encode())
            return
        keep = []
        for svc in self.services:
            if not svc.active and not svc.pid and not svc.pidlog:
                if svc.pipe is not None:
                    os.close(svc.pipe[0])
                    os.close(svc.pipe[1])
            else:
                keep.append(svc)
        self.services = keep


def _main(argv: list[str]) -> int:
    if len(argv) > 1:
        try:
            os.chdir(argv[1])
        except OSError as e:
            raise Die(EXIT_TROUBLE, FATAL + b"unable to chdir to " + os.fsencode(argv[1]) + b": "
                      + describe(e).encode()) from None
    interval = knob(RESCAN_ENV, RESCAN)
    # SIGALRM asks for a scan now: wait for it (blocked) instead of sleeping.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    scanner = Scanner()
    while True:
        scanner.scan()
        signal.sigtimedwait({signal.SIGALRM}, interval)


@program("svscan", crash=EXIT_TROUBLE)
def main(argv: list[str]) -> int:
    """Scan argv[1] (or .) for services forever; return 111 only if it cannot be entered."""
    try:
        return _main(argv)
    except Die as d:
        return d.report()
