"""qmail-smtpd(8) as a process: real clients over TCP (smtplib, swaks), exact dialogues on a socketpair,
control files, relaying, qmail-queue's answers, and hostile clients."""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CI, QHome, expect, run
from queuefmt import RECEIVED, files, messages
from smtpdkit import Conversation, ForkServer, queued

from pyqmail.cdb import Reader
from pyqmail.smtpd import replies

SMTPD_RECEIVED = re.compile(
    rb"^Received: from (\S*) (?:\(HELO (\S*)\) )?\((\S*)\)\n  by (\S*) with SMTP; "
    rb"([1-9]|[12]\d|3[01]) (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d -0000\n")
ACCEPTED = re.compile(rb"^250 ok (\d+) qp (\d+)\r\n$")
GREETING = b"220 test.example.com ESMTP\r\n"
TCP = {"TCPREMOTEIP": "192.0.2.7", "TCPLOCALIP": "192.0.2.1", "TCPREMOTEHOST": "client.example.net"}


def no_certificate(qhome: QHome) -> None:
    """Remove the certificate `qmail init` makes: qmail 1.03's EHLO, without STARTTLS (test_smtpd_tls has it)."""
    (qhome.path / "control" / "servercert.pem").unlink(missing_ok=True)


def talk(qhome: QHome, env: dict[str, str] | None = None) -> Conversation:
    """Start qmail-smtpd on a socketpair and read its greeting."""
    c = Conversation(qhome.bin("qmail-smtpd"), dict(TCP, **(env or {})))
    assert c.line() == GREETING
    return c


def dialogue(c: Conversation, *pairs: tuple[bytes, bytes]) -> None:
    for command, answer in pairs:
        c.send(command)
        assert c.reply() == answer, command


def assert_empty_queue(qhome: QHome) -> None:
    fs = files(qhome.queue)
    assert all(not fs[d] for d in ("mess", "intd", "todo", "info", "local", "remote", "bounce", "pid")), fs


@pytest.fixture(autouse=True)
def _no_leftover_servers():
    yield
    Conversation.close_all()


@pytest.fixture
def smtp(qhome: QHome):
    """qmail-smtpd behind a forked accept loop on 127.0.0.1, as under tcpserver."""
    with ForkServer(qhome.bin("qmail-smtpd")) as srv:
        yield srv


# --- real clients over TCP -----------------------------------------------------------------

def test_smtplib_delivers(qhome: QHome, smtp: ForkServer) -> None:
    no_certificate(qhome)
    before = int(time.time())
    with smtplib.SMTP("127.0.0.1", smtp.port, local_hostname="client.example", timeout=30) as s:
        code, ehlo = s.ehlo()
        assert (code, ehlo) == (250, b"test.example.com\nPIPELINING\n8BITMIME")
        assert not s.has_extn("size")
        refused = s.sendmail("alice@client.example", ["bob@test.example.com", "carol@test.example.com"],
                             "Subject: hello\r\n\r\nHello, Bob.\r\n.leading dot\r\n")
        assert refused == {}
        code, text = s.noop()
        assert code == 250
    ((mess, sender, rcpts),) = queued(qhome.queue)
    assert (sender, rcpts) == (b"alice@client.example", [b"bob@test.example.com", b"carol@test.example.com"])
    m = RECEIVED.match(mess)
    assert m and m.group(2) == f"invoked by uid {os.getuid()}".encode()
    rest = mess[m.end():]
    r = SMTPD_RECEIVED.match(rest)
    assert r, rest
    assert r.group(1, 2, 3, 4) == (b"unknown", b"client.example", b"127.0.0.1", b"127.0.0.1")
    assert rest[r.end():] == b"Subject: hello\n\nHello, Bob.\n.leading dot\n"
    assert int(time.time()) - before < 60


def test_accept_reply_names_the_time_and_qmail_queue_pid(qhome: QHome, smtp: ForkServer) -> None:
    with smtplib.SMTP("127.0.0.1", smtp.port, local_hostname="c.example", timeout=30) as s:
        s.helo("c.example")
        s.mail("a@c.example")
        s.rcpt("b@test.example.com")
        before = int(time.time())
        code, text = s.data(b"Subject: x\r\n\r\ny\r\n")
        after = int(time.time())
    assert code == 250
    m = re.fullmatch(rb"ok (\d+) qp (\d+)", text)
    assert m and before <= int(m.group(1)) <= after
    ((mess, _, _),) = queued(qhome.queue)
    assert RECEIVED.match(mess).group(1) == m.group(2)


def test_swaks_delivers(qhome: QHome, smtp: ForkServer) -> None:
    swaks = shutil.which("swaks")
    if swaks is None:
        if CI:
            pytest.fail("swaks is missing: .ci/run must install Debian's swaks")
        pytest.skip("swaks not installed")
    res = run([swaks, "--server", "127.0.0.1", "--port", str(smtp.port), "--helo", "swaks.example",
               "--from", "sender@swaks.example", "--to", "rcpt@test.example.com",
               "--header", "Subject: from swaks", "--body", "swaks body line"], timeout=60)
    expect(res, 0)
    assert b"<-  250 ok" in res.stdout and b"<-  221 test.example.com" in res.stdout, res.explain()
    ((mess, sender, rcpts),) = queued(qhome.queue)
    assert (sender, rcpts) == (b"sender@swaks.example", [b"rcpt@test.example.com"])
    assert b"(HELO swaks.example) (127.0.0.1)\n  by 127.0.0.1 with SMTP; " in mess
    assert b"Subject: from swaks\n" in mess and b"\nswaks body line\n" in mess
    assert b"\r" not in mess


def test_under_pyqmail_tcpserver(qhome: QHome) -> None:
    """The book's setup: tcpserver runs qmail-smtpd per connection and describes the peer in its environment."""
    try:
        __import__("pyqmail.ucspi.tcpserver")
    except ImportError:
        pytest.skip("pyqmail's tcpserver is not there yet")
    p = subprocess.Popen([qhome.bin("tcpserver"), "-1", "-HR", "-l", "mx.test.example.com", "127.0.0.1", "0",
                          qhome.bin("qmail-smtpd")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={"PATH": "/usr/bin:/bin", "RELAYCLIENT": ""})
    try:
        port = int(p.stdout.readline())
        with smtplib.SMTP("127.0.0.1", port, local_hostname="c.example", timeout=30) as s:
            assert s.sendmail("a@c.example", ["x@far.example"], "Subject: t\r\n\r\nhi\r\n") == {}
    finally:
        p.terminate()
        p.communicate(timeout=30)
    ((mess, sender, rcpts),) = queued(qhome.queue)
    assert (sender, rcpts) == (b"a@c.example", [b"x@far.example"])
    rest = mess[RECEIVED.match(mess).end():]
    assert rest.startswith(b"Received: from unknown (HELO c.example) (127.0.0.1)\n  by mx.test.example.com with SMTP; ")


def _greeting_via_tcpserver(qhome: QHome, change: object = None) -> list[bytes]:
    """Start tcpserver + qmail-smtpd (which warms up in tcpserver's parent), read two greetings."""
    p = subprocess.Popen([qhome.bin("tcpserver"), "-1", "-HR", "-l", "mx.test.example.com", "127.0.0.1", "0",
                          qhome.bin("qmail-smtpd")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={"PATH": "/usr/bin:/bin"})
    got = []
    try:
        port = int(p.stdout.readline())
        for step in range(2):
            if step == 1 and change is not None:
                change()  # type: ignore[operator]
            with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
                got.append(c.makefile("rb").readline())
    finally:
        p.terminate()
        p.communicate(timeout=30)
    return got


def test_warm_up_in_tcpserver_caches_no_control_file(qhome: QHome) -> None:
    """qmail-smtpd's preload runs sessions in tcpserver's parent; each connection still reads the controls."""
    qhome.control("smtpgreeting", "first.example")
    got = _greeting_via_tcpserver(qhome, lambda: qhome.control("smtpgreeting", "second.example says hi"))
    assert got == [b"220 first.example ESMTP\r\n", b"220 second.example says hi ESMTP\r\n"]
    assert queued(qhome.queue) == []


def test_warm_up_with_broken_controls(qhome: QHome) -> None:
    """No greeting and no me: the warm-up gives up quietly and every connection gets qmail's 421."""
    qhome.control("smtpgreeting", None)
    qhome.control("me", None)
    got = _greeting_via_tcpserver(qhome, lambda: qhome.control("me", "back.example"))
    assert got == [b"421 unable to read controls (#4.3.0)\r\n", b"220 back.example ESMTP\r\n"]


def test_warm_up_imports_the_queue_program(qhome: QHome) -> None:
    """tcpserver's parent imports the module of the qmail-queue each message starts (when it is one
    of ours), so that no connection unmarshals it again; another $QMAILQUEUE leaves it out."""
    code = ("import sys\nfrom pyqmail.smtpd import qmail_smtpd\nqmail_smtpd.preload()\n"
            "print('pyqmail.queue.qmail_queue' in sys.modules)\n")
    base = {"PATH": "/usr/bin:/bin", "QMAILHOME": str(qhome.path)}
    assert expect(run([sys.executable, "-c", code], env=base)).stdout == b"True\n"
    other = dict(base, QMAILQUEUE="/bin/cat")
    assert expect(run([sys.executable, "-c", code], env=other)).stdout == b"False\n"


def test_relay_control_over_tcp(qhome: QHome) -> None:
    with ForkServer(qhome.bin("qmail-smtpd")) as srv:
        with smtplib.SMTP("127.0.0.1", srv.port, local_hostname="c.example", timeout=30) as s:
            s.helo()
            s.mail("a@c.example")
            code, text = s.rcpt("victim@elsewhere.example")
            assert (code, text) == (553, b"sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)")
    assert queued(qhome.queue) == []
    with ForkServer(qhome.bin("qmail-smtpd"), {"RELAYCLIENT": ""}) as srv:
        with smtplib.SMTP("127.0.0.1", srv.port, local_hostname="c.example", timeout=30) as s:
            assert s.sendmail("a@c.example", ["friend@elsewhere.example"], "Subject: r\r\n\r\nr\r\n") == {}
    ((_, _, rcpts),) = queued(qhome.queue)
    assert rcpts == [b"friend@elsewhere.example"]


# --- exact dialogues -----------------------------------------------------------------------

def test_whole_dialogue(qhome: QHome) -> None:
    no_certificate(qhome)
    c = talk(qhome)
    dialogue(c,
             (b"EHLO liar.example\r\n", b"250-test.example.com\r\n250-PIPELINING\r\n250 8BITMIME\r\n"),
             (b"HELP\r\n", replies.HELP),
             (b"VRFY root\r\n", replies.VRFY),
             (b"NOOP\r\n", b"250 ok\r\n"),
             (b"EXPN x\r\n", b"502 unimplemented (#5.5.1)\r\n"),
             (b"MAIL FROM:<a@b.example> BODY=8BITMIME\r\n", b"250 ok\r\n"),
             (b"RCPT TO:<x@test.example.com>\r\n", b"250 ok\r\n"),
             (b"RSET\r\n", b"250 flushed\r\n"),
             (b"DATA\r\n", b"503 MAIL first (#5.5.1)\r\n"),
             (b"MAIL FROM:<>\r\n", b"250 ok\r\n"),
             (b"DATA\r\n", b"503 RCPT first (#5.5.1)\r\n"),
             (b"RCPT TO:<x@test.example.com>\r\n", b"250 ok\r\n"),
             (b"DATA\r\n", b"354 go ahead\r\n"))
    c.send(b"Subject: s\r\n\r\nbody\r\n.\r\n")
    assert ACCEPTED.match(c.reply())
    c.send(b"QUIT\r\n")
    assert c.rest() == b"221 test.example.com\r\n"
    assert c.finish()[0] == 0
    ((mess, sender, rcpts),) = queued(qhome.queue)
    assert (sender, rcpts) == (b"", [b"x@test.example.com"])
    rest = mess[RECEIVED.match(mess).end():]
    r = SMTPD_RECEIVED.match(rest)
    assert r.group(0).startswith(
        b"Received: from client.example.net (HELO liar.example) (192.0.2.7)\n  by 192.0.2.1 with SMTP; ")
    assert rest[r.end():] == b"Subject: s\n\nbody\n"


def test_received_fields_from_the_environment(qhome: QHome) -> None:
    env = {"TCPREMOTEINFO": "joe smith", "TCPLOCALHOST": "mx.example.com", "TCPREMOTEHOST": "Client.Example.NET"}
    c = talk(qhome, env)
    c.send(b"HELO client.example.net\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@test.example.com>\r\nDATA\r\n"
           b"x\r\n.\r\nQUIT\r\n")
    assert c.lines(6)[4].startswith(b"250 ok ")
    c.finish()
    ((mess, _, _),) = queued(qhome.queue)
    rest = mess[RECEIVED.match(mess).end():]
    # HELO matching TCPREMOTEHOST (case aside) is not shown; unsafe bytes become '?'.
    assert rest.startswith(b"Received: from Client.Example.NET (joe?smith@192.0.2.7)\n  by mx.example.com with SMTP; ")


def test_no_environment_at_all(qhome: QHome) -> None:
    c = Conversation(qhome.bin("qmail-smtpd"), {})
    assert c.line() == GREETING
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@test.example.com>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n")
    c.lines(5)
    c.finish()
    ((mess, _, _),) = queued(qhome.queue)
    assert mess[RECEIVED.match(mess).end():].startswith(b"Received: from unknown (unknown)\n  by unknown with SMTP; ")


def test_greeting_controls(qhome: QHome) -> None:
    qhome.control("smtpgreeting", "mx.example.org NO UCE  \t\n")
    c = Conversation(qhome.bin("qmail-smtpd"), TCP)
    assert c.line() == b"220 mx.example.org NO UCE ESMTP\r\n"
    dialogue(c, (b"HELO x\r\n", b"250 mx.example.org NO UCE\r\n"))
    c.send(b"QUIT\r\n")
    assert c.rest() == b"221 mx.example.org NO UCE\r\n"
    c.finish()
    qhome.control("smtpgreeting", None)
    qhome.control("me", None)
    c = Conversation(qhome.bin("qmail-smtpd"), TCP)
    assert c.rest() == b"421 unable to read controls (#4.3.0)\r\n"
    assert c.finish()[0] == 1


def test_unreadable_me_is_421_even_with_smtpgreeting(qhome: QHome) -> None:
    qhome.control("smtpgreeting", "mx.example.org")
    qhome.control("me", None)
    (qhome.path / "control" / "me").mkdir()
    c = Conversation(qhome.bin("qmail-smtpd"), TCP)
    assert c.rest() == replies.CONTROL
    assert c.finish()[0] == 1


def test_unreadable_control_file_is_421(qhome: QHome) -> None:
    (qhome.path / "control" / "rcpthosts").unlink()
    (qhome.path / "control" / "rcpthosts").mkdir()
    c = Conversation(qhome.bin("qmail-smtpd"), TCP)
    assert c.rest() == replies.CONTROL
    assert c.finish()[0] == 1


def test_missing_rcpthosts_accepts_everything(qhome: QHome) -> None:
    qhome.control("rcpthosts", None)
    c = talk(qhome)
    dialogue(c, (b"MAIL FROM:<a@b>\r\n", b"250 ok\r\n"), (b"RCPT TO:<u@any.where>\r\n", b"250 ok\r\n"))
    c.close()


def test_relayclient_is_appended(qhome: QHome) -> None:
    c = talk(qhome, {"RELAYCLIENT": "-via-relay"})
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<u@far.example>\r\nRCPT TO:<v@test.example.com>\r\nDATA\r\nx\r\n.\r\n")
    assert ACCEPTED.match(c.lines(5)[4])
    c.close()
    ((_, _, rcpts),) = queued(qhome.queue)
    assert rcpts == [b"u@far.example-via-relay", b"v@test.example.com-via-relay"]


def test_badmailfrom(qhome: QHome) -> None:
    qhome.control("badmailfrom", "# spammers\nspam@example.net  \n@evil.example\n\n")
    c = talk(qhome)
    dialogue(c,
             (b"MAIL FROM:<Spam@Example.net>\r\n", b"250 ok\r\n"),
             (b"RCPT TO:<u@test.example.com>\r\n", replies.BADMAILFROM),
             (b"MAIL FROM:<x@EVIL.example>\r\n", b"250 ok\r\n"),
             (b"RCPT TO:<u@test.example.com>\r\n",
              b"553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)\r\n"),
             (b"DATA\r\n", replies.WANT_RCPT),
             (b"MAIL FROM:<ok@example.net>\r\n", b"250 ok\r\n"),
             (b"RCPT TO:<u@test.example.com>\r\n", b"250 ok\r\n"))
    c.close()


def test_morercpthosts_and_qmail_newmrh(qhome: QHome) -> None:
    qhome.control("morercpthosts", "# more\nMore.Example  \n.wild.example\t\n\n  \n")
    expect(run([qhome.bin("qmail-newmrh")]))
    cdb = qhome.path / "control" / "morercpthosts.cdb"
    assert oct(cdb.stat().st_mode & 0o777) == "0o644"
    assert not (qhome.path / "control" / "morercpthosts.tmp").exists()
    with Reader.open(str(cdb)) as r:
        assert list(r.items()) == [(b"more.example", b""), (b".wild.example", b"")]
    if shutil.which("cdb"):
        dump = subprocess.run(["cdb", "-d", str(cdb)], capture_output=True, check=True).stdout
        assert dump == b"+12,0:more.example->\n+13,0:.wild.example->\n\n"
    c = talk(qhome)
    dialogue(c,
             (b"MAIL FROM:<a@b>\r\n", b"250 ok\r\n"),
             (b"RCPT TO:<u@more.example>\r\n", b"250 ok\r\n"),
             (b"RCPT TO:<u@MORE.EXAMPLE>\r\n", b"250 ok\r\n"),
             (b"RCPT TO:<u@a.wild.example>\r\n", b"250 ok\r\n"),
             (b"RCPT TO:<u@wild.example>\r\n", replies.NOGATEWAY),
             (b"RCPT TO:<u@test.example.com>\r\n", b"250 ok\r\n"))
    c.close()
    # Without rcpthosts, morercpthosts.cdb is not consulted: everything is accepted.
    qhome.control("rcpthosts", None)
    c = talk(qhome)
    dialogue(c, (b"MAIL FROM:<a@b>\r\n", b"250 ok\r\n"), (b"RCPT TO:<u@anything.example>\r\n", b"250 ok\r\n"))
    c.close()


def test_malformed_morercpthosts_cdb_fails_at_lookup(qhome: QHome) -> None:
    (qhome.path / "control" / "morercpthosts.cdb").write_bytes(b"short")
    c = talk(qhome)
    dialogue(c,
             (b"MAIL FROM:<a@b>\r\n", b"250 ok\r\n"),
             (b"RCPT TO:<u@test.example.com>\r\n", b"250 ok\r\n"))  # found in rcpthosts first
    c.send(b"RCPT TO:<u@other.example>\r\n")
    assert c.rest() == b"421 unable to read controls (#4.3.0)\r\n"
    assert c.finish()[0] == 1


def test_qmail_newmrh_errors(qhome: QHome) -> None:
    res = expect(run([qhome.bin("qmail-newmrh")]), 111)
    assert res.stderr == b"qmail-newmrh: fatal: unable to read control/morercpthosts: file does not exist\n"
    assert res.stdout == b""
    qhome.control("morercpthosts", "a.example\n")
    (qhome.path / "control" / "morercpthosts.cdb").mkdir()
    res = expect(run([qhome.bin("qmail-newmrh")]), 111)
    assert res.stderr == (b"qmail-newmrh: fatal: unable to move control/morercpthosts.tmp to "
                          b"control/morercpthosts.cdbis a directory\n")
    res = expect(run([qhome.bin("qmail-newmrh")], env={"QMAILHOME": "/nonexistent/qmail"}), 111)
    assert res.stderr == b"qmail-newmrh: fatal: unable to chdir to /nonexistent/qmail: file does not exist\n"


def test_qmail_newmrh_replaces_atomically(qhome: QHome) -> None:
    qhome.control("morercpthosts", "one.example\n")
    expect(run([qhome.bin("qmail-newmrh")]))
    cdb = qhome.path / "control" / "morercpthosts.cdb"
    inode = cdb.stat().st_ino
    qhome.control("morercpthosts", "two.example\nthree.example")  # no final newline
    expect(run([qhome.bin("qmail-newmrh")]))
    assert cdb.stat().st_ino != inode
    with Reader.open(str(cdb)) as r:
        assert [k for k, _ in r.items()] == [b"two.example", b"three.example"]


def test_qmail_newmrh_big_and_odd_input(qhome: QHome) -> None:
    lines = [f"d{i}.Example" for i in range(50000)] + ["cr.example\r", "\t#not.a.comment", "x\0y.example \t"]
    qhome.control("morercpthosts", "\n".join(lines) + "\n")
    expect(run([qhome.bin("qmail-newmrh")]))
    with Reader.open(str(qhome.path / "control" / "morercpthosts.cdb")) as r:
        keys = [k for k, _ in r.items()]
        assert len(keys) == 50003
        assert keys[-3:] == [b"cr.example\r", b"\t#not.a.comment", b"x\0y.example"]  # CR and a leading tab stay
        assert r.get(b"d49999.example") == b""
    # A missing source leaves the old cdb alone.
    qhome.control("morercpthosts", None)
    expect(run([qhome.bin("qmail-newmrh")]), 111)
    with Reader.open(str(qhome.path / "control" / "morercpthosts.cdb")) as r:
        assert r.get(b"d1.example") == b""


def test_localiphost(qhome: QHome) -> None:
    qhome.control("localiphost", "local.example")
    qhome.control("rcpthosts", "local.example\n")
    c = talk(qhome)
    c.send(b"MAIL FROM:<a@[127.0.0.1]>\r\nRCPT TO:<u@[127.0.0.1]>\r\nRCPT TO:<v@[0.0.0.0]>\r\n"
           b"RCPT TO:<w@[192.0.2.200]>\r\nDATA\r\nx\r\n.\r\n")
    got = c.lines(6)
    assert got[:5] == [b"250 ok\r\n", b"250 ok\r\n", b"250 ok\r\n", replies.NOGATEWAY, b"354 go ahead\r\n"]
    c.close()
    ((_, sender, rcpts),) = queued(qhome.queue)
    assert (sender, rcpts) == (b"a@local.example", [b"u@local.example", b"v@local.example"])


def test_localiphost_defaults_to_me(qhome: QHome) -> None:
    c = talk(qhome)
    dialogue(c, (b"MAIL FROM:<a@b>\r\n", b"250 ok\r\n"), (b"RCPT TO:<u@[127.0.0.1]>\r\n", b"250 ok\r\n"))
    c.close()


# --- qmail-queue's answers -----------------------------------------------------------------

def fake_queue(tmp: Path, body: str) -> str:
    path = tmp / "fake-qmail-queue"
    path.write_text("#!/bin/sh\ncat >/dev/null\ncat <&1 >/dev/null\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("script, answer", [
    ("exit 31", b"554 mail server permanently rejected message (#5.3.0)\r\n"),
    ("exit 71", b"451 mail server temporarily rejected message (#4.3.0)\r\n"),
    ("exit 11", b"554 envelope address too long for qq (#5.1.3)\r\n"),
    ("exit 53", b"451 qq write error or disk full (#4.3.0)\r\n"),
    ("exit 17", b"554 qq permanent problem (#5.3.0)\r\n"),
    ("exit 99", b"451 qq temporary problem (#4.3.0)\r\n"),
    ("kill -9 $$", b"451 qq crashed (#4.3.0)\r\n"),
    ("printf 'Dgo away (#5.7.1)' >&6; exit 82", b"554 go away (#5.7.1)\r\n"),
    ("printf 'Zlater please' >&6; exit 82", b"451 later please\r\n"),
    # notqmail 1.09's qmail_close and qmail-smtpd (checked against it built from source): the
    # text counts only past 2 bytes; 554 for D, 451 for any other first byte, which is dropped;
    # 255 bytes at most, cut at a NUL, a newline kept.
    ("printf D >&6; exit 82", b"451 qq temporary problem (#4.3.0)\r\n"),
    ("printf Dx >&6; exit 82", b"451 qq temporary problem (#4.3.0)\r\n"),
    ("printf Dxy >&6; exit 82", b"554 xy\r\n"),
    ("printf Xyz >&6; exit 82", b"451 yz\r\n"),
    ("printf 'Dfoo\\n' >&6; exit 82", b"554 foo\n\r\n"),
    ("printf 'Dab\\000cd' >&6; exit 82", b"554 ab\r\n"),
    ("printf 'D\\000\\000' >&6; exit 82", b"554 \r\n"),
    ("{ printf Z; printf %0298d 0; printf b; } >&6; exit 82", b"451 " + b"0" * 254 + b"\r\n"),
    # Where C would answer 250 for a message it did not queue (a text starting with NUL).
    ("printf '\\000ab' >&6; exit 82", b"451 qq temporary problem (#4.3.0)\r\n"),
    ("printf 'Dtext' >&6; exit 31", b"554 mail server permanently rejected message (#5.3.0)\r\n"),
])
def test_qmailqueue_exit_codes(qhome: QHome, tmp_path: Path, script: str, answer: bytes) -> None:
    c = talk(qhome, {"QMAILQUEUE": fake_queue(tmp_path, script)})
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<u@test.example.com>\r\nDATA\r\nx\r\n.\r\nNOOP\r\n")
    assert c.lines(5)[2:] == [b"354 go ahead\r\n", answer, b"250 ok\r\n"]
    c.close()


def test_qmailqueue_sees_message_and_envelope(qhome: QHome, tmp_path: Path) -> None:
    out = tmp_path / "seen"
    prog = fake_queue(tmp_path, "")
    Path(prog).write_text(f"#!/bin/sh\ncat > {out}.m\ncat <&1 > {out}.e\nexit 0\n")
    c = talk(qhome, {"QMAILQUEUE": prog, "RELAYCLIENT": ""})
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<u@x>\r\nRCPT TO:<v@y>\r\nDATA\r\nhello\r\n.\r\n")
    assert ACCEPTED.match(c.lines(5)[4])
    c.close()
    assert Path(f"{out}.e").read_bytes() == b"Fa@b\0Tu@x\0Tv@y\0\0"
    m = Path(f"{out}.m").read_bytes()
    assert SMTPD_RECEIVED.match(m) and m.endswith(b"\nhello\n")


def test_unable_to_exec_qq(qhome: QHome, tmp_path: Path) -> None:
    c = talk(qhome, {"QMAILQUEUE": str(tmp_path / "missing")})
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<u@test.example.com>\r\nDATA\r\nx\r\n.\r\n")
    assert c.lines(4)[2:] == [b"354 go ahead\r\n", b"451 unable to exec qq (#4.3.0)\r\n"]
    c.close()


def test_too_many_hops(qhome: QHome) -> None:
    c = talk(qhome)
    head = b"Received: hop\r\n" * 60 + b"Delivered-To: hop\r\n" * 40
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<u@test.example.com>\r\nDATA\r\n" + head + b"\r\nbody\r\n.\r\n")
    assert c.lines(4)[3] == b"554 too many hops, this message is looping (#5.4.6)\r\n"
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<u@test.example.com>\r\nDATA\r\n" + head[15:] + b"\r\n.\r\n")
    assert ACCEPTED.match(c.lines(4)[3])  # 99 hops pass
    c.close()
    assert len(queued(qhome.queue)) == 1


# --- hostile clients -----------------------------------------------------------------------

def test_bare_lf_in_data_drops_the_connection(qhome: QHome) -> None:
    c = talk(qhome)
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<u@test.example.com>\r\nDATA\r\nSubject: x\r\n\r\nbare\nlf\r\n.\r\n")
    assert c.lines(3) == [b"250 ok\r\n", b"250 ok\r\n", b"354 go ahead\r\n"]
    assert c.rest() == b"451 See https://cr.yp.to/docs/smtplf.html.\r\n"  # notqmail 1.09
    assert c.finish()[0] == 1
    assert_empty_queue(qhome)


def test_bare_lf_commands_are_fine(qhome: QHome) -> None:
    c = talk(qhome)
    dialogue(c, (b"HELO x\n", b"250 test.example.com\r\n"), (b"NOOP\n", b"250 ok\r\n"))
    c.close()


def test_nul_bytes(qhome: QHome) -> None:
    c = talk(qhome)
    dialogue(c,
             (b"HE\0LO x\r\n", replies.UNIMPLEMENTED),
             (b"HELO a\0b\r\n", b"250 test.example.com\r\n"),
             (b"MAIL FROM:<s\0@evil>\r\n", b"250 ok\r\n"),
             (b"RCPT TO:<u@test.example.com>\0junk\r\n", b"250 ok\r\n"),
             (b"DATA\r\n", b"354 go ahead\r\n"))
    c.send(b"Subject: \0nul\r\n\r\n\0\0\r\n.\r\n")
    assert ACCEPTED.match(c.reply())
    c.close()
    ((mess, sender, rcpts),) = queued(qhome.queue)
    assert (sender, rcpts) == (b"s", [b"u@test.example.com"])
    assert b"Received: from client.example.net (HELO a) (192.0.2.7)\n" in mess
    assert mess.endswith(b"Subject: \0nul\n\n\0\0\n")


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_huge_command_lines_are_bounded(qhome: QHome) -> None:
    c = talk(qhome)
    dialogue(c, (b"NOOP\r\n", b"250 ok\r\n"))
    base = vm_hwm(c.proc.pid)
    dialogue(c,
             (b"NOOP " + b"x" * (1 << 20) + b"\r\n", b"250 ok\r\n"),
             (b"MAIL FROM:<" + b"a" * (1 << 20) + b">\r\n", replies.SYNTAX),
             (b"Z" * (16 << 20) + b"\r\n", replies.UNIMPLEMENTED),
             (b"HELO " + b"h" * (4 << 20) + b"\r\n", b"250 test.example.com\r\n"),
             (b"MAIL FROM:<a@b>\r\n", b"250 ok\r\n"))
    grown = vm_hwm(c.proc.pid) - base
    assert grown < 8 << 20, f"qmail-smtpd grew by {grown} bytes for a 16 MB line"
    c.close()


def test_pipelined_before_the_greeting(qhome: QHome) -> None:
    no_certificate(qhome)
    c = Conversation(qhome.bin("qmail-smtpd"), TCP)
    c.send(b"EHLO early.example\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@test.example.com>\r\nRCPT TO:<v@nowhere.example>\r\n"
           b"DATA\r\nSubject: early\r\n\r\n..x\r\n.\r\nMAIL FROM:<c@d>\r\nRCPT TO:<w@test.example.com>\r\n"
           b"DATA\r\nsecond\r\n.\r\nQUIT\r\n")
    got = c.rest()
    assert c.finish()[0] == 0
    lines = got.split(b"\r\n")
    assert lines[:9] == [b"220 test.example.com ESMTP", b"250-test.example.com", b"250-PIPELINING", b"250 8BITMIME",
                         b"250 ok", b"250 ok", replies.NOGATEWAY[:-2], b"354 go ahead", lines[8]]
    assert ACCEPTED.match(lines[8] + b"\r\n")
    assert lines[9:12] == [b"250 ok", b"250 ok", b"354 go ahead"]
    assert ACCEPTED.match(lines[12] + b"\r\n")
    assert lines[13:] == [b"221 test.example.com", b""]
    msgs = sorted(queued(qhome.queue), key=lambda m: m[1])
    assert [(s, r) for _, s, r in msgs] == [(b"a@b", [b"u@test.example.com"]), (b"c@d", [b"w@test.example.com"])]
    assert msgs[0][0].endswith(b"Subject: early\n\n.x\n") and msgs[1][0].endswith(b"\nsecond\n")


def test_pipelined_garbage(qhome: QHome) -> None:
    c = talk(qhome)
    junk = b"".join(b"GARBAGE %d \x01\xff\r\n" % i for i in range(2000))
    c.send(junk + b"\r\n\n \r\nQUIT\r\n")
    got = c.rest()
    assert got == replies.UNIMPLEMENTED * 2003 + b"221 test.example.com\r\n"
    assert c.finish()[0] == 0


def test_message_over_databytes(qhome: QHome) -> None:
    qhome.control("databytes", "100")
    c = talk(qhome)
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<u@test.example.com>\r\nDATA\r\n" + b"x" * 100 + b"\r\n.\r\n")
    assert c.lines(4)[3] == b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n"
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<u@test.example.com>\r\nDATA\r\n" + b"x" * 99 + b".\r\n.\r\n")
    assert c.lines(4)[3] == replies.DATABYTES  # 101 bytes as stored
    assert_empty_queue(qhome)
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<u@test.example.com>\r\nDATA\r\n" + b"x" * 99 + b"\r\n.\r\n")
    assert ACCEPTED.match(c.lines(4)[3])  # exactly 100 bytes
    c.close()
    assert len(queued(qhome.queue)) == 1


def test_databytes_environment_overrides(qhome: QHome) -> None:
    qhome.control("databytes", "100000")
    c = talk(qhome, {"DATABYTES": "10"})
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<u@test.example.com>\r\nDATA\r\n0123456789\r\n.\r\n")
    assert c.lines(4)[3] == replies.DATABYTES
    c.close()
    c = talk(qhome, {"DATABYTES": "junk"})  # not a number: 0, no limit
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<u@test.example.com>\r\nDATA\r\n" + b"y" * 200000 + b"\r\n.\r\n")
    assert ACCEPTED.match(c.lines(4)[3])
    c.close()


def test_big_message_streams_through(qhome: QHome) -> None:
    c = talk(qhome)
    line = b"0123456789" * 100_000
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<u@test.example.com>\r\nDATA\r\n")
    c.lines(3)
    base = vm_hwm(c.proc.pid)
    for _ in range(8):
        c.send(line + b"\r\n")
    c.send(b".\r\n")
    assert ACCEPTED.match(c.reply())
    assert vm_hwm(c.proc.pid) - base < 8 << 20
    c.close()
    ((mess, _, _),) = queued(qhome.queue)
    assert mess.endswith((line + b"\n") * 8)


def test_client_that_stops_talking(qhome: QHome) -> None:
    qhome.control("timeoutsmtpd", "1")
    c = talk(qhome)
    start = time.monotonic()
    assert c.rest() == b"451 timeout (#4.4.2)\r\n"
    assert 0.9 < time.monotonic() - start < 20
    assert c.finish()[0] == 1


@pytest.mark.parametrize("value", ["99999999999", "junk", "-5"])
def test_odd_timeoutsmtpd_values(qhome: QHome, value: str) -> None:
    qhome.control("timeoutsmtpd", value)
    c = talk(qhome)
    dialogue(c, (b"NOOP\r\n", b"250 ok\r\n"))
    c.send(b"QUIT\r\n")
    assert c.rest() == b"221 test.example.com\r\n"
    assert c.finish()[0] == 0


def test_client_that_stops_talking_during_data(qhome: QHome) -> None:
    qhome.control("timeoutsmtpd", "1")
    c = talk(qhome)
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<u@test.example.com>\r\nDATA\r\nSubject: half\r\n\r\nhalf a mess")
    assert c.lines(3)[2] == b"354 go ahead\r\n"
    assert c.rest() == replies.TIMEOUT
    assert c.finish()[0] == 1
    assert_empty_queue(qhome)


def test_client_that_leaves_during_data(qhome: QHome) -> None:
    c = talk(qhome)
    c.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<u@test.example.com>\r\nDATA\r\nSubject: half\r\n\r\nhalf")
    assert c.lines(3)[2] == b"354 go ahead\r\n"
    rc, err = c.finish()
    assert rc == 1 and err == b""
    assert_empty_queue(qhome)
    assert messages(qhome.queue) == {}


def test_eof_without_quit_exits_1(qhome: QHome) -> None:
    c = talk(qhome)
    assert c.finish() == (1, b"")


def test_on_a_terminal(qhome: QHome) -> None:
    """The book's way of testing: type at qmail-smtpd; Ctrl-V Enter Enter makes CR LF for DATA."""
    leader, follower = pty.openpty()
    p = subprocess.Popen([qhome.bin("qmail-smtpd")], stdin=follower, stdout=follower, stderr=subprocess.PIPE,
                         env={"PATH": "/usr/bin:/bin"})
    os.close(follower)
    got = b""
    seen = 0

    def expect_text(text: bytes) -> None:
        nonlocal got, seen
        deadline = time.monotonic() + 30
        while text not in got[seen:]:
            left = deadline - time.monotonic()
            assert left > 0, got
            if select.select([leader], [], [], left)[0]:
                got += os.read(leader, 4096)
        seen = got.index(text, seen) + len(text)

    try:
        expect_text(b"220 test.example.com ESMTP\r")
        for typed, answer in ((b"helo me\n", b"250 test.example.com\r"), (b"mail from:<me@here>\n", b"250 ok\r"),
                              (b"rcpt to:<you@test.example.com>\n", b"250 ok\r"),
                              (b"data\n", b"354 go ahead\r")):
            os.write(leader, typed)
            expect_text(answer)
        os.write(leader, b"Subject: typed\x16\r\r\x16\r\rhi\x16\r\r.\x16\r\r")
        expect_text(b"250 ok 1")
        os.write(leader, b"quit\n")
        expect_text(b"221 test.example.com\r")
        assert p.wait(timeout=30) == 0
    finally:
        os.close(leader)
        if p.poll() is None:
            p.kill()
        p.communicate()
    ((mess, sender, _),) = queued(qhome.queue)
    assert sender == b"me@here" and mess.endswith(b"\nSubject: typed\n\nhi\n")
