"""POP3 over STLS against plain POP3 in the same run: what qmail-popup's relay costs.

usage: python bench/pop3_tls.py [MESSAGES] [SESSIONS]

A fresh single-user home (its self-signed control/servercert.pem made by `qmail init`),
a virtual user with MESSAGES messages of 4 KB (default 1000), served by tcpserver ->
qmail-popup -> checkpassword -> qmail-pop3d on 127.0.0.1. Prints, plain then STLS:

- RETR of every message one after another in one session: messages/s and MB/s (after
  STLS the bytes go qmail-pop3d -> socket pair -> qmail-popup -> TLS -> client);
- the median over SESSIONS fresh connections (default 20) of connect, greeting, (STLS and
  the handshake,) USER, PASS, to the first byte of the reply to RETR 1;
- the PSS of qmail-popup (the TLS end) and of qmail-pop3d while a logged-in session idles.

Figures only: nothing here asserts a speed.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import fresh_home, report  # noqa: E402
from pop3 import PASSWORD, SIZE, USER, Session, fill_maildir  # noqa: E402


class TlsSession(Session):
    """Session that says STLS after the greeting and goes on inside TLS."""

    def __init__(self, port: int, ctx: ssl.SSLContext | None) -> None:
        super().__init__(port)
        self.ctx = ctx

    def login(self) -> None:
        if self.ctx is not None:
            greeting = self.line()
            if self.command(b"STLS") != b"+OK Begin TLS negotiation":
                raise ValueError("STLS refused")
            self.sock = self.ctx.wrap_socket(self.sock)
            self.buf = greeting + b"\r\n"  # login() reads the greeting again
        super().login()


def children(pid: int) -> list[int]:
    """Return the pids of pid's descendants."""
    out = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return []
    for k in kids:
        out.append(k)
        out += children(k)
    return out


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def main(argv: list[str]) -> int:
    messages = int(argv[1]) if len(argv) > 1 else 1000
    sessions = int(argv[2]) if len(argv) > 2 else 20
    home = fresh_home("pop.example.org")
    bin_ = os.path.join(home, "bin")
    extra = ["--uid", "pqtest"] if os.geteuid() == 0 else []
    subprocess.run([os.path.join(bin_, "qmail"), "user", "add", "--home", home, *extra, USER],
                   input=PASSWORD.encode() + b"\n", check=True)
    fill_maildir(os.path.join(home, "pop", USER, "Maildir"), messages)
    env = {"PATH": "/usr/bin:/bin", "PYQMAIL_AUTH_DELAY": "0"}
    srv = subprocess.Popen([os.path.join(bin_, "tcpserver"), "-1", "-HR", "-c", "100", "-l", "pop.example.org",
                            "127.0.0.1", "0", os.path.join(bin_, "qmail-popup"), "pop.example.org",
                            os.path.join(bin_, "checkpassword"), os.path.join(bin_, "qmail-pop3d"), "Maildir"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # qmail init's self-signed certificate
    try:
        assert srv.stdout is not None
        port = int(srv.stdout.readline())
        print(f"pop3 --tls: {messages} messages of {SIZE} bytes on 127.0.0.1:{port}")
        for label, c in (("plain", None), ("STLS", ctx)):
            s = TlsSession(port, c)
            try:
                s.login()
                t = time.perf_counter()
                got = 0
                for i in range(1, messages + 1):
                    s.sock.sendall(b"RETR %d\r\n" % i)
                    got += len(s.multiline())
                elapsed = time.perf_counter() - t
                time.sleep(0.2)  # the session idles: measure its processes
                # tcpserver's child is qmail-popup; its child (checkpassword become) qmail-pop3d.
                procs = children(srv.pid)
                names = ("qmail-popup", "qmail-pop3d")
                pss = ", ".join(f"{n} {pss_kib(p) / 1024:.1f} MiB" for n, p in zip(names, procs))
            finally:
                s.close()
            print(f"{label}: RETR in one session {messages / elapsed:.0f} messages/s, "
                  f"{got / elapsed / 1e6:.2f} MB/s; PSS while idle: {pss}")
            samples = []
            for _ in range(sessions):
                t = time.perf_counter()
                s = TlsSession(port, c)
                try:
                    s.login()
                    s.sock.sendall(b"RETR 1\r\n")
                    s.first_byte()
                    samples.append(time.perf_counter() - t)
                    s.multiline()
                finally:
                    s.close()
            report(f"{label}: connect to first byte of RETR 1", samples)
    finally:
        srv.terminate()
        srv.wait(30)
        if srv.stdout is not None:
            srv.stdout.close()
        shutil.rmtree(os.path.dirname(home), ignore_errors=True)
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(60)
    sys.exit(main(sys.argv))
