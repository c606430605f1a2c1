"""qmail-remote authenticating to a server no one here wrote (issue 14.4, Must show): a private
Postfix smtpd on a loopback port relaying only for SASL-authenticated clients, with Dovecot's
auth service (a private instance: passwd-file passdb, one unix socket) as its SASL; AUTH PLAIN
over STARTTLS. Both are started and stopped by the test; CI fails (not skips) without them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import CI, QHome, expect, run
from remotekit import DnsServer
from tlskit import Cert, Postfix, make_ca, make_leaf

USER = "relayuser"
PASSWORD = "pfx s3cret"
DEADLINE = 30


def need_dovecot() -> str:
    path = shutil.which("dovecot", path="/usr/sbin:/usr/bin")
    if path is None:
        if CI:
            pytest.fail("dovecot missing: .ci/run installs Debian's dovecot-core")
        pytest.skip("dovecot not installed")
    return path


class DovecotSasl:
    """Dovecot's auth service alone (no mail protocols), its client socket at self.socket."""

    def __init__(self, base: Path) -> None:
        self.dir = base
        self.socket = base / "auth-client"
        self.log = base / "dovecot.log"
        (base / "passwd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
        (base / "passwd").chmod(0o600)
        conf = base / "dovecot.conf"
        conf.write_text(
            f"base_dir = {base}/run\n"
            f"state_dir = {base}/state\n"
            f"log_path = {self.log}\n"
            "protocols =\n"
            "ssl = no\n"
            "disable_plaintext_auth = no\n"
            "auth_mechanisms = plain login\n"
            "auth_failure_delay = 0\n"
            "auth_verbose = yes\n"
            "passdb {\n"
            "  driver = passwd-file\n"
            f"  args = {base}/passwd\n"
            "}\n"
            "userdb {\n"
            "  driver = static\n"
            "  args = uid=65534 gid=65534 home=/nonexistent\n"
            "}\n"
            "service auth {\n"
            "  user = root\n"
            f"  unix_listener {self.socket} {{\n"
            "    mode = 0666\n"
            "  }\n"
            "}\n")
        out = open(base / "dovecot.out", "ab")
        try:
            self.proc = subprocess.Popen([need_dovecot(), "-F", "-c", str(conf)], stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, env={"PATH": "/usr/bin:/bin"})
        finally:
            out.close()
        deadline = time.monotonic() + DEADLINE
        while True:
            assert self.proc.poll() is None, self.diagnostics()
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.socket))
                break
            except OSError:
                assert time.monotonic() < deadline, self.diagnostics()
                time.sleep(0.05)  # a readiness poll

    def diagnostics(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in (self.dir / "dovecot.out", self.log)
                         if p.exists())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


@pytest.fixture(scope="module")
def smarthost() -> Iterator[tuple[Postfix, DovecotSasl]]:
    base = Path(tempfile.mkdtemp(prefix="pyqmail-sasl-", dir="/tmp"))
    base.chmod(0o755)
    dove_dir = base / "dovecot"
    dove_dir.mkdir()
    dove_dir.chmod(0o755)
    ca = make_ca(base, "saslca")
    leaf: Cert = make_leaf(base, "smarthost", ca, ["smarthost.example.test"])
    dove = pf = None
    try:
        dove = DovecotSasl(dove_dir)
        pf = Postfix(base / "postfix", leaf, main_extra={
            "mynetworks": "127.0.0.2/32",  # not the client: relaying needs SASL
            "smtpd_relay_restrictions": "permit_sasl_authenticated, reject",
            "smtpd_recipient_restrictions": "permit_sasl_authenticated, reject",
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": str(dove.socket),
            "smtpd_tls_auth_only": "yes",
            "smtpd_sasl_authenticated_header": "yes",
        })
        yield pf, dove
    finally:
        if pf is not None:
            pf.stop()
        if dove is not None:
            dove.stop()
        shutil.rmtree(base, ignore_errors=True)


def remote(h: QHome, port: int, password: str) -> bytes:
    h.control("smtproutes", f":[127.0.0.1]:{port} {USER} {password}\n")
    with DnsServer({}) as d:
        env = {"PATH": os.environ["PATH"], **d.env}
        return expect(run([h.bin("qmail-remote"), "far.example.org", "s@x.org", "rcpt@far.example.org"],
                          input=b"Subject: via smarthost\n\nauthenticated relay\n", env=env), 0).stdout


def test_auth_plain_over_starttls_to_postfix_dovecot(qhome: QHome, smarthost: tuple[Postfix, DovecotSasl]) -> None:
    pf, dove = smarthost
    out = remote(qhome, pf.port, PASSWORD)
    assert out.startswith(b"r\0K127.0.0.1 accepted message.\nRemote host said: 250 2.0.0 Ok: queued as "), \
        (out, pf.logtext(), dove.diagnostics())
    assert b"\nTLS: TLSv1.3 " in out
    queued = out.split(b"queued as ")[1].split(b"\n")[0].decode()
    log = pf.logtext()
    assert f"{queued}: client=localhost[127.0.0.1], sasl_method=PLAIN, sasl_username={USER}" in log, log
    msgs = [m for m in pf.messages() if b"authenticated relay" in m]
    assert len(msgs) == 1 and f"(Authenticated sender: {USER})".encode() in msgs[0], msgs


def test_wrong_password_bounces_with_postfix_text(qhome: QHome, smarthost: tuple[Postfix, DovecotSasl]) -> None:
    pf, dove = smarthost
    out = remote(qhome, pf.port, "wrong")
    assert out.startswith(b"DConnected to 127.0.0.1 but authentication was rejected (AUTH PLAIN).\n"
                          b"Remote host said: 535 5.7.8 Error: authentication failed:"), (out, dove.diagnostics())
    assert f"passwd-file({USER},127.0.0.1): Password mismatch" in dove.log.read_text(errors="replace")
