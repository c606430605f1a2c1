"""matchup's core: qmail-send log lines in, qmailanalog's m and d lines out (no I/O).

A log line is a timestamp, then one of qmail-log(5)'s reports. The timestamp
is the numeric 'seconds.fraction' of accustamp and tai64n2tai, or multilog's
'@' + 24 hex digits TAI64N label, which is rewritten to the numeric form
(unix seconds, six digits of microseconds) so the z programs can do sums on it.

Output (qmailanalog's MATCHUP format):

    m birth done bytes nk nd nz sender qp uid
    d result birth dstart dend bytes sender chan.recip qp uid reason

with result k (success), d (failure) or z (deferral). What is still in
progress at the end is written by `pending` in matchup's own input format
(info, extra and starting delivery lines), to be fed back in next time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from pyqmail.svc.tai64 import OFFSET

MASK64 = (1 << 64) - 1
MAX_LINE = 1 << 20  # a longer log line is no qmail-send report: it is skipped
CHUNK = 1 << 16

_DIGITS = re.compile(rb"[0-9]*")
_TAI64N = re.compile(rb"@[0-9a-fA-F]{24}")
# matchup splits on space, tab, newline and (being C) NUL
_SEPARATORS = bytes.maketrans(b"\t\n\0", b"   ")


def scan_ulong(text: bytes) -> int:
    """Return the leading decimal digits of text as an unsigned 64-bit number (0 if none), wrapping as C does."""
    digits = _DIGITS.match(text).group()  # type: ignore[union-attr]  # [0-9]* always matches
    if len(digits) <= 19:
        return int(digits) if digits else 0
    value = 0
    for i in range(0, len(digits), 18):
        chunk = digits[i:i + 18]
        value = (value * 10 ** len(chunk) + int(chunk)) & MASK64
    return value


def numeric_stamp(stamp: bytes) -> bytes:
    """Return a TAI64N label as 'seconds.microseconds' since the epoch; any other stamp unchanged."""
    if len(stamp) != 25 or not _TAI64N.fullmatch(stamp):
        return stamp
    value = int(stamp[1:], 16)
    unix = (value >> 32) - OFFSET
    micro = (value & 0xFFFFFFFF) // 1000
    if micro > 999999:  # not a valid nanosecond count: keep what the label says, capped
        micro = 999999
    return b"%d.%06d" % (unix, micro)


def fields(line: bytes) -> list[bytes]:
    """Split a log line into words as matchup does."""
    return [f for f in line.translate(_SEPARATORS).split(b" ") if f]


@dataclass(slots=True)
class _Message:
    id: int
    birth: bytes
    sender: bytes
    size: int
    qp: int
    uid: int
    nk: int = 0
    nd: int = 0
    nz: int = 0


@dataclass(slots=True)
class _Delivery:
    id: int
    msg: int
    start: bytes
    chan: bytes
    recip: bytes


class Matchup:
    """The state of matchup between log lines: messages and deliveries seen but not finished.

    Messages and deliveries are kept in arrays from which a finished one is
    removed by moving the last into its place, as matchup does, so that the
    pending lines come out in matchup's order.
    """

    def __init__(self) -> None:
        self.msgs: list[_Message] = []
        self.msg_at: dict[int, int] = {}
        self.dels: list[_Delivery] = []
        self.del_at: dict[int, int] = {}

    # -- the two arrays ---------------------------------------------------
    def _msg_kill(self, i: int) -> None:
        gone = self.msgs[i]
        last = self.msgs.pop()
        del self.msg_at[gone.id]
        if last is not gone:
            self.msgs[i] = last
            self.msg_at[last.id] = i

    def _del_kill(self, i: int) -> None:
        gone = self.dels[i]
        last = self.dels.pop()
        del self.del_at[gone.id]
        if last is not gone:
            self.dels[i] = last
            self.del_at[last.id] = i

    # -- one line ---------------------------------------------------------
    def line(self, raw: bytes) -> bytes:
        """Take one complete log line (with its newline); return what matchup prints for it."""
        f = fields(raw)
        f += [b""] * (12 - len(f))
        word = f[1]
        if word == b"status:" or word in (b"number", b"local", b"remote"):
            return b""
        if word == b"starting":
            self._starting(f)
            return b""
        if word == b"delivery":
            return self._delivery(f)
        if word == b"new":
            i = self.msg_at.get(scan_ulong(f[3]))
            if i is not None:
                self._msg_kill(i)
            return b""
        if word == b"end":
            return self._end(f)
        if word == b"info":
            self._info(f)
            return b""
        if word == b"extra":
            i = self.msg_at.get(scan_ulong(f[2]))
            if i is not None:
                m = self.msgs[i]
                m.nk, m.nz, m.nd = scan_ulong(f[3]), scan_ulong(f[4]), scan_ulong(f[5])
            return b""
        if word in (b"running", b"exiting"):
            self.dels.clear()
            self.del_at.clear()
            return b""
        if word in (b"warning:", b"alert:"):
            return raw
        return b"? " + raw

    def _starting(self, f: list[bytes]) -> None:
        d = scan_ulong(f[3])
        delivery = _Delivery(d, scan_ulong(f[5]), numeric_stamp(f[0]), f[7], f[8].lower())
        i = self.del_at.get(d)
        if i is None:
            self.del_at[d] = len(self.dels)
            self.dels.append(delivery)
        else:
            self.dels[i] = delivery

    def _delivery(self, f: list[bytes]) -> bytes:
        i = self.del_at.get(scan_ulong(f[2]))
        if i is None:
            return b""
        d = self.dels[i]
        mi = self.msg_at.get(d.msg)
        m = self.msgs[mi] if mi is not None else None
        status = f[3]
        result, reason = b"?", b""
        if status.startswith(b"succ"):
            result, reason = b"d k ", f[4]
            if m is not None:
                m.nk += 1
        elif status.startswith(b"fail"):
            result, reason = b"d d ", f[4]
            if m is not None:
                m.nd += 1
        elif status.startswith(b"defer"):
            result, reason = b"d z ", f[4]
            if m is not None:
                m.nz += 1
        elif status.startswith(b"report"):
            result, reason = b"d z ", b"report_mangled"
            if m is not None:
                m.nz += 1
        end = numeric_stamp(f[0])
        if m is not None:
            out = b"%s%s %s %s %d %s %s.%s %d %d %s\n" % (
                result, m.birth, d.start, end, m.size, m.sender, d.chan, d.recip, m.qp, m.uid, reason)
        else:
            out = b"%s%s %s %s 0 ? %s.%s ? ? %s\n" % (result, d.start, d.start, end, d.chan, d.recip, reason)
        self._del_kill(i)
        return out

    def _end(self, f: list[bytes]) -> bytes:
        i = self.msg_at.get(scan_ulong(f[3]))
        if i is None:
            return b""
        m = self.msgs[i]
        out = b"m %s %s %d %d %d %d %s %d %d\n" % (
            m.birth, numeric_stamp(f[0]), m.size, m.nk, m.nd, m.nz, m.sender, m.qp, m.uid)
        self._msg_kill(i)
        return out

    def _info(self, f: list[bytes]) -> None:
        mid = scan_ulong(f[3])
        m = _Message(mid, numeric_stamp(f[0]), f[7].lower(), scan_ulong(f[5]), scan_ulong(f[9]), scan_ulong(f[11]))
        i = self.msg_at.get(mid)
        if i is None:
            self.msg_at[mid] = len(self.msgs)
            self.msgs.append(m)
        else:
            self.msgs[i] = m

    def pending(self, partial: bytes = b"") -> bytes:
        """Return the lines that carry the unfinished work over to the next run, then partial (an unended last line)."""
        out = []
        for m in self.msgs:
            out.append(b"%s info msg %d: bytes %d from %s qp %d uid %d\n" % (
                m.birth, m.id, m.size, m.sender, m.qp, m.uid))
            out.append(b"%s extra %d %d %d %d\n" % (m.birth, m.id, m.nk, m.nz, m.nd))
        for d in self.dels:
            out.append(b"%s starting delivery %d: msg %d to %s %s\n" % (d.start, d.id, d.msg, d.chan, d.recip))
        out.append(partial)
        return b"".join(out)


def read_lines(fd: int, max_line: int = MAX_LINE) -> Iterator[bytes]:
    """Yield the complete lines of fd (newline included), then one last unended line (maybe b"").

    A line longer than max_line is dropped whole: the reader never holds more
    than max_line bytes of one line.
    """
    pending = b""
    skipping = False
    while True:
        data = os.read(fd, CHUNK)
        if not data:
            break
        if skipping:
            nl = data.find(b"\n")
            if nl < 0:
                continue
            data = data[nl + 1:]
            skipping = False
        pending += data
        lines = pending.split(b"\n")
        pending = lines.pop()
        for x in lines:
            yield x + b"\n"
        if len(pending) > max_line:
            pending = b""
            skipping = True
    yield b"" if skipping else pending
