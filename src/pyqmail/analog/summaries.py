"""qmailanalog's summaries and selections over matchup output (pure functions, no I/O).

qmailanalog 0.70 computes these with awk, sort(1) and columnt; to print the
same bytes we keep awk's arithmetic (doubles summed in input order), its
number printing (integers as integers, anything else as %.6g), its
comparisons (numeric when both sides look like numbers, else bytewise), and
sort(1)'s key rules in the C locale. Every function takes the input's lines
(without newlines) and returns the program's whole output.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from decimal import Decimal

# -- awk ---------------------------------------------------------------------

_NUM_PREFIX = re.compile(rb"[ \t\n]*([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)")
_STRNUM = re.compile(rb"[ \t\n]*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[ \t\n]*")
_PLAIN = re.compile(rb"[0-9]+(?:\.[0-9]*)?")
_AWK_BLANKS = bytes.maketrans(b"\t\n", b"  ")


def awk_fields(record: bytes) -> list[bytes]:
    """Split a record as awk's default FS does: on runs of spaces, tabs and newlines."""
    return [f for f in record.translate(_AWK_BLANKS).split(b" ") if f]


def num(text: bytes) -> float:
    """Return the number awk reads from text: its longest numeric prefix, or 0."""
    if _PLAIN.fullmatch(text):
        return float(text)
    m = _NUM_PREFIX.match(text)
    return float(m.group(1)) if m else 0.0


def looks_numeric(text: bytes) -> bool:
    """Say whether awk treats a field of this text as a number in comparisons."""
    return _STRNUM.fullmatch(text) is not None


def awk_less(a: bytes, b: bytes) -> bool:
    """Return a < b for two fields, compared as awk compares them."""
    if looks_numeric(a) and looks_numeric(b):
        return num(a) < num(b)
    return a < b


def awk_equal(a: bytes, b: bytes) -> bool:
    """Return a == b for two fields (or a field and a command-line assignment), as awk compares them."""
    if looks_numeric(a) and looks_numeric(b):
        return num(a) == num(b)
    return a == b


def fmt(value: float) -> bytes:
    """Return a number as awk's print writes it: an integral value in full, anything else with %.6g."""
    if math.isfinite(value) and value.is_integer():
        return b"%d" % int(value)
    return b"%.6g" % value


def _field(f: list[bytes], n: int) -> bytes:
    """Return awk's $n (1-based) of split fields, b"" past the end."""
    return f[n - 1] if n <= len(f) else b""


# -- sort(1), C locale -------------------------------------------------------

_SORT_NUM = re.compile(rb"[ \t]*(-?)([0-9]*)(?:\.([0-9]*))?")


def _key_start(line: bytes, n: int) -> bytes:
    """Return line from field n (1-based) on, fields being sort's: leading blanks, then non-blanks."""
    pos, end = 0, len(line)
    for _ in range(n - 1):
        while pos < end and line[pos] in b" \t":
            pos += 1
        while pos < end and line[pos] not in b" \t":
            pos += 1
    return line[pos:]


def _sort_number(key: bytes) -> Decimal:
    """Return the number sort -n reads at the start of key (no exponents, 0 if none)."""
    m = _SORT_NUM.match(key)
    assert m is not None  # every part is optional
    whole, frac = m.group(2), m.group(3) or b""
    if not whole and not frac:
        return Decimal(0)
    return Decimal((m.group(1) + (whole or b"0") + b"." + (frac or b"0")).decode("ascii"))


def sort_lines(lines: Iterable[bytes], field: int = 1, numeric: bool = False, reverse: bool = False) -> list[bytes]:
    """Return lines as `sort [-n] [-r] -k FIELD` orders them, ties broken by the whole line."""
    key: Callable[[bytes], tuple[object, bytes]]
    if numeric:
        def key(line: bytes) -> tuple[object, bytes]:
            return _sort_number(_key_start(line, field)), line
    else:
        def key(line: bytes) -> tuple[object, bytes]:
            return _key_start(line, field), line
    return sorted(lines, key=key, reverse=reverse)


# -- columnt -----------------------------------------------------------------

def columnt(data: bytes) -> bytes:
    """Return data with its blank-separated columns aligned as qmailanalog's columnt does.

    Every column but the last is right-aligned to its widest entry and followed
    by two spaces; the last column of the widest line is printed as it is.
    """
    if not data:
        return b""
    if not data.endswith(b"\n"):
        data += b"\n"
    rows = [[f for f in line.replace(b"\t", b" ").split(b" ") if f] for line in data[:-1].split(b"\n")]
    last = max((len(r) - 1 for r in rows), default=-1)
    width = [0] * (last + 1)
    for r in rows:
        for i, f in enumerate(r):
            width[i] = max(width[i], len(f))
    out = []
    for r in rows:
        parts = []
        for i, f in enumerate(r):
            if i < last:
                parts.append(f.rjust(width[i]) + b"  ")
            else:
                parts.append(f)
        out.append(b"".join(parts) + b"\n")
    return b"".join(out)


def _table(head: bytes, columns: bytes, rows: list[bytes], underscores: bool = False) -> bytes:
    """Return head, then the column names and rows aligned by columnt (with tr _ ' ' if asked)."""
    body = columnt(columns + b"\n" + b"".join(r + b"\n" for r in rows))
    if underscores:
        body = body.replace(b"_", b" ")
    return head + body


def _line(*values: bytes) -> bytes:
    """Return awk's `print a, b, ...` without the newline."""
    return b" ".join(values)


# -- zoverall ----------------------------------------------------------------

OVERALL_HEAD = b"""Basic statistics

qtime is the time spent by a message in the queue.

ddelay is the latency for a successful delivery to one recipient---the
end of successful delivery, minus the time when the message was queued.

xdelay is the latency for a delivery attempt---the time when the attempt
finished, minus the time when it started. The average concurrency is the
total xdelay for all deliveries divided by the time span; this is a good
measure of how busy the mailer is.

"""


class Overall:
    """zoverall's running totals; feed matchup lines, then `text()` or read the figures."""

    def __init__(self) -> None:
        self.messages = 0
        self.recips = 0.0
        self.tries = 0.0
        self.deliveries = 0
        self.succ = 0
        self.fail = 0
        self.mbytes = 0.0
        self.rbytes = 0.0
        self.qtime = 0.0
        self.ddelay = 0.0
        self.xdelay = 0.0
        self.first: bytes | None = None
        self.last: bytes | None = None

    def _span(self, lo: bytes, hi: bytes) -> None:
        if self.first is None or awk_less(lo, self.first):
            self.first = lo
        if self.last is None or awk_less(self.last, hi):
            self.last = hi

    def feed(self, record: bytes) -> None:
        """Count one line of matchup output."""
        if record.startswith(b"m"):
            f = awk_fields(record)
            f += [b""] * (10 - len(f))
            size, nk, nd, nz = num(f[3]), num(f[4]), num(f[5]), num(f[6])
            self.messages += 1
            self.mbytes += size
            self.rbytes += size * nk
            self.qtime += num(f[2]) - num(f[1])
            self.recips += nk + nd
            self.tries += nk + nd + nz
            self._span(f[1], f[2])
        elif record.startswith(b"d"):
            f = awk_fields(record)
            f += [b""] * (10 - len(f))
            if record.startswith(b"d k"):
                self.succ += 1
                self.ddelay += num(f[4]) - num(f[2])
            elif record.startswith(b"d d"):
                self.fail += 1
            self.deliveries += 1
            self.xdelay += num(f[4]) - num(f[3])
            self._span(f[2], f[4])

    @property
    def span(self) -> float | None:
        """Seconds from the first to the last time seen, or None unless last > first."""
        if self.first is None or self.last is None or not awk_less(self.first, self.last):
            return None
        return num(self.last) - num(self.first)

    def figures(self) -> list[tuple[str, bytes]]:
        """Return zoverall's lines after the header as (label, value); label "" for the blank line."""
        out: list[tuple[str, bytes]] = [("Completed messages:", b"%d" % self.messages)]
        if self.messages:
            out += [
                ("Recipients for completed messages:", fmt(self.recips)),
                ("Total delivery attempts for completed messages:", fmt(self.tries)),
                ("Average delivery attempts per completed message:", fmt(self.tries / self.messages)),
                ("Bytes in completed messages:", fmt(self.mbytes)),
                ("Bytes weighted by success:", fmt(self.rbytes)),
                ("Average message qtime (s):", fmt(self.qtime / self.messages)),
            ]
        out.append(("", b""))
        out.append(("Total delivery attempts:", b"%d" % self.deliveries))
        if self.deliveries:
            out += [
                ("  success:", b"%d" % self.succ),
                ("  failure:", b"%d" % self.fail),
                ("  deferral:", b"%d" % (self.deliveries - self.succ - self.fail)),
                ("Total ddelay (s):", b"%.6f" % self.ddelay),
            ]
            if self.succ:
                out.append(("Average ddelay per success (s):", b"%.6f" % (self.ddelay / self.succ)))
            out.append(("Total xdelay (s):", b"%.6f" % self.xdelay))
            out.append(("Average xdelay per delivery attempt (s):", b"%.6f" % (self.xdelay / self.deliveries)))
            span = self.span
            if span is not None:
                out.append(("Time span (days):", fmt(span / 86400)))
                # Texts that are no numbers can compare greater yet subtract to 0;
                # awk dies dividing there, we leave the line out.
                if span:
                    out.append(("Average concurrency:", fmt(self.xdelay / span)))
        return out

    def text(self) -> bytes:
        """Return zoverall's whole output."""
        lines = [(label.encode() + b" " + value if label else b"") + b"\n" for label, value in self.figures()]
        return OVERALL_HEAD + b"".join(lines)


def zoverall(records: Iterable[bytes]) -> bytes:
    """Return zoverall's report."""
    o = Overall()
    for r in records:
        o.feed(r)
    return o.text()


# -- zddist ------------------------------------------------------------------

DDIST_HEAD = b"""Distribution of ddelays for successful deliveries

Meaning of each line: The first pct% of successful deliveries
all happened within doneby seconds. The average ddelay was avg.

"""


def ddist(records: Iterable[bytes]) -> list[bytes]:
    """Return qmailanalog's ddist lines 'doneby avg pct' for pct 10..100.

    As in qmailanalog, each ddelay is first printed with %.6g and the
    percentiles are taken over those texts: duplicates count once in avg,
    and doneby is the bytewise-smallest text of its percentile.
    """
    delays = []
    for r in records:
        if r.startswith(b"d k"):
            f = awk_fields(r)
            delays.append(fmt(num(_field(f, 5)) - num(_field(f, 3))))
    total = len(delays)
    if not total:
        return []
    cumulative: dict[bytes, int] = {}
    for n, d in enumerate(sort_lines(delays, numeric=True), 1):
        cumulative[d] = n
    mindel: dict[int, bytes] = {}
    totdel = [0.0] * 101
    numdel = [0] * 101
    for d, c in cumulative.items():
        p = int((c * 100) / total)
        if p not in mindel or d < mindel[p]:
            mindel[p] = d
        totdel[p] += num(d)
        numdel[p] += 1
    out = []
    td, nd = 0.0, 0
    for p in range(101):
        td += totdel[p]
        nd += numdel[p]
        # awk compares the stored text with 0 as strings: a negative delay never prints
        if p >= 10 and nd > 0 and p in mindel and mindel[p] >= b"0":
            out.append(_line(b"%.2f" % num(mindel[p]), b"%.2f" % (td / nd), b"%d" % p))
    return out


def zddist(records: Iterable[bytes]) -> bytes:
    """Return zddist's report."""
    return _table(DDIST_HEAD, b"doneby avg pct", ddist(records))


# -- reasons: zdeferrals, zfailures, zsuccesses -----------------------------

_REASON_HEAD = b"""Reasons for %s

One line per reason for %s. Information on each line:
* del is the number of deliveries that ended for this reason.
* xdelay is the total xdelay on those deliveries.

"""
DEFERRALS_HEAD = _REASON_HEAD % (b"deferral", b"deferral")
FAILURES_HEAD = _REASON_HEAD % (b"failure", b"delivery failure")
SUCCESSES_HEAD = _REASON_HEAD % (b"success", b"successful delivery")


def reasons(records: Iterable[bytes], result: bytes) -> list[bytes]:
    """Return 'count xdelay reason' for the d lines of result k, d or z (awk's order: unsorted)."""
    prefix = b"d " + result
    count: dict[bytes, int] = {}
    xdelay: dict[bytes, float] = {}
    for r in records:
        if r.startswith(prefix):
            f = awk_fields(r)
            reason = _field(f, 11)
            count[reason] = count.get(reason, 0) + 1
            xdelay[reason] = xdelay.get(reason, 0.0) + num(_field(f, 5)) - num(_field(f, 4))
    return [_line(b"%d" % n, b"%.2f" % xdelay[reason], reason) for reason, n in count.items()]


def zreasons(records: Iterable[bytes], result: bytes) -> bytes:
    """Return zdeferrals' (z), zfailures' (d) or zsuccesses' (k) report."""
    head = {b"z": DEFERRALS_HEAD, b"d": FAILURES_HEAD, b"k": SUCCESSES_HEAD}[result]
    rows = sort_lines(reasons(records, result), field=2)
    return _table(head, b"del xdelay reason", rows, underscores=True)


# -- recipients and hosts ---------------------------------------------------

RECIPIENTS_HEAD = b"""Recipients

One line per recipient. Information on each line:
* sbytes is the number of bytes successfully delivered to this recipient.
* mess is the number of messages sent to this recipient (success plus failure).
* tries is the number of delivery attempts (success, failure, deferral).
* xdelay is the total xdelay incurred by this recipient.

"""
RHOSTS_HEAD = b"""Recipient hosts

One line per recipient host. Information on each line:
* sbytes is the number of bytes successfully delivered to this host.
* mess is the number of messages sent to this host (success plus failure).
* tries is the number of delivery attempts (success, failure, deferral).
* xdelay is the total xdelay incurred by this host.

"""
RXDELAY_HEAD = b"""Recipients in the best order for mailing lists

One line per recipient, sorted by avg. Information on each line:
* avg is the _average_ xdelay for the recipient.
* tries is the number of deliveries that avg is based on.

"""


def by_recipient(records: Iterable[bytes], hosts: bool = False) -> list[bytes]:
    """Return 'sbytes mess tries xdelay recipient' per recipient (or per host: what follows the last @)."""
    xdelay: dict[bytes, float] = {}
    sbytes: dict[bytes, float] = {}
    counts: dict[bytes, list[int]] = {}
    for r in records:
        if not r.startswith(b"d"):
            continue
        f = awk_fields(r)
        who = _field(f, 8)
        if hosts:
            who = who.rsplit(b"@", 1)[-1]
        xdelay[who] = xdelay.get(who, 0.0) + num(_field(f, 5)) - num(_field(f, 4))
        c = counts.setdefault(who, [0, 0, 0])
        result = _field(f, 2)
        if result == b"k":
            sbytes[who] = sbytes.get(who, 0.0) + num(_field(f, 6))
            c[0] += 1
        elif result == b"d":
            c[1] += 1
        elif result == b"z":
            c[2] += 1
    out = []
    for who, x in xdelay.items():
        k, d, z = counts[who]
        out.append(_line(fmt(sbytes.get(who, 0.0)), b"%d" % (k + d), b"%d" % (k + d + z), b"%.2f" % x, who))
    return out


def zrecipients(records: Iterable[bytes], hosts: bool = False) -> bytes:
    """Return zrecipients' (or, with hosts, zrhosts') report."""
    rows = sort_lines(by_recipient(records, hosts), field=4)
    if hosts:
        return _table(RHOSTS_HEAD, b"sbytes mess tries xdelay host", rows)
    return _table(RECIPIENTS_HEAD, b"sbytes mess tries xdelay recipient", rows)


def rxdelay(recipient_lines: Iterable[bytes]) -> list[bytes]:
    """Return 'avg tries recipient' from recipients' lines, sorted by avg (sort -n)."""
    out = []
    for r in recipient_lines:
        f = awk_fields(r)
        tries = num(_field(f, 3))
        if tries == 0:  # awk would die dividing by zero; matchup never writes such a line
            continue
        out.append(_line(b"%.2f" % (num(_field(f, 4)) / tries), _field(f, 3), _field(f, 5)))
    return sort_lines(out, numeric=True)


def zrxdelay(records: Iterable[bytes]) -> bytes:
    """Return zrxdelay's report."""
    return _table(RXDELAY_HEAD, b"avg tries recipient", rxdelay(by_recipient(records)))


# -- senders and uids -------------------------------------------------------

_SENDERS_HEAD = b"""%s

One line per %s. Information on each line:
* mess is the number of messages sent by this %s.
* bytes is the number of bytes sent by this %s.
* sbytes is the number of bytes successfully received from this %s.
* rbytes is the number of bytes from this %s, weighted by recipient.
* recips is the number of recipients (success plus failure).
* tries is the number of delivery attempts (success, failure, deferral).
* xdelay is the total xdelay incurred by this %s.

"""
SENDERS_HEAD = _SENDERS_HEAD % ((b"Senders", b"sender") + (b"sender",) * 5)
SUIDS_HEAD = _SENDERS_HEAD % ((b"Sender uids", b"sender uid") + (b"uid",) * 5)


def by_sender(records: Iterable[bytes], uids: bool = False) -> list[bytes]:
    """Return 'mess bytes sbytes rbytes recips tries xdelay sender' per uid/sender (or per uid)."""
    totals: dict[bytes, list[float]] = {}  # messages, k, d, z, mbytes, sbytes, rbytes
    xdelay: dict[bytes, float] = {}
    for r in records:
        if r.startswith(b"m"):
            f = awk_fields(r)
            who = _field(f, 10) if uids else _field(f, 10) + b"/" + _field(f, 8)
            size, k, d, z = num(_field(f, 4)), num(_field(f, 5)), num(_field(f, 6)), num(_field(f, 7))
            t = totals.setdefault(who, [0.0] * 7)
            t[0] += 1
            t[1] += k
            t[2] += d
            t[3] += z
            t[4] += size
            t[5] += size * k
            t[6] += size * (k + d)
        elif r.startswith(b"d"):
            f = awk_fields(r)
            who = _field(f, 10) if uids else _field(f, 10) + b"/" + _field(f, 7)
            xdelay[who] = xdelay.get(who, 0.0) + num(_field(f, 5)) - num(_field(f, 4))
    out = []
    for who, t in totals.items():
        out.append(_line(fmt(t[0]), fmt(t[4]), fmt(t[5]), fmt(t[6]), fmt(t[1] + t[2]), fmt(t[1] + t[2] + t[3]),
                         b"%.6f" % xdelay.get(who, 0.0), who))
    return out


def zsenders(records: Iterable[bytes], uids: bool = False) -> bytes:
    """Return zsenders' (or, with uids, zsuids') report."""
    rows = sort_lines(by_sender(records, uids), field=7, numeric=True)
    if uids:
        return _table(SUIDS_HEAD, b"mess bytes sbytes rbytes recips tries xdelay uid", rows)
    return _table(SENDERS_HEAD, b"mess bytes sbytes rbytes recips tries xdelay sender", rows)


# -- zsendmail ---------------------------------------------------------------

_STAT = {b"k": b"stat=Sent", b"d": b"stat=Failed"}


def zsendmail(records: Iterable[bytes]) -> bytes:
    """Return matchup output rewritten as sendmail-style log lines (other lines unchanged)."""
    out = []
    for r in records:
        if r.startswith(b"d"):
            f = awk_fields(r)
            f += [b""] * (11 - len(f))
            out.append(b"%s qp %s: to=%s, uid=%s, ddelay=%.6f, xdelay=%.6f, %s (%s)\n" % (
                f[4], f[8], f[7], f[9], num(f[4]) - num(f[2]), num(f[4]) - num(f[3]),
                _STAT.get(f[1], b"stat=Deferred"), f[10]))
        elif r.startswith(b"m"):
            f = awk_fields(r)
            f += [b""] * (10 - len(f))
            out.append(b"%s qp %s: from=%s, uid=%s, size=%s, nrcpts=%s, deferrals=%s, qtime=%.6f\n" % (
                f[2], f[8], f[7], f[9], f[3], fmt(num(f[4]) + num(f[5])), f[6], num(f[2]) - num(f[1])))
        else:
            out.append(r + b"\n")
    return b"".join(out)


# -- selections --------------------------------------------------------------

def select(records: Iterable[bytes], what: str, value: bytes) -> bytes:
    """Return the lines xsender ('sender'), xrecipient ('recipient') or xqp ('qp') keeps."""
    out = []
    for r in records:
        if r.startswith(b"d"):
            n = {"sender": 7, "recipient": 8, "qp": 9}[what]
        elif r.startswith(b"m") and what != "recipient":
            n = {"sender": 8, "qp": 9}[what]
        else:
            continue
        if awk_equal(_field(awk_fields(r), n), value):
            out.append(r + b"\n")
    return b"".join(out)
