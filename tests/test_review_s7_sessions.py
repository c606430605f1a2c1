"""Hostile review of session 7: several connections served at once by one tcpserver worker.

Every test here puts its connections in one worker ($PYQMAIL_TCPSERVER_SPREAD=1)
and interleaves them, looking for what one session can see or hold of another:
module state set per connection (SPF's DNS servers), a wait outside
pyqmail.wait (the AUTH checkprogram), what a program a session starts
inherits, a client that never reads, the parent's accounting when a worker
retires with sessions still running, and a child forked by a session.
See docs/DESIGN.md "Review of session 7 (several connections per worker)".
"""

from __future__ import annotations

import os
import select
import signal
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from conftest import QHome
from remotekit import DnsServer
from test_smtpd_tls import client_ctx, pki, tls_home  # noqa: F401 - fixtures
from test_tcpserver_reuse import DEADLINE, FQDN, Client, Tcpserver
from ucspikit import rules_file

ONE = {"PYQMAIL_TCPSERVER_SPREAD": "1", "PYQMAIL_TCPSERVER_SESSIONS": "32"}


@pytest.fixture
def home(qhome: QHome) -> QHome:
    qhome.control("rcpthosts", FQDN + "\n")
    return qhome


def _pids(server: Tcpserver, count: int) -> list[int]:
    return [int(m.group(1)) for m in server.wait_for(r"tcpserver: pid (\d+) from .*", count)]


def _fds(pid: int) -> dict[int, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            pass
    return out


def _two(server: Tcpserver) -> tuple[Client, Client]:
    """Two greeted connections, served by one worker."""
    first = server.connect()
    first.reply()
    second = server.connect()
    second.reply()
    assert len(set(_pids(server, 2))) == 1
    return first, second


def _await(path: Path) -> None:
    """Wait (bounded) until path exists: a program a session started has got that far."""
    deadline = time.monotonic() + DEADLINE
    while not path.exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _answers_at_once(c: Client, what: str) -> None:
    """c's session answers a NOOP within a second while another session of its worker waits on what."""
    started = time.monotonic()
    assert c.say(b"NOOP").startswith(b"250 ")
    assert time.monotonic() - started < 1.0, f"{what} held the other session"


def _queued(home: QHome) -> list[bytes]:
    return [p.read_bytes() for p in sorted((home.queue / "mess").rglob("*")) if p.is_file()]


# -- module state set per connection ---------------------------------------------------


def test_spf_asks_each_sessions_own_dnscacheip(home: QHome, tmp_path: Path) -> None:
    """$DNSCACHEIP from the rules, different per client: each session's SPF check asks its own servers
    (spfdns keeps the servers in module state, set when a session starts)."""
    failing = DnsServer({("x.example", "TXT"): ['"v=spf1 -all"']})
    passing = DnsServer({("x.example", "TXT"): ['"v=spf1 +all"']})
    home.control("spfbehavior", "3\n")
    rules = rules_file(tmp_path, f'127.0.0.2:allow,DNSCACHEIP="127.0.0.1:{failing.port}"\n'
                                 f'127.0.0.3:allow,DNSCACHEIP="127.0.0.1:{passing.port}"\n:allow\n')
    server = Tcpserver(home, tmp_path, "-x", str(rules), env=ONE)
    try:
        a = server.connect("127.0.0.2")
        a.reply()
        b = server.connect("127.0.0.3")  # started after a: the servers are b's now
        b.reply()
        assert len(set(_pids(server, 2))) == 1
        for c, want in ((a, b"550 "), (b, b"250 "), (a, b"550 ")):
            assert c.say(b"MAIL FROM:<s@x.example>").startswith(b"250 ")
            assert c.say(b"RCPT TO:<u@" + FQDN.encode() + b">").startswith(want)
            c.say(b"RSET")
        a.quit()
        b.quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 2)
    finally:
        server.close()
        failing.close()
        passing.close()
    assert failing.queries and passing.queries


def test_auth_in_one_session_relays_for_that_session_only(home: QHome, tmp_path: Path) -> None:
    """AUTH sets RELAYCLIENT and TCPREMOTEINFO in its session's environment: the other session,
    interleaved with it, still may not relay, and each message's Received line is its own."""
    check = tmp_path / "check"
    check.write_text("#!/bin/sh\nexit 0\n")  # accepts everyone
    check.chmod(0o755)
    server = Tcpserver(home, tmp_path, env={**ONE, "SMTPAUTH": "", "PYQMAIL_SMTPD_AUTH_DELAY": "0"},
                       argv=(str(check),))
    try:
        authed, stranger = _two(server)
        assert authed.say(b"EHLO authed").startswith(b"250")
        assert stranger.say(b"EHLO stranger").startswith(b"250")
        assert authed.say(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==").startswith(b"235 ")  # \0alice\0secret
        for c, who in ((authed, b"alice"), (stranger, b"bob")):
            assert c.say(b"MAIL FROM:<" + who + b"@a.example>").startswith(b"250 ")
        assert stranger.say(b"RCPT TO:<x@far.example>").startswith(b"553 ")
        assert authed.say(b"RCPT TO:<x@far.example>").startswith(b"250 ")
        assert stranger.say(b"RCPT TO:<u@" + FQDN.encode() + b">").startswith(b"250 ")
        for c in (authed, stranger):
            assert c.say(b"DATA").startswith(b"354 ")
        for c, who in ((authed, b"alice"), (stranger, b"bob")):
            assert c.say(b"Subject: from " + who + b"\r\n\r\nx\r\n.").startswith(b"250 ok ")
        authed.quit()
        stranger.quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 2)
    finally:
        server.close()
    (a,) = [m for m in _queued(home) if b"Subject: from alice" in m]
    (b,) = [m for m in _queued(home) if b"Subject: from bob" in m]
    assert b"(HELO authed) (alice@127.0.0.1)\n  by " + FQDN.encode() + b" with ESMTPA;" in a, a
    assert b"(HELO stranger) (127.0.0.1)\n  by " + FQDN.encode() + b" with SMTP;" in b, b


# -- waits outside pyqmail.wait ---------------------------------------------------------


def test_a_slow_checkprogram_holds_neither_the_others_nor_their_sockets(home: QHome, tmp_path: Path) -> None:
    """AUTH's checkprogram runs 2 s: meanwhile the other session answers at once; the checkprogram
    has descriptors 0, 1, 2 and 3 only (no session's socket, not the worker's pair)."""
    fds = tmp_path / "fds"
    check = tmp_path / "check"
    check.write_text(f"#!/bin/sh\nls -l /proc/$$/fd > {fds}.tmp; mv {fds}.tmp {fds}\nsleep 2\nexit 1\n")
    check.chmod(0o755)
    server = Tcpserver(home, tmp_path, env={**ONE, "SMTPAUTH": "", "PYQMAIL_SMTPD_AUTH_DELAY": "0"},
                       argv=(str(check),))
    try:
        slow, other = _two(server)
        slow.sock.sendall(b"AUTH PLAIN AHUAcA==\r\n")  # \0u\0p
        _await(fds)
        _answers_at_once(other, "the checkprogram")
        assert slow.reply().startswith(b"535 ")
        slow.quit()
        other.quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 2)
    finally:
        server.close()
    listing = fds.read_text()
    assert "socket:" not in listing, listing  # others above 3 are the shell's own (its script)
    assert " 3 -> pipe:" in listing


def test_a_slow_qmailqueue_holds_no_other(home: QHome, tmp_path: Path) -> None:
    """A $QMAILQUEUE filter working 2 s (a scanner): qmail-smtpd waits for its answer (descriptor 6's
    end) through pyqmail.wait, and the other session answers meanwhile."""
    began = tmp_path / "began"
    slow = tmp_path / "slow-queue"
    slow.write_text(f"#!/bin/sh\ntouch {began}\nsleep 2\nexec {home.bin('qmail-queue')}\n")
    slow.chmod(0o755)
    server = Tcpserver(home, tmp_path, env={**ONE, "QMAILQUEUE": str(slow)})
    try:
        sender, other = _two(server)
        for line in (b"HELO x", b"MAIL FROM:<a@b.example>", b"RCPT TO:<u@" + FQDN.encode() + b">"):
            assert sender.say(line).startswith(b"250 ")
        assert sender.say(b"DATA").startswith(b"354 ")
        sender.sock.sendall(b"Subject: slow\r\n\r\nbody\r\n.\r\n")
        _await(began)
        _answers_at_once(other, "the $QMAILQUEUE program")
        assert sender.reply().startswith(b"250 ok ")
        sender.quit()
        other.quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 2)
    finally:
        server.close()
    assert any(b"Subject: slow" in m for m in _queued(home))


def test_a_big_message_into_a_slow_qmailqueue_holds_no_other(home: QHome, tmp_path: Path) -> None:
    """A 512 KiB message for a $QMAILQUEUE that reads nothing for 3 s: qmail-smtpd's writes into its
    pipe (64 KiB of buffer) wait through pyqmail.wait, and the other session answers meanwhile."""
    began = tmp_path / "began"
    slow = tmp_path / "slow-queue"
    slow.write_text(f"#!/bin/sh\ntouch {began}\nsleep 3\nexec {home.bin('qmail-queue')}\n")
    slow.chmod(0o755)
    server = Tcpserver(home, tmp_path, env={**ONE, "QMAILQUEUE": str(slow)})
    try:
        sender = server.connect()
        sender.reply()
        other = server.connect()
        other.reply()
        for line in (b"HELO x", b"MAIL FROM:<a@b.example>", b"RCPT TO:<u@" + FQDN.encode() + b">"):
            assert sender.say(line).startswith(b"250 ")
        assert sender.say(b"DATA").startswith(b"354 ")
        body = b"Subject: big\r\n\r\n" + (b"z" * 1000 + b"\r\n") * 512 + b".\r\n"
        writer = threading.Thread(target=sender.sock.sendall, args=(body,))
        writer.start()
        _await(began)
        time.sleep(0.5)  # the pipe is full by now; the filter still sleeps
        _answers_at_once(other, "the write into $QMAILQUEUE's pipe")
        writer.join(DEADLINE)
        assert sender.reply().startswith(b"250 ok ")
        sender.quit()
        other.quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 2)
    finally:
        server.close()
    (m,) = [m for m in _queued(home) if b"Subject: big" in m]
    assert m.count(b"z" * 1000 + b"\n") == 512


def test_an_ident_lookup_that_gets_no_answer_holds_no_other(home: QHome, tmp_path: Path) -> None:
    """tcpserver without -R asks the client's ident server (port 113) for TCPREMOTEINFO, up to -t seconds.
    A client whose ident server accepts and never answers: the worker's other sessions go on meanwhile."""
    mute = socket.socket()
    try:
        mute.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        mute.bind(("127.0.0.5", 113))
    except OSError as e:
        mute.close()
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"port 113 on 127.0.0.5: {e}")
    mute.listen(4)
    server = Tcpserver(home, tmp_path, "-r", "-t", "3", env=ONE)
    try:
        other = server.connect("127.0.0.6")  # no ident server there: refused at once
        other.reply()
        asking = server.connect("127.0.0.5")
        deadline = time.monotonic() + DEADLINE
        while not any(x.startswith("tcpserver: pid ") and x.endswith("127.0.0.5") for x in server.lines()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.2)  # the ident connection is accepted by the kernel; nobody answers it
        _answers_at_once(other, "the ident lookup")
        assert asking.reply().startswith(b"220 ")  # after -t's 3 seconds, without TCPREMOTEINFO
        assert len(set(_pids(server, 2))) == 1
        asking.quit()
        other.quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 2)
    finally:
        server.close()
        mute.close()


def test_programs_a_session_starts_get_no_other_sessions_socket(home: QHome, tmp_path: Path) -> None:
    """A qmail-spp plugin (posix_spawn) and the $QMAILQUEUE program (spawn) of one session, while
    two other sessions are open in the worker: neither holds any socket (their 0 and 1 are
    /dev/null or pipes, as qmail-spp and qmail-queue give them)."""
    listings = tmp_path / "fds"
    listings.mkdir()
    spp = home.path / "plugins" / "fds"
    spp.parent.mkdir(exist_ok=True)
    spp.write_text(f"#!/bin/sh\nls -l /proc/$$/fd > {listings}/spp\n")
    spp.chmod(0o755)
    home.control("smtpplugins", "[mail]\nplugins/fds\n")
    queue = tmp_path / "queue"
    queue.write_text(f"#!/bin/sh\nls -l /proc/$$/fd > {listings}/qmailqueue\nexec {home.bin('qmail-queue')}\n")
    queue.chmod(0o755)
    server = Tcpserver(home, tmp_path, env={**ONE, "QMAILQUEUE": str(queue)})
    try:
        others = [server.connect(), server.connect()]
        for c in others:
            c.reply()
        sender = server.connect()
        sender.reply()
        assert len(set(_pids(server, 3))) == 1
        for line in (b"HELO x", b"MAIL FROM:<a@b.example>", b"RCPT TO:<u@" + FQDN.encode() + b">"):
            assert sender.say(line).startswith(b"250 ")
        assert sender.say(b"DATA").startswith(b"354 ")
        assert sender.say(b"Subject: fds\r\n\r\nx\r\n.").startswith(b"250 ok ")
        for c in [sender, *others]:
            c.quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 3)
    finally:
        server.close()
    for name in ("spp", "qmailqueue"):
        listing = (listings / name).read_text()
        assert "socket:" not in listing, (name, listing)


def test_a_client_that_never_reads_holds_no_other(home: QHome, tmp_path: Path) -> None:
    """Pipelined commands whose replies are never read fill the socket's buffers: its session waits for
    POLLOUT in the hub, and the other session goes on."""
    server = Tcpserver(home, tmp_path, env=ONE)
    try:
        deaf, other = _two(server)
        deaf.sock.setblocking(False)
        sent = 0
        try:
            while sent < 16 << 20:
                sent += deaf.sock.send(b"NOOP\r\n" * 4096)
        except BlockingIOError:
            pass  # both directions full: the session is stuck writing replies
        deaf.sock.setblocking(True)
        for _ in range(3):
            assert other.say(b"NOOP").startswith(b"250 ")
        other.quit()
        deaf.sock.close()
        server.wait_for(r"tcpserver: end \d+ status \d+", 2)
    finally:
        server.close()


def test_greeting_delays_of_sessions_run_side_by_side(home: QHome, tmp_path: Path) -> None:
    """$SMTPD_GREETDELAY=1 for 4 connections of one worker: each waits its own second at the same
    time (the hub's timers), so all are greeted after about 1 s, not 4; an early talker among them
    is dropped without holding the others."""
    server = Tcpserver(home, tmp_path, env={**ONE, "SMTPD_GREETDELAY": "1", "DROP_PRE_GREET": "1"})
    try:
        started = time.monotonic()
        clients = [server.connect() for _ in range(4)]
        talker = server.connect()
        talker.sock.sendall(b"EHLO early\r\n")
        for c in clients:
            assert c.reply().startswith(b"220 ")
        elapsed = time.monotonic() - started
        assert 0.9 < elapsed < 2.5, elapsed
        assert len(set(_pids(server, 5))) == 1
        reply = talker.sock.recv(1000)
        assert reply.startswith(b"554 ") or reply == b"", reply
        talker.sock.close()
        for c in clients:
            c.quit()
        server.wait_for(r"tcpserver: end \d+ status \d+", 5)
    finally:
        server.close()


# -- data and envelopes ----------------------------------------------------------------


def test_two_data_phases_interleaved_chunk_by_chunk(home: QHome, tmp_path: Path) -> None:
    rules = rules_file(tmp_path, '127.0.0.2:allow,RELAYCLIENT=""\n:allow\n')
    server = Tcpserver(home, tmp_path, "-x", str(rules), env=ONE)
    try:
        one = server.connect("127.0.0.1")
        two = server.connect("127.0.0.2")
        for c, name in ((one, b"one"), (two, b"two")):
            c.reply()
            assert c.say(b"HELO " + name).startswith(b"250 ")
        assert one.say(b"MAIL FROM:<one@a.example>").startswith(b"250 ")
        assert two.say(b"MAIL FROM:<two@b.example>").startswith(b"250 ")
        assert one.say(b"RCPT TO:<u1@" + FQDN.encode() + b">").startswith(b"250 ")
        assert two.say(b"RCPT TO:<u2@far.example>").startswith(b"250 ")  # relaying: two's only
        assert one.say(b"DATA").startswith(b"354 ")
        assert two.say(b"DATA").startswith(b"354 ")
        for i in range(200):
            one.sock.sendall(b"one line %d " % i + b"x" * 500 + b"\r\n")
            two.sock.sendall(b"two line %d " % i + b"y" * 500 + b"\r\n")
        one.sock.sendall(b".\r\n")
        two.sock.sendall(b".\r\n")
        assert one.reply().startswith(b"250 ok ")
        assert two.reply().startswith(b"250 ok ")
        one.quit()
        two.quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 2)
    finally:
        server.close()
    (m1,) = [m for m in _queued(home) if b"one line 0 " in m]
    (m2,) = [m for m in _queued(home) if b"two line 0 " in m]
    assert b"two line" not in m1 and b"one line" not in m2
    assert m1.count(b"one line") == 200 and m2.count(b"two line") == 200
    assert b"(HELO one)" in m1 and b"(HELO two)" in m2  # each Received line names its own HELO
    envelopes = {p.read_bytes() for p in (home.queue / "todo").rglob("*") if p.is_file()} | \
        {p.read_bytes() for p in (home.queue / "info").rglob("*") if p.is_file()}
    joined = b"".join(envelopes)
    assert b"one@a.example" in joined and b"two@b.example" in joined


def test_two_bdat_transfers_interleaved_chunk_by_chunk(home: QHome, tmp_path: Path) -> None:
    """CHUNKING: each session's BDAT chunks (a CR LF split across chunks included) go to its own
    message, exactly, while the other session's chunks arrive between them."""
    home.control("chunking", "1\n")
    server = Tcpserver(home, tmp_path, env=ONE)
    try:
        pair = [server.connect(), server.connect()]
        for i, c in enumerate(pair):
            c.reply()
            assert b"CHUNKING" in c.say(b"EHLO b%d" % i)
            assert c.say(b"MAIL FROM:<b%d@a.example>" % i).startswith(b"250 ")
            assert c.say(b"RCPT TO:<u@" + FQDN.encode() + b">").startswith(b"250 ")
        for k in range(50):
            for i, c in enumerate(pair):
                chunk = (b"Subject: bdat %d\r\n\r\n" % i if k == 0 else b"") + b"s%d c%d " % (i, k) + b"q" * 3000 + b"\r"
                c.sock.sendall(b"BDAT %d\r\n" % len(chunk) + chunk)
                assert c.reply().startswith(b"250 ")
        for c in pair:
            c.sock.sendall(b"BDAT 1 LAST\r\n\n")
            assert c.reply().startswith(b"250 ok ")
        for c in pair:
            c.quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 2)
    finally:
        server.close()
    for i in range(2):
        (m,) = [m for m in _queued(home) if b"Subject: bdat %d\n" % i in m]
        assert m.count(b"s%d c" % i) == 50 and b"s%d c" % (1 - i) not in m
        assert b"\rs%d c" % i in m  # the CR before the next chunk's text stays (no LF after it)
        assert m.endswith(b"q\n")  # the last chunk's LF makes CR LF -> LF


# -- TLS ------------------------------------------------------------------------------------


def _tls_say(t: ssl.SSLSocket, line: bytes) -> bytes:
    t.sendall(line + b"\r\n")
    out = b""
    while not (len(out) >= 4 and out.endswith(b"\r\n") and out.split(b"\r\n")[-2][3:4] == b" "):
        chunk = t.recv(65536)
        assert chunk, out
        out += chunk
    return out


def test_two_starttls_handshakes_interleaved_beside_a_plain_session(
        tls_home: QHome, pki: dict, tmp_path: Path) -> None:  # noqa: F811 - fixtures
    tls_home.control("rcpthosts", FQDN + "\n")
    server = Tcpserver(tls_home, tmp_path, env=ONE)
    try:
        plain = server.connect()
        plain.reply()
        pair = [server.connect(), server.connect()]
        for c in pair:
            c.reply()
            assert b"STARTTLS" in c.say(b"EHLO x")
            assert c.say(b"STARTTLS").startswith(b"220 ")
        assert len(set(_pids(server, 3))) == 1
        ctx = client_ctx(pki)
        tls = [ctx.wrap_socket(c.sock, server_hostname=FQDN, do_handshake_on_connect=False) for c in pair]
        for t in tls:
            t.setblocking(False)
        done = [False, False]
        deadline = time.monotonic() + DEADLINE
        while not all(done):  # one step of each handshake in turn, the plain session between them
            assert time.monotonic() < deadline
            for i, t in enumerate(tls):
                if not done[i]:
                    try:
                        t.do_handshake()
                        done[i] = True
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        select.select([t], [], [], 0.05)
            assert plain.say(b"NOOP").startswith(b"250 ")
        for t in tls:
            t.setblocking(True)
            t.settimeout(DEADLINE)
        for i, t in enumerate(tls):
            assert _tls_say(t, b"EHLO tls%d" % i).startswith(b"250")
        for i, t in enumerate(tls):
            assert _tls_say(t, b"MAIL FROM:<tls%d@a.example>" % i).startswith(b"250 ")
        for t in tls:
            assert _tls_say(t, b"RCPT TO:<u@" + FQDN.encode() + b">").startswith(b"250 ")
        for t in tls:
            assert _tls_say(t, b"DATA").startswith(b"354 ")
        for i, t in enumerate(tls):
            assert _tls_say(t, b"Subject: tls %d\r\n\r\nbody %d\r\n." % (i, i)).startswith(b"250 ok ")
        for t in tls:
            assert _tls_say(t, b"QUIT").startswith(b"221 ")
            t.close()
        plain.quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 3)
    finally:
        server.close()
    msgs = _queued(tls_home)
    for i in range(2):
        (m,) = [m for m in msgs if b"Subject: tls %d\n" % i in m]
        assert b"(HELO tls%d)" % i in m and b"with ESMTPS" in m and b"body %d" % i in m


# -- the parent's accounting ---------------------------------------------------------------


def test_a_worker_retiring_with_sessions_running_serves_them_to_the_end(home: QHome, tmp_path: Path) -> None:
    """$PYQMAIL_TCPSERVER_REUSE=2 and 3 connections at once: the second end retires the worker, the
    third connection still goes on in it; a new connection gets a new worker; every end logged once."""
    server = Tcpserver(home, tmp_path, env={**ONE, "PYQMAIL_TCPSERVER_REUSE": "2"})
    try:
        clients = [server.connect() for _ in range(3)]
        for c in clients:
            c.reply()
        (worker,) = set(_pids(server, 3))
        clients[0].quit()
        clients[1].quit()
        server.wait_for(rf"tcpserver: end {worker} status 0", 2)
        assert clients[2].say(b"NOOP").startswith(b"250 ")
        fresh = server.connect()
        fresh.reply()
        assert _pids(server, 4)[3] != worker
        clients[2].quit()
        fresh.quit()
        ends = server.wait_for(r"tcpserver: end (\d+) status (\d+)", 4)
        deadline = time.monotonic() + DEADLINE
        while os.path.exists(f"/proc/{worker}") and Path(f"/proc/{worker}/stat").read_text().split()[2] != "Z":
            assert time.monotonic() < deadline, "the retired worker did not exit"
            time.sleep(0.02)
    finally:
        server.close()
    assert sorted(m.group(2) for m in ends) == ["0"] * 4
    assert [int(m.group(1)) for m in ends].count(worker) == 3
    assert len([x for x in server.lines() if x.startswith("tcpserver: end ")]) == 4


def _send_until_reset(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the server is gone


def test_sigint_to_a_worker_ends_each_of_its_sessions_as_a_childs_would(home: QHome, tmp_path: Path) -> None:
    server = Tcpserver(home, tmp_path, env=ONE)
    try:
        clients = [server.connect() for _ in range(3)]
        for c in clients:
            c.reply()
        (worker,) = set(_pids(server, 3))
        for c in clients:  # each session is past its start (where SIGINT would still be its own)
            assert c.say(b"NOOP").startswith(b"250 ")
        # A session busy in its own code when the signal lands (a burst of pipelined commands),
        # not waiting in the worker's poll: there SIGINT raised KeyboardInterrupt in qmail-smtpd,
        # whose crash shim ended that session only, and the worker went on with the others.
        burst = threading.Thread(target=_send_until_reset, args=(clients[0].sock, b"NOOP\r\n" * 200000))
        burst.start()
        time.sleep(0.2)
        os.kill(worker, signal.SIGINT)
        for c in clients:
            try:
                while c.sock.recv(65536):
                    pass  # replies already sent, then the end
            except ConnectionResetError:
                pass  # the end, with the burst's commands unread in the worker's socket
        burst.join(DEADLINE)
        for c in clients:
            c.sock.close()
        ends = server.wait_for(r"tcpserver: end (\d+) status (\d+)", 3)
        server.wait_for(r"tcpserver: status: 0/40", 2)
        fresh = server.connect()
        assert fresh.reply().startswith(b"220 ")
        fresh.quit()
    finally:
        server.close()
    assert [(int(m.group(1)), m.group(2)) for m in ends[:3]] == [(worker, str(111 << 8))] * 3


def test_an_idle_worker_is_let_go_only_once_its_last_session_is_over(home: QHome, tmp_path: Path) -> None:
    server = Tcpserver(home, tmp_path, env={**ONE, "PYQMAIL_TCPSERVER_IDLE": "0.5"})
    try:
        long, short = server.connect(), server.connect()
        long.reply()
        short.reply()
        (worker,) = set(_pids(server, 2))
        short.quit()
        for _ in range(6):  # 1.5 s: three idle periods, the worker still serving one session
            time.sleep(0.25)
            assert long.say(b"NOOP").startswith(b"250 ")
        long.quit()
        deadline = time.monotonic() + DEADLINE
        while os.path.exists(f"/proc/{worker}") and Path(f"/proc/{worker}/stat").read_text().split()[2] != "Z":
            assert time.monotonic() < deadline, "the idle worker was not let go"
            time.sleep(0.05)
    finally:
        server.close()
    ends = [x for x in server.lines() if x.startswith("tcpserver: end ")]
    assert ends == [f"tcpserver: end {worker} status 0"] * 2, server.lines()


def test_after_its_sessions_end_a_worker_holds_no_socket_and_0_1_are_dev_null(home: QHome, tmp_path: Path) -> None:
    server = Tcpserver(home, tmp_path, env=ONE)
    try:
        clients = [server.connect() for _ in range(3)]
        for c in clients:
            c.reply()
        (worker,) = set(_pids(server, 3))
        before = _fds(worker)
        for c in clients[1:]:
            c.quit()  # each sees the end at once (quit reads EOF)
        clients[0].quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 3)
        deadline = time.monotonic() + DEADLINE
        while True:
            after = _fds(worker)
            if after[0] == after[1] == "/dev/null" or time.monotonic() > deadline:
                break
            time.sleep(0.02)
    finally:
        server.close()
    sockets = [fd for fd, t in after.items() if t.startswith("socket:")]
    assert after[0] == "/dev/null" and after[1] == "/dev/null", after
    assert len(sockets) <= 2, (before, after)  # the pair to the parent (and the listener, if kept)
    assert len([fd for fd, t in before.items() if t.startswith("socket:")]) >= len(sockets) + 3


def test_sigterm_to_tcpserver_leaves_running_sessions_to_finish(home: QHome, tmp_path: Path) -> None:
    server = Tcpserver(home, tmp_path, env=ONE)
    try:
        clients = [server.connect() for _ in range(2)]
        for c in clients:
            c.reply()
        (worker,) = set(_pids(server, 2))
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(DEADLINE)
        for c in clients:
            assert c.say(b"HELO x").startswith(b"250 ")
            c.quit()
        deadline = time.monotonic() + DEADLINE
        while os.path.exists(f"/proc/{worker}"):
            assert time.monotonic() < deadline, "the worker outlived its sessions"
            time.sleep(0.02)
    finally:
        if server.proc.poll() is None:
            server.close()
        else:
            assert server.proc.stdout is not None
            server.proc.stdout.close()


# -- a child forked inside a session ----------------------------------------------------------


def test_a_child_forked_in_a_session_does_not_take_the_workers_hub(tmp_path: Path) -> None:
    """spawn's fast path forks and calls a program's main (qmail-queue, a pyqmail checkpassword, a
    pyqmail $QMAILQUEUE filter): in that child, pyqmail.wait must wait as in any process, not switch
    to the worker's loop (which would run the other sessions in the child)."""
    from pyqmail import wait
    from pyqmail.ucspi.hub import Hub

    r, w = os.pipe()
    null = os.open(os.devnull, os.O_RDWR)
    a, b = os.pipe()  # the session's "socket": a descriptor of its own
    saved = os.dup(0), os.dup(1)
    h = Hub(null)
    wait.hub = h
    result = {}

    def session() -> int:
        pid = os.fork()
        if pid == 0:
            try:
                got = wait.ready(r, select.POLLIN, 0)
                os.write(w, b"hub" if wait.hub is not None else b"none")
                os._exit(0 if got is False else 1)
            finally:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        result["status"] = status
        return 0

    try:
        h.start(a, dict(os.environb), session, lambda s: None)
    finally:
        wait.hub = None
        os.dup2(saved[0], 0)
        os.dup2(saved[1], 1)
        for fd in (*saved, null, b):
            os.close(fd)
    os.close(w)
    said = os.read(r, 10)
    os.close(r)
    assert said == b"none" and os.waitstatus_to_exitcode(result["status"]) == 0
