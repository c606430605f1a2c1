"""qmail-smtpd's SMTP AUTH (RFC 4954, issue 14.1): real clients (swaks, smtplib) with our checkpassword and a
`qmail user add` virtual user, $SMTPAUTH's grammar, $FORCETLS, and the refusals."""

from __future__ import annotations

import base64
import hmac
import re
import shutil
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CI, QHome, run
from smtpdkit import Conversation, ForkServer, queued
from test_qmail_user import ident
from test_smtpd_tls import GREETING, TCP, client_ctx, handshake, pki, read_all, say, tls_home  # noqa: F401
from tlskit import Cert

from pyqmail.auth import TEMPORARY
from pyqmail.smtpd import replies
from pyqmail.smtpd.auth import Policy

USER = "sub@example.org"
PASSWORD = "s3cret pass"
REMOTE = "far@remote.example"
EHLO_AUTH = (b"250-test.example.com\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-AUTH LOGIN PLAIN\r\n"
             b"250 SIZE 0\r\n")
BODY = "Subject: auth\r\n\r\nsent after AUTH\r\n"


@pytest.fixture(autouse=True)
def _no_leftover_servers():
    yield
    Conversation.close_all()


@pytest.fixture
def ahome(tls_home: QHome) -> QHome:
    """tls_home with the virtual user USER made by `qmail user add`."""
    extra, _, _ = ident()
    res = run([tls_home.bin("qmail"), "user", "add", "--home", str(tls_home.path), *extra, USER],
              input=PASSWORD.encode() + b"\n", env={"PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    return tls_home


def wrapper(home: QHome, *checkprogram: str) -> Path:
    """A script running qmail-smtpd with checkprogram (default: our checkpassword /bin/true)."""
    args = checkprogram or (str(home.bin("checkpassword")), "/bin/true")
    p = home.path / ("smtpd-auth-%d" % len(list(home.path.glob("smtpd-auth-*"))))
    p.write_text("#!/bin/sh\nexec " + " ".join([str(home.bin("qmail-smtpd")), *args]) + "\n")
    p.chmod(0o755)
    return p


def script(home: QHome, name: str, body: str) -> str:
    p = home.path / name
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755)
    return str(p)


ENV = {"SMTPAUTH": "", "PYQMAIL_AUTH_DELAY": "0", "PYQMAIL_SMTPD_AUTH_DELAY": "0"}


def talk(home: QHome, prog: Path, **env: str) -> Conversation:
    c = Conversation(prog, dict(TCP, QMAILHOME=str(home.path), **dict(ENV, **env)))
    assert c.line() == GREETING
    return c


def plain(user: str = USER, password: str = PASSWORD) -> bytes:
    return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())


# ---------------------------------------------------------------- pure parts

def test_smtpauth_grammar() -> None:
    assert Policy.from_env(None) is None
    assert Policy.from_env(b"-") is None and Policy.from_env(b"-cram") is None
    for value, line, required in [(b"", b"LOGIN PLAIN", False), (b"+cram", b"LOGIN PLAIN CRAM-MD5", False),
                                  (b"cram", b"CRAM-MD5", False), (b"!", b"LOGIN PLAIN", True),
                                  (b"!cram", b"CRAM-MD5", True), (b"!+cram", b"LOGIN PLAIN CRAM-MD5", True),
                                  (b"'!'", b"LOGIN PLAIN", True)]:
        p = Policy.from_env(value)
        assert p is not None and (p.line(), p.required) == (line, required), value


# ---------------------------------------------------------------- dialogues

def test_plain_behaviour_without_checkprogram_or_smtpauth(ahome: QHome) -> None:
    for prog, env in [(ahome.bin("qmail-smtpd"), {}), (wrapper(ahome), {"SMTPAUTH": "-"})]:
        c = Conversation(prog, dict(TCP, QMAILHOME=str(ahome.path), **env))
        assert c.line() == GREETING
        c.send(b"EHLO x\r\n")
        assert c.reply() == b"250-test.example.com\r\n250-STARTTLS\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
        c.send(b"AUTH PLAIN " + plain() + b"\r\n")
        assert c.reply() == replies.UNIMPLEMENTED


def test_auth_plain_login_and_refusals_in_one_session(ahome: QHome) -> None:
    c = talk(ahome, wrapper(ahome), DISABLETLS="1")
    c.send(b"EHLO x\r\n")
    assert c.reply() == EHLO_AUTH
    c.send(b"AUTH DIGEST-MD5\r\n")
    assert c.reply() == replies.AUTH_TYPE
    c.send(b"AUTH PLAIN !!!notbase64\r\n")
    assert c.reply() == replies.AUTH_INPUT
    c.send(b"AUTH LOGIN\r\n")
    assert c.reply() == replies.AUTH_USERNAME
    c.send(b"*\r\n")
    assert c.reply() == replies.AUTH_CANCELLED
    c.send(b"AUTH PLAIN\r\n")
    assert c.reply() == replies.AUTH_EMPTY
    c.send(b"A" * 100_000 + b"\r\n")  # a 100 KB response: bounded, malformed
    assert c.reply() == replies.AUTH_INPUT
    c.send(b"AUTH PLAIN " + plain(password="wrong") + b"\r\n")
    assert c.reply() == replies.AUTH_FAILED
    c.send(b"MAIL FROM:<a@b> AUTH=<>\r\nAUTH PLAIN " + plain() + b"\r\n")
    assert c.reply() == replies.OK
    assert c.reply() == replies.AUTH_IN_TRANSACTION
    c.send(b"RSET\r\nAUTH LOGIN " + base64.b64encode(USER.encode()) + b"\r\n")
    assert c.reply() == replies.FLUSHED
    assert c.reply() == replies.AUTH_PASSWORD
    c.send(base64.b64encode(PASSWORD.encode()) + b"\r\n")
    assert c.reply() == replies.AUTH_OK
    c.send(b"AUTH PLAIN " + plain() + b"\r\n")
    assert c.reply() == replies.AUTH_ALREADY
    c.send(b"MAIL FROM:<a@client.example> AUTH=a@client.example\r\nRCPT TO:<" + REMOTE.encode() + b">\r\n"
           b"DATA\r\n")
    assert c.reply() + c.reply() + c.reply() == replies.OK + replies.OK + replies.GO_AHEAD
    c.send(b"Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    assert c.reply().startswith(b"250 ok ")
    assert c.reply() == b"221 test.example.com\r\n"
    code, err = c.finish()
    assert code == 0
    assert b"AUTH failed: ip 192.0.2.7 mechanism PLAIN user sub@example.org: refused" in err
    assert b"AUTH failed: ip 192.0.2.7 mechanism PLAIN user : 501 malformed" in err
    ((mess, sender, rcpts),) = queued(ahome.queue)
    assert (sender, rcpts) == (b"a@client.example", [REMOTE.encode()])  # relayed: RELAYCLIENT
    assert re.search(rb"\nReceived: from client\.example\.net \(HELO x\) \(sub@example\.org@192\.0\.2\.7\)\n"
                     rb"  by 192\.0\.2\.1 with ESMTPA; ", mess), mess


def test_required_auth_and_forcetls(ahome: QHome, pki: dict[str, Cert]) -> None:
    c = talk(ahome, wrapper(ahome), SMTPAUTH="!", FORCETLS="1")
    c.send(b"EHLO x\r\n")
    assert c.reply() == b"250-test.example.com\r\n250-STARTTLS\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 0\r\n"
    c.send(b"AUTH PLAIN " + plain() + b"\r\n")
    assert c.reply() == replies.AUTH_NEED_TLS
    c.send(b"MAIL FROM:<a@b>\r\n")
    assert c.reply() == replies.AUTH_REQUIRED
    c.send(b"STARTTLS\r\n")
    assert c.reply() == replies.READY_FOR_TLS
    t = handshake(c, client_ctx(pki))
    assert say(t, b"EHLO y\r\n").endswith(b"250-AUTH LOGIN PLAIN\r\n250 SIZE 0\r\n")
    assert say(t, b"MAIL FROM:<a@b>\r\n") == replies.AUTH_REQUIRED
    assert say(t, b"AUTH PLAIN " + plain() + b"\r\n") == replies.AUTH_OK
    assert say(t, b"MAIL FROM:<a@b>\r\n") == replies.OK
    t.sendall(b"QUIT\r\n")
    assert read_all(t) == b"221 test.example.com\r\n"
    t.close()
    assert c.finish()[0] == 0


def test_failed_logins_are_delayed_then_dropped(ahome: QHome) -> None:
    c = talk(ahome, wrapper(ahome), DISABLETLS="1", PYQMAIL_SMTPD_AUTH_DELAY="0.2")
    c.send(b"EHLO x\r\n")
    c.reply()
    took = []
    got = []
    for _ in range(10):
        t0 = time.monotonic()
        try:
            c.send(b"AUTH PLAIN " + plain(password="guess") + b"\r\n")
            got.append(c.reply())
        except (EOFError, OSError):
            break
        took.append(time.monotonic() - t0)
    assert got == [replies.AUTH_FAILED, replies.AUTH_FAILED, replies.AUTH_TOO_MANY]
    assert 0.2 <= took[0] < took[1] and took[1] >= 0.4 and took[2] >= 0.8, took
    code, err = c.finish()
    assert code == 1 and err.count(b"AUTH failed: ip 192.0.2.7") == 3, err
    # $AUTHFAILURES and control/authfailures set the limit.
    (ahome.path / "control" / "authfailures").write_text("1\n")
    for env in [{}, {"AUTHFAILURES": "2"}]:
        c = talk(ahome, wrapper(ahome), DISABLETLS="1", **env)
        c.send(b"AUTH PLAIN " + plain(password="guess") + b"\r\n")
        if env:
            assert c.reply() == replies.AUTH_FAILED
            c.send(b"AUTH PLAIN " + plain(password="guess") + b"\r\n")
        assert c.reply() == replies.AUTH_TOO_MANY
        assert c.finish()[0] == 1


def test_checkprogram_crash_hang_and_temporary(ahome: QHome) -> None:
    cases = [("kill -SEGV $$", replies.AUTH_CHILD), ("exec sleep 30", replies.AUTH_CHILD),
             (f"exit {TEMPORARY}", replies.AUTH_TEMPORARY)]
    for i, (body, want) in enumerate(cases):
        prog = wrapper(ahome, script(ahome, f"check{i}", body), "/bin/true")
        c = talk(ahome, prog, DISABLETLS="1", PYQMAIL_SMTPD_AUTH_TIMEOUT="1")
        t0 = time.monotonic()
        c.send(b"AUTH PLAIN " + plain() + b"\r\n")
        assert c.reply() == want, body
        assert time.monotonic() - t0 < 10
        c.send(b"NOOP\r\nQUIT\r\n")  # the connection survives
        assert c.reply() == replies.OK
        assert c.reply() == b"221 test.example.com\r\n"
        assert c.finish()[0] == 0


def test_cram_md5_dialogue_reaches_the_checkprogram(ahome: QHome) -> None:
    # A checkprogram that knows the clear password and checks the HMAC (ours stores hashes only).
    check = script(ahome, "cramcheck", "exec " + str(Path(__file__).parent / "crampw.py") + ' "$@"')
    c = talk(ahome, wrapper(ahome, check, "/bin/true"), DISABLETLS="1", SMTPAUTH="cram")
    c.send(b"EHLO x\r\n")
    assert b"250-AUTH CRAM-MD5\r\n" in c.reply()
    c.send(b"AUTH PLAIN " + plain() + b"\r\n")
    assert c.reply() == replies.AUTH_TYPE
    c.send(b"AUTH CRAM-MD5\r\n")
    line = c.line()
    assert line.startswith(b"334 ")
    challenge = base64.b64decode(line[4:].strip())
    assert re.fullmatch(rb"<\d+\.\d+@test\.example\.com>", challenge)
    digest = hmac.new(PASSWORD.encode(), challenge, "md5").hexdigest().encode()
    c.send(base64.b64encode(USER.encode() + b" " + digest) + b"\r\n")
    assert c.reply() == replies.AUTH_OK


# ---------------------------------------------------------------- real clients over TLS

def test_smtplib_login_over_starttls_relays_with_esmtpsa(ahome: QHome, pki: dict[str, Cert]) -> None:
    with ForkServer(wrapper(ahome), dict(ENV, QMAILHOME=str(ahome.path), SMTPAUTH="!", FORCETLS="1")) as srv:
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as s:
            s.ehlo("phone.example")
            assert not s.has_extn("auth")
            s.starttls(context=client_ctx(pki, by_ip=True))
            s.ehlo("phone.example")
            assert s.login(USER, PASSWORD)[0] == 235
            assert s.sendmail("sub@example.org", [REMOTE], BODY) == {}
            cipher = s.sock.cipher()[0]  # type: ignore[union-attr]
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as s:
            s.starttls(context=client_ctx(pki, by_ip=True))
            with pytest.raises(smtplib.SMTPAuthenticationError) as e:
                s.login(USER, "wrong")
            assert e.value.smtp_code == 535
    ((mess, sender, rcpts),) = queued(ahome.queue)
    assert (sender, rcpts) == (b"sub@example.org", [REMOTE.encode()])
    assert re.search(rb"\nReceived: from unknown \(HELO phone\.example\) \(sub@example\.org@127\.0\.0\.1\)\n"
                     rb"  by 127\.0\.0\.1 with ESMTPSA \(" + cipher.encode() + rb" encrypted\); ", mess), mess


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_swaks_auth_over_tls(ahome: QHome, mech: str) -> None:
    if shutil.which("swaks") is None:
        if CI:
            pytest.fail("swaks missing")
        pytest.skip("swaks missing")
    env = dict(ENV, QMAILHOME=str(ahome.path), SMTPAUTH="!+cram", FORCETLS="1")
    prog = wrapper(ahome)
    if mech == "CRAM-MD5":
        prog = wrapper(ahome, str(Path(__file__).parent / "crampw.py"), "/bin/true")
    with ForkServer(prog, env) as srv:
        p = subprocess.run(["swaks", "--tls", "--server", f"127.0.0.1:{srv.port}", "--helo", "swaks.example",
                            "--auth", mech, "--auth-user", USER, "--auth-password", PASSWORD,
                            "--from", USER, "--to", REMOTE, "--data", "Subject: swaks\n\nauth " + mech + "\n"],
                           capture_output=True, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr
        assert b"235 ok, go ahead (#2.0.0)" in p.stdout
    ((mess, sender, rcpts),) = queued(ahome.queue)
    assert (sender, rcpts) == (USER.encode(), [REMOTE.encode()])
    assert re.search(rb"\nReceived: from unknown \(HELO swaks\.example\) \(sub@example\.org@127\.0\.0\.1\)\n"
                     rb"  by 127\.0\.0\.1 with ESMTPSA \(", mess), mess
