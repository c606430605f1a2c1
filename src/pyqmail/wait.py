"""Where a session waits: for a descriptor, or for time.

A program that serves one session per process waits with poll(2) and sleep.
tcpserver's workers serve several sessions in one process (pyqmail.ucspi.hub):
there each session runs in a greenlet, and a wait goes back to the worker's
loop, which runs the other sessions meanwhile. The programs call ready() and
sleep() below and need not know which case they are in. Imports only select
and time (qmail-inject's start-up pays for every module).
"""

from __future__ import annotations

import select
import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable

POLL_MAX_MS = (1 << 31) - 1  # poll() takes a C int: a longer wait (24.8 days) is cut to this


class Hub(Protocol):
    """What a worker serving several sessions provides (pyqmail.ucspi.hub.Hub)."""

    def wait(self, fd: int, event: int, ms: int) -> bool | None: ...

    def sleep(self, seconds: float) -> bool: ...


hub: Hub | None = None  # set in a worker that serves sessions side by side; None again in its forked children

# Run each time a hub puts a session back in place (its environment restored), before it runs:
# module state a program keeps for one session (SPF's DNS servers, pyqmail.smtpd.spf) is put
# back from that session's environment, as the environment itself is. Never run elsewhere.
resumed: list[Callable[[], None]] = []


def ready(fd: int, event: int, ms: int) -> bool:
    """Wait up to ms milliseconds (-1: no limit) for event on fd; return whether it came."""
    h = hub
    if h is not None:
        got = h.wait(fd, event, ms)
        if got is not None:
            return got
    p = select.poll()
    p.register(fd, event)
    return bool(p.poll(ms))


def readable(fd: int, seconds: float) -> bool:
    """Before a blocking read of fd: in a worker serving several sessions, let the others run until
    fd is readable or seconds pass (False then); elsewhere return True at once (the read waits)."""
    if hub is None:
        return True
    return ready(fd, select.POLLIN, max(0, min(int(seconds * 1000) + 1, POLL_MAX_MS)))


def sleep(seconds: float) -> None:
    """Let seconds pass (other sessions run meanwhile in a worker serving several)."""
    h = hub
    if h is not None and h.sleep(seconds):
        return
    time.sleep(seconds)
