"""mbox delivery as qmail-local does it: flock, From_ line, >From quoting, truncate back on error.

The file is opened for appending (created 0600 under qmail-local's umask),
locked with flock(2) for at most 30 seconds, and the message appended after
the From_, Return-Path and Delivered-To lines, every line matching
``^>*From `` quoted with one more '>', a newline added to an unterminated
last line, and one blank line after the message. If anything fails after the
lock was taken, the file is truncated back to its old length.

`deliver` answers with an outcome and the error behind it; the words are
qmail-local's.
"""

from __future__ import annotations

import fcntl
import os
import time

from pyqmail import durable
from pyqmail import sig as signal
from pyqmail.durable import write_all

# Outcomes of a delivery.
OK = 0
OPEN_ERROR = 1  # "Unable to open FILE: ERR. (#4.2.1)"
LOCK_TIMEOUT = 2  # "File has been locked for 30 seconds straight. (#4.3.0)"
READ_ERROR = 3  # "Unable to read message: ERR. (#4.3.0)"
WRITE_ERROR = 4  # "Unable to write FILE: ERR. (#4.3.0)"

LOCK_SECONDS = 30
_CHUNK = 65536
_FROM = b"From "
_DAYS = (b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun")  # time.struct_time counts from Monday
_MONTHS = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec")


def ctime(when: float) -> bytes:
    """Return qmail's myctime for a From_ line: 'Sun Nov 22 05:06:07 2026\\n' in UTC, the day zero-padded."""
    t = time.gmtime(when)
    return b"%s %s %02d %02d:%02d:%02d %d\n" % (
        _DAYS[t.tm_wday], _MONTHS[t.tm_mon - 1], t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec, t.tm_year)


class _Timeout(Exception):
    """The lock was not granted in time."""


def _alarm(signum: int, frame: object) -> None:
    raise _Timeout


class FromQuoter:
    """Stream filter: put '>' before every line that matches ``^>*From ``."""

    __slots__ = ("_partial", "_fresh", "_in_prefix")

    def __init__(self) -> None:
        self._partial = b""  # the bytes of "From " seen so far after the line's '>'s
        self._fresh = True  # nothing of the current line seen yet
        self._in_prefix = True  # still deciding whether the current line needs quoting

    def feed(self, data: bytes) -> bytes:
        """Return the quoted form of data, holding back at most four bytes of an undecided line start."""
        out = bytearray()
        i = 0
        n = len(data)
        while i < n:
            if self._in_prefix:
                if not self._partial and data[i] == 0x3E:  # '>'
                    # Quoting puts one more '>' in front of a run of them, which
                    # is the same bytes as one more '>' after it: pass the run on.
                    j = i
                    while j < n and data[j] == 0x3E:
                        j += 1
                    out += data[i:j]
                    self._fresh = False
                    i = j
                    continue
                want = _FROM[len(self._partial)]
                if data[i] == want:
                    self._partial += data[i:i + 1]
                    self._fresh = False
                    i += 1
                    if self._partial == _FROM:
                        out += b">" + _FROM
                        self._partial = b""
                        self._in_prefix = False
                    continue
                out += self._partial
                self._partial = b""
                self._in_prefix = False
            nl = data.find(b"\n", i)
            if nl < 0:
                out += data[i:]
                self._fresh = False
                break
            out += data[i:nl + 1]
            i = nl + 1
            self._fresh = True
            self._in_prefix = True
        return bytes(out)

    def end(self) -> bytes:
        """Return what is held back, and a newline if the last line lacked one."""
        out = self._partial
        self._partial = b""
        if not self._fresh:
            out += b"\n"
        self._fresh = True
        self._in_prefix = True
        return out


def deliver(path: bytes, message_fd: int, head: bytes,
            lock_seconds: int = LOCK_SECONDS) -> tuple[int, OSError | None]:
    """Append head and the quoted message (from message_fd's offset) to mbox path.

    Return (OK, None) or a failure outcome with the error behind it (None
    for LOCK_TIMEOUT). The lock wait uses SIGALRM; the caller's handler is
    restored on return.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        return OPEN_ERROR, e
    try:
        return _deliver_locked(fd, message_fd, head, lock_seconds)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # qmail-local does not check this close: the data was fsync'd, or the delivery failed already


def _deliver_locked(fd: int, message_fd: int, head: bytes, lock_seconds: int) -> tuple[int, OSError | None]:
    old_handler = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(lock_seconds)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError:
            # As qmail: a file that cannot be flock'd (some special files, some
            # NFS mounts) is written unlocked, and not truncated on error.
            locked = False
        signal.alarm(0)
    except _Timeout:
        return LOCK_TIMEOUT, None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_handler)
    try:
        pos = os.lseek(fd, 0, os.SEEK_END)
    except OSError:
        pos = -1  # a pipe or a terminal: appended to all the same, never truncated
    outcome, err = _append(fd, message_fd, head)
    if outcome != OK and locked and pos >= 0:
        try:
            os.ftruncate(fd, pos)
        except OSError:
            pass  # nothing more can be done: the failure is reported either way
    return outcome, err


def _append(fd: int, message_fd: int, head: bytes) -> tuple[int, OSError | None]:
    quoter = FromQuoter()
    out = bytearray(head)
    while True:
        try:
            chunk = os.read(message_fd, _CHUNK)
        except OSError as e:
            return READ_ERROR, e
        if not chunk:
            break
        out += quoter.feed(chunk)
        if len(out) >= _CHUNK:
            try:
                write_all(fd, out)
            except OSError as e:
                return WRITE_ERROR, e
            out.clear()
    out += quoter.end() + b"\n"
    try:
        write_all(fd, out)
        durable.fsync(fd)
    except OSError as e:
        return WRITE_ERROR, e
    return OK, None
