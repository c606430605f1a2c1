"""qmail-queued's workers (issue 17 item 1): forked once, many messages each, nothing of one message in the next.

Root mode, real processes: a standalone qmail-queued started as root, clients
over its socket (the test process itself as root, or qmail-queue run as the
test user or qmaild). Workers are the server's children; the last tests run
the worker loop alone in a forked process over a socket pair.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
from typing import Callable

import pytest

from conftest import TEST_USER, QHome
from queuefmt import RECEIVED, files, parse_todo
from sendkit import Site
from test_intake_root import FQDN, Queued, _sock, _wait, site  # noqa: F401 - site is a fixture
from test_qmail_queue import envelope, qq
from test_queued_limits import _busy, _children, _client, _sockets

from pyqmail import home as _home
from pyqmail.queue import qmail_queued


def _send(home: QHome, message: bytes, env: bytes) -> int:
    """Queue one message through the socket as this process (root) speaks the protocol; return the exit code."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(str(_sock(home)))
        mr, mw = os.pipe()
        er, ew = os.pipe()
        socket.send_fds(s, [b"Q"], [mr, er])
        os.close(mr)
        os.close(er)
        assert s.recv(1) == b"+"
        os.write(mw, message)
        os.close(mw)
        os.write(ew, env)
        os.close(ew)
        answer = s.recv(1)
    assert len(answer) == 1, "no exit byte"
    return answer[0]


def _fds(pid: int) -> list[str]:
    """Return what pid's descriptors are (fd number and target, socket inodes left out)."""
    out = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        out.append(f"{fd} {'socket' if target.startswith('socket:') else target}")
    return out


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def _idle(worker: int) -> bool:
    return _sockets(worker) == 1  # its end to the server only: the client's connection is closed


def _started(home: QHome, *args: str) -> Queued:
    """Start qmail-queued with idle workers retiring after 3 s (or as args say) and wait until none is left.

    Queued's probes of the socket (connections closed at once) are served by
    workers too; once they have retired, what the test sends is all there is.
    """
    q = Queued(home, "-w", "3", *args)
    _wait(lambda: _children(q.proc.pid) != [], 30, "the probes' workers")  # accepted after the probe returned
    _wait(lambda: _children(q.proc.pid) == [], 30, "the probes' workers to retire")
    return q


def _message(n: int) -> tuple[bytes, bytes]:
    return b"Subject: m%d\n\nbody %d\n" % (n, n), envelope(b"s@x", b"pq@" + FQDN.encode())


def test_one_worker_serves_a_hundred_messages_and_leaks_no_descriptor(site: Site) -> None:
    home = site.home
    q = _started(home)
    try:
        assert _send(home, *_message(0)) == 0
        (worker,) = _children(q.proc.pid)
        assert _comm(worker) == qmail_queued.WORKER_COMM
        _wait(lambda: _idle(worker), 30, "the worker to be idle")
        worker_fds, server_fds = _fds(worker), _fds(q.proc.pid)
        for n in range(1, 100):
            assert _send(home, *_message(n)) == 0
        _wait(lambda: _idle(worker), 30, "the worker to be idle")
        assert _children(q.proc.pid) == [worker]  # one process served all 100: no fork per message
        assert _fds(worker) == worker_fds, "descriptors leaked between messages"
        assert _fds(q.proc.pid) == server_fds
        assert len(files(home.queue)["todo"]) == 100
        print(f"worker {worker}: {len(worker_fds)} descriptors before and after 100 messages")
    finally:
        assert q.stop() == 0
    _wait(lambda: not os.path.exists(f"/proc/{worker}"), 30, "the worker to end with its server")
    assert q.stderr() == ""


def test_messages_of_different_uids_through_one_worker_keep_their_own_uid(site: Site) -> None:
    home = site.home
    q = _started(home)
    users = [TEST_USER, "qmaild", "", TEST_USER, "", "qmaild"]  # "": this process, root
    try:
        seen = set()
        for i, user in enumerate(users):
            msg, env = _message(i)
            if user:
                p = qq(home, msg, env, user=user)
                assert p.returncode == 0, p.stderr
            else:
                assert _send(home, msg, env) == 0
            seen.update(_children(q.proc.pid))
        assert len(seen) == 1, seen  # each message served by the same worker in turn
    finally:
        assert q.stop() == 0
    uids = {u: pwd.getpwnam(u).pw_uid for u in (TEST_USER, "qmaild")} | {"": 0}
    got = {}
    for name in files(home.queue)["todo"]:
        num = int(name)
        mess = (home.queue / "mess" / str(num % 23) / name).read_bytes()
        todo = parse_todo((home.queue / "todo" / name).read_bytes())
        m = RECEIVED.match(mess)
        assert m, mess
        subject = mess.split(b"Subject: m", 1)[1].split(b"\n", 1)[0]
        got[int(subject)] = (todo.uid, m.group(2))
    want = {}
    for i, user in enumerate(users):
        uid = uids[user]
        want[i] = (uid, b"invoked from network" if user == "qmaild" else b"invoked by uid %d" % uid)
    assert got == want


def test_a_killed_worker_queues_nothing_and_is_replaced(site: Site) -> None:
    home = site.home
    q = _started(home)
    try:
        p, w = _client(home)
        assert p.stdin is not None and p.stderr is not None
        p.stdin.write(b"Subject: half\n\nthe first half\n")
        p.stdin.flush()
        _wait(lambda: len(_busy(q.proc.pid)) == 1, 30, "the client's worker")
        (worker,) = _busy(q.proc.pid)
        os.kill(worker, signal.SIGKILL)
        assert p.wait(30) == 81  # no exit byte: qmail-queue's temporary "bug" (smtpd: 451)
        p.stdin.close()
        p.stderr.close()
        os.close(w)
        f = files(home.queue)
        assert f["todo"] == [] and f["intd"] == []  # at most mess/N or pid/, which qmail-send's cleanup takes
        ok = qq(home, b"Subject: whole\n\nwhole\n", envelope(b"s@x", b"pq@" + FQDN.encode()), user=TEST_USER)
        assert ok.returncode == 0, ok.stderr
        assert len(files(home.queue)["todo"]) == 1
        _wait(lambda: len(_children(q.proc.pid)) == 1 and worker not in _children(q.proc.pid), 30,
              "one worker, a new one")
    finally:
        assert q.stop() == 0
    assert q.stderr() == ""


def test_workers_retire_after_n_messages_and_after_their_idle_time(site: Site) -> None:
    home = site.home
    q = _started(home, "-n", "3", "-w", "1")  # and it waits for the probes' workers to retire when idle
    try:
        seen: set[int] = set()
        for i in range(7):
            assert _send(home, *_message(i)) == 0
            seen.update(_children(q.proc.pid))
        assert len(seen) == 3, seen  # 3 + 3 + 1
        _wait(lambda: _children(q.proc.pid) == [], 30, "the idle worker to retire")
        assert _send(home, *_message(7)) == 0  # a new one is forked
        assert len(files(home.queue)["todo"]) == 8
    finally:
        assert q.stop() == 0
    assert q.stderr() == ""


# --- the worker loop alone ----------------------------------------------------------------

def _run_worker(monkeypatch: pytest.MonkeyPatch, serve_one: object) -> tuple[int, socket.socket]:
    """Fork a process running qmail_queued.work with serve_one replaced; return its pid and the server's end."""
    monkeypatch.setattr(qmail_queued, "serve_one", serve_one)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            mine.close()
            code = qmail_queued.work(theirs, "/nonexistent", _home.Install(False, 23, {}, {}))
        finally:
            os._exit(code)
    theirs.close()
    mine.settimeout(30)
    return pid, mine


def _job(end: socket.socket) -> socket.socket:
    """Hand the worker a connection; return the client's side of it."""
    client, server = socket.socketpair()
    socket.send_fds(end, [qmail_queued.JOB], [server.fileno()])
    server.close()
    client.settimeout(30)
    return client


def _exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_worker_loop_answers_each_job_and_says_done(monkeypatch: pytest.MonkeyPatch) -> None:
    def serve_one(conn: socket.socket, *args: object, before_answer: Callable[[int], None], **kw: object) -> int:
        if conn.recv(1) == b"e":  # as serve_one: the message's descriptors closed, then DONE, then the answer
            before_answer(0)
        conn.sendall(b"\0")
        return 0

    pid, end = _run_worker(monkeypatch, serve_one)
    for request in b"eeqe":  # "q": a connection that ends without reaching before_answer (a stop request)
        client = _job(end)
        client.sendall(bytes([request]))
        assert client.recv(1) == b"\0" and client.recv(1) == b""  # answered, and the connection closed
        client.close()
        assert end.recv(16) == qmail_queued.DONE  # once a message: the next job is read only after it
    end.close()  # the server retires it
    assert _exit_code(pid) == 0


def test_worker_exits_after_answering_an_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    def serve_one(conn: socket.socket, *args: object, **kw: object) -> int:
        raise RuntimeError("a bug of ours")

    pid, end = _run_worker(monkeypatch, serve_one)
    client = _job(end)
    assert client.recv(1) == bytes([81]) and client.recv(1) == b""
    client.close()
    assert end.recv(16) == b""  # no DONE: it exits, and the server forks another for the next message
    assert _exit_code(pid) == 81
    end.close()


def test_worker_exits_when_a_message_leaves_a_descriptor_open(monkeypatch: pytest.MonkeyPatch) -> None:
    def serve_one(conn: socket.socket, *args: object, **kw: object) -> int:
        os.open("/dev/null", os.O_RDONLY)  # what a leak of ours would look like
        conn.sendall(b"\0")
        return 0

    pid, end = _run_worker(monkeypatch, serve_one)
    client = _job(end)
    assert client.recv(1) == b"\0"
    client.close()
    assert end.recv(16) == b""
    assert _exit_code(pid) == qmail_queued.EXIT_FAIL
    end.close()


def test_an_idle_worker_killed_is_replaced_for_the_next_message(site: Site) -> None:
    home = site.home
    q = _started(home)
    try:
        assert _send(home, *_message(0)) == 0
        (worker,) = _children(q.proc.pid)
        _wait(lambda: _idle(worker), 30, "the worker to be idle")
        os.kill(worker, signal.SIGKILL)
        # At once: its end is read as gone, or the hand-over fails over. One race is left: a
        # worker still dying takes the job (the send succeeds) and drops it unanswered; the
        # client then has no ACK, and qmail-queue's client writes the maildrop (nothing lost).
        # This raw client retries instead, once.
        try:
            code = _send(home, *_message(1))
        except (AssertionError, ConnectionError):
            code = _send(home, *_message(1))
        assert code == 0
        # The killed one is gone once the server has reaped it (a zombie until then).
        _wait(lambda: len(_children(q.proc.pid)) == 1 and worker not in _children(q.proc.pid), 30,
              "one worker, a new one")
        assert len(files(home.queue)["todo"]) == 2
    finally:
        assert q.stop() == 0
    assert q.stderr() == ""
