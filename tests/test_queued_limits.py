"""qmail-queued keeps local users in their lane (issue 12 A.3) and names one pid per message (B.5).

Root mode, real processes: qmail-queued started as root, clients run as the
test user or a qmail user. Workers are counted in /proc by their parent pid;
a busy one holds its client's connection beside its own socket pair's end.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

from conftest import TEST_USER, QHome
from queuefmt import RECEIVED, files, parse_todo
from sendkit import Running, Site
from test_intake_root import ENV, FQDN, Queued, _delivered, _drops, _sock, _wait, site  # noqa: F401 - site is a fixture
from test_qmail_queue import envelope, qq

# One process as the test user holding N connections to the socket, each with two pipes it never
# writes; it prints how many were acknowledged and how many refused, then waits for its stdin to end.
HOLDER = r"""
import os, socket, sys
path, n = sys.argv[1], int(sys.argv[2])
conns, keep = [], []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        socket.send_fds(s, [b"Q"], [r1, r2])
    except OSError:
        pass
    os.close(r1)
    os.close(r2)
    conns.append(s)
    keep += [w1, w2]
acked = refused = 0
for s in conns:
    s.settimeout(30)
    try:
        answer = s.recv(1)
    except OSError:
        answer = b""
    if answer == b"+":
        acked += 1
    else:
        refused += 1
print(acked, refused, flush=True)
sys.stdin.read()
"""


def _children(pid: int) -> list[int]:
    """Return the pids whose parent is pid."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        if int(fields[1]) == pid:
            out.append(int(name))
    return out


def _sockets(pid: int) -> int:
    """Return how many sockets pid holds open (0 once it is gone)."""
    n = 0
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return 0
    for fd in names:
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            continue
    return n


def _busy(pid: int) -> list[int]:
    """Return the workers of qmail-queued pid serving a client (an idle one holds one socket, its end to the server)."""
    return [c for c in _children(pid) if _sockets(c) >= 2]


def _as(user: str) -> dict[str, object]:
    import pwd

    pw = pwd.getpwnam(user)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _client(home: QHome, user: str = TEST_USER) -> tuple[subprocess.Popen[bytes], int]:
    """Start qmail-queue as user, its message on a pipe (stdin) and its envelope on another; return it and the envelope's write end."""
    r, w = os.pipe()
    p = subprocess.Popen([str(home.bin("qmail-queue"))], stdin=subprocess.PIPE, stdout=r, stderr=subprocess.PIPE,
                         env=ENV, **_as(user))  # type: ignore[call-overload]
    os.close(r)
    return p, w


def _nothing_queued(home: QHome) -> bool:
    f = files(home.queue)
    return f["todo"] == [] and f["mess"] == [] and f["intd"] == [] and _drops(home) == []


def test_fifty_idle_connections_of_one_uid_get_the_limit_of_children(site: Site) -> None:
    home = site.home
    q = Queued(home, "-c", "20")
    python = home.bin("qmail-queue").read_text().split("\n", 1)[0][2:].split()[0]  # the stubs' interpreter
    holder = subprocess.Popen([python, "-c", HOLDER, str(_sock(home)), "50"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=ENV, **_as(TEST_USER))  # type: ignore[call-overload]
    try:
        assert holder.stdout is not None
        acked, refused = map(int, holder.stdout.readline().split())
        assert (acked, refused) == (20, 30)  # refused ones are closed unacknowledged: such a client drops instead
        assert len(_children(q.proc.pid)) == 20 and len(_busy(q.proc.pid)) == 20
        # Another uid is still served, through the socket.
        p = qq(home, b"Subject: other uid\n\nserved\n", envelope(b"", b"pq@" + FQDN.encode()), user="qmaild")
        assert p.returncode == 0, p.stderr
        assert len(files(home.queue)["todo"]) == 1 and _drops(home) == []
        _wait(lambda: len(_busy(q.proc.pid)) == 20, 30, "the other uid's worker to be idle")
        assert len(_children(q.proc.pid)) == 21  # the 20 busy ones, and the other uid's, idle now
    finally:
        assert holder.stdin is not None
        holder.stdin.close()  # the holder exits: its connections hang up
        holder.wait(30)
        assert holder.stdout is not None
        holder.stdout.close()
    # Every worker gives up its message when its client hangs up, queueing nothing, and waits idle.
    _wait(lambda: _busy(q.proc.pid) == [], 30, "workers to give up with their client")
    assert len(_children(q.proc.pid)) == 21
    assert len(files(home.queue)["todo"]) == 1 and len(files(home.queue)["mess"]) == 1 and _drops(home) == []
    assert q.stop() == 0
    err = q.stderr()
    uid = _as(TEST_USER)["user"]
    assert err == (f"qmail-queued: warning: uid {uid} has 20 connections being served: further ones are "
                   "refused (their qmail-queue uses the maildrop)\n")


def test_a_client_past_the_limit_writes_the_maildrop(site: Site) -> None:
    home = site.home
    q = Queued(home, "-c", "1")
    try:
        p1, w1 = _client(home)
        _wait(lambda: len(_busy(q.proc.pid)) == 1, 30, "the first client's worker")
        p2 = qq(home, b"Subject: second\n\nvia maildrop\n", envelope(b"s@x", b"pq@" + FQDN.encode()), user=TEST_USER)
        assert p2.returncode == 0, p2.stderr  # refused by the server, dropped by the client
        _wait(lambda: _drops(home) == [] and len(files(home.queue)["todo"]) == 1, 30, "pickup of the drop")
        assert p1.stdin is not None
        p1.stdin.write(b"Subject: first\n\nvia socket\n")
        p1.stdin.close()
        os.write(w1, envelope(b"s@x", b"pq@" + FQDN.encode()))
        os.close(w1)
        assert p1.wait(30) == 0
        assert p1.stderr is not None
        p1.stderr.close()
        assert len(files(home.queue)["todo"]) == 2
    finally:
        assert q.stop() == 0


def _hold(home: QHome, user: str, n: int) -> subprocess.Popen[str]:
    """Start a HOLDER of n connections as user."""
    python = home.bin("qmail-queue").read_text().split("\n", 1)[0][2:].split()[0]  # the stubs' interpreter
    return subprocess.Popen([python, "-c", HOLDER, str(_sock(home)), str(n)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=ENV, text=True, **_as(user))  # type: ignore[call-overload]


def test_the_global_cap_serves_at_most_m_messages_past_it_the_maildrop(site: Site) -> None:
    # Review of session 5, finding 8: -c bounds one uid; -m every uid together.
    home = site.home
    q = Queued(home, "-c", "20", "-m", "5")
    holders = []
    try:
        holders.append(_hold(home, TEST_USER, 4))
        assert holders[0].stdout is not None
        assert holders[0].stdout.readline().split() == ["4", "0"]
        holders.append(_hold(home, "qmaild", 4))  # another uid, well below its -c
        assert holders[1].stdout is not None
        assert holders[1].stdout.readline().split() == ["1", "3"]  # refused ones were closed unacknowledged
        assert len(_children(q.proc.pid)) == 5 and len(_busy(q.proc.pid)) == 5
        # A third uid past the cap: its qmail-queue writes the maildrop, which qmail-queued picks up.
        p = qq(home, b"Subject: past the cap\n\nvia maildrop\n", envelope(b"", b"pq@" + FQDN.encode()), user="qmaill")
        assert p.returncode == 0, p.stderr
        _wait(lambda: _drops(home) == [] and len(files(home.queue)["todo"]) == 1, 30, "pickup of the drop")
        assert len(_children(q.proc.pid)) == 5
    finally:
        for h in holders:
            assert h.stdin is not None and h.stdout is not None
            h.stdin.close()
            h.wait(30)
            h.stdout.close()
    _wait(lambda: _busy(q.proc.pid) == [], 30, "workers to give up with their clients")
    # Below the cap again: served through the socket.
    p = qq(home, b"Subject: below\n\nserved\n", envelope(b"", b"pq@" + FQDN.encode()), user="qmaill")
    assert p.returncode == 0, p.stderr
    assert len(files(home.queue)["todo"]) == 2 and _drops(home) == []
    assert q.stop() == 0
    assert q.stderr() == ("qmail-queued: warning: 5 connections being served: further ones are refused "
                          "(their qmail-queue uses the maildrop)\n")


def test_a_killed_client_leaves_no_child_and_queues_nothing(site: Site) -> None:
    home = site.home
    q = Queued(home)
    try:
        p, w = _client(home)
        assert p.stdin is not None
        p.stdin.write(b"Subject: half\n\nthe first half\n")
        p.stdin.flush()
        _wait(lambda: len(_busy(q.proc.pid)) == 1, 30, "the client's worker")
        p.kill()
        p.wait(30)
        _wait(lambda: _busy(q.proc.pid) == [], 30, "the worker to give up with its client")
        # The rest of the message and the envelope would come now: nobody holds the pipes to read them.
        try:
            p.stdin.write(b"the second half\n")
            p.stdin.close()
        except BrokenPipeError:
            pass
        try:
            os.write(w, envelope(b"s@x", b"pq@" + FQDN.encode()))
            raise AssertionError("someone still reads the envelope")
        except BrokenPipeError:
            pass
        os.close(w)
        assert p.stderr is not None
        p.stderr.close()
        assert _nothing_queued(home)
        # Normal injection still works.
        ok = qq(home, b"Subject: whole\n\nwhole\n", envelope(b"s@x", b"pq@" + FQDN.encode()), user=TEST_USER)
        assert ok.returncode == 0, ok.stderr
        assert len(files(home.queue)["todo"]) == 1
    finally:
        assert q.stop() == 0
    assert q.stderr() == ""


def test_an_idle_client_is_cut_after_the_idle_time(site: Site) -> None:
    home = site.home
    q = Queued(home, "-t", "1")
    try:
        start = time.monotonic()
        p, w = _client(home)
        assert p.wait(30) == 54  # qmail-queue's read error, answered by the server's child
        took = time.monotonic() - start
        assert 1.0 <= took < 20, took
        assert p.stdin is not None and p.stderr is not None
        p.stdin.close()
        p.stderr.close()
        os.close(w)
        _wait(lambda: _busy(q.proc.pid) == [], 30, "the worker to be idle")
        assert _nothing_queued(home)
        # A client that keeps sending is not idle, however long it takes in all.
        p, w = _client(home)
        assert p.stdin is not None
        for i in range(4):
            p.stdin.write(b"Subject: slow\n" if i == 0 else b"more\n")
            p.stdin.flush()
            time.sleep(0.6)
        p.stdin.close()
        os.write(w, envelope(b"s@x", b"pq@" + FQDN.encode()))
        os.close(w)
        assert p.wait(30) == 0
        assert p.stderr is not None
        p.stderr.close()
        assert len(files(home.queue)["todo"]) == 1
    finally:
        assert q.stop() == 0


def test_usage(site: Site) -> None:
    for args in (["-c", "0"], ["-c", "x"], ["-m", "0"], ["-m", "x"], ["-t", "-1"], ["-x"], ["-n", "0"], ["-w", "-1"],
                 ["-w", "x"]):
        r = subprocess.run([str(site.home.bin("qmail-queued")), *args], env=ENV, capture_output=True, timeout=60)
        assert r.returncode == 111 and r.stderr.endswith(
            b"qmail-queued: usage: qmail-queued [-p] [-c N] [-m N] [-t SECONDS] [-n N] [-w SECONDS]\n"), r


# --- B.5: one pid per queued message ---------------------------------------------------

def test_received_line_and_envelope_name_the_client_pid(site: Site) -> None:
    home = site.home
    q = Queued(home)
    try:
        p, w = _client(home)
        assert p.stdin is not None
        p.stdin.write(b"Subject: pid\n\nwhose pid\n")
        p.stdin.close()
        os.write(w, envelope(b"s@x", b"pq@" + FQDN.encode()))
        os.close(w)
        assert p.wait(30) == 0
        assert p.stderr is not None
        p.stderr.close()
        (todo,) = files(home.queue)["todo"]
        mess = (home.queue / "mess" / str(int(todo) % 23) / todo).read_bytes()
        m = RECEIVED.match(mess)
        assert m and int(m.group(1)) == p.pid != q.proc.pid, mess[:200]
        assert parse_todo((home.queue / "todo" / todo).read_bytes()).pid == p.pid
    finally:
        assert q.stop() == 0


def test_root_mode_bounce_lines_name_one_qp(site: Site) -> None:
    home = site.home
    p = qq(home, b"Subject: doomed\n\nno such user\n", envelope(b"pq@" + FQDN.encode(), b"nosuch@" + FQDN.encode()))
    assert p.returncode == 0, p.stderr
    d = Running(site, env=ENV)
    try:
        lines = d.wait_for(lambda ls: len([x for x in ls if x.startswith(b"end msg ")]) == 2)
        _wait(lambda: len(_delivered(site)) == 1, 30, "the bounce")
    finally:
        assert d.stop() == 0
    (bline,) = [x for x in lines if x.startswith(b"bounce msg ")]
    qp = int(bline.split()[-1])
    bnum = [int(x.split()[2]) for x in lines if x.startswith(b"new msg ")][-1]
    (info,) = [x for x in lines if x.startswith(b"info msg %d: " % bnum)]
    assert re.fullmatch(rb"info msg %d: bytes \d+ from <> qp %d uid \d+" % (bnum, qp), info), (bline, info)
    (bounce,) = _delivered(site)
    m = re.search(rb"\nReceived: \(qmail (\d+) invoked for bounce\)", b"\n" + bounce)
    assert m and int(m.group(1)) == qp, bounce[:400]
