"""Issue 11's admin routine, as root, on a whole system under supervision in a /var/qmail-style home.

`qmail up` in root mode (send, queued and smtpd services under svscan, on a
free port instead of 25): intake never depends on qmail-send or qmail-queued
(svc -d, svc -k), a second qmail up / qmail-start / qmail-queued is refused and
disturbs nothing, and mail for postmaster reaches the alias files.
"""

from __future__ import annotations

import os
import pwd
import signal
import smtplib
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import IS_ROOT, TEST_USER, VENV_BIN, world_dir
from test_up import _free_port, _kill_group, _port_open, _read_until_ready, _wait_for

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="a root-mode system: qmail's users and delivery as pqtest")

ENV = {"PATH": "/usr/bin:/bin"}


def _svc(home: Path, flag: str, *names: str) -> None:
    r = subprocess.run([home / "bin" / "svc", flag, *(home / "service" / n for n in names)],
                       capture_output=True, timeout=30)
    assert r.returncode == 0, r


def _state(home: Path, name: str) -> str:
    from pyqmail.svc import status

    try:
        st = status.read(str(home / "service" / name))
    except status.StatusError:
        return "not supervised yet"
    return "up" if st.pid else "down"


def _pid(home: Path, name: str) -> int:
    from pyqmail.svc import status

    try:
        return status.read(str(home / "service" / name)).pid
    except status.StatusError:
        return 0


def _lock_holder(home: Path) -> str:
    """Return what qmail-queued's lock file says: "PID" (standalone) or "PID p" (qmail-start's)."""
    try:
        return (home / "queue" / "lock" / "queued").read_text().strip()
    except FileNotFoundError:
        return ""


def _serving(home: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        try:
            c.connect(str(home / "run" / "qmail-queue.sock"))
        except OSError:
            return False
        return True


def _user_maildir() -> Path:
    pw = pwd.getpwnam(TEST_USER)
    top = Path(pw.pw_dir) / "Maildir"
    for d in (Path(pw.pw_dir), top, top / "tmp", top / "new", top / "cur"):
        if not d.exists():
            d.mkdir(mode=0o700)
            os.chown(d, pw.pw_uid, pw.pw_gid)
    return top


def _count(maildir: Path, tag: str) -> int:
    return sum(tag.encode() in f.read_bytes() for f in (maildir / "new").iterdir())


def _inject_both(home: Path, port: int, me: str, tag: str) -> None:
    """One message over SMTP, one by qmail-inject as pqtest; both must be accepted."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        refused = s.sendmail("someone@example.org", [f"{TEST_USER}@{me}"], f"Subject: {tag} smtp\r\n\r\nhi\r\n")
        assert refused == {}
    pw = pwd.getpwnam(TEST_USER)
    r = subprocess.run([home / "bin" / "qmail-inject", TEST_USER], input=f"Subject: {tag} inject\n\nhi\n".encode(),
                       user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], env=dict(ENV, HOME=pw.pw_dir),
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r


def test_root_system_intake_restarts_and_aliases() -> None:
    base = world_dir()
    home = base / "var" / "qmail"
    home.parent.mkdir()
    maildir = _user_maildir()
    port = _free_port()
    up = subprocess.Popen([VENV_BIN / "qmail", "up", "--home", home, "--smtp-port", str(port),
                           "--pop3-port", "0", "--qmtp-port", "0", "--submission-port", "0", "--smtps-port", "0", "--pop3s-port", "0"],
                          env=ENV, cwd=base,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        text = _read_until_ready(up)
        assert "(root mode)" in text, text
        assert sorted(os.listdir(home / "service")) == ["queued", "rcptcheckd", "send", "smtpd"]
        me = (home / "control" / "me").read_text().strip()
        for name in ("send", "queued", "smtpd"):
            assert _wait_for(lambda name=name: _state(home, name) == "up"), name
        assert _wait_for(lambda: _port_open(port))
        assert _wait_for(lambda: (home / "run" / "qmail-queue.sock").exists())

        def delivered(tag: str) -> bool:
            return _count(maildir, tag) == 2

        def log() -> str:
            return (home / "log" / "send" / "current").read_text()

        # 1. qmail-send stopped: intake goes on; delivery when it is back.
        _svc(home, "-d", "send")
        assert _wait_for(lambda: _state(home, "send") == "down")
        tag = f"send-down {uuid.uuid4()}"
        _inject_both(home, port, me, tag)
        time.sleep(0.5)
        assert _count(maildir, tag) == 0
        _svc(home, "-u", "send")
        assert _wait_for(lambda: delivered(tag), 60), log()

        # 2. qmail-send and qmail-queued both stopped: the maildrop takes the mail.
        _svc(home, "-d", "send", "queued")
        assert _wait_for(lambda: _state(home, "send") == "down" and _state(home, "queued") == "down")
        tag = f"both-down {uuid.uuid4()}"
        _inject_both(home, port, me, tag)
        assert _wait_for(lambda: len([n for n in os.listdir(home / "maildrop") if n.startswith("m")]) == 2)
        _svc(home, "-u", "queued", "send")
        assert _wait_for(lambda: delivered(tag), 60), log()

        # 3. qmail-queued killed: supervise starts it again, nothing is refused meanwhile.
        from pyqmail.svc import status

        before = status.read(str(home / "service" / "queued")).pid
        os.kill(before, signal.SIGKILL)
        tag = f"queued-killed {uuid.uuid4()}"
        _inject_both(home, port, me, tag)
        assert _wait_for(lambda: delivered(tag), 60), log()
        assert _wait_for(lambda: _pid(home, "queued") not in (0, before))
        # qmail-start's -p instance holds the lock (and the socket) from the kill until the
        # supervised one, restarted a second later, takes over: wait for that to be done.
        assert _wait_for(lambda: _lock_holder(home) == f"{_pid(home, 'queued')}" and _serving(home), 60), \
            (_lock_holder(home), _pid(home, "queued"))

        # 4. A second qmail up, qmail-start and qmail-queued: refused, the system undisturbed.
        sock_ino = (home / "run" / "qmail-queue.sock").stat().st_ino
        second = subprocess.run([VENV_BIN / "qmail", "up", "--home", home, "--smtp-port", str(_free_port()),
                                 "--pop3-port", "0", "--qmtp-port", "0", "--submission-port", "0", "--smtps-port", "0", "--pop3s-port", "0"],
                                env=ENV, capture_output=True, timeout=120)
        assert second.returncode == 111, second
        assert b"already running" in second.stderr or b"already run" in second.stderr, second
        start = subprocess.run([home / "bin" / "qmail-start", "./Maildir/"], env=ENV, cwd=home,
                               capture_output=True, timeout=60)
        assert start.returncode == 111 and b"alert: cannot start: qmail-send is already running" in start.stdout, start
        queued = subprocess.run([home / "bin" / "qmail-queued"], env=ENV, capture_output=True, timeout=60)
        assert queued.returncode == 111 and b"qmail-queued is already running" in queued.stderr, queued
        assert (home / "run" / "qmail-queue.sock").stat().st_ino == sock_ino
        for name in ("send", "queued", "smtpd"):
            assert _state(home, name) == "up", name
        tag = f"after-second {uuid.uuid4()}"
        _inject_both(home, port, me, tag)
        assert _wait_for(lambda: delivered(tag), 60), log()

        # 5. Mail for postmaster reaches the alias files, whatever passwd says the alias home is.
        alias_maildir = home / "alias" / "Maildir"
        tag = f"postmaster {uuid.uuid4()}"
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
            s.sendmail("someone@example.org", [f"postmaster@{me}", f"root@{me}"], f"Subject: {tag}\r\n\r\nhi\r\n")
        assert _wait_for(lambda: _count(alias_maildir, tag) == 2, 60), log()
        # ... where `qmail up` said it would go.
        assert (f"qmail up: mail to postmaster@{me} (and root, mailer-daemon) goes by "
                f"{home}/alias/.qmail-postmaster: the alias user's default delivery, {home}/alias/Maildir/") in text, text

        d = subprocess.run([VENV_BIN / "qmail", "down", "--home", home], env=ENV, capture_output=True, timeout=300)
        assert d.returncode == 0, d
        assert up.wait(timeout=60) == 0
        assert not _port_open(port)
        assert os.listdir(home / "maildrop") == []
    finally:
        _kill_group(up, home)
