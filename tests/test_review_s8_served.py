"""Session 8's review of injection served by qmail-queued (brief r8): what a hostile local user could do.

Each test is a finding: something the caller's own qmail-inject could not do
or would do otherwise. Root-only, as tests/test_inject_served.py, whose
helpers it uses.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import IS_ROOT, QHome, make_home, need_root_setup
from inject_cases import FQDN
from test_inject_served import LOCAL, MSG, LimitedServer, _payload, go, served_works, workers
from test_qq_handoff import Server, _need_strace, _wait

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="a root-mode home: qmail-queued's workers as qmailq")


@pytest.fixture
def qhome() -> Iterator[QHome]:
    need_root_setup()
    _need_strace()
    h = make_home(FQDN, single=False)
    s = Server(h)
    h.server = s  # type: ignore[attr-defined]
    yield h
    s.stop()
    h.server.stop()  # type: ignore[attr-defined]  # a test may have started another
    import shutil

    shutil.rmtree(h.path.parent, ignore_errors=True)


def _stat_fields(out: bytes, comm: bytes) -> list[bytes]:
    """The fields after the command name of the /proc/PID/stat line in -n output."""
    line = next(x for x in out.split(b"\n") if b"(" + comm + b")" in x)
    return line.rpartition(b")")[2].split()


def test_proc_file_of_the_worker_read_with_the_callers_rights(qhome: QHome) -> None:
    """A /proc file checks the reader's rights at each read, not the opener's: /proc/W/stat of the worker W
    shows its memory layout (startcode, endcode, startstack: ASLR) to W itself and "1 1 0" to pqtest.
    The caller's descriptor 0 on it must give what the caller's own qmail-inject reads."""
    server: Server = qhome.server  # type: ignore[attr-defined]
    served_works(qhome)
    (w,) = workers(server)
    runs = [go(qhome, b"", ("-n",), extra, shell=f"< /proc/{w}/stat") for extra in ({}, LOCAL)]
    assert [r.res.returncode for r in runs] == [0, 0], [r.res.explain() for r in runs]
    layout = [_stat_fields(r.res.stdout, b"qmail-queued-w")[23:26] for r in runs]
    assert layout[1] == [b"1", b"1", b"0"]  # the caller's own process is not allowed to see them
    assert layout[0] == layout[1], layout
    assert runs[0].path() == "local"  # the worker refused: the caller reads it itself


def test_callers_own_connection_as_input_does_not_hold_a_worker_for_ever(qhome: QHome) -> None:
    """A client that passes its own end of the connection (or any Unix socket or anonymous inode, which can
    hold it: a socket with it in flight, an io_uring with it registered) as descriptor 0: the worker then
    holds the caller's end, never sees it hang up, and waited for ever after the caller had gone, with
    nothing of the caller's left. With -m 1 no one else was served again. Now refused: the caller runs it."""
    qhome.server.stop()  # type: ignore[attr-defined]
    server = LimitedServer(qhome, "-m", "1")
    qhome.server = server  # type: ignore[attr-defined]
    null = os.open("/dev/null", os.O_RDWR)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(str(server.sock))
        data = _payload()
        socket.send_fds(s, [b"I" + len(data).to_bytes(4, "big") + data], [s.fileno(), null, null])
        try:
            answer = s.recv(1)
        except ConnectionResetError:
            answer = b""
        s.close()
    finally:
        os.close(null)
    _wait(lambda: go(qhome, MSG, ("-n",)).path() == "served", 10, "a worker free again")
    assert answer != b"+"


def _odd_fd(kind: str, where: str) -> int:
    if kind == "eventfd":
        return os.eventfd(0)
    if kind == "O_PATH of a socket":
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = os.path.join(where, "odd.sock")
        lsock.bind(path)
        fd = os.open(path, os.O_PATH)
        lsock.close()
        return fd
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["eventfd", "O_PATH of a socket"])
def test_odd_descriptors_refused_and_the_worker_serves_on(qhome: QHome, kind: str, tmp_path: Path) -> None:
    """An anonymous inode, and an O_PATH descriptor of a socket file (not a socket: looking at its family
    fails), are refused unacknowledged, and the same worker serves the next request (no descriptor left)."""
    server: Server = qhome.server  # type: ignore[attr-defined]
    served_works(qhome)
    before = workers(server)
    odd = _odd_fd(kind, str(tmp_path))
    null = os.open("/dev/null", os.O_RDWR)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(str(server.sock))
        data = _payload()
        socket.send_fds(s, [b"I" + len(data).to_bytes(4, "big") + data], [odd, null, null])
        try:
            answer = s.recv(1)
        except ConnectionResetError:
            answer = b""
        s.close()
    finally:
        os.close(null)
        os.close(odd)
    assert answer != b"+"
    served_works(qhome)
    assert workers(server) == before
