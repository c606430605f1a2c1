"""Root-mode installations: qmail-queue as root and local users' injection via qmail-queued."""

from __future__ import annotations

import os
import pwd
import subprocess
import time

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
