"""Fuzzing qmail-smtpd's pure core: command lines through the session, addrparse, the DATA filter.

Properties: no exception at all (the session raises ControlError only when a
control file cannot be read, which in-memory controls cannot cause); every
reply is CRLF-terminated SMTP lines; the session's state follows a plain
model of qmail-smtpd(8); addrparse returns any address written with every
byte escaped; the DATA filter returns the message an SMTP client encoded,
whatever the chunking, and its output does not depend on how input is cut.
"""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from fuzzkit import bounded, tracing  # noqa: F401  (tracing: an autouse fixture)
from pyqmail.control import DomainSet
from pyqmail.smtpd.data import END, LONG_LINE, MORE, STRAY_NEWLINE, Blast
from pyqmail.smtpd.rcpthosts import RcptHosts
from pyqmail.smtpd.received import Peer
from pyqmail.smtpd.bdat import parse as bdat_parse
from pyqmail.smtpd.session import (ADDR_MAX, BDAT, CONTINUE, DATA, DIE, QUIT, Config, Session, addrparse,
                                   split_command)

REPLY_LINE = re.compile(rb"[2-5]\d\d[ -][^\r\n]*\r\n")
VERBS = [b"MAIL FROM:", b"RCPT TO:", b"DATA", b"QUIT", b"HELO", b"EHLO", b"RSET", b"HELP", b"NOOP", b"VRFY",
         b"mail from:", b"rcpt to:", b"data", b"Rset", b"BDAT", b"STARTTLS", b"BDAT 3", b"bdat 0 last"]
ADDR_BYTES = st.sampled_from([b"a", b"@", b".", b"<", b">", b"\\", b'"', b" ", b":", b",", b"\0", b"\r",
                              b"[", b"]", b"example.com", b"example.net", b"bad", b"x" * 300, b"\xff", b"127.0.0.1"])
ADDR_TEXT = st.lists(ADDR_BYTES, max_size=12).map(b"".join)
COMMAND = st.one_of(
    st.binary(max_size=200),
    st.tuples(st.sampled_from(VERBS), st.sampled_from([b"", b" ", b"  "]), ADDR_TEXT).map(b"".join),
    st.tuples(st.sampled_from([b"MAIL FROM:<", b"RCPT TO:<"]), ADDR_TEXT, st.sampled_from([b">", b"", b"> x"]))
    .map(b"".join),
)


def _session(relay: bytes | None) -> Session:
    peer = Peer(b"192.0.2.1", b"client.example.net", None, b"mx.example.com")
    cfg = Config(b"mx.example.com", peer, liphost=b"mx.example.com",
                 rcpthosts=RcptHosts(DomainSet(["example.com", ".example.net"])),
                 badmailfrom=frozenset({b"bad@example.com", b"@evil.example"}), relayclient=relay,
                 is_local=lambda ip: ip == (127, 0, 0, 1), chunking=True)
    return Session(cfg)


@given(st.lists(COMMAND, max_size=30), st.sampled_from([None, b"", b"+relay"]))
@bounded
def test_session_follows_the_model(lines: list[bytes], relay: bytes | None) -> None:
    s = _session(relay)
    assert REPLY_LINE.fullmatch(s.greeting())
    seenmail = False
    barf = False
    bdat = False  # a BDAT transaction is open (the shell, not here, ends it at LAST)
    rcpts = 0
    for line in lines:
        replies, step = s.command(line)
        verb, arg = split_command(line)
        verb = verb.lower()
        assert step in (CONTINUE, QUIT, DATA, BDAT, DIE)
        if verb == b"bdat":
            chunk = bdat_parse(arg)
            assert (step == DIE) == (chunk is None)
            if chunk is not None:
                assert step == BDAT
                assert s.chunk == (chunk[0], chunk[1], seenmail and rcpts > 0)
                bdat = bdat or (seenmail and rcpts > 0)
        elif step in (DATA, BDAT, DIE):
            assert step == DATA
        if step == DATA or (step == BDAT and s.chunk[2]):
            assert replies == b""
        else:
            assert re.fullmatch(rb"(?:[2-5]\d\d[ -][^\r\n]*\r\n)+", replies), (line, replies)
        assert (step == QUIT) == (verb == b"quit")
        addr = addrparse(arg, b"mx.example.com", lambda ip: ip == (127, 0, 0, 1))
        if verb == b"mail":
            if addr is not None:
                seenmail, rcpts = True, 0
                barf = addr.lower() == b"bad@example.com" or addr[addr.rfind(b"@"):].lower() == b"@evil.example"
        elif verb == b"rcpt":
            if seenmail and addr is not None and not barf and replies.startswith(b"250"):
                rcpts += 1
            if seenmail and addr is not None and not barf and relay is not None:
                assert replies.startswith(b"250")
        elif verb == b"data":
            assert (step == DATA) == (seenmail and rcpts > 0 and not bdat)
            if step == DATA:
                seenmail = False
        elif verb in (b"helo", b"ehlo", b"rset"):
            seenmail = bdat = False
        if verb == b"mail" and addr is not None:
            bdat = False
        assert s.seenmail == seenmail
        assert s.bdat == bdat
        assert len(s.rcptto) == rcpts
        assert all(len(r) < ADDR_MAX + len(relay or b"") for r in s.rcptto)
        if step in (QUIT, DIE):
            break


@given(st.binary(max_size=1200), st.sampled_from([b"MAIL FROM:", b"RCPT TO: ", b"x "]),
       st.sampled_from([b"", b" SIZE=10", b"junk"]))
@bounded
def test_addrparse_reads_any_escaped_address(addr: bytes, verb: bytes, tail: bytes) -> None:
    escaped = b"".join(b"\\" + bytes((c,)) for c in addr)
    got = addrparse(verb + b"<" + escaped + b">" + tail)
    assert got == (addr if len(addr) < ADDR_MAX else None)


@given(st.binary(max_size=2000))
@bounded
def test_addrparse_any_argument(arg: bytes) -> None:
    got = addrparse(arg, b"mx.example.com", lambda ip: True)
    assert got is None or len(got) < ADDR_MAX


# --- the DATA filter ----------------------------------------------------------------------------

LINE_PART = st.sampled_from([b".", b"..", b"\r", b"a", b"Received: x", b"DELIVERED-to: y", b"rEcEiVeD",
                             b" ", b"\0", b"\xff", b"z" * 100])
LINE = st.lists(LINE_PART, max_size=8).map(b"".join)
LONG = st.tuples(st.sampled_from([b"", b".", b"Received"]), st.integers(LONG_LINE - 3, LONG_LINE + 300),
                 st.sampled_from([b"", b"\r", b"."])).map(lambda t: t[0] + b"x" * t[1] + t[2])
MESSAGE = st.lists(st.one_of(LINE, LINE, LINE, LINE, LONG), max_size=25)


def _encode(lines: list[bytes]) -> bytes:
    """The message as an SMTP client sends it: dot-stuffed CRLF lines, then '.'."""
    return b"".join((b"." if ln[:1] == b"." else b"") + ln + b"\r\n" for ln in lines) + b".\r\n"


def _feed(data: bytes, cuts: list[int]) -> tuple[Blast, int, int]:
    """Feed data cut at cuts; return the filter, its final status and the bytes it used."""
    b = Blast()
    used = 0
    pos = 0
    for end in sorted({c % (len(data) + 1) for c in cuts} | {len(data)}):
        piece = data[pos:end]
        pos = end
        if not piece:
            continue
        status, n = b.feed(piece)
        assert 0 <= n <= len(piece)
        used += n
        if status != MORE:
            return b, status, used
        assert n == len(piece)
    return b, MORE, used


def _hops(lines: list[bytes]) -> int:
    n = 0
    for ln in lines:
        if ln == b"":
            break
        if ln[:8].lower() == b"received" or ln[:9].lower() == b"delivered":
            n += 1
    return n


@given(MESSAGE, st.lists(st.integers(0, 1 << 20), max_size=12), st.binary(max_size=20))
@bounded
def test_data_returns_what_the_client_encoded(lines: list[bytes], cuts: list[int], after: bytes) -> None:
    wire = _encode(lines)
    b, status, used = _feed(wire + after, cuts)
    assert status == END
    assert used == len(wire)
    out = b.take()
    assert out == b"".join(ln + b"\n" for ln in lines)
    assert b.size == len(out)
    assert b.hops == _hops(lines)


@given(st.one_of(st.binary(max_size=3000), MESSAGE.map(b"\n".join), MESSAGE.map(_encode)),
       st.lists(st.integers(0, 1 << 20), max_size=12))
@bounded
def test_data_any_input_any_chunking(data: bytes, cuts: list[int]) -> None:
    whole, status1, used1 = _feed(data, [])
    cut, status2, used2 = _feed(data, cuts)
    assert status1 in (MORE, END, STRAY_NEWLINE)
    assert (status1, used1) == (status2, used2)
    if status1 == STRAY_NEWLINE:
        # The message is thrown away (qmail-smtpd dies): what went out of a long line before does not matter.
        assert data[used1 - 1:used1] == b"\n" and data[used1 - 2:used1 - 1] != b"\r"
    elif status1 == END:
        assert whole.take() == cut.take()
        assert (whole.hops, whole.size) == (cut.hops, cut.size)
    else:
        # Mid-message: each has sent a prefix of the same message; the rest of a line may be held.
        out1, out2 = whole.take(), cut.take()
        assert out1.startswith(out2) or out2.startswith(out1)
    # Nothing is held back but the current line, and never more than a long line of it.
    assert len(cut._part) <= LONG_LINE
