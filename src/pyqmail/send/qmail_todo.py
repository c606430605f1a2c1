"""qmail-todo: preprocess new messages for qmail-send (the ext-todo patch's qmail-todo).

qmail-start runs it beside qmail-send, with a qmail-clean of its own:
descriptor 0 brings qmail-send's commands, 1 takes its records to qmail-send
(pyqmail.send.todoproto), 2 and 3 are the pipes to and from its qmail-clean.
It scans todo/ (and a big-todo queue's subdirectories) when lock/trigger is
pulled and every 25 minutes, and preprocesses each new message into info/N,
local/N and remote/N with qmail-send's own code (Send.prepare, Send.commit),
so that a flood of new messages never holds up qmail-send's delivery loop
(the book's "silly qmail syndrome").

A message is handed over as qmail-send handles its own: the first KEEP_MAX
waiting are kept (not fsync'd, todo/N left as their record, `K`: qmail-send
delivers them at once and commits or finishes them, removing todo/N with its
own qmail-clean, and says `G` when todo/N is gone); more are committed here
(files fsync'd, todo/N removed by this qmail-clean, then `D`).

Its log lines (new msg, info msg, warnings) go to qmail-send as `L` records,
and qmail-send writes them into its activity record: one log, the lines of
qmail-log(5) byte for byte. TERM, or `X` from qmail-send, or qmail-send gone:
it finishes what its qmail-clean is doing, says `X` and exits 0. HUP, or `H`:
it rereads locals and virtualdomains, with which it rewrites recipients.
"""

from __future__ import annotations

import fcntl
import os
import select
import time

from pyqmail import home as _home
from pyqmail import sig as signal
from pyqmail.entry import program
from pyqmail.send import log, qmail_send, todoproto

FD_FROMSEND = 0
FD_TOSEND = 1
FD_TOCLEAN = 2
FD_FROMCLEAN = 3
OUT_MAX = 1 << 20  # records not yet taken by qmail-send, at most: past it, preprocessing waits
EXIT_TEMPORARY = 111

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Callable


class Todo(qmail_send.Send):
    """qmail-send's preprocessing, alone in a process of its own, talking to qmail-send through todoproto."""

    def __init__(self, controls: qmail_send.Controls, split: int, clock: Callable[[], int],
                 sleep: Callable[[float], None] = time.sleep,
                 fds: tuple[int, int, int, int] = (FD_FROMSEND, FD_TOSEND, FD_TOCLEAN, FD_FROMCLEAN)) -> None:
        super().__init__(controls, split, clock, sleep=sleep, spawn_max=(0, 0),
                         fds=(-1, (-1, -1), (-1, -1), fds[2], fds[3]))
        self.fd_fromsend, self.fd_tosend = fds[0], fds[1]
        self.out = bytearray()
        self.commands = todoproto.Commands()
        self.send_alive = True
        for fd in (self.fd_fromsend, self.fd_tosend):
            try:
                fl = fcntl.fcntl(fd, fcntl.F_GETFL)
                fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
            except OSError:
                self.senddied()

    # What qmail-send did in its own loop, said to qmail-send instead ----------------

    def log(self, line: bytes) -> None:
        self.out += todoproto.logline(line)

    def preprocessed(self, messid: int, channels: tuple[int, ...]) -> None:
        self.out += todoproto.done(messid, channels)

    def keep(self, p: qmail_send.Prepared) -> None:
        p.close()
        self.kept[p.messid] = qmail_send.KEPT_FOREVER  # qmail-send commits it, not this process
        self.out += todoproto.done(p.messid, p.channels, kept=True)

    def is_kept(self, messid: int) -> bool:
        if messid not in self.kept:
            return False
        # qmail-send says G before message N's mess/N goes, so before a new
        # todo/N of that number can exist: with its commands read, a todo/N
        # listed is a kept message's only if N is still kept.
        self.read_commands()
        return messid in self.kept

    # Talking to qmail-send -------------------------------------------------------------

    def senddied(self) -> None:
        self.send_alive = False
        self.exitasap = True

    def read_commands(self) -> None:
        """Read and act on what qmail-send has said (H, X, G)."""
        while self.send_alive:
            try:
                data = os.read(self.fd_fromsend, 4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.senddied()
                return
            for letter, num in self.commands.feed(data):
                if letter == b"G":
                    self.kept.pop(num, None)
                elif letter == todoproto.REREAD:
                    self.readasap = True
                elif letter == todoproto.STOP:
                    self.exitasap = True
                else:
                    self.log(log.SEND_DIALECT)

    def flush(self) -> None:
        while self.out and self.send_alive:
            try:
                n = os.write(self.fd_tosend, self.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.senddied()
                return
            del self.out[:n]

    # The loop --------------------------------------------------------------------------

    def step(self, max_wait: float | None = None, qmail_home: str = "") -> None:
        """Run one turn: read qmail-send's commands, write its records, preprocess a batch of todo/."""
        self.recent = self.clock()
        if self.readasap:
            self.readasap = False
            self.reread(qmail_home or _home.home())
        rfds: list[int] = []
        wfds: list[int] = []
        if self.send_alive:
            rfds.append(self.fd_fromsend)
            if self.out:
                wfds.append(self.fd_tosend)
        if self.wake != -1:
            rfds.append(self.wake)
        if self.clean_alive:
            # Watched even with nothing asked: a qmail-clean killed while idle is noticed
            # at once (EOF), and the whole of qmail-start comes back, not at the next commit.
            rfds.append(self.fd_fromclean)
        busy = len(self.out) > OUT_MAX  # qmail-send is behind: wait for it
        timeout: float = qmail_send.SLEEP_FOREVER
        if not self.exitasap and not busy:
            if self.trigger != -1:
                rfds.append(self.trigger)
            wakeup = 0 if self.tododir is not None else self.nexttodorun
            timeout = 0 if wakeup <= self.recent else wakeup - self.recent + qmail_send.SLEEP_FUZZ
        if max_wait is not None:
            timeout = min(timeout, max_wait)
        try:
            readable, writable, _ = select.select(rfds, wfds, [], timeout)
        except OSError:
            self.log(log.SELECT_TROUBLE)
            return
        self.recent = self.clock()
        if self.wake != -1 and self.wake in readable:
            qmail_send._drain(self.wake)
        if self.fd_fromsend in readable:
            self.read_commands()
        if self.fd_fromclean in readable:
            if self.clean_pending:
                self.clean_answers()
            else:
                self.clean_idle_read()
        if not self.exitasap and len(self.out) <= OUT_MAX:
            self.todo_do(self.trigger != -1 and self.trigger in readable)
        self.flush()

    def clean_idle_read(self) -> None:
        """qmail-clean's pipe is readable with nothing asked: EOF is its death; bytes it should not send are dropped."""
        try:
            data = os.read(self.fd_fromclean, 64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.cleandied()

    def done(self) -> bool:
        """Return True once asked to stop (or qmail-send is gone) and qmail-clean has answered everything."""
        return self.exitasap and (not self.clean_pending or not self.clean_alive)

    def finish(self) -> None:
        """Say the last records and X to qmail-send, waiting for it to take them."""
        if self.tododir is not None:
            self.tododir.close()
            self.tododir = None
        if not self.send_alive:
            return
        self.out += todoproto.EXITING
        while self.out and self.send_alive:
            try:
                select.select([], [self.fd_tosend], [], 10)
            except InterruptedError:
                continue
            before = len(self.out)
            self.flush()
            if len(self.out) == before:
                return  # qmail-send takes nothing for 10 s: it hears EOF instead


def _log_crash(reason: str) -> None:
    os.write(FD_TOSEND, todoproto.logline(b"alert: " + reason.encode("utf-8", "backslashreplace") + b"\n"))


def _say(line: bytes) -> int:
    try:
        os.write(FD_TOSEND, todoproto.logline(line))
    except OSError:
        pass  # safe: qmail-send is gone; the exit code says temporary
    return EXIT_TEMPORARY


@program("qmail-todo", crash=EXIT_TEMPORARY, on_crash=_log_crash)
def main(argv: list[str]) -> int:
    """Preprocess todo/ for qmail-send until told to stop; return 0, or 111 if it cannot start."""
    qmail_home = _home.home()
    try:
        os.chdir(qmail_home)
    except OSError:
        return _say(log.CANNOT_START_HOME)
    controls = qmail_send.read_controls()
    if controls is None:
        return _say(log.CANNOT_START_CONTROLS)
    try:
        os.chdir("queue")
    except OSError:
        return _say(log.CANNOT_START_QUEUE)
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_IGN)  # retries are qmail-send's; ALRM must not kill this one
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.umask(0o077)
    todo = Todo(controls, _home.install().split, qmail_send._clock)
    todo.wake = wake_r
    signal.signal(signal.SIGTERM, lambda signum, frame: setattr(todo, "exitasap", True))
    signal.signal(signal.SIGHUP, lambda signum, frame: setattr(todo, "readasap", True))
    todo.trigger_set()
    todo.nexttodorun = todo.clock()
    while not todo.done():
        todo.step(qmail_home=qmail_home)
    todo.finish()
    return 0
