"""Fuzzing the envelope readers: qmail-queue's (descriptor 1) and qmail-qmqpc's.

qmail-queue reads `F sender NUL (T recipient NUL)* NUL` through its bounded
reader; here the same steps as qmail-queue's _queue run over a file holding
the fuzzed envelope. Properties: the only outcomes are the envelope or
qmail-queue's exits 11 (address too long), 54 (read error: the envelope
ended early) and 91 (envelope format), as qmail-queue(8) lists them; a
well-formed envelope reads back exactly; nothing past an address's 1003
bytes is buffered. The program itself, run on some of these envelopes, exits
as the reader says and leaves the queue as it was unless it exits 0 (then the
todo file holds the envelope). qmail-qmqpc's reader turns the same envelope
into QMQP netstrings or exits 91/54 (its EXIT_FORMAT/EXIT_READ).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import QHome, make_home
from fuzzkit import bounded, tracing  # noqa: F401  (tracing: an autouse fixture)
from pyqmail.qmtp import qmail_qmqpc
from pyqmail.queue import qmail_queue
from pyqmail.queue.exits import QueueExit
from queuefmt import files, parse_todo

ADDR = st.one_of(st.binary(max_size=40).map(lambda b: b.replace(b"\0", b"")),
                 st.integers(990, 1010).map(lambda n: b"x" * n))
PIECE = st.sampled_from([b"F", b"T", b"\0", b"a@b", b"x" * 1000, b"Tz@y\0", b"\0\0", b"u"])
RAW = st.one_of(st.binary(max_size=3000), st.lists(PIECE, max_size=20).map(b"".join))


def _fd(data: bytes) -> int:
    """Return a descriptor reading data from its start (a deleted temporary file)."""
    fd, path = tempfile.mkstemp()
    os.unlink(path)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _queue_reads(data: bytes) -> tuple[bytes, list[bytes]] | int:
    """Read an envelope as qmail-queue's _queue does; return (sender, recipients) or the exit code."""
    fd = _fd(data)
    try:
        env = qmail_queue._Envelope(fd)
        if env.byte() != ord("F"):
            return QueueExit.ENVELOPE_FORMAT
        sender = env.address()
        recips = []
        while True:
            kind = env.byte()
            if kind == 0:
                break
            if kind != ord("T"):
                return QueueExit.ENVELOPE_FORMAT
            recips.append(env.address())
            assert len(env._buf) - env._pos < qmail_queue.ADDR_MAX + 65536
        return sender, recips
    except qmail_queue.Die as e:
        return e.code
    finally:
        os.close(fd)


def _envelope(sender: bytes, recips: list[bytes]) -> bytes:
    return b"F" + sender + b"\0" + b"".join(b"T" + r + b"\0" for r in recips) + b"\0"


@given(ADDR, st.lists(ADDR, max_size=20), st.binary(max_size=10))
@bounded
def test_queue_reads_a_wellformed_envelope(sender: bytes, recips: list[bytes], after: bytes) -> None:
    got = _queue_reads(_envelope(sender, recips) + after)
    if any(len(a) + 1 > qmail_queue.ADDR_MAX for a in [sender, *recips]):
        assert got == QueueExit.ADDR_TOO_LONG
    else:
        assert got == (sender + b"\0", [r + b"\0" for r in recips])


@given(RAW)
@bounded
def test_queue_reads_any_envelope(data: bytes) -> None:
    got = _queue_reads(data)
    if isinstance(got, int):
        assert got in (QueueExit.ADDR_TOO_LONG, QueueExit.READ_ERROR, QueueExit.ENVELOPE_FORMAT)
    else:
        sender, recips = got
        for a in [sender, *recips]:
            assert a.endswith(b"\0") and a.count(b"\0") == 1 and len(a) <= qmail_queue.ADDR_MAX


@given(RAW)
@bounded
def test_qmqpc_reads_any_envelope(data: bytes) -> None:
    fd = _fd(data)
    try:
        out = qmail_qmqpc.read_envelope(fd)
    except qmail_qmqpc.Exit as e:
        assert e.code in (qmail_qmqpc.EXIT_FORMAT, qmail_qmqpc.EXIT_READ)
        return
    finally:
        os.close(fd)
    # Each field a netstring: the reading matches a plain split at NULs.
    fields = data.split(b"\0")
    n = fields.index(b"", 1)
    assert fields[0][:1] == b"F" and all(f[:1] == b"T" for f in fields[1:n])
    assert out == b"".join(b"%d:%s," % (len(f) - 1, f[1:]) for f in fields[:n])


@given(ADDR, st.lists(ADDR, max_size=20))
@bounded
def test_qmqpc_reads_a_wellformed_envelope(sender: bytes, recips: list[bytes]) -> None:
    fd = _fd(_envelope(sender, recips))
    try:
        out = qmail_qmqpc.read_envelope(fd)
    finally:
        os.close(fd)
    assert out == b"".join(b"%d:%s," % (len(a), a) for a in [sender, *recips])


# --- the program itself: a few envelopes through QMAILHOME/bin/qmail-queue -------------------

PROCESS_EXAMPLES = 20 if os.environ.get("PYQMAIL_FUZZ", "ci") == "ci" else max(
    20, int(os.environ.get("PYQMAIL_FUZZ_EXAMPLES", "1000000")) // 100)


@pytest.fixture(scope="module")
def home() -> Iterator[QHome]:
    h = make_home()
    yield h
    shutil.rmtree(h.path.parent, ignore_errors=True)


@settings(max_examples=PROCESS_EXAMPLES)
@given(st.one_of(RAW, st.builds(_envelope, ADDR, st.lists(ADDR, max_size=5))))
def test_qmail_queue_program_any_envelope(home: QHome, data: bytes) -> None:
    before = files(home.queue)
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    try:
        p = subprocess.run([home.bin("qmail-queue")], input=b"Subject: x\n\nbody\n", stdout=r,
                           stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"}, timeout=30)
    finally:
        os.close(r)
    after = files(home.queue)
    assert after["pid"] == [] and after["intd"] == after["todo"]
    want = _queue_reads(data)
    if isinstance(want, int):
        assert p.returncode == want, p.stderr
        assert after == before
        return
    assert p.returncode == 0, p.stderr
    (new,) = set(after["todo"]) - set(before["todo"])
    env = parse_todo((home.queue / "todo" / new).read_bytes())
    assert (env.sender + b"\0", [r + b"\0" for r in env.recipients]) == want
