"""qmail-remote's SMTP AUTH to a smarthost (issue 14.4): credentials in control/smtproutes and
control/authsenders, CRAM-MD5/PLAIN/LOGIN against a scripted server of our own, no password
outside TLS, 535 permanent and 454 temporary; then Postfix's smtpd with Dovecot SASL
(tests/test_remote_auth_postfix.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import pytest

from conftest import QHome, expect, run
from remotekit import DnsServer
from tlskit import Cert, make_ca, make_leaf, server_context

from pyqmail.remote import auth, smtproutes

USER = b"relayuser"
PASSWORD = b"s3cret pass|word"  # a blank and a bar: the password is the rest of the line
DEADLINE = 30


# --- pure ----------------------------------------------------------------------------------------

def test_split_both_forms() -> None:
    assert auth.split("relay.example:587 u p w") == ("relay.example:587", auth.Credentials(b"u", b"p w"))
    assert auth.split("relay.example:587|u|p|w x") == ("relay.example:587", auth.Credentials(b"u", b"p|w x"))
    assert auth.split("[10.0.0.1] -u pw") == ("[10.0.0.1]", auth.Credentials(b"u", b"pw", plaintext_ok=True))
    assert auth.split("|-u|pw") == ("", auth.Credentials(b"u", b"pw", plaintext_ok=True))
    assert auth.split("relay.example:26") == ("relay.example:26", None)
    assert auth.split("relay.example onlyuser") == ("relay.example", None)  # no password: no AUTH
    assert auth.split("relay.example|onlyuser") == ("relay.example", None)
    assert "pw" not in repr(auth.Credentials(b"u", b"pw"))


def test_smtproutes_route_carries_login() -> None:
    routes = smtproutes.parse([":smart.example:587 user pass", "x.org:mx.x.org", "y.org:mx.y.org:2525|a|b"])
    assert smtproutes.lookup(routes, "other.net") == smtproutes.Route(
        "smart.example", 587, auth.Credentials(b"user", b"pass"))
    assert smtproutes.lookup(routes, "x.org") == smtproutes.Route("mx.x.org", 25)
    assert smtproutes.lookup(routes, "y.org") == smtproutes.Route("mx.y.org", 2525, auth.Credentials(b"a", b"b"))


def test_authsenders_keys() -> None:
    senders = auth.parse_authsenders([
        "@example.com|generic|passwd", ".sub.example.com|other|otherpw", "mail@example.com|test|testpass",
        "info@example.com:smtp.example.com:26|other|otherpw", ":mailrelay.example.com:587|e=mc2|testpass"])
    assert auth.lookup_sender(senders, "mail@example.com") == "|test|testpass"
    assert auth.lookup_sender(senders, "MAIL@Example.COM") == "|test|testpass"
    assert auth.lookup_sender(senders, "x@example.com") == "|generic|passwd"
    assert auth.lookup_sender(senders, "x@a.sub.example.com") == "|other|otherpw"
    assert auth.lookup_sender(senders, "info@example.com") == "smtp.example.com:26|other|otherpw"
    assert auth.lookup_sender(senders, "x@else.org") == "mailrelay.example.com:587|e=mc2|testpass"
    assert auth.lookup_sender(senders, "") == "mailrelay.example.com:587|e=mc2|testpass"  # bounces too
    assert auth.lookup_sender(auth.parse_authsenders(["a@b.c:r"]), "x@y.z") is None


def test_mechanisms_and_preference() -> None:
    text = b"250-pfx.example.test\n250-PIPELINING\n250-AUTH PLAIN login\n250-AUTH=LOGIN\n250 8BITMIME\n"
    assert auth.mechanisms(text) == [b"PLAIN", b"LOGIN"]
    assert auth.choose([b"LOGIN", b"PLAIN", b"CRAM-MD5", b"DIGEST-MD5"]) == [b"CRAM-MD5", b"PLAIN", b"LOGIN"]
    assert auth.mechanisms(b"250 one line\n") == []


def test_cram_md5_rfc2195_example() -> None:
    c = auth.Credentials(b"tim", b"tanstaaftanstaaf")
    challenge = base64.b64encode(b"<1896.697170952@postoffice.reston.mci.net>")
    assert base64.b64decode(auth.cram_md5(c, challenge + b"\n") or b"") == b"tim b913a602c7eda7a495b4e6e7334d3890"
    assert auth.cram_md5(c, b"not base64!") is None
    assert base64.b64decode(auth.plain(c)) == b"\0tim\0tanstaaftanstaaf"


# --- a scripted AUTH server ----------------------------------------------------------------------

@dataclass
class Seen:
    commands: list[bytes] = field(default_factory=list)
    tls_at_auth: bool | None = None
    mech: bytes = b""
    data: bytes = b""


class AuthServer:
    """An SMTP server on 127.0.0.1 in a thread: STARTTLS (when ctx), AUTH mechs checked against
    USER/PASSWORD (or answered with refuse, e.g. b"454 ..."), 250 to MAIL/RCPT, DATA kept."""

    def __init__(self, ctx: ssl.SSLContext | None, mechs: bytes, refuse: bytes | None = None,
                 auth_before_tls: bool = False) -> None:
        self.ctx, self.mechs, self.refuse, self.auth_before_tls = ctx, mechs, refuse, auth_before_tls
        self.seen: list[Seen] = []
        self.errors: list[str] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(DEADLINE)
            s = Seen()
            self.seen.append(s)
            self._open: list[socket.socket | BinaryIO] = [conn]
            try:
                self._talk(conn, s)
            except (OSError, ssl.SSLError, ValueError) as e:
                self.errors.append(repr(e))
            finally:
                for c in reversed(self._open):
                    c.close()

    def _talk(self, raw: socket.socket, s: Seen) -> None:
        conn: socket.socket = raw
        f: BinaryIO = conn.makefile("rb")
        self._open.append(f)

        def line() -> bytes:
            got = f.readline(100000)
            if not got.endswith(b"\r\n"):
                raise ValueError(f"no line: {got!r}")
            s.commands.append(got[:-2])
            return got[:-2]

        conn.sendall(b"220 auth.test ESMTP\r\n")
        authed = False
        while True:
            cmd = line()
            verb = cmd.split(b" ", 1)[0].upper()
            tls_on = isinstance(conn, ssl.SSLSocket)
            if verb == b"EHLO":
                lines = [b"auth.test"]
                if self.ctx is not None and not tls_on:
                    lines.append(b"STARTTLS")
                if tls_on or self.auth_before_tls:
                    lines.append(b"AUTH " + self.mechs)
                lines.append(b"8BITMIME")
                conn.sendall(b"".join(b"250" + (b" " if i == len(lines) - 1 else b"-") + x + b"\r\n"
                                      for i, x in enumerate(lines)))
            elif verb == b"STARTTLS":
                assert self.ctx is not None
                conn.sendall(b"220 go ahead\r\n")
                conn = self.ctx.wrap_socket(raw, server_side=True)
                f = conn.makefile("rb")
                self._open += [conn, f]
            elif verb == b"AUTH":
                s.tls_at_auth = tls_on
                words = cmd.split(b" ")
                s.mech = words[1].upper()
                if s.mech == b"PLAIN":
                    if len(words) > 2:
                        resp = words[2]
                    else:
                        conn.sendall(b"334 \r\n")
                        resp = line()
                    ok = base64.b64decode(resp) == b"\0" + USER + b"\0" + PASSWORD
                elif s.mech == b"LOGIN":
                    conn.sendall(b"334 VXNlcm5hbWU6\r\n")
                    user = base64.b64decode(line())
                    conn.sendall(b"334 UGFzc3dvcmQ6\r\n")
                    ok = user == USER and base64.b64decode(line()) == PASSWORD
                elif s.mech == b"CRAM-MD5":
                    challenge = b"<12345.67890@auth.test>"
                    conn.sendall(b"334 " + base64.b64encode(challenge) + b"\r\n")
                    user, digest = base64.b64decode(line()).split(b" ")
                    ok = user == USER and digest == hmac.new(PASSWORD, challenge, hashlib.md5).hexdigest().encode()
                else:
                    conn.sendall(b"504 5.5.4 unrecognized authentication type\r\n")
                    continue
                if self.refuse is not None:
                    conn.sendall(self.refuse + b"\r\n")
                elif ok:
                    authed = True
                    conn.sendall(b"235 2.7.0 Authentication successful\r\n")
                else:
                    conn.sendall(b"535 5.7.8 Error: authentication failed: bad password\r\n")
            elif verb == b"MAIL":
                conn.sendall(b"250 ok\r\n" if authed else b"530 5.7.0 Authentication required\r\n")
            elif verb == b"RCPT":
                conn.sendall(b"250 ok\r\n")
            elif verb == b"DATA":
                conn.sendall(b"354 go ahead\r\n")
                body = []
                while (got := line()) != b".":
                    body.append(got)
                s.data = b"\n".join(body)
                conn.sendall(b"250 ok queued\r\n")
            elif verb == b"QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            else:
                conn.sendall(b"502 unknown\r\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def __enter__(self) -> AuthServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture(scope="module")
def pki() -> Iterator[dict[str, Cert]]:
    d = Path(tempfile.mkdtemp(prefix="pyqmail-auth-", dir="/tmp"))
    ca = make_ca(d, "authca")
    yield {"ca": ca, "leaf": make_leaf(d, "auth", ca, ["auth.example.test"])}
    shutil.rmtree(d, ignore_errors=True)


def remote(h: QHome, sender: str = "s@x.org", host: str = "example.com") -> bytes:
    with DnsServer({}) as d:
        e = {"PATH": os.environ["PATH"], **d.env}
        return expect(run([h.bin("qmail-remote"), host, sender, "a@example.com"], input=b"Subject: auth\n\nhello\n",
                          env=e), 0).stdout


PW = PASSWORD.decode()


@pytest.mark.parametrize("mechs, used", [(b"PLAIN LOGIN", b"PLAIN"), (b"LOGIN", b"LOGIN"),
                                          (b"LOGIN PLAIN CRAM-MD5", b"CRAM-MD5")])
def test_mechanisms_inside_tls(qhome: QHome, pki: dict[str, Cert], mechs: bytes, used: bytes) -> None:
    with AuthServer(server_context(pki["leaf"]), mechs) as srv:
        qhome.control("smtproutes", f":[127.0.0.1]:{srv.port} {USER.decode()} {PW}\n")
        out = remote(qhome)
    assert out.startswith(b"r\0K127.0.0.1 accepted message.\nRemote host said: 250 ok queued\n"), (out, srv.errors)
    (s,) = srv.seen
    assert s.mech == used and s.tls_at_auth is True
    assert b"hello" in s.data
    assert not any(PASSWORD in c for c in s.commands)  # never in clear on the wire log (base64 only)


def test_hoffmann_form_and_plain_text_opt_out(qhome: QHome) -> None:
    with AuthServer(None, b"PLAIN", auth_before_tls=True) as srv:
        qhome.control("smtproutes", f":[127.0.0.1]:{srv.port}|-{USER.decode()}|{PW}\n")
        out = remote(qhome)
    assert out.startswith(b"r\0K127.0.0.1 accepted message."), (out, srv.errors)
    assert srv.seen[0].tls_at_auth is False


def test_no_auth_outside_tls(qhome: QHome) -> None:
    with AuthServer(None, b"PLAIN LOGIN", auth_before_tls=True) as srv:
        qhome.control("smtproutes", f":[127.0.0.1]:{srv.port} {USER.decode()} {PW}\n")
        out = remote(qhome)
    assert out == (b"ZConnected to 127.0.0.1 but TLS is not up and this route's password is sent only inside TLS"
                   b" (a user starting with - allows plain text) (#4.7.0).\n\0")
    assert [c.split(b" ")[0] for c in srv.seen[0].commands] == [b"EHLO", b"QUIT"]


def test_wrong_password_is_permanent(qhome: QHome, pki: dict[str, Cert]) -> None:
    with AuthServer(server_context(pki["leaf"]), b"LOGIN") as srv:
        qhome.control("smtproutes", f":[127.0.0.1]:{srv.port} {USER.decode()} wrong\n")
        out = remote(qhome)
    assert out.startswith(b"DConnected to 127.0.0.1 but authentication was rejected (AUTH LOGIN).\n"
                          b"Remote host said: 535 5.7.8 Error: authentication failed: bad password\n"), out


def test_454_is_temporary(qhome: QHome, pki: dict[str, Cert]) -> None:
    with AuthServer(server_context(pki["leaf"]), b"CRAM-MD5", refuse=b"454 4.7.0 Temporary authentication failure") as srv:
        qhome.control("smtproutes", f":[127.0.0.1]:{srv.port} {USER.decode()} {PW}\n")
        out = remote(qhome)
    assert out.startswith(b"ZConnected to 127.0.0.1 but authentication was rejected (AUTH CRAM-MD5).\n"
                          b"Remote host said: 454 4.7.0 Temporary authentication failure\n"), out


def test_no_known_mechanism_defers(qhome: QHome, pki: dict[str, Cert]) -> None:
    with AuthServer(server_context(pki["leaf"]), b"DIGEST-MD5 XOAUTH2") as srv:
        qhome.control("smtproutes", f":[127.0.0.1]:{srv.port} {USER.decode()} {PW}\n")
        out = remote(qhome)
    assert out.startswith(b"ZConnected to 127.0.0.1 but it offers none of the AUTH mechanisms"), out


def test_authsenders_routes_by_sender(qhome: QHome, pki: dict[str, Cert]) -> None:
    with AuthServer(server_context(pki["leaf"]), b"PLAIN") as srv:
        qhome.control("smtproutes", "example.com:[127.0.0.9]:9\n")  # authsenders wins over this
        qhome.control("authsenders", f"@x.org:[127.0.0.1]:{srv.port}|{USER.decode()}|{PW}\n")
        out = remote(qhome, sender="someone@x.org")
        assert out.startswith(b"r\0K127.0.0.1 accepted message."), (out, srv.errors)
        assert srv.seen[0].mech == b"PLAIN"
        # another sender's mail keeps smtproutes' route (nothing listens on port 9)
        assert remote(qhome, sender="else@y.org").startswith(b"ZSorry, I wasn't able to establish"), srv.seen
    # an empty relay: the host's own route, with the sender's credentials
    with AuthServer(server_context(pki["leaf"]), b"LOGIN") as srv:
        qhome.control("smtproutes", f"example.com:[127.0.0.1]:{srv.port}\n")
        qhome.control("authsenders", f"bob@x.org {USER.decode()} {PW}\n")
        out = remote(qhome, sender="bob@x.org")
    assert out.startswith(b"r\0K127.0.0.1 accepted message."), (out, srv.errors)
    assert srv.seen[0].mech == b"LOGIN"


def test_root_mode_qmailr_reads_its_600_file(root_home: QHome, pki: dict[str, Cert]) -> None:
    """The passwords' file as qmail doctor wants it (owner qmailr, 600) is read by qmail-remote as qmailr;
    root's own 600 file is not: the message waits (Z), it is not sent without credentials."""
    import pwd

    routes = root_home.path / "control" / "smtproutes"
    with AuthServer(server_context(pki["leaf"]), b"PLAIN") as srv, DnsServer({}) as d:
        routes.write_text(f":[127.0.0.1]:{srv.port} {USER.decode()} {PW}\n")
        routes.chmod(0o600)
        env = {"PATH": os.environ["PATH"], **d.env}
        argv = [root_home.bin("qmail-remote"), "example.com", "s@x.org", "a@example.com"]
        out = expect(run(argv, input=b"Subject: root\n\nhello\n", env=env, user="qmailr"), 0).stdout
        assert out == b"ZUnable to read control files. (#4.3.0)\n\0"
        os.chown(routes, pwd.getpwnam("qmailr").pw_uid, 0)
        out = expect(run(argv, input=b"Subject: root\n\nhello\n", env=env, user="qmailr"), 0).stdout
    assert out.startswith(b"r\0K127.0.0.1 accepted message."), (out, srv.errors)
    assert [s.mech for s in srv.seen] == [b"PLAIN"]
