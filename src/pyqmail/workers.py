"""What the daemons' reused workers share (issue 17): reaping, descriptor census, SCM_RIGHTS.

qmail-queued, qmail-rcptcheckd, qmail-lspawn and qmail-rspawn fork workers
that serve one event after another. Each must reap what has ended without
blocking, check between events that no descriptor was left behind, and take
the descriptors an event arrives with. Only os, array and _socket: socket.py
imports enum and selectors, which these daemons keep out (their forks stay
lean).
"""

from __future__ import annotations

import os
from _socket import SCM_RIGHTS, SOL_SOCKET
from array import array

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from typing import Protocol, TypeVar

    class _Closable(Protocol):
        def close(self) -> None: ...

    S = TypeVar("S", bound=_Closable)


def reaped() -> Iterator[tuple[int, int]]:
    """Yield (pid, status) of every child that has ended, without waiting for one that has not."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        except InterruptedError:
            continue
        if pid == 0:
            return
        yield pid, status


def open_fds(skip: int = -1) -> set[int] | None:
    """Return this process's open descriptors but skip (None without /proc: then nothing to compare)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    fds = set()
    for name in names:
        fd = int(name)
        if fd == skip:
            continue
        try:
            os.fstat(fd)
        except OSError:
            continue  # the listing's own descriptor, closed again by now
        fds.add(fd)
    return fds


def received_fds(ancillary: Iterable[tuple[int, int, bytes]]) -> list[int]:
    """Return the descriptors that recvmsg's ancillary data carries (SCM_RIGHTS)."""
    fds = array("i")
    for level, kind, data in ancillary:
        if level == SOL_SOCKET and kind == SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return list(fds)


def fork_pair(pair: Callable[[], tuple[S, S]]) -> tuple[int, S, S]:
    """Make a socket pair with pair(), then fork; return (pid, mine, theirs) as os.fork's caller sees them.

    A failed fork closes both ends and raises OSError, as a failed socketpair does.
    """
    mine, theirs = pair()
    try:
        pid = os.fork()
    except OSError:
        mine.close()
        theirs.close()
        raise
    return pid, mine, theirs


def fork_term_blocked() -> int:
    """fork() with SIGTERM blocked across it; return what os.fork returns.

    A daemon whose TERM handler cleans up (removes its socket, stops its
    workers) must not have it run in a child that the signal reaches before
    the child has set its own. In the child, the handlers of TERM, CHLD, ALRM
    and HUP become SIG_DFL and the signal wake-up descriptor is dropped
    before the mask comes back; the parent just gets its mask back. A failed
    fork raises OSError, the mask restored.
    """
    from pyqmail import sig

    old = sig.pthread_sigmask(sig.SIG_BLOCK, {sig.SIGTERM})
    try:
        pid = os.fork()
    except OSError:
        sig.pthread_sigmask(sig.SIG_SETMASK, old)
        raise
    if pid == 0:
        sig.set_wakeup_fd(-1)
        for signum in (sig.SIGTERM, sig.SIGCHLD, sig.SIGALRM, sig.SIGHUP):
            sig.signal(signum, sig.SIG_DFL)
    sig.pthread_sigmask(sig.SIG_SETMASK, old)
    return pid
