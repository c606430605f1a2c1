"""Running network servers (qmail-smtpd, qmail-qmtpd, qmail-qmqpd) for tests.

`Conversation` runs a server as a process on one end of a socketpair, for
exact byte-level dialogues and exit codes. `ForkServer` listens on
127.0.0.1 port 0 and starts the server per connection through
`pyqmail.spawn` from a forked accept loop, with tcpserver's environment, so
real clients (smtplib, swaks, qmail-qmqpc) can connect.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Mapping

from queuefmt import files, parse_todo

BASE_ENV = {"PATH": "/usr/bin:/bin"}


class Conversation:
    """A server process talking on a socketpair; `Conversation.close_all()` ends any left running."""

    live: list[Conversation] = []

    def __init__(self, program: Path | str, env: Mapping[str, str] | None = None, timeout: float = 30) -> None:
        Conversation.live.append(self)
        self.sock, theirs = socket.socketpair()
        self.argv = [os.fspath(program)]
        self.proc = subprocess.Popen(self.argv, stdin=theirs, stdout=theirs, stderr=subprocess.PIPE,
                                     env=dict(BASE_ENV, **(env or {})))
        theirs.close()
        self.sock.settimeout(timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def lines(self, n: int = 1) -> list[bytes]:
        """Return the next n CRLF-terminated lines the server sent."""
        out = []
        while len(out) < n:
            i = self.buf.find(b"\r\n")
            if i == -1:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError(f"server closed; have {out!r} + {self.buf!r}")
                self.buf += chunk
                continue
            out.append(self.buf[:i + 2])
            self.buf = self.buf[i + 2:]
        return out

    def line(self) -> bytes:
        return self.lines(1)[0]

    def reply(self) -> bytes:
        """Return one whole reply, continuation lines included."""
        got = b""
        while True:
            line = self.line()
            got += line
            if line[3:4] != b"-":
                return got

    def rest(self) -> bytes:
        """Return everything until the server closes the connection."""
        data = self.buf
        self.buf = b""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return data
            data += chunk

    def finish(self, timeout: float = 30) -> tuple[int, bytes]:
        """Close our end and return the server's exit code and stderr."""
        self.sock.close()
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        if self.proc.returncode is None or not self.sock._closed:  # type: ignore[attr-defined]
            self.finish()

    @classmethod
    def close_all(cls) -> None:
        while cls.live:
            cls.live.pop().close()


def tcp_env(conn: socket.socket) -> dict[str, str]:
    """Return tcpserver's environment for an accepted connection."""
    rip, rport = conn.getpeername()[:2]
    lip, lport = conn.getsockname()[:2]
    return {"PROTO": "TCP", "TCPREMOTEIP": rip, "TCPREMOTEPORT": str(rport),
            "TCPLOCALIP": lip, "TCPLOCALPORT": str(lport)}


class ForkServer:
    """Accept on 127.0.0.1:port and spawn program for each connection, as tcpserver does."""

    def __init__(self, program: Path | str, env: Mapping[str, str] | None = None) -> None:
        self.program = os.fspath(program)
        self.env = dict(BASE_ENV, **(env or {}))
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.log = tempfile.TemporaryFile()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the accept loop
            self._loop()
        self.listener.close()

    def _loop(self) -> None:
        from pyqmail import spawn

        code = 0
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            while True:
                conn, _ = self.listener.accept()
                env = dict(self.env, **tcp_env(conn))
                try:
                    spawn.spawn(self.program, [self.program], env=env,
                                fds={0: conn.fileno(), 1: conn.fileno(), 2: self.log.fileno()})
                finally:
                    conn.close()
                try:
                    while os.waitpid(-1, os.WNOHANG)[0]:
                        pass
                except ChildProcessError:
                    pass
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)

    def stderr(self) -> bytes:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        self.log.close()

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def queued(queue: Path) -> list[tuple[bytes, bytes, list[bytes]]]:
    """Return (message, sender, recipients) of every message in todo/, by inode number (not age)."""
    out = []
    for name in sorted(files(queue)["todo"], key=int):
        num = int(name)
        env = parse_todo((queue / "todo" / name).read_bytes())
        mess = (queue / "mess" / str(num % 23) / name).read_bytes()
        out.append((mess, env.sender, env.recipients))
    return out
