"""tcpserver's workers serving several connections at once (issue 17: PSS per idle connection).

A worker forked from tcpserver's parent serves up to $PYQMAIL_TCPSERVER_SESSIONS
connections side by side (pyqmail.ucspi.hub: each a greenlet, switched only
where it waits); tcpserver gives each of the first $PYQMAIL_TCPSERVER_SPREAD
workers a connection before any gets a second. What each session sees must be
what a process of its own would: its own socket on 0 and 1, its own
environment (tcpserver's plus the rules'), its own timeout, and the end of its
connection when its program returns. A session that waits must not hold the
others; a worker that dies ends each of its connections in the log.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from conftest import QHome
from test_tcpserver_reuse import DEADLINE, FQDN, Client, Tcpserver
from ucspikit import rules_file


@pytest.fixture
def home(qhome: QHome) -> QHome:
    qhome.control("rcpthosts", FQDN + "\n")
    return qhome


def _pids(server: Tcpserver, count: int) -> list[int]:
    return [int(m.group(1)) for m in server.wait_for(r"tcpserver: pid (\d+) from .*", count)]


def _holders(pids: set[int], clients: list[Client]) -> set[int]:
    """The pids among pids that hold the server side of the clients' connections."""
    ports = {c.sock.getsockname()[1] for c in clients}
    inodes = set()
    for table in ("/proc/net/tcp",):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[2].split(":")[1], 16) in ports:  # the server side's remote port is the client's
                inodes.add(f[9])
    held = set()
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:[") and target[8:-1] in inodes:
                held.add(pid)
    return held


def test_idle_connections_share_the_spread_of_workers(home: QHome, tmp_path: Path) -> None:
    server = Tcpserver(home, tmp_path, env={"PYQMAIL_TCPSERVER_SPREAD": "2"})
    try:
        clients = [server.connect() for _ in range(6)]
        for c in clients:
            assert c.reply().startswith(b"220 " + FQDN.encode())
        pids = _pids(server, 6)
        assert len(set(pids)) == 2, pids
        assert max(pids.count(p) for p in pids) == 3  # the fewest connections first
        assert _holders(set(pids), clients) == set(pids)
        # Every session answers, in any order, after the others have been served.
        for c in reversed(clients):
            assert c.say(b"HELO x").startswith(b"250 ")
        for c in clients:
            assert c.say(b"NOOP").startswith(b"250 ")
            c.quit()
        ends = server.wait_for(r"tcpserver: end (\d+) status (\d+)", 6)
    finally:
        server.close()
    assert sorted(int(m.group(1)) for m in ends) == sorted(pids)
    assert {m.group(2) for m in ends} == {"0"}
    assert server.lines()[-1] == "tcpserver: status: 0/40"


def test_sessions_of_one_worker_keep_their_own_environment(home: QHome, tmp_path: Path) -> None:
    rules = rules_file(tmp_path, '127.0.0.2:allow,RELAYCLIENT=""\n:allow\n')
    server = Tcpserver(home, tmp_path, "-x", str(rules), env={"PYQMAIL_TCPSERVER_SPREAD": "1"})
    try:
        sources = ["127.0.0.1", "127.0.0.2", "127.0.0.1", "127.0.0.2"]
        clients = [server.connect(s) for s in sources]
        for c in clients:
            c.reply()
        assert len(set(_pids(server, 4))) == 1
        for c in clients:
            assert c.say(b"HELO x").startswith(b"250 ")
        for c in clients:
            assert c.say(b"MAIL FROM:<a@b.example>").startswith(b"250 ")
        # Interleaved: each RCPT is answered by its own session's RELAYCLIENT (or its absence).
        for _ in range(2):
            for source, c in zip(sources, clients):
                want = b"250 " if source == "127.0.0.2" else b"553 "
                assert c.say(b"RCPT TO:<someone@far.example>").startswith(want), source
        for c in clients:
            c.quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 4)
    finally:
        server.close()


def test_a_session_that_waits_does_not_hold_the_others(home: QHome, tmp_path: Path) -> None:
    server = Tcpserver(home, tmp_path, env={"PYQMAIL_TCPSERVER_SPREAD": "1"})
    try:
        idle = server.connect()
        idle.reply()
        idle.sock.sendall(b"MAIL FROM:<half")  # a command begun and never ended: its session waits
        busy = server.connect()
        busy.reply()
        assert len(set(_pids(server, 2))) == 1
        assert busy.say(b"HELO x").startswith(b"250 ")
        assert busy.say(b"MAIL FROM:<a@b.example>").startswith(b"250 ")
        assert busy.say(b"RCPT TO:<u@" + FQDN.encode() + b">").startswith(b"250 ")
        assert busy.say(b"DATA").startswith(b"354 ")
        assert busy.say(b"Subject: side by side\r\n\r\nbody\r\n.").startswith(b"250 ok ")
        busy.quit()
        idle.sock.sendall(b"@b.example>\r\n")
        assert idle.reply().startswith(b"250 ")
        idle.quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 2)
    finally:
        server.close()
    queued = [p for p in (home.queue / "mess").rglob("*") if p.is_file()]
    assert len(queued) == 1 and b"side by side" in queued[0].read_bytes()


def test_each_session_has_its_own_timeout(home: QHome, tmp_path: Path) -> None:
    home.control("timeoutsmtpd", "1\n")
    server = Tcpserver(home, tmp_path, env={"PYQMAIL_TCPSERVER_SPREAD": "1"})
    try:
        sleeper = server.connect()
        sleeper.reply()
        talker = server.connect()
        talker.reply()
        started = time.monotonic()
        while time.monotonic() - started < 2.5:  # bounded: the sleeper's second runs out meanwhile
            assert talker.say(b"NOOP").startswith(b"250 ")
            time.sleep(0.25)
        sleeper.sock.settimeout(DEADLINE)
        assert sleeper.reply() == b"451 timeout (#4.4.2)\r\n"  # qmail-smtpd's timeout, then the end
        assert sleeper.sock.recv(100) == b""
        sleeper.sock.close()
        talker.quit()
        server.wait_for(r"tcpserver: end \d+ status \d+", 2)
    finally:
        server.close()


def test_a_worker_killed_ends_each_of_its_connections(home: QHome, tmp_path: Path) -> None:
    server = Tcpserver(home, tmp_path, env={"PYQMAIL_TCPSERVER_SPREAD": "1"})
    try:
        clients = [server.connect() for _ in range(3)]
        for c in clients:
            c.reply()
        (worker,) = set(_pids(server, 3))
        os.kill(worker, signal.SIGKILL)
        for c in clients:
            assert c.sock.recv(100) == b""
            c.sock.close()
        ends = server.wait_for(r"tcpserver: end (\d+) status (\d+)", 3)
        assert [(int(m.group(1)), m.group(2)) for m in ends] == [(worker, "9")] * 3
        server.wait_for(r"tcpserver: status: 0/40", 2)
        c = server.connect()  # a new worker for the next one
        assert c.reply().startswith(b"220 ")
        c.quit()
    finally:
        server.close()


def test_sessions_1_keeps_one_connection_per_worker(home: QHome, tmp_path: Path) -> None:
    server = Tcpserver(home, tmp_path, env={"PYQMAIL_TCPSERVER_SESSIONS": "1", "PYQMAIL_TCPSERVER_SPREAD": "1"})
    try:
        clients = [server.connect() for _ in range(3)]
        for c in clients:
            c.reply()
        assert len(set(_pids(server, 3))) == 3
        for c in clients:
            c.quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 3)
    finally:
        server.close()


def test_a_worker_full_of_sessions_makes_a_new_one(home: QHome, tmp_path: Path) -> None:
    server = Tcpserver(home, tmp_path, env={"PYQMAIL_TCPSERVER_SESSIONS": "2", "PYQMAIL_TCPSERVER_SPREAD": "1"})
    try:
        clients = [server.connect() for _ in range(5)]
        for c in clients:
            c.reply()
        pids = _pids(server, 5)
        assert len(set(pids)) == 3 and max(pids.count(p) for p in pids) == 2, pids
        for c in clients:
            c.quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 5)
    finally:
        server.close()


def test_the_limit_counts_connections_not_workers(home: QHome, tmp_path: Path) -> None:
    server = Tcpserver(home, tmp_path, "-c", "3", env={"PYQMAIL_TCPSERVER_SPREAD": "1"})
    try:
        clients = [server.connect() for _ in range(3)]
        for c in clients:
            c.reply()
        fourth = server.connect()  # accepted by the kernel, served when one of the three ends
        fourth.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            fourth.sock.recv(1)
        fourth.sock.settimeout(DEADLINE)
        clients[0].quit()
        assert fourth.reply().startswith(b"220 ")
        for c in [*clients[1:], fourth]:
            c.quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 4)
    finally:
        server.close()
    assert "tcpserver: status: 3/3" in server.lines()


def test_a_session_waiting_for_dns_does_not_hold_the_others(home: QHome, tmp_path: Path) -> None:
    """control/dnsbllist is asked at the first RCPT; 127.0.0.2's cache never answers (a bound UDP
    socket nobody reads), so its session waits in pyqmail.ucspi.dnsq's first 1-second round while
    127.0.0.1's session, in the same worker, goes on."""
    import socket

    home.control("dnsbllist", "-bl.example\n")
    hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    hole.bind(("127.0.0.1", 0))
    port = hole.getsockname()[1]
    rules = rules_file(tmp_path, f'127.0.0.2:allow,DNSCACHEIP="127.0.0.1:{port}"\n:allow,DNSBLSKIP=""\n')
    server = Tcpserver(home, tmp_path, "-x", str(rules), env={"PYQMAIL_TCPSERVER_SPREAD": "1"})
    try:
        stuck = server.connect("127.0.0.2")
        stuck.reply()
        stuck.say(b"HELO x")
        stuck.say(b"MAIL FROM:<a@b.example>")
        stuck.sock.sendall(b"RCPT TO:<u@" + FQDN.encode() + b">\r\n")  # asks the hole, and waits
        hole.settimeout(DEADLINE)
        query, asker = hole.recvfrom(512)  # the query has been sent: the session is in its wait now
        other = server.connect()
        started = time.monotonic()
        other.reply()
        assert other.say(b"HELO x").startswith(b"250 ")
        other.quit()
        assert time.monotonic() - started < 0.8  # well inside the stuck one's first round (1 s)
        assert len(set(_pids(server, 2))) == 1
        answer = bytearray(query)
        answer[2] |= 0x80  # QR: the query sent back as its own answer,
        answer[3] = (answer[3] & 0xF0) | 3  # NXDOMAIN: not listed
        # Hostile datagrams first: garbage, a truncated answer, an answer with another id
        # (forged): each ignored, the wait goes on until the real answer.
        forged = bytearray(answer)
        forged[0] ^= 0xFF
        forged[3] &= 0xF0
        for junk in (b"\xff" * 7, bytes(answer[:9]), bytes(forged)):
            hole.sendto(junk, asker)
        hole.sendto(bytes(answer), asker)
        assert stuck.reply().startswith(b"250 ")
        stuck.quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 2)
    finally:
        server.close()
        hole.close()


def test_a_remote_name_lookup_that_gets_no_answer_holds_no_other(home: QHome, tmp_path: Path) -> None:
    """Without -H tcpserver looks up TCPREMOTEHOST. In a worker serving several sessions the PTR
    query goes through pyqmail.ucspi.dnsq ($DNSCACHEIP; /etc/hosts first), so a client whose
    reverse DNS never answers holds no other session; its name comes when the answer does."""
    import socket

    hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    hole.bind(("127.0.0.1", 0))
    env = {"PYQMAIL_TCPSERVER_SPREAD": "1", "DNSCACHEIP": f"127.0.0.1:{hole.getsockname()[1]}"}
    server = Tcpserver(home, tmp_path, flags="-R", env=env)
    try:
        stuck = server.connect("127.0.0.9")  # not in /etc/hosts: asked of the hole
        hole.settimeout(DEADLINE)
        query, asker = hole.recvfrom(512)
        assert b"\x019\x010\x010\x03127\x07in-addr\x04arpa\x00" in query
        other = server.connect()  # 127.0.0.1: /etc/hosts names it, no query
        started = time.monotonic()
        assert other.reply().startswith(b"220 ")
        assert time.monotonic() - started < 0.8  # well inside the stuck one's first round (1 s)
        other.quit()
        # The answer: the query sent back with one PTR record for its question.
        answer = bytearray(query)
        answer[2] |= 0x80
        answer[7] = 1  # ANCOUNT 1
        end = query.index(b"\x00\x00\x0c\x00\x01") + 5  # the question: name, type PTR, class IN
        rdata = b"\x05slow9\x07example\x00"
        answer = answer[:end] + b"\xc0\x0c\x00\x0c\x00\x01\x00\x00\x00\x3c" + len(rdata).to_bytes(2, "big") + rdata
        answer[10:12] = b"\x00\x00"  # ARCOUNT 0: the query's EDNS record is not sent back
        hole.sendto(bytes(answer), asker)
        assert stuck.reply().startswith(b"220 ")
        stuck.quit()
        server.wait_for(r"tcpserver: end \d+ status 0", 2)
    finally:
        server.close()
        hole.close()
    oks = [x for x in server.lines() if x.startswith("tcpserver: ok ")]
    assert any(" slow9.example:127.0.0.9::" in x for x in oks), oks
    assert any(" localhost:127.0.0.1::" in x for x in oks), oks
    assert len(set(_pids(server, 2))) == 1
