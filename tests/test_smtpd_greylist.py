"""Greylisting in qmail-smtpd (issue 15.5): the triplet rules, the SQLite file (restart, SIGKILL in a write,
expiry, many writers at once), the whitelists."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from pyqmail.smtpd import greylist as gl
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
    assert os.path.getsize(s.db + "-wal") > 0  # the write was under way, not committed
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
