"""POP3 speed: RETR throughput in one session, and login-to-first-byte latency.

usage: python bench/pop3.py [MESSAGES] [LOGINS]

Serves a fresh single-user home's virtual user (made by `qmail user add`, so
its password is stored as scrypt) through pyqmail's tcpserver -> qmail-popup
-> checkpassword -> qmail-pop3d on 127.0.0.1, over raw sockets. Prints:

- RETR of MESSAGES messages of 4 KB (default 1000) one after another in one
  session: messages/s and MB/s (the session's USER/PASS not counted), once
  as a plain client, once with the client acking every segment at once
  (TCP_QUICKACK), which shows what the client's delayed ACK costs against
  the server's Nagle algorithm;
- the median over LOGINS fresh connections (default 20) of the time from
  connect through the greeting, USER, PASS, to the first byte of the reply to
  RETR 1; and, for comparison, one scrypt check of the password in-process.

Run as root, the user's mail belongs to pqtest (qmail-pop3d refuses root).
Figures only: nothing here asserts a speed.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import fresh_home, report  # noqa: E402

SIZE = 4096
USER = "bench@example.org"
PASSWORD = "bench pass"
TIMEOUT = 60.0
MAX_REPLY = 1 << 20


class Session:
    """A POP3 client on a raw socket: single-line and multi-line replies, bytes only."""

    def __init__(self, port: int, quickack: bool = False) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buf = b""
        self.quickack = quickack

    def _fill(self) -> None:
        if self.quickack:
            # Linux clears TCP_QUICKACK after a while: set it before every read.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buf += data

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if len(self.buf) > MAX_REPLY:
                raise ValueError("reply line too long")
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def first_byte(self) -> None:
        """Wait for at least one byte of the next reply."""
        if not self.buf:
            self._fill()

    def multiline(self) -> bytes:
        """Read a +OK reply and its data up to the final dot line; return the data."""
        status = self.line()
        if not status.startswith(b"+OK"):
            raise ValueError(f"refused: {status!r}")
        while b"\r\n.\r\n" not in self.buf:
            if len(self.buf) > MAX_REPLY:
                raise ValueError("reply too long")
            self._fill()
        data, self.buf = self.buf.split(b"\r\n.\r\n", 1)
        return data

    def command(self, cmd: bytes) -> bytes:
        self.sock.sendall(cmd + b"\r\n")
        return self.line()

    def login(self) -> None:
        greeting = self.line()
        if not greeting.startswith(b"+OK"):
            raise ValueError(f"greeting: {greeting!r}")
        for cmd in (b"USER " + USER.encode(), b"PASS " + PASSWORD.encode()):
            reply = self.command(cmd)
            if not reply.startswith(b"+OK"):
                raise ValueError(f"{cmd.split()[0]!r}: {reply!r}")

    def close(self) -> None:
        try:
            self.command(b"QUIT")
        except (OSError, ValueError):
            pass
        self.sock.close()


def fill_maildir(maildir: str, n: int) -> None:
    """Put n messages of SIZE bytes into maildir/new, owned as maildir is."""
    st = os.stat(maildir)
    line = b"x" * 71 + b"\n"
    for i in range(n):
        head = b"From: bench@example.org\nSubject: message %d\n\n" % i
        body = head + line * ((SIZE - len(head)) // len(line))
        body += b"y" * (SIZE - len(body) - 1) + b"\n"
        path = os.path.join(maildir, "new", f"{1000000 + i}.{i}.bench")
        with open(path, "wb") as f:
            f.write(body)
        os.chown(path, st.st_uid, st.st_gid)
        t = 1_700_000_000 + i  # distinct times: qmail-pop3d lists oldest first
        os.utime(path, (t, t))


def main(argv: list[str]) -> int:
    messages = int(argv[1]) if len(argv) > 1 else 1000
    logins = int(argv[2]) if len(argv) > 2 else 20
    home = fresh_home("pop.example.org")
    bin_ = os.path.join(home, "bin")
    extra = ["--uid", "pqtest"] if os.geteuid() == 0 else []
    subprocess.run([os.path.join(bin_, "qmail"), "user", "add", "--home", home, *extra, USER],
                   input=PASSWORD.encode() + b"\n", check=True)
    maildir = os.path.join(home, "pop", USER, "Maildir")
    fill_maildir(maildir, messages)
    env = {"PATH": "/usr/bin:/bin", "PYQMAIL_AUTH_DELAY": "0"}
    srv = subprocess.Popen([os.path.join(bin_, "tcpserver"), "-1", "-HR", "-c", "100", "-l", "pop.example.org",
                            "127.0.0.1", "0", os.path.join(bin_, "qmail-popup"), "pop.example.org",
                            os.path.join(bin_, "checkpassword"), os.path.join(bin_, "qmail-pop3d"), "Maildir"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        assert srv.stdout is not None
        port = int(srv.stdout.readline())
        print(f"pop3: {messages} messages of {SIZE} bytes; tcpserver -> qmail-popup -> checkpassword -> "
              f"qmail-pop3d on 127.0.0.1:{port}")

        for quickack, label in ((False, "plain client"), (True, "client acking at once (TCP_QUICKACK)")):
            s = Session(port, quickack)
            try:
                s.login()
                t = time.perf_counter()
                got = 0
                for i in range(1, messages + 1):
                    s.sock.sendall(b"RETR %d\r\n" % i)
                    got += len(s.multiline())
                elapsed = time.perf_counter() - t
            finally:
                s.close()
            print(f"RETR in one session, {label}: {messages / elapsed:.0f} messages/s, "
                  f"{got / elapsed / 1e6:.2f} MB/s ({elapsed:.3f} s for {messages})")

        samples = []
        for _ in range(logins):
            t = time.perf_counter()
            s = Session(port)
            try:
                s.login()
                s.sock.sendall(b"RETR 1\r\n")
                s.first_byte()
                samples.append(time.perf_counter() - t)
                s.multiline()
            finally:
                s.close()
        report("login to first byte of RETR 1", samples)

        from pyqmail.pop3 import passwords
        with open(os.path.join(home, "users", "poppasswd"), "rb") as f:
            stored = f.read().split(b":")[1].decode()
        t = time.perf_counter()
        assert passwords.verify(PASSWORD.encode(), stored)
        print(f"of which one password check ({stored.split('$')[2]}): "
              f"{(time.perf_counter() - t) * 1000:.3f} ms in-process")
    finally:
        srv.terminate()
        srv.wait(30)
        if srv.stdout is not None:
            srv.stdout.close()
        shutil.rmtree(os.path.dirname(home), ignore_errors=True)
    return 0


if __name__ == "__main__":
    if os.geteuid() == 0:
        pwd.getpwnam("pqtest")  # the mail's owner when root (.ci/run creates the user)
    sys.exit(main(sys.argv))
