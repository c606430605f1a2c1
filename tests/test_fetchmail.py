"""A real POP3 client against our stack: fetchmail (Debian package fetchmail) fetching from
tcpserver -> qmail-popup -> checkpassword -> qmail-pop3d on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CI, IS_ROOT, TEST_USER, QHome, expect, run

PASSWORD = "fetch-pass"


def fetchmail() -> str:
    path = shutil.which("fetchmail")
    if path is None:
        if CI:
            pytest.fail("fetchmail missing: .ci/run should have installed the fetchmail package")
        pytest.skip("fetchmail not installed (Debian package fetchmail)")
    return path


def test_fetchmail_fetches_and_deletes(qhome: QHome, tmp_path: Path) -> None:
    tool = fetchmail()
    extra = ["--uid", TEST_USER] if IS_ROOT else []
    expect(run([qhome.bin("qmail"), "user", "add", "--home", str(qhome.path), *extra, "fm@example.org"],
               input=PASSWORD.encode() + b"\n"))
    md = qhome.path / "pop" / "fm@example.org" / "Maildir"
    st = md.stat()
    texts = [b"From: a@b.example\nSubject: fetch %d\n\nbody %d\n.\n..two dots\n" % (i, i) for i in range(3)]
    for i, text in enumerate(texts):
        p = md / "new" / f"{1000 + i}.{i}.host"
        p.write_bytes(text)
        os.chown(p, st.st_uid, st.st_gid)
        t = time.time() - 100 + i
        os.utime(p, (t, t))
    out = tmp_path / "out"
    out.mkdir()
    env = {"PATH": "/usr/bin:/bin", "QMAILHOME": str(qhome.path), "PYQMAIL_AUTH_DELAY": "0"}
    srv = subprocess.Popen([qhome.bin("tcpserver"), "-1", "-HR", "-l", "pop.example.org", "127.0.0.1", "0",
                            qhome.bin("qmail-popup"), "pop.example.org", qhome.bin("checkpassword"),
                            qhome.bin("qmail-pop3d"), "Maildir"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        assert srv.stdout is not None
        port = int(srv.stdout.readline())
        rc = tmp_path / "fetchmailrc"
        rc.write_text(
            "set no syslog\n"
            f"poll 127.0.0.1 service {port} protocol POP3 auth password timeout 30\n"
            f'  user "fm@example.org" there with password "{PASSWORD}" is "x" here\n'
            f"  mda \"/bin/sh -c 'cat > {out}/m.$$'\"\n"
            "  fetchall nokeep no sslcertck\n")
        rc.chmod(0o600)
        fm_home = tmp_path / "fmhome"
        fm_home.mkdir()
        res = run([tool, "-f", str(rc), "--nodetach", "-v"],
                  env={"PATH": "/usr/bin:/bin", "FETCHMAILHOME": str(fm_home), "HOME": str(fm_home)})
        assert res.returncode == 0, res.explain()
    finally:
        srv.terminate()
        srv.wait(30)
        if srv.stdout is not None:
            srv.stdout.close()
    got = sorted((p.read_bytes() for p in out.iterdir()), key=lambda b: b[b.index(b"Subject"):])
    assert len(got) == 3
    for text, mail in zip(texts, got):
        # fetchmail prepends its Received: field; the message arrives byte for byte, plus the
        # empty line qmail-pop3d (like C qmail's) always sends before the final ".".
        assert mail.endswith(b"\n" + text + b"\n"), mail
        assert mail.startswith(b"Received: from 127.0.0.1 [127.0.0.1]\n"), mail
    assert os.listdir(md / "new") == [] and os.listdir(md / "cur") == []
