"""Greylisting in qmail-smtpd (issue 15.5): the triplet rules, the SQLite file (restart, SIGKILL in a write,
expiry, many writers at once), the whitelists."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import smtplib
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CI, QHome
from pyqmail.smtpd import greylist as gl
from queuefmt import files
from smtpdkit import Conversation, ForkServer
from ucspikit import DNSServer
from pyqmail.smtpd.greylist import DEFER, INSERT, MARK_PASSED, NOTHING, PASS, TOUCH

T0 = 1_700_000_000


def settings(tmp_path: Path, **kw: object) -> gl.Settings:
    return gl.Settings(db=str(tmp_path / "triplets.sqlite"), **kw)  # type: ignore[arg-type]


def test_decide() -> None:
    s = gl.Settings(300, 3600, 86400)
    assert gl.decide(None, T0, s) == (DEFER, INSERT, 300)
    assert gl.decide((T0, T0, 0), T0 + 100, s) == (DEFER, NOTHING, 200)
    assert gl.decide((T0, T0, 0), T0 + 300, s) == (PASS, MARK_PASSED, 0)
    assert gl.decide((T0, T0, 0), T0 + 3601, s) == (DEFER, INSERT, 300)  # not retried in time: start over
    assert gl.decide((T0, T0 + 400, 1), T0 + 500, s) == (PASS, NOTHING, 0)
    assert gl.decide((T0, T0 + 400, 1), T0 + 400 + gl.REFRESH, s) == (PASS, TOUCH, 0)
    assert gl.decide((T0, T0 + 400, 1), T0 + 400 + 86401, s) == (DEFER, INSERT, 300)  # expired


def test_network() -> None:
    assert gl.network("192.0.2.77") == "192.0.2.0/24"
    assert gl.network("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert gl.network("::ffff:192.0.2.9") == "192.0.2.0/24"


def test_first_attempt_deferred_retry_passes_and_restart_keeps_state(tmp_path: Path) -> None:
    s = settings(tmp_path, delay=300)
    now = [T0]
    g = gl.Greylist(s, lambda: now[0])
    assert g.check("192.0.2.5", b"a@example.com", b"B@example.net") == (DEFER, 300)
    now[0] += 120
    assert g.check("192.0.2.77", b"A@example.com", b"b@example.net") == (DEFER, 180)  # same /24, same triplet
    assert g.check("192.0.2.5", b"a@example.com", b"c@example.net") == (DEFER, 300)  # another recipient
    now[0] = T0 + 300
    assert g.check("192.0.2.5", b"a@example.com", b"b@example.net") == (PASS, 0)
    g.close()
    # A new process (here: a new connection to the file) sees the same state.
    g2 = gl.Greylist(s, lambda: T0 + 400)
    assert g2.check("192.0.2.5", b"a@example.com", b"b@example.net") == (PASS, 0)
    assert g2.check("198.51.100.1", b"a@example.com", b"b@example.net")[0] == DEFER  # another network
    g2.close()
    assert os.stat(s.db).st_mode & 0o777 == 0o600
    db = sqlite3.connect(s.db)
    rows = db.execute("SELECT net, sender, rcpt, passed FROM triplet ORDER BY net, rcpt").fetchall()
    db.close()
    assert rows == [("192.0.2.0/24", "a@example.com", "b@example.net", 1),
                    ("192.0.2.0/24", "a@example.com", "c@example.net", 0),
                    ("198.51.100.0/24", "a@example.com", "b@example.net", 0)]


def test_expired_entries_are_removed_and_the_file_stays_bounded(tmp_path: Path) -> None:
    s = settings(tmp_path, delay=60, retry=3600, expiry=86400)
    now = [T0]
    g = gl.Greylist(s, lambda: now[0])
    sizes = []
    for cycle in range(3):
        for k in range(500):
            g.check(f"10.{cycle}.{k % 250}.1", b"spam%d@example.com" % k, b"x@example.net")
        sizes.append(os.stat(s.db).st_size)
        now[0] += 86400 + 1  # everything of this cycle is expired by the next one's first write
    g.check("192.0.2.1", b"a@example.com", b"b@example.net")
    count = g._open().execute("SELECT count(*) FROM triplet").fetchone()[0]
    assert count == 1
    assert sizes[2] <= sizes[0] * 1.2, sizes  # pages of deleted rows are reused
    g.close()


CHILD = """
import sys
from pyqmail.smtpd import greylist as gl
s = gl.Settings(300, db=sys.argv[1])
g = gl.Greylist(s, lambda: int(sys.argv[2]))
print(g.check(sys.argv[3], b"a@example.com", b"b@example.net"), flush=True)
"""


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_sigkill_in_the_middle_of_a_write_keeps_the_committed_state(tmp_path: Path) -> None:
    s = settings(tmp_path)
    g = gl.Greylist(s, lambda: T0)
    assert g.check("192.0.2.5", b"a@example.com", b"b@example.net") == (DEFER, 300)
    g.close()
    env = dict(os.environ, PYQMAIL_GREYLIST_STOP_IN_WRITE="1")
    # The retry after the delay writes passed=1; the process is stopped inside that transaction and killed.
    p = subprocess.Popen([sys.executable, "-c", CHILD, s.db, str(T0 + 400), "192.0.2.5"], env=env,
                         stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not _stopped(p.pid):
        assert time.monotonic() < deadline, "the child never reached its write"
        time.sleep(0.01)
    other = sqlite3.connect(s.db, timeout=0, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        other.execute("BEGIN IMMEDIATE")  # the child holds the write lock: its transaction is open
    other.close()
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    db = sqlite3.connect(s.db)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute("SELECT first, last, passed FROM triplet").fetchall() == [(T0, T0, 0)]  # rolled back
    db.close()
    g = gl.Greylist(s, lambda: T0 + 400)
    assert g.check("192.0.2.5", b"a@example.com", b"b@example.net") == (PASS, 0)
    g.close()


MANY = """
import sys
from pyqmail.smtpd import greylist as gl
s = gl.Settings(300, db=sys.argv[1])
g = gl.Greylist(s, lambda: int(sys.argv[2]))
n = int(sys.argv[3])
out = [g.check("192.0.2.%d" % (k % 200), b"s%d@example.com" % (k % 7), b"r%d@example.net" % k)[0]
       for k in range(50)]
print(sum(out))
"""


def test_many_processes_write_at_once(tmp_path: Path) -> None:
    s = settings(tmp_path)
    g = gl.Greylist(s, lambda: T0)
    g.check("192.0.2.1", b"x", b"y")  # create the file
    g.close()
    procs = [subprocess.Popen([sys.executable, "-c", MANY, s.db, str(T0 + 10 * i), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(8)]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert out.strip() == b"50"  # every triplet deferred, none failed
    db = sqlite3.connect(s.db)
    assert db.execute("SELECT count(*) FROM triplet").fetchone()[0] == 51
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()


def test_whitelists(tmp_path: Path) -> None:
    s = gl.Settings(ips=["10.1.", "192.0.2.0/25", "2001:db8::/32", "198.51.100.7"],
                    domains=["example.org", ".trusted.example"])
    assert s.ip_listed("10.1.2.3") and not s.ip_listed("10.10.2.3")
    assert s.ip_listed("192.0.2.127") and not s.ip_listed("192.0.2.128")
    assert s.ip_listed("2001:db8::1") and s.ip_listed("198.51.100.7") and not s.ip_listed("198.51.100.8")
    env: dict[bytes, bytes] = {}
    assert gl.exempt(s, "203.0.113.1", b"mail.example.org", b"", False, env)
    assert gl.exempt(s, "203.0.113.1", b"trusted.example", b"", False, env)
    assert not gl.exempt(s, "203.0.113.1", b"badexample.org", b"", False, env)
    # A sender's domain counts only when SPF passed for it.
    assert not gl.exempt(s, "203.0.113.1", b"unknown", b"a@example.org", False, env)
    assert gl.exempt(s, "203.0.113.1", b"unknown", b"a@example.org", True, env)
    assert gl.exempt(s, "203.0.113.1", b"unknown", b"", False, {b"NOGREYLIST": b""})


# --- qmail-smtpd with smtplib and swaks ------------------------------------------------------------

CLIENT = "127.0.0.2"


def greyhome(qhome: QHome, line: str = "300 3600 86400\n") -> Path:
    qhome.control("greylist", line)
    d = qhome.path / "greylist"
    d.mkdir(mode=0o700)
    return d / "triplets.sqlite"


def attempt(port: int, rcpts: list[str], sender: str = "alice@example.org") -> dict[str, int]:
    """One smtplib session from CLIENT: MAIL, each RCPT, DATA if any was accepted; return RCPT codes."""
    codes = {}
    with smtplib.SMTP("127.0.0.1", port, source_address=(CLIENT, 0), timeout=30) as c:
        c.ehlo("client.example")
        assert c.mail(sender)[0] == 250
        for r in rcpts:
            code, text = c.rcpt(r)
            codes[r] = code
            if code == 451:
                assert text.startswith(b"greylisted, try again in ") and text.endswith(b" seconds (#4.7.1)")
        if 250 in codes.values():
            assert c.data(b"Subject: grey\r\n\r\nbody\r\n")[0] == 250
    return codes


def server(qhome: QHome, now: int, **env: str) -> ForkServer:
    return ForkServer(qhome.bin("qmail-smtpd"), dict(env, PYQMAIL_GREYLIST_NOW=str(now)))


def test_first_attempt_451_retry_after_the_delay_250_across_restarts(qhome: QHome) -> None:
    db = greyhome(qhome)
    with server(qhome, T0) as srv:
        assert attempt(srv.port, ["bob@test.example.com"]) == {"bob@test.example.com": 451}
    with server(qhome, T0 + 299) as srv:  # a restarted qmail-smtpd, before the delay
        assert attempt(srv.port, ["bob@test.example.com", "carol@test.example.com"]) == {
            "bob@test.example.com": 451, "carol@test.example.com": 451}
    assert files(qhome.queue)["mess"] == []
    with server(qhome, T0 + 300) as srv:
        assert attempt(srv.port, ["bob@test.example.com", "carol@test.example.com"]) == {
            "bob@test.example.com": 250, "carol@test.example.com": 451}
    assert len(files(qhome.queue)["mess"]) == 1
    assert os.stat(db).st_mode & 0o777 == 0o600


def test_swaks_and_the_whitelists(qhome: QHome) -> None:
    greyhome(qhome)
    swaks = shutil.which("swaks")
    if swaks is None:
        if CI:
            pytest.fail("swaks is missing: .ci/run must install Debian's swaks")
        pytest.skip("swaks not installed")
    with server(qhome, T0) as srv:
        res = subprocess.run([swaks, "--server", "127.0.0.1", "--port", str(srv.port), "--local-interface",
                              CLIENT, "--from", "a@example.org", "--to", "bob@test.example.com"],
                             capture_output=True, timeout=60)
        assert res.returncode == 24, res.stdout
        assert b"<** 451 greylisted, try again in 300 seconds (#4.7.1)" in res.stdout
    # Never greylisted: a relay client, $NOGREYLIST, a listed address or host name; nothing is written.
    before = triplets(qhome)
    for env in ({"RELAYCLIENT": ""}, {"NOGREYLIST": ""}):
        with server(qhome, T0, **env) as srv:
            assert attempt(srv.port, ["dave@test.example.com"], "x@y.example") == {"dave@test.example.com": 250}
    assert triplets(qhome) == before
    with server(qhome, T0, TCPREMOTEHOST="mx1.friend.example") as srv:  # not listed yet
        assert attempt(srv.port, ["dave@test.example.com"], "x@y.example") == {"dave@test.example.com": 451}
    qhome.control("greylistdomains", "friend.example\n")
    with DNSServer({"mx1.friend.example": {"A": [CLIENT]}}) as dns:  # the name has the client's address
        with server(qhome, T0, TCPREMOTEHOST="mx1.friend.example", DNSCACHEIP=dns.dnscacheip) as srv:
            assert attempt(srv.port, ["erin@test.example.com"], "x@y.example") == {"erin@test.example.com": 250}
    qhome.control("greylistips", "127.0.0.0/30\n")
    with server(qhome, T0) as srv:
        assert attempt(srv.port, ["frank@test.example.com"], "x@y.example") == {"frank@test.example.com": 250}
    qhome.control("greylistips", None)
    qhome.control("greylistdomains", None)
    # Only the session from the host not yet listed left a triplet.
    assert triplets(qhome) == before + [("127.0.0.0/24", "x@y.example", "dave@test.example.com", 0)]


def triplets(qhome: QHome) -> list[tuple[str, str, str, int]]:
    db = sqlite3.connect(qhome.path / "greylist" / "triplets.sqlite")
    rows = db.execute("SELECT net, sender, rcpt, passed FROM triplet ORDER BY rcpt").fetchall()
    db.close()
    return rows


def test_qmail_smtpd_killed_in_its_write(qhome: QHome) -> None:
    """SIGKILL of qmail-smtpd inside its greylist transaction: the file keeps what was committed."""
    greyhome(qhome)
    with server(qhome, T0) as srv:
        assert attempt(srv.port, ["bob@test.example.com"]) == {"bob@test.example.com": 451}
    env = {"PYQMAIL_GREYLIST_NOW": str(T0 + 400), "PYQMAIL_GREYLIST_STOP_IN_WRITE": "1", "TCPREMOTEIP": CLIENT}
    conv = Conversation(qhome.bin("qmail-smtpd"), env)
    try:
        conv.line()
        conv.send(b"HELO c\r\n")
        assert conv.line() == b"250 test.example.com\r\n"
        conv.send(b"MAIL FROM:<alice@example.org>\r\n")
        assert conv.line() == b"250 ok\r\n"
        conv.send(b"RCPT TO:<bob@test.example.com>\r\n")  # replies are sent before a read: none comes now
        deadline = time.monotonic() + 20
        while not _stopped(conv.proc.pid):
            assert time.monotonic() < deadline, "qmail-smtpd never reached its write"
            time.sleep(0.01)
        conv.proc.kill()
        conv.proc.wait()
    finally:
        conv.close()
    assert triplets(qhome) == [("127.0.0.0/24", "alice@example.org", "bob@test.example.com", 0)]
    with server(qhome, T0 + 400) as srv:
        assert attempt(srv.port, ["bob@test.example.com"]) == {"bob@test.example.com": 250}
    assert triplets(qhome) == [("127.0.0.0/24", "alice@example.org", "bob@test.example.com", 1)]


def test_expired_triplets_leave_the_file(qhome: QHome) -> None:
    greyhome(qhome, "60 600 3600\n")
    with server(qhome, T0) as srv:
        assert attempt(srv.port, [f"u{k}@test.example.com" for k in range(20)])  # 20 pending triplets
    assert len(triplets(qhome)) == 20
    with server(qhome, T0 + 601) as srv:
        assert attempt(srv.port, ["new@test.example.com"]) == {"new@test.example.com": 451}
    assert [t[2] for t in triplets(qhome)] == ["new@test.example.com"]


def test_unusable_file_accepts_and_logs(qhome: QHome) -> None:
    qhome.control("greylist", "\n")  # defaults; no greylist/ directory made
    with server(qhome, T0) as srv:
        assert attempt(srv.port, ["bob@test.example.com"]) == {"bob@test.example.com": 250}
        log = srv.stderr()
    assert b"qmail-smtpd: greylist: not greylisting: " in log


def test_authenticated_client_is_neither_greylisted_nor_spf_checked(qhome: QHome) -> None:
    """After AUTH (a checkprogram accepting anyone): no greylist entry, no SPF lookup, no Received-SPF."""
    greyhome(qhome)
    qhome.control("spfbehavior", "6\n")  # a lookup would fail (SERVFAIL below): 451 at MAIL
    accept = qhome.path / "accept-all"
    accept.write_text('#!/bin/sh\nexec "$@"\n')
    accept.chmod(0o755)
    prog = qhome.path / "smtpd-auth"
    prog.write_text(f"#!/bin/sh\nexec {qhome.bin('qmail-smtpd')} {accept} /bin/true\n")
    prog.chmod(0o755)
    with DNSServer({}, servfail=["fail.example"]) as dns:
        env = {"SMTPAUTH": "", "DISABLETLS": "1", "PYQMAIL_SMTPD_AUTH_DELAY": "0", "PYQMAIL_GREYLIST_NOW": str(T0),
               "DNSCACHEIP": dns.dnscacheip}
        with ForkServer(prog, env) as srv:
            with smtplib.SMTP("127.0.0.1", srv.port, source_address=(CLIENT, 0), timeout=30) as c:
                c.ehlo("client.example")
                c.login("someone", "secret")
                assert c.mail("a@fail.example")[0] == 250
                assert c.rcpt("bob@test.example.com")[0] == 250
                assert c.rcpt("far@away.example")[0] == 250  # relaying
                assert c.data(b"Subject: auth\r\n\r\nbody\r\n")[0] == 250
            assert dns.queries == []
            # The same without AUTH: SPF asks, gets SERVFAIL and says 451 at MAIL.
            with smtplib.SMTP("127.0.0.1", srv.port, source_address=(CLIENT, 0), timeout=60) as c:
                c.ehlo("client.example")
                assert c.mail("a@fail.example")[0] == 451
            assert dns.queries
    assert not (qhome.path / "greylist" / "triplets.sqlite").exists()  # never opened
    msg = (qhome.queue / "mess" / files(qhome.queue)["mess"][0]).read_bytes()
    assert b"Received-SPF" not in msg and b"ESMTPA" in msg


def smtpd_as_qmaild(home: QHome, env: dict[str, str], lines: list[bytes]) -> list[bytes]:
    """Run qmail-smtpd as qmaild:nofiles (as tcpserver -u -g does in root mode); return its reply lines."""
    mine, theirs = socket.socketpair()
    p = subprocess.Popen([str(home.bin("qmail-smtpd"))], stdin=theirs, stdout=theirs, stderr=subprocess.PIPE,
                         env=dict({"PATH": "/usr/bin:/bin", "TCPREMOTEIP": CLIENT}, **env),
                         user="qmaild", group="nofiles", extra_groups=[])
    theirs.close()
    mine.settimeout(30)
    f = mine.makefile("rb")
    out = [f.readline()]
    for line in lines:
        mine.sendall(line)
        out.append(f.readline())
    f.close()
    mine.close()
    p.communicate(timeout=30)
    return out


def test_root_mode_file_belongs_to_qmaild(root_home: QHome) -> None:
    """As root: qmail-smtpd runs as qmaild; the file it makes in the qmaild-owned 0700 directory is 0600 qmaild's."""
    import pwd

    qmaild = pwd.getpwnam("qmaild")
    root_home.control("greylist", "300\n")
    d = root_home.path / "greylist"
    d.mkdir(mode=0o700)
    os.chown(d, qmaild.pw_uid, qmaild.pw_gid)
    talk = [b"HELO c\r\n", b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<bob@test.example.com>\r\n", b"QUIT\r\n"]
    got = smtpd_as_qmaild(root_home, {"PYQMAIL_GREYLIST_NOW": str(T0)}, talk)
    assert got[3] == b"451 greylisted, try again in 300 seconds (#4.7.1)\r\n", got
    st = os.stat(d / "triplets.sqlite")
    assert (st.st_uid, st.st_mode & 0o777) == (qmaild.pw_uid, 0o600)
    got = smtpd_as_qmaild(root_home, {"PYQMAIL_GREYLIST_NOW": str(T0 + 300)}, talk)
    assert got[3] == b"250 ok\r\n", got
    # A directory qmaild cannot write: not greylisted, and said so.
    os.chown(d, 0, 0)
    (d / "triplets.sqlite").unlink()
    for side in ("-wal", "-shm"):
        (d / ("triplets.sqlite" + side)).unlink(missing_ok=True)
    got = smtpd_as_qmaild(root_home, {"PYQMAIL_GREYLIST_NOW": str(T0)}, talk)
    assert got[3] == b"250 ok\r\n", got
