"""More real clients through the 587 service `qmail up` runs (issue 14, Must show): s-nail with
smtp-auth over STARTTLS and swaks --auth LOGIN --tls, each message relayed (RELAYCLIENT) to a
remote sink with a Received line saying ESMTPSA. (smtplib.login() and swaks --auth PLAIN are in
tests/test_submission.py; CRAM-MD5 is not offered on 587: `qmail up`'s users have hashed
passwords, so its checkprogram cannot answer a challenge; swaks --auth CRAM-MD5 against
qmail-smtpd with a CRAM-capable checkprogram is in tests/test_smtpd_auth.py.)"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import CI, IS_ROOT, TEST_USER, VENV_BIN, world_dir
from test_submission import REMOTE, Sink
from test_up import _as_user, _free_port, _kill_group, _port_open, _read_until_ready, _wait_for


def need(prog: str, package: str) -> str | None:
    path = shutil.which(prog)
    if path is None and CI:
        pytest.fail(f"{prog} missing: .ci/run installs {package}")
    return path


@pytest.mark.skipif(not IS_ROOT, reason="runs `qmail up` as the ordinary user pqtest, as tests/test_up.py")
def test_snail_and_swaks_login_through_587() -> None:
    base = world_dir()
    os.chown(base, pwd.getpwnam(TEST_USER).pw_uid, -1)
    home = base / "q"
    env = {"PATH": "/usr/bin:/bin", "HOME": pwd.getpwnam(TEST_USER).pw_dir}
    sub_port = _free_port()
    sink = Sink()
    up = subprocess.Popen([VENV_BIN / "qmail", "up", "--home", home, "--smtp-port", "0", "--pop3-port", "0",
                           "--qmtp-port", "0", "--smtps-port", "0", "--pop3s-port", "0",
                           "--submission-port", str(sub_port)], **_as_user(),  # type: ignore[call-overload]
                          env=env, cwd=base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True)
    try:
        text = _read_until_ready(up)
        m = re.search(r"port (\d+), STARTTLS, password authentication \(PLAIN or LOGIN\) as user (\S+), "
                      r"password in (\S+)", text)
        assert m is not None, text
        user, password = m.group(2), Path(m.group(3)).read_text().strip()
        (home / "control" / "smtproutes").write_text(f"remote.example:127.0.0.1:{sink.port}\n")
        assert _wait_for(lambda: _port_open(sub_port), 120), (home / "log" / "submission" / "current").read_text()

        def arrived(subject: str) -> bytes:
            assert _wait_for(lambda: sink.has(subject) is not None), (home / "log" / "send" / "current").read_text()
            got = sink.has(subject) or b""
            assert re.search(rb"Received: from .*\(" + re.escape(user.encode()) + rb"@127\.0\.0\.1\)\s+by \S+ "
                             rb"with ESMTPSA", got), got
            return got

        snail = need("s-nail", "s-nail")
        if snail is not None:
            subject = f"submission s-nail {uuid.uuid4()}"
            # s-nail 14.9's variables (s-nail(1)): no rc files (-:/), STARTTLS, AUTH PLAIN, qmail init's
            # self-signed certificate accepted (tls-verify=ignore), sendwait for the SMTP result.
            r = subprocess.run([snail, "-:/", "-S", "sendwait", "-S", f"mta=smtp://127.0.0.1:{sub_port}",
                                "-S", "smtp-use-starttls", "-S", "smtp-auth=plain", "-S", f"smtp-auth-user={user}",
                                "-S", f"smtp-auth-password={password}", "-S", "tls-verify=ignore",
                                "-S", "hostname=client.example.org",
                                "-r", f"{user}@example.org", "-s", subject, REMOTE],
                               input=b"via s-nail\n", capture_output=True, timeout=60, env=env)
            assert r.returncode == 0, r
            assert b"via s-nail" in arrived(subject)
        swaks = need("swaks", "swaks")
        if swaks is not None:
            subject = f"submission swaks login {uuid.uuid4()}"
            r = subprocess.run([swaks, "--server", "127.0.0.1", "--port", str(sub_port), "--tls", "--auth", "LOGIN",
                                "--auth-user", user, "--auth-password", password, "--to", REMOTE,
                                "--from", f"{user}@example.org", "--header", f"Subject: {subject}"],
                               capture_output=True, timeout=60)
            assert r.returncode == 0, r
            assert b"AUTH LOGIN" in r.stdout
            arrived(subject)
            # CRAM-MD5 is not offered on 587: swaks says so and sends nothing.
            r = subprocess.run([swaks, "--server", "127.0.0.1", "--port", str(sub_port), "--tls", "--auth", "CRAM-MD5",
                                "--auth-user", user, "--auth-password", password, "--to", REMOTE,
                                "--from", f"{user}@example.org"], capture_output=True, timeout=60)
            assert r.returncode != 0 and b"250-AUTH LOGIN PLAIN\n" in r.stdout, r
            assert b"Auth not attempted, requested type not available" in r.stderr, r
        d = subprocess.run([VENV_BIN / "qmail", "down", "--home", home], **_as_user(),  # type: ignore[call-overload]
                           env=env, capture_output=True, timeout=300)
        assert d.returncode == 0, d
        assert up.wait(timeout=30) == 0
    finally:
        _kill_group(up, home)
        sink.close()
