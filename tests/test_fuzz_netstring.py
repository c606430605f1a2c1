"""Fuzzing the netstring readers of qmail-qmtpd and qmail-qmqpd.

The client's bytes come from a file through the servers' own Conn; qmail-queue
is replaced by a recorder (the queueing interface is qmail-queue's, tested
elsewhere). Properties: the only way out of the readers is Exit with the
codes their man pages give (0 the client left, 100 protocol violation, 111
resources); a well-formed QMTP message is queued with exactly its body,
sender and recipients, and answered once per recipient; a well-formed QMQP
packet's fields read back exactly.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator

from hypothesis import given
from hypothesis import strategies as st

from fuzzkit import bounded, tracing  # noqa: F401  (tracing: an autouse fixture)
from pyqmail.qmtp import netio, qmail_qmqpd, qmail_qmtpd
from pyqmail.queue import qq
from pyqmail.smtpd.rcpthosts import RcptHosts
from pyqmail.smtpd.received import Peer

EXITS = (netio.EXIT_GONE, netio.EXIT_PROTOCOL, netio.EXIT_RESOURCES)


class Recorder:
    """Stands in for qmail-queue: keeps what a queueing program hands it."""

    last: Recorder | None = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.pid = 4242
        self.data = bytearray()
        self.failed = False
        self.sender: bytes | None = None
        self.recipients: list[bytes] = []
        Recorder.last = self

    def write(self, data: bytes) -> None:
        self.data += data

    def fail(self) -> None:
        self.failed = True

    def begin(self, sender: bytes) -> None:
        if self.sender is None:
            self.sender = sender

    def to(self, recipient: bytes) -> None:
        assert self.sender is not None
        self.recipients.append(recipient)

    def close(self, sender: bytes = b"", recipients: Iterable[bytes] = ()) -> bytes:
        self.begin(sender)
        for r in recipients:
            self.to(r)
        return b""


@contextlib.contextmanager
def recorded_queue() -> Iterator[None]:
    real = qq.QQ
    qq.QQ = Recorder  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        qq.QQ = real  # type: ignore[misc]


@contextlib.contextmanager
def client(data: bytes) -> Iterator[netio.Conn]:
    """A Conn reading data from a file and writing to a file."""
    fd_in, path = tempfile.mkstemp()
    os.unlink(path)
    os.write(fd_in, data)
    os.lseek(fd_in, 0, os.SEEK_SET)
    fd_out = os.open(os.devnull, os.O_WRONLY)
    try:
        yield netio.Conn(fd_in, fd_out, 30)
    finally:
        os.close(fd_in)
        os.close(fd_out)


def _settings(relay: bytes | None, databytes: int) -> qmail_qmtpd.Settings:
    cfg = qmail_qmtpd.Settings.__new__(qmail_qmtpd.Settings)
    cfg.rcpthosts = RcptHosts(None)
    cfg.relayclient = relay
    cfg.databytes = databytes
    cfg.peer = Peer(b"192.0.2.1", b"client.example", None, b"mx.example")
    return cfg


def ns(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


PIECE = st.sampled_from([b"0", b"1", b"9", b"10", b":", b",", b"\n", b"\r", b"\r\n", b"x", b"99999999999",
                         b"18446744073709551617", b"-", b" ", b"\0", b"\xb0", b"3:abc,", b"1:\n,"])
RAW = st.one_of(st.binary(max_size=400), st.lists(PIECE, max_size=40).map(b"".join))
ADDR = st.binary(max_size=30)


@given(RAW, st.sampled_from([None, b"", b"x"]), st.sampled_from([0, 5, 1000]))
@bounded
def test_qmtpd_any_input(data: bytes, relay: bytes | None, databytes: int) -> None:
    with recorded_queue(), client(data) as conn:
        try:
            while True:
                qmail_qmtpd.one_message(conn, _settings(relay, databytes))
        except netio.Exit as e:
            assert e.code in EXITS


@given(st.binary(max_size=300), st.booleans(), ADDR, st.lists(ADDR, max_size=8))
@bounded
def test_qmtpd_reads_a_wellformed_message(body: bytes, dos: bool, sender: bytes, recips: list[bytes]) -> None:
    mode = b"\r" if dos else b"\n"
    packet = ns(mode + body) + ns(sender) + ns(b"".join(ns(r) for r in recips))
    with recorded_queue(), client(packet) as conn:
        qmail_qmtpd.one_message(conn, _settings(b"", 0))
        q = Recorder.last
        assert q is not None
        assert q.data.endswith(body.replace(b"\r\n", b"\n") if dos else body)
        assert q.data.startswith(b"Received: ")
        assert q.sender == sender
        ok = [r for r in recips if b"\0" not in r]
        assert q.recipients == ok
        assert q.failed == (b"\0" in sender or not ok)
        replies = bytes(conn.out)
        assert replies.count(b",") >= len(recips)


@given(RAW)
@bounded
def test_qmqpd_fields_any_input(data: bytes) -> None:
    with client(data) as conn:
        src = qmail_qmqpd.Bounded(conn, len(data) + 5)
        try:
            while True:
                got = src.getbuf()
                assert got is None or (len(got) < qmail_qmqpd.ADDR_MAX and b"\0" not in got)
        except netio.Exit as e:
            assert e.code in EXITS


@given(st.lists(ADDR, max_size=10))
@bounded
def test_qmqpd_fields_read_back(fields: list[bytes]) -> None:
    data = b"".join(ns(f) for f in fields)
    with client(data + b"junk") as conn:
        src = qmail_qmqpd.Bounded(conn, len(data))
        got = []
        while src.left:
            got.append(src.getbuf())
        assert got == [None if b"\0" in f else f for f in fields]
