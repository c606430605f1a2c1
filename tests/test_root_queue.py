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


# --- group commit of todo/ in qmail-queued (issue 17) ----------------------------------------

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


def test_group_commit_failure_takes_the_message_back(root_home: QHome) -> None:
    # The server fsyncs todo/ for its children; when that fails the child takes the message back.
    ctl = root_home.path.parent / "fsync-fail"
    ctl.write_text("*/queue/todo\n")
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


def test_group_commit_every_todo_fsync_is_the_servers(root_home: QHome, tmp_path: Path) -> None:
    """20 clients at once: every todo/ fsync is made by the server, at most one per message."""
    if shutil.which("strace") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("strace missing: .ci/run installs it")
        pytest.skip("strace missing")
    log = tmp_path / "strace.out"
    p = _queued_with(root_home, {}, ["strace", "-f", "-qq", "-y", "-o", str(log), "-e", "trace=fsync"])
    server = int((root_home.queue / "lock" / "queued").read_text().split()[0])
    try:
        pw = pwd.getpwnam(TEST_USER)
        procs = []
        for i in range(20):
            r, w = os.pipe()
            os.write(w, envelope(b"pqtest@x", f"r{i}@y".encode()))
            os.close(w)
            procs.append(subprocess.Popen([root_home.bin("qmail-queue")], stdin=subprocess.PIPE, stdout=r,
                                          user=pw.pw_uid, group=pw.pw_gid, extra_groups=[],
                                          env={"PATH": "/usr/bin:/bin"}))
            os.close(r)
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"Subject: many\n\nx\n")
            proc.stdin.close()
        assert [proc.wait(timeout=60) for proc in procs] == [0] * 20
    finally:
        _stop(p, server)
    assert len(files(root_home.queue)["todo"]) == 20
    todo_syncs = [line for line in log.read_text().splitlines() if re.search(r"fsync\(\d+</.*/queue/todo>\)", line)]
    assert 1 <= len(todo_syncs) <= 20, todo_syncs
    assert {int(line.split()[0]) for line in todo_syncs} == {server}, todo_syncs
    print(f"{len(todo_syncs)} fsyncs of todo/ for 20 messages")


def test_group_commit_child_without_its_server_fsyncs_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pyqmail.queue import qmail_queued

    (tmp_path / "todo").mkdir()
    monkeypatch.chdir(tmp_path)
    mine, theirs = socket.socketpair()
    mine.close()  # the server was killed: the child's own fsync of todo/, no failure
    qmail_queued.child_commit(theirs)()
    theirs.close()
    mine, theirs = socket.socketpair()
    mine.sendall(qmail_queued.COMMIT_FAILED)
    with pytest.raises(OSError):
        qmail_queued.child_commit(theirs)()
    assert mine.recv(1) == qmail_queued.COMMIT_ASK
    mine.close()
    theirs.close()


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
