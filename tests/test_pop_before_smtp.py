"""POP-before-SMTP as the book builds it: qmail-popup -> checkpassword -> saveip -> qmail-pop3d
records the address; tcpserver -> checkauth -> qmail-smtpd lets it relay for ten minutes."""

from __future__ import annotations

import os
import poplib
import smtplib
import stat
import subprocess
import time
from pathlib import Path

import pytest

from conftest import IS_ROOT, TEST_USER, QHome, expect, run

PASSWORD = "pop-pass"
NOGATEWAY = (553, b"sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)")


class TcpServer:
    """QMAILHOME/bin/tcpserver on 127.0.0.1 running argv for each connection."""

    def __init__(self, home: QHome, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            [str(home.bin("tcpserver")), "-1", "-HR", "-l", "mx.test.example.com", "127.0.0.1", "0", *argv],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={"PATH": "/usr/bin:/bin", "QMAILHOME": str(home.path), "PYQMAIL_AUTH_DELAY": "0"})
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def __enter__(self) -> TcpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def pophome(qhome: QHome) -> QHome:
    """qhome with the virtual user pop@example.org, added by `qmail user add`."""
    extra = ["--uid", TEST_USER] if IS_ROOT else []
    expect(run([qhome.bin("qmail"), "user", "add", "--home", str(qhome.path), *extra, "pop@example.org"],
               input=PASSWORD.encode() + b"\n"))
    st = (qhome.path / "authenticated").stat()
    assert stat.S_IMODE(st.st_mode) == 0o755
    return qhome


def pop_login(home: QHome, password: str = PASSWORD) -> None:
    argv = [str(home.bin(p)) for p in ("qmail-popup",)] + [
        "pop.example.org", str(home.bin("checkpassword")), str(home.bin("saveip")),
        str(home.bin("qmail-pop3d")), "Maildir"]
    with TcpServer(home, argv) as srv:
        c = poplib.POP3("127.0.0.1", srv.port, timeout=30)
        c.user("pop@example.org")
        if password == PASSWORD:
            c.pass_(password)
            assert c.stat() == (0, 0)
            c.quit()
        else:
            with pytest.raises(poplib.error_proto, match="authorization failed"):
                c.pass_(password)
            c.close()


def relay_attempt(home: QHome, *opts: str) -> tuple[int, bytes]:
    argv = [str(home.bin("checkauth")), *opts, str(home.bin("qmail-smtpd"))]
    with TcpServer(home, argv) as srv:
        with smtplib.SMTP("127.0.0.1", srv.port, local_hostname="c.example", timeout=30) as s:
            s.helo()
            s.mail("a@c.example")
            return s.rcpt("friend@elsewhere.example")


def stamp(home: QHome) -> Path:
    return home.path / "authenticated" / "127.0.0.1"


def test_pop_login_opens_relay_until_expiry(pophome: QHome) -> None:
    assert relay_attempt(pophome) == NOGATEWAY
    pop_login(pophome, "wrong")
    assert not stamp(pophome).exists()
    assert relay_attempt(pophome) == NOGATEWAY

    pop_login(pophome)
    st = stamp(pophome).stat()
    assert stat.S_IMODE(st.st_mode) == 0o644
    # checkpassword wrote it as the POP3 service's user, before becoming the user who logged in
    assert st.st_uid == os.getuid()
    assert relay_attempt(pophome)[0] == 250

    nine = time.time() - 9 * 60
    os.utime(stamp(pophome), (nine, nine))
    assert relay_attempt(pophome)[0] == 250
    assert relay_attempt(pophome, "-m", "8") == NOGATEWAY  # checkauth's own window

    pop_login(pophome)  # a new login refreshes the stamp
    eleven = time.time() - 11 * 60
    os.utime(stamp(pophome), (eleven, eleven))
    assert relay_attempt(pophome) == NOGATEWAY
    assert not stamp(pophome).exists()  # checkauth removed the stale stamp, as the book's script does
    assert relay_attempt(pophome, "-m15") == NOGATEWAY


def test_future_stamp_is_not_trusted(pophome: QHome) -> None:
    pop_login(pophome)
    later = time.time() + 3600
    os.utime(stamp(pophome), (later, later))
    assert relay_attempt(pophome) == NOGATEWAY


def pwdnam_uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid


def env(home: QHome, **kw: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "QMAILHOME": str(home.path), **kw}


def test_checkauth_direct(pophome: QHome) -> None:
    # descriptors other than 0-2 are passed on, as by exec
    res = expect(run(["/bin/sh", "-c", 'exec "$@" 4>&1', "sh", pophome.bin("checkauth"), "/bin/sh", "-c",
                      'echo "${RELAYCLIENT-unset}"; echo extra >&4'], env=env(pophome, TCPREMOTEIP="127.0.0.1")))
    assert res.stdout == b"unset\nextra\n"
    stamp(pophome).touch()
    for ip in ("127.0.0.1", "127.000.000.001", "../authenticated/127.0.0.1", "", "x" * 100):
        res = expect(run([pophome.bin("checkauth"), "/bin/sh", "-c", 'echo "${RELAYCLIENT-unset}"'],
                         env=env(pophome, TCPREMOTEIP=ip)))
        assert res.stdout == (b"\n" if ip == "127.0.0.1" else b"unset\n"), ip
    res = expect(run([pophome.bin("checkauth"), "/bin/sh", "-c", 'echo "$RELAYCLIENT"'],
                     env=env(pophome, TCPREMOTEIP="10.1.1.1", RELAYCLIENT="@kept")))
    assert res.stdout == b"@kept\n"
    for argv in ([], ["-m"], ["-m", "0", "true"], ["-mx", "true"], ["-m", "5"]):
        res = run([pophome.bin("checkauth"), *argv], env=env(pophome))
        assert (res.returncode, res.stderr) == (100, b"checkauth: usage: checkauth [-m minutes] prog [args...]\n")
    res = run([pophome.bin("checkauth"), "/nonexistent/prog"], env=env(pophome))
    assert (res.returncode, res.stderr) == (
        111, b"checkauth: fatal: unable to run /nonexistent/prog: No such file or directory\n")


def test_saveip_direct(pophome: QHome) -> None:
    res = run([pophome.bin("saveip")], env=env(pophome))
    assert (res.returncode, res.stderr) == (100, b"saveip: usage: saveip prog [args...]\n")
    res = run([pophome.bin("saveip"), "/nonexistent/prog"], env=env(pophome))
    assert (res.returncode, res.stderr) == (
        111, b"saveip: fatal: unable to run /nonexistent/prog: No such file or directory\n")
    # hostile addresses: nothing recorded, the login goes on
    for ip in ("../../etc/passwd", "a/b", "", "1.2.3.4\n", "::1/128"):
        res = run([pophome.bin("saveip"), "/bin/echo", "on"], env=env(pophome, TCPREMOTEIP=ip))
        assert (res.returncode, res.stdout) == (0, b"on\n"), ip
        assert res.stderr == b"saveip: warning: TCPREMOTEIP is not an IP address: %s\n" % repr(ip).encode()
    assert os.listdir(pophome.path / "authenticated") == []
    # no address at all (not under tcpserver): nothing to record, no warning
    res = run([pophome.bin("saveip"), "/bin/echo", "on"], env=env(pophome))
    assert (res.returncode, res.stdout, res.stderr) == (0, b"on\n", b"")
    res = expect(run([pophome.bin("saveip"), "/bin/echo", "v6"], env=env(pophome, TCPREMOTEIP="0:0::1")))
    assert os.listdir(pophome.path / "authenticated") == ["::1"]
    # a stamp directory that cannot be written: warned about, the login goes on
    os.rename(pophome.path / "authenticated", pophome.path / "gone")
    res = run([pophome.bin("saveip"), "/bin/echo", "on"], env=env(pophome, TCPREMOTEIP="10.0.0.1"))
    assert (res.returncode, res.stdout) == (0, b"on\n")
    assert res.stderr == (f"saveip: warning: unable to record 10.0.0.1 in {pophome.path}/authenticated: "
                          "No such file or directory\n").encode()


@pytest.mark.skipif(not IS_ROOT, reason="needs root to act as another user")
@pytest.mark.parametrize("single", [True, False])
def test_ordinary_user_cannot_forge_a_stamp(single: bool) -> None:
    """Issue 12 A4: `touch authenticated/IP` as an ordinary user fails, and a stamp owned by one is ignored."""
    import shutil

    from conftest import make_home, need_root_setup

    if not single:
        need_root_setup()
    home = make_home(single=single)
    try:
        d = home.path / "authenticated"
        st = d.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o755, 0)  # made by qmail init
        res = run(["/usr/bin/touch", str(d / "127.0.0.1")], user=TEST_USER)
        assert res.returncode != 0 and b"Permission denied" in res.stderr, res.explain()
        res = run([home.bin("saveip"), "/bin/true"], user=TEST_USER, env=env(home, TCPREMOTEIP="127.0.0.1"))
        assert res.returncode == 0 and b"Permission denied" in res.stderr, res.explain()
        assert not (d / "127.0.0.1").exists()
        # A stamp some other way owned by the user (an old 1733 directory): checkauth ignores it.
        d.chmod(0o1733)
        (d / "127.0.0.1").touch()
        os.chown(d / "127.0.0.1", pwdnam_uid(TEST_USER), -1)
        probe = [home.bin("checkauth"), "/bin/sh", "-c", 'echo "${RELAYCLIENT-unset}"']
        assert expect(run(probe, env=env(home, TCPREMOTEIP="127.0.0.1"))).stdout == b"unset\n"
        os.chown(d / "127.0.0.1", 0, -1)  # the POP3 service's (root's) stamp counts
        assert expect(run(probe, env=env(home, TCPREMOTEIP="127.0.0.1"))).stdout == b"\n"
    finally:
        shutil.rmtree(home.path.parent, ignore_errors=True)
