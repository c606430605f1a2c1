"""SMTP AUTH logins per second through the submission service (port 587's), and where a login's time goes.

usage: python bench/auth.py [LOGINS] [RUNS]

A fresh single-user home (`qmail init`: self-signed certificate) and a virtual user made by
`qmail user add` (its password stored as scrypt, ln=14 r=8 p=1). The service is run with the
argv and environment `qmail up` gives its submission service (pyqmail.admin.up.services:
SMTPAUTH='!', FORCETLS=1, tcpserver -> qmail-smtpd -> checkpassword). A login is: connect,
220, EHLO, STARTTLS and the TLS handshake, EHLO, AUTH PLAIN (235), QUIT. Prints:

- logins per second, LOGINS one after another, per run: median, min and max over RUNS runs;
- the same with 4 clients at once (the machine's cores decide how much that helps);
- one login split: connect+greeting+EHLO, STARTTLS+handshake+EHLO, AUTH PLAIN (qmail-smtpd
  forks checkpassword, which checks the scrypt hash), QUIT; medians over the sequential logins;
- the scrypt check alone, in-process, with the stored hash's parameters.

Figures only: nothing here asserts a speed.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import fresh_home, report  # noqa: E402

USER = "bench@example.org"
PASSWORD = "bench pass"
FQDN = "submit.example.org"
CLIENTS = 4


class Login:
    """One login's phases, in seconds."""

    def __init__(self) -> None:
        self.greet = self.tls = self.auth = self.quit = 0.0


def _reply(f: object) -> bytes:
    last = b""
    while True:
        line = f.readline()  # type: ignore[attr-defined]
        if not line:
            raise ConnectionError("connection closed")
        last = line
        if line[3:4] != b"-":
            return last


def login(port: int, ctx: ssl.SSLContext) -> Login:
    """Run one submission login; return the time of each phase."""
    out = Login()
    t0 = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        f = sock.makefile("rb")
        assert _reply(f).startswith(b"220")
        sock.sendall(b"EHLO bench.example\r\n")
        assert _reply(f).startswith(b"250")
        t1 = time.perf_counter()
        sock.sendall(b"STARTTLS\r\n")
        assert _reply(f).startswith(b"220")
        f.close()
        tls = ctx.wrap_socket(sock)
        f = tls.makefile("rb")
        tls.sendall(b"EHLO bench.example\r\n")
        assert _reply(f).startswith(b"250")
        t2 = time.perf_counter()
        token = base64.b64encode(b"\0" + USER.encode() + b"\0" + PASSWORD.encode())
        tls.sendall(b"AUTH PLAIN " + token + b"\r\n")
        got = _reply(f)
        assert got.startswith(b"235"), got
        t3 = time.perf_counter()
        tls.sendall(b"QUIT\r\n")
        assert _reply(f).startswith(b"221")
        t4 = time.perf_counter()
        f.close()
        tls.close()
    finally:
        sock.close()
    out.greet, out.tls, out.auth, out.quit = t1 - t0, t2 - t1, t3 - t2, t4 - t3
    return out


def main(argv: list[str]) -> int:
    logins = int(argv[1]) if len(argv) > 1 else 50
    runs = int(argv[2]) if len(argv) > 2 else 5
    home = fresh_home(FQDN)
    bin_ = os.path.join(home, "bin")
    extra = ["--uid", "pqtest"] if os.geteuid() == 0 else []
    subprocess.run([os.path.join(bin_, "qmail"), "user", "add", "--home", home, *extra, USER],
                   input=PASSWORD.encode() + b"\n", check=True, stdout=subprocess.DEVNULL)
    os.environ["QMAILHOME"] = home
    from pyqmail import home as _home
    from pyqmail.admin import up
    from pyqmail.pop3 import passwords

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    inst = _home.parse_install(open(os.path.join(home, "conf", "install")).read())
    words = up.services(home, inst, up.Ports("127.0.0.1", 0, 0, 0, 0, 0, port), FQDN)["submission"]
    env = {"PATH": "/usr/bin:/bin"}
    while "=" in words[0]:
        k, _, v = words.pop(0).partition("=")
        env[k] = v
    srv = subprocess.Popen(words, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # qmail init's self-signed certificate
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        first = login(port, ctx)  # warm-up (the first fork pays for imports)
        print(f"auth: submission service on 127.0.0.1:{port} ({' '.join(f'{k}={v}' for k, v in env.items() if k != 'PATH')}), "
              f"virtual user {USER}; first login {sum((first.greet, first.tls, first.auth, first.quit)) * 1000:.1f} ms")
        rates, phases = [], []
        for _ in range(runs):
            t = time.perf_counter()
            for _ in range(logins):
                phases.append(login(port, ctx))
            rates.append(logins / (time.perf_counter() - t))
        print(f"logins/s, {logins} one after another: median {statistics.median(rates):.1f}  "
              f"min {min(rates):.1f}  max {max(rates):.1f}  (runs={runs})")
        crates = []
        for _ in range(runs):
            errors: list[BaseException] = []

            def client() -> None:
                try:
                    for _ in range(logins // CLIENTS):
                        login(port, ctx)
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(e)

            threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
            t = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            if errors:
                raise errors[0]
            crates.append((logins // CLIENTS) * CLIENTS / (time.perf_counter() - t))
        print(f"logins/s, {CLIENTS} clients at once: median {statistics.median(crates):.1f}  "
              f"min {min(crates):.1f}  max {max(crates):.1f}  (runs={runs}, {os.cpu_count()} cores)")
        total = report("one login (sequential)", [p.greet + p.tls + p.auth + p.quit for p in phases])
        for name, attr in (("connect+220+EHLO", "greet"), ("STARTTLS+handshake+EHLO", "tls"),
                           ("AUTH PLAIN (fork checkpassword, scrypt)", "auth"), ("QUIT", "quit")):
            med = report(f"  {name}", [getattr(p, attr) for p in phases])
            print(f"    = {med / total * 100:.0f}% of the median login")
        with open(os.path.join(home, "users", "poppasswd"), "rb") as f:
            stored = next(line for line in f.read().split(b"\n") if line.startswith(USER.encode() + b":"))
        hashed = stored.split(b":")[1].decode()
        samples = []
        for _ in range(10):
            t = time.perf_counter()
            assert passwords.verify(PASSWORD.encode(), hashed)
            samples.append(time.perf_counter() - t)
        report(f"  of which the scrypt check alone ({hashed.split('$')[2]}), in-process", samples)
    finally:
        srv.terminate()
        srv.wait(30)
        shutil.rmtree(os.path.dirname(home), ignore_errors=True)
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(60)
    sys.exit(main(sys.argv))
