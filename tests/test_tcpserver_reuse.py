"""tcpserver's reused workers (issue 17): one qmail-smtpd process serves one connection after another.

Each connection must find what a new child gives it: the socket on 0 and 1,
tcpserver's environment plus its own variables (nothing from the connection
before), the end of the connection when the program returns; the log says
`pid P from`, `ok P ...` and `end P status S` as for a child, P being the
worker's pid. A worker that dies inside a connection ends only that one;
`$PYQMAIL_TCPSERVER_REUSE` bounds the connections of one worker (0: a child
per connection, as ucspi-tcp), `$PYQMAIL_TCPSERVER_IDLE` the seconds an idle
worker is kept.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import QHome
from ucspikit import rules_file

FQDN = "test.example.com"
DEADLINE = 20.0


class Tcpserver:
    """tcpserver -v running qmail-smtpd of a home on 127.0.0.1, its log in a file."""

    def __init__(self, home: QHome, tmp: Path, *opts: str, env: dict[str, str] | None = None,
                 argv: tuple[str, ...] = (), flags: str = "-HR") -> None:
        self.log = tmp / "tcpserver.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [str(home.bin("tcpserver")), "-1", "-v", flags, "-l", FQDN, *opts, "127.0.0.1", "0",
                 str(home.bin("qmail-smtpd")), *argv],
                stdout=subprocess.PIPE, stderr=err, env={"PATH": "/usr/bin:/bin", **(env or {})})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip().isdigit(), (line, self.proc.poll())
        self.port = int(line)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(DEADLINE)
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def lines(self) -> list[str]:
        return self.log.read_text("latin-1").splitlines()

    def wait_for(self, pattern: str, count: int = 1) -> list[re.Match[str]]:
        """Wait (bounded) until count log lines match pattern; return the matches."""
        deadline = time.monotonic() + DEADLINE
        while True:
            found = [m for m in (re.fullmatch(pattern, x) for x in self.lines()) if m]
            if len(found) >= count or time.monotonic() > deadline:
                assert len(found) >= count, (pattern, self.lines())
                return found
            time.sleep(0.02)

    def connect(self, source: str = "127.0.0.1") -> Client:
        return Client(self.port, source)


class Client:
    def __init__(self, port: int, source: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE, source_address=(source, 0))
        self.buf = b""

    def reply(self) -> bytes:
        """Read one whole reply (the last line has a space after its code)."""
        out = b""
        while True:
            i = self.buf.find(b"\r\n")
            if i == -1:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError(out + self.buf)
                self.buf += chunk
                continue
            line, self.buf = self.buf[:i + 2], self.buf[i + 2:]
            out += line
            if line[3:4] != b"-":
                return out

    def say(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def quit(self) -> None:
        """QUIT, and the server closes the connection at once (as a child's exit does)."""
        assert self.say(b"QUIT").startswith(b"221 ")
        assert self.sock.recv(100) == b""
        self.sock.close()


@pytest.fixture
def home(qhome: QHome) -> QHome:
    qhome.control("rcpthosts", FQDN + "\n")
    return qhome


def _pid_of(server: Tcpserver, nth: int) -> int:
    return int(server.wait_for(r"tcpserver: pid (\d+) from .*", nth)[nth - 1].group(1))


def test_one_worker_serves_connection_after_connection(home: QHome, tmp_path: Path) -> None:
    server = Tcpserver(home, tmp_path)
    try:
        for _ in range(3):
            c = server.connect()
            assert c.reply().startswith(b"220 " + FQDN.encode())
            assert c.say(b"HELO x").startswith(b"250 ")
            c.quit()
        ends = server.wait_for(r"tcpserver: end (\d+) status (\d+)", 3)
    finally:
        server.close()
    pids = {int(m.group(1)) for m in ends}
    assert len(pids) == 1 and [m.group(2) for m in ends] == ["0", "0", "0"]
    assert pids == {_pid_of(server, 1)}
    log = [x for x in server.lines() if x.startswith("tcpserver: status")]
    assert log == ["tcpserver: status: 0/40", *["tcpserver: status: 1/40", "tcpserver: status: 0/40"] * 3]


def test_a_connections_variables_do_not_reach_the_next(home: QHome, tmp_path: Path) -> None:
    rules = rules_file(tmp_path, '127.0.0.2:allow,RELAYCLIENT=""\n:allow\n')
    server = Tcpserver(home, tmp_path, "-x", str(rules))
    try:
        for source, answer in [("127.0.0.2", b"250 "), ("127.0.0.1", b"553 "), ("127.0.0.2", b"250 "),
                               ("127.0.0.1", b"553 ")]:
            c = server.connect(source)
            c.reply()
            c.say(b"HELO x")
            assert c.say(b"MAIL FROM:<a@b.example>").startswith(b"250 ")
            assert c.say(b"RCPT TO:<someone@far.example>").startswith(answer), source
            c.quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 4)
    finally:
        server.close()
    assert len({int(m.group(1)) for m in server.wait_for(r"tcpserver: pid (\d+) from .*", 4)}) == 1


def test_an_auth_challenge_is_new_in_every_session_of_a_worker(home: QHome, tmp_path: Path) -> None:
    server = Tcpserver(home, tmp_path, env={"SMTPAUTH": "cram"}, argv=("/bin/false",))
    stamps = []
    try:
        for _ in range(2):
            c = server.connect()
            c.reply()
            assert b"AUTH CRAM-MD5" in c.say(b"EHLO x")
            challenge = c.say(b"AUTH CRAM-MD5")
            assert challenge.startswith(b"334 ")
            stamps.append(base64.b64decode(challenge[4:].strip()))
            c.say(b"*")
            c.quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 2)
    finally:
        server.close()
    pid = _pid_of(server, 1)
    assert _pid_of(server, 2) == pid
    assert re.fullmatch(rb"<%d\.\d+@%s>" % (pid, FQDN.encode()), stamps[0]), stamps
    assert re.fullmatch(rb"<%d\.2\.\d+@%s>" % (pid, FQDN.encode()), stamps[1]), stamps


def test_a_denied_connection_keeps_the_worker(home: QHome, tmp_path: Path) -> None:
    rules = rules_file(tmp_path, "127.0.0.2:deny\n:allow\n")
    server = Tcpserver(home, tmp_path, "-x", str(rules))
    try:
        c = server.connect("127.0.0.1")
        c.reply()
        c.quit()
        d = socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE, source_address=("127.0.0.2", 0))
        assert d.recv(100) == b""
        d.close()
        c = server.connect("127.0.0.1")
        assert c.reply().startswith(b"220 ")
        c.quit()
        ends = server.wait_for(r"tcpserver: end (\d+) status (\d+)", 3)
    finally:
        server.close()
    assert [m.group(2) for m in ends] == ["0", "25600", "0"]
    assert len({m.group(1) for m in ends}) == 1
    assert any(x.startswith("tcpserver: deny ") for x in server.lines())


def test_a_worker_killed_in_a_connection_ends_only_that_one(home: QHome, tmp_path: Path) -> None:
    server = Tcpserver(home, tmp_path)
    try:
        c = server.connect()
        c.reply()
        pid = _pid_of(server, 1)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(EOFError):
            c.reply()
        c.sock.close()
        server.wait_for(r"tcpserver: end %d status 9" % pid)
        c = server.connect()
        assert c.reply().startswith(b"220 ")
        c.quit()
        assert _pid_of(server, 2) != pid
        server.wait_for(r"tcpserver: end \d+ status 0")
    finally:
        server.close()
    assert server.lines()[-1] == "tcpserver: status: 0/40"


def test_uses_bound_a_worker_and_0_means_a_child_each(home: QHome, tmp_path: Path) -> None:
    for reuse, expect in [("2", 2), ("0", 3), ("1", 3)]:
        (tmp_path / reuse).mkdir()
        server = Tcpserver(home, tmp_path / reuse, env={"PYQMAIL_TCPSERVER_REUSE": reuse})
        try:
            for _ in range(3):
                c = server.connect()
                c.reply()
                c.quit()
                server.wait_for(r"tcpserver: status: 0/40", 1 + _ + 1)
            pids = [int(m.group(1)) for m in server.wait_for(r"tcpserver: pid (\d+) from .*", 3)]
        finally:
            server.close()
        assert len(set(pids)) == expect, (reuse, pids)


def test_concurrent_connections_get_workers_of_their_own(home: QHome, tmp_path: Path) -> None:
    server = Tcpserver(home, tmp_path, "-c", "2")
    try:
        a, b = server.connect(), server.connect()
        a.reply()
        b.reply()
        third = server.connect()  # accepted by the kernel, served when one of the two ends
        third.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            third.sock.recv(1)
        third.sock.settimeout(DEADLINE)
        a.quit()
        assert third.reply().startswith(b"220 ")
        b.quit()
        third.quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 3)
    finally:
        server.close()
    pids = [int(m.group(1)) for m in server.wait_for(r"tcpserver: pid (\d+) from .*", 3)]
    assert pids[0] != pids[1] and pids[2] in pids[:2]  # the first two log in either order
    assert "tcpserver: status: 2/2" in server.lines()


def test_an_idle_worker_is_let_go(home: QHome, tmp_path: Path) -> None:
    server = Tcpserver(home, tmp_path, env={"PYQMAIL_TCPSERVER_IDLE": "0.2"})
    try:
        c = server.connect()
        c.reply()
        c.quit()
        pid = _pid_of(server, 1)
        deadline = time.monotonic() + DEADLINE
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{pid}").exists()
        c = server.connect()
        assert c.reply().startswith(b"220 ")
        c.quit()
        assert _pid_of(server, 2) != pid
    finally:
        server.close()


def test_a_worker_holds_only_its_connection_and_its_pair(home: QHome, tmp_path: Path) -> None:
    server = Tcpserver(home, tmp_path)
    try:
        for _ in range(2):
            c = server.connect()
            c.reply()
            pid = _pid_of(server, _ + 1)
            fds = {int(x): os.readlink(f"/proc/{pid}/fd/{x}") for x in os.listdir(f"/proc/{pid}/fd")}
            assert fds[0] == fds[1] and fds[0].startswith("socket:")
            others = {k: v for k, v in fds.items() if k > 2}
            # the pair to tcpserver, /dev/null for between connections and the session's own
            # socket (which the hub puts back on 0 and 1 when the session runs again), all three
            # close-on-exec: a program the session starts gets 0, 1 and 2 only
            assert sorted(others.values()) == sorted(["/dev/null", fds[0], others[min(others)]]) or \
                sorted(v for v in others.values() if v != fds[0])[0] == "/dev/null", fds
            assert len(others) == 3 and list(others.values()).count(fds[0]) == 1, fds
            for fd in others:
                flags = Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0]
                assert int(flags, 8) & 0o2000000, (fd, flags)  # O_CLOEXEC
            c.quit()
            server.wait_for(r"tcpserver: end \d+ status 0", _ + 1)
        assert _pid_of(server, 2) == _pid_of(server, 1)
    finally:
        server.close()


def test_tcpserver_gone_lets_idle_workers_go(home: QHome, tmp_path: Path) -> None:
    server = Tcpserver(home, tmp_path)
    c = server.connect()
    c.reply()
    c.quit()
    pid = _pid_of(server, 1)
    server.close()
    deadline = time.monotonic() + DEADLINE
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists()
