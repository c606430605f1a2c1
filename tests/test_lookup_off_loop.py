"""The user lookup off the root parents' loops (review of session 5, findings 2 and 5).

A real hung file system: a FUSE mount whose server never answers (the test
opens /dev/fuse, mounts it and never reads it), so that stat() of any path
under it blocks until the connection is aborted (the descriptor closed).
The installation's alias user gets its home there: qmail-getpw's rules for
the local part "alias" stat that home. Another user's deliveries and
questions, through users/cdb and through the rules with a real stat, must
go on meanwhile, and the hung one is deferred at the (injected) deadline.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import IS_ROOT, TEST_USER, QHome, world_dir
from pyqmail.local import getpwchild
from pyqmail.local import qmail_rcptcheckd as rd
from test_lspawn_workers import SHOW, Lspawn, _assign, _entry, _home_for

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="root mode: a FUSE mount, daemons that become users")

FQDN = "test.example.com"
DEADLINE = 4.0  # the lookup deadline injected (the daemons' default is 30 s)
PATIENCE = 25.0  # how long a test waits for what must come
MS_NOSUID, MS_NODEV, MS_NOEXEC, MNT_DETACH = 2, 4, 8, 2


class HungMount:
    """A FUSE file system at path whose server never answers; abort() ends every wait on it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.libc = ctypes.CDLL(None, use_errno=True)
        path.mkdir()
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        opts = f"fd={self.fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
        if self.libc.mount(b"pyqmail-hung", bytes(path), b"fuse", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts) != 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            if os.environ.get("CI") == "true":
                pytest.fail(f"cannot mount a test FUSE file system: {os.strerror(err)}")
            pytest.skip(f"cannot mount a test FUSE file system: {os.strerror(err)}")

    def abort(self) -> None:
        if self.fd != -1:
            os.close(self.fd)  # the connection aborts: every stat waiting on it fails (ENOTCONN)
            self.fd = -1
            self.libc.umount2(bytes(self.path), MNT_DETACH)


@pytest.fixture
def hung(root_home: QHome) -> Iterator[tuple[QHome, Path, HungMount]]:
    """root_home with the alias user's home on a hung file system, and a users/cdb entry "a" (pqtest)."""
    base = world_dir()
    mount = HungMount(base / "hung")
    try:
        conf = root_home.path / "conf" / "install"
        lines = conf.read_text().splitlines()
        for i, line in enumerate(lines):
            f = line.split()
            if f[:2] == ["user", "alias"]:
                lines[i] = " ".join(f[:5] + [str(mount.path / "home")])
        conf.write_text("\n".join(lines) + "\n")
        a = _home_for(base, TEST_USER, "a", {})
        _assign(root_home, [_entry("a", TEST_USER, a)])
        yield root_home, base, mount
    finally:
        mount.abort()
        shutil.rmtree(base, ignore_errors=True)


def _reports(ls: Lspawn, want: int) -> dict[int, tuple[bytes, float]]:
    """Read want reports as they come: slot -> (report, when); stop after PATIENCE seconds."""
    got: dict[int, tuple[bytes, float]] = {}
    buf = b""
    fd = ls.out.fileno()
    end = time.monotonic() + PATIENCE
    while len(got) < want and time.monotonic() < end:
        if not select.select([fd], [], [], end - time.monotonic())[0]:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        while len(buf) >= 2 and b"\0" in buf[1:]:
            nul = buf.index(b"\0", 1)
            got[buf[0]] = (buf[1:nul], time.monotonic())
            buf = buf[nul + 1:]
    return got


def test_lspawn_a_hung_home_holds_up_no_other_delivery_and_is_deferred_at_the_deadline(
        hung: tuple[QHome, Path, HungMount]) -> None:
    home, _, mount = hung
    ls = Lspawn(home, SHOW, {"PYQMAIL_LSPAWN_LOOKUP_SECONDS": str(DEADLINE)})
    try:
        t0 = time.monotonic()
        ls.send(f"alias@{FQDN}", slot=0)  # users/cdb misses; the rules stat the hung home
        ls.send(f"a@{FQDN}", slot=1)  # users/cdb names pqtest
        ls.send(f"{TEST_USER}-g17nobox@{FQDN}", slot=2)  # the rules, a real stat of pqtest's home
        got = _reports(ls, 3)
        assert set(got) == {0, 1, 2}, got
        uid = pwd.getpwnam(TEST_USER).pw_uid
        assert got[1][0].startswith(b"Kppid=") and f" uid={uid}\n".encode() in got[1][0], got
        assert got[2][0] == b"DSorry, no mailbox here by that name. (#5.1.1)\n", got
        # The others were done before the hung one's deadline, which deferred it with qmail's words.
        assert got[1][1] - t0 < DEADLINE and got[2][1] - t0 < DEADLINE, (got, t0)
        assert got[0][0] == b"ZTemporary failure in qmail-lspawn.\n", got
        assert got[0][1] - t0 >= DEADLINE - 0.5, (got, t0)
        # The miss was answered by a lookup helper, which stays for the next (the hung one was killed).
        qmailp = pwd.getpwnam("qmailp").pw_uid
        end = time.monotonic() + PATIENCE
        while len(helpers := [c for c in _kids(ls.p.pid) if _uid(c) == qmailp and _alive(c)]) != 1 \
                and time.monotonic() < end:
            time.sleep(0.02)
        assert len(helpers) == 1, helpers
        ls.send(f"{TEST_USER}-g17nobox@{FQDN}", slot=4)
        assert _reports(ls, 1)[4][0] == b"DSorry, no mailbox here by that name. (#5.1.1)\n"
        assert [c for c in _kids(ls.p.pid) if _uid(c) == qmailp and _alive(c)] == helpers
        # The parent still answers: a second delivery to the hung user is deferred too.
        ls.send(f"alias@{FQDN}", slot=3)
        assert _reports(ls, 1)[3][0] == b"ZTemporary failure in qmail-lspawn.\n"
    finally:
        mount.abort()
        ls.close()


def test_lspawn_past_its_lookup_helpers_a_child_per_lookup(hung: tuple[QHome, Path, HungMount]) -> None:
    # Every helper hung (HELPERS_MAX homes that hang at once): a miss still gets its own child.
    home, _, mount = hung
    ls = Lspawn(home, SHOW, {"PYQMAIL_LSPAWN_LOOKUP_SECONDS": str(DEADLINE)})
    try:
        t0 = time.monotonic()
        for slot in range(getpwchild.HELPERS_MAX):
            ls.send(f"alias@{FQDN}", slot=slot)
        ls.send(f"{TEST_USER}-g17nobox@{FQDN}", slot=9)
        got = _reports(ls, getpwchild.HELPERS_MAX + 1)
        assert got[9][0] == b"DSorry, no mailbox here by that name. (#5.1.1)\n" and got[9][1] - t0 < DEADLINE, got
        assert all(got[slot][0] == b"ZTemporary failure in qmail-lspawn.\n" for slot in range(getpwchild.HELPERS_MAX))
    finally:
        mount.abort()
        ls.close()


def _start_rcptcheckd(home: QHome) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([home.bin("qmail-rcptcheckd")], cwd=home.path, stderr=subprocess.PIPE,
                         env={"PATH": "/usr/bin:/bin", "PYQMAIL_RCPTCHECKD_LOOKUP_SECONDS": str(DEADLINE)})
    sock = str(home.path / rd.SOCKET)
    end = time.monotonic() + 30
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(sock)
            return p
        except (FileNotFoundError, ConnectionRefusedError):
            assert time.monotonic() < end and p.poll() is None
            time.sleep(0.02)


def _stop(p: subprocess.Popen[bytes]) -> bytes:
    p.terminate()
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    return err


def _groups(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Groups:"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError("no Groups line")


def test_rcptcheckd_a_hung_home_holds_up_no_other_question_and_is_temporary_at_the_deadline(
        hung: tuple[QHome, Path, HungMount]) -> None:
    home, _, mount = hung
    p = _start_rcptcheckd(home)
    try:
        groups = _groups(p.pid)
        t0 = time.monotonic()
        stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stuck.connect(str(home.path / rd.SOCKET))
        stuck.sendall(b"alias\0")  # users/cdb misses; the rules stat the hung home
        for _ in range(3):
            assert rd.ask(str(home.path), b"a", timeout=PATIENCE).code == "K"  # users/cdb
            assert rd.ask(str(home.path), f"{TEST_USER}-g17nobox".encode(), timeout=PATIENCE).code == "D"  # rules
        assert time.monotonic() - t0 < DEADLINE
        stuck.settimeout(PATIENCE)
        answer = stuck.recv(2048)
        stuck.close()
        assert answer.startswith(b"Z") and b"user lookup timed out" in answer, answer
        assert time.monotonic() - t0 >= DEADLINE - 0.5
        # Finding 5: the parent never changes its groups for the rules (they run in a child).
        assert _groups(p.pid) == groups
        # The three misses were answered by one lookup helper (the hung one was killed): it stays.
        qmailp = pwd.getpwnam("qmailp").pw_uid
        end = time.monotonic() + PATIENCE  # the killed one may take a moment to die
        while len(helpers := [c for c in _kids(p.pid) if _uid(c) == qmailp and _alive(c)]) != 1 \
                and time.monotonic() < end:
            time.sleep(0.02)
        assert len(helpers) == 1, helpers
        assert rd.ask(str(home.path), f"{TEST_USER}-g17nobox".encode(), timeout=PATIENCE).code == "D"
        assert [c for c in _kids(p.pid) if _uid(c) == qmailp and _alive(c)] == helpers
        # A lookup still hung when the daemon stops is killed with it, not left behind.
        again = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        again.connect(str(home.path / rd.SOCKET))
        again.sendall(b"alias\0")
        err = _stop(p)
        again.close()
        end = time.monotonic() + PATIENCE
        while _alive(helpers[0]) and time.monotonic() < end:
            time.sleep(0.02)
        assert not _alive(helpers[0])  # gone, or a zombie if the reaper it fell to does not reap
    finally:
        mount.abort()
        if p.poll() is None:
            err = _stop(p)
    assert b"killing the user lookup for alias" in err, err


def test_rcptcheckd_past_its_lookup_helpers_a_child_per_lookup(hung: tuple[QHome, Path, HungMount]) -> None:
    # Every helper hung (HELPERS_MAX homes that hang at once): a miss still gets its own child.
    home, _, mount = hung
    p = _start_rcptcheckd(home)
    stuck = []
    try:
        t0 = time.monotonic()
        for _ in range(getpwchild.HELPERS_MAX):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(home.path / rd.SOCKET))
            s.sendall(b"alias\0")
            stuck.append(s)
        qmailp = pwd.getpwnam("qmailp").pw_uid
        end = time.monotonic() + PATIENCE
        while len([c for c in _kids(p.pid) if _uid(c) == qmailp]) < getpwchild.HELPERS_MAX and time.monotonic() < end:
            time.sleep(0.02)
        assert rd.ask(str(home.path), f"{TEST_USER}-g17nobox".encode(), timeout=PATIENCE).code == "D"
        assert time.monotonic() - t0 < DEADLINE
        for s in stuck:
            s.settimeout(PATIENCE)
            assert s.recv(2048).startswith(b"Z")
    finally:
        for s in stuck:
            s.close()
        mount.abort()
        _stop(p)


def _kids(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _uid(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return -1


def test_checker_rules_restore_the_supplementary_groups(root_home: QHome) -> None:
    # Finding 5: Checker.rules (qmail-getpw's rules in the caller's process, as qmailp:nofiles)
    # gives back the caller's supplementary groups with its uid and gid.
    code = ("import os, sys; from pyqmail import home; from pyqmail.local import qmail_rcptcheckd as rd\n"
            "os.setgroups([0, 4, 7]); before = os.getgroups()\n"
            f"rd.Checker({str(root_home.path)!r}, home.install()).rules({TEST_USER.encode()!r})\n"
            "assert (os.getgroups(), os.geteuid(), os.getegid()) == (before, 0, 0), os.getgroups()\n")
    r = subprocess.run([sys.executable, "-c", code],
                       env={"PATH": "/usr/bin:/bin", "QMAILHOME": str(root_home.path),
                            **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}}, capture_output=True)
    assert r.returncode == 0, r
