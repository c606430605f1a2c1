"""qmail-smtpd's STARTTLS (RFC 3207) and SMTPS (RFC 8314), as the qmail-tls patch: real clients
(smtplib, swaks, openssl s_client), the control files, and hostile clients."""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CI, QHome
from queuefmt import RECEIVED
from smtpdkit import Conversation, ForkServer, queued
from tlskit import Cert, make_ca, make_leaf, openssl

from pyqmail.smtpd import replies

TCP = {"TCPREMOTEIP": "192.0.2.7", "TCPLOCALIP": "192.0.2.1", "TCPREMOTEHOST": "client.example.net"}
GREETING = b"220 test.example.com ESMTP\r\n"
EHLO_TLS = b"250-test.example.com\r\n250-STARTTLS\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
EHLO_PLAIN = b"250-test.example.com\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
ESMTPS = re.compile(rb"^Received: from (\S*) (?:\(HELO (\S*)\) )?\((\S*)\)\n  by (\S*) with ESMTPS \(([A-Z0-9_-]+) "
                    rb"encrypted\)(\n  \(cert [^)]*\))?; \d+ \w{3} \d{4} \d\d:\d\d:\d\d -0000\n")
BODY = "Subject: over TLS\r\n\r\nline one\r\n.leading dot\r\nlast line\r\n"
BODY_QUEUED = b"Subject: over TLS\n\nline one\n.leading dot\nlast line\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Cert]:
    d = tmp_path_factory.mktemp("smtpdpki")
    ca = make_ca(d, "testca")
    leaf = make_leaf(d, "server", ca, ["test.example.com"])
    clientca = make_ca(d, "clientca")
    return {"ca": ca, "leaf": leaf, "clientca": clientca,
            "relay": client_cert(d, "relay", clientca, "relay@client.example"),
            "stranger": client_cert(d, "stranger", clientca, "stranger@client.example"),
            "anonymous": client_cert(d, "anonymous", clientca, None)}


def client_cert(d: Path, name: str, ca: Cert, email: str | None) -> Cert:
    """Make a client certificate signed by ca, with emailAddress in its subject when given."""
    subj = f"/CN={name}" + (f"/emailAddress={email}" if email else "")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subj, cwd=d)
    (d / f"{name}.ext").write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "30", "-extfile", f"{name}.ext", cwd=d)
    return Cert(d / f"{name}.pem", d / f"{name}.key")


@pytest.fixture
def tls_home(qhome: QHome, pki: dict[str, Cert]) -> QHome:
    """A home with control/servercert.pem (certificate and key in one file) signed by pki's CA."""
    (qhome.path / "control" / "servercert.pem").write_bytes(pki["leaf"].both.read_bytes())
    return qhome


def client_ctx(pki: dict[str, Cert], cert: Cert | None = None, by_ip: bool = False) -> ssl.SSLContext:
    """A client context trusting pki's CA; by_ip: the chain is checked, not the name (we dial 127.0.0.1)."""
    ctx = ssl.create_default_context(cafile=str(pki["ca"].cert))
    ctx.check_hostname = not by_ip
    if cert is not None:
        ctx.load_cert_chain(cert.cert, cert.key)
    return ctx


@pytest.fixture(autouse=True)
def _no_leftover_servers():
    yield
    Conversation.close_all()


def talk(qhome: QHome, env: dict[str, str] | None = None) -> Conversation:
    c = Conversation(qhome.bin("qmail-smtpd"), dict(TCP, **(env or {})))
    assert c.line() == GREETING
    return c


def handshake(c: Conversation, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    """Shake hands on the conversation's socket (nothing may be waiting unread)."""
    assert c.buf == b""
    return ctx.wrap_socket(c.sock, server_hostname="test.example.com")


def read_reply(t: ssl.SSLSocket | socket.socket, n: int = 1) -> bytes:
    """Read n whole replies (the server sends nothing unasked, so no more can come)."""
    got = b""
    while len(re.findall(rb"(?m)^\d{3} .*\n", got)) < n:
        chunk = t.recv(65536)
        if not chunk:
            raise EOFError(got)
        got += chunk
    return got


def say(t: ssl.SSLSocket, line: bytes) -> bytes:
    t.sendall(line)
    return read_reply(t)


def read_all(t: ssl.SSLSocket | socket.socket) -> bytes:
    got = b""
    while True:
        try:
            chunk = t.recv(65536)
        except ssl.SSLError:
            return got
        if not chunk:
            return got
        got += chunk


def vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


# --- EHLO and the control files ------------------------------------------------------------

def test_ehlo_offers_starttls_only_with_a_certificate_and_before_tls(tls_home: QHome, pki: dict[str, Cert]) -> None:
    c = talk(tls_home)
    c.send(b"EHLO a.example\r\n")
    assert c.reply() == EHLO_TLS
    c.send(b"STARTTLS\r\n")
    assert c.reply() == replies.READY_FOR_TLS
    t = handshake(c, client_ctx(pki))
    assert say(t, b"EHLO a.example\r\n") == EHLO_PLAIN  # inside TLS: no STARTTLS any more
    assert say(t, b"STARTTLS\r\n") == replies.UNIMPLEMENTED  # twice: the patch's 502
    assert say(t, b"QUIT\r\n") == b"221 test.example.com\r\n"
    t.close()
    assert c.finish()[0] == 0
    (tls_home.path / "control" / "servercert.pem").unlink()
    c = talk(tls_home)
    c.send(b"EHLO a.example\r\n")
    assert c.reply() == EHLO_PLAIN


def test_disabletls(tls_home: QHome) -> None:
    c = talk(tls_home, {"DISABLETLS": "1"})
    c.send(b"EHLO a.example\r\nSTARTTLS\r\nQUIT\r\n")
    assert c.rest() == EHLO_PLAIN + replies.UNIMPLEMENTED + b"221 test.example.com\r\n"


def test_starttls_with_parameters_and_before_ehlo(tls_home: QHome, pki: dict[str, Cert]) -> None:
    c = talk(tls_home)
    c.send(b"STARTTLS now\r\n")
    assert c.reply() == b"501 Syntax error (no parameters allowed) (#5.5.4)\r\n"
    c.send(b"STARTTLS \r\n")  # no EHLO yet: accepted, as the patch does
    assert c.reply() == b"220 ready for tls\r\n"
    t = handshake(c, client_ctx(pki))
    assert say(t, b"MAIL FROM:<a@client.example>\r\n") == b"250 ok\r\n"
    t.sendall(b"QUIT\r\n")
    assert read_all(t) == b"221 test.example.com\r\n"
    t.close()
    assert c.finish()[0] == 0


def test_missing_or_broken_certificate_is_454_and_logged(tls_home: QHome) -> None:
    cert = tls_home.path / "control" / "servercert.pem"
    cert.write_bytes(b"not a certificate\n")
    c = talk(tls_home)
    c.send(b"EHLO a.example\r\n")
    assert c.reply() == EHLO_TLS  # readable: offered, as the patch (it only stat()s the file)
    c.send(b"STARTTLS\r\nRSET\r\n")  # what follows STARTTLS in the same packet is dropped
    assert c.reply() == b"454 TLS missing certificate: pem lib (#4.3.0)\r\n"
    c.send(b"NOOP\r\n")
    assert c.reply() == b"250 ok\r\n"  # the session goes on in plain text
    cert.unlink()
    c.send(b"STARTTLS\r\nQUIT\r\n")
    c.sock.shutdown(socket.SHUT_WR)
    assert c.rest() == b"454 TLS missing certificate: No such file or directory (#4.3.0)\r\n"
    code, err = c.finish()
    assert code == 1  # QUIT was pipelined after STARTTLS: dropped, then end of input
    assert err.count(b"qmail-smtpd: TLS unusable: control/servercert.pem: missing certificate: ") == 2, err


def test_certificate_without_its_key(tls_home: QHome, pki: dict[str, Cert]) -> None:
    (tls_home.path / "control" / "servercert.pem").write_bytes(pki["leaf"].cert.read_bytes())
    c = talk(tls_home)
    c.send(b"STARTTLS\r\n")
    assert c.reply().startswith(b"454 TLS no valid RSA private key: ")


# --- real clients --------------------------------------------------------------------------

def test_smtplib_starttls_delivers(tls_home: QHome, pki: dict[str, Cert]) -> None:
    with ForkServer(tls_home.bin("qmail-smtpd")) as srv:
        with smtplib.SMTP("127.0.0.1", srv.port, local_hostname="before.example", timeout=30) as s:
            s.ehlo()
            assert s.has_extn("starttls")
            s.mail("early@client.example")
            assert s.starttls(context=client_ctx(pki, by_ip=True))[0] == 220
            code, text = s.ehlo("after.example")
            assert code == 250 and b"STARTTLS" not in text
            assert s.sendmail("alice@client.example", ["bob@test.example.com"], BODY) == {}
            cipher = s.sock.cipher()[0]  # type: ignore[union-attr]
    ((mess, sender, rcpts),) = queued(tls_home.queue)
    assert (sender, rcpts) == (b"alice@client.example", [b"bob@test.example.com"])
    rest = mess[RECEIVED.match(mess).end():]
    r = ESMTPS.match(rest)
    assert r, rest
    assert r.group(2) == b"after.example"  # the HELO before STARTTLS did not survive
    assert r.group(5) == cipher.encode()
    assert r.group(6) is None
    assert rest[r.end():] == BODY_QUEUED


def test_swaks_tls_delivers(tls_home: QHome) -> None:
    if shutil.which("swaks") is None:
        if CI:
            pytest.fail("swaks missing")
        pytest.skip("swaks missing")
    with ForkServer(tls_home.bin("qmail-smtpd")) as srv:
        p = subprocess.run(["swaks", "--tls", "--server", f"127.0.0.1:{srv.port}", "--helo", "swaks.example",
                            "--from", "s@client.example", "--to", "bob@test.example.com",
                            "--data", "Subject: swaks\n\nfrom swaks over TLS\n"],
                           capture_output=True, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr
        assert b"220 ready for tls" in p.stdout
    ((mess, sender, rcpts),) = queued(tls_home.queue)
    assert (sender, rcpts) == (b"s@client.example", [b"bob@test.example.com"])
    rest = mess[RECEIVED.match(mess).end():]
    r = ESMTPS.match(rest)
    assert r and r.group(2) == b"swaks.example", rest
    assert rest[r.end():].startswith(b"Subject: swaks\n\nfrom swaks over TLS\n")


def test_openssl_s_client_starttls_delivers(tls_home: QHome, pki: dict[str, Cert]) -> None:
    script = (b"EHLO sclient.example\r\nMAIL FROM:<o@client.example>\r\nRCPT TO:<bob@test.example.com>\r\n"
              b"DATA\r\nSubject: s_client\r\n\r\nfrom openssl s_client\r\n.\r\nQUIT\r\n")
    with ForkServer(tls_home.bin("qmail-smtpd")) as srv:
        p = subprocess.run(["openssl", "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{srv.port}",
                            "-CAfile", str(pki["ca"].cert), "-verify_return_error", "-quiet"],
                           input=script, capture_output=True, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr
        assert b"221 test.example.com\r\n" in p.stdout
    ((mess, sender, rcpts),) = queued(tls_home.queue)
    assert (sender, rcpts) == (b"o@client.example", [b"bob@test.example.com"])
    rest = mess[RECEIVED.match(mess).end():]
    r = ESMTPS.match(rest)
    assert r and r.group(2) == b"sclient.example", rest
    assert rest[r.end():] == b"Subject: s_client\n\nfrom openssl s_client\n"


def test_smtps_is_tls_from_the_first_byte(tls_home: QHome, pki: dict[str, Cert]) -> None:
    with ForkServer(tls_home.bin("qmail-smtpd"), {"SMTPS": "1"}) as srv:
        with smtplib.SMTP_SSL("127.0.0.1", srv.port, local_hostname="smtps.example", timeout=30,
                              context=client_ctx(pki, by_ip=True)) as s:
            code, text = s.ehlo()
            assert code == 250 and b"STARTTLS" not in text
            assert s.sendmail("a@client.example", ["bob@test.example.com"], BODY) == {}
    ((mess, _, _),) = queued(tls_home.queue)
    rest = mess[RECEIVED.match(mess).end():]
    r = ESMTPS.match(rest)
    assert r and r.group(2) == b"smtps.example", rest
    assert rest[r.end():] == BODY_QUEUED


def test_tlsserverciphers_and_tlsciphers(tls_home: QHome, pki: dict[str, Cert]) -> None:
    (tls_home.path / "control" / "tlsserverciphers").write_text("# TLS 1.2 and older\nECDHE-ECDSA-AES128-GCM-SHA256\n")
    ctx = client_ctx(pki)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    for env, want in (({}, "ECDHE-ECDSA-AES128-GCM-SHA256"),
                      ({"TLSCIPHERS": "ECDHE-ECDSA-CHACHA20-POLY1305"}, "ECDHE-ECDSA-CHACHA20-POLY1305")):
        c = talk(tls_home, env)
        c.send(b"STARTTLS\r\n")
        assert c.reply() == replies.READY_FOR_TLS
        t = handshake(c, ctx)
        assert t.cipher()[0] == want
        t.sendall(b"QUIT\r\n")
        read_all(t)
        t.close()
        c.finish()[0]


# --- the session after STARTTLS ------------------------------------------------------------

def test_no_state_survives_starttls(tls_home: QHome, pki: dict[str, Cert]) -> None:
    c = talk(tls_home)
    c.send(b"EHLO a.example\r\n")
    c.reply()
    c.send(b"MAIL FROM:<before@client.example>\r\n")
    assert c.reply() == b"250 ok\r\n"
    c.send(b"RCPT TO:<bob@test.example.com>\r\n")
    assert c.reply() == b"250 ok\r\n"
    c.send(b"STARTTLS\r\n")
    assert c.reply() == replies.READY_FOR_TLS
    t = handshake(c, client_ctx(pki))
    assert say(t, b"RCPT TO:<bob@test.example.com>\r\n") == replies.WANT_MAIL  # RFC 3207: MAIL forgotten
    assert say(t, b"DATA\r\n") == replies.WANT_MAIL
    t.sendall(b"QUIT\r\n")
    assert read_all(t) == b"221 test.example.com\r\n"
    t.close()
    assert c.finish()[0] == 0


def test_starttls_injection_is_never_executed(tls_home: QHome, pki: dict[str, Cert]) -> None:
    """CVE-2011-0411: plain-text commands in the same packet as STARTTLS must not run inside TLS."""
    c = talk(tls_home)
    c.send(b"EHLO a.example\r\n")
    c.reply()
    c.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<injected@evil.example>\r\nRCPT TO:<bob@test.example.com>\r\n")
    assert c.line() == replies.READY_FOR_TLS
    t = handshake(c, client_ctx(pki))
    t.sendall(b"NOOP\r\nRCPT TO:<bob@test.example.com>\r\nQUIT\r\n")
    # Had the injected lines run, their replies (250 flushed, 250 ok...) would come first.
    assert read_all(t) == b"250 ok\r\n" + replies.WANT_MAIL + b"221 test.example.com\r\n"
    t.close()
    assert c.finish()[0] == 0


def test_garbage_instead_of_a_client_hello_ends_that_connection_only(tls_home: QHome, pki: dict[str, Cert]) -> None:
    with ForkServer(tls_home.bin("qmail-smtpd")) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        assert read_reply(s) == GREETING
        s.sendall(b"STARTTLS\r\n")
        assert read_reply(s) == replies.READY_FOR_TLS
        s.sendall(b"EHLO this is not TLS at all\r\n" * 10)
        rest = read_all(s)
        s.close()
        assert rest.endswith(b"454 TLS connection failed: wrong version number (#4.3.0)\r\n"), rest
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as good:  # the server still serves
            assert good.starttls(context=client_ctx(pki, by_ip=True))[0] == 220
            assert good.noop()[0] == 250
        assert b"Traceback" not in srv.stderr()


def test_stalled_handshake_times_out(tls_home: QHome) -> None:
    (tls_home.path / "control" / "timeoutsmtpd").write_text("1\n")
    c = talk(tls_home)
    c.send(b"STARTTLS\r\n")
    assert c.reply() == replies.READY_FOR_TLS
    c.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's first bytes, then silence
    start = time.monotonic()
    rest = c.rest()
    elapsed = time.monotonic() - start
    assert rest == b"454 TLS connection failed: timed out (#4.3.0)\r\n"
    assert 0.9 <= elapsed < 10
    assert c.finish()[0] == 1


def test_ten_megabyte_line_inside_tls_is_bounded(tls_home: QHome, pki: dict[str, Cert]) -> None:
    c = talk(tls_home)
    c.send(b"STARTTLS\r\n")
    assert c.reply() == replies.READY_FOR_TLS
    t = handshake(c, client_ctx(pki))
    assert say(t, b"NOOP\r\n") == b"250 ok\r\n"
    before = vm_hwm(c.proc.pid)
    t.sendall(b"NOOP " + b"x" * (10 * 1024 * 1024) + b"\r\n")
    assert read_reply(t) == b"250 ok\r\n"
    t.sendall(b"HELO " + b"y" * (10 * 1024 * 1024) + b"\r\nMAIL FROM:<a@b>\r\nRCPT TO:<bob@test.example.com>\r\n"
              b"DATA\r\n")
    assert read_reply(t, 4) == b"250 test.example.com\r\n250 ok\r\n250 ok\r\n354 go ahead\r\n"
    t.sendall(b"Subject: long\r\n\r\n" + b"z" * (10 * 1024 * 1024) + b"\r\n.\r\n")
    assert read_reply(t).startswith(b"250 ok ")
    grown = vm_hwm(c.proc.pid) - before
    assert grown < 4 * 1024, f"peak memory grew by {grown} KiB for 10 MiB lines"
    t.sendall(b"QUIT\r\n")
    read_all(t)
    t.close()
    assert c.finish()[0] == 0
    ((mess, _, _),) = queued(tls_home.queue)
    rest = mess[RECEIVED.match(mess).end():]
    r = ESMTPS.match(rest)
    assert r and r.group(2) == b"y" * (65536 - 5)  # what is kept of the overlong line, as in plain text
    assert rest[r.end():] == b"Subject: long\n\n" + b"z" * (10 * 1024 * 1024) + b"\n"


# --- client certificates: tlsclients, clientca.pem -----------------------------------------

@pytest.fixture
def relay_home(tls_home: QHome, pki: dict[str, Cert]) -> QHome:
    ctl = tls_home.path / "control"
    (ctl / "clientca.pem").write_bytes(pki["clientca"].cert.read_bytes())
    (ctl / "tlsclients").write_text("relay@client.example\n")
    (ctl / "rcpthosts").write_text("test.example.com\n")
    return tls_home


@pytest.mark.parametrize("who, answer", [
    ("relay", b"250 ok\r\n"),
    ("stranger", b"553 sorry, that domain isn't in my list of allowed rcpthosts; no valid cert for gatewaying: "
                 b"email address not in my list of tlsclients (#5.7.1)\r\n"),
    ("anonymous", b"553 sorry, that domain isn't in my list of allowed rcpthosts; no valid cert for gatewaying: "
                  b"contains no email address (#5.7.1)\r\n"),
    (None, b"553 sorry, that domain isn't in my list of allowed rcpthosts; no valid cert for gatewaying (#5.7.1)\r\n"),
])
def test_client_certificate_in_tlsclients_relays(relay_home: QHome, pki: dict[str, Cert], who: str | None,
                                                 answer: bytes) -> None:
    c = talk(relay_home)
    c.send(b"STARTTLS\r\n")
    assert c.reply() == replies.READY_FOR_TLS
    t = handshake(c, client_ctx(pki, pki[who] if who else None))
    assert say(t, b"MAIL FROM:<a@client.example>\r\n") == b"250 ok\r\n"
    assert say(t, b"RCPT TO:<far@elsewhere.example>\r\n") == answer
    if who == "relay":
        assert say(t, b"DATA\r\n") == b"354 go ahead\r\n"
        assert say(t, b"Subject: relayed\r\n\r\nhi\r\n.\r\n").startswith(b"250 ok ")
    t.sendall(b"QUIT\r\n")
    read_all(t)
    t.close()
    assert c.finish()[0] == 0
    if who == "relay":
        ((mess, _, rcpts),) = queued(relay_home.queue)
        assert rcpts == [b"far@elsewhere.example"]
        rest = mess[RECEIVED.match(mess).end():]
        r = ESMTPS.match(rest)
        assert r and r.group(6) == b"\n  (cert relay@client.example)", rest


def test_plain_text_relay_refusal_is_unchanged(relay_home: QHome) -> None:
    c = talk(relay_home)
    c.send(b"MAIL FROM:<a@client.example>\r\nRCPT TO:<far@elsewhere.example>\r\nQUIT\r\n")
    assert c.rest() == b"250 ok\r\n" + replies.NOGATEWAY + b"221 test.example.com\r\n"
