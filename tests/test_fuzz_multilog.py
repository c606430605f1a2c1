"""Fuzzing multilog(8) scripts: patterns, and whole scripts run over any input.

Properties: match equals a plain reading of multilog's patterns (a star
followed by c matches up to the first c; a final star matches anything) as a
regular expression; a script of selections, alerts, status files and log
directories run over any input ends, and each log directory holds exactly
the lines a plain reading selects for it (rotated files included, in order),
each status file the last selected line, padded; e writes the selected lines,
cut at 200 bytes.
"""

from __future__ import annotations

import os
import re
import tempfile

from hypothesis import given
from hypothesis import strategies as st

from fuzzkit import bounded, tracing  # noqa: F401  (tracing: an autouse fixture)
from pyqmail.svc import multilog

PATTERN = st.lists(st.sampled_from([b"*", b"a", b"b", b" ", b"ab", b"\xff", b"."]), max_size=6).map(b"".join)
LINE_TEXT = st.lists(st.sampled_from([b"a", b"b", b" ", b"*", b"ab", b"\xff", b".", b"x" * 40]), max_size=10
                     ).map(b"".join)


def _regex(pattern: bytes) -> re.Pattern[bytes]:
    out = []
    for i, ch in enumerate(pattern):
        c = bytes((ch,))
        if c != b"*":
            out.append(re.escape(c))
        elif i + 1 == len(pattern):
            out.append(b".*")
        else:
            nxt = re.escape(pattern[i + 1:i + 2])
            out.append(b"(?:(?!" + nxt + b").)*(?=" + nxt + b")")
    return re.compile(b"".join(out), re.DOTALL)


@given(st.integers(0, 6000))
@bounded
def test_settings_of_any_length(digits: int) -> None:
    # Found by this fuzzer: s or n with more than 4300 digits raised ValueError.
    assert multilog.scan_ulong(b"7" * digits + b"x") == 7 * (pow(10, digits, 9 << 64) - 1) // 9 % (1 << 64)


@given(PATTERN, LINE_TEXT)
@bounded
def test_match_equals_the_plain_reading(pattern: bytes, line: bytes) -> None:
    assert multilog.match(pattern, line) == bool(_regex(pattern).fullmatch(line))


ACTION = st.one_of(
    st.tuples(st.sampled_from([b"+", b"-"]), PATTERN).map(b"".join),
    st.sampled_from([b"e", b"=status0", b"=status1", b"./log0", b"./log1", b"s4096", b"s1", b"n2", b"n99",
                     b"s" + b"9" * 5000, b"n" + b"7" * 5000]),
)
INPUT = st.one_of(st.binary(max_size=3000),
                  st.lists(st.tuples(LINE_TEXT, st.sampled_from([b"\n", b"\n", b""])).map(b"".join),
                           max_size=40).map(b"".join),
                  st.integers(900, 9000).map(lambda n: b"ab" * n + b"\nb\n"),
                  st.integers(100, 500).map(lambda n: b"".join(b"a line %d\n" % i for i in range(n))))


class Counter:
    """A clock that moves 1 microsecond per reading: every rotated file gets its own name."""

    def __init__(self) -> None:
        self.t = 1_700_000_000 * 10**9

    def __call__(self) -> int:
        self.t += 1000
        return self.t


def _plain(script: list[bytes], data: bytes) -> tuple[dict[bytes, bytes], dict[bytes, bytes | None], bytes]:
    """What each log directory, status file and stderr hold after the script ran over data."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    logs: dict[bytes, bytes] = {a: b"" for a in script if a[:1] == b"."}
    status: dict[bytes, bytes | None] = {a[1:]: None for a in script if a[:1] == b"="}
    err = b""
    for line in lines:
        seen = line[:multilog.LINE_MAX]
        selected = True
        for action in script:
            kind = action[:1]
            if kind == b"+" and multilog.match(action[1:], seen):
                selected = True
            elif kind == b"-" and multilog.match(action[1:], seen):
                selected = False
            elif kind == b"e" and selected:
                err += seen[:200] + b"...\n" if len(seen) > 200 else seen + b"\n"
            elif kind == b"=" and selected:
                status[action[1:]] = seen
            elif kind == b"." and selected:
                logs[action] += line + b"\n"
    return logs, status, err


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@given(st.lists(ACTION, max_size=10), INPUT)
@bounded
def test_script_runs_as_the_plain_reading(script: list[bytes], data: bytes) -> None:
    # A directory named twice would be locked twice: multilog's own fatal error.
    dirs = [a for a in script if a[:1] == b"."]
    if len(set(dirs)) != len(dirs):
        return
    old_cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)
        fd_in = os.open("input", os.O_RDWR | os.O_CREAT)
        fd_err = os.open("stderr", os.O_RDWR | os.O_CREAT)
        saved = multilog.FD_IN, multilog.FD_ERR
        multilog.FD_IN, multilog.FD_ERR = fd_in, fd_err
        try:
            os.write(fd_in, data)
            os.lseek(fd_in, 0, os.SEEK_SET)
            ml = multilog.Multilog(script, Counter())
            ml.start()
            ml.run()
            ml.quit()
            for log in ml.logs:
                for fd in (log.fdcurrent, log.fdlock, log.fddir):
                    os.close(fd)
            for fd in ml.status.values():
                os.close(fd)
            logs, status, err = _plain(script, data)
            for name, want in logs.items():
                # n2 keeps one old file: the directory holds the end of the lines.
                nums = [multilog.scan_ulong(a[1:]) for a in script[:script.index(name)] if a[:1] == b"n"]
                kept_all = not nums or nums[-1] > 2
                path = os.fsdecode(name)
                olds = sorted(n for n in os.listdir(path) if n.startswith("@"))
                got = b"".join(_read(os.path.join(path, n)) for n in olds + ["current"])
                assert got == want if kept_all else want.endswith(got), name
            for name, line in status.items():
                text = _read(os.fsdecode(name))
                assert text == (b"" if line is None else line + b"\n" * (multilog.STATUS_LEN - len(line)))
            os.lseek(fd_err, 0, os.SEEK_SET)
            assert os.read(fd_err, 1 << 20) == err
        finally:
            multilog.FD_IN, multilog.FD_ERR = saved
            os.close(fd_in)
            os.close(fd_err)
            os.chdir(old_cwd)
