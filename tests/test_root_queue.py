"""Root-mode installations: qmail-queue as root and local users' injection via qmail-queued."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import TEST_USER, QHome
from queuefmt import RECEIVED, files, parse_todo
from test_qmail_queue import envelope, qq


@pytest.fixture
def queued(root_home: QHome) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([root_home.bin("qmail-queued")], env={"PATH": "/usr/bin:/bin"},
                         stderr=subprocess.PIPE)
    sock = root_home.path / "run" / "qmail-queue.sock"
    for _ in range(500):
        if sock.exists():
            break
        assert p.poll() is None, p.stderr.read() if p.stderr else b""
        time.sleep(0.01)
    yield p
    p.terminate()
    p.wait(timeout=10)
    if p.stderr is not None:
        p.stderr.close()


def _only_message(home: QHome) -> tuple[int, bytes, bytes]:
    (name,) = files(home.queue)["todo"]
    num = int(name)
    mess = home.queue / "mess" / str(num % 23) / name
    return num, mess.read_bytes(), (home.queue / "todo" / name).read_bytes()


def test_root_queues_as_qmailq(root_home: QHome) -> None:
    p = qq(root_home, b"Subject: root\n\nhi\n", envelope(b"root@x", b"a@y"))
    assert p.returncode == 0, p.stderr
    num, mess, todo = _only_message(root_home)
    m = RECEIVED.match(mess)
    assert m and m.group(2) == b"invoked by uid 0"
    assert parse_todo(todo).uid == 0
    qmailq = pwd.getpwnam("qmailq").pw_uid
    st = (root_home.queue / "mess" / str(num % 23) / str(num)).stat()
    assert st.st_uid == qmailq


def test_local_user_injects_through_qmail_queued(root_home: QHome, queued: subprocess.Popen[bytes]) -> None:
    uid = pwd.getpwnam(TEST_USER).pw_uid
    p = qq(root_home, b"Subject: user\n\nhello\n", envelope(b"pqtest@x", b"b@y"), user=TEST_USER)
    assert p.returncode == 0, p.stderr
    num, mess, todo = _only_message(root_home)
    m = RECEIVED.match(mess)
    assert m and m.group(2) == f"invoked by uid {uid}".encode(), mess[:100]
    assert mess[m.end():] == b"Subject: user\n\nhello\n"
    env = parse_todo(todo)
    assert env.uid == uid and env.sender == b"pqtest@x" and env.recipients == [b"b@y"]
    assert (root_home.queue / "todo" / str(num)).stat().st_uid == pwd.getpwnam("qmailq").pw_uid


def test_network_and_bounce_users_are_named(root_home: QHome, queued: subprocess.Popen[bytes]) -> None:
    for user, words in (("qmaild", b"invoked from network"), ("qmails", b"invoked for bounce"),
                        ("alias", b"invoked by alias")):
        p = qq(root_home, b"x\n", envelope(b"", b"b@y"), user=user)
        assert p.returncode == 0, (user, p.stderr)
    seen = set()
    for name in files(root_home.queue)["todo"]:
        num = int(name)
        m = RECEIVED.match((root_home.queue / "mess" / str(num % 23) / name).read_bytes())
        assert m
        seen.add(m.group(2))
    assert seen == {b"invoked from network", b"invoked for bounce", b"invoked by alias"}


def test_local_user_envelope_errors_pass_through(root_home: QHome, queued: subprocess.Popen[bytes]) -> None:
    p = qq(root_home, b"x\n", b"Xbad\0\0", user=TEST_USER)
    assert p.returncode == 91
    p = qq(root_home, b"x\n", b"Fa\0", user=TEST_USER)
    assert p.returncode == 54
    assert files(root_home.queue)["todo"] == [] and files(root_home.queue)["mess"] == []


def test_local_user_without_server_drops_into_maildrop(root_home: QHome) -> None:
    # No qmail-queued: the message waits in maildrop/ (tests/test_intake_root.py has the rest).
    p = qq(root_home, b"x\n", envelope(b"a", b"b"), user=TEST_USER)
    assert p.returncode == 0, p.stderr
    assert files(root_home.queue)["mess"] == []
    (drop,) = os.listdir(root_home.path / "maildrop")
    assert drop.startswith("m")
    assert (root_home.path / "maildrop" / drop).stat().st_uid == pwd.getpwnam(TEST_USER).pw_uid


def test_local_user_cannot_write_queue_directly(root_home: QHome) -> None:
    # The queue is writable only by qmailq: the permissions qmail's install gives.
    assert (root_home.queue.stat().st_mode & 0o777) == 0o750
    uid = pwd.getpwnam(TEST_USER).pw_uid
    assert root_home.queue.stat().st_uid != uid
    r = subprocess.run(["ls", str(root_home.queue / "todo")], user=TEST_USER, capture_output=True)
    assert r.returncode != 0


# --- the commit order: one fsync of the envelope after the todo link (issue 17) ---------------

def _queued_with(root_home: QHome, env: dict[str, str], prefix: list[str] | None = None) -> subprocess.Popen[bytes]:
    sock = root_home.path / "run" / "qmail-queue.sock"
    p = subprocess.Popen([*(prefix or []), root_home.bin("qmail-queued")], env={"PATH": "/usr/bin:/bin", **env},
                         stderr=subprocess.PIPE)
    for _ in range(1000):
        if sock.exists():
            break
        assert p.poll() is None, p.stderr.read() if p.stderr else b""
        time.sleep(0.01)
    return p


def _stop(p: subprocess.Popen[bytes], server: int = 0) -> None:
    if server:
        os.kill(server, signal.SIGTERM)  # p is strace: the server stops, strace ends with it
    else:
        p.terminate()
    p.wait(timeout=30)
    if p.stderr is not None:
        p.stderr.close()


def test_envelope_fsync_failure_after_the_link_takes_the_message_back(root_home: QHome) -> None:
    # A worker's fsync of intd/N (made after the todo link) fails: todo/N is taken back, exit 53.
    ctl = root_home.path.parent / "fsync-fail"
    ctl.write_text("*/queue/intd/*\n")
    ctl.chmod(0o644)
    p = _queued_with(root_home, {"PYQMAIL_TEST_FSYNC_FAIL": str(ctl)})
    try:
        res = qq(root_home, b"Subject: g\n\ng\n", envelope(b"pqtest@x", b"b@y"), user=TEST_USER)
        assert res.returncode == 53, res.stderr
        assert files(root_home.queue)["todo"] == []
        ctl.unlink()
        res = qq(root_home, b"Subject: g\n\ng\n", envelope(b"pqtest@x", b"b@y"), user=TEST_USER)
        assert res.returncode == 0, res.stderr
        assert len(files(root_home.queue)["todo"]) == 1
    finally:
        _stop(p)


def _need_strace() -> None:
    if shutil.which("strace") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("strace missing: .ci/run installs it")
        pytest.skip("strace missing")


# strace -f -y lines (a call cut by another process's is printed "<unfinished ...>": its entry counts).
_EVENT = re.compile(r'^(\d+) +(?:(fsync|fdatasync)\(\d+<([^>]*)>|(link|rename)\("([^"]*)", "([^"]*)"'
                    r'|(sendto)\(\d+<.*?>, "([^"]*)", 1,|\+\+\+ exited with (\d+) \+\+\+)')


def _events(log: Path) -> dict[int, list[tuple[str, ...]]]:
    """Per pid, the traced calls that did not fail, in order: (call, args...) and ("exit", code)."""
    out: dict[int, list[tuple[str, ...]]] = {}
    for line in log.read_text().splitlines():
        m = _EVENT.match(line)
        if m is None or " = -1 " in line:
            continue
        pid = int(m.group(1))
        if m.group(2):
            ev: tuple[str, ...] = (m.group(2), m.group(3))
        elif m.group(4):
            ev = (m.group(4), m.group(5), m.group(6))
        elif m.group(7):
            ev = ("sendto", m.group(8))
        else:
            ev = ("exit", m.group(9))
        out.setdefault(pid, []).append(ev)
    return out


def _check_commit_order(evs: list[tuple[str, ...]], num: int) -> int:
    """In one process's events: mess/N fsync'd, todo/N linked, then intd/N fsync'd; return that fsync's index.

    The fsync before the link is the message's (through pid/'s descriptor), the
    first after it the envelope's; none is of a directory.
    """
    i_link = evs.index(("link", f"intd/{num}", f"todo/{num}"))
    i_mess = max(i for i, e in enumerate(evs[:i_link]) if e[0] in ("fsync", "fdatasync"))
    assert evs[i_mess][0] == "fsync" and "/queue/pid/" in evs[i_mess][1], evs
    i_intd = next(i for i in range(i_link, len(evs)) if evs[i][0] in ("fsync", "fdatasync"))
    assert evs[i_intd] == ("fsync", evs[i_intd][1]) and evs[i_intd][1].endswith(f"/queue/intd/{num}"), evs
    assert all(e[0] != "rename" for e in evs[i_link:i_intd]), evs  # a flat queue: no big-todo rename
    return i_intd


def test_qmail_queue_commit_order_under_strace(root_home: QHome, tmp_path: Path) -> None:
    """qmail-queue (root): mess/N fsync'd, todo/N linked, then intd/N fsync'd, and exit 0 only after it."""
    _need_strace()
    log = tmp_path / "strace.out"
    p = qq(root_home, b"Subject: o\n\no\n", envelope(b"root@x", b"a@y"),
           prefix=["strace", "-f", "-q", "-y", "-o", str(log), "-e", "trace=link,rename,fsync,fdatasync"])
    assert p.returncode == 0, p.stderr
    num = int(files(root_home.queue)["todo"][0])
    by_pid = _events(log)
    (pid,) = [k for k, evs in by_pid.items() if any(e[0] == "fsync" for e in evs)]
    evs = by_pid[pid]
    assert [e[0] for e in evs if e[0] in ("fsync", "fdatasync")] == ["fsync", "fsync"], evs
    i_intd = _check_commit_order(evs, num)
    assert evs[i_intd + 1:] == [("exit", "0")], evs


def test_big_todo_rename_comes_before_the_envelope_fsync(tmp_path: Path) -> None:
    """A big-todo queue: link intd/D/N -> todo/N, rename into todo/D/N, then the one fsync of intd/D/N."""
    from conftest import make_home

    _need_strace()
    home = make_home("test.example.com", "--big-todo")
    try:
        log = tmp_path / "strace.out"
        p = qq(home, b"Subject: b\n\nb\n", envelope(b"s@x", b"a@y"),
               prefix=["strace", "-f", "-q", "-y", "-o", str(log), "-e", "trace=link,rename,fsync,fdatasync"])
        assert p.returncode == 0, p.stderr
        (name,) = files(home.queue)["todo"]
        d, num = name.split("/")
        by_pid = _events(log)
        (evs,) = [v for v in by_pid.values() if any(e[0] == "fsync" for e in v)]
        names = [e[0] for e in evs]
        assert names == ["link", "fsync", "link", "rename", "fsync", "exit"], evs
        assert evs[2] == ("link", f"intd/{d}/{num}", f"todo/{num}"), evs
        assert evs[3] == ("rename", f"todo/{num}", f"todo/{d}/{num}"), evs
        assert evs[4][1].endswith(f"/queue/intd/{d}/{num}") and evs[5] == ("exit", "0"), evs
    finally:
        shutil.rmtree(home.path.parent, ignore_errors=True)


def test_qmail_queued_worker_commit_order_under_strace(root_home: QHome, tmp_path: Path) -> None:
    """Through qmail-queued: the worker's two fsyncs in the same order, its answer 0 after them; nothing else fsyncs."""
    _need_strace()
    log = tmp_path / "strace.out"
    p = _queued_with(root_home, {}, ["strace", "-f", "-qq", "-y", "-o", str(log), "-e",
                                     "trace=link,rename,fsync,fdatasync,sendto"])
    server = int((root_home.queue / "lock" / "queued").read_text().split()[0])
    try:
        for i in range(3):
            res = qq(root_home, b"Subject: w\n\nw\n", envelope(b"pqtest@x", f"r{i}@y".encode()), user=TEST_USER)
            assert res.returncode == 0, res.stderr
    finally:
        _stop(p, server)
    nums = sorted(int(n) for n in files(root_home.queue)["todo"])
    assert len(nums) == 3
    by_pid = _events(log)
    syncs = {pid: [e for e in evs if e[0] in ("fsync", "fdatasync")] for pid, evs in by_pid.items()}
    assert sum(len(v) for v in syncs.values()) == 6, syncs  # two per message, no directory, no group commit
    assert not syncs.get(server), syncs  # the server itself fsyncs nothing any more
    for num in nums:
        link = ("link", f"intd/{num}", f"todo/{num}")
        (pid,) = [k for k, evs in by_pid.items() if link in evs]
        evs = by_pid[pid]
        i_intd = _check_commit_order(evs, num)
        assert ("sendto", "\\0") in evs[i_intd:], evs  # the exit byte 0 to the client, after the fsync


def test_local_client_imports_no_socket_module(root_home: QHome, queued: subprocess.Popen[bytes]) -> None:
    """The client's handover to qmail-queued uses _socket: socket imports enum and selectors (issue 17)."""
    import sys

    from conftest import ROOT

    code = (f"import os, sys; sys.path.insert(0, {str(ROOT / 'src')!r}); "
            "from pyqmail.queue import qmail_queue; "
            f"code = qmail_queue.hand_to_server({str(root_home.path)!r}); "
            "os.write(2, (str(code) + ' ' + ' '.join(m for m in ('socket', 'enum', 'selectors') "
            "if m in sys.modules)).encode())")
    r, w = os.pipe()
    os.write(w, envelope(b"pqtest@x", b"b@y"))
    os.close(w)
    pw = pwd.getpwnam(TEST_USER)
    try:
        p = subprocess.run([sys.executable, "-IS", "-c", code], input=b"Subject: s\n\ns\n", stdout=r,
                           stderr=subprocess.PIPE, user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], timeout=60)
    finally:
        os.close(r)
    assert p.stderr.strip() == b"0", p.stderr
    assert len(files(root_home.queue)["todo"]) == 1
