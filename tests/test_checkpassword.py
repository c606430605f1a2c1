"""checkpassword: the interface on descriptor 3, the system's accounts and the virtual-user database."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import IS_ROOT, TEST_USER, QHome, Result, expect, world_dir
from pyqmail.pop3 import checkpassword, passwords

PASSWORD = b"Correct Horse"


def account() -> tuple[int, int]:
    if IS_ROOT:
        pw = pwd.getpwnam(TEST_USER)
        return pw.pw_uid, pw.pw_gid
    return os.getuid(), os.getgid()


def env_for(qhome: QHome) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "QMAILHOME": str(qhome.path), "PYQMAIL_AUTH_DELAY": "0",
            "TCPREMOTEIP": "127.0.0.9"}


def check(qhome: QHome, record: bytes, *prog: str, env: dict[str, str] | None = None) -> Result:
    """Run checkpassword prog with record on descriptor 3 (the book's `3<&0`)."""
    argv = ["/bin/sh", "-c", 'exec "$@" 3<&0', "sh", str(qhome.bin("checkpassword")), *prog]
    p = subprocess.run(argv, input=record, capture_output=True, env=env or env_for(qhome), timeout=60)
    return Result(argv, p.returncode, p.stdout, p.stderr)


@pytest.fixture
def vhome(qhome: QHome) -> Path:
    """A virtual user 'joe@example.org' with PASSWORD, living in a fresh home."""
    uid, gid = account()
    base = world_dir() / "joe"
    base.mkdir()
    os.chown(base, uid, gid)
    crypted = passwords.crypt(PASSWORD, b"$6$rounds=1000$abcdefgh$")
    assert crypted is not None
    (qhome.path / "users" / "poppasswd").write_text(
        "# name:hash:uid:gid:home[:shell]\n"
        "broken\n"
        f"joe@example.org:{passwords.scrypt_hash(PASSWORD, ln=4)}:{uid}:{gid}:{base}\n"
        f"nohome:{passwords.scrypt_hash(PASSWORD, ln=4)}:{uid}:{gid}:{base}/missing:/bin/sh\n"
        f"crypted:{crypted.decode()}:{uid}:{gid}:{base}\n")
    yield base
    shutil.rmtree(base.parent, ignore_errors=True)


def test_book_example_prints_home(qhome: QHome, vhome: Path) -> None:
    res = expect(check(qhome, b"joe@example.org\0" + PASSWORD + b"\0Y123456\0", "pwd"))
    assert res.stdout == str(vhome).encode() + b"\n"
    assert res.stderr == b""


def test_success_sets_identity_and_environment(qhome: QHome, vhome: Path) -> None:
    uid, gid = account()
    res = expect(check(qhome, b"joe@example.org\0" + PASSWORD + b"\0<1.2@h>\0",
                       "sh", "-c", 'echo "$USER|$HOME|$SHELL|$(id -u)|$(id -g)|$(id -G)"; '
                       'if { true <&3; } 2>/dev/null; then echo open; else echo closed; fi'))
    first, fds = res.stdout.split(b"\n", 1)
    assert first == f"joe@example.org|{vhome}|/bin/false|{uid}|{gid}|{gid}".encode()
    assert fds == b"closed\n"  # descriptor 3 is closed before the program runs


def test_crypt_string_in_virtual_database(qhome: QHome, vhome: Path) -> None:
    expect(check(qhome, b"crypted\0" + PASSWORD + b"\0\0", "true"))
    expect(check(qhome, b"crypted\0wrong\0\0", "true"), 1)


def test_wrong_password_runs_nothing(qhome: QHome, vhome: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    for record in (b"joe@example.org\0wrong\0x\0", b"nosuchuser-xyz\0pw\0x\0", b"\0pw\0x\0",
                   b"joe@example.org\0\0x\0", b"joe@example.org\0" + PASSWORD + b"x\0x\0"):
        res = expect(check(qhome, record, "touch", str(marker)), 1)
        assert res.stdout == b""
        assert res.stderr.startswith(b"checkpassword: login refused for ")
        assert b" from 127.0.0.9: " in res.stderr
        assert not marker.exists()


def test_misuse_and_limits(qhome: QHome, vhome: Path) -> None:
    good = b"joe@example.org\0" + PASSWORD + b"\0"
    expect(check(qhome, good + b"x\0"), 2)  # no program
    for record in (b"", b"joe", b"joe\0", b"joe\0pass", b"\0"):
        expect(check(qhome, record, "true"), 2)
    # 512 bytes or more: refused outright, without reading further.
    expect(check(qhome, good + b"x" * (512 - len(good)), "true"), 1)
    expect(check(qhome, good + b"x" * (511 - len(good)), "true"), 0)
    # The timestamp need not be terminated.
    expect(check(qhome, good + b"stamp", "true"), 0)


def test_descriptor_3_closed_is_temporary(qhome: QHome, vhome: Path) -> None:
    argv = [str(qhome.bin("checkpassword")), "true"]
    p = subprocess.run(argv, input=b"", capture_output=True, env=env_for(qhome), timeout=60)
    assert p.returncode == 111


def test_home_missing_or_program_missing_is_temporary(qhome: QHome, vhome: Path) -> None:
    res = expect(check(qhome, b"nohome\0" + PASSWORD + b"\0\0", "true"), 111)
    assert b"unable to chdir" in res.stderr
    res = expect(check(qhome, b"joe@example.org\0" + PASSWORD + b"\0\0", "/nonexistent/prog"), 111)
    assert b"unable to run" in res.stderr


def test_refusal_is_delayed(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(checkpassword.time, "sleep", slept.append)
    monkeypatch.delenv(checkpassword.DELAY_ENV, raising=False)
    monkeypatch.setattr(os, "write", lambda fd, b: len(b))
    assert checkpassword._refuse(b"joe\x01", "bad password") == 1
    monkeypatch.setenv(checkpassword.DELAY_ENV, "0.25")
    checkpassword._refuse(b"joe", "bad password")
    assert slept == [checkpassword.FAIL_DELAY, 0.25] and checkpassword.FAIL_DELAY == 2.0


def test_parse_input() -> None:
    assert checkpassword.parse_input(b"a\0b\0c\0") == (b"a", b"b")
    assert checkpassword.parse_input(b"a\0b\0") == (b"a", b"b")
    assert checkpassword.parse_input(b"\0\0") == (b"", b"")
    assert checkpassword.parse_input(b"a\0") is None
    assert checkpassword.parse_input(b"a\0b") is None


def test_passwords() -> None:
    h = passwords.scrypt_hash(b"pw", ln=4)
    assert h.startswith("$scrypt$ln=4,r=8,p=1$") and ":" not in h
    assert passwords.verify(b"pw", h) and not passwords.verify(b"pW", h)
    assert not passwords.verify(b"pw", h[:-3])
    assert not passwords.verify(b"pw", h[:-10] + ("A" if h[-10] != "A" else "B") + h[-9:])
    assert not passwords.verify(b"pw", "$scrypt$ln=99,r=8,p=1$AAAA$AAAA")
    assert not passwords.verify(b"pw", "$scrypt$garbage")
    s = passwords.crypt(b"pw", b"$6$saltsalt$")
    assert s is not None and s.startswith(b"$6$saltsalt$")
    assert passwords.verify(b"pw", s.decode()) and not passwords.verify(b"px", s.decode())
    assert not passwords.verify(b"", "") and not passwords.verify(b"x", "!") and not passwords.verify(b"x", "*")
    # A value from another implementation (openssl passwd -6 -salt saltsalt password).
    assert passwords.verify(b"password", "$6$saltsalt$qFmFH.bQmmtXzyBY0s9v7Oicd2z4XSIecDzlB5KiA2/"
                                         "jctKu9YterLp8wwnSq.qc.eoxqOmSuNp2xS0ktL3nh/")


@pytest.fixture
def shadow_password() -> bytes:
    """Give pqtest a known system password for the test (root only), restoring /etc/shadow after."""
    if not IS_ROOT or shutil.which("chpasswd") is None:
        pytest.skip("needs root and chpasswd")
    st = os.stat("/etc/shadow")
    saved = Path("/etc/shadow").read_bytes()
    password = b"Sys-pw 1"
    try:
        subprocess.run(["chpasswd"], input=TEST_USER.encode() + b":" + password + b"\n", check=True)
        yield password
    finally:
        tmp = Path("/etc/shadow.pyqmail-test")
        tmp.write_bytes(saved)
        os.chown(tmp, st.st_uid, st.st_gid)
        os.chmod(tmp, st.st_mode & 0o7777)
        os.replace(tmp, "/etc/shadow")


def test_system_account_from_shadow(qhome: QHome, shadow_password: bytes) -> None:
    pw = pwd.getpwnam(TEST_USER)
    res = expect(check(qhome, TEST_USER.encode() + b"\0" + shadow_password + b"\0Y123456\0",
                       "sh", "-c", 'pwd; echo "$USER $HOME $SHELL"; id -u'))
    assert res.stdout == f"{pw.pw_dir}\n{TEST_USER} {pw.pw_dir} {pw.pw_shell}\n{pw.pw_uid}\n".encode()
    expect(check(qhome, TEST_USER.encode() + b"\0wrong\0Y123456\0", "true"), 1)


def test_imports_stay_few() -> None:
    """checkpassword runs as root with a password in memory: it imports little (STYLE principle 8)."""
    import sys

    from conftest import ROOT

    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'src')!r}); "
            "from pyqmail.pop3 import checkpassword; from pyqmail import home, spawn, privs; "
            "from pyqmail.pop3 import passwords; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('pyqmail')))); "
            "print(' '.join(m for m in ('subprocess', 'asyncio', 'socket', 'ssl', 'selectors', 'threading') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-IS", "-c", code], capture_output=True, check=True).stdout
    ours, foreign = out.split(b"\n")[:2]
    assert set(ours.split()) <= {b"pyqmail", b"pyqmail.entry", b"pyqmail.home", b"pyqmail.spawn", b"pyqmail.privs",
                                 b"pyqmail.stubfile", b"pyqmail.sig", b"pyqmail.pop3", b"pyqmail.pop3.checkpassword",
                                 b"pyqmail.pop3.passwords", b"pyqmail.proctitle"}, ours
    assert foreign == b"", foreign


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run as another user")
def test_unreadable_shadow_is_temporary_not_a_bad_password(qhome: QHome) -> None:
    """Run as an ordinary user, a shadowed account cannot be checked: 111 and why, never 1."""
    pw = pwd.getpwnam(TEST_USER)
    assert pw.pw_passwd in checkpassword.SHADOWED
    argv = ["/bin/sh", "-c", 'exec "$@" 3<&0', "sh", str(qhome.bin("checkpassword")), "true"]

    def as_user(record: bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(argv, input=record, capture_output=True, env=env_for(qhome), timeout=60,
                              user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])

    p = as_user(TEST_USER.encode() + b"\0anything\0Y123456\0")
    assert (p.returncode, p.stderr) == (111, b"checkpassword: temporary failure: cannot read the shadow file: "
                                             b"unable to read /etc/shadow: Permission denied\n"), p
    p = as_user(b"no-such-user-here\0anything\0Y123456\0")
    assert p.returncode == 1 and b"no such user" in p.stderr, p
    # As root the shadow file is read: a wrong password is a refusal.
    res = check(qhome, TEST_USER.encode() + b"\0wrong\0Y123456\0", "true")
    assert res.returncode == 1 and b"bad password" in res.stderr, res.explain()
