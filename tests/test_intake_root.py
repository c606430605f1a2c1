"""Root mode: intake that does not depend on delivery (issue 11, 1-2).

Local users and the qmail users queue through qmail-queued; when it is not
there, qmail-queue writes into QMAILHOME/maildrop/ and qmail-queued picks the
files up later with the uid of each file's owner. qmail-queued and
qmail-start refuse to start twice without disturbing the one that runs.
Every test runs real processes as root in a home made by `qmail init`.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from conftest import TEST_USER, QHome, Result, expect, run, world_dir
from queuefmt import RECEIVED, files, messages, parse_todo
from sendkit import Running, Site
from test_qmail_queue import envelope, qq

FQDN = "test.example.com"
ADDR = b"pq@" + FQDN.encode()
ENV = {"PATH": "/usr/bin:/bin"}
ALERT = b"alert: cannot start: qmail-send is already running\n"


def _wait(pred: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"waited in vain: {what}"
        time.sleep(0.02)


def _ids(user: str) -> dict[str, object]:
    pw = pwd.getpwnam(user)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _sock(home: QHome) -> Path:
    return home.path / "run" / "qmail-queue.sock"


def _serving(home: QHome) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        try:
            c.connect(str(_sock(home)))
        except OSError:
            return False
        return True


def _drop_dir(home: QHome) -> Path:
    return home.path / "maildrop"


def _drops(home: QHome) -> list[str]:
    return sorted(os.listdir(_drop_dir(home)))


class Queued:
    """A standalone qmail-queued started as root, its stderr in a file."""

    def __init__(self, home: QHome, *args: str, wait: bool = True) -> None:
        self.home = home
        self.errpath = home.path.parent / f"queued.{time.monotonic_ns()}.stderr"
        self._err = open(self.errpath, "wb")
        self.proc = subprocess.Popen([str(home.bin("qmail-queued")), *args], env=ENV, stdin=subprocess.DEVNULL,
                                     stdout=self._err, stderr=self._err)
        if wait:
            _wait(lambda: self._alive_or_fail() and _serving(home) and self.holds_lock(), what="qmail-queued serving")

    def _alive_or_fail(self) -> bool:
        assert self.proc.poll() is None, self.stderr()
        return True

    def holds_lock(self) -> bool:
        return _lock_text(self.home) == f"{self.proc.pid}\n"

    def stderr(self) -> str:
        return self.errpath.read_text("latin-1")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        rc = self.proc.wait(30)
        self._err.close()
        return rc

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)
        self._err.close()


def _lock_text(home: QHome) -> str:
    try:
        return (home.queue / "lock" / "queued").read_text()
    except FileNotFoundError:
        return ""


@pytest.fixture
def site(root_home: QHome) -> Site:
    """The root home with pq@FQDN delivered to TEST_USER's Maildir in a fresh home."""
    pw = pwd.getpwnam(TEST_USER)
    home = root_home.path.parent / "pq"
    for d in (home, home / "Maildir", home / "Maildir" / "tmp", home / "Maildir" / "new", home / "Maildir" / "cur"):
        d.mkdir()
        os.chown(d, pw.pw_uid, pw.pw_gid)
        d.chmod(0o700)
    home.chmod(0o755)
    (root_home.path / "users" / "assign").write_text(f"=pq:{TEST_USER}:{pw.pw_uid}:{pw.pw_gid}:{home}:::\n.\n")
    expect(run([root_home.bin("qmail-newu")]))
    s = Site(root_home, None, 0, 0)
    yield s
    # Nothing of a test may outlive it (a -p qmail-queued notices its qmail-send's end within a second).
    _wait(lambda: not _serving(root_home), 10, "every qmail-queued of the test to end")


def _delivered(s: Site) -> list[bytes]:
    new = s.home.path.parent / "pq" / "Maildir" / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())]


def _smtp(home: QHome, subject: str) -> bytes:
    """Send one message to ADDR through qmail-smtpd run as qmaild with tcpserver's environment; return the reply to the dot."""
    mine, theirs = socket.socketpair()
    env = dict(ENV, PROTO="TCP", TCPREMOTEIP="127.0.0.1", TCPREMOTEPORT="40000", TCPLOCALIP="127.0.0.1",
               TCPLOCALPORT="25", TCPLOCALHOST=FQDN)
    p = subprocess.Popen([str(home.bin("qmail-smtpd"))], stdin=theirs, stdout=theirs, stderr=subprocess.PIPE,
                         env=env, cwd="/", **_ids("qmaild"))  # type: ignore[call-overload]
    theirs.close()
    mine.settimeout(60)
    f = mine.makefile("rwb")

    def reply() -> bytes:
        out = b""
        while True:
            line = f.readline()
            assert line, out
            out += line
            if line[3:4] != b"-":
                return out

    try:
        assert reply().startswith(b"220 ")
        for cmd, want in ((b"HELO client.example.org", b"250"), (b"MAIL FROM:<someone@example.org>", b"250"),
                          (b"RCPT TO:<" + ADDR + b">", b"250"), (b"DATA", b"354")):
            f.write(cmd + b"\r\n")
            f.flush()
            r = reply()
            assert r.startswith(want), (cmd, r)
        f.write(f"Subject: {subject}\r\n\r\nvia smtp\r\n.\r\n".encode())
        f.flush()
        answer = reply()
        f.write(b"QUIT\r\n")
        f.flush()
        reply()
    finally:
        f.close()
        mine.close()
        p.wait(30)
        assert p.stderr is not None
        p.stderr.close()
    return answer


def _inject(home: QHome, subject: str) -> Result:
    """qmail-inject as TEST_USER, to ADDR."""
    return run([home.bin("qmail-inject"), ADDR.decode()], input=f"Subject: {subject}\n\nvia inject\n".encode(),
               env=ENV, cwd="/", user=TEST_USER)


def _inject_both(home: QHome, tag: str) -> None:
    assert _smtp(home, f"smtp {tag}").startswith(b"250 "), "SMTP DATA not accepted"
    expect(_inject(home, f"inject {tag}"))


def _queued(home: QHome) -> list[tuple[bytes, int, bytes]]:
    """Return (who the Received line names, the envelope's uid, the Subject) of every message in todo/, sorted."""
    out = []
    for name in files(home.queue)["todo"]:
        num = int(name)
        mess = (home.queue / "mess" / str(num % 23) / name).read_bytes()
        m = RECEIVED.match(mess)
        assert m, mess[:200]
        subj = re.search(rb"\nSubject: ([^\n]*)\n", mess)
        out.append((m.group(2), parse_todo((home.queue / "todo" / name).read_bytes()).uid,
                    subj.group(1) if subj else b""))
    return sorted(out)


def _expect_two(home: QHome, tag: str) -> None:
    uid = pwd.getpwnam(TEST_USER).pw_uid
    qmaild = pwd.getpwnam("qmaild").pw_uid
    assert _queued(home) == sorted([(f"invoked by uid {uid}".encode(), uid, f"inject {tag}".encode()),
                                    (b"invoked from network", qmaild, f"smtp {tag}".encode())])


def _deliver(s: Site, count: int) -> None:
    """Run qmail-start until count messages are in pq's Maildir and the queue is empty; stop it."""
    d = Running(s, env=ENV)
    try:
        _wait(lambda: len(_delivered(s)) >= count and not messages(s.home.queue), 60, "deliveries")
    finally:
        assert d.stop() == 0


# --- intake with parts of the system down ------------------------------------------

def test_qmail_send_stopped_qmail_queued_serving(site: Site) -> None:
    home = site.home
    q = Queued(home)
    try:
        _inject_both(home, "1")
        _expect_two(home, "1")  # queued at once, through the socket
        assert _drops(home) == []
        # qmail-start's own `qmail-queued -p` finds the lock held: it waits, the standalone one serves.
        _deliver(site, 2)
        texts = _delivered(site)
        assert sorted(t.split(b"Subject: ")[1].split(b"\n")[0] for t in texts) == [b"inject 1", b"smtp 1"]
        assert q.proc.poll() is None and q.holds_lock() and _serving(home)
    finally:
        assert q.stop() == 0
    assert not _sock(home).exists()  # removed by the lock holder on TERM
    assert q.stderr() == ""


def test_qmail_queued_killed_then_standalone_picks_up(site: Site) -> None:
    home = site.home
    q = Queued(home)
    q.kill()
    assert _sock(home).exists() and not _serving(home)  # a dangling socket: ECONNREFUSED
    _inject_both(home, "2")
    assert files(home.queue)["mess"] == []
    drops = _drops(home)
    assert len(drops) == 2 and all(d.startswith("m") for d in drops)
    q2 = Queued(home)
    try:
        _wait(lambda: _drops(home) == [], what="pickup")
        _expect_two(home, "2")  # the same uids and Received lines as through the socket
        _deliver(site, 2)
    finally:
        assert q2.stop() == 0
    assert q2.stderr() == ""


def test_nothing_running_then_qmail_start_picks_up(site: Site) -> None:
    home = site.home
    _inject_both(home, "3")
    assert len(_drops(home)) == 2
    d = Running(site, env=ENV)
    try:
        _wait(lambda: len(_delivered(site)) == 2 and not messages(home.queue), 60, "deliveries")
        assert _drops(home) == []
        assert _lock_text(home).endswith(" p\n")  # qmail-start's qmail-queued -p holds the lock
    finally:
        assert d.stop() == 0
    _wait(lambda: not _sock(home).exists(), what="the -p qmail-queued to end with qmail-send")


# --- second instances ----------------------------------------------------------------

def test_second_qmail_start_is_refused_and_touches_nothing(site: Site) -> None:
    home = site.home
    d = Running(site, env=ENV)
    try:
        d.wait_for(b"status: local 0/10 remote 0/20")
        _wait(lambda: _serving(home), what="qmail-queued -p")
        before = (_sock(home).stat().st_ino, _lock_text(home))
        r = run([home.bin("qmail-start"), "./Maildir/"], env=ENV, timeout=30)
        assert (r.returncode, r.stdout, r.stderr) == (111, ALERT, b""), r.explain()
        assert (_sock(home).stat().st_ino, _lock_text(home)) == before
        assert _serving(home)
        expect(_inject(home, "after second start"))
        d.wait_for(lambda ls: any(x.startswith(b"end msg ") for x in ls))
        _wait(lambda: len(_delivered(site)) == 1, what="delivery")
    finally:
        assert d.stop() == 0


def test_second_standalone_qmail_queued_is_refused(site: Site) -> None:
    home = site.home
    q = Queued(home)
    try:
        ino = _sock(home).stat().st_ino
        r = run([home.bin("qmail-queued")], env=ENV, timeout=60)
        assert (r.returncode, r.stdout, r.stderr) == (111, b"", b"qmail-queued: fatal: qmail-queued is already running\n")
        # -p (a second qmail-start's) waits instead; it ends as soon as its parent does, quietly.
        assert _sock(home).stat().st_ino == ino and q.holds_lock()
        expect(_inject(home, "after second queued"))
        assert len(files(home.queue)["todo"]) == 1 and _drops(home) == []
    finally:
        assert q.stop() == 0


def test_standalone_takes_over_from_p_and_p_takes_over_again(site: Site) -> None:
    home = site.home
    d = Running(site, env=ENV)
    try:
        d.wait_for(b"status: local 0/10 remote 0/20")
        _wait(lambda: _lock_text(home).endswith(" p\n"), what="qmail-queued -p")
        q = Queued(home)  # asks the -p one to give way over the socket, then holds the lock
        try:
            expect(_inject(home, "standalone"))
            _wait(lambda: len(_delivered(site)) == 1, what="delivery")
        finally:
            assert q.stop() == 0
        assert q.stderr() == ""
        # The standalone one stopped (svc -d): qmail-start's -p one was waiting and serves again.
        _wait(lambda: _lock_text(home).endswith(" p\n") and _serving(home), what="-p to take the lock back")
        expect(_inject(home, "p again"))
        _wait(lambda: len(_delivered(site)) == 2, what="delivery")
    finally:
        assert d.stop() == 0


# --- qmail-queue's side of the maildrop ----------------------------------------------

def test_direct_qmail_queue_without_daemon(site: Site) -> None:
    """Issue 12 B9: a local user's qmail-queue works with no daemon at all, and names that user."""
    home = site.home
    uid = pwd.getpwnam(TEST_USER).pw_uid
    for env, code in ((b"Xbad\0\0", 91), (b"F" + b"x" * 1003 + b"\0\0", 11), (b"Fa\0", 54),
                      (b"Fa\0Tb\0", 54), (b"Fa\0Xb\0\0", 91)):
        p = qq(home, b"x\n", env, user=TEST_USER)
        assert p.returncode == code, (env, p)
    assert _drops(home) == []  # every failure removed its t file
    p = qq(home, b"Subject: b9\n\nhello\n", envelope(b"pqtest@x", b"a@y", b"b@z"), user=TEST_USER)
    assert p.returncode == 0, p.stderr
    (name,) = _drops(home)
    st = (_drop_dir(home) / name).stat()
    assert name.startswith("m") and st.st_uid == uid and st.st_gid == grp.getgrnam("qmail").gr_gid
    assert stat.S_IMODE(st.st_mode) == 0o640
    q = Queued(home)
    try:
        _wait(lambda: _drops(home) == [], what="pickup")
        (todo,) = files(home.queue)["todo"]
        mess = (home.queue / "mess" / str(int(todo) % 23) / todo).read_bytes()
        m = RECEIVED.match(mess)
        # Issue 12 B5: the pid is the client's, as written in the drop file's name mTIME.PID.RANDOM.
        client = int(name.split(".")[1])
        assert m and m.group(1) == str(client).encode() and m.group(2) == f"invoked by uid {uid}".encode()
        assert mess[m.end():] == b"Subject: b9\n\nhello\n"
        e = parse_todo((home.queue / "todo" / todo).read_bytes())
        assert (e.uid, e.pid, e.sender, e.recipients) == (uid, client, b"pqtest@x", [b"a@y", b"b@z"])
    finally:
        assert q.stop() == 0


def _fake_server(home: QHome, ack: bool) -> threading.Thread:
    """Listen on the socket; take one client's descriptors and close without reading them (after an ACK if ack)."""
    path = _sock(home)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    path.chmod(0o666)
    srv.listen(1)

    def serve() -> None:
        with srv:
            conn, _ = srv.accept()
            with conn:
                _, fds, _, _ = socket.recv_fds(conn, 1, 4)
                for fd in fds:
                    os.close(fd)
                if ack:
                    conn.sendall(b"+")

    t = threading.Thread(target=serve)
    t.start()
    return t


def test_server_gone_before_ack_means_maildrop(site: Site) -> None:
    home = site.home
    t = _fake_server(home, ack=False)
    p = qq(home, b"Subject: vanished\n\nbody\n", envelope(b"s", b"r"), user=TEST_USER)
    t.join(30)
    assert p.returncode == 0, p.stderr
    (name,) = _drops(home)
    data = (_drop_dir(home) / name).read_bytes()
    assert b"Subject: vanished\n\nbody\n" in data and data.endswith(b"Fs\0Tr\0\0")


def test_server_gone_after_ack_is_temporary(site: Site) -> None:
    home = site.home
    t = _fake_server(home, ack=True)
    p = qq(home, b"x\n", envelope(b"s", b"r"), user=TEST_USER)
    t.join(30)
    assert p.returncode == 81  # the server held the descriptors: the message may be half read
    assert _drops(home) == []


# --- hostile maildrop files -----------------------------------------------------------

def _user_drop(home: QHome, user: str, body: bytes) -> Path:
    """Drop a message as user with no qmail-queued running; return its file."""
    before = set(_drops(home))
    p = qq(home, body, envelope(b"s@x", b"r@y"), user=user)
    assert p.returncode == 0, p.stderr
    (name,) = set(_drops(home)) - before
    return _drop_dir(home) / name


def _as_user_file(home: QHome, name: str, content: bytes, scratch: Path) -> Path:
    """Make maildrop/name with content, created by TEST_USER."""
    src = scratch / f"src.{name}"
    src.write_bytes(content)
    src.chmod(0o644)
    expect(run(["cp", str(src), str(_drop_dir(home) / name)], user=TEST_USER))
    # As qmail-queue leaves its drop files: group qmail (the directory's setgid), 0640.
    expect(run(["chmod", "640", str(_drop_dir(home) / name)], user=TEST_USER))
    return _drop_dir(home) / name


def _vm_hwm_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_hostile_maildrop_files(site: Site) -> None:
    home = site.home
    drop = _drop_dir(home)
    scratch = world_dir()
    try:
        uid = pwd.getpwnam(TEST_USER).pw_uid
        qmaild = pwd.getpwnam("qmaild").pw_uid
        good = _user_drop(home, TEST_USER, b"Subject: good\n\n1\n")
        _user_drop(home, "qmaild", b"Subject: network\n\n2\n")
        big = b"Subject: huge\n\n" + (b"y" * 1023 + b"\n") * (64 * 1024)  # 64 MB
        _user_drop(home, TEST_USER, big)
        template = good.read_bytes()
        # Another user's file (alias's), hard-linked in (root can; protected_hardlinks stops users).
        victim_drop = _user_drop(home, "alias", b"Subject: victim\n\nsecret\n")
        victim = scratch / "victim"
        os.rename(victim_drop, victim)
        os.link(victim, drop / "mlinked")
        # A symlink to it, a FIFO and a directory with a file in it, made by the user.
        expect(run(["ln", "-s", str(victim), str(drop / "msym")], user=TEST_USER))
        expect(run(["mkfifo", str(drop / "mfifo")], user=TEST_USER))
        expect(run(["mkdir", str(drop / "mdir")], user=TEST_USER))
        expect(run(["touch", str(drop / "mdir" / "x")], user=TEST_USER))
        # Malformed files of the user's own.
        _as_user_file(home, "mgarbage", b"garbage\n", scratch)
        _as_user_file(home, "mempty", b"", scratch)
        _as_user_file(home, "mhalf", template[:len(template) // 2], scratch)
        _as_user_file(home, "mnonul", template[:-1], scratch)  # the envelope's final NUL cut off
        _as_user_file(home, "mfar", template[:16] + (2**62).to_bytes(8, "big") + template[24:], scratch)
        offset = int.from_bytes(template[16:24], "big")
        _as_user_file(home, "mlongaddr", template[:offset] + b"F" + b"a" * 2000 + b"\0\0", scratch)
        _as_user_file(home, "mbadenv", template[:offset] + b"Xa\0\0", scratch)
        # Well formed, but not as qmail-queue leaves them: mode 0644 (another user's file
        # hard-linked here after its own link went keeps its mode), and sparse (a gigabyte
        # the queue would write that its owner never paid for).
        _as_user_file(home, "mmode", template, scratch)
        expect(run(["chmod", "644", str(drop / "mmode")], user=TEST_USER))
        _as_user_file(home, "msparse", template, scratch)
        expect(run(["truncate", "-s", "+1G", str(drop / "msparse")], user=TEST_USER))
        # A well-formed file owned by root: root's qmail-queue never drops, so it is refused.
        (drop / "mroot").write_bytes(template)
        # Stale and fresh t files, and junk.
        for name in ("tstale", "tfresh", "junk"):
            _as_user_file(home, name, b"partial", scratch)
        old = time.time() - 37 * 3600
        os.utime(drop / "tstale", (old, old))

        q = Queued(home, wait=False)
        try:
            _wait(lambda: _drops(home) == ["junk", "mdir", "tfresh"], 120, f"the scan: {_drops(home)}")
            _wait(lambda: q.stderr().count("\n") >= 15, what="the refusals")  # 14 refusals + mdir's removal
            hwm = _vm_hwm_kb(q.proc.pid)
            assert _serving(home)
        finally:
            assert q.stop() == 0
        assert _queued(home) == sorted([(f"invoked by uid {uid}".encode(), uid, b"good"),
                                        (f"invoked by uid {uid}".encode(), uid, b"huge"),
                                        (b"invoked from network", qmaild, b"network")])
        (huge,) = [n for n in files(home.queue)["mess"] if (home.queue / "mess" / n).stat().st_size > len(big)]
        assert (home.queue / "mess" / huge).read_bytes().endswith(big)
        assert hwm < 64 * 1024 / 2, f"qmail-queued's peak RSS {hwm} kB: the 64 MB message was not streamed"
        assert victim.read_bytes().endswith(b"Fs@x\0Tr@y\0\0")  # only the link in maildrop went
        err = q.stderr()
        alias = pwd.getpwnam("alias").pw_uid
        qgid = grp.getgrnam("qmail").gr_gid
        for line in (f"refused maildrop/mlinked (uid {alias}): has 2 links",
                     f"refused maildrop/msym (uid {uid}): not a regular file",
                     f"refused maildrop/mfifo (uid {uid}): not a regular file",
                     f"refused maildrop/mdir (uid {uid}): not a regular file",
                     "unable to remove maildrop/mdir: Directory not empty",
                     "refused maildrop/mgarbage: not a drop file",
                     "refused maildrop/mempty: not a drop file",
                     "refused maildrop/mhalf: not a drop file",
                     "refused maildrop/mfar: not a drop file",
                     "refused maildrop/mnonul: malformed (qmail-queue exit 54)",
                     "refused maildrop/mlongaddr: malformed (qmail-queue exit 11)",
                     "refused maildrop/mbadenv: malformed (qmail-queue exit 91)",
                     "refused maildrop/mroot (uid 0): owned by uid 0",
                     f"refused maildrop/mmode (uid {uid}): group {qgid} mode 644, not a drop file's",
                     f"refused maildrop/msparse (uid {uid}): sparse ({len(template) + 2**30} bytes, "):
            assert f"qmail-queued: warning: {line}" in err, err
        assert err.count("\n") == 15, err  # mdir's failed removal is said once, not every scan
        assert messages(home.queue) and all(s == "S4" for s in messages(home.queue).values())
        print(f"qmail-queued peak RSS after queueing a 64 MB drop file: {hwm} kB")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- installation and services --------------------------------------------------------

def test_init_makes_the_maildrop(root_home: QHome) -> None:
    st = _drop_dir(root_home).stat()
    assert (st.st_uid, st.st_gid) == (pwd.getpwnam("qmailq").pw_uid, grp.getgrnam("qmail").gr_gid)
    assert stat.S_IMODE(st.st_mode) == 0o3733
    # A user may create there but not list it.
    r = run(["ls", str(_drop_dir(root_home))], user=TEST_USER)
    assert r.returncode != 0


def test_qmail_queued_remakes_a_missing_maildrop(site: Site) -> None:
    home = site.home
    _drop_dir(home).rmdir()
    q = Queued(home)
    try:
        st = _drop_dir(home).stat()
        assert stat.S_IMODE(st.st_mode) == 0o3733 and st.st_uid == pwd.getpwnam("qmailq").pw_uid
    finally:
        assert q.stop() == 0


def test_up_runs_qmail_queued_as_a_service(root_home: QHome) -> None:
    from pyqmail import home as _home
    from pyqmail.admin import up

    os.environ["QMAILHOME"] = str(root_home.path)
    try:
        _home.reset()
        inst = _home.install()
        got = up.services(str(root_home.path), inst, up.Ports("127.0.0.1", 0, 0), FQDN)
        assert got["queued"] == [str(root_home.bin("qmail-queued"))]
        single = _home.Install(True, inst.split, inst.users, inst.groups)
        assert "queued" not in up.services(str(root_home.path), single, up.Ports("127.0.0.1", 0, 0), FQDN)
    finally:
        del os.environ["QMAILHOME"]
        _home.reset()


def test_qmail_queued_answers_term_and_alrm(site: Site) -> None:
    home = site.home
    q = Queued(home)
    try:
        _user_drop_while_serving = qq(home, b"x\n", envelope(b"a", b"b"), user=TEST_USER)
        assert _user_drop_while_serving.returncode == 0
        assert _drops(home) == [] and len(files(home.queue)["todo"]) == 1
        os.kill(q.proc.pid, signal.SIGALRM)  # scan now: nothing there, nothing happens
        assert q.proc.poll() is None
    finally:
        assert q.stop() == 0
    assert not _sock(home).exists() and _lock_text(home) == ""


def test_queue_trouble_with_one_drop_file_holds_back_no_other(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # A drop file the queue cannot take (say, one big enough to fill the disk) waits
    # BACKOFF_SECONDS; the files after it are still queued at every scan.
    from pyqmail import home as _home
    from pyqmail.queue import qmail_queued

    (tmp_path / "maildrop").mkdir()
    for name in ("ma-trouble", "mb-good"):
        (tmp_path / "maildrop" / name).write_bytes(b"x")
    p = qmail_queued.Pickup(str(tmp_path), _home.Install(False, 23, {}, {}), -1)
    tried: list[str] = []

    def pick_up(name: str) -> int | None:
        tried.append(name)
        if name == "ma-trouble":
            return None
        os.unlink(tmp_path / "maildrop" / name)
        return 1

    monkeypatch.setattr(p, "pick_up", pick_up)
    assert p.scan(now=1000.0) == 1
    assert sorted(tried) == ["ma-trouble", "mb-good"]
    tried.clear()
    assert p.scan(now=1000.0 + qmail_queued.BACKOFF_SECONDS - 1) == 0 and tried == []
    assert p.scan(now=1000.0 + qmail_queued.BACKOFF_SECONDS + 1) == 0 and tried == ["ma-trouble"]
