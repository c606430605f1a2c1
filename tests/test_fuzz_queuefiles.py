"""Fuzzing qmail-send's and qmail-qread's readers of queue files, and the spawners' pipe readers.

Files: todo/N (qmail-send's preprocessing into info/N, local/N, remote/N),
info/N (getinfo), any NUL-record file (_records, as local/N and remote/N are
read), and a queue listed by qmail-qread. Properties: the readers raise only
OSError, the one error _records documents (a read error or a record past
RECORD_MAX), and qmail-send reports any other trouble as a log line and
None; records read back as a plain split at NULs; a well-formed todo/N is
preprocessed into the sender and the rewritten recipients; qmail-qread's
lines hold only printable bytes and one line per recipient record. The
spawners' command and report readers give the same records however the
pipe cuts the bytes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import given
from hypothesis import strategies as st

from fuzzkit import bounded, tracing  # noqa: F401  (tracing: an autouse fixture)
from pyqmail.outbuf import Output
from pyqmail.queue import qmail_qread
from pyqmail.send import qmail_send, schedule, spawnproto

PIECE = st.sampled_from([b"\0", b"u", b"p", b"F", b"T", b"D", b"a@b", b"x@local.example", b"u0\0", b"p77\0",
                         b"Fs@x\0", b"Tr@remote.example\0", b"T\0", b"7" * 5000, b"\0u" + b"9" * 5000,
                         b"%", b"@pct.example"])
RAW = st.one_of(st.binary(max_size=600), st.lists(PIECE, max_size=25).map(b"".join))
ADDR = st.lists(st.sampled_from([b"a", b"b", b"@", b"local.example", b"remote.example", b"virt.example", b"%",
                                 b"pct.example", b".", b"\xff", b"\n"]), max_size=6).map(b"".join)


def _fd(data: bytes) -> int:
    fd, path = tempfile.mkstemp()
    os.unlink(path)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


@given(st.one_of(RAW, st.integers(0, 3).map(lambda n: b"T" + b"x" * (qmail_send.RECORD_MAX + n - 2) + b"\0")))
@bounded
def test_records_are_a_plain_split(data: bytes) -> None:
    fd = _fd(data)
    try:
        got = list(qmail_send._records(fd))
    except OSError:
        assert max(len(r) for r in data.split(b"\0")) > qmail_send.RECORD_MAX - 65536
        return
    finally:
        os.close(fd)
    want = []
    pos = 0
    for rec in data.split(b"\0")[:-1]:
        want.append((pos, rec))
        pos += len(rec) + 1
    assert got == want


def _rewriter() -> schedule.Rewriter:
    return schedule.Rewriter(b"envnoathost.example", [b"local.example"], [b"pct.example"],
                             [b"virt.example:v", b"remote.example:"], [])


@contextmanager
def _queue() -> Iterator[tuple[qmail_send.Send, int]]:
    """A Send in a fresh queue (split 1) in this process; yield it and the log's descriptor."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)
        fds = []
        try:
            for sub in ("mess/0", "info/0", "local/0", "remote/0", "todo", "bounce"):
                os.makedirs(sub)
            log_fd = os.open("log", os.O_RDWR | os.O_CREAT | os.O_APPEND)
            null = os.open(os.devnull, os.O_RDWR)
            fds = [log_fd, null]
            controls = qmail_send.Controls(604800, [10, 20], b"MAILER-DAEMON", b"bounce.example",
                                           b"postmaster@x", _rewriter())
            send = qmail_send.Send(controls, 1, lambda: 1_700_000_000, sleep=lambda s: None,
                                   fds=(log_fd, (null, null), (null, null), null, null))
            try:
                yield send, log_fd
            finally:
                send.close()
        finally:
            for fd in fds:
                os.close(fd)
            os.chdir(old)


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@given(RAW)
@bounded
def test_preprocess_any_todo(data: bytes) -> None:
    with _queue() as (send, log_fd):
        _write("mess/0/100", b"message\n")
        _write("todo/100", data)
        p = send.prepare(100)
        if p is not None:
            p.close()
            info = _read("info/0/100")
            assert info == b"" or (info.startswith(b"F") and info.endswith(b"\0"))
        assert send.getinfo(100) is None or p is not None
        os.lseek(log_fd, 0, os.SEEK_SET)
        for line in os.read(log_fd, 1 << 20).split(b"\n")[:-1]:
            assert line.isascii() and all(32 <= c < 127 for c in line), line


@given(st.sampled_from([b"u", b"p"]), st.integers(20, 6000))
@bounded
def test_preprocess_huge_numbers(field: bytes, digits: int) -> None:
    # Found by this fuzzer: a 5000-digit u or p record made the info line raise ValueError.
    with _queue() as (send, log_fd):
        _write("mess/0/9", b"message\n")
        _write("todo/9", field + b"7" * digits + b"\0Fa@b\0Tc@local.example\0")
        p = send.prepare(9)
        assert p is not None
        p.close()
        os.lseek(log_fd, 0, os.SEEK_SET)
        wrapped = b"%d" % (7 * (pow(10, digits, 9 << 64) - 1) // 9 % (1 << 64))  # 77...7 modulo 2**64
        assert (b" qp " if field == b"p" else b" uid ") + wrapped in os.read(log_fd, 1 << 20)


@given(st.integers(0, 1 << 64), st.integers(0, 1 << 64), ADDR, st.lists(ADDR, max_size=8))
@bounded
def test_preprocess_a_wellformed_todo(uid: int, pid: int, sender: bytes, recips: list[bytes]) -> None:
    rw = _rewriter()
    with _queue() as (send, log_fd):
        _write("mess/0/7", b"message\n")
        _write("todo/7", b"u%d\0p%d\0F%s\0" % (uid, pid, sender) + b"".join(b"T" + r + b"\0" for r in recips))
        p = send.prepare(7)
        assert p is not None
        p.close()
        assert _read("info/0/7") == b"F" + sender + b"\0"
        assert send.getinfo(7) == (sender, int(os.stat("info/0/7").st_mtime))
        for channel, name in ((schedule.LOCAL, "local"), (schedule.REMOTE, "remote")):
            want = b"".join(b"T" + a + b"\0" for c, a in map(rw.rewrite, recips) if c == channel)
            path = f"{name}/0/7"
            assert (_read(path) if os.path.exists(path) else b"") == want
            assert (channel in p.channels) == bool(want)


@given(RAW, RAW, RAW, st.booleans())
@bounded
def test_qread_any_queue_files(info: bytes, local: bytes, remote: bytes, bouncing: bool) -> None:
    with _queue():
        _write("mess/0/5", b"x")
        _write("info/0/5", info)
        _write("local/0/5", local)
        _write("remote/0/5", remote)
        if bouncing:
            _write("bounce/5", b"")
        out_fd = os.open("out", os.O_RDWR | os.O_CREAT)
        try:
            out = Output(out_fd)
            qmail_qread.show(out, 5, 1, qmail_qread._Sender())
            out.flush()
            os.lseek(out_fd, 0, os.SEEK_SET)
            listing = os.read(out_fd, 1 << 22)
        finally:
            os.close(out_fd)
    lines = listing.split(b"\n")
    assert lines.pop() == b""
    assert all(32 <= c < 127 or c == 9 for line in lines for c in line)
    assert lines[0].endswith(b">  bouncing" if bouncing else b"> ")
    nul = info.find(b"\0")
    carry = info[nul + 1:(nul // 1024 + 1) * 1024] if nul != -1 else b""
    records = [r for r in (carry + local).split(b"\0")[:-1] + remote.split(b"\0")[:-1] if r[:1] in (b"T", b"D")]
    assert len(lines) == 1 + len(records)


@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=20), st.binary(max_size=20),
                          st.binary(max_size=20)), max_size=10), st.lists(st.integers(0, 2000), max_size=10))
@bounded
def test_spawner_commands_any_cuts(cmds: list[tuple[int, bytes, bytes, bytes]], cuts: list[int]) -> None:
    cmds = [(s, m.replace(b"\0", b""), f.replace(b"\0", b""), r.replace(b"\0", b"")) for s, m, f, r in cmds]
    data = b"".join(spawnproto.command(*c) for c in cmds)
    reader = spawnproto.CommandReader()
    got = []
    pos = 0
    for end in sorted({c % (len(data) + 1) for c in cuts} | {len(data)}):
        got += list(reader.feed(data[pos:end]))
        pos = end
    assert got == [(s, m, f, r, True) for s, m, f, r in cmds]


@given(st.binary(max_size=3000), st.lists(st.integers(0, 4000), max_size=10))
@bounded
def test_spawner_reports_any_cuts(data: bytes, cuts: list[int]) -> None:
    whole = list(spawnproto.ReportReader().feed(data))
    reader = spawnproto.ReportReader()
    got = []
    pos = 0
    for end in sorted({c % (len(data) + 1) for c in cuts} | {len(data)}):
        got += list(reader.feed(data[pos:end]))
        pos = end
    assert got == whole
    for slot, report in got:
        assert 0 <= slot <= 255 and len(report) < spawnproto.REPORTMAX
