"""qmail-rspawn's workers (issue 17): one process serves many remote deliveries, each as a child would.

qmail-rspawn runs as a process of its own, fed one command at a time; its children are
read from /proc, the sinks are SMTP servers of the tests on 127.0.0.1.
"""

from __future__ import annotations

import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from remotekit import SmtpServer
from sendkit import Site, make_site, only_todo, qqueue, remove_site
from test_remote_auth import PASSWORD, USER, AuthServer
from tlskit import Cert, make_ca, make_leaf, server_context

from pyqmail.remote import qmail_rspawn
from pyqmail.send import spawnproto

DEADLINE = 30.0
EHLO = {"EHLO": b"250-peer\r\n250 8BITMIME\r\n"}


@pytest.fixture
def site() -> Iterator[Site]:
    s = make_site()
    yield s
    remove_site(s)


@pytest.fixture(scope="module")
def pki() -> Iterator[dict[str, Cert]]:
    d = Path(tempfile.mkdtemp(prefix="pyqmail-rspw-", dir="/tmp"))
    ca = make_ca(d, "rspwca")
    yield {"ca": ca, "leaf": make_leaf(d, "rspw", ca, ["auth.example.test"])}
    shutil.rmtree(d, ignore_errors=True)


class Rspawn:
    """A running qmail-rspawn: commands written one at a time, reports read as they come."""

    def __init__(self, site: Site, env: dict[str, str] | None = None) -> None:
        kw: dict[str, object] = {}
        if site.user is not None:
            pw = pwd.getpwnam(site.user)
            kw.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        self.p = subprocess.Popen([str(site.home.bin("qmail-rspawn"))], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env={"PATH": "/usr/bin:/bin", **(env or {})}, **kw)  # type: ignore[call-overload]
        assert self.p.stdin is not None and self.p.stdout is not None
        self.out = self.p.stdout.fileno()
        self.reader = spawnproto.ReportReader()
        self.pending: list[tuple[int, bytes]] = []
        self.buf = b""
        first = self._read()
        assert first[:1] == bytes([spawnproto.SPAWN_MAX]), first
        self.pending += list(self.reader.feed(first[1:]))

    def _read(self) -> bytes:
        ready, _, _ = select.select([self.out], [], [], DEADLINE)
        assert ready, "qmail-rspawn said nothing"
        data = os.read(self.out, 65536)
        assert data, f"qmail-rspawn ended: {self.p.wait()} {self.p.stderr.read() if self.p.stderr else b''!r}"
        return data

    def command(self, slot: int, messid: bytes, recip: bytes, sender: bytes = b"s@x") -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(spawnproto.command(slot, messid, sender, recip))
        self.p.stdin.flush()

    def report(self) -> tuple[int, bytes]:
        while not self.pending:
            self.pending += list(self.reader.feed(self._read()))
        return self.pending.pop(0)

    def deliver(self, messid: bytes, recip: bytes, sender: bytes = b"s@x") -> bytes:
        self.command(0, messid, recip, sender)
        slot, text = self.report()
        assert slot == 0
        return text

    def children(self) -> list[int]:
        with open(f"/proc/{self.p.pid}/task/{self.p.pid}/children") as f:
            return [int(x) for x in f.read().split()]

    def close(self) -> bytes:
        assert self.p.stdin is not None and self.p.stderr is not None
        self.p.stdin.close()
        assert self.p.wait(DEADLINE) == 0
        err = self.p.stderr.read()
        self.p.stdout.close()  # type: ignore[union-attr]
        self.p.stderr.close()
        return err


def _queued(site: Site) -> bytes:
    qqueue(site.home, b"s@x", [b"r@far.example"], b"Subject: w\n\nworkers\n", user=site.user)
    num = only_todo(site.home)
    return f"{num % 23}/{num}".encode()


def _fds(pid: int) -> list[str]:
    return sorted(os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd"))


def _gone(pid: int) -> bool:
    """True once pid has ended (a zombie counts: its parent reaps it at its next wake-up)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _until(cond: object, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        select.select([], [], [], 0.02)


def test_one_worker_serves_many_deliveries_with_constant_descriptors(site: Site) -> None:
    with SmtpServer(replies=EHLO) as sink:
        site.home.control("smtproutes", f"far.example:[127.0.0.1]:{sink.port}\n")
        m = _queued(site)
        r = Rspawn(site)
        try:
            pids = []
            fds = []
            for i in range(6):
                text = r.deliver(m, f"r{i}@far.example".encode())
                assert text.startswith(b"K127.0.0.1 accepted message."), text
                pids += r.children()
                fds.append(_fds(pids[-1]))
        finally:
            err = r.close()
        assert len(set(pids)) == 1 and len(pids) == 6, pids  # one worker, seen after every delivery
        assert all(f == fds[0] for f in fds), fds
        assert set(fds[0]) <= {"/dev/null"} | {f for f in fds[0] if f.startswith("socket:[")}, fds[0]
        assert [s.commands[2] for s in sink.sessions] == [f"RCPT TO:<r{i}@far.example>".encode() for i in range(6)]
        assert all(b"workers" in s.data for s in sink.sessions)
        assert err == b""
    _until(lambda: _gone(pids[0]), "the worker outlived qmail-rspawn")


def test_killed_worker_is_a_crashed_child_then_the_next_delivery_goes(site: Site) -> None:
    hold = socket.create_server(("127.0.0.1", 0))
    hold.settimeout(DEADLINE)
    with hold, SmtpServer(replies=EHLO) as sink:
        site.home.control("smtproutes", f"slow.example:[127.0.0.1]:{hold.getsockname()[1]}\n"
                                        f"far.example:[127.0.0.1]:{sink.port}\n")
        m = _queued(site)
        r = Rspawn(site)
        try:
            assert r.deliver(m, b"a@far.example").startswith(b"K")
            (first,) = r.children()
            r.command(1, m, b"b@slow.example")
            conn, _ = hold.accept()  # the worker is in the middle of the delivery: no greeting comes
            with conn:
                assert r.children() == [first]
                os.kill(first, signal.SIGKILL)
                assert r.report() == (1, qmail_rspawn.CRASHED)  # as a killed child: deferred, nothing lost
            assert r.deliver(m, b"c@far.example").startswith(b"K")
            (second,) = r.children()
        finally:
            r.close()
        assert second != first
        assert [s.commands[2] for s in sink.sessions] == [b"RCPT TO:<a@far.example>", b"RCPT TO:<c@far.example>"]


def test_route_tls_and_auth_state_stay_with_their_delivery(site: Site, pki: dict[str, Cert]) -> None:
    pw = PASSWORD.decode()
    with AuthServer(server_context(pki["leaf"]), b"PLAIN") as good, \
            AuthServer(server_context(pki["leaf"]), b"PLAIN") as bad, SmtpServer(replies=EHLO) as plain:
        site.home.control("smtproutes", f"a.example:[127.0.0.1]:{good.port} {USER.decode()} {pw}\n"
                                        f"b.example:[127.0.0.1]:{bad.port} other wrong\n"
                                        f"c.example:[127.0.0.1]:{plain.port}\n")
        m = _queued(site)
        r = Rspawn(site)
        try:
            reps = []
            pids = []
            for rcpt in (b"x@a.example", b"y@c.example", b"z@b.example", b"w@a.example"):
                reps.append(r.deliver(m, rcpt))
                pids += r.children()
        finally:
            r.close()
        assert len(set(pids)) == 1, pids
        assert reps[0].startswith(b"K127.0.0.1 accepted message."), (reps, good.errors)
        assert reps[1].startswith(b"K127.0.0.1 accepted message."), reps
        assert reps[2].startswith(b"DConnected to 127.0.0.1 but authentication was rejected (AUTH PLAIN)."), reps
        assert reps[3].startswith(b"K127.0.0.1 accepted message."), (reps, good.errors)
        # Each sink saw its own route's TLS and credentials, none of another delivery's.
        assert [s.mech for s in good.seen] == [b"PLAIN", b"PLAIN"] and all(s.tls_at_auth for s in good.seen)
        assert [s.mech for s in bad.seen] == [b"PLAIN"] and bad.seen[0].tls_at_auth
        (session,) = plain.sessions
        assert not any(c.startswith((b"AUTH", b"STARTTLS")) for c in session.commands), session.commands
        assert all(b"TLS" in rep for rep in (reps[0], reps[3]))  # the TLS line of its own handshake
        assert b"TLS" not in reps[1]


def test_worker_retires_after_its_deliveries_and_when_idle(site: Site) -> None:
    with SmtpServer(replies=EHLO) as sink:
        site.home.control("smtproutes", f"far.example:[127.0.0.1]:{sink.port}\n")
        m = _queued(site)
        r = Rspawn(site, {"PYQMAIL_RSPAWN_DELIVERIES": "2", "PYQMAIL_RSPAWN_IDLE": "0.3"})
        try:
            seen = []
            for i in range(2):
                assert r.deliver(m, f"r{i}@far.example".encode()).startswith(b"K")
                seen.append(set(r.children()))
            # After its second delivery the worker said LAST and exits.
            (w,) = seen[0]
            _until(lambda: _gone(w), "a worker served more than PYQMAIL_RSPAWN_DELIVERIES")
            assert r.deliver(m, b"r2@far.example").startswith(b"K")
            (w2,) = set(r.children()) - {w}
            _until(lambda: _gone(w2), "an idle worker did not retire")  # 0.3 s idle
            assert r.deliver(m, b"r3@far.example").startswith(b"K")  # a new one, at once
        finally:
            r.close()
        assert len(sink.sessions) == 4


def test_workers_off_and_wrappers_fork_a_child_per_delivery(site: Site) -> None:
    with SmtpServer(replies=EHLO) as sink:
        site.home.control("smtproutes", f"far.example:[127.0.0.1]:{sink.port}\n")
        m = _queued(site)
        r = Rspawn(site, {"PYQMAIL_RSPAWN_WORKERS": "0"})
        try:
            for i in range(2):
                assert r.deliver(m, f"r{i}@far.example".encode()).startswith(b"K")
                _until(lambda: not [c for c in r.children() if not _gone(c)], "a child stayed")
        finally:
            r.close()
        assert len(sink.sessions) == 2


def test_many_deliveries_at_once_use_at_most_as_many_workers(site: Site) -> None:
    with SmtpServer(replies=EHLO) as sink:
        site.home.control("smtproutes", f"far.example:[127.0.0.1]:{sink.port}\n")
        m = _queued(site)
        r = Rspawn(site)
        try:
            for round_ in range(3):
                for slot in range(5):
                    r.command(slot, m, f"r{round_}.{slot}@far.example".encode())
                got = dict(r.report() for _ in range(5))
                assert sorted(got) == list(range(5)) and all(t.startswith(b"K") for t in got.values()), got
                assert len(r.children()) <= 5
        finally:
            r.close()
        assert len(sink.sessions) == 15


# --- the worker loop alone, with programs that leave something behind ---------------------------

class _Program:
    """A stand-in for qmail-remote's module: main runs what the test gives, then says 'r\\0Kok\\0'."""

    def __init__(self, act: object, reset: bool = True) -> None:
        self.act = act
        self.reset = reset

    def main(self, argv: list[str]) -> int:
        self.act(argv)  # type: ignore[operator]
        os.write(1, b"r\0K" + argv[1].encode() + b"\0")
        return 0

    def worker_reset(self) -> bool:
        return self.reset


def _serve_jobs(prog: _Program, jobs: int) -> tuple[list[bytes], list[bytes], int]:
    """Fork a worker running prog; hand it up to jobs deliveries; return (DONE messages, outputs, its exit code)."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        code = 111
        try:
            mine.close()
            code = qmail_rspawn.serve(theirs, "/nonexistent/qmail-remote",
                                      qmail_rspawn.spawn.Stub("qmail-remote", "x", "/nonexistent"),
                                      prog, {"PATH": "/usr/bin:/bin"}, 100, 30.0)  # type: ignore[arg-type]
        finally:
            os._exit(code)
    theirs.close()
    said, outs = [], []
    try:
        for i in range(jobs):
            r, w = os.pipe()
            with open("/dev/null", "rb") as msg:
                try:
                    socket.send_fds(mine, [b"j" + b"\0".join([b"qmail-remote", b"h%d" % i, b"s", b"r@h"])],
                                    [msg.fileno(), w], socket.MSG_NOSIGNAL)
                except BrokenPipeError:
                    os.close(r)
                    os.close(w)
                    break
            os.close(w)
            out = b""
            while chunk := os.read(r, 4096):
                out += chunk
            os.close(r)
            outs.append(out)
            said.append(mine.recv(16))
    finally:
        mine.close()
        _, status = os.waitpid(pid, 0)
    return said, outs, os.waitstatus_to_exitcode(status)


def test_worker_loop_serves_clean_deliveries_and_exits_after_any_leftover() -> None:
    said, outs, code = _serve_jobs(_Program(lambda argv: None), 3)
    assert said == [b"d\0+"] * 3 and outs == [b"r\0Kh0\0", b"r\0Kh1\0", b"r\0Kh2\0"] and code == 0
    leaked: list[int] = []
    for act in (lambda argv: leaked.append(os.open("/dev/null", os.O_RDONLY)),  # a descriptor left open
                lambda argv: os.umask(0o002),
                lambda argv: signal.signal(signal.SIGUSR1, lambda *a: None),
                lambda argv: signal.alarm(100),
                lambda argv: os.environ.__setitem__("LEFT", "over")):
        said, outs, code = _serve_jobs(_Program(act), 2)
        assert said == [b"d\0x"] and outs == [b"r\0Kh0\0"] and code == 0, (said, outs)
    # qmail-remote moves to the home: the worker moves back to where it started.
    said, _, code = _serve_jobs(_Program(lambda argv: os.chdir("/")), 2)
    assert said == [b"d\0+"] * 2 and code == 0
    # The module says it cannot serve again (qmail-remote after its crash report).
    said, _, _ = _serve_jobs(_Program(lambda argv: None, reset=False), 2)
    assert said == [b"d\0x"]


def test_worker_loop_exception_is_exit_111_and_the_last_delivery() -> None:
    def boom(argv: list[str]) -> None:
        raise RuntimeError("bug")

    said, outs, code = _serve_jobs(_Program(boom), 2)
    assert said == [b"d\x6fx"] and outs == [b""] and code == 0
