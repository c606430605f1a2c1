"""TAI64N labels, tai64n(8) and tai64nlocal(8), against daemontools' own programs where installed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CI, QHome, expect, make_home, run
from pyqmail.svc import tai64, tai64n, tai64nlocal

LABEL_RE = re.compile(rb"@[0-9a-f]{24} ")
UTC = {"TZ": "UTC", "PATH": "/usr/bin:/bin"}


def real(name: str) -> str:
    """Return daemontools' program, skipping (failing in CI) without it."""
    path = shutil.which(name)
    if path is None:
        if CI:
            pytest.fail(f"daemontools' {name} missing: .ci/run installs package daemontools")
        pytest.skip("daemontools not installed")
    return path


@pytest.fixture(scope="module")
def home() -> Iterator[QHome]:
    h = make_home()
    yield h
    shutil.rmtree(h.path.parent, ignore_errors=True)


# --- pure labels ---

def test_label_is_2_62_plus_10_plus_unix_seconds_then_nanoseconds() -> None:
    assert tai64.label(994720184 * 10**9 + 848605500) == b"@400000003b4a39c23294b13c"
    assert tai64.label(0) == b"@400000000000000a00000000"
    assert tai64.label(-11 * 10**9) == b"@3fffffffffffffff00000000"
    assert len(tai64.label(2**40 * 10**9 + 999_999_999)) == tai64.LABEL_LEN


def test_parse_round_trips_and_counts_digits() -> None:
    for ns in (0, 1, 994720184_848605500, 1_700_000_000_123_456_789, 4_000_000_000 * 10**9):
        unix, nano, used = tai64.parse(tai64.label(ns)[1:] + b" rest")
        assert (unix * 10**9 + nano, used) == (ns, 24)


def test_parse_is_a_shift_register_like_daemontools() -> None:
    # More than 24 digits: the last 24 count. Uppercase is not a hex digit for tai64nlocal.
    assert tai64.parse(b"ffff" + b"400000003b4a39c23294b13c")[:2] == (994720184, 848605500)
    assert tai64.parse(b"400000003b4a39c23294B13C")[2] == 20
    assert tai64.parse(b"")[2] == 0
    # Eight hex digits of nanoseconds may exceed 10^9; tai64nlocal prints them anyway.
    assert tai64.parse(b"400000003b4a39c2ffffffff")[1] == 0xFFFFFFFF


def test_local_refuses_what_localtime_cannot_place() -> None:
    assert tai64.local(-(2**62), 0) is None
    assert tai64.local(2**62, 0) is None


def test_stamp_uses_the_clock_once_per_line_begun() -> None:
    ticks = iter([10**9, 2 * 10**9, 3 * 10**9])
    out, fresh = tai64n.stamp(b"a\nb\nc", True, lambda: next(ticks))
    assert out == (b"@400000000000000b00000000 a\n@400000000000000c00000000 b\n"
                   b"@400000000000000d00000000 c")
    assert fresh is False
    out, fresh = tai64n.stamp(b"rest\n", False, lambda: 0)
    assert (out, fresh) == (b"rest\n", True)


def test_convert_leaves_other_lines_alone() -> None:
    assert tai64nlocal.convert(b"plain @400000003b4a39c23294b13c") == b"plain @400000003b4a39c23294b13c"
    assert tai64nlocal.convert(b"") == b""
    assert tai64nlocal.finish_partial(b"@400000003b4a39c23294b13c") == b""
    assert tai64nlocal.finish_partial(b"no label") == b"no label"


# --- processes ---

def test_tai64n_process_format(home: QHome) -> None:
    before = time.time_ns()
    res = expect(run([home.bin("tai64n")], input=b"one\n\ntwo\nthree"))
    after = time.time_ns()
    lines = res.stdout.split(b"\n")
    assert [ln[26:] for ln in lines] == [b"one", b"", b"two", b"three"]
    for ln in lines:
        assert LABEL_RE.match(ln), res.explain()
        unix, nano, _ = tai64.parse(ln[1:25])
        assert before - 10**9 <= unix * 10**9 + nano <= after
    assert expect(run([home.bin("tai64n")])).stdout == b""


def test_tai64n_and_tai64nlocal_exit_111_when_stdout_fails(home: QHome) -> None:
    for name in ("tai64n", "tai64nlocal"):
        r, w = os.pipe()
        os.close(r)
        try:
            p = subprocess.run([home.bin(name)], input=b"x\n", stdout=w, stderr=subprocess.PIPE, timeout=60)
        finally:
            os.close(w)
        assert (p.returncode, p.stderr) == (111, b""), (name, p)


def test_tai64nlocal_process(home: QHome) -> None:
    data = (b"@400000003b4a39c23294b13c hi\nplain\n@400000003b4a39c23294b13cX\n"
            b"@3fffffffffffffff00000000 neg\nx@400000003b4a39c23294b13c\n\n"
            b"@400000003b4a39c2ffffffff big\n@" + b"z" * 5000 + b"\n@400000003b4a39c23294b13c")
    res = expect(run([home.bin("tai64nlocal")], input=data, env=UTC))
    assert res.stdout == (b"2001-07-09 23:09:44.848605500 hi\nplain\n2001-07-09 23:09:44.848605500X\n"
                          b"1969-12-31 23:59:49.000000000 neg\nx@400000003b4a39c23294b13c\n\n"
                          b"2001-07-09 23:09:44.4294967295 big\n@" + b"z" * 5000 + b"\n")


def test_tai64nlocal_hostile_input(home: QHome) -> None:
    # A label localtime cannot place stays as it is (daemontools crashes here);
    # a line far longer than any label passes through whole.
    long = b"@400000003b4a39c23294b13c " + b"y" * (3 << 20)
    data = b"@\n@zz\n@400000003b4a39c2 short\n\x00\xff\r\n" + long + b"\nend"
    res = expect(run([home.bin("tai64nlocal")], input=data, env=UTC))
    assert res.stdout == (b"@\n@zz\n@400000003b4a39c2 short\n\x00\xff\r\n"
                          b"2001-07-09 23:09:44.848605500 " + b"y" * (3 << 20) + b"\nend")


# --- against daemontools ---

SAMPLE = (b"@400000003b4a39c23294b13c hi\nplain\n@400000003b4a39c23294b13cX\n"
          b"@3fffffffffffffff00000000 neg\nx@400000003b4a39c23294b13c\n\n\x00\xff@4\n"
          b"@400000007fffffff00000000\n@40000000ffffffff00000000 y2106\n"
          b"@400000003b4a39c2ffffffff big\n@3fffff000000000000000000 year -32873\n@4000000065000000" + b"0" * 8 + b"z" * 3000 + b"\n"
          b"@400000003b4a39c23294b13c tail")


@pytest.mark.parametrize("tz", ["UTC", "America/New_York", "Asia/Kolkata", "right/UTC"])
def test_tai64nlocal_same_as_daemontools(home: QHome, tz: str) -> None:
    env = {"TZ": tz, "PATH": "/usr/bin:/bin"}
    theirs = expect(run([real("tai64nlocal")], input=SAMPLE, env=env))
    ours = expect(run([home.bin("tai64nlocal")], input=SAMPLE, env=env))
    assert ours.stdout == theirs.stdout


def test_each_reads_the_others_tai64n(home: QHome, tmp_path: Path) -> None:
    text = b"first line\nsecond\n\nlast"
    for stamper in (real("tai64n"), str(home.bin("tai64n"))):
        stamped = expect(run([stamper], input=text)).stdout
        assert all(LABEL_RE.match(ln) for ln in stamped.split(b"\n")), stamped
        theirs = expect(run([real("tai64nlocal")], input=stamped, env=UTC)).stdout
        ours = expect(run([home.bin("tai64nlocal")], input=stamped, env=UTC)).stdout
        assert ours == theirs
        assert re.fullmatch(rb"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{9} [^\n]*\n){3}"
                            rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{9} last", ours), ours
