"""qmail-remote and SIZE (RFC 1870, issue 18.3): SIZE= sent only to a server that offers SIZE, with the
message's size on the wire; a 552 at MAIL is a permanent failure (D), the message never sent."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import QHome
from remotekit import DnsServer, SmtpServer
from smtpdkit import ForkServer
from test_smtpd import assert_empty_queue, no_certificate

from pyqmail.remote.qmail_rspawn import report as rspawn_report
from pyqmail.smtpd import replies

EHLO_SIZE = b"250-peer\r\n250-PIPELINING\r\n250 SIZE 1000000\r\n"


@pytest.fixture
def dnsd() -> DnsServer:
    d = DnsServer({})
    yield d
    d.close()


def remote_from_file(h: QHome, dnsd: DnsServer, message: bytes, port: int, tmp: Path) -> bytes:
    """Run qmail-remote with the message in a file on descriptor 0, as qmail-rspawn gives it."""
    h.control("smtproutes", f"example.com:[127.0.0.1]:{port}\n")
    path = tmp / "mess"
    path.write_bytes(message)
    with open(path, "rb") as f:
        p = subprocess.run([h.bin("qmail-remote"), "example.com", "s@x.org", "a@example.com"], stdin=f,
                           capture_output=True, env={"PATH": os.environ["PATH"], **dnsd.env}, timeout=60)
    assert p.returncode == 0, p
    return p.stdout


@pytest.mark.parametrize("message", [
    b"Subject: s\n\nline one\n.dot\nbare\rcr\n",
    b"Subject: crlf\r\n\r\nmixed\r\nends\n\r\r\nlast\r",
    b"Subject: long\n\n" + b"x" * 65520 + b"\r\nsplit CR LF at the read size\n",  # the CR is byte 65535
])
def test_size_sent_when_offered_with_the_wire_size(qhome: QHome, dnsd: DnsServer, tmp_path: Path,
                                                   message: bytes) -> None:
    """SIZE= is exactly the bytes of DATA's payload (the dots added for stuffing and the final dot left out)."""
    with SmtpServer(replies={"EHLO": EHLO_SIZE}) as srv:
        out = remote_from_file(qhome, dnsd, message, srv.port, tmp_path)
    assert out.startswith(b"r\0K127.0.0.1 accepted message.")
    s = srv.sessions[0]
    mail = [c for c in s.commands if c.startswith(b"MAIL")]
    wire = s.data.replace(b"\r\n..", b"\r\n.")
    wire = wire[1:] if s.data.startswith(b"..") else wire
    assert mail == [b"MAIL FROM:<s@x.org> SIZE=%d" % len(wire)]


def test_no_size_without_the_keyword_or_from_a_pipe(qhome: QHome, dnsd: DnsServer, tmp_path: Path) -> None:
    with SmtpServer(replies={"EHLO": b"250-peer\r\n250 PIPELINING\r\n"}) as srv:
        remote_from_file(qhome, dnsd, b"Subject: s\n\nx\n", srv.port, tmp_path)
    assert b"MAIL FROM:<s@x.org>" in srv.sessions[0].commands
    with SmtpServer(replies={"EHLO": EHLO_SIZE}) as srv:  # a pipe: the size is not known before reading
        qhome.control("smtproutes", f"example.com:[127.0.0.1]:{srv.port}\n")
        p = subprocess.run([qhome.bin("qmail-remote"), "example.com", "s@x.org", "a@example.com"],
                           input=b"Subject: s\n\nx\n", capture_output=True,
                           env={"PATH": os.environ["PATH"], **dnsd.env}, timeout=60)
    assert p.stdout.startswith(b"r\0K")
    assert b"MAIL FROM:<s@x.org>" in srv.sessions[0].commands


def test_552_at_mail_from_qmail_smtpd_is_permanent(qhome: QHome, dnsd: DnsServer, tmp_path: Path) -> None:
    """pyqmail's qmail-smtpd with 1 MB databytes refuses a 2 MB message at MAIL: D, nothing sent, nothing queued."""
    no_certificate(qhome)
    qhome.control("databytes", "1048576\n")
    qhome.control("smtpsize", "1\n")  # SIZE offered, as in `qmail up`'s services
    message = b"Subject: big\n\n" + (b"z" * 99 + b"\n") * 20000
    with ForkServer(qhome.bin("qmail-smtpd")) as srv:
        out = remote_from_file(qhome, dnsd, message, srv.port, tmp_path)
    want = b"DConnected to 127.0.0.1 but sender was rejected.\nRemote host said: " + replies.DATABYTES[:-2] + b"\n"
    assert out == want + b"\0"
    assert rspawn_report(0, out) == want
    assert_empty_queue(qhome)
