"""qmail's lock/tcpto table: which hosts recently timed out (qmail-tcpto(8)).

The file holds up to 64 records of 16 bytes. A record is the IPv4 address
(bytes 0-3), the number of recent timeouts (byte 4, at most 10) and the time
of the last counted timeout (bytes 8-11, little-endian seconds). The other
bytes are zero. qmail-remote skips a host whose record counts two or more
timeouts, the last less than about an hour ago (64 * (60 + pid % 32)
seconds); a timeout within two minutes of the last counted one is not
counted again. A successful connection zeroes the count.

IPv6 hosts (issue 18.1) go in a second file, lock/tcpto6, of the same
logic with 32-byte records: the address (bytes 0-15), the count (byte 16),
the time (bytes 24-27). A file of its own, not records in lock/tcpto:
C qmail's qmail-remote compares the first 4 bytes of every record with
its IPv4 address and C qmail-tcpto prints them, so IPv6 records there
would be read as IPv4 hosts; C tools never open tcpto6.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass

RECORD = 16
SIZE = 1024
MAX_COUNT = 10
RECOUNT_AFTER = 120


@dataclass(frozen=True, slots=True)
class Layout:
    """Where a record's fields are: its size, the address length, the count and time offsets."""

    record: int
    alen: int
    count: int
    when: int
    size: int


V4 = Layout(record=16, alen=4, count=4, when=8, size=1024)
V6 = Layout(record=32, alen=16, count=16, when=24, size=2048)


def records(buf: bytes | bytearray, lay: Layout = V4) -> int:
    """Return how many whole records buf holds."""
    return len(buf) // lay.record


def _when(buf: bytes | bytearray, i: int, lay: Layout = V4) -> int:
    at = i * lay.record + lay.when
    return int.from_bytes(buf[at:at + 4], "little")


def _count(buf: bytes | bytearray, i: int, lay: Layout = V4) -> int:
    c = buf[i * lay.record + lay.count]
    return c - 256 if c >= 128 else c  # qmail reads it as a (signed) char


def _find(buf: bytes | bytearray, ip: bytes, lay: Layout = V4) -> int:
    for i in range(records(buf, lay)):
        if buf[i * lay.record:i * lay.record + lay.alen] == ip:
            return i
    return -1


def skip(buf: bytes, ip: bytes, now: int, pid: int, lay: Layout = V4) -> tuple[bool, bool]:
    """Return (skip this host, it has a record) for address ip (4 or 16 bytes, as lay) at time now."""
    i = _find(buf, ip, lay)
    if i < 0:
        return False, False
    if _count(buf, i, lay) >= 2 and now - _when(buf, i, lay) < (60 + (pid & 31)) << 6:
        return True, True
    return False, True


def _stamp(rec: bytearray, now: int, lay: Layout = V4) -> None:
    rec[lay.when:lay.when + 4] = (now & 0xFFFFFFFF).to_bytes(4, "little")


def update(buf: bytes, ip: bytes, timed_out: bool, was_there: bool, now: int,
           lay: Layout = V4) -> tuple[int, bytes] | None:
    """Return (record index, new record) after a connection attempt, or None to leave the file alone."""
    if not timed_out and not was_there:
        return None  # qmail: could have been added meanwhile, not worth checking
    size, cnt = lay.record, lay.count
    i = _find(buf, ip, lay)
    if i >= 0:
        rec = bytearray(buf[i * size:(i + 1) * size])
        if not timed_out:
            rec[cnt] = 0
        else:
            if _count(buf, i, lay) and now < RECOUNT_AFTER + _when(buf, i, lay):
                return None
            rec[cnt] = min((rec[cnt] + 1) & 0xFF, MAX_COUNT)
            _stamp(rec, now, lay)
        return i, bytes(rec)
    if not timed_out:
        return None
    n = records(buf, lay)
    free = next((k for k in range(n) if not buf[k * size + cnt]), -1)
    if free < 0:
        # Full: replace the record that will expire first.
        best = -1
        best_when = 0
        for k in range(n):
            w = _when(buf, k, lay) + (_count(buf, k, lay) << 10)
            if best < 0 or w < best_when:
                best, best_when = k, w
        free = best
    if free < 0:
        return None
    rec = bytearray(buf[free * size:(free + 1) * size])
    rec[0:lay.alen] = ip
    _stamp(rec, now, lay)
    rec[cnt] = 1
    return free, bytes(rec)


def entries(buf: bytes, lay: Layout = V4) -> list[tuple[bytes, int, int]]:
    """Return (address, recent timeouts, time) of every record counting a timeout."""
    out = []
    for i in range(records(buf, lay)):
        if _count(buf, i, lay) >= 1:
            at = i * lay.record
            out.append((bytes(buf[at:at + lay.alen]), buf[at + lay.count], _when(buf, i, lay)))
    return out


class Table:
    """The lock/tcpto file of one installation, as qmail-remote uses it; errors make it a no-op."""

    def __init__(self, path: str, pid: int | None = None, lay: Layout = V4) -> None:
        self.path = path
        self.lay = lay
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
                buf = f.read(self.lay.size)
        except OSError:
            os.close(lockfd)
            return None
        if not records(buf, self.lay):
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
        skipped, self._was_there = skip(got[1], ip, now, self.pid, self.lay)
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
            change = update(buf, ip, timed_out, self._was_there, now, self.lay)
            if change is not None:
                os.pwrite(lockfd, change[1], change[0] * self.lay.record)
        except OSError:
            pass  # as qmail: the table is advice, a failed update only costs a retry
        finally:
            os.close(lockfd)
