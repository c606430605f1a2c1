"""Receiving over the network end to end: tcpserver -> qmail-smtpd -> qmail-queue.

Postfix's smtp-source (a C load generator, Debian package postfix) pushes
2000 messages over 20 parallel sessions; relaying is decided by a tcprules
file, as in the book's tcp.smtp examples.
"""

from __future__ import annotations

import collections
import shutil
import smtplib
import subprocess
from pathlib import Path

import pytest

from conftest import CI, QHome, expect, run
from queuefmt import files, parse_todo


def _smtp_source() -> str:
    for path in (shutil.which("smtp-source"), "/usr/sbin/smtp-source"):
        if path and Path(path).exists():
            return path
    if CI:
        pytest.fail("smtp-source missing: .ci/run installs Debian's postfix (unconfigured)")
    pytest.skip("smtp-source (Debian postfix) not installed")


class TcpServer:
    """QMAILHOME/bin/tcpserver running qmail-smtpd on 127.0.0.1, a port of its choice."""

    def __init__(self, home: QHome, *opts: str, env: dict[str, str] | None = None,
                 binary: str | None = None) -> None:
        self.proc = subprocess.Popen(
            [binary or home.bin("tcpserver"), "-1", "-HR", "-c", "40", *opts, "-l", "mx.test.example.com",
             "127.0.0.1", "0", home.bin("qmail-smtpd")],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin", **(env or {})})
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def __enter__(self) -> TcpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def test_smtp_source_2000_messages_20_sessions(qhome: QHome) -> None:
    tool = _smtp_source()
    with TcpServer(qhome) as srv:
        r = subprocess.run([tool, "-s", "20", "-m", "2000", "-l", "4096", "-N", "-M", "client.example",
                            "-f", "sender@client.example", "-t", "rcpt@test.example.com",
                            f"127.0.0.1:{srv.port}"], capture_output=True, timeout=600)
    assert r.returncode == 0, r
    assert r.stderr == b"", r.stderr[:2000]
    todo = files(qhome.queue)["todo"]
    assert len(todo) == 2000
    rcpts: collections.Counter[bytes] = collections.Counter()
    for name in todo:
        env = parse_todo((qhome.queue / "todo" / name).read_bytes())
        assert env.sender == b"sender@client.example"
        rcpts.update(env.recipients)
    # -N makes every recipient distinct: each message queued exactly once.
    assert len(rcpts) == 2000 and set(rcpts.values()) == {1}
    assert all(r.endswith(b"rcpt@test.example.com") for r in rcpts)


def _rules(home: QHome, text: str) -> Path:
    cdb = home.path / "control" / "tcp.smtp.cdb"
    expect(run([home.bin("tcprules"), cdb, f"{cdb}.tmp"], input=text.encode()))
    return cdb


@pytest.mark.parametrize("rules,relays", [
    ('127.0.0.1:allow,RELAYCLIENT=""\n:allow\n', True),   # the book's trusted client
    ("127.0.0.:allow\n:deny\n", False),                  # allowed in, but no relaying
])
def test_relay_decided_by_tcprules(qhome: QHome, rules: str, relays: bool) -> None:
    cdb = _rules(qhome, rules)
    with TcpServer(qhome, "-x", str(cdb)) as srv:
        with smtplib.SMTP("127.0.0.1", srv.port, local_hostname="c.example", timeout=30) as s:
            s.helo()
            s.mail("a@c.example")
            code, text = s.rcpt("friend@elsewhere.example")
            if relays:
                assert code == 250
            else:
                assert (code, text) == (553, b"sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)")
            code, _ = s.rcpt("local@test.example.com")
            assert code == 250
            if relays:
                code, _ = s.data(b"Subject: relay\r\n\r\nhi\r\n")
                assert code == 250
    todo = files(qhome.queue)["todo"]
    if relays:
        (name,) = todo
        assert parse_todo((qhome.queue / "todo" / name).read_bytes()).recipients == [
            b"friend@elsewhere.example", b"local@test.example.com"]
    else:
        assert todo == []


def test_denied_client_gets_nothing(qhome: QHome) -> None:
    cdb = _rules(qhome, "127.0.0.1:deny\n")
    with TcpServer(qhome, "-x", str(cdb)) as srv:
        with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError)):
            smtplib.SMTP("127.0.0.1", srv.port, timeout=30)


def test_qmail_smtpd_under_the_real_tcpserver(qhome: QHome) -> None:
    """ucspi-tcp's own tcpserver (Debian) runs our qmail-smtpd, rules from our tcprules."""
    real = shutil.which("tcpserver", path="/usr/bin:/usr/local/bin:/bin")
    if real is None:
        if CI:
            pytest.fail("ucspi-tcp missing: .ci/run installs it")
        pytest.skip("ucspi-tcp not installed")
    cdb = _rules(qhome, '127.0.0.1:allow,RELAYCLIENT=""\n')
    with TcpServer(qhome, "-x", str(cdb), binary=real) as srv:
        with smtplib.SMTP("127.0.0.1", srv.port, local_hostname="c.example", timeout=30) as s:
            assert s.sendmail("a@c.example", ["x@far.example", "y@test.example.com"],
                              "Subject: real\r\n\r\nhi\r\n") == {}
    (name,) = files(qhome.queue)["todo"]
    env = parse_todo((qhome.queue / "todo" / name).read_bytes())
    assert (env.sender, env.recipients) == (b"a@c.example", [b"x@far.example", b"y@test.example.com"])
    num = int(name)
    mess = (qhome.queue / "mess" / str(num % 23) / name).read_bytes()
    assert b"Received: from unknown (HELO c.example) (127.0.0.1)\n  by mx.test.example.com with SMTP; " in mess
