"""Review of session 6: tcpserver's reused qmail-smtpd workers, attacked (brief r6, issue 17).

Each test drives a real tcpserver and qmail-smtpd on 127.0.0.1 (the harness of
test_tcpserver_reuse) and checks that a connection served by a reused worker
finds what a child per connection gives it, and that a client or a worker
cannot make tcpserver misbehave for the next client.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import time
from pathlib import Path

import pytest

from conftest import QHome
from test_tcpserver_reuse import DEADLINE, FQDN, Tcpserver, _pid_of
from ucspikit import rules_file


@pytest.fixture
def home(qhome: QHome) -> QHome:
    qhome.control("rcpthosts", FQDN + "\n")
    return qhome


def _children(pid: int) -> list[int]:
    """The live children of pid (zombies included)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE, source_address=(source, 0))
    return s


def _read_reply(s: socket.socket) -> bytes:
    out = b""
    while not re.search(rb"(^|\r\n)\d\d\d [^\r\n]*\r\n$", out):
        chunk = s.recv(65536)
        if not chunk:
            return out
        out += chunk
    return out


def _reset(s: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a vanished client's kernel does."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def _dialogues(server: Tcpserver) -> None:
    """The same client dialogues, whatever tcpserver's mode; each ends before the next begins."""
    port = server.port
    n = 0

    def done() -> None:
        nonlocal n
        n += 1
        server.wait_for(r"tcpserver: end \d+ status \d+", n)

    # QUIT
    s = _connect(port)
    _read_reply(s)
    s.sendall(b"HELO x\r\nQUIT\r\n")
    while s.recv(4096):
        pass
    s.close()
    done()
    # end of input without QUIT
    s = _connect(port)
    _read_reply(s)
    s.shutdown(socket.SHUT_WR)
    while s.recv(4096):
        pass
    s.close()
    done()
    # a denied address
    s = _connect(port, "127.0.0.3")
    assert s.recv(4096) == b""
    s.close()
    done()
    # RST in the middle of DATA
    s = _connect(port)
    _read_reply(s)
    s.sendall(b"HELO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@" + FQDN.encode() + b">\r\nDATA\r\n")
    got = b""
    while b"354 " not in got:
        chunk = s.recv(4096)
        assert chunk, got
        got += chunk
    s.sendall(b"Subject: x\r\n\r\nhalf a message")
    _reset(s)
    done()
    # silent past timeoutsmtpd
    s = _connect(port)
    _read_reply(s)
    assert _read_reply(s).startswith(b"451 ")
    s.close()
    done()


def _normal(lines: list[str]) -> list[str]:
    """The log with pids and ports taken out: what must not depend on tcpserver's mode."""
    out = []
    for x in lines:
        x = re.sub(r"^(tcpserver: (?:pid|ok|deny|end)) \d+", r"\1 P", x)
        x = re.sub(r":127\.0\.0\.1:\d+ ", ":127.0.0.1:PORT ", x)
        x = re.sub(r":\d+$", ":PORT", x)
        out.append(x)
    return out


def test_log_lines_and_statuses_are_those_of_a_child_per_connection(home: QHome, tmp_path: Path) -> None:
    home.control("timeoutsmtpd", "1\n")
    rules = rules_file(tmp_path, "127.0.0.3:deny\n:allow\n")
    logs = {}
    for reuse in ("0", "100"):
        (tmp_path / reuse).mkdir()
        server = Tcpserver(home, tmp_path / reuse, "-x", str(rules), env={"PYQMAIL_TCPSERVER_REUSE": reuse})
        try:
            _dialogues(server)
        finally:
            server.close()
        logs[reuse] = _normal(server.lines())
    assert logs["100"] == logs["0"]
    ends = [x for x in logs["0"] if x.startswith("tcpserver: end")]
    assert ends == ["tcpserver: end P status %d" % s for s in (0, 256, 25600, 256, 256)]


def test_a_client_that_never_reads_is_ended_by_timeoutsmtpd(home: QHome, tmp_path: Path) -> None:
    """The worker blocked writing replies nobody reads still ends the connection, and serves the next."""
    home.control("timeoutsmtpd", "1\n")
    server = Tcpserver(home, tmp_path)
    try:
        s = _connect(server.port)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
        started = time.monotonic()
        sent = 0
        while time.monotonic() - started < 3:
            try:
                sent += s.send(b"NOOP\r\n" * 1000)
            except BlockingIOError:
                time.sleep(0.01)
            except ConnectionResetError:
                break  # ended by the timeout, with NOOPs unread
        assert sent > 100000  # the worker read on while its replies piled up
        server.wait_for(r"tcpserver: end \d+ status 256")
        assert time.monotonic() - started < 10
        _reset(s)
        c = server.connect()
        assert c.reply().startswith(b"220 ")
        c.quit()
        server.wait_for(r"tcpserver: end \d+ status 0")
    finally:
        server.close()
    assert len({m.group(1) for m in server.wait_for(r"tcpserver: pid (\d+) from .*", 2)}) == 1


def test_no_process_of_a_session_outlives_it_in_the_worker(home: QHome, tmp_path: Path) -> None:
    """After a session with AUTH (checkprogram) and an abandoned DATA (qmail-queue), the worker has no child."""
    server = Tcpserver(home, tmp_path, env={"SMTPAUTH": "", "PYQMAIL_SMTPD_AUTH_DELAY": "0"},
                       argv=("/bin/false",))
    try:
        s = _connect(server.port)
        _read_reply(s)
        s.sendall(b"EHLO x\r\n")
        _read_reply(s)
        s.sendall(b"AUTH PLAIN AHUAcA==\r\n")
        assert _read_reply(s).startswith(b"535 ")
        s.sendall(b"MAIL FROM:<a@b>\r\nRCPT TO:<u@" + FQDN.encode() + b">\r\nDATA\r\n")
        got = b""
        while b"354 " not in got:
            chunk = s.recv(4096)
            assert chunk, got
            got += chunk
        s.sendall(b"Subject: x\r\n\r\nhalf")
        _reset(s)
        server.wait_for(r"tcpserver: end \d+ status 256")
        worker = _pid_of(server, 1)
        assert _children(worker) == []
        c = server.connect()
        assert c.reply().startswith(b"220 ")
        c.quit()
    finally:
        server.close()


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_the_parent_keeps_no_descriptor_and_little_memory_over_1000_connections(home: QHome,
                                                                                tmp_path: Path) -> None:
    server = Tcpserver(home, tmp_path, "-c", "4", env={"PYQMAIL_TCPSERVER_REUSE": "7"})
    parent = server.proc.pid
    try:
        def churn(n: int) -> None:
            socks = []
            for i in range(n):
                s = _connect(server.port)
                s.sendall(b"QUIT\r\n")
                socks.append(s)
                if len(socks) == 3 or i == n - 1:  # 3 at a time: workers come, retire, go idle
                    for x in socks:
                        while x.recv(4096):
                            pass
                        x.close()
                    socks = []

        churn(50)
        server.wait_for(r"tcpserver: end \d+ status 0", 50)
        fds, rss = _fd_count(parent), _rss_kb(parent)
        churn(1000)
        server.wait_for(r"tcpserver: end \d+ status 0", 1050)
        server.wait_for(r"tcpserver: status: 0/4", 1)
        assert _fd_count(parent) <= fds + 4  # at most 4 workers: one pair end each
        grown = _rss_kb(parent) - rss
        assert grown < 2048, grown
        assert len(_children(parent)) <= 4
    finally:
        server.close()
    ends = [x for x in server.lines() if x.startswith("tcpserver: end")]
    assert len(ends) == 1050 and all(x.endswith(" status 0") for x in ends)
    counts = [int(m.group(1)) for m in (re.fullmatch(r"tcpserver: status: (\d+)/4", x) for x in server.lines())
              if m]
    assert max(counts) <= 4 and counts[-1] == 0


def _steal_fd(pid: int, fd: int) -> int:
    """A copy of descriptor fd of process pid (pidfd_getfd, root): what a same-uid intruder could hold."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(434, pid, 0)  # pidfd_open
    assert pidfd >= 0, os.strerror(ctypes.get_errno())
    try:
        got = libc.syscall(438, pidfd, fd, 0)  # pidfd_getfd
        assert got >= 0, os.strerror(ctypes.get_errno())
        return int(got)
    finally:
        os.close(pidfd)


def _pair_fd(worker: int) -> int:
    """The worker's end of its pair to tcpserver: its only socket while it is idle."""
    fds = [int(n) for n in os.listdir(f"/proc/{worker}/fd")
           if os.readlink(f"/proc/{worker}/fd/{n}").startswith("socket:")]
    assert len(fds) == 1, fds
    return fds[0]


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


@pytest.mark.skipif(os.geteuid() != 0, reason="pidfd_getfd of another process needs root")
def test_a_report_from_an_idle_worker_does_not_make_tcpserver_spin(home: QHome, tmp_path: Path) -> None:
    """A worker that speaks while idle (garbage, a second report) is let go, not polled for ever."""
    server = Tcpserver(home, tmp_path)
    try:
        c = server.connect()
        c.reply()
        c.quit()
        server.wait_for(r"tcpserver: end \d+ status 0")
        worker = _pid_of(server, 1)
        fd = _steal_fd(worker, _pair_fd(worker))
        try:
            os.write(fd, b"E\0\0\0\0")
            before = _cpu_ticks(server.proc.pid)
            time.sleep(1.0)  # what the parent does meanwhile is the point: no clock to inject
            spent = _cpu_ticks(server.proc.pid) - before
        finally:
            os.close(fd)
        assert spent < 30, f"tcpserver used {spent} ticks of CPU in 1 s with a worker idle"
        c = server.connect()
        assert c.reply().startswith(b"220 ")
        c.quit()
        ends = server.wait_for(r"tcpserver: end \d+ status 0", 2)
    finally:
        server.close()
    assert len(ends) == 2 and not any(x.startswith("tcpserver: end") and "status 0" not in x
                                      for x in server.lines())


def test_an_idle_worker_let_go_is_not_counted_as_a_connection_end(home: QHome, tmp_path: Path) -> None:
    """A worker let go while idle ends no connection: no `end` line, and -c still counts the live one."""
    server = Tcpserver(home, tmp_path, "-c", "2", env={"PYQMAIL_TCPSERVER_IDLE": "0.3"})
    try:
        held = server.connect()  # a connection that stays, in worker A
        held.reply()
        c = server.connect()  # worker B: served, then idle, then let go
        c.reply()
        c.quit()
        server.wait_for(r"tcpserver: end \d+ status 0")
        b = _pid_of(server, 2)
        deadline = time.monotonic() + DEADLINE
        while Path(f"/proc/{b}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{b}").exists()
        # Two more at once: with the held one that is 3 for -c 2, so the second must wait.
        d = server.connect()
        assert d.reply().startswith(b"220 ")
        e = server.connect()
        e.sock.settimeout(1.0)
        with pytest.raises(socket.timeout):
            e.reply()
        held.quit()
        e.sock.settimeout(DEADLINE)
        assert e.reply().startswith(b"220 ")
        d.quit()
        e.quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 4)
    finally:
        server.close()
    ends = [x for x in server.lines() if x.startswith("tcpserver: end")]
    assert len(ends) == 4, server.lines()
    counts = [x for x in server.lines() if x.startswith("tcpserver: status")]
    assert "tcpserver: status: 3/2" not in counts


def test_nothing_of_a_session_reaches_the_next_in_the_worker(home: QHome, tmp_path: Path) -> None:
    """A rule's variable, AUTH's RELAYCLIENT and TCPREMOTEINFO, qmail-spp's S and U and SMTPHELOHOST, and
    commands pipelined after QUIT: none reaches the next connection served by the same worker."""
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    plugin = tmp_path / "plugin"
    plugin.write_text('#!/bin/sh\nenv > "%s/$TCPREMOTEIP.$$"\n'
                      'if [ "$TCPREMOTEIP" = 127.0.0.2 ]; then printf "SLEAK=1\\nUKEEP\\n"; fi\n'
                      'echo N\n' % dumps)
    plugin.chmod(0o755)
    home.control("smtpplugins", f"[helo]\n{plugin}\n")
    rules = rules_file(tmp_path, '127.0.0.2:allow,FOO="bar"\n:allow\n')
    server = Tcpserver(home, tmp_path, "-x", str(rules), env={"SMTPAUTH": "", "KEEP": "1"}, argv=("/bin/true",))
    try:
        c = server.connect("127.0.0.2")
        c.reply()
        assert c.say(b"AUTH PLAIN AHUAcA==").startswith(b"235 ")
        assert c.say(b"HELO first").startswith(b"250 ")
        c.sock.sendall(b"QUIT\r\nHELO pipelined\r\n")
        assert c.reply().startswith(b"221 ")
        while c.sock.recv(4096):
            pass
        c.sock.close()
        server.wait_for(r"tcpserver: end \d+ status 0")
        c = server.connect("127.0.0.1")
        c.reply()
        assert c.say(b"HELO second").startswith(b"250 ")
        assert c.say(b"MAIL FROM:<a@b>").startswith(b"250 ")
        assert c.say(b"RCPT TO:<x@elsewhere.example>").startswith(b"553 ")  # no relaying left over
        c.quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 2)
    finally:
        server.close()
    assert _pid_of(server, 1) == _pid_of(server, 2)
    first = [p for p in dumps.iterdir() if p.name.startswith("127.0.0.2.")]
    second = [p for p in dumps.iterdir() if p.name.startswith("127.0.0.1.")]
    assert len(first) == 1 and len(second) == 1, sorted(p.name for p in dumps.iterdir())
    env1 = dict(x.split("=", 1) for x in first[0].read_text().splitlines() if "=" in x)
    env = dict(x.split("=", 1) for x in second[0].read_text().splitlines() if "=" in x)
    assert env1["FOO"] == "bar" and env1["TCPREMOTEINFO"] == "u" and "RELAYCLIENT" in env1
    for name in ("FOO", "LEAK", "RELAYCLIENT", "SMTPAUTHUSER"):
        assert name not in env, (name, env)
    assert env["KEEP"] == "1" and env["SMTPHELOHOST"] == "second" and env["TCPREMOTEIP"] == "127.0.0.1"
    assert env.get("TCPREMOTEINFO", "") != "u"


def test_starttls_then_vanish_leaves_the_next_session_plain(home: QHome, tmp_path: Path) -> None:
    """A client that vanishes after STARTTLS (before and after its handshake): the worker's next session
    is plain text from its first byte, and its own STARTTLS works."""
    import ssl

    from tlskit import make_ca, make_leaf

    ca = make_ca(tmp_path, "ca")
    leaf = make_leaf(tmp_path, "leaf", ca, [FQDN])
    (home.path / "control" / "servercert.pem").write_bytes(leaf.both.read_bytes())
    ctx = ssl.create_default_context(cafile=str(ca.cert))
    server = Tcpserver(home, tmp_path)
    try:
        s = _connect(server.port)  # STARTTLS, then gone before the handshake
        _read_reply(s)
        s.sendall(b"EHLO x\r\nSTARTTLS\r\n")
        got = b""
        while b"220 " not in got.split(b"\r\n250 ", 1)[-1]:
            got += s.recv(4096)
        _reset(s)
        server.wait_for(r"tcpserver: end \d+ status \d+", 1)
        s = _connect(server.port)  # STARTTLS and the handshake, then gone mid-session
        _read_reply(s)
        s.sendall(b"EHLO x\r\n")
        _read_reply(s)
        s.sendall(b"STARTTLS\r\n")
        assert _read_reply(s).startswith(b"220 ")
        t = ctx.wrap_socket(s, server_hostname=FQDN)
        t.sendall(b"EHLO y\r\n")
        assert b"250" in t.recv(4096)
        t.sendall(b"MAIL FROM:<a@b>\r\n")
        _reset(t)
        server.wait_for(r"tcpserver: end \d+ status \d+", 2)
        c = server.connect()
        assert c.reply().startswith(b"220 ")
        ehlo = c.say(b"EHLO z")
        assert b"STARTTLS" in ehlo
        c.sock.sendall(b"STARTTLS\r\n")
        assert c.reply().startswith(b"220 ")
        t = ctx.wrap_socket(c.sock, server_hostname=FQDN)
        t.sendall(b"QUIT\r\n")
        assert t.recv(4096).startswith(b"221 ")
        t.close()
        ends = server.wait_for(r"tcpserver: end (\d+) status (\d+)", 3)
    finally:
        server.close()
    assert len({m.group(1) for m in ends}) == 1  # the same worker served all three
    assert [m.group(2) for m in ends] == ["256", "256", "0"]


def test_a_stopped_idle_worker_holds_the_next_connection_until_continued(home: QHome, tmp_path: Path) -> None:
    """Finding (not fixed, see DESIGN): the warmest idle worker gets the next connection even when it is
    SIGSTOPped; that client waits until SIGCONT (a child per connection has no idle process to stop).
    The connection is not lost, and one that comes meanwhile gets a new worker."""
    server = Tcpserver(home, tmp_path)
    try:
        c = server.connect()
        c.reply()
        c.quit()
        server.wait_for(r"tcpserver: end \d+ status 0")
        worker = _pid_of(server, 1)
        os.kill(worker, signal.SIGSTOP)
        try:
            held = server.connect()
            held.sock.settimeout(1.0)
            with pytest.raises(socket.timeout):
                held.reply()
            other = server.connect()
            assert other.reply().startswith(b"220 ")
            other.quit()
        finally:
            os.kill(worker, signal.SIGCONT)
        held.sock.settimeout(DEADLINE)
        assert held.reply().startswith(b"220 ")
        held.quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 3)
    finally:
        server.close()
    # the stopped worker logs `pid P from` for the held connection only once continued
    assert _pid_of(server, 2) != worker and _pid_of(server, 3) == worker


@pytest.mark.skipif(os.geteuid() != 0, reason="-u needs root")
def test_a_working_directory_the_user_cannot_reenter(home: QHome, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """tcpserver started in a directory its -u user may not search (a root-only service directory):
    a child per connection just runs there; a worker cannot chdir back after qmail-smtpd left it, and
    must not drop the connections after its first."""
    import pwd

    user = pwd.getpwnam("pqtest")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    monkeypatch.chdir(private)
    server = Tcpserver(home, tmp_path, "-u", str(user.pw_uid), "-g", str(user.pw_gid))
    try:
        for _ in range(3):
            c = server.connect()
            assert c.reply().startswith(b"220 "), server.lines()
            assert c.say(b"HELO x").startswith(b"250 ")
            c.quit()
        ends = server.wait_for(r"tcpserver: end (\d+) status (\d+)", 3)
    finally:
        server.close()
    assert [m.group(2) for m in ends] == ["0", "0", "0"], server.lines()
    assert not [x for x in server.lines() if "warning" in x]


def test_programs_start_in_tcpserver_s_directory(home: QHome, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """qmail-smtpd's preload (its warm-up sessions chdir to the home) must not move tcpserver: a program
    named relative to the run script's directory is found, and starts there, as with ucspi-tcp."""
    run = tmp_path / "run"
    run.mkdir()
    wrap = run / "wrap"
    wrap.write_text('#!/bin/sh\npwd > "$0.pwd"\nexec "$@"\n')
    wrap.chmod(0o755)
    monkeypatch.chdir(run)
    import subprocess

    with open(tmp_path / "log", "wb") as err:
        proc = subprocess.Popen([str(home.bin("tcpserver")), "-1", "-v", "-HR", "-l", FQDN, "127.0.0.1", "0",
                                 "./wrap", str(home.bin("qmail-smtpd"))],
                                stdout=subprocess.PIPE, stderr=err, env={"PATH": "/usr/bin:/bin"})
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        s = _connect(port)
        assert _read_reply(s).startswith(b"220 "), (tmp_path / "log").read_text()
        s.sendall(b"QUIT\r\n")
        while s.recv(4096):
            pass
        s.close()
    finally:
        proc.terminate()
        proc.wait(DEADLINE)
        assert proc.stdout is not None
        proc.stdout.close()
    assert (run / "wrap.pwd").read_text().strip() == str(run)


def test_tcpserver_s_directory_removed_while_it_runs(home: QHome, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The run directory removed (a service directory replaced): a child would start in the removed
    directory; a worker cannot go back there, and must still serve the next connections."""
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    server = Tcpserver(home, tmp_path)
    monkeypatch.chdir(tmp_path)
    run.rmdir()
    try:
        for _ in range(3):
            c = server.connect()
            assert c.reply().startswith(b"220 "), server.lines()
            c.quit()
        ends = server.wait_for(r"tcpserver: end (\d+) status (\d+)", 3)
    finally:
        server.close()
    assert [m.group(2) for m in ends] == ["0", "0", "0"], server.lines()
    assert not [x for x in server.lines() if "warning" in x]


def test_greylisting_does_not_retire_the_worker_after_each_connection(home: QHome, tmp_path: Path) -> None:
    """greylist's sqlite3 connection sits in a reference cycle: open after the session until collected.
    The worker collects before it counts descriptors, instead of retiring (a fork per connection again)."""
    home.control("greylist", "300\n")
    server = Tcpserver(home, tmp_path, env={"GREYLISTDB": str(tmp_path / "triplets.sqlite")})
    try:
        for i in range(3):
            c = server.connect()
            c.reply()
            c.say(b"HELO x")
            c.say(b"MAIL FROM:<a%d@b.example>" % i)
            assert c.say(b"RCPT TO:<u@" + FQDN.encode() + b">").startswith(b"451 ")
            c.quit()
        ends = server.wait_for(r"tcpserver: end (\d+) status (\d+)", 3)
    finally:
        server.close()
    assert len({m.group(1) for m in ends}) == 1, server.lines()


def test_auth_failures_and_bad_recipients_count_per_session(home: QHome, tmp_path: Path) -> None:
    """AUTHFAILURES and BRTLIMIT count within a session: the worker's next session starts from zero."""
    home.control("badrcptto", f"bad@{FQDN}\n")
    server = Tcpserver(home, tmp_path, env={"SMTPAUTH": "", "PYQMAIL_SMTPD_AUTH_DELAY": "0", "AUTHFAILURES": "2",
                                            "BRTLIMIT": "2"}, argv=("/bin/false",))
    bad = b"RCPT TO:<bad@" + FQDN.encode() + b">"
    try:
        for _ in range(2):
            c = server.connect()
            c.reply()
            c.say(b"EHLO x")
            assert c.say(b"AUTH PLAIN AHUAcA==").startswith(b"535 ")
            c.say(b"MAIL FROM:<a@b.example>")
            assert c.say(bad).startswith(b"5")
            c.quit()
        c = server.connect()  # the same worker: now each limit is reached within the session
        c.reply()
        c.say(b"EHLO x")
        assert c.say(b"AUTH PLAIN AHUAcA==").startswith(b"535 ")
        assert c.say(b"AUTH PLAIN AHUAcA==").startswith(b"421 ")
        c.sock.close()
        server.wait_for(r"tcpserver: end \d+ status 256")  # the 421 comes before the worker is idle again
        c = server.connect()
        c.reply()
        c.say(b"HELO x")
        c.say(b"MAIL FROM:<a@b.example>")
        assert c.say(bad).startswith(b"5")
        assert c.say(bad).startswith(b"421 ")
        c.sock.close()
        ends = server.wait_for(r"tcpserver: end (\d+) status (\d+)", 4)
    finally:
        server.close()
    assert len({m.group(1) for m in ends}) == 1


def test_sigint_to_an_idle_worker_drops_no_connection(home: QHome, tmp_path: Path) -> None:
    """SIGINT to an idle worker (a ^C in the terminal that runs tcpserver): it goes quietly, as a
    program would die of the signal; no `dropping connection` warning for a connection it does not have."""
    server = Tcpserver(home, tmp_path)
    try:
        c = server.connect()
        c.reply()
        c.quit()
        server.wait_for(r"tcpserver: end \d+ status 0")
        worker = _pid_of(server, 1)
        os.kill(worker, signal.SIGINT)
        deadline = time.monotonic() + DEADLINE
        while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        c = server.connect()
        assert c.reply().startswith(b"220 ")
        c.quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 2)
    finally:
        server.close()
    assert not [x for x in server.lines() if "warning" in x], server.lines()
