"""`qmail up` / `qmail down`: the README's run command, as a new user would use it."""

from __future__ import annotations

import os
import poplib
import pwd
import re
import shutil
import signal
import smtplib
import socket
import ssl
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


def _as_user() -> dict[str, object]:
    pw = pwd.getpwnam(TEST_USER)
    return {"user": TEST_USER, "group": pw.pw_gid, "extra_groups": []}


def _read_until_ready(up: subprocess.Popen[bytes]) -> str:
    assert up.stdout is not None
    lines = []
    for line in up.stdout:
        lines.append(line.decode())
        if "stop with" in lines[-1]:
            break
    return "".join(lines)


def _swaks(port: int, address: str, subject: str) -> None:
    swaks = shutil.which("swaks")
    if swaks is None and CI:
        pytest.fail("swaks missing: .ci/run installs it")
    if swaks is not None:
        r = subprocess.run([swaks, "--server", "127.0.0.1", "--port", str(port), "--to", address,
                            "--from", "someone@example.org", "--header", f"Subject: {subject}"],
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r
    else:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.sendmail("someone@example.org", [address], f"Subject: {subject}\r\n\r\nhi\r\n")


def _pop3_has(port: int, user: str, password: str, subject: str) -> bool:
    """Log in over POP3 and say whether a message with subject is there."""
    p = poplib.POP3("127.0.0.1", port, timeout=30)
    try:
        try:
            caps = p.capa()
        except poplib.error_proto:
            caps = {}  # qmail 1.03's qmail-popup has no CAPA
        if "STLS" in caps:  # qmail up's POP3 service sets $FORCETLS: no password before STLS
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # qmail init's self-signed certificate (tests/test_certs.py verifies it)
            p.stls(context=ctx)
        p.user(user)
        p.pass_(password)
        count, _ = p.stat()
        return any(subject.encode() in b"\n".join(p.retr(i)[1]) for i in range(1, count + 1))
    finally:
        p.quit()


def _delivered(maildir: Path, subject: str) -> bool:
    return any(subject.encode() in f.read_bytes() for f in (maildir / "new").iterdir())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _kill_group(up: subprocess.Popen[bytes], home: Path) -> None:
    if up.poll() is None:
        # Whatever failed, leave no mail system running behind the test.
        subprocess.run([VENV_BIN / "qmail", "down", "--home", home], capture_output=True, timeout=150)
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
        up.wait()
    if up.stdout is not None:
        up.stdout.close()


@pytest.mark.skipif(not IS_ROOT, reason="delivers into the test user's passwd home: needs root to act as pqtest")
def test_up_supervises_delivers_serves_pop3_and_down_stops() -> None:
    base = world_dir()
    os.chown(base, pwd.getpwnam(TEST_USER).pw_uid, -1)
    home = base / "q"
    maildir = Path(pwd.getpwnam(TEST_USER).pw_dir) / "Maildir"
    env = {"PATH": "/usr/bin:/bin", "HOME": pwd.getpwnam(TEST_USER).pw_dir}
    smtp_port, pop3_port, smtps_port, pop3s_port = _free_port(), _free_port(), _free_port(), _free_port()
    up = subprocess.Popen([VENV_BIN / "qmail", "up", "--home", home, "--smtp-port", str(smtp_port),
                           "--pop3-port", str(pop3_port), "--qmtp-port", "0", "--smtps-port", str(smtps_port),
                           "--pop3s-port", str(pop3s_port), "--submission-port", "0"], **_as_user(),  # type: ignore[call-overload]
                          env=env, cwd=base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True)
    try:
        text = _read_until_ready(up)
        assert "running in" in text and f"{maildir}/" in text, text
        assert "localhost.localdomain" in (home / "control" / "me").read_text()
        # With qmail init's certificate: SMTPS and POP3S too (tests/test_certs.py).
        assert sorted(os.listdir(home / "service")) == ["pop3d", "pop3s", "send", "smtpd", "smtps"]
        subject = f"up-test {uuid.uuid4()}"
        r = subprocess.run([home / "bin" / "qmail-inject", TEST_USER], input=f"Subject: {subject}\n\nhi\n".encode(),
                           **_as_user(), env=env, capture_output=True, timeout=30)  # type: ignore[call-overload]
        assert r.returncode == 0, r
        assert _wait_for(lambda: _delivered(maildir, subject)), (home / "log" / "send" / "current").read_text()
        # Every service and its log under supervise, as the real svstat sees them.
        svstat = shutil.which("svstat")
        if svstat is None and CI:
            pytest.fail("svstat missing: .ci/run installs daemontools")
        names = ("pop3d", "pop3s", "send", "smtpd", "smtps")
        dirs = [str(home / "service" / n / sub) for n in names for sub in ("", "log")]
        if svstat is not None:
            out = subprocess.run([svstat, *dirs], capture_output=True, timeout=30).stdout.decode()
            assert out.count(": up (pid ") == 2 * len(names), out
        # A service whose process dies is started again.
        from pyqmail.svc import status

        before = status.read(str(home / "service" / "smtpd")).pid
        os.kill(before, signal.SIGKILL)
        assert _wait_for(lambda: status.read(str(home / "service" / "smtpd")).pid not in (0, before))
        # Over SMTP with swaks, to the address `qmail up` printed; then POP3 with the printed password.
        address = re.search(r"mail to (\S+) is delivered", text).group(1)  # type: ignore[union-attr]
        subject = f"up-test smtp {uuid.uuid4()}"
        assert _wait_for(lambda: _port_open(smtp_port))
        _swaks(smtp_port, address, subject)
        assert _wait_for(lambda: _delivered(maildir, subject)), (home / "log" / "send" / "current").read_text()
        m = re.search(r"POP3 at 127\.0\.0\.1:(\d+) as user (\S+), password in (\S+)", text)
        assert m is not None, text
        password = Path(m.group(3)).read_text().strip()
        assert int(m.group(1)) == pop3_port
        # qmail-pop3d leaves out messages of the current second: ask again until it is listed.
        assert _wait_for(lambda: _pop3_has(pop3_port, m.group(2), password, subject))
        d = subprocess.run([VENV_BIN / "qmail", "down", "--home", home], **_as_user(),  # type: ignore[call-overload]
                           env=env, capture_output=True, timeout=300)
        assert d.returncode == 0, d
        assert up.wait(timeout=30) == 0
        log = (home / "log" / "send" / "current").read_text()
        assert re.search(r"^@[0-9a-f]{24} status: exiting$", log.rstrip().splitlines()[-1]), log
        assert not _port_open(smtp_port)
    finally:
        _kill_group(up, home)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not IS_ROOT, reason="runs the README's command as the ordinary user pqtest")
def test_readme_run_on_a_fresh_checkout() -> None:
    """`./run` from a fresh clone, as a new user: swaks to the printed address, the printed Maildir, POP3."""
    repo = Path(__file__).resolve().parent.parent
    for port in (2525, 2110, 2209):
        if _port_open(port):
            pytest.fail(f"port {port} is taken: the README's run command needs it")
    base = world_dir()
    checkout = base / "pyqmail"
    subprocess.run(["git", "clone", "--quiet", repo, checkout], check=True, capture_output=True, timeout=120)
    subprocess.run(["chown", "-R", TEST_USER, base], check=True)
    pw = pwd.getpwnam(TEST_USER)
    env = {"PATH": "/usr/bin:/bin", "HOME": pw.pw_dir}
    up = subprocess.Popen([checkout / "run"], **_as_user(), env=env, cwd=checkout,  # type: ignore[call-overload]
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    home = checkout / "qmail-home"
    try:
        text = _read_until_ready(up)
        address = re.search(r"mail to (\S+) is delivered to (\S+)/\n", text)
        assert address is not None, text
        maildir = Path(address.group(2))
        assert maildir == Path(pw.pw_dir) / "Maildir"
        smtp = re.search(r"swaks --server 127\.0\.0\.1 --port (\d+)", text)
        assert smtp is not None and smtp.group(1) == "2525", text
        subject = f"readme-run {uuid.uuid4()}"
        assert _wait_for(lambda: _port_open(2525))
        _swaks(2525, address.group(1), subject)
        assert _wait_for(lambda: _delivered(maildir, subject)), (home / "log" / "send" / "current").read_text()
        m = re.search(r"POP3 at 127\.0\.0\.1:(\d+) as user (\S+), password in (\S+)", text)
        assert m is not None, text
        assert _wait_for(lambda: _port_open(int(m.group(1))))
        password = Path(m.group(3)).read_text().strip()
        assert _wait_for(lambda: _pop3_has(int(m.group(1)), m.group(2), password, subject))
        d = subprocess.run([checkout / ".venv" / "bin" / "qmail", "down", "--home", home], **_as_user(),  # type: ignore[call-overload]
                           env=env, capture_output=True, timeout=300)
        assert d.returncode == 0, d
        assert up.wait(timeout=30) == 0
    finally:
        _kill_group(up, home)


def test_down_without_up_says_so() -> None:
    base = world_dir()
    r = subprocess.run([VENV_BIN / "qmail", "down", "--home", base / "none"], capture_output=True, timeout=30)
    assert r.returncode == 111 and b"nothing runs" in r.stderr
