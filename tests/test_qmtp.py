"""qmail-qmtpd(8), qmail-qmqpd(8) and qmail-qmqpc(8) as processes: the QMTP and QMQP netstring
protocols, qmail's replies and exit codes, and mini-qmail (qmqpc as QMAILQUEUE of one home feeding
qmqpd of another over TCP)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import QHome, expect, make_home, run
from queuefmt import RECEIVED, files
from smtpdkit import Conversation, ForkServer, queued

from pyqmail.qmtp.qmail_qmqpc import server_address

QMTP_RECEIVED = re.compile(rb"^Received: from (\S+) \((\S+)\)\n  by (\S+) with (QMTP|QMQP); "
                           rb"\d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d -0000\n")
KOK = re.compile(rb"^(\d+):Kok (\d+) qp (\d+),")
KOK_ANY = re.compile(rb"(\d+):Kok (\d+) qp (\d+),")
TCP = {"TCPREMOTEIP": "192.0.2.7", "TCPLOCALIP": "192.0.2.1"}
DOMAIN = b"66:Dsorry, that domain isn't in my list of allowed rcpthosts (#5.7.1),"
RECIPIENT = b"46:Dsorry, I can't handle that recipient (#5.1.3),"


def ns(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


def qmtp(message: bytes, sender: bytes, *rcpts: bytes, mode: bytes = b"\n") -> bytes:
    return ns(mode + message) + ns(sender) + ns(b"".join(ns(r) for r in rcpts))


def qmqp(message: bytes, sender: bytes, *rcpts: bytes) -> bytes:
    return ns(ns(message) + ns(sender) + b"".join(ns(r) for r in rcpts))


@pytest.fixture(autouse=True)
def _no_leftover_servers():
    yield
    Conversation.close_all()


def server(qhome: QHome, name: str, env: dict[str, str] | None = None) -> Conversation:
    return Conversation(qhome.bin(name), dict(TCP, **(env or {})))


def body_of(mess: bytes) -> bytes:
    rest = mess[RECEIVED.match(mess).end():]
    m = QMTP_RECEIVED.match(rest)
    assert m, rest
    return rest[m.end():]


# --- qmail-qmtpd ---------------------------------------------------------------------------

def test_qmtpd_several_messages_in_one_session(qhome: QHome) -> None:
    c = server(qhome, "qmail-qmtpd")
    c.send(qmtp(b"Subject: one\n\nfirst\n", b"a@b.example", b"u@test.example.com", b"v@elsewhere.example",
                b"w\0@test.example.com", b"x" * 1000 + b"@test.example.com"))
    c.send(qmtp(b"Subject: two\r\n\r\nsecond\r\nlone\rcr\r\r\n", b"", b"y@test.example.com", mode=b"\r"))
    c.sock.shutdown(socket.SHUT_WR)
    got = c.rest()
    assert c.finish()[0] == 0
    m = KOK.match(got)
    assert m, got
    first = m.group(0)
    rest = got[len(first):]
    assert rest.startswith(DOMAIN + RECIPIENT + RECIPIENT)
    assert KOK.fullmatch(rest[len(DOMAIN) + 2 * len(RECIPIENT):])
    assert int(m.group(1)) == len(m.group(0)) - len(m.group(1)) - 2
    msgs = sorted(queued(qhome.queue), key=lambda m: m[1], reverse=True)
    assert [(s, r) for _, s, r in msgs] == [(b"a@b.example", [b"u@test.example.com"]), (b"", [b"y@test.example.com"])]
    assert body_of(msgs[0][0]) == b"Subject: one\n\nfirst\n"
    assert body_of(msgs[1][0]) == b"Subject: two\n\nsecond\nlone\rcr\r\n"
    rest = msgs[0][0][RECEIVED.match(msgs[0][0]).end():]
    assert rest.startswith(b"Received: from unknown (192.0.2.7)\n  by 192.0.2.1 with QMTP; ")
    assert RECEIVED.match(msgs[0][0]).group(1) == m.group(3)


def test_qmtpd_relayclient(qhome: QHome) -> None:
    c = server(qhome, "qmail-qmtpd", {"RELAYCLIENT": "+r"})
    c.send(qmtp(b"x\n", b"a@b", b"u@far.example", b"z" * 997, b"z" * 998))
    c.sock.shutdown(socket.SHUT_WR)
    got = c.rest()
    c.finish()
    assert got.endswith(RECIPIENT) and KOK.match(got)
    ((_, _, rcpts),) = queued(qhome.queue)
    assert rcpts == [b"u@far.example+r", b"z" * 997 + b"+r"]


def test_qmtpd_databytes(qhome: QHome) -> None:
    c = server(qhome, "qmail-qmtpd", {"DATABYTES": "10"})
    too_big = ns(b"Dsorry, that message size exceeds my databytes limit (#5.3.4)")
    c.send(qmtp(b"0123456789x", b"a@b", b"u@test.example.com"))
    c.send(qmtp(b"012345678\r\n", b"a@b", b"u@test.example.com", mode=b"\r"))  # 10 bytes as stored
    c.send(qmtp(b"0123456789\r\n", b"a@b", b"u@test.example.com", mode=b"\r"))
    c.send(qmtp(b"0123456789", b"a@b", b"u@test.example.com"))
    c.sock.shutdown(socket.SHUT_WR)
    got = c.rest()
    c.finish()
    m = KOK_ANY.search(got)
    k2 = KOK_ANY.search(got, m.end())
    assert got == too_big + m.group(0) + too_big + k2.group(0)
    assert sorted(body_of(mess) for mess, _, _ in queued(qhome.queue)) == [b"012345678\n", b"0123456789"]


def test_qmtpd_bad_sender(qhome: QHome) -> None:
    c = server(qhome, "qmail-qmtpd")
    bad = ns(b"Dunacceptable sender (#5.1.7)")
    c.send(qmtp(b"x\n", b"a\0b", b"u@test.example.com") + qmtp(b"x\n", b"s" * 1000, b"u@test.example.com"))
    c.sock.shutdown(socket.SHUT_WR)
    assert c.rest() == bad + bad
    c.finish()
    assert queued(qhome.queue) == []


@pytest.mark.parametrize("wire, code", [
    (b"", 0),                                    # client gone: fine
    (b"5:\nabc", 0),                             # gone in the middle: nothing queued
    (b"0:,", 100),                               # an empty message netstring
    (b"3:xab,", 100),                            # mode byte neither LF nor CR
    (b"3:\nab;", 100),                           # no comma
    (ns(b"\nab") + ns(b"s") + b"5:9:u@x,,", 100),  # a recipient longer than the list
    (ns(b"\nab") + ns(b"s") + b"3:1:u,", 100),    # a list ending inside a recipient length
    (b"999999999999:", 111),                     # lengths past 200000000 are lack of resources
    # notqmail 1.09: a length that is not a number is a protocol error...
    (b"x:", 100),
    (b"1x:", 100),
    (b"\xff:", 100),
    (ns(b"\nab") + b"x:", 100),                   # ...in the sender's netstring
    (ns(b"\nab") + ns(b"s") + b"1x:", 100),       # ...and the recipient list's
    (b"2000000001x:", 111),                      # the size is checked before the digit
])
def test_qmtpd_protocol_errors(qhome: QHome, wire: bytes, code: int) -> None:
    c = server(qhome, "qmail-qmtpd")
    c.send(wire)
    c.sock.shutdown(socket.SHUT_WR)
    assert c.rest() == b""
    assert c.finish()[0] == code
    assert queued(qhome.queue) == []
    assert files(qhome.queue)["mess"] == []


def test_qmtpd_recipient_lengths_are_not_checked_for_digits(qhome: QHome) -> None:
    # As in notqmail 1.09, only getlen() checks digits: inside the recipient list 'A' counts
    # 'A' - '0' = 17, and the next 17 bytes are the recipient.
    c = server(qhome, "qmail-qmtpd", {"RELAYCLIENT": ""})
    c.send(ns(b"\nab") + ns(b"s") + b"20:A:abcdefghijklmnopq,,")
    c.sock.shutdown(socket.SHUT_WR)
    assert KOK.fullmatch(c.rest())
    assert c.finish()[0] == 0
    ((_, _, rcpts),) = queued(qhome.queue)
    assert rcpts == [b"abcdefghijklmnopq"]


def test_qmtpd_no_recipients_gets_no_reply(qhome: QHome) -> None:
    c = server(qhome, "qmail-qmtpd")
    c.send(qmtp(b"x\n", b"a@b"))
    c.sock.shutdown(socket.SHUT_WR)
    assert c.rest() == b""
    assert c.finish()[0] == 0
    assert queued(qhome.queue) == []


def test_qmtpd_qmail_queue_refusal(qhome: QHome, tmp_path: Path) -> None:
    fake = tmp_path / "qq"
    fake.write_text("#!/bin/sh\ncat >/dev/null\ncat <&1 >/dev/null\nexit 31\n")
    fake.chmod(0o755)
    c = server(qhome, "qmail-qmtpd", {"QMAILQUEUE": str(fake)})
    c.send(qmtp(b"x\n", b"a@b", b"u@test.example.com", b"v@test.example.com"))
    c.sock.shutdown(socket.SHUT_WR)
    answer = ns(b"Dmail server permanently rejected message (#5.3.0)")
    assert c.rest() == answer * 2


def test_qmtpd_big_message(qhome: QHome) -> None:
    c = server(qhome, "qmail-qmtpd")
    body = (b"0123456789" * 100 + b"\r\n") * 5000
    c.send(qmtp(body, b"a@b", b"u@test.example.com", mode=b"\r"))
    c.sock.shutdown(socket.SHUT_WR)
    assert KOK.fullmatch(c.rest())
    ((mess, _, _),) = queued(qhome.queue)
    assert body_of(mess) == body.replace(b"\r\n", b"\n")


# --- qmail-qmqpd ---------------------------------------------------------------------------

def test_qmqpd_queues(qhome: QHome) -> None:
    c = server(qhome, "qmail-qmqpd", {"TCPREMOTEHOST": "client.example", "TCPREMOTEINFO": "joe"})
    c.send(qmqp(b"Subject: q\n\nbody\r\n", b"a@b.example", b"u@anywhere.example", b"v@x"))
    got = c.rest()
    assert c.finish()[0] == 0
    m = KOK.fullmatch(got)
    assert m, got
    ((mess, sender, rcpts),) = queued(qhome.queue)
    assert (sender, rcpts) == (b"a@b.example", [b"u@anywhere.example", b"v@x"])  # relays anywhere
    rest = mess[RECEIVED.match(mess).end():]
    assert rest.startswith(b"Received: from client.example (joe@192.0.2.7)\n  by 192.0.2.1 with QMQP; ")
    assert body_of(mess) == b"Subject: q\n\nbody\r\n"  # bytes as given
    assert RECEIVED.match(mess).group(1) == m.group(3)


@pytest.mark.parametrize("wire, reply, code", [
    (qmqp(b"m", b"a\0b", b"u@x"), ns(b"Dsorry, I can't accept addresses like that (#5.1.3)"), 0),
    (qmqp(b"m", b"a@b", b"u" * 1000), ns(b"Dsorry, I can't accept addresses like that (#5.1.3)"), 0),
    (b"", b"", 0),
    (b"20:5:hello,", b"", 0),                        # gone before the end
    (b"5:5:hello,,", b"", 100),                      # inner netstring past the outer one
    (b"3:1:m,,", b"", 100),                          # the sender runs past the end
    (b"8:1:m,1:s,;", b"", 100),                      # no final comma
    (b"0" * 100 + b":", b"", 100),                   # the outer length may take 100 bytes...
    (b"0" * 97 + b"12:1:m,1:s,1:r,,", None, 0),    # ...and no more
    (b"999999999999:", b"", 111),
    # notqmail 1.09: a length that is not a number is a protocol error, in every netstring.
    (b"x:", b"", 100),
    (b"\xff:", b"", 100),
    (b"10:x:", b"", 100),
    (b"10:1:m,x:", b"", 100),
    (b"12:1:m,1:s,1x:,", b"", 100),
])
def test_qmqpd_errors(qhome: QHome, wire: bytes, reply: bytes | None, code: int) -> None:
    c = server(qhome, "qmail-qmqpd")
    c.send(wire)
    c.sock.shutdown(socket.SHUT_WR)
    got = c.rest()
    assert c.finish()[0] == code
    if reply is None:
        assert KOK.fullmatch(got)
        assert len(queued(qhome.queue)) == 1
    else:
        assert got == reply
        assert queued(qhome.queue) == []


# --- qmail-qmqpc ---------------------------------------------------------------------------

def qmqpc(home: QHome, message: bytes, envelope: bytes, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """Run qmail-qmqpc with message on fd 0 and envelope on fd 1, as qmail-queue is run."""
    r, w = os.pipe()
    os.write(w, envelope)
    os.close(w)
    try:
        return subprocess.run([home.bin("qmail-qmqpc")], input=message, stdout=r, stderr=subprocess.PIPE,
                              env={"PATH": "/usr/bin:/bin"}, timeout=timeout)
    finally:
        os.close(r)


def test_server_address() -> None:
    assert server_address("127.0.0.1") == ("127.0.0.1", 628)
    assert server_address("10.0.0.1:6280") == ("10.0.0.1", 6280)
    assert server_address("10.0.0.1 # comment") == ("10.0.0.1", 628)
    assert server_address("10.0.0.1:x") == ("10.0.0.1", 628)
    assert server_address("10.0.0.1:99999") == ("10.0.0.1", 628)
    assert server_address("mx.example.com") is None
    assert server_address("") is None


class FakeQmqpServer:
    """A QMQP server that reads one request and answers with a fixed reply (or just closes)."""

    def __init__(self, reply: bytes) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.got = b""
        self.reply = reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(30)
            while not self.got.endswith(b",,"):
                data = conn.recv(65536)
                if not data:
                    break
                self.got += data
            conn.sendall(self.reply)

    def close(self) -> None:
        self.thread.join(30)
        self.sock.close()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("reply, code", [(b"12:Kok 1 qp 22,", 0), (b"5:Zlate,", 71), (b"4:Dno!,", 31),
                                         (b"", 74), (b"3:xyz,", 74)])
def test_qmqpc_exit_codes(qhome: QHome, reply: bytes, code: int) -> None:
    srv = FakeQmqpServer(reply)
    qhome.control("qmqpservers", f"# first a dead one\n127.0.0.1:{closed_port()}\nnot-an-ip\n127.0.0.1:{srv.port}\n")
    p = qmqpc(qhome, b"Subject: s\n\nhi\n", b"Fa@b\0Tc@d\0Te@f\0\0")
    srv.close()
    assert p.returncode == code, p.stderr
    assert srv.got == b"37:15:Subject: s\n\nhi\n,3:a@b,3:c@d,3:e@f,,"


def test_qmqpc_local_failures(qhome: QHome) -> None:
    p = qmqpc(qhome, b"m", b"Fa@b\0Tc@d\0\0")
    assert p.returncode == 55  # no control/qmqpservers
    qhome.control("qmqpservers", "")
    assert qmqpc(qhome, b"m", b"Fa@b\0Tc@d\0\0").returncode == 55  # nothing to try
    qhome.control("qmqpservers", f"127.0.0.1:{closed_port()}\n")
    assert qmqpc(qhome, b"m", b"Fa@b\0Tc@d\0\0").returncode == 73
    for envelope in (b"", b"Fa@b", b"\0", b"Xa@b\0\0", b"Fa@b\0Xc\0\0", b"Fa@b\0Tc@d\0"):
        assert qmqpc(qhome, b"m", envelope).returncode == 91, envelope


def test_qmqpc_big_message_is_spooled(qhome: QHome) -> None:
    srv = FakeQmqpServer(b"3:Kok,")
    qhome.control("qmqpservers", f"127.0.0.1:{srv.port}\n")
    body = b"y" * (3 << 20)
    p = qmqpc(qhome, body, b"F\0Tc@d\0\0")
    srv.close()
    assert p.returncode == 0, p.stderr
    assert srv.got == ns(ns(body) + ns(b"") + ns(b"c@d"))


def test_mini_qmail_qmqpc_into_qmqpd(qhome: QHome) -> None:
    """The book's mini-qmail: a home whose qmail-queue is qmail-qmqpc, feeding a central qmail-qmqpd."""
    central = make_home("central.example.com")
    try:
        with ForkServer(central.bin("qmail-qmqpd")) as srv:
            qhome.control("qmqpservers", f"127.0.0.1:{srv.port}\n")
            res = run([qhome.bin("qmail-inject"), "-fsender@test.example.com", "friend@far.example"],
                      input=b"Subject: via QMQP\n\nhello from a mini-qmail\n",
                      env={"PATH": "/usr/bin:/bin", "QMAILQUEUE": str(qhome.bin("qmail-qmqpc"))})
            expect(res, 0)
        assert queued(qhome.queue) == []
        ((mess, sender, rcpts),) = queued(central.queue)
        assert (sender, rcpts) == (b"sender@test.example.com", [b"friend@far.example"])
        rest = mess[RECEIVED.match(mess).end():]
        assert rest.startswith(b"Received: from unknown (127.0.0.1)\n  by 127.0.0.1 with QMQP; ")
        assert b"Subject: via QMQP\n" in rest and rest.endswith(b"\nhello from a mini-qmail\n")
    finally:
        shutil.rmtree(central.path.parent, ignore_errors=True)
