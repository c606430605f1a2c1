"""TLS peers for qmail-remote's tests: certificates made with the openssl command, an SMTP server
with STARTTLS (or TLS from the first byte), a DNS server that sets the AD bit for chosen names,
an HTTPS server holding an MTA-STS policy, and a private Postfix instance on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import dns.flags
import dns.message
import pytest

from conftest import CI, IS_ROOT
from remotekit import DnsServer

DEADLINE = 30.0


def openssl(*args: str, cwd: Path) -> None:
    p = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, timeout=60)
    assert p.returncode == 0, (args, p.stderr.decode(errors="replace"))


@dataclass
class Cert:
    """A certificate and its key (PEM files), the same in DER, and the file with both."""

    cert: Path
    key: Path

    @property
    def der(self) -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.cert.read_text())

    @property
    def both(self) -> Path:
        p = self.cert.with_suffix(".both.pem")
        if not p.exists():
            p.write_bytes(self.cert.read_bytes() + self.key.read_bytes())
        return p


def make_ca(d: Path, name: str) -> Cert:
    """Make a self-signed CA certificate named name in d."""
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "30", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=d)
    return Cert(d / f"{name}.pem", d / f"{name}.key")


def make_leaf(d: Path, name: str, ca: Cert, names: list[str], days: int = 30) -> Cert:
    """Make a server certificate for names (DNS SANs), signed by ca, in d."""
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={names[0]}", cwd=d)
    ext = d / f"{name}.ext"
    ext.write_text("subjectAltName=" + ",".join(f"DNS:{n}" for n in names) +
                   "\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca.cert), "-CAkey", str(ca.key),
            "-CAcreateserial", "-out", f"{name}.pem", "-days", str(days), "-extfile", str(ext), cwd=d)
    return Cert(d / f"{name}.pem", d / f"{name}.key")


def spki_sha256(cert: Cert) -> str:
    """Return the SHA2-256 of cert's SubjectPublicKeyInfo in hex (a TLSA '1 1' value), by openssl."""
    pub = subprocess.run(["openssl", "x509", "-in", str(cert.cert), "-pubkey", "-noout"],
                         capture_output=True, check=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pub,
                         capture_output=True, check=True).stdout
    return hashlib.sha256(der).hexdigest()


def server_context(leaf: Cert, chain: list[Cert] = ()) -> ssl.SSLContext:  # type: ignore[assignment]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    full = leaf.cert.with_suffix(".chain.pem")
    full.write_bytes(leaf.cert.read_bytes() + b"".join(c.cert.read_bytes() for c in chain))
    ctx.load_cert_chain(full, leaf.key)
    return ctx


@dataclass
class Session:
    commands: list[bytes] = field(default_factory=list)
    data: bytes = b""
    tls: str = ""  # the TLS version while MAIL was given
    sni: str | None = None


class TlsSmtpServer:
    """An SMTP server on 127.0.0.1 in a thread: STARTTLS offered (starttls=True) or TLS from the
    first byte (smtps=True), with ctx's certificate. Replies are fixed: 250 to everything."""

    def __init__(self, ctx: ssl.SSLContext | None, starttls: bool = True, smtps: bool = False,
                 starttls_reply: bytes = b"220 ready for tls\r\n", host: str = "127.0.0.1", port: int = 0) -> None:
        self.ctx = ctx
        self.starttls = starttls
        self.smtps = smtps
        self.starttls_reply = starttls_reply
        self.sessions: list[Session] = []
        self.errors: list[str] = []
        if ctx is not None:
            ctx.sni_callback = self._sni
        self._sni_seen: str | None = None
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _sni(self, obj: object, name: str | None, ctx: object) -> None:
        self._sni_seen = name

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(DEADLINE)
            s = Session()
            self.sessions.append(s)
            self._open = [conn]
            try:
                self._talk(conn, s)
            except (OSError, ssl.SSLError) as e:
                self.errors.append(repr(e))
            finally:
                for c in self._open:
                    c.close()

    def _wrap(self, conn: socket.socket, s: Session) -> ssl.SSLSocket:
        assert self.ctx is not None
        tls = self.ctx.wrap_socket(conn, server_side=True)
        self._open.append(tls)
        s.sni = self._sni_seen
        return tls

    def _talk(self, conn: socket.socket, s: Session) -> None:
        if self.smtps:
            conn = self._wrap(conn, s)
        conn.sendall(b"220 tls.test ESMTP\r\n")
        buf = b""
        while True:
            while b"\r\n" not in buf:
                got = conn.recv(65536)
                if not got:
                    return
                buf += got
            line, buf = buf.split(b"\r\n", 1)
            s.commands.append(line)
            verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
            if verb == b"EHLO":
                tls_on = isinstance(conn, ssl.SSLSocket)
                offer = self.starttls and not tls_on
                conn.sendall(b"250-tls.test\r\n" + (b"250-STARTTLS\r\n" if offer else b"") + b"250 8BITMIME\r\n")
            elif verb == b"STARTTLS":
                conn.sendall(self.starttls_reply)
                if self.starttls_reply.startswith(b"220"):
                    conn = self._wrap(conn, s)
                    buf = b""
            elif verb == b"MAIL":
                s.tls = conn.version() if isinstance(conn, ssl.SSLSocket) else ""  # type: ignore[assignment]
                conn.sendall(b"250 ok\r\n")
            elif verb == b"DATA":
                conn.sendall(b"354 go ahead\r\n")
                while b"\r\n.\r\n" not in b"\r\n" + buf:
                    got = conn.recv(65536)
                    if not got:
                        return
                    buf += got
                full = b"\r\n" + buf
                end = full.index(b"\r\n.\r\n")
                s.data = full[2:end + 2]
                buf = full[end + 5:]
                conn.sendall(b"250 ok queued\r\n")
            elif verb == b"QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            else:
                conn.sendall(b"250 ok\r\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def __enter__(self) -> TlsSmtpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AdDnsServer(DnsServer):
    """remotekit's DNS server, answering with the AD bit (DNSSEC-validated) for names in secure."""

    def __init__(self, records: dict[tuple[str, str], list[str]], secure: set[str] | None = None) -> None:
        self.secure = {n.lower().rstrip(".") for n in (secure or set())}
        super().__init__(records)

    def _answer(self, q: dns.message.Message) -> dns.message.Message:
        r = super()._answer(q)
        if q.question[0].name.to_text(omit_final_dot=True).lower() in self.secure:
            r.flags |= dns.flags.AD
        return r


class PolicyServer:
    """An HTTPS server on 127.0.0.1 serving an MTA-STS policy at /.well-known/mta-sts.txt."""

    def __init__(self, ctx: ssl.SSLContext, policy: str, ctype: str = "text/plain") -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                outer.requests.append(f"{self.headers.get('Host')} {self.path}")
                if self.path != "/.well-known/mta-sts.txt":
                    self.send_error(404)
                    return
                body = policy.encode()
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self._thread.join(5)
        self.httpd.server_close()

    def __enter__(self) -> PolicyServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- Postfix ---------------------------------------------------------------------------------

def postfix_or_skip() -> str:
    """Return the postfix command; fail in CI, skip elsewhere, when missing or not root."""
    path = shutil.which("postfix", path="/usr/sbin:/usr/bin:/sbin")
    if path is None or not Path("/usr/lib/postfix/sbin/smtpd").exists():
        if CI:
            pytest.fail("postfix missing: .ci/run installs Debian's postfix")
        pytest.skip("postfix not installed")
    if not IS_ROOT:
        if CI:
            pytest.fail("a private Postfix instance needs root (CI runs as root)")
        pytest.skip("a private Postfix instance needs root")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Postfix:
    """A private Postfix on 127.0.0.1:port with its own config and queue directories, TLS on
    (smtpd_tls_security_level = may, the certificate leaf), mail for any domain kept in its queue
    (no queue manager runs), started by the test and stopped after."""

    def __init__(self, base: Path, leaf: Cert, chain: list[Cert] = (), starttls: bool = True,  # type: ignore[assignment]
                 smtps: bool = False, main_extra: dict[str, str] | None = None) -> None:
        self.cmd = postfix_or_skip()
        self.base = base
        self.conf = base / "etc"
        self.queue = base / "spool"
        self.data = base / "data"
        for d in (self.conf, self.queue, self.data):
            d.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data, "postfix")
        self.port = free_port()
        certfile = self.conf / "cert.pem"
        certfile.write_bytes(leaf.cert.read_bytes() + b"".join(c.cert.read_bytes() for c in chain))
        keyfile = self.conf / "key.pem"
        keyfile.write_bytes(leaf.key.read_bytes())
        keyfile.chmod(0o600)
        self.log = base / "postfix.log"
        main = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "command_directory": "/usr/sbin",
            "daemon_directory": "/usr/lib/postfix/sbin",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "pfx.example.test",
            "mydomain": "example.test",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_recipient_restrictions": "permit_mynetworks, reject",
            "maillog_file": str(self.log),
            "maillog_file_prefixes": str(base),
            "smtpd_tls_security_level": "may" if starttls else "none",
            "smtpd_tls_cert_file": str(certfile),
            "smtpd_tls_key_file": str(keyfile),
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes",
            "smtp_dns_support_level": "disabled",
            "disable_dns_lookups": "yes",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "shlib_directory": "/usr/lib/postfix",
            "meta_directory": "/etc/postfix",
            "multi_instance_enable": "no",
        }
        main.update(main_extra or {})
        (self.conf / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
        smtpd_args = " -o smtpd_tls_wrappermode=yes -o smtpd_tls_security_level=encrypt" if smtps else ""
        # No qmgr: what smtpd takes stays in the queue (incoming/), read back with postcat.
        (self.conf / "master.cf").write_text(
            f"127.0.0.1:{self.port} inet n - n - - smtpd{smtpd_args}\n"
            "cleanup unix n - n - 0 cleanup\n"
            "rewrite unix - - n - - trivial-rewrite\n"
            "proxymap unix - - n - - proxymap\n"
            "anvil unix - - n - 1 anvil\n"
            "tlsmgr unix - - n 1000? 1 tlsmgr\n"
            "postlog unix-dgram n - n - 1 postlogd\n")
        env = {**os.environ, "MAIL_CONFIG": str(self.conf)}
        self.env = env
        p = subprocess.run([self.cmd, "-c", str(self.conf), "start"], env=env, capture_output=True, timeout=60)
        assert p.returncode == 0, p.stderr.decode(errors="replace") + self.logtext()
        deadline = time.monotonic() + DEADLINE
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, self.logtext()
                time.sleep(0.1)

    def logtext(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def messages(self) -> list[bytes]:
        """Return the contents of the queued messages (postcat -b: body and headers)."""
        out = []
        for f in sorted(self.queue.glob("incoming/**/*")) + sorted(self.queue.glob("active/**/*")):
            if f.is_file():
                p = subprocess.run(["postcat", "-c", str(self.conf), "-h", "-b", str(f)], capture_output=True,
                                   env=self.env, timeout=30)
                out.append(p.stdout)
        return out

    def stop(self) -> None:
        subprocess.run([self.cmd, "-c", str(self.conf), "stop"], env=self.env, capture_output=True, timeout=60)
        pidfile = self.queue / "pid" / "master.pid"
        deadline = time.monotonic() + DEADLINE
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
