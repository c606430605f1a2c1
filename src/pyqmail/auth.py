"""The checkpassword interface, as qmail-popup and qmail-smtpd run it (one helper for both).

`start(args, user, secret, challenge, fds)` runs ``args[0] args...`` (checkprogram
subprogram...) with ``user\\0secret\\0challenge\\0`` readable on its descriptor 3 and
returns its pid; `finish(pid, timeout)` waits for it and returns its exit code:
0 accepted, 1 refused, 111 temporary trouble (checkpassword's own words), -N for
death by signal N, HUNG when it did not end within timeout seconds (it is killed).

The record is written into the pipe before the child starts (it is bounded far
below a pipe's buffer by the callers), so a child that exits without reading it
cannot make the write fail or block.
"""

from __future__ import annotations

import os
import select
import signal

FD_AUTH = 3
ACCEPTED = 0
REFUSED = 1
TEMPORARY = 111
HUNG = -1000  # finish(): the child was still running at the deadline and has been killed
RECORD_MAX = 60000  # bytes of the record: below Linux's 64 KiB pipe buffer

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence


class Trouble(Exception):
    """The child could not be started: what is 'pipe', 'write' or 'fork'; why is the OS's reason."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(what, why)
        self.what = what
        self.why = why


def record(user: bytes, secret: bytes, challenge: bytes) -> bytes:
    """Return what descriptor 3 carries."""
    return user + b"\0" + secret + b"\0" + challenge + b"\0"


def start(args: Sequence[str], user: bytes, secret: bytes, challenge: bytes,
          fds: Mapping[int, int]) -> int:
    """Start checkprogram with the record on descriptor 3; return its pid or raise Trouble.

    fds gives the child's other descriptors (0, 1, 2, as spawn's fds); descriptor 3 is added.
    """
    from pyqmail import spawn

    data = record(user, secret, challenge)
    if len(data) > RECORD_MAX:
        raise Trouble("write", "record too long")
    try:
        rfd, wfd = os.pipe()
    except OSError as e:
        raise Trouble("pipe", e.strerror or str(e)) from None
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(wfd, view):]
        except OSError as e:
            raise Trouble("write", e.strerror or str(e)) from None
        finally:
            os.close(wfd)
        try:
            child_fds = dict(fds)
            child_fds[FD_AUTH] = rfd
            return spawn.spawn(args[0], list(args), fds=child_fds)
        except OSError as e:
            raise Trouble("fork", e.strerror or str(e)) from None
    finally:
        os.close(rfd)


def finish(pid: int, timeout: float | None = None) -> int:
    """Wait for pid at most timeout seconds (None: for ever); return its exit code, -N, or HUNG."""
    from pyqmail import spawn

    if timeout is None:
        return spawn.wait(pid)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return spawn.wait(pid)  # safe: no pidfd (old kernel): wait unbounded, as qmail does
    try:
        from pyqmail import wait

        # Through pyqmail.wait: in a tcpserver worker serving several sessions, the others run
        # while the checkprogram works (a poll here held them all, up to timeout seconds).
        if not wait.ready(pidfd, select.POLLIN, min(max(int(timeout * 1000), 0), wait.POLL_MAX_MS)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # safe: it ended just now; reaped below either way
            spawn.wait(pid)
            return HUNG
    finally:
        os.close(pidfd)
    return spawn.wait(pid)


def check(args: Sequence[str], user: bytes, secret: bytes, challenge: bytes,
          fds: Mapping[int, int], timeout: float | None = None) -> int:
    """start() and finish(): the exit code (0, 1, 111, ...), -N, or HUNG; Trouble if it cannot start."""
    return finish(start(args, user, secret, challenge, fds), timeout)
