"""The submission service `qmail up` runs (issue 14.3): port 587/2587 with STARTTLS and AUTH required,
AUTH on SMTPS, the same users as POP3; real clients (swaks, smtplib) relay through it to a remote sink."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import threading
import uuid
from pathlib import Path

import pytest

from conftest import CI, IS_ROOT, TEST_USER, VENV_BIN, QHome, world_dir
from test_smtpd_auth import _no_leftover_servers, ahome  # noqa: F401 (fixtures)
from test_smtpd_tls import pki, tls_home  # noqa: F401 (fixtures ahome needs)
from test_up import _as_user, _free_port, _kill_group, _port_open, _read_until_ready, _wait_for

FQDN = "test.example.com"
REMOTE = "far@remote.example"


def _services(home: QHome, **ports: int) -> dict[str, list[str]]:
    from pyqmail import home as _home
    from pyqmail.admin import up

    inst = _home.parse_install((home.path / "conf" / "install").read_text())
    p = up.Ports("127.0.0.1", ports.get("smtp", 0), 0, ports.get("pop3", 0), ports.get("smtps", 0), 0,
                 ports.get("submission", 0))
    return up.services(str(home.path), inst, p, FQDN)


def test_submission_service_argv_and_environment(qhome: QHome) -> None:
    """587's run script: SMTPAUTH='!' and FORCETLS=1, qmail-smtpd with checkpassword; SMTPS offers AUTH."""
    b = qhome.path / "bin"
    tcp = [str(b / "tcpserver"), "-v", "-R", "-l", FQDN, "-c", "40", "127.0.0.1"]
    auth = [str(b / "qmail-smtpd"), str(b / "checkpassword"), "/bin/true"]
    got = _services(qhome, smtp=2525, smtps=2465, submission=2587)
    assert got["submission"] == ["SMTPAUTH=!", "FORCETLS=1", "RCPTCHECK_LOCAL=1", "SMTPUTF8=1", "SMTPSIZE=1", "CHUNKING=1", *tcp, "2587", *auth]
    assert got["smtps"] == ["SMTPS=1", "SMTPAUTH=", "RCPTCHECK_LOCAL=1", "SMTPUTF8=1", "SMTPSIZE=1", "CHUNKING=1", *tcp, "2465", *auth]
    assert got["smtpd"] == ["RCPTCHECK_LOCAL=1", "SMTPUTF8=1", "SMTPSIZE=1", "CHUNKING=1", *tcp, "2525", str(b / "qmail-smtpd")]  # port 25: no AUTH
    assert "submission" not in _services(qhome, submission=0)
    (qhome.path / "control" / "servercert.pem").unlink()
    assert "submission" not in _services(qhome, submission=2587)  # no TLS: no password may be taken


def test_submission_default_ports() -> None:
    from pyqmail.admin import up

    assert up.default_ports().submission == (587 if os.geteuid() == 0 else 2587)


class Sink:
    """A remote SMTP server on a loopback port: takes every message, keeps the last one's data."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = int(self.sock.getsockname()[1])
        self.messages: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as r:
                conn.sendall(b"220 sink\r\n")
                data: list[bytes] = []
                in_data = False
                for line in r:
                    if in_data:
                        if line == b".\r\n":
                            in_data = False
                            self.messages.append(b"".join(data))
                            conn.sendall(b"250 ok\r\n")
                        else:
                            data.append(line)
                        continue
                    verb = line[:4].upper()
                    if verb == b"DATA":
                        in_data, data = True, []
                        conn.sendall(b"354 go\r\n")
                    elif verb == b"QUIT":
                        conn.sendall(b"221 bye\r\n")
                        break
                    else:
                        conn.sendall(b"250 ok\r\n")

    def has(self, subject: str) -> bytes | None:
        return next((m for m in self.messages if subject.encode() in m), None)

    def close(self) -> None:
        self.sock.close()


def _ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # qmail init's self-signed certificate (tests/test_certs.py verifies it)
    return ctx


@pytest.mark.skipif(not IS_ROOT, reason="runs `qmail up` as the ordinary user pqtest, as tests/test_up.py")
def test_submission_through_qmail_up_relays_with_esmtpsa() -> None:
    """swaks --auth PLAIN --tls and smtplib.login() on the 587 service `qmail up` runs, with the user and
    password file it prints: the remote message reaches the sink (RELAYCLIENT) and Received says ESMTPSA;
    before TLS there is no AUTH (538), after TLS MAIL without AUTH is 530, a wrong password 535."""
    base = world_dir()
    os.chown(base, pwd.getpwnam(TEST_USER).pw_uid, -1)
    home = base / "q"
    env = {"PATH": "/usr/bin:/bin", "HOME": pwd.getpwnam(TEST_USER).pw_dir}
    sub_port, pop3_port, smtps_port = _free_port(), _free_port(), _free_port()
    sink = Sink()
    up = subprocess.Popen([VENV_BIN / "qmail", "up", "--home", home, "--smtp-port", "0", "--pop3-port", str(pop3_port),
                           "--qmtp-port", "0", "--smtps-port", str(smtps_port), "--pop3s-port", "0",
                           "--submission-port", str(sub_port)], **_as_user(),  # type: ignore[call-overload]
                          env=env, cwd=base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True)
    try:
        text = _read_until_ready(up)
        m = re.search(r"outgoing server 127\.0\.0\.1 port (\d+), STARTTLS, password authentication "
                      r"\(PLAIN or LOGIN\) as user (\S+), password in (\S+)", text)
        assert m is not None, text
        assert int(m.group(1)) == sub_port and "swaks --server 127.0.0.1 --port %d --tls --auth PLAIN" % sub_port in text
        assert f"submission on port {sub_port} (STARTTLS and AUTH required)" in text, text
        user, password = m.group(2), Path(m.group(3)).read_text().strip()
        (home / "control" / "smtproutes").write_text(f"remote.example:127.0.0.1:{sink.port}\n")
        assert _wait_for(lambda: _port_open(sub_port), 120), (home / "log" / "submission" / "current").read_text()
        assert _wait_for(lambda: _port_open(smtps_port), 120), (home / "log" / "smtps" / "current").read_text()

        with smtplib.SMTP("127.0.0.1", sub_port, timeout=30) as s:
            s.ehlo()
            assert not s.has_extn("auth") and s.has_extn("starttls")
            code, _ = s.docmd("AUTH", "PLAIN")
            assert code == 538
            s.starttls(context=_ctx())
            s.ehlo()
            assert s.has_extn("auth")
            code, _ = s.docmd("MAIL", "FROM:<x@example.org>")
            assert code == 530
            with pytest.raises(smtplib.SMTPAuthenticationError) as e:
                s.login(user, password + "x")
            assert e.value.smtp_code == 535
        subject = f"submission smtplib {uuid.uuid4()}"
        with smtplib.SMTP("127.0.0.1", sub_port, timeout=30) as s:
            s.starttls(context=_ctx())
            s.login(user, password)
            s.sendmail(f"{user}@example.org", [REMOTE], f"Subject: {subject}\r\n\r\nvia 587\r\n")
        assert _wait_for(lambda: sink.has(subject) is not None), (home / "log" / "send" / "current").read_text()
        got = sink.has(subject) or b""
        assert re.search(rb"Received: from .*\(" + user.encode() + rb"@127\.0\.0\.1\)\s+by \S+ with ESMTPSA", got), got

        swaks = shutil.which("swaks")
        if swaks is None and CI:
            pytest.fail("swaks missing: .ci/run installs it")
        if swaks is not None:
            subject = f"submission swaks {uuid.uuid4()}"
            r = subprocess.run([swaks, "--server", "127.0.0.1", "--port", str(sub_port), "--tls", "--auth", "PLAIN",
                                "--auth-user", user, "--auth-password", password, "--to", REMOTE,
                                "--from", f"{user}@example.org", "--header", f"Subject: {subject}"],
                               capture_output=True, timeout=60)
            assert r.returncode == 0, r
            assert _wait_for(lambda: sink.has(subject) is not None), (home / "log" / "send" / "current").read_text()
            assert b"with ESMTPSA" in (sink.has(subject) or b"")
        # SMTPS: AUTH offered (not required) on TLS from the first byte.
        subject = f"submission smtps {uuid.uuid4()}"
        with smtplib.SMTP_SSL("127.0.0.1", smtps_port, timeout=30, context=_ctx()) as s:
            s.login(user, password)
            s.sendmail(f"{user}@example.org", [REMOTE], f"Subject: {subject}\r\n\r\nvia 465\r\n")
        assert _wait_for(lambda: sink.has(subject) is not None), (home / "log" / "send" / "current").read_text()
        d = subprocess.run([VENV_BIN / "qmail", "down", "--home", home], **_as_user(),  # type: ignore[call-overload]
                           env=env, capture_output=True, timeout=300)
        assert d.returncode == 0, d
        assert up.wait(timeout=30) == 0
    finally:
        _kill_group(up, home)
        sink.close()


# ------------------------------------------------------------ $SENDERCHECK (issue 14.2)


def test_sendercheck_rules() -> None:
    from pyqmail.smtpd.auth import SenderCheck

    assert SenderCheck.from_env(None, []) is None and SenderCheck.from_env(b"0", []) is None
    own = SenderCheck.from_env(b"1", [b"Local.Example"])
    assert own is not None and not own.domain_only
    assert own.allowed(b"sub@example.org", b"sub@EXAMPLE.org")
    assert own.allowed(b"sub@example.org", b"sub-list@example.org")  # qmail's extension addresses
    assert not own.allowed(b"sub@example.org", b"Sub@example.org")  # local parts compare exactly
    assert not own.allowed(b"sub@example.org", b"subx@example.org")
    assert not own.allowed(b"sub@example.org", b"sub@other.example")
    assert own.allowed(b"pqtest", b"pqtest@local.example")  # no '@': control/locals
    assert not own.allowed(b"pqtest", b"pqtest@example.org") and not own.allowed(b"pqtest", b"pqtest")
    assert own.allowed(b"sub@example.org", b"")  # <>: names nobody
    dom = SenderCheck.from_env(b"domain", [b"local.example"])
    assert dom is not None and dom.domain_only
    assert dom.allowed(b"sub@example.org", b"boss@Example.Org")
    assert not dom.allowed(b"sub@example.org", b"boss@evil.example")
    assert dom.allowed(b"pqtest", b"anyone@local.example")


def test_sendercheck_in_qmail_smtpd(ahome: QHome) -> None:
    """With $SENDERCHECK an authenticated MAIL FROM not the user's is 553; without AUTH nothing changes."""
    from test_smtpd_auth import USER, plain, talk, wrapper

    from pyqmail.smtpd import replies
    from pyqmail.smtpd.auth import SENDER_NOT_YOURS

    prog = wrapper(ahome)
    c = talk(ahome, prog, DISABLETLS="1", SENDERCHECK="1")
    c.send(b"EHLO x\r\nMAIL FROM:<boss@example.org>\r\nRSET\r\n")  # not authenticated: not checked
    c.reply()
    assert c.reply() == replies.OK and c.reply() == replies.FLUSHED
    c.send(b"AUTH PLAIN " + plain() + b"\r\n")
    assert c.reply() == replies.AUTH_OK
    c.send(b"MAIL FROM:<boss@example.org>\r\n")
    assert c.reply() == SENDER_NOT_YOURS
    c.send(b"MAIL FROM:<" + USER.encode() + b"> AUTH=<>\r\nRCPT TO:<" + REMOTE.encode() + b">\r\n")
    assert c.reply() == replies.OK and c.reply() == replies.OK
    c.send(b"QUIT\r\n")
    c = talk(ahome, prog, DISABLETLS="1", SENDERCHECK="domain")
    c.send(b"EHLO x\r\nAUTH PLAIN " + plain() + b"\r\n")
    c.reply()
    assert c.reply() == replies.AUTH_OK
    c.send(b"MAIL FROM:<boss@evil.example>\r\nMAIL FROM:<boss@example.org>\r\n")
    assert c.reply() == SENDER_NOT_YOURS and c.reply() == replies.OK
    c.send(b"QUIT\r\n")
