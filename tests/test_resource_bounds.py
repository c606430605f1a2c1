"""Memory per connection stays under a constant whatever the client sends (issue 12 A1).

Each network program runs as a process with tcpserver's environment (and
qmail-smtpd also under our tcpserver, forked from its warmed parent), gets
the hostile input of the review that found the fault (a flood of
recipients, an endless line, a large message), and its peak resident set,
with every process it waited for (qmail-queue; under tcpserver the
connection child), is read from wait4's ru_maxrss in tests/peakrss.py. The
same inputs took the code before the fix past the bound: qmail-qmtpd to
60 MiB (500 000 recipients), qmail-qmqpd to 38 MiB (500 000 recipients),
qmail-smtpd to 45 MiB (20 000 RCPTs of 900 bytes).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

from conftest import QHome
from queuefmt import files
from smtpdkit import queued
from ucspikit import Served

from pyqmail.qmtp.qmail_qmtpd import RCPT_MAX, TOO_MANY
from pyqmail.smtpd import replies
from pyqmail.smtpd.session import RCPT_BYTES_MAX

# The documented bound (docs/DESIGN.md, "Memory per connection"): a connection's
# process and the qmail-queue it starts never hold more than this.
PEAK_MIB = 32
PEAKRSS = Path(__file__).with_name("peakrss.py")
TCP = {"PATH": "/usr/bin:/bin", "PROTO": "TCP", "TCPREMOTEIP": "192.0.2.7", "TCPLOCALIP": "192.0.2.1"}


def ns(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


def measured(program: Path, data: bytes, env: dict[str, str], tmp: Path) -> tuple[int, bytes, float]:
    """Run program on a socketpair, send data (then end of input) while reading its output;
    return (exit code, everything it wrote, peak resident MiB)."""
    result = tmp / "peak"
    mine, theirs = socket.socketpair()
    proc = subprocess.Popen([sys.executable, str(PEAKRSS), str(result), str(program)],
                            stdin=theirs, stdout=theirs, env=dict(TCP, **env))
    theirs.close()

    def send() -> None:
        try:
            mine.sendall(data)
            mine.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server stopped reading (it died): what it said is checked

    sender = threading.Thread(target=send)
    sender.start()
    mine.settimeout(120)
    out = bytearray()
    with mine:
        while chunk := mine.recv(1 << 20):
            out += chunk
    sender.join()
    assert proc.wait(120) == 0
    code, kib = result.read_text().split()
    return int(code), bytes(out), int(kib) / 1024


# --- qmail-qmtpd ---------------------------------------------------------------------------

def test_qmtpd_recipient_flood(qhome: QHome, tmp_path: Path) -> None:
    # 1 100 000 recipients in one netstring: the first RCPT_MAX are queued
    # (streamed to qmail-queue), each later one is deferred.
    n = RCPT_MAX + 100000
    rcpt = ns(b"u@x")
    wire = ns(b"\nSubject: flood\n\nhi\n") + ns(b"s@y") + b"%d:" % (len(rcpt) * n) + rcpt * n + b","
    code, out, peak = measured(qhome.bin("qmail-qmtpd"), wire, {"RELAYCLIENT": ""}, tmp_path)
    assert code == 0
    ok = out[:out.index(b",") + 1]
    assert ok.split(b":")[1].startswith(b"Kok ")
    assert out == ok * RCPT_MAX + TOO_MANY * (n - RCPT_MAX)
    ((_, sender, rcpts),) = queued(qhome.queue)
    assert sender == b"s@y" and len(rcpts) == RCPT_MAX and set(rcpts) == {b"u@x"}
    assert peak < PEAK_MIB, f"qmail-qmtpd peaked at {peak:.1f} MiB"


def test_qmtpd_refused_flood_then_a_large_message(qhome: QHome, tmp_path: Path) -> None:
    # 500 000 recipients outside rcpthosts: nothing is queued, every one is
    # refused. Then a 40 MiB message with CR LF line ends (converted as it
    # streams) for one local recipient is queued.
    body = b"Subject: big\r\n\r\n" + (b"x" * 1022 + b"\r\n") * (40 * 1024)
    n = 500000
    rcpt = ns(b"u@elsewhere.example")
    wire = (ns(b"\nSubject: flood\n\nhi\n") + ns(b"s@y") + b"%d:" % (len(rcpt) * n) + rcpt * n + b","
            + ns(b"\r" + body) + ns(b"s@y") + ns(ns(b"u@test.example.com")))
    code, out, peak = measured(qhome.bin("qmail-qmtpd"), wire, {}, tmp_path)
    assert code == 0
    domain = b"66:Dsorry, that domain isn't in my list of allowed rcpthosts (#5.7.1),"
    assert out.startswith(domain * n) and out[len(domain) * n:].split(b":")[1].startswith(b"Kok ")
    ((mess, _, rcpts),) = queued(qhome.queue)
    assert rcpts == [b"u@test.example.com"] and mess.endswith(body.replace(b"\r\n", b"\n"))
    assert peak < PEAK_MIB, f"qmail-qmtpd peaked at {peak:.1f} MiB"


# --- qmail-qmqpd ---------------------------------------------------------------------------

def test_qmqpd_recipient_flood_and_a_large_message(qhome: QHome, tmp_path: Path) -> None:
    body = b"Subject: big\n\n" + (b"y" * 1023 + b"\n") * (32 * 1024)
    n = 500000
    wire = ns(ns(body) + ns(b"s@y") + ns(b"r@far.example") * n)
    code, out, peak = measured(qhome.bin("qmail-qmqpd"), wire, {}, tmp_path)
    assert code == 0
    assert out.split(b":")[1].startswith(b"Kok ")
    ((mess, sender, rcpts),) = queued(qhome.queue)
    assert sender == b"s@y" and len(rcpts) == n and mess.endswith(body)
    assert peak < PEAK_MIB, f"qmail-qmqpd peaked at {peak:.1f} MiB"


def test_qmqpd_bad_address_in_a_flood_queues_nothing(qhome: QHome, tmp_path: Path) -> None:
    # The recipients already streamed to qmail-queue are not queued when a later one is refused.
    n = 300000
    wire = ns(ns(b"m\n") + ns(b"s@y") + ns(b"r@far.example") * n + ns(b"bad\0nul") + ns(b"r@far.example"))
    code, out, peak = measured(qhome.bin("qmail-qmqpd"), wire, {}, tmp_path)
    assert code == 0
    assert out == ns(b"Dsorry, I can't accept addresses like that (#5.1.3)")
    assert files(qhome.queue)["mess"] == [] and files(qhome.queue)["todo"] == []
    assert peak < PEAK_MIB, f"qmail-qmqpd peaked at {peak:.1f} MiB"


# --- qmail-smtpd ---------------------------------------------------------------------------

def flood_rcpt(i: int) -> bytes:
    return b"%06d%s@far.example" % (i, b"a" * 880)  # 898 bytes: the longest address qmail-smtpd takes


def rcpt_flood(n: int) -> tuple[bytes, int]:
    """Return a session of n RCPTs of the longest addresses then DATA, and how many fit the limit."""
    cmds = [b"HELO client.example\r\n", b"MAIL FROM:<s@client.example>\r\n"]
    cmds += [b"RCPT TO:<%s>\r\n" % flood_rcpt(i) for i in range(n)]
    cmds += [b"DATA\r\n", b"Subject: flood\r\n\r\nhi\r\n.\r\n", b"QUIT\r\n"]
    return b"".join(cmds), RCPT_BYTES_MAX // (len(flood_rcpt(0)) + 1)


def check_flood_replies(out: bytes, n: int, fit: int) -> None:
    lines = out.split(b"\r\n")
    assert lines[0].startswith(b"220 ") and lines[1].startswith(b"250 ") and lines[2] == b"250 ok"
    got = lines[3:3 + n]
    assert got == [b"250 ok"] * fit + [replies.TOO_MANY_RCPTS.rstrip()] * (n - fit)
    assert lines[3 + n] == b"354 go ahead"
    assert lines[4 + n].startswith(b"250 ok ") and lines[5 + n].startswith(b"221 ")


def test_smtpd_recipient_flood(qhome: QHome, tmp_path: Path) -> None:
    # 20 000 RCPTs of 900 bytes: the first 16 MiB are taken, the rest get 452, DATA queues those taken.
    n = 20000
    wire, fit = rcpt_flood(n)
    assert fit < n
    code, out, peak = measured(qhome.bin("qmail-smtpd"), wire, {"RELAYCLIENT": ""}, tmp_path)
    assert code == 0
    check_flood_replies(out, n, fit)
    ((_, _, rcpts),) = queued(qhome.queue)
    assert len(rcpts) == fit and rcpts[-1] == flood_rcpt(fit - 1)
    assert peak < PEAK_MIB, f"qmail-smtpd peaked at {peak:.1f} MiB"


def test_smtpd_endless_lines(qhome: QHome, tmp_path: Path) -> None:
    # A 40 MiB command line, then a message whose one line is 40 MiB long.
    line = b"x" * (40 << 20)
    wire = (b"NOOP " + line + b"\r\nMAIL FROM:<s@y>\r\nRCPT TO:<r@test.example.com>\r\nDATA\r\n"
            + b"Subject: long\r\n\r\n" + line + b"\r\n.\r\nQUIT\r\n")
    code, out, peak = measured(qhome.bin("qmail-smtpd"), wire, {}, tmp_path)
    assert code == 0
    lines = out.split(b"\r\n")
    assert lines[1:5] == [b"250 ok", b"250 ok", b"250 ok", b"354 go ahead"] and lines[5].startswith(b"250 ok ")
    ((mess, _, _),) = queued(qhome.queue)
    assert mess.endswith(b"\n\n" + line + b"\n")
    assert peak < PEAK_MIB, f"qmail-smtpd peaked at {peak:.1f} MiB"


def test_smtpd_under_tcpserver(qhome: QHome, tmp_path: Path) -> None:
    # The same flood through our tcpserver: the connection child is forked from a
    # parent that imported and warmed qmail-smtpd; ru_maxrss covers both.
    result = tmp_path / "peak"
    n = 20000
    wire, fit = rcpt_flood(n)
    with Served([sys.executable, str(PEAKRSS), str(result), str(qhome.bin("tcpserver")), "-1", "-v",
                 "-HR", "127.0.0.1", "0", str(qhome.bin("qmail-smtpd"))],
                env={"PATH": "/usr/bin:/bin", "RELAYCLIENT": ""}) as srv:
        out, _ = srv.connect(wire)
        srv.wait_for(r"tcpserver: end \d+ status 0")
        srv.stop()
    check_flood_replies(out, n, fit)
    assert len(queued(qhome.queue)[0][2]) == fit
    _, kib = result.read_text().split()
    peak = int(kib) / 1024
    assert peak < PEAK_MIB, f"tcpserver or its qmail-smtpd child peaked at {peak:.1f} MiB"


def test_fit_is_at_least_rfc_minimum() -> None:
    # RFC 5321 4.5.3.1.8: at least 100 recipients, even of the longest address qmail-smtpd takes.
    assert RCPT_BYTES_MAX // 900 >= 100
