"""qmail-rcptcheckd's per-user workers (issues 15 and 17): no fork per question, one worker per user.

The daemon runs as root on a root-mode home; questions are asked as root (an
allowed peer) over the real socket. Workers are the daemon's children
(/proc/PID/task/PID/children), their ids read from /proc/PID/status.
"""

from __future__ import annotations

import os
import pwd
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import IS_ROOT, TEST_USER, VENV_BIN, QHome, expect, run, world_dir
from pyqmail.local import qmail_rcptcheckd as rd

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="root mode: the daemon becomes each user")

USERS_40 = rd.CHILDREN_MAX  # users of the many-workers tests: uids 61000.. without passwd entries
UID_BASE = 61000


class Daemon:
    """A running qmail-rcptcheckd and what the tests ask of it."""

    def __init__(self, home: QHome, users: Path, env: dict[str, str], user: str | None = None) -> None:
        self.home = home
        self.users = users
        ids = {}
        if user is not None:
            pw = pwd.getpwnam(user)
            ids = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        self.proc = subprocess.Popen([home.bin("qmail-rcptcheckd")], env={"PATH": "/usr/bin:/bin", **env},
                                     cwd=home.path, stderr=subprocess.PIPE, **ids)  # type: ignore[call-overload]
        self.sock = home.path / "run" / "qmail-rcptcheck.sock"
        deadline = time.monotonic() + 30
        while True:  # bound, then listening
            try:
                self.connect().close()
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert time.monotonic() < deadline and self.proc.poll() is None
                time.sleep(0.02)

    def ask(self, local: str, timeout: float = 10.0) -> str:
        a = rd.ask(str(self.home.path), local.encode(), timeout=timeout)
        return a.code + (" " + a.why if a.why else "")

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.sock))
        except OSError:
            s.close()
            raise
        return s

    def workers(self) -> dict[int, tuple[list[int], list[int], list[int]]]:
        """The daemon's live children: pid -> (uids, gids, groups) (real, effective, saved, fs)."""
        out = {}
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        for pid in map(int, kids):
            try:
                status = Path(f"/proc/{pid}/status").read_text().splitlines()
            except FileNotFoundError:
                continue
            f = {line.split(":", 1)[0]: line.split(":", 1)[1].split() for line in status}
            if f["State"][0] in ("Z", "X"):
                continue
            out[pid] = ([int(x) for x in f["Uid"]], [int(x) for x in f["Gid"]], [int(x) for x in f["Groups"]])
        return out

    def wait_workers(self, n: int, seconds: float = 10.0) -> dict[int, tuple[list[int], list[int], list[int]]]:
        deadline = time.monotonic() + seconds
        while len(w := self.workers()) != n and time.monotonic() < deadline:
            time.sleep(0.02)
        return w

    def stop(self) -> bytes:
        for pid in self.workers():
            os.kill(pid, signal.SIGCONT)
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        return err


def _assign(home: QHome, lines: list[str]) -> None:
    (home.path / "users" / "assign").write_text("".join(x + "\n" for x in lines) + ".\n")
    expect(run([home.bin("qmail-newu")]))


@pytest.fixture
def homes(root_home: QHome) -> Iterator[tuple[QHome, Path, list[str]]]:
    """joe (pqtest, home 0700) and ann (alias, home 0700), and 40 users of their own uids sharing one home."""
    pq = pwd.getpwnam(TEST_USER)
    al = pwd.getpwnam("alias")
    users = root_home.path.parent / "users"
    users.mkdir()
    for name, pw in (("joe", pq), ("ann", al)):
        (users / name).mkdir(mode=0o700)
        (users / name / ".qmail-box").write_text("./Maildir/\n")
        os.chown(users / name, pw.pw_uid, pw.pw_gid)
    (users / "open").mkdir(mode=0o755)
    (users / "open" / ".qmail-box").write_text("./Maildir/\n")
    assign = [f"+joe-:{TEST_USER}:{pq.pw_uid}:{pq.pw_gid}:{users}/joe:-::",
              f"+ann-:alias:{al.pw_uid}:{al.pw_gid}:{users}/ann:-::"]
    assign += [f"+u{i}-:u{i}:{UID_BASE + i}:{UID_BASE + i}:{users}/open:-::" for i in range(USERS_40 + 1)]
    _assign(root_home, assign)
    yield root_home, users, assign


def _daemon(homes: tuple[QHome, Path, list[str]], **env: str) -> Daemon:
    return Daemon(homes[0], homes[1], env)


def test_one_worker_answers_every_question_of_a_user(homes: tuple[QHome, Path, list[str]]) -> None:
    """60 questions about one user: one worker, forked once, running as the user for good."""
    d = _daemon(homes)
    try:
        assert d.ask("joe-box") == "K"
        first = d.workers()
        assert len(first) == 1, first
        for i in range(30):
            assert d.ask("joe-box") == "K"
            assert d.ask(f"joe-none{i}") == "D"
            assert d.workers().keys() == first.keys()  # the same process, no fork per question
        pq = pwd.getpwnam(TEST_USER)
        uids, gids, groups = next(iter(first.values()))
        assert uids == [pq.pw_uid] * 4 and gids == [pq.pw_gid] * 4 and groups == [pq.pw_gid]  # root never again
        (pid,) = first
        assert Path(f"/proc/{pid}/comm").read_text().strip() == rd.WORKER_COMM  # not counted as the daemon
        deadline = time.monotonic() + 10
        while True:  # the last client's connection is closed just after its answer is sent
            fds = [os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")]
            if len([f for f in fds if f.startswith("socket:")]) == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert len([f for f in fds if f.startswith("socket:")]) == 1, fds  # its pair's end: no client, no listener
    finally:
        d.stop()
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(pid), "the worker outlived the daemon's SIGTERM"


def _alive(pid: int) -> bool:
    """Whether pid runs (a zombie left to an init that does not reap is not running)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_a_new_dot_qmail_or_users_cdb_decides_the_next_question(homes: tuple[QHome, Path, list[str]]) -> None:
    """Nothing cached: a .qmail made or removed, a users/cdb rebuilt, a moment ago decides the next answer."""
    home, users, assign = homes
    d = _daemon(homes)
    try:
        assert d.ask("joe-new") == "D"
        (users / "joe" / ".qmail-new").write_text("./Maildir/\n")
        assert d.ask("joe-new") == "K"
        (users / "joe" / ".qmail-new").unlink()
        assert d.ask("joe-new") == "D"
        assert d.ask("joe-box") == "K"
        _assign(home, [assign[0].replace(f"{users}/joe", f"{users}/open")] + assign[1:])
        assert d.ask("joe-box") == "K" and d.ask("joe-new") == "D"
        (users / "open" / ".qmail-new").write_text("./Maildir/\n")
        assert d.ask("joe-new") == "K"  # joe's home is now /users/open: its .qmail-new counts
        assert len(d.workers()) == 1
    finally:
        d.stop()


def test_two_users_never_share_a_worker(homes: tuple[QHome, Path, list[str]]) -> None:
    """joe's and ann's homes are 0700, each its owner's: each is searched by a worker running as its owner."""
    d = _daemon(homes)
    try:
        for _ in range(3):
            assert d.ask("joe-box") == "K"
            assert d.ask("ann-box") == "K"
            assert d.ask("ann-nobox") == "D"
        w = d.workers()
        assert sorted(ids[0][0] for ids in w.values()) == sorted(
            [pwd.getpwnam(TEST_USER).pw_uid, pwd.getpwnam("alias").pw_uid]), w
        for uids, gids, groups in w.values():
            assert len(set(uids)) == 1 and len(set(gids)) == 1 and groups == gids[:1]
    finally:
        d.stop()


def test_a_stopped_worker_is_killed_at_the_deadline_and_others_are_answered(
        homes: tuple[QHome, Path, list[str]]) -> None:
    """joe stops his worker (SIGSTOP): his questions wait, at most QUEUE_MAX of them (then Z busy at once),
    the parent SIGKILLs the worker at the deadline (2 s here) and joe's clients see the connection close
    (TEMPORARY, 451); ann's questions are answered meanwhile; joe's next question gets a new worker."""
    d = _daemon(homes, **{rd.CHILD_SECONDS_ENV: "2"})
    held: list[socket.socket] = []
    try:
        assert d.ask("joe-box") == "K"
        (joe,) = d.workers()
        os.kill(joe, signal.SIGSTOP)
        t0 = time.monotonic()
        for _ in range(rd.QUEUE_MAX + 1):
            s = d.connect()
            s.sendall(b"joe-box\0")
            held.append(s)
        assert d.ask("ann-box") == "K"
        t_ann = time.monotonic()
        got: dict[socket.socket, tuple[bytes, float]] = {}
        deadline = t0 + 20
        while len(got) < len(held) and time.monotonic() < deadline:
            ready, _, _ = select.select([s for s in held if s not in got], [], [], 1.0)
            for r in ready:
                got[r] = (r.recv(100), time.monotonic())
        busy = [when for text, when in got.values() if text == f"Z{rd.BUSY}\n".encode()]
        closed = [when for text, when in got.values() if text == b""]  # no answer: TEMPORARY for qmail-smtpd
        # One past the bound is busy at once; two if the stop caught the worker between its answer to the
        # first question and its report of it to the parent (that one still counts as waiting).
        assert 1 <= len(busy) <= 2 and len(busy) + len(closed) == len(held), got.values()
        assert t_ann < min(closed), "ann waited for joe's stopped worker"
        assert min(closed) - t0 >= 1.9 and max(busy) < min(closed)  # killed at the deadline, not before
        assert not Path(f"/proc/{joe}").exists() or Path(f"/proc/{joe}/stat").read_text().split()[2] in "ZX"
        assert d.ask("joe-box") == "K"
        assert joe not in d.workers()
    finally:
        for s in held:
            s.close()
        err = d.stop()
    assert b"killing the worker for uid" in err


def test_slow_clients_do_not_hold_up_the_parent(homes: tuple[QHome, Path, list[str]]) -> None:
    """Clients that send half a question, or a byte at a time, or nothing: the others are answered at once."""
    d = _daemon(homes)
    idle = [d.connect() for _ in range(50)]
    half = d.connect()
    slow = d.connect()
    try:
        half.sendall(b"joe-bo")
        for i, c in enumerate(b"joe-box"):
            slow.send(bytes([c]))
            t = time.monotonic()
            assert d.ask("ann-box") == "K" and d.ask(f"joe-x{i}") == "D"
            assert time.monotonic() - t < 2
        slow.sendall(b"\0")
        slow.settimeout(10)
        assert slow.recv(100) == b"K\n"
        big = d.connect()  # more than 1000 bytes without a NUL: closed, no answer (as before)
        big.sendall(b"x" * (rd.rcptcheck.LOCAL_MAX + 1))
        big.settimeout(10)
        assert big.recv(100) == b""
        big.close()
    finally:
        for s in idle + [half, slow]:
            s.close()
        d.stop()


def test_workers_retire_when_idle_and_after_questions_max(homes: tuple[QHome, Path, list[str]]) -> None:
    """A worker leaves after IDLE seconds without a question, and after QUESTIONS_MAX questions."""
    d = _daemon(homes, **{rd.IDLE_SECONDS_ENV: "2", rd.QUESTIONS_MAX_ENV: "5"})
    try:
        seen: set[int] = set()
        for _ in range(12):
            assert d.ask("joe-box") == "K"
            seen |= d.workers().keys()
        assert 2 <= len(seen) <= 3, seen  # 5 questions each (one more if a question beats the count)
        assert d.wait_workers(0, 10) == {}  # idle 2 s: retired
        assert d.ask("joe-box") == "K"
    finally:
        d.stop()


def test_at_most_children_max_workers_the_least_recently_used_idle_one_goes(
        homes: tuple[QHome, Path, list[str]]) -> None:
    """40 users' workers, all stopped by their users while idle: a 41st user's question is answered at once
    (the least recently used idle worker is killed for it), never more than CHILDREN_MAX workers. With all 40
    busy (each stopped with a question), a new user's question is Z busy at once."""
    d = _daemon(homes, **{rd.CHILD_SECONDS_ENV: "30"})
    held: list[socket.socket] = []
    try:
        for i in range(USERS_40):
            assert d.ask(f"u{i}-box") == "K"
        w = d.wait_workers(USERS_40)
        assert len(w) == USERS_40
        by_uid = {ids[0][0]: pid for pid, ids in w.items()}
        for pid in w:
            os.kill(pid, signal.SIGSTOP)
        t = time.monotonic()
        assert d.ask(f"u{USERS_40}-box", timeout=5) == "K"
        assert time.monotonic() - t < 2
        w = d.wait_workers(USERS_40)
        uids = {ids[0][0] for ids in w.values()}
        assert UID_BASE not in uids and UID_BASE + USERS_40 in uids, sorted(uids)  # u0 was the least recent
        assert not Path(f"/proc/{by_uid[UID_BASE]}").exists() or \
            Path(f"/proc/{by_uid[UID_BASE]}/stat").read_text().split()[2] in "ZX"
        for i in range(1, USERS_40):  # every worker now stopped with a question
            s = d.connect()
            s.sendall(f"u{i}-box\0".encode())
            held.append(s)
        for pid, ids in d.workers().items():
            if ids[0][0] == UID_BASE + USERS_40:
                os.kill(pid, signal.SIGSTOP)
                s = d.connect()
                s.sendall(f"u{USERS_40}-box\0".encode())
                held.append(s)
        time.sleep(1.0)  # for the parent to hand them over: nothing outside tells when it has
        assert d.ask("u0-box", timeout=5).startswith("Z " + rd.BUSY_ALL)
        assert len(d.workers()) == USERS_40
    finally:
        for s in held:
            s.close()
        d.stop()


def test_single_user_mode_workers_keep_the_installing_users_ids() -> None:
    """A single-user home run by pqtest: the daemon and its worker are pqtest; another user's mail is
    "deferred at delivery" (K) without a worker, as before."""
    pq = pwd.getpwnam(TEST_USER)
    base = world_dir()
    os.chown(base, pq.pw_uid, pq.pw_gid)
    home = QHome(base / "qmail")
    try:
        expect(run([VENV_BIN / "qmail", "init", "--single-user", "--home", home.path, "test.example.com"],
                   user=TEST_USER))
        (base / "joe").mkdir(mode=0o700)
        (base / "joe" / ".qmail-box").write_text("./Maildir/\n")
        os.chown(base / "joe", pq.pw_uid, pq.pw_gid)
        al = pwd.getpwnam("alias")
        (home.path / "users" / "assign").write_text(
            f"+joe-:{TEST_USER}:{pq.pw_uid}:{pq.pw_gid}:{base}/joe:-::\n"
            f"+ann-:alias:{al.pw_uid}:{al.pw_gid}:{base}/joe:-::\n.\n")
        expect(run([home.bin("qmail-newu")], user=TEST_USER))
        d = Daemon(home, base, {}, user=TEST_USER)
        try:
            assert [d.ask(x) for x in ("joe-box", "joe-none", "joe-box")] == ["K", "D", "K"]
            assert d.ask("ann-box") == "K"  # another user: deferred at delivery, no worker
            w = d.workers()
            assert [ids[0] for ids in w.values()] == [[pq.pw_uid] * 4], w
        finally:
            d.stop()
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def test_silent_clients_are_closed_and_at_most_pending_max_wait(homes: tuple[QHome, Path, list[str]]) -> None:
    """A client that never finishes its question is closed after READ_SECONDS (1 s here). At most PENDING_MAX
    wait at once: past them the parent stops accepting (the backlog holds the rest) until one goes."""
    d = _daemon(homes, **{rd.READ_SECONDS_ENV: "1"})
    silent = [d.connect() for _ in range(rd.PENDING_MAX)]
    try:
        silent[0].sendall(b"joe-bo")  # half a question
        t = time.monotonic()
        with d.connect() as c:  # a blocking connect: it waits for room in the backlog
            c.sendall(b"joe-box\0")
            c.settimeout(20)
            assert c.recv(100) == b"K\n"  # accepted once the silent ones have gone
        assert time.monotonic() - t >= 0.9
        for s in silent:
            s.settimeout(10)
            assert s.recv(100) == b""  # closed, no answer
        t = time.monotonic()
        assert d.ask("joe-box") == "K"
        assert time.monotonic() - t < 1
    finally:
        for s in silent:
            s.close()
        d.stop()


PEEK = """
import sys
try:
    open(f"/proc/{sys.argv[1]}/mem", "rb").close()
    print("opened")
except PermissionError:
    print("refused")
"""


def test_the_user_cannot_read_their_workers_memory(homes: tuple[QHome, Path, list[str]]) -> None:
    """A worker is forked from the root parent, so its memory holds the parent's (other users' local parts,
    users/cdb pages). Its uid change made it undumpable (the kernel's rule for a process that changed ids):
    its user cannot open its /proc/PID/mem (nor ptrace it)."""
    import sys

    d = _daemon(homes)
    try:
        assert d.ask("joe-box") == "K"
        (pid,) = d.workers()
        r = run([sys.executable, "-c", PEEK, str(pid)], user=TEST_USER)
        expect(r)
        assert r.stdout == b"refused\n"
    finally:
        d.stop()
