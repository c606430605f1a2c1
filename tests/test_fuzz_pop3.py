"""Fuzzing POP3: command lines, the bounded line reader, qmail-pop3d's session and the message blaster.

Properties: split_command and LineReader raise nothing but Closed at the end
of input, keep at most MAX_LINE bytes of a line and read the lines a plain
split reads; a session driven by any commands answers each with one +OK or
-ERR reply (or a +OK listing ending in '.'), and its deletion marks follow a
plain model; the blaster sends what a plain dot-stuffing of the message
sends, whatever the chunking, and TOP n sends the header and n body lines.
"""

from __future__ import annotations

import os
import tempfile

from hypothesis import given
from hypothesis import strategies as st

from fuzzkit import bounded, tracing  # noqa: F401  (tracing: an autouse fixture)
from pyqmail.pop3 import protocol
from pyqmail.pop3.mailbox import Blaster, Message
from pyqmail.pop3.qmail_pop3d import Session

PIECE = st.sampled_from([b"\n", b"\r\n", b"\r", b"\0", b" ", b"USER", b"pass", b"x" * 200, b"\xff"])
INPUT = st.one_of(st.binary(max_size=1000), st.lists(PIECE, max_size=40).map(b"".join))


def _fd(data: bytes) -> int:
    fd, path = tempfile.mkstemp()
    os.unlink(path)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


@given(INPUT, st.sampled_from([1, 5, 100, protocol.MAX_LINE]))
@bounded
def test_line_reader_reads_the_plain_lines(data: bytes, limit: int) -> None:
    fd = _fd(data)
    got = []
    try:
        reader = protocol.LineReader(fd, timeout=5, limit=limit)
        while True:
            try:
                got.append(reader.readline())
            except protocol.Closed:
                break
    finally:
        os.close(fd)
    assert got == [line[:limit] for line in data.split(b"\n")[:-1]]
    for line in got:
        verb, arg = protocol.split_command(line)
        assert verb == verb.lower() and b"\0" not in verb + arg and not arg.startswith(b" ")


class Recording(Session):
    """A session whose replies are collected instead of written."""

    def __init__(self, messages: list[Message]) -> None:
        super().__init__(messages)
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)


VERB = st.sampled_from([b"stat", b"list", b"uidl", b"dele", b"retr", b"rset", b"last", b"top", b"noop", b"LIST",
                        b"Dele", b"apop", b"", b"xyzzy"])
ARG = st.one_of(st.sampled_from([b"", b"1", b"2", b"3", b"0", b"4", b"1 0", b"2 1", b"1 99999999999999999999999",
                                 b"18446744073709551617", b"-1", b"x", b" 1"]), st.binary(max_size=20))
MESSAGE_BODY = st.binary(max_size=300)


@given(st.lists(MESSAGE_BODY, max_size=3), st.lists(st.tuples(VERB, ARG), max_size=25))
@bounded
def test_session_any_commands(bodies: list[bytes], commands: list[tuple[bytes, bytes]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        messages = []
        for i, body in enumerate(bodies):
            fn = os.path.join(d, f"m{i}")
            with open(fn, "wb") as f:
                f.write(body)
            messages.append(Message(fn if i != 2 else fn + ".missing", len(body)))
        s = Recording(messages)
        handlers = {b"stat": s.stat, b"list": lambda a: s.listing(a, uidl=False),
                    b"uidl": lambda a: s.listing(a, uidl=True), b"dele": s.dele, b"retr": s.top,
                    b"rset": s.rset, b"last": s.last_, b"top": s.top, b"noop": s.noop}
        deleted = [False] * len(messages)
        for verb, arg in commands:
            v, a = protocol.split_command(verb + b" " + arg)
            s.sent.clear()
            handler = handlers.get(v)
            if handler is None:
                continue
            handler(a)
            reply = b"".join(s.sent)
            assert reply.startswith((b"+OK", b"-ERR")) and reply.endswith(b"\r\n"), (v, a, reply)
            n, used = protocol.scan_ulong(a)
            if v == b"dele" and used and 1 <= n <= len(messages) and not deleted[n - 1]:
                deleted[n - 1] = True
                assert reply == protocol.OK
            if v == b"rset":
                deleted = [False] * len(messages)
            if v in (b"list", b"uidl") and not a:
                assert reply.endswith(b"\r\n.\r\n")
                assert reply.count(b"\r\n") == 2 + deleted.count(False)
            assert [m.deleted for m in messages] == deleted


def _stuffed(lines: list[bytes]) -> bytes:
    return b"".join((b"." if ln[:1] == b"." else b"") + ln + b"\r\n" for ln in lines)


def _plain(data: bytes, top: int | None) -> bytes:
    """POP3's form of a message: CRLF lines, dot-stuffed, qmail's blank line, '.'; TOP keeps header and top lines."""
    lines = data.split(b"\n")
    last = lines.pop()  # unterminated (or empty)
    if last:
        lines.append(last)
    if top is not None:
        if b"" in lines:
            cut = lines.index(b"") + 1 + top
            lines = lines[:cut]
    return _stuffed(lines) + b"\r\n.\r\n"


BODY = st.one_of(st.binary(max_size=500),
                 st.lists(st.sampled_from([b"\n", b".", b"..", b"a", b"\r", b"\r\n", b"x" * 70]), max_size=40)
                 .map(b"".join))


@given(BODY, st.one_of(st.none(), st.integers(0, 10)), st.lists(st.integers(0, 600), max_size=8))
@bounded
def test_blaster_equals_a_plain_stuffing(data: bytes, top: int | None, cuts: list[int]) -> None:
    b = Blaster(0 if top is None else top + 1)
    out = []
    pos = 0
    for end in sorted({c % (len(data) + 1) for c in cuts} | {len(data)}):
        out.append(b.feed(data[pos:end]))
        pos = end
    out.append(b.end())
    assert b"".join(out) == _plain(data, top)
