"""QQ hands the message to qmail-queued itself in a root-mode home (issue 17): no qmail-queue process.

qmail-smtpd runs as qmaild on a socketpair, under `strace -f` counting the
processes it creates. With qmail-queued running it creates none; the message,
its Received line and its envelope are what they were. Without a server it
starts qmail-queue, which writes the maildrop, as before. A server killed in
the middle of a message gives the client a temporary failure and queues
nothing; a client killed in the middle queues nothing.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import IS_ROOT, ROOT, TEST_USER, QHome, world_dir
from queuefmt import RECEIVED, files, parse_todo

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="a root-mode home: qmail-smtpd as qmaild, qmail-queued as qmailq")

ENV = {"PATH": "/usr/bin:/bin"}
SMTP_ENV = {**ENV, "TCPREMOTEIP": "192.0.2.7", "TCPLOCALIP": "192.0.2.1", "RELAYCLIENT": ""}
FORKS = re.compile(r"^\d+\s+(clone|clone3|fork|vfork)\(.*= \d+$")


def _need_strace() -> None:
    if shutil.which("strace") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("strace missing: .ci/run installs it")
        pytest.skip("strace missing")


def _as(user: str) -> dict[str, object]:
    pw = pwd.getpwnam(user)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _wait(pred: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"waited in vain: {what}"
        time.sleep(0.02)


def _listening(path: Path) -> bool:
    """Whether a Unix socket listens on path (/proc/net/unix: flags __SO_ACCEPTCON)."""
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return path.exists()
    for line in lines:
        f = line.split()
        if len(f) >= 8 and f[7] == str(path) and int(f[3], 16) & 0x10000:
            return True
    return False


class Server:
    """qmail-queued in a session of its own, so that a test can kill it with all its children."""

    def __init__(self, home: QHome) -> None:
        self.sock = home.path / "run" / "qmail-queue.sock"
        self.proc = subprocess.Popen([home.bin("qmail-queued")], env=ENV, stderr=subprocess.PIPE,
                                     start_new_session=True)
        # Listening, not only there: bind(2) makes the file before listen(2), and a connect
        # in between is refused.
        _wait(lambda: _listening(self.sock) or self.proc.poll() is not None, 10, "qmail-queued's socket")
        assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else b""

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


@pytest.fixture
def server(root_home: QHome) -> Server:
    s = Server(root_home)
    yield s
    s.stop()


class Smtpd:
    """qmail-smtpd as qmaild on a socketpair, optionally under strace -f counting its forks."""

    def __init__(self, home: QHome, trace: Path | None = None) -> None:
        self.sock, theirs = socket.socketpair()
        prefix = [] if trace is None else ["strace", "-f", "-qq", "-o", str(trace),
                                          "-e", "trace=clone,clone3,fork,vfork"]
        self.proc = subprocess.Popen([*prefix, home.bin("qmail-smtpd")], stdin=theirs, stdout=theirs,
                                     stderr=subprocess.PIPE, env=SMTP_ENV, **_as("qmaild"))  # type: ignore[call-overload]
        theirs.close()
        self.sock.settimeout(60)
        self.buf = b""
        assert self.reply().startswith(b"220 ")

    def reply(self) -> bytes:
        while True:
            lines = self.buf.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if line[3:4] != b"-":
                    got = b"\r\n".join(lines[:i + 1]) + b"\r\n"
                    self.buf = self.buf[len(got):]
                    return got
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk

    def say(self, line: bytes) -> bytes:
        self.sock.sendall(line)
        return self.reply()

    def start_data(self, rcpt: bytes = b"pq@test.example.com") -> None:
        assert self.say(b"HELO client.example.net\r\n").startswith(b"250 ")
        assert self.say(b"MAIL FROM:<someone@example.org>\r\n").startswith(b"250 ")
        assert self.say(b"RCPT TO:<" + rcpt + b">\r\n").startswith(b"250 ")
        assert self.say(b"DATA\r\n").startswith(b"354 ")

    def quit(self) -> tuple[int, bytes]:
        assert self.say(b"QUIT\r\n").startswith(b"221 ")
        self.sock.close()
        _, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.sock.close()
        self.proc.communicate(timeout=30)


def _forks(trace: Path) -> list[str]:
    return [line for line in trace.read_text().splitlines() if FORKS.match(line)]


def _drops(home: QHome) -> list[str]:
    return sorted(os.listdir(home.path / "maildrop")) if (home.path / "maildrop").exists() else []


def test_smtpd_queues_through_qmail_queued_without_a_qmail_queue_process(root_home: QHome, server: Server) -> None:
    _need_strace()
    trace = world_dir() / "strace.out"
    trace.parent.chmod(0o777)
    c = Smtpd(root_home, trace)
    try:
        c.start_data()
        reply = c.say(b"Subject: direct\r\n\r\nhello\r\n.\r\n")
        m = re.fullmatch(rb"250 ok \d+ qp (\d+)\r\n", reply)
        assert m, reply
        code, err = c.quit()
    finally:
        c.close()
    assert code == 0, err
    assert _forks(trace) == [], trace.read_text()
    # One pid named in the reply, the Received line and `p`: qmail-smtpd's own.
    (name,) = files(root_home.queue)["todo"]
    num = int(name)
    mess = (root_home.queue / "mess" / str(num % 23) / name).read_bytes()
    rm = RECEIVED.match(mess)
    assert rm and rm.group(2) == b"invoked from network", mess[:200]
    assert int(rm.group(1)) == int(m.group(1))
    assert mess[rm.end():].startswith(b"Received: from unknown (HELO client.example.net) (192.0.2.7)\n  by 192.0.2.1 with SMTP; ")
    assert mess.endswith(b"Subject: direct\n\nhello\n")
    env = parse_todo((root_home.queue / "todo" / name).read_bytes())
    assert env.uid == pwd.getpwnam("qmaild").pw_uid and env.pid == int(m.group(1))
    assert env.sender == b"someone@example.org" and env.recipients == [b"pq@test.example.com"]
    assert _drops(root_home) == []


def test_smtpd_without_qmail_queued_starts_qmail_queue_and_drops(root_home: QHome) -> None:
    _need_strace()
    trace = world_dir() / "strace.out"
    trace.parent.chmod(0o777)
    c = Smtpd(root_home, trace)
    try:
        c.start_data()
        assert c.say(b"Subject: dropped\r\n\r\nhello\r\n.\r\n").startswith(b"250 ok ")
        code, err = c.quit()
    finally:
        c.close()
    assert code == 0, err
    assert len(_forks(trace)) == 1, trace.read_text()  # qmail-queue, as before
    (drop,) = _drops(root_home)
    assert drop.startswith("m")
    assert (root_home.path / "maildrop" / drop).stat().st_uid == pwd.getpwnam("qmaild").pw_uid
    assert files(root_home.queue)["mess"] == []


def _being_queued(home: QHome) -> bool:
    return bool(files(home.queue)["mess"])


def test_server_killed_mid_message_is_a_temporary_failure(root_home: QHome, server: Server) -> None:
    c = Smtpd(root_home)
    try:
        c.start_data()
        c.sock.sendall(b"Subject: cut\r\n\r\n" + b"line\r\n" * 100)
        _wait(lambda: _being_queued(root_home), 10, "the server's child to start the message")
        server.kill()
        c.sock.sendall(b"x" * 70 + b"\r\n" * 2000 + b"last\r\n.\r\n")  # more than a pipe holds
        reply = c.reply()
        assert reply.startswith(b"451 "), reply
        code, err = c.quit()
    finally:
        c.close()
    assert code == 0, err
    assert files(root_home.queue)["todo"] == [] and files(root_home.queue)["intd"] == []
    assert _drops(root_home) == []


def test_client_killed_mid_message_queues_nothing(root_home: QHome, server: Server) -> None:
    c = Smtpd(root_home)
    try:
        c.start_data()
        c.sock.sendall(b"Subject: cut\r\n\r\n" + b"line\r\n" * 100)
        _wait(lambda: _being_queued(root_home), 10, "the server's child to start the message")
        c.proc.kill()
        c.proc.wait(timeout=10)
    finally:
        c.close()
    # The server's child sees its client hang up and takes the message back.
    _wait(lambda: not any(files(root_home.queue)[d] for d in ("mess", "intd", "pid", "todo")), 10,
          "the aborted message to be removed")
    assert _drops(root_home) == []
    assert server.proc.poll() is None


def _run_qq(home: QHome, code: str, user: str = TEST_USER) -> subprocess.CompletedProcess[bytes]:
    prog = (f"import os, sys; sys.path.insert(0, {str(ROOT / 'src')!r}); "
            f"os.environ['QMAILHOME'] = {str(home.path)!r}; " + code)
    return subprocess.run([sys.executable, "-IS", "-c", prog], capture_output=True, env=ENV, timeout=60,
                          **_as(user))  # type: ignore[call-overload]


def test_qq_hands_over_in_process_and_passes_exit_codes(root_home: QHome, server: Server) -> None:
    """QQ connects itself (its pid is the queue's qp), imports no socket module, and passes exit codes."""
    code = ("from pyqmail.queue.qq import QQ; "
            "q = QQ(); q.write(b'Subject: qq\\n\\nx\\n'); r = q.close(b'a@b', [b'c@d']); "
            "q2 = QQ(); q2.write(b'x\\n'); r2 = q2.close(b'a@b', [b'c' * 2000 + b'@d']); "
            "q3 = QQ(); q3.write(b'x\\n'); q3.fail(); r3 = q3.close(b'a@b', [b'c@d']); "
            "print(q.pid == os.getpid(), r, q.code, q.custom, q2.code, r2[:1], q3.code, r3[:1], "
            "[m for m in ('socket', 'enum', 'selectors') if m in sys.modules])")
    r = _run_qq(root_home, code)
    assert r.returncode == 0, r
    assert r.stdout.decode().split(" ", 8) == ["True", "b''", "0", "b''", "11", "b'D'", "54", "b'Z'", "[]\n"], r
    (name,) = files(root_home.queue)["todo"]
    env = parse_todo((root_home.queue / "todo" / name).read_bytes())
    assert env.uid == pwd.getpwnam(TEST_USER).pw_uid and env.recipients == [b"c@d"]


def _run_qq_as_root(home: QHome) -> subprocess.CompletedProcess[bytes]:
    code = ("from pyqmail.queue.qq import QQ; "
            "q = QQ(); q.write(b'x\\n'); r = q.close(b'a@b', [b'c@d']); print(q.pid != os.getpid(), r)")
    return subprocess.run([sys.executable, "-IS", "-c", f"import os, sys; sys.path.insert(0, {str(ROOT / 'src')!r}); "
                           f"os.environ['QMAILHOME'] = {str(home.path)!r}; " + code],
                          capture_output=True, env=ENV, timeout=60)


def test_qq_as_root_hands_over_with_uid_0(root_home: QHome, server: Server) -> None:
    """Root's QQ also hands the message to qmail-queued (no fork): uid 0 in todo/N and the Received line."""
    r = _run_qq_as_root(root_home)
    assert (r.returncode, r.stdout) == (0, b"False b''\n"), r
    (name,) = files(root_home.queue)["todo"]
    assert parse_todo((root_home.queue / "todo" / name).read_bytes()).uid == 0
    (mess,) = files(root_home.queue)["mess"]
    assert b"invoked by uid 0);" in (root_home.queue / "mess" / mess).read_bytes().split(b"\n", 1)[0]


def test_qq_as_root_without_qmail_queued_starts_qmail_queue(root_home: QHome) -> None:
    """Without qmail-queued, root writes the queue itself through qmail-queue: QQ starts it (its pid is a child's)."""
    r = _run_qq_as_root(root_home)
    assert (r.returncode, r.stdout) == (0, b"True b''\n"), r
    (name,) = files(root_home.queue)["todo"]
    assert parse_todo((root_home.queue / "todo" / name).read_bytes()).uid == 0
    assert not _drops(root_home)
