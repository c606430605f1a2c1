"""qmail-lspawn's per-user workers (issue 17): one process per user serves that user's deliveries.

Root mode, a real qmail-lspawn fed one command at a time over its pipes; a
|program delivery reports its own parent (the process running qmail-local),
its uid and its environment, so the tests see which worker ran what.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import TEST_USER, QHome, expect, run, world_dir
from pyqmail.send import spawnproto
from sendkit import only_todo, qqueue

FQDN = "test.example.com"
OTHER_USER = "qmaill"  # a second uid: any account but root and TEST_USER
SHOW = '|echo "ppid=$PPID uid=$(id -u)"; env | sort'
DEADLINE = 60.0

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="root mode: workers change uid")


@pytest.fixture
def user_dir() -> Path:
    base = world_dir()
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _home_for(base: Path, user: str, name: str, dotqmail: dict[str, str]) -> Path:
    pw = pwd.getpwnam(user)
    home = base / name
    for d in (home, home / "Maildir", home / "Maildir" / "tmp", home / "Maildir" / "new", home / "Maildir" / "cur"):
        d.mkdir()
        os.chown(d, pw.pw_uid, pw.pw_gid)
        d.chmod(0o700)
    home.chmod(0o755)
    for suffix, text in dotqmail.items():
        f = home / (".qmail" + suffix)
        f.write_text(text + "\n")
        os.chown(f, pw.pw_uid, pw.pw_gid)
        f.chmod(0o644)
    return home


def _assign(home: QHome, lines: list[str]) -> None:
    (home.path / "users" / "assign").write_text("".join(x + "\n" for x in lines) + ".\n")
    expect(run([home.bin("qmail-newu")]))


def _entry(local: str, user: str, home: Path) -> str:
    pw = pwd.getpwnam(user)
    return (f"={local}:{user}:{pw.pw_uid}:{pw.pw_gid}:{home}:::\n"
            f"+{local}-:{user}:{pw.pw_uid}:{pw.pw_gid}:{home}:-::")


class Lspawn:
    """qmail-lspawn as qmail-send drives it: one command, then its report."""

    def __init__(self, home: QHome, aliasempty: str, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.p = subprocess.Popen([home.bin("qmail-lspawn"), aliasempty], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, env={"PATH": "/usr/bin:/bin", **(env or {})})
        assert self.p.stdout is not None and self.p.stdin is not None
        self.out = self.p.stdout
        self.inp = self.p.stdin
        assert self.out.read(1) == bytes([spawnproto.SPAWN_MAX])

    def deliver(self, recip: str, sender: bytes = b"s@x", slot: int = 0) -> bytes:
        """Queue a message to recip, have it delivered; return the report."""
        self.send(recip, sender, slot)
        return self.report(slot)

    def send(self, recip: str, sender: bytes = b"s@x", slot: int = 0) -> int:
        qqueue(self.home, sender, [recip.encode()], b"Subject: w\n\nworkers\n")
        num = only_todo(self.home)
        (self.home.queue / "todo" / str(num)).unlink()
        self.inp.write(spawnproto.command(slot, f"{num % 23}/{num}".encode(), sender, recip.encode()))
        self.inp.flush()
        return num

    def report(self, slot: int) -> bytes:
        got = bytearray(self.out.read(1))  # the slot (0 is a NUL too)
        while len(got) < 2 or not got.endswith(b"\0"):
            b = self.out.read(1)
            assert b, f"qmail-lspawn ended; got {bytes(got)!r}"
            got += b
        assert got[0] == slot, got
        return bytes(got[1:-1])

    def close(self) -> None:
        self.inp.close()
        try:
            assert self.p.wait(DEADLINE) == 0
        finally:
            self.out.close()


def _seen(report: bytes) -> tuple[int, int, dict[str, str]]:
    """The ppid, uid and environment a SHOW delivery printed."""
    m = re.match(rb"Kppid=(\d+) uid=(\d+)\n", report)
    assert m, report
    env = dict(line.split("=", 1) for line in report[m.end():].decode().splitlines() if "=" in line
               and not line.startswith("did "))
    return int(m[1]), int(m[2]), env


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def test_one_worker_serves_a_users_deliveries_with_constant_descriptors(root_home: QHome, user_dir: Path) -> None:
    home = _home_for(user_dir, TEST_USER, "pq", {})
    _assign(root_home, [_entry("pq", TEST_USER, home)])
    ls = Lspawn(root_home, SHOW)
    try:
        pids = set()
        fds = []
        for i in range(6):
            pid, uid, _ = _seen(ls.deliver(f"pq@{FQDN}"))
            assert uid == pwd.getpwnam(TEST_USER).pw_uid
            pids.add(pid)
            assert pid != ls.p.pid
            assert os.stat(f"/proc/{pid}").st_uid == uid  # the worker itself runs as the user
            fds.append(sorted(os.listdir(f"/proc/{pid}/fd")))
        assert len(pids) == 1, pids
        assert all(f == fds[0] for f in fds), fds
        assert _comm(pids.pop()) == "qmail-lspawn-w"
    finally:
        ls.close()


def test_two_users_never_share_a_worker(root_home: QHome, user_dir: Path) -> None:
    a = _home_for(user_dir, TEST_USER, "a", {})
    b = _home_for(user_dir, OTHER_USER, "b", {})
    _assign(root_home, [_entry("a", TEST_USER, a), _entry("b", OTHER_USER, b)])
    ls = Lspawn(root_home, SHOW)
    try:
        seen: dict[str, set[tuple[int, int]]] = {"a": set(), "b": set()}
        for who in "abab":
            pid, uid, _ = _seen(ls.deliver(f"{who}@{FQDN}"))
            seen[who].add((pid, uid))
        assert seen["a"] == {(next(iter(seen["a"]))[0], pwd.getpwnam(TEST_USER).pw_uid)}
        assert seen["b"] == {(next(iter(seen["b"]))[0], pwd.getpwnam(OTHER_USER).pw_uid)}
        assert next(iter(seen["a"]))[0] != next(iter(seen["b"]))[0]
    finally:
        ls.close()


def test_program_environment_is_not_seen_by_the_next_delivery(root_home: QHome, user_dir: Path) -> None:
    # pq-foo matches .qmail-default (DEFAULT=foo, EXT=foo); pq matches .qmail: the second
    # delivery, in the same worker, has neither, and its own SENDER.
    home = _home_for(user_dir, TEST_USER, "pq", {"": SHOW, "-default": SHOW})
    _assign(root_home, [_entry("pq", TEST_USER, home)])
    ls = Lspawn(root_home, "./Maildir/")
    try:
        pid1, _, env1 = _seen(ls.deliver(f"pq-foo@{FQDN}", sender=b"one@x"))
        pid2, _, env2 = _seen(ls.deliver(f"pq@{FQDN}", sender=b"two@x"))
        assert pid1 == pid2
        assert env1["DEFAULT"] == "foo" and env1["EXT"] == "foo" and env1["SENDER"] == "one@x"
        assert "DEFAULT" not in env2 and env2["EXT"] == "" and env2["SENDER"] == "two@x"
        assert set(env1) - {"DEFAULT"} == set(env2), (env1, env2)
        assert env2["PATH"] == "/usr/bin:/bin"
    finally:
        ls.close()


def test_maildir_names_unique_within_one_worker(root_home: QHome, user_dir: Path) -> None:
    home = _home_for(user_dir, TEST_USER, "pq", {})
    _assign(root_home, [_entry("pq", TEST_USER, home)])
    ls = Lspawn(root_home, "./Maildir/")
    try:
        for i in range(5):  # well within one second or two: the worker's pid alone would collide
            assert ls.deliver(f"pq@{FQDN}") == b"Kdid 1+0+0\n"
    finally:
        ls.close()
    names = sorted(p.name for p in (home / "Maildir" / "new").iterdir())
    assert len(names) == 5
    assert all(re.fullmatch(r"\d+\.P\d+Q\d+\..+", n) for n in names), names
    assert not list((home / "Maildir" / "tmp").iterdir())


def test_killed_worker_defers_then_the_next_delivery_succeeds(root_home: QHome, user_dir: Path) -> None:
    mark = user_dir / "slow.pid"
    slow = f'|echo $$ > {mark}; exec sleep 60 </dev/null >/dev/null 2>&1'
    home = _home_for(user_dir, TEST_USER, "pq", {"-slow": slow})
    os.chown(user_dir, pwd.getpwnam(TEST_USER).pw_uid, -1)
    _assign(root_home, [_entry("pq", TEST_USER, home)])
    ls = Lspawn(root_home, "./Maildir/")
    sleeper = 0
    try:
        assert ls.deliver(f"pq@{FQDN}") == b"Kdid 1+0+0\n"
        ls.send(f"pq-slow@{FQDN}", slot=3)
        deadline = time.monotonic() + DEADLINE
        while not (mark.exists() and mark.read_text().strip()):
            assert time.monotonic() < deadline, "the slow program never started"
            time.sleep(0.05)
        sleeper = int(mark.read_text())
        worker = int(Path(f"/proc/{sleeper}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert worker != ls.p.pid
        os.kill(worker, signal.SIGKILL)
        assert ls.report(3) == b"Zqmail-local crashed.\n"
        assert ls.deliver(f"pq@{FQDN}") == b"Kdid 1+0+0\n"
    finally:
        if sleeper:
            try:
                os.kill(sleeper, signal.SIGKILL)
            except ProcessLookupError:
                pass
        ls.close()
    assert len(list((home / "Maildir" / "new").iterdir())) == 2


def test_no_workers_when_switched_off(root_home: QHome, user_dir: Path) -> None:
    home = _home_for(user_dir, TEST_USER, "pq", {})
    _assign(root_home, [_entry("pq", TEST_USER, home)])
    ls = Lspawn(root_home, SHOW, env={"PYQMAIL_LSPAWN_WORKERS": "0"})
    try:
        pids = {_seen(ls.deliver(f"pq@{FQDN}"))[0] for i in range(3)}
        assert len(pids) == 3  # a child per delivery, as before
    finally:
        ls.close()


def test_worker_ends_after_its_deliveries_and_when_idle(root_home: QHome, user_dir: Path) -> None:
    home = _home_for(user_dir, TEST_USER, "pq", {})
    _assign(root_home, [_entry("pq", TEST_USER, home)])
    ls = Lspawn(root_home, SHOW, env={"PYQMAIL_LSPAWN_DELIVERIES": "2", "PYQMAIL_LSPAWN_IDLE": "1"})
    try:
        pids = [_seen(ls.deliver(f"pq@{FQDN}"))[0] for i in range(4)]
        assert pids[0] == pids[1] != pids[2] == pids[3], pids
        # Idle for a second, the worker ends and qmail-lspawn reaps it.
        deadline = time.monotonic() + DEADLINE
        while os.path.exists(f"/proc/{pids[2]}"):
            assert time.monotonic() < deadline, "the idle worker did not end"
            time.sleep(0.1)
        pid, _, _ = _seen(ls.deliver(f"pq@{FQDN}"))
        assert pid not in pids
    finally:
        ls.close()
