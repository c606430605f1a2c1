"""qmail-popup's CAPA (RFC 2449), STLS (RFC 2595), POP3S and $FORCETLS, with the session relayed into
qmail-pop3d: real clients (poplib, openssl s_client, fetchmail) through tcpserver -> qmail-popup ->
checkpassword -> qmail-pop3d on 127.0.0.1, and hostile clients."""

from __future__ import annotations

import os
import poplib
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import CI, IS_ROOT, TEST_USER, QHome, expect, run
from tlskit import Cert, make_ca, make_leaf

from pyqmail.pop3.qmail_popup import ERR_AUTHORIZ, ERR_BADAUTH, ERR_NEED_TLS, ERR_TLS_ACTIVE, ERR_WANTUSER, STLS_OK

NAME = "pop.example.org"
USER = "tls@example.org"
PASSWORD = "tls-pass"
OK = b"+OK \r\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Cert]:
    d = tmp_path_factory.mktemp("pop3pki")
    ca = make_ca(d, "popca")
    return {"ca": ca, "leaf": make_leaf(d, "pop", ca, [NAME])}


@pytest.fixture
def home(qhome: QHome, pki: dict[str, Cert]) -> QHome:
    """An installation with the test CA's certificate for NAME and the virtual user USER."""
    cert = qhome.path / "control" / "servercert.pem"
    cert.write_bytes(pki["leaf"].both.read_bytes())
    cert.chmod(0o600)
    extra = ["--uid", TEST_USER] if IS_ROOT else []
    expect(run([qhome.bin("qmail"), "user", "add", "--home", str(qhome.path), *extra, USER],
               input=PASSWORD.encode() + b"\n"))
    return qhome


def maildir(h: QHome) -> Path:
    return h.path / "pop" / USER / "Maildir"


def put_message(h: QHome, name: str, text: bytes) -> None:
    md = maildir(h)
    st = md.stat()
    p = md / "new" / name
    p.write_bytes(text)
    os.chown(p, st.st_uid, st.st_gid)
    t = time.time() - 100
    os.utime(p, (t, t))


def client_ctx(pki: dict[str, Cert]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca"].cert))
    ctx.check_hostname = False  # 127.0.0.1: tests compare the certificate's name themselves
    return ctx


def env_for(h: QHome, **extra: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "QMAILHOME": str(h.path), "PYQMAIL_AUTH_DELAY": "0", **extra}


@contextmanager
def server(h: QHome, **extra: str) -> Iterator[int]:
    """tcpserver -> qmail-popup -> checkpassword -> qmail-pop3d on 127.0.0.1; yield its port."""
    log = h.path / "popup.log"
    with open(log, "ab") as err:
        srv = subprocess.Popen([h.bin("tcpserver"), "-1", "-HR", "-l", NAME, "127.0.0.1", "0",
                                h.bin("qmail-popup"), NAME, h.bin("checkpassword"), h.bin("qmail-pop3d"), "Maildir"],
                               stdout=subprocess.PIPE, stderr=err, env=env_for(h, **extra))
    try:
        assert srv.stdout is not None
        yield int(srv.stdout.readline())
    finally:
        srv.terminate()
        srv.wait(30)
        if srv.stdout is not None:
            srv.stdout.close()


def log_text(h: QHome) -> str:
    return (h.path / "popup.log").read_text(errors="replace")


def capa(p: poplib.POP3) -> list[str]:
    return sorted(p.capa())


# ---------------------------------------------------------------- CAPA

def test_capa_lists_stls_only_before_tls_and_with_a_certificate(home: QHome, pki: dict[str, Cert]) -> None:
    with server(home) as port:
        p = poplib.POP3("127.0.0.1", port, timeout=30)
        assert capa(p) == ["STLS", "TOP", "UIDL", "USER"]
        p.stls(context=client_ctx(pki))
        assert capa(p) == ["TOP", "UIDL", "USER"]
        p.quit()
    with server(home, FORCETLS="1") as port:
        p = poplib.POP3("127.0.0.1", port, timeout=30)
        assert capa(p) == ["STLS", "TOP", "UIDL"]  # no USER before TLS
        p.stls(context=client_ctx(pki))
        assert capa(p) == ["TOP", "UIDL", "USER"]
        p.quit()
    (home.path / "control" / "servercert.pem").chmod(0)
    if IS_ROOT:
        (home.path / "control" / "servercert.pem").unlink()
    with server(home) as port:
        p = poplib.POP3("127.0.0.1", port, timeout=30)
        assert capa(p) == ["TOP", "UIDL", "USER"]
        p.quit()


def test_capa_reply_is_rfc_2449s(home: QHome) -> None:
    res = expect(run([home.bin("qmail-popup"), NAME, "/bin/false"], input=b"CAPA\r\nQUIT\r\n",
                     env=env_for(home)), 1)
    assert res.stdout.split(b"\r\n", 1)[1] == (b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nUSER\r\nSTLS\r\n"
                                              b".\r\n" + OK)


# ---------------------------------------------------------------- real clients

MESSAGE = (b"From: a@b.example\nSubject: over TLS\n\nline 1\n.leading dot\n\n"
           + b"".join(b"%06d %s\n" % (i, b"x" * 90) for i in range(3000)) + b"end\n")


def _retrieved(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def test_poplib_stls_retrieves_intact(home: QHome, pki: dict[str, Cert]) -> None:
    put_message(home, "1000.1.host", MESSAGE)
    with server(home, FORCETLS="1") as port:
        p = poplib.POP3("127.0.0.1", port, timeout=30)
        with pytest.raises(poplib.error_proto):
            p.user(USER)  # $FORCETLS: no name before STLS
        assert p.stls(context=client_ctx(pki)).startswith(b"+OK Begin TLS negotiation")
        assert p.sock.getpeercert()["subjectAltName"] == (("DNS", NAME),)  # type: ignore[union-attr]
        assert p.user(USER).startswith(b"+OK")
        assert p.pass_(PASSWORD).startswith(b"+OK")
        count, size = p.stat()
        assert count == 1
        _resp, lines, _octets = p.retr(1)
        # qmail-pop3d's blank line before the final dot, as C qmail's.
        assert _retrieved(lines) == MESSAGE + b"\n"
        p.dele(1)
        assert p.quit().startswith(b"+OK")
    assert os.listdir(maildir(home) / "new") == [] and os.listdir(maildir(home) / "cur") == []


def test_pop3s_is_tls_from_the_first_byte(home: QHome, pki: dict[str, Cert]) -> None:
    put_message(home, "1000.1.host", MESSAGE)
    with server(home, POP3S="1", FORCETLS="1") as port:
        p = poplib.POP3_SSL("127.0.0.1", port, timeout=30, context=client_ctx(pki))
        assert p.getwelcome().startswith(b"+OK <")
        assert capa(p) == ["TOP", "UIDL", "USER"]
        p.user(USER)
        p.pass_(PASSWORD)
        _resp, lines, _octets = p.retr(1)
        assert _retrieved(lines) == MESSAGE + b"\n"
        assert p.quit().startswith(b"+OK")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"CAPA\r\n")  # plain text to a POP3S port: no POP3 answer, the connection ends
            s.settimeout(30)
            assert b"+OK" not in s.recv(1000)
    assert "TLS handshake failed" in log_text(home)


def test_wrong_password_over_tls(home: QHome, pki: dict[str, Cert]) -> None:
    with server(home) as port:
        p = poplib.POP3("127.0.0.1", port, timeout=30)
        p.stls(context=client_ctx(pki))
        p.user(USER)
        with pytest.raises(poplib.error_proto, match="authorization failed"):
            p.pass_("wrong")
        p.close()


def test_openssl_s_client_starttls_pop3(home: QHome, pki: dict[str, Cert]) -> None:
    put_message(home, "1000.1.host", b"Subject: s_client\n\nhello over STLS\n")
    with server(home, FORCETLS="1") as port:
        script = f"USER {USER}\r\nPASS {PASSWORD}\r\nRETR 1\r\nQUIT\r\n".encode()
        res = run(["openssl", "s_client", "-starttls", "pop3", "-connect", f"127.0.0.1:{port}", "-quiet",
                   "-CAfile", str(pki["ca"].cert), "-verify_return_error", "-verify_hostname", NAME],
                  input=script, timeout=60)
    assert res.returncode == 0, res.explain()
    assert b"+OK \r\nSubject: s_client\r\n\r\nhello over STLS\r\n\r\n.\r\n+OK \r\n" in res.stdout, res.explain()


def fetchmail_or_skip() -> str:
    path = shutil.which("fetchmail")
    if path is None:
        if CI:
            pytest.fail("fetchmail missing: .ci/run should have installed the fetchmail package")
        pytest.skip("fetchmail not installed (Debian package fetchmail)")
    return path


@pytest.mark.parametrize("mode", ["stls", "pop3s"])
def test_fetchmail_with_sslproto(home: QHome, pki: dict[str, Cert], tmp_path: Path, mode: str) -> None:
    tool = fetchmail_or_skip()
    texts = [b"From: a@b.example\nSubject: fetch %d\n\nbody %d\n.\n..two dots\n" % (i, i) for i in range(2)]
    for i, text in enumerate(texts):
        put_message(home, f"{1000 + i}.{i}.host", text)
    out = tmp_path / "out"
    out.mkdir()
    extra = {"POP3S": "1"} if mode == "pop3s" else {}
    ssl_opts = "ssl " if mode == "pop3s" else ""
    with server(home, FORCETLS="1", **extra) as port:
        rc = tmp_path / "fetchmailrc"
        rc.write_text(
            "set no syslog\n"
            f"poll 127.0.0.1 service {port} protocol POP3 auth password timeout 30\n"
            f'  user "{USER}" there with password "{PASSWORD}" is "x" here\n'
            f"  mda \"/bin/sh -c 'cat > {out}/m.$$'\"\n"
            f"  fetchall nokeep {ssl_opts}sslproto tls1.2+ sslcertck sslcertfile {pki['ca'].cert} "
            f"sslcommonname {NAME}\n")
        rc.chmod(0o600)
        fm_home = tmp_path / "fmhome"
        fm_home.mkdir()
        res = run([tool, "-f", str(rc), "--nodetach", "-v"],
                  env={"PATH": "/usr/bin:/bin", "FETCHMAILHOME": str(fm_home), "HOME": str(fm_home)})
    assert res.returncode == 0, res.explain()
    text = res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")
    if mode == "stls":
        assert "STLS" in text, text
    got = sorted((p.read_bytes() for p in out.iterdir()), key=lambda b: b[b.index(b"Subject"):])
    assert len(got) == 2
    for text_, mail in zip(texts, got):
        assert mail.endswith(b"\n" + text_ + b"\n"), mail
    assert os.listdir(maildir(home) / "new") == [] and os.listdir(maildir(home) / "cur") == []


# ---------------------------------------------------------------- hostile clients

class Raw:
    """A client speaking to one qmail-popup process over a socket pair (its pid known)."""

    def __init__(self, h: QHome, pki: dict[str, Cert], **extra: str) -> None:
        mine, theirs = socket.socketpair()
        self.proc = subprocess.Popen([h.bin("qmail-popup"), NAME, h.bin("checkpassword"), h.bin("qmail-pop3d"),
                                      "Maildir"], stdin=theirs, stdout=theirs, stderr=subprocess.PIPE,
                                     env=env_for(h, TCPREMOTEIP="127.0.0.1", **extra))
        theirs.close()
        mine.settimeout(60)
        self.sock: socket.socket | ssl.SSLSocket = mine
        self.ctx = client_ctx(pki)
        self.buf = b""

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(self.buf)
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def say(self, data: bytes) -> bytes:
        self.sock.sendall(data)
        return self.line()

    def starttls(self) -> None:
        assert self.buf == b""
        self.sock = self.ctx.wrap_socket(self.sock)

    def hwm_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        raise AssertionError("no VmHWM")

    def close(self) -> tuple[int, bytes]:
        self.sock.close()
        assert self.proc.stderr is not None
        err = self.proc.stderr.read()
        self.proc.stderr.close()
        return self.proc.wait(60), err


def test_stls_twice_and_after_user(home: QHome, pki: dict[str, Cert]) -> None:
    c = Raw(home, pki)
    c.line()
    assert c.say(b"USER " + USER.encode() + b"\r\n") == OK
    assert c.say(b"STLS\r\n") == STLS_OK
    c.starttls()
    assert c.say(b"PASS " + PASSWORD.encode() + b"\r\n") == ERR_WANTUSER  # the plain-text USER is forgotten
    assert c.say(b"STLS\r\n") == ERR_TLS_ACTIVE
    assert c.say(b"NOOP\r\n") == OK
    assert c.say(b"QUIT\r\n") == OK
    assert c.close()[0] == 1


def test_stls_injection_is_never_executed(home: QHome, pki: dict[str, Cert]) -> None:
    c = Raw(home, pki)
    c.line()
    # Plain text pipelined after STLS (CVE-2011-0411's pattern) must be dropped, not run inside TLS.
    c.sock.sendall(b"STLS\r\nUSER " + USER.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\n")
    assert c.line() == STLS_OK
    c.buf = b""
    c.starttls()
    assert c.say(b"PASS " + PASSWORD.encode() + b"\r\n") == ERR_WANTUSER
    assert c.say(b"QUIT\r\n") == OK
    c.close()


def test_forcetls_refuses_user_pass_apop(home: QHome) -> None:
    res = expect(run([home.bin("qmail-popup"), NAME, "/bin/true"],
                     input=b"USER joe\r\nPASS x\r\nAPOP joe 0123\r\nSTAT\r\nQUIT\r\n",
                     env=env_for(home, FORCETLS="1")), 1)
    assert res.stdout.split(b"\r\n", 1)[1] == ERR_NEED_TLS * 3 + ERR_AUTHORIZ + OK
    assert ERR_NEED_TLS == b"-ERR TLS required, say STLS first\r\n"


def test_garbage_instead_of_a_client_hello(home: QHome, pki: dict[str, Cert]) -> None:
    c = Raw(home, pki)
    c.line()
    assert c.say(b"STLS\r\n") == STLS_OK
    c.sock.sendall(b"GET / HTTP/1.0\r\n\r\n" + os.urandom(300))
    c.sock.settimeout(30)
    rest = b""
    while data := c.sock.recv(4096):
        rest += data  # at most OpenSSL's alert, never a POP3 reply
    assert b"+OK" not in rest and b"-ERR" not in rest
    code, err = c.close()
    assert code == 1 and b"TLS handshake failed" in err, err
    with server(home) as port:  # the service still serves
        p = poplib.POP3("127.0.0.1", port, timeout=30)
        p.stls(context=client_ctx(pki))
        p.quit()


def test_stalled_handshake_times_out(home: QHome, pki: dict[str, Cert]) -> None:
    for extra in ({"POP3S": "1"}, {}):
        c = Raw(home, pki, PYQMAIL_POP3_TIMEOUT="1", **extra)
        if not extra:
            c.line()
            assert c.say(b"STLS\r\n") == STLS_OK
        start = time.monotonic()
        c.sock.settimeout(30)
        assert c.sock.recv(100) == b""  # nothing sent: qmail-popup gives up after its timeout
        assert 0.5 < time.monotonic() - start < 20
        code, err = c.close()
        assert code == 1 and b"TLS handshake failed: timed out" in err, err


def test_certificate_unusable_is_an_err_reply(home: QHome) -> None:
    (home.path / "control" / "servercert.pem").write_text("not a certificate\n")
    res = expect(run([home.bin("qmail-popup"), NAME, "/bin/false"], input=b"STLS\r\nNOOP\r\n",
                     env=env_for(home)), 1)
    reply = res.stdout.split(b"\r\n")[1]
    assert reply.startswith(b"-ERR TLS not available: missing certificate"), res.explain()
    assert res.stdout.endswith(OK) and b"TLS not available" in res.stderr


def test_ten_megabyte_line_inside_tls_is_bounded(home: QHome, pki: dict[str, Cert]) -> None:
    put_message(home, "1000.1.host", b"Subject: after the flood\n\nstill here\n")
    c = Raw(home, pki)
    c.line()
    assert c.say(b"STLS\r\n") == STLS_OK
    c.starttls()
    base = c.hwm_kib()
    big = b"X" * (10 << 20)
    # Before login: qmail-popup keeps a bounded part of the line.
    assert c.say(big + b"\r\nNOOP\r\n") == ERR_AUTHORIZ
    assert c.line() == OK
    assert c.say(b"USER " + USER.encode() + b"\r\n") == OK
    assert c.say(b"PASS " + PASSWORD.encode() + b"\r\n") == OK
    # After login, through the relay into qmail-pop3d.
    assert c.say(b"LIST " + big + b"\r\nNOOP\r\n").startswith(b"-ERR")
    assert c.line() == OK
    assert c.say(b"RETR 1\r\n") == OK
    assert c.line() == b"Subject: after the flood\r\n"
    grown = c.hwm_kib() - base
    assert grown < 8 * 1024, f"qmail-popup grew by {grown} KiB"
    while c.line() != b".\r\n":
        pass
    assert c.say(b"QUIT\r\n") == OK
    code, err = c.close()
    assert code == 1, err


def test_refused_login_over_tls_is_said_inside_tls(home: QHome, pki: dict[str, Cert]) -> None:
    c = Raw(home, pki)
    c.line()
    assert c.say(b"STLS\r\n") == STLS_OK
    c.starttls()
    assert c.say(b"USER nobody@example.org\r\n") == OK
    assert c.say(b"PASS nothing\r\n") == ERR_BADAUTH
    assert c.close()[0] == 1
