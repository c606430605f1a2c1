"""qmail's lock/tcpto table: which hosts recently timed out (qmail-tcpto(8)).

The file holds up to 64 records of 16 bytes. A record is the IPv4 address
(bytes 0-3), the number of recent timeouts (byte 4, at most 10) and the time
of the last counted timeout (bytes 8-11, little-endian seconds). The other
bytes are zero. qmail-remote skips a host whose record counts two or more
timeouts, the last less than about an hour ago (64 * (60 + pid % 32)
seconds); a timeout within two minutes of the last counted one is not
counted again. A successful connection zeroes the count.
"""

from __future__ import annotations

import fcntl
import os

RECORD = 16
SIZE = 1024
MAX_COUNT = 10
RECOUNT_AFTER = 120


def records(buf: bytes | bytearray) -> int:
    """Return how many whole records buf holds."""
    return len(buf) // RECORD


def _when(buf: bytes | bytearray, i: int) -> int:
    return int.from_bytes(buf[i * RECORD + 8:i * RECORD + 12], "little")


def _count(buf: bytes | bytearray, i: int) -> int:
    c = buf[i * RECORD + 4]
    return c - 256 if c >= 128 else c  # qmail reads it as a (signed) char


def _find(buf: bytes | bytearray, ip: bytes) -> int:
    for i in range(records(buf)):
        if buf[i * RECORD:i * RECORD + 4] == ip:
            return i
    return -1


def skip(buf: bytes, ip: bytes, now: int, pid: int) -> tuple[bool, bool]:
    """Return (skip this host, it has a record) for IPv4 address ip at time now."""
    i = _find(buf, ip)
    if i < 0:
        return False, False
    if _count(buf, i) >= 2 and now - _when(buf, i) < (60 + (pid & 31)) << 6:
        return True, True
    return False, True


def _stamp(rec: bytearray, now: int) -> None:
    rec[8:12] = (now & 0xFFFFFFFF).to_bytes(4, "little")


def update(buf: bytes, ip: bytes, timed_out: bool, was_there: bool, now: int) -> tuple[int, bytes] | None:
    """Return (record index, new record) after a connection attempt, or None to leave the file alone."""
    if not timed_out and not was_there:
        return None  # qmail: could have been added meanwhile, not worth checking
    i = _find(buf, ip)
    if i >= 0:
        rec = bytearray(buf[i * RECORD:(i + 1) * RECORD])
        if not timed_out:
            rec[4] = 0
        else:
            if _count(buf, i) and now < RECOUNT_AFTER + _when(buf, i):
                return None
            rec[4] = min((rec[4] + 1) & 0xFF, MAX_COUNT)
            _stamp(rec, now)
        return i, bytes(rec)
    if not timed_out:
        return None
    n = records(buf)
    free = next((k for k in range(n) if not buf[k * RECORD + 4]), -1)
    if free < 0:
        # Full: replace the record that will expire first.
        best = -1
        best_when = 0
        for k in range(n):
            w = _when(buf, k) + (_count(buf, k) << 10)
            if best < 0 or w < best_when:
                best, best_when = k, w
        free = best
    if free < 0:
        return None
    rec = bytearray(buf[free * RECORD:(free + 1) * RECORD])
    rec[0:4] = ip
    _stamp(rec, now)
    rec[4] = 1
    return free, bytes(rec)


def entries(buf: bytes) -> list[tuple[bytes, int, int]]:
    """Return (address, recent timeouts, time) of every record counting a timeout."""
    out = []
    for i in range(records(buf)):
        if _count(buf, i) >= 1:
            out.append((bytes(buf[i * RECORD:i * RECORD + 4]), buf[i * RECORD + 4], _when(buf, i)))
    return out


class Table:
    """The lock/tcpto file of one installation, as qmail-remote uses it; errors make it a no-op."""

    def __init__(self, path: str, pid: int | None = None) -> None:
        self.path = path
        self.pid = os.getpid() if pid is None else pid
        self._was_there = False

    def _read_locked(self) -> tuple[int, bytes] | None:
        """Open the file for writing, lock it and read it; None if any step fails or it is empty."""
        try:
            lockfd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            with open(self.path, "rb") as f:
                fcntl.flock(lockfd, fcntl.LOCK_EX)
                buf = f.read(SIZE)
        except OSError:
            os.close(lockfd)
            return None
        if not records(buf):
            os.close(lockfd)
            return None
        return lockfd, buf

    def skip(self, ip: bytes, now: int) -> bool:
        """Return True if ip timed out too often lately to be worth trying."""
        self._was_there = False
        got = self._read_locked()
        if got is None:
            return False
        os.close(got[0])
        skipped, self._was_there = skip(got[1], ip, now, self.pid)
        return skipped

    def record(self, ip: bytes, timed_out: bool, now: int) -> None:
        """Note the result of a connection attempt to ip (after skip(ip))."""
        if not timed_out and not self._was_there:
            return
        got = self._read_locked()
        if got is None:
            return
        lockfd, buf = got
        try:
            change = update(buf, ip, timed_out, self._was_there, now)
            if change is not None:
                os.pwrite(lockfd, change[1], change[0] * RECORD)
        except OSError:
            pass  # as qmail: the table is advice, a failed update only costs a retry
        finally:
            os.close(lockfd)
