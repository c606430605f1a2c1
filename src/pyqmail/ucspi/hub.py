"""Several sessions in one tcpserver worker, each in a greenlet, switched where it waits.

A session is the program's main running as in a process of its own: it reads
descriptors 0 and 1, the environment, and waits through pyqmail.wait. The hub
gives it those: before a session runs, the environment it left (or tcpserver's,
for a new one) is put back and its socket is dup'd onto 0 and 1; when it waits,
the hub's poll takes the wait over and runs whichever session is ready next.
Nothing runs at the same time (one greenlet at a time, no threads): a session
is switched only inside a wait, so its environment and descriptors are its own
between waits, as in a process. A step that blocks without pyqmail.wait (a DNS
query through dnspython, a child waited for) holds the other sessions of the
worker meanwhile; tcpserver spreads connections over several workers so that
this stays short (pyqmail.ucspi.tcpserver, Server.pick).
"""

from __future__ import annotations

import heapq
import os
import posix
import select
import time
from collections import deque
from typing import TYPE_CHECKING

import greenlet

from pyqmail import sig as signal
from pyqmail import spawn
from pyqmail import wait as _wait

if TYPE_CHECKING:
    from collections.abc import Callable

_ENVIRON: dict[bytes, bytes] = posix.environ  # what os.environb wraps
_fork_hook = False  # _forget_hub registered with os.register_at_fork (once per process)


def _forget_hub() -> None:
    """In a child forked inside a session (spawn's fork-and-call of qmail-queue, a checkprogram, a
    $QMAILQUEUE filter): no hub. Its waits are a process's own; switching to the worker's loop
    there would run the worker's other sessions in the child."""
    _wait.hub = None


class Session:
    """One connection: its socket (a descriptor of the worker's own), its environment, its greenlet."""

    __slots__ = ("fd", "env", "glet", "timer", "waiting", "code")

    def __init__(self, fd: int, env: dict[bytes, bytes]) -> None:
        self.fd = fd
        self.env = env
        self.glet: greenlet.greenlet | None = None
        self.timer = 0  # the number of its pending timer (0: none)
        self.waiting = -1  # the descriptor it waits for (-1: none)
        self.code = 0


class Hub:
    """The worker's loop over its sessions' waits (one poll), with their timers."""

    def __init__(self, null: int, clock: Callable[[], float] = time.monotonic) -> None:
        global _fork_hook
        if not _fork_hook:
            os.register_at_fork(after_in_child=_forget_hub)
            _fork_hook = True
        self.null = null
        self.clock = clock
        self.main = greenlet.getcurrent()
        self.poller = select.poll()
        self.waits: dict[int, Session] = {}  # descriptor -> the session waiting for it
        self.timers: list[tuple[float, int, Session]] = []
        self.serial = 0
        self.runnable: deque[tuple[Session, bool]] = deque()
        self.current: Session | None = None
        self.installed: Session | None = None  # whose environment and descriptors 0 and 1 are in place
        self.sessions = 0
        self.sigint: Callable[[int, object], None] | None = None  # the worker's SIGINT handler (run_many)

    # -- sessions ---------------------------------------------------------------

    def start(self, fd: int, env: dict[bytes, bytes], run: Callable[[], int],
              ended: Callable[[Session], None]) -> None:
        """Run run() as a new session on socket fd, starting from env; ended(session) once it returns."""
        os.set_inheritable(fd, False)  # what the session starts gets its socket on 0 and 1 only
        s = Session(fd, env)

        def body(_started: object = None) -> None:
            try:
                s.code = run()
            finally:
                # Reported before the client sees the end (as tcpserver's workers do): a
                # client that connects again at once finds the worker with room.
                self.sessions -= 1
                try:
                    ended(s)
                finally:
                    self.finish(s)

        s.glet = greenlet.greenlet(body, parent=self.main)
        self.sessions += 1
        self.resume(s, True)

    def finish(self, s: Session) -> None:
        """A session has ended: its socket closed, 0 and 1 no longer on it (the client sees the end)."""
        if self.installed is s:
            self.installed = None
            os.dup2(self.null, 0)
            os.dup2(self.null, 1)
        try:
            os.close(s.fd)
        except OSError:
            pass
        s.fd = -1

    def install(self, s: Session) -> None:
        """Put s's environment and socket in place (the process state a session may read between waits)."""
        if self.installed is s:
            return
        prev = self.installed
        if prev is not None:
            prev.env = dict(_ENVIRON)
        spawn.restore_environb(s.env)
        os.dup2(s.fd, 0)
        os.dup2(s.fd, 1)
        self.installed = s
        for put_back in _wait.resumed:
            put_back()

    def resume(self, s: Session, value: bool) -> None:
        """Run s until it waits again or ends."""
        glet = s.glet
        if glet is None or glet.dead:
            return
        self.install(s)
        self.current = s
        try:
            glet.switch(value)
        finally:
            self.current = None
            # A session's start (spawn.call) makes SIGINT raise KeyboardInterrupt again, as in
            # a new process; there the program's crash shim would end that one session and
            # the worker would go on with the others. The worker's own handler is put back
            # as soon as the session waits (a window: the session's code before its first wait).
            if self.sigint is not None and signal.getsignal(signal.SIGINT) is not self.sigint:
                signal.signal(signal.SIGINT, self.sigint)

    # -- the waits (pyqmail.wait's hub) ----------------------------------------

    def wait(self, fd: int, event: int, ms: int) -> bool | None:
        """In a session: wait for event on fd (0 and 1 are its socket) up to ms; None outside a session."""
        s = self.current
        if s is None or s.glet is not greenlet.getcurrent():
            return None
        real = s.fd if fd in (0, 1) else fd
        if ms == 0:
            p = select.poll()
            p.register(real, event)
            return bool(p.poll(0))
        self.poller.register(real, event | select.POLLHUP | select.POLLERR)
        self.waits[real] = s
        s.waiting = real
        if ms > 0:
            self.add_timer(s, ms / 1000)
        return bool(self.main.switch())

    def sleep(self, seconds: float) -> bool:
        """In a session: let seconds pass while the others run; False outside a session."""
        s = self.current
        if s is None or s.glet is not greenlet.getcurrent():
            return False
        self.add_timer(s, max(seconds, 0.0))
        self.main.switch()
        return True

    def add_timer(self, s: Session, seconds: float) -> None:
        self.serial += 1
        s.timer = self.serial
        heapq.heappush(self.timers, (self.clock() + seconds, self.serial, s))

    def wake(self, s: Session, value: bool) -> None:
        """s's wait is over (value: its descriptor is ready); run it next."""
        if s.waiting >= 0:
            self.poller.unregister(s.waiting)
            del self.waits[s.waiting]
            s.waiting = -1
        s.timer = 0
        self.runnable.append((s, value))

    # -- the loop ---------------------------------------------------------------

    def timeout_ms(self) -> int:
        """Milliseconds until the next timer is due (-1: none; 0: sessions are ready now)."""
        if self.runnable:
            return 0
        while self.timers and self.timers[0][2].timer != self.timers[0][1]:
            heapq.heappop(self.timers)  # cancelled: its session was woken otherwise
        if not self.timers:
            return -1
        left = self.timers[0][0] - self.clock()
        return max(0, min(int(left * 1000) + 1, _wait.POLL_MAX_MS))

    def poll(self, ms: int) -> list[tuple[int, int]]:
        """Poll once (the caller's own descriptors are registered on self.poller too); run the sessions
        whose waits are over; return the events of descriptors that are not sessions'."""
        try:
            events = self.poller.poll(ms)
        except InterruptedError:
            events = []
        others = []
        for fd, ev in events:
            s = self.waits.get(fd)
            if s is None:
                others.append((fd, ev))
            else:
                self.wake(s, True)
        now = self.clock()
        while self.timers and self.timers[0][0] <= now:
            _, serial, s = heapq.heappop(self.timers)
            if s.timer == serial:
                self.wake(s, False)
        while self.runnable:
            s, value = self.runnable.popleft()
            self.resume(s, value)
        return others
