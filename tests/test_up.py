"""`qmail up` / `qmail down`: the README's run command, as a new user would use it."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import smtplib
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import CI, IS_ROOT, TEST_USER, VENV_BIN, world_dir


def _wait_for(pred: object, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not IS_ROOT, reason="delivers into the test user's passwd home: needs root to act as pqtest")
def test_up_delivers_and_down_stops() -> None:
    base = world_dir()
    os.chown(base, pwd.getpwnam(TEST_USER).pw_uid, -1)
    home = base / "q"
    maildir = Path(pwd.getpwnam(TEST_USER).pw_dir) / "Maildir"
    env = {"PATH": "/usr/bin:/bin", "HOME": pwd.getpwnam(TEST_USER).pw_dir}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        smtp_port = probe.getsockname()[1]
    up = subprocess.Popen([VENV_BIN / "qmail", "up", "--home", home, "--smtp-port", str(smtp_port),
                           "--qmtp-port", "0"], user=TEST_USER, group=pwd.getpwnam(TEST_USER).pw_gid, extra_groups=[],
                          env=env, cwd=base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True)
    try:
        assert up.stdout is not None
        lines = []
        for line in up.stdout:
            lines.append(line.decode())
            if "stop with" in lines[-1]:
                break
        text = "".join(lines)
        assert "running in" in text and f"{maildir}/" in text, text
        assert "localhost.localdomain" in (home / "control" / "me").read_text()
        subject = f"up-test {uuid.uuid4()}"
        r = subprocess.run([home / "bin" / "qmail-inject", TEST_USER], input=f"Subject: {subject}\n\nhi\n".encode(),
                           user=TEST_USER, group=pwd.getpwnam(TEST_USER).pw_gid, extra_groups=[], env=env, capture_output=True, timeout=30)
        assert r.returncode == 0, r

        def delivered() -> bool:
            for f in (maildir / "new").iterdir():
                if subject.encode() in f.read_bytes():
                    return True
            return False

        assert _wait_for(delivered), (home / "log" / "qmail-send.log").read_text()
        # Over SMTP with swaks, to the address `qmail up` printed.
        address = re.search(r"mail to (\S+) is delivered", text).group(1)  # type: ignore[union-attr]
        swaks = shutil.which("swaks")
        if swaks is None and CI:
            pytest.fail("swaks missing: .ci/run installs it")
        subject = f"up-test smtp {uuid.uuid4()}"
        if swaks is not None:
            r = subprocess.run([swaks, "--server", "127.0.0.1", "--port", str(smtp_port), "--to", address,
                                "--from", "someone@example.org", "--header", f"Subject: {subject}"],
                               capture_output=True, timeout=60)
            assert r.returncode == 0, r
        else:
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as s:
                s.sendmail("someone@example.org", [address], f"Subject: {subject}\r\n\r\nhi\r\n")
        assert _wait_for(delivered), (home / "log" / "qmail-send.log").read_text()
        d = subprocess.run([VENV_BIN / "qmail", "down", "--home", home], user=TEST_USER, group=pwd.getpwnam(TEST_USER).pw_gid, extra_groups=[],
                           env=env, capture_output=True, timeout=150)
        assert d.returncode == 0, d
        assert up.wait(timeout=30) == 0
        log = (home / "log" / "qmail-send.log").read_text()
        assert log.rstrip().endswith("status: exiting"), log
    finally:
        if up.poll() is None:
            # Whatever failed, leave no mail system running behind the test.
            import signal
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        if up.stdout is not None:
            up.stdout.close()


def test_down_without_up_says_so() -> None:
    base = world_dir()
    r = subprocess.run([VENV_BIN / "qmail", "down", "--home", base / "none"], capture_output=True, timeout=30)
    assert r.returncode == 111 and b"nothing runs" in r.stderr
