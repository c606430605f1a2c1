"""qmailanalog: matchup, columnt, the z summaries and x selections, run as processes."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import VENV_BIN, Result, expect, run
from pyqmail.analog.synthlog import generate
from pyqmail.svc.tai64 import label

Z_PROGRAMS = ("zoverall", "zddist", "zdeferrals", "zfailures", "zsuccesses", "zrecipients", "zrhosts",
              "zrxdelay", "zsenders", "zsuids", "zsendmail")
X_PROGRAMS = ("xsender", "xrecipient", "xqp")


def prog(name: str) -> str:
    return str(VENV_BIN / name)


def matchup(log: bytes, tmp: Path, fd5: bool = True) -> tuple[Result, bytes]:
    """Run matchup on log with descriptor 5 on a file (or closed); return the result and what fd 5 got."""
    pending = tmp / "pending"
    pending.unlink(missing_ok=True)
    redirect = '5>"$1"' if fd5 else "5>&-"
    res = run(["/bin/sh", "-c", f'exec "$0" {redirect}', prog("matchup"), str(pending)], input=log)
    return res, pending.read_bytes() if fd5 else b""


def stamped(lines: list[tuple[float, str]], tai64n: bool) -> bytes:
    """Return log lines with numeric or TAI64N stamps."""
    out = []
    for t, text in lines:
        micro = round(t * 1_000_000)
        stamp = label(micro * 1000) if tai64n else b"%d.%06d" % divmod(micro, 1_000_000)
        out.append(stamp + b" " + text.encode() + b"\n")
    return b"".join(out)


# The book's chapter-8 excerpt of qmail-send's log, verbatim, with stamps added
# (the book prints it without them; matchup needs one in front of each line).
BOOK = [
    (901967408.00, "new msg 96025"),
    (901967408.25, "info msg 96025: bytes 9956 from <user@example.com> qp 16296 uid 101"),
    (901967408.50, "starting delivery 1461: msg 96025 to local me@mydomain.com"),
    (901967408.50, "status: local 1/10 remote 0/20"),
    (901967409.75, "delivery 1461: success: did_1+0+2"),
    (901967409.75, "status: local 0/10 remote 0/20"),
    (901967410.00, "end msg 96025"),
]
BOOK_MATCHUP = (
    b"d k 901967408.250000 901967408.500000 901967409.750000 9956 <user@example.com> "
    b"local.me@mydomain.com 16296 101 did_1+0+2\n"
    b"m 901967408.250000 901967410.000000 9956 1 0 0 <user@example.com> 16296 101\n")
# By hand: qtime = 410.00 - 408.25 = 1.75; ddelay = 409.75 - 408.25 = 1.5;
# xdelay = 409.75 - 408.50 = 1.25; span = 410.00 - 408.25 = 1.75 s = 2.02546e-05 days;
# concurrency = 1.25 / 1.75 = 0.714286 (awk prints non-integers with %.6g).
ZOVERALL_HEAD = b"""\
Basic statistics

qtime is the time spent by a message in the queue.

ddelay is the latency for a successful delivery to one recipient---the
end of successful delivery, minus the time when the message was queued.

xdelay is the latency for a delivery attempt---the time when the attempt
finished, minus the time when it started. The average concurrency is the
total xdelay for all deliveries divided by the time span; this is a good
measure of how busy the mailer is.

"""
BOOK_ZOVERALL = ZOVERALL_HEAD + b"""\
Completed messages: 1
Recipients for completed messages: 1
Total delivery attempts for completed messages: 1
Average delivery attempts per completed message: 1
Bytes in completed messages: 9956
Bytes weighted by success: 9956
Average message qtime (s): 1.75

Total delivery attempts: 1
  success: 1
  failure: 0
  deferral: 0
Total ddelay (s): 1.500000
Average ddelay per success (s): 1.500000
Total xdelay (s): 1.250000
Average xdelay per delivery attempt (s): 1.250000
Time span (days): 2.02546e-05
Average concurrency: 0.714286
"""


@pytest.mark.parametrize("tai64n", [False, True], ids=["numeric", "tai64n"])
def test_book_excerpt(tmp_path: Path, tai64n: bool) -> None:
    res, pending = matchup(stamped(BOOK, tai64n), tmp_path)
    expect(res)
    assert res.stdout == BOOK_MATCHUP
    assert pending == b""
    assert expect(run([prog("zoverall")], input=res.stdout)).stdout == BOOK_ZOVERALL


# A small matchup output for exact reports. By hand, for zoverall: messages 2,
# recipients (2+1)+(1+0) = 4, tries 4+1 = 5, bytes 1050, weighted 1000*2+50 = 2050,
# qtime (10.25+0.75)/2 = 5.5; deliveries 6 (4 k, 1 d, 1 z); ddelay 1.5+10+0.5+1 = 13;
# xdelay 1.25+1.25+2.75+5.25+0.25+1 = 11.75; span 302-100.25 = 201.75 s.
SMALL = b"""\
m 100.25 110.5 1000 2 1 1 <a@x.org> 501 101
d k 100.25 100.5 101.75 1000 <a@x.org> local.bob@x.org 501 101 did_1+0+0/
d d 100.25 100.75 102 1000 <a@x.org> remote.carol@y.net 501 101 Sorry,_no_mailbox_here_by_that_name._(#5.1.1)/
d z 100.25 100.75 103.5 1000 <a@x.org> remote.dave@y.net 501 101 Connected_to_1.2.3.4_but_connection_died._(#4.4.2)/
d k 100.25 105 110.25 1000 <a@x.org> remote.dave@y.net 501 101 1.2.3.4_accepted_message./Remote_host_said:_250_ok/
m 200 200.75 50 1 0 0 <> 502 0
d k 200 200.25 200.5 50 <> local.bob@x.org 502 0 did_0+0+1/
d k 301 301 302 0 ? local.eve@x.org ? ? did_1+0+0/
? 120.0 bounce msg 5 qp 503
"""
SMALL_ZOVERALL = ZOVERALL_HEAD + b"""\
Completed messages: 2
Recipients for completed messages: 4
Total delivery attempts for completed messages: 5
Average delivery attempts per completed message: 2.5
Bytes in completed messages: 1050
Bytes weighted by success: 2050
Average message qtime (s): 5.5

Total delivery attempts: 6
  success: 4
  failure: 1
  deferral: 1
Total ddelay (s): 13.000000
Average ddelay per success (s): 3.250000
Total xdelay (s): 11.750000
Average xdelay per delivery attempt (s): 1.958333
Time span (days): 0.00233507
Average concurrency: 0.0582404
"""

# zddist: ddelays 0.5 1 1.5 10 are 25/50/75/100%; zsuccesses: sort -k2 is by the text of xdelay;
# zsenders: 101/<a@x.org> sbytes 1000*2, rbytes 1000*(2+1), xdelay 1.25+1.25+2.75+5.25.
GOLDEN = {
    "zddist": b"""\
Distribution of ddelays for successful deliveries

Meaning of each line: The first pct% of successful deliveries
all happened within doneby seconds. The average ddelay was avg.

doneby   avg  pct
  0.50  0.50  25
  1.00  0.75  50
  1.50  1.00  75
 10.00  3.25  100
""",
    "zdeferrals": b"""\
Reasons for deferral

One line per reason for deferral. Information on each line:
* del is the number of deliveries that ended for this reason.
* xdelay is the total xdelay on those deliveries.

del  xdelay  reason
  1    2.75  Connected to 1.2.3.4 but connection died. (#4.4.2)/
""",
    "zfailures": b"""\
Reasons for failure

One line per reason for delivery failure. Information on each line:
* del is the number of deliveries that ended for this reason.
* xdelay is the total xdelay on those deliveries.

del  xdelay  reason
  1    1.25  Sorry, no mailbox here by that name. (#5.1.1)/
""",
    "zsuccesses": b"""\
Reasons for success

One line per reason for successful delivery. Information on each line:
* del is the number of deliveries that ended for this reason.
* xdelay is the total xdelay on those deliveries.

del  xdelay  reason
  1    0.25  did 0+0+1/
  2    2.25  did 1+0+0/
  1    5.25  1.2.3.4 accepted message./Remote host said: 250 ok/
""",
    "zrecipients": b"""\
Recipients

One line per recipient. Information on each line:
* sbytes is the number of bytes successfully delivered to this recipient.
* mess is the number of messages sent to this recipient (success plus failure).
* tries is the number of delivery attempts (success, failure, deferral).
* xdelay is the total xdelay incurred by this recipient.

sbytes  mess  tries  xdelay  recipient
     0     1      1    1.00  local.eve@x.org
     0     1      1    1.25  remote.carol@y.net
  1050     2      2    1.50  local.bob@x.org
  1000     1      2    8.00  remote.dave@y.net
""",
    "zrhosts": b"""\
Recipient hosts

One line per recipient host. Information on each line:
* sbytes is the number of bytes successfully delivered to this host.
* mess is the number of messages sent to this host (success plus failure).
* tries is the number of delivery attempts (success, failure, deferral).
* xdelay is the total xdelay incurred by this host.

sbytes  mess  tries  xdelay  host
  1050     3      3    2.50  x.org
  1000     2      3    9.25  y.net
""",
    "zrxdelay": b"""\
Recipients in the best order for mailing lists

One line per recipient, sorted by avg. Information on each line:
* avg is the _average_ xdelay for the recipient.
* tries is the number of deliveries that avg is based on.

 avg  tries  recipient
0.75      2  local.bob@x.org
1.00      1  local.eve@x.org
1.25      1  remote.carol@y.net
4.00      2  remote.dave@y.net
""",
    "zsenders": b"""\
Senders

One line per sender. Information on each line:
* mess is the number of messages sent by this sender.
* bytes is the number of bytes sent by this sender.
* sbytes is the number of bytes successfully received from this sender.
* rbytes is the number of bytes from this sender, weighted by recipient.
* recips is the number of recipients (success plus failure).
* tries is the number of delivery attempts (success, failure, deferral).
* xdelay is the total xdelay incurred by this sender.

mess  bytes  sbytes  rbytes  recips  tries     xdelay  sender
   1     50      50      50       1      1   0.250000  0/<>
   1   1000    2000    3000       3      4  10.500000  101/<a@x.org>
""",
    "zsuids": b"""\
Sender uids

One line per sender uid. Information on each line:
* mess is the number of messages sent by this uid.
* bytes is the number of bytes sent by this uid.
* sbytes is the number of bytes successfully received from this uid.
* rbytes is the number of bytes from this uid, weighted by recipient.
* recips is the number of recipients (success plus failure).
* tries is the number of delivery attempts (success, failure, deferral).
* xdelay is the total xdelay incurred by this uid.

mess  bytes  sbytes  rbytes  recips  tries     xdelay  uid
   1     50      50      50       1      1   0.250000  0
   1   1000    2000    3000       3      4  10.500000  101
""",
    "zsendmail": b"""\
110.5 qp 501: from=<a@x.org>, uid=101, size=1000, nrcpts=3, deferrals=1, qtime=10.250000
101.75 qp 501: to=local.bob@x.org, uid=101, ddelay=1.500000, xdelay=1.250000, stat=Sent (did_1+0+0/)
102 qp 501: to=remote.carol@y.net, uid=101, ddelay=1.750000, xdelay=1.250000, stat=Failed (Sorry,_no_mailbox_here_by_that_name._(#5.1.1)/)
103.5 qp 501: to=remote.dave@y.net, uid=101, ddelay=3.250000, xdelay=2.750000, stat=Deferred (Connected_to_1.2.3.4_but_connection_died._(#4.4.2)/)
110.25 qp 501: to=remote.dave@y.net, uid=101, ddelay=10.000000, xdelay=5.250000, stat=Sent (1.2.3.4_accepted_message./Remote_host_said:_250_ok/)
200.75 qp 502: from=<>, uid=0, size=50, nrcpts=1, deferrals=0, qtime=0.750000
200.5 qp 502: to=local.bob@x.org, uid=0, ddelay=0.500000, xdelay=0.250000, stat=Sent (did_0+0+1/)
302 qp ?: to=local.eve@x.org, uid=?, ddelay=1.000000, xdelay=1.000000, stat=Sent (did_1+0+0/)
? 120.0 bounce msg 5 qp 503
""",
}
GOLDEN["zoverall"] = SMALL_ZOVERALL


@pytest.mark.parametrize("name", Z_PROGRAMS)
def test_small_reports_exact(name: str) -> None:
    assert expect(run([prog(name)], input=SMALL)).stdout == GOLDEN[name]


def test_selections_exact() -> None:
    lines = SMALL.splitlines(keepends=True)
    assert expect(run([prog("xsender"), "a@x.org"], input=SMALL)).stdout == b"".join(lines[0:5])
    assert expect(run([prog("xsender")], input=SMALL)).stdout == b"".join(lines[5:7])  # <>: the bounces
    assert expect(run([prog("xrecipient"), "local.bob@x.org"], input=SMALL)).stdout == lines[1] + lines[6]
    assert expect(run([prog("xqp"), "502"], input=SMALL)).stdout == b"".join(lines[5:7])
    # awk compares two numbers as numbers
    assert expect(run([prog("xqp"), "0502.0"], input=SMALL)).stdout == b"".join(lines[5:7])
    assert expect(run([prog("xqp"), "999"], input=SMALL)).stdout == b""


def test_columnt() -> None:
    table = b"a bb ccc\n1111\t2 3 4\n\n  x  y\nlast"
    want = (b"   a  bb  ccc  \n"
            b"1111   2    3  4\n"
            b"\n"
            b"   x   y  \n"
            b"last  \n")
    assert expect(run([prog("columnt")], input=table)).stdout == want
    assert expect(run([prog("columnt")], input=b"")).stdout == b""


# -- matchup ------------------------------------------------------------------

def test_pending_written_to_fd5_and_carried_over(tmp_path: Path) -> None:
    first = stamped([
        (10.0, "new msg 7"),
        (10.5, "info msg 7: bytes 300 from <Boss@Example.COM> qp 44 uid 1000"),
        (11.0, "starting delivery 3: msg 7 to remote A@B.example"),
        (11.0, "starting delivery 4: msg 7 to local c@d.example"),
        (12.0, "delivery 4: deferral: Uh-oh:_.qmail_has_prog_delivery_but_has_x_bit_set._(#4.7.0)/"),
        (12.5, "starting delivery 5: msg 7 to local c@d.example"),
    ], False)
    res, pending = matchup(first, tmp_path)
    expect(res)
    assert res.stdout == (b"d z 10.500000 11.000000 12.000000 300 <boss@example.com> local.c@d.example 44 1000 "
                          b"Uh-oh:_.qmail_has_prog_delivery_but_has_x_bit_set._(#4.7.0)/\n")
    assert pending == (b"10.500000 info msg 7: bytes 300 from <boss@example.com> qp 44 uid 1000\n"
                       b"10.500000 extra 7 0 1 0\n"
                       b"11.000000 starting delivery 3: msg 7 to remote a@b.example\n"
                       b"12.500000 starting delivery 5: msg 7 to local c@d.example\n")
    second = stamped([
        (20.0, "delivery 3: success: 1.2.3.4_accepted_message./Remote_host_said:_250_ok/"),
        (21.0, "delivery 5: failure: Sorry,_no_mailbox_here_by_that_name._(#5.1.1)/"),
        (22.0, "end msg 7"),
    ], False)
    res, pending = matchup(pending + second, tmp_path)
    expect(res)
    assert res.stdout == (
        b"d k 10.500000 11.000000 20.000000 300 <boss@example.com> remote.a@b.example 44 1000 "
        b"1.2.3.4_accepted_message./Remote_host_said:_250_ok/\n"
        b"d d 10.500000 12.500000 21.000000 300 <boss@example.com> local.c@d.example 44 1000 "
        b"Sorry,_no_mailbox_here_by_that_name._(#5.1.1)/\n"
        b"m 10.500000 22.000000 300 1 1 1 <boss@example.com> 44 1000\n")
    assert pending == b""


@pytest.mark.parametrize("tai64n", [False, True], ids=["numeric", "tai64n"])
def test_two_halves_through_fd5_equal_the_whole(tmp_path: Path, tai64n: bool) -> None:
    log, counts = generate(400, seed=3, tai64n=tai64n)
    whole, pending = matchup(log, tmp_path)
    expect(whole)
    assert pending == b""
    cut = len(log) // 2 + 7  # inside a line: the unended piece travels through fd 5 too
    assert log[cut - 1:cut] != b"\n"
    first, pending1 = matchup(log[:cut], tmp_path)
    expect(first)
    assert pending1.endswith(log[:cut].rsplit(b"\n", 1)[1])
    second, pending2 = matchup(pending1 + log[cut:], tmp_path)
    expect(second)
    assert pending2 == b""
    assert first.stdout + second.stdout == whole.stdout
    overall = expect(run([prog("zoverall")], input=first.stdout + second.stdout)).stdout
    assert overall == expect(run([prog("zoverall")], input=whole.stdout)).stdout
    assert b"\nCompleted messages: %d\n" % counts.messages in overall


def test_tai64n_and_numeric_logs_match_up_the_same(tmp_path: Path) -> None:
    numeric, _ = generate(200, seed=5)
    tai, _ = generate(200, seed=5, tai64n=True)
    a, _ = matchup(numeric, tmp_path)
    b, _ = matchup(tai, tmp_path)
    assert expect(a).stdout == expect(b).stdout
    assert a.stdout.startswith(b"d ") or a.stdout.startswith(b"m ")


def test_without_fd5(tmp_path: Path) -> None:
    log = stamped(BOOK[:3], False)
    res, _ = matchup(log, tmp_path, fd5=False)
    expect(res, 111)
    assert res.stderr == b"matchup: fatal: unable to write fd 5: file descriptor not open\n"
    # as in qmailanalog, nothing left to carry over means nothing to write
    res, _ = matchup(stamped(BOOK, False), tmp_path, fd5=False)
    assert expect(res).stdout == BOOK_MATCHUP


def test_other_lines(tmp_path: Path) -> None:
    log = (b"1.0 status: local 0/10 remote 0/20\n"
           b"2.0 warning: trouble opening local/3/7; will try again later\n"
           b"3.0 alert: unable to append to bounce message; HELP! sleeping...\n"
           b"4.0 bounce msg 7 qp 99\n"
           b"5.0 triple bounce: discarding bounce/7\n"
           b"6.0 delivery 77: success: nobody_started_this/\n"
           b"7.0 status: exiting\n")
    res, pending = matchup(log, tmp_path)
    expect(res)
    assert res.stdout == (b"2.0 warning: trouble opening local/3/7; will try again later\n"
                          b"3.0 alert: unable to append to bounce message; HELP! sleeping...\n"
                          b"? 4.0 bounce msg 7 qp 99\n"
                          b"? 5.0 triple bounce: discarding bounce/7\n")
    assert pending == b""


def test_delivery_of_unknown_message_and_mangled_report(tmp_path: Path) -> None:
    log = (b"1.5 starting delivery 9: msg 123 to local x@y\n"
           b"2.5 delivery 9: report: mangled\n"
           b"3.0 starting delivery 10: msg 123 to local x@y\n"
           b"3.5 delivery 10: what?\n")
    res, _ = matchup(log, tmp_path)
    assert expect(res).stdout == (b"d z 1.5 1.5 2.5 0 ? local.x@y ? ? report_mangled\n"
                                  b"?3.0 3.0 3.5 0 ? local.x@y ? ? \n")


HOSTILE = [
    b"",
    b"\n\n\n",
    b"no stamp at all\n",
    b"1.0\n",
    b"1.0 info\n",
    b"1.0 info msg\n",
    b"1.0 starting delivery\n",
    b"1.0 delivery\n",
    b"1.0 end msg\n",
    b"1.0 extra\n",
    b"1.0 new msg 99999999999999999999999999999999999999999999\n",
    b"1.0 info msg 18446744073709551621: bytes 1e9 from <a b> qp -5 uid x\n"
    b"2.0 starting delivery 18446744073709551617: msg 5 to local \xff\xfe\n"
    b"3.0 delivery 1: success: \x00\x01\x02\n"
    b"4.0 end msg 5\n",
    b"1.0 info msg 1: bytes " + b"9" * 5000 + b" from <a@b> qp 1 uid 1\n2.0 end msg 1\n",
    b"@4000000000000000zzzzzzzz info msg 1: bytes 1\n@ffffffffffffffffffffffff end msg 1\n",
    b"1.0\x00info\x00msg\x001:\x00bytes\x0010\x00from\x00<a@b>\x00qp\x001\x00uid\x001\n2.0 end msg 1\n",
    b"1.0 \r\x0b\x0c info msg 1:\r\n",
    b"x" * (3 << 20) + b"\n1.0 new msg 1\n",
    b"1.0 info msg 1: bytes 10 from <a@b> qp 1 uid 1\n2.0 starting delivery 1: msg 1 to local u@h",
]


@pytest.mark.parametrize("log", HOSTILE, ids=range(len(HOSTILE)))
def test_matchup_hostile_input(tmp_path: Path, log: bytes) -> None:
    res, pending = matchup(log, tmp_path)
    expect(res)
    assert res.stderr == b""
    for line in res.stdout.split(b"\n")[:-1]:
        assert line[:2] in (b"m ", b"d ", b"? ") or line.startswith(b"?"), line[:80]
    # whatever came out feeds every summary and selection without a crash
    for name in Z_PROGRAMS + X_PROGRAMS:
        expect(run([prog(name), "a@b"] if name.startswith("x") else [prog(name)], input=res.stdout + pending))


def test_matchup_skips_an_overlong_line(tmp_path: Path) -> None:
    log = b"1.0 warning: " + b"y" * (2 << 20) + b"\n2.0 warning: short\n"
    res, _ = matchup(log, tmp_path)
    assert expect(res).stdout == b"2.0 warning: short\n"


Z_HOSTILE = [
    b"m\nd\nd k\nd d\nd z\nm m m m m m m m m m m m\n",
    b"d k a b c d e f g h i j k l\nm a b c d e f g h i\n",
    b"d k 1e308 -1e308 1e308 1e308 <> x y z r\nm 1e308 -1e308 1e308 1e308 1e308 1e308 <> 1 2\n",
    b"d k nan inf -inf 0x10 <> x.y@z 1 2 r\n",
    b"\x00\xff m\nd\x00k\n\t\t\n" + b"d k 1 2 3 4 <a> r 5 6 " + b"_" * 100000 + b"\n",
    b"d q 1 2 3 4 <a> local.r@h 5 6 r\ndd 1 2 3\nmm 1 2 3\n",
    b"d k 1 2 3 4 <a> local.r@h 5 6 r",  # no newline at the end
]


@pytest.mark.parametrize("data", Z_HOSTILE, ids=range(len(Z_HOSTILE)))
def test_summaries_hostile_input(data: bytes) -> None:
    for name in Z_PROGRAMS + X_PROGRAMS + ("columnt",):
        argv = [prog(name), "r"] if name.startswith("x") else [prog(name)]
        res = expect(run(argv, input=data))
        assert res.stderr == b"", (name, res.stderr)


# -- a generated log through every program ----------------------------------

def _rows(report: bytes, header: bytes) -> list[list[bytes]]:
    """Return the split rows after the column header line of a z report."""
    lines = report.split(b"\n")
    start = [x.split() for x in lines].index(header.split())
    return [re.split(rb" {2,}", x.strip()) for x in lines[start + 1:] if x]


def test_generated_log_through_every_program(tmp_path: Path) -> None:
    log, counts = generate(600, seed=11, tai64n=True)
    res, pending = matchup(log, tmp_path)
    expect(res)
    out = res.stdout
    assert pending == b""
    assert out.count(b"\nm ") + out.startswith(b"m ") == counts.messages

    overall = expect(run([prog("zoverall")], input=out)).stdout
    for figure in (b"Completed messages: %d" % counts.messages,
                   b"Total delivery attempts: %d" % counts.deliveries,
                   b"  success: %d" % counts.success, b"  failure: %d" % counts.failure,
                   b"  deferral: %d" % counts.deferral):
        assert b"\n" + figure + b"\n" in overall

    got: dict[bytes, int] = {}
    for name in ("zdeferrals", "zfailures", "zsuccesses"):
        rows = _rows(expect(run([prog(name)], input=out)).stdout, b"del  xdelay  reason")
        xdelays = [r[1] for r in rows]
        assert xdelays == sorted(xdelays)  # sort +1: by the text of xdelay
        for r in rows:
            got[r[2]] = int(r[0])
    assert got == {k.replace(b"_", b" "): v for k, v in counts.reasons.items()}

    recips = _rows(expect(run([prog("zrecipients")], input=out)).stdout, b"sbytes  mess  tries  xdelay  recipient")
    assert sum(int(r[2]) for r in recips) == counts.deliveries
    assert sum(int(r[1]) for r in recips) == counts.success + counts.failure
    assert all(r[4] == r[4].lower() for r in recips)
    hosts = _rows(expect(run([prog("zrhosts")], input=out)).stdout, b"sbytes  mess  tries  xdelay  host")
    assert sorted(r[4] for r in hosts) == [b"example.com", b"example.net", b"example.org"]
    assert sum(int(r[2]) for r in hosts) == counts.deliveries
    rx = _rows(expect(run([prog("zrxdelay")], input=out)).stdout, b" avg  tries  recipient")
    assert len(rx) == len(recips)
    assert [float(r[0]) for r in rx] == sorted(float(r[0]) for r in rx)
    for name, head in (("zsenders", b"sender"), ("zsuids", b"uid")):
        rows = _rows(expect(run([prog(name)], input=out)).stdout,
                     b"mess  bytes  sbytes  rbytes  recips  tries     xdelay  " + head)
        assert sum(int(r[0]) for r in rows) == counts.messages
        assert sum(int(r[5]) for r in rows) == counts.deliveries
        assert [float(r[6]) for r in rows] == sorted(float(r[6]) for r in rows)
    ddist = _rows(expect(run([prog("zddist")], input=out)).stdout, b"doneby    avg  pct")
    assert ddist[-1][2] == b"100"
    assert [float(r[0]) for r in ddist] == sorted(float(r[0]) for r in ddist)
    sendmail = expect(run([prog("zsendmail")], input=out)).stdout.splitlines()
    assert len(sendmail) == len(out.splitlines())
    assert sum(b", stat=Sent (" in x for x in sendmail) == counts.success
    assert sum(b", stat=Failed (" in x for x in sendmail) == counts.failure
    assert sum(b", stat=Deferred (" in x for x in sendmail) == counts.deferral

    # selections keep matchup's format: they feed the summaries again
    qp = out.split(b"\n", 1)[0].split()[8]
    one = expect(run([prog("xqp"), qp], input=out)).stdout
    assert b"\nCompleted messages: 1\n" in expect(run([prog("zoverall")], input=one)).stdout
    sender = expect(run([prog("xsender"), "user3@example.com"], input=out)).stdout
    assert sender and all(b" <user3@example.com> " in x for x in sender.splitlines())
    bounces = expect(run([prog("xsender"), ""], input=out)).stdout
    assert bounces and all(b" <> " in x for x in bounces.splitlines())
    recip = expect(run([prog("xrecipient"), "local.rcpt3@example.com"], input=out)).stdout
    assert recip and all(x.split()[7] == b"local.rcpt3@example.com" for x in recip.splitlines())


def test_pipeline_as_in_the_book(tmp_path: Path) -> None:
    """`cat matchup_output | xsender user@domain.com | zoverall`, through a real shell pipeline."""
    log, _ = generate(100, seed=2)
    (tmp_path / "log").write_bytes(log)
    script = (f'"{prog("matchup")}" < log 5>/dev/null | "{prog("xsender")}" user1@example.com | '
              f'"{prog("zoverall")}"')
    p = subprocess.run(["/bin/sh", "-c", script], cwd=tmp_path, capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(b"Basic statistics\n")
    assert os.path.exists(tmp_path / "log")
