"""Session 8's review of injection served by qmail-queued (brief r8): what a hostile local user could do.

Each test is a finding: something the caller's own qmail-inject could not do
or would do otherwise. Root-only, as tests/test_inject_served.py, whose
helpers it uses.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from conftest import IS_ROOT, QHome
from test_inject_served import LOCAL, MSG, LimitedServer, _payload, go, qhome, served_works, workers  # noqa: F401 (qhome: the fixture)
from test_qq_handoff import Server, _wait

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="a root-mode home: qmail-queued's workers as qmailq")


def _request(server: Server, fd0: int | None, null: int) -> bytes:
    """Send a served request straight to the socket with fd0 (None: the connection itself) and /dev/null
    as descriptors 0, 1, 2; return the first byte answered (b"" if none)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(30)
        s.connect(str(server.sock))
        data = _payload()
        socket.send_fds(s, [b"I" + len(data).to_bytes(4, "big") + data], [s.fileno() if fd0 is None else fd0, null, null])
        try:
            return s.recv(1)
        except ConnectionResetError:
            return b""
    finally:
        s.close()


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
        answer = _request(server, None, null)
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
        answer = _request(server, odd, null)
    finally:
        os.close(null)
        os.close(odd)
    assert answer != b"+"
    served_works(qhome)
    assert workers(server) == before
