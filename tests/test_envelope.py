"""The qmail-queue interface's home (pyqmail.queue.envelope, qq, exits): the envelope reader and
writer, the spool, and the queueing client's raw exit code and descriptor-6 text."""

from __future__ import annotations

import os
import tempfile

import pytest

from pyqmail.queue import envelope, exits
from pyqmail.queue.envelope import Exit, Reader, Spool


def _fd(data: bytes) -> int:
    fd, path = tempfile.mkstemp()
    os.unlink(path)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read(data: bytes, **kw: int) -> tuple[bytes, list[bytes]] | int:
    fd = _fd(data)
    try:
        return envelope.read_envelope(fd, **kw)
    except Exit as e:
        return e.code
    finally:
        os.close(fd)


def test_reader_fields_and_writer_agree() -> None:
    raw = envelope.envelope_bytes(b"s@x", [b"a@y", b"", b"b@z"])
    assert raw == b"Fs@x\0Ta@y\0T\0Tb@z\0\0"
    fd = _fd(raw + b"ignored")
    try:
        assert list(Reader(fd).fields()) == [(b"F", b"s@x\0"), (b"T", b"a@y\0"), (b"T", b"\0"), (b"T", b"b@z\0")]
    finally:
        os.close(fd)
    assert _read(raw) == (b"s@x", [b"a@y", b"", b"b@z"])


@pytest.mark.parametrize("data,code", [
    (b"", 54), (b"Fs@x\0Ta@y\0", 54), (b"Ts@x\0\0", 91), (b"\0", 91), (b"Fs@x\0Xa\0\0", 91),
    (b"F" + b"x" * 1002 + b"\0\0", 0), (b"F" + b"x" * 1003 + b"\0\0", 11), (b"Fs\0T" + b"y" * 5000, 11),
])
def test_reader_exits_as_qmail_queue(data: bytes, code: int) -> None:
    got = _read(data)
    assert (got if isinstance(got, int) else 0) == code


def test_reader_early_end_and_bound_are_parameters() -> None:
    """qmail-qmqpc's reading: an early end is 91 (C's die_format), addresses up to its own bound."""
    assert _read(b"Fs@x\0Ta", early=91) == 91
    fd = _fd(b"F" + b"x" * 5000 + b"\0\0")
    try:
        assert [a for _, a in Reader(fd, addr_max=65536).fields()] == [b"x" * 5000 + b"\0"]
    finally:
        os.close(fd)


def test_spool_keeps_memory_bounded() -> None:
    s = Spool(keep=10)
    s.write(b"12345")
    assert s.fd == -1
    s.write(b"67890abc")
    assert s.fd != -1 and bytes(s.head) == b"12345" and s.size == 13
    assert b"".join(s.chunks()) == b"1234567890abc"
    fd = s.rewound()
    assert os.read(fd, 100) == b"1234567890abc" and s.size == 13
    s.close()


def test_spool_function_reads_to_the_end() -> None:
    r, w = os.pipe()
    os.write(w, b"body\n")
    os.close(w)
    fd = envelope.spool(r, b"Received: x\n")
    os.close(r)
    try:
        assert os.read(fd, 100) == b"Received: x\nbody\n"
    finally:
        os.close(fd)


def test_relay_passes_code_and_text_untouched() -> None:
    r, w = os.pipe()
    try:
        assert exits.relay(82, b"Dno thanks\0junk", w) == 82
        assert os.read(r, 100) == b"Dno thanks\0junk"
        assert exits.relay(31, b"", w) == 31
        assert exits.relay(-9, b"", w) == 81
        assert exits.relay(None, b"", w) == 81
    finally:
        os.close(r)
        os.close(w)


def test_reader_limit_ends_the_input_there() -> None:
    # qmail-queued's pickup reads a drop file's envelope only up to the size the file had
    # when it was opened: its owner growing it meanwhile cannot hold the scan.
    data = b"Fs@x\0Tr@y\0\0" + b"Tmore@z\0" * 1000
    fd = _fd(data)
    try:
        assert [a for _, a in Reader(fd, limit=12).fields()] == [b"s@x\0", b"r@y\0"]
    finally:
        os.close(fd)
    fd = _fd(b"Fs@x\0Tr@y\0" + b"Tmore@z\0" * 1000 + b"\0")
    try:
        with pytest.raises(Exit) as e:
            list(Reader(fd, limit=11).fields())
        assert e.value.code == exits.QueueExit.READ_ERROR
    finally:
        os.close(fd)
