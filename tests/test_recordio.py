"""recordio against ucspi-tcp 0.88's: the record lines of input and output packets, the
program's pid and exit code, usage and exec failures."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import Result, run
from pyqmail.ucspi.recordio import record_lines
from ucspikit import DEADLINE, Served, ours, real


def run_file(argv: list[str], stdin: Path) -> Result:
    with open(stdin, "rb") as f:
        p = subprocess.run(argv, stdin=f, capture_output=True, timeout=DEADLINE)
    return Result(argv, p.returncode, p.stdout, p.stderr)


def pids_named(err: bytes) -> bytes:
    return re.sub(rb"(?m)^\d+ ", b"PID ", err)


INPUTS = [
    b"line one\nline two\n" + b"x" * 300 + b"\nend\0nul" + b"y" * 250,
    b"",
    b"\n\n\n",
    bytes(range(256)) * 3,
    b"no newline at all",
]


@pytest.mark.parametrize("data", INPUTS, ids=range(len(INPUTS)))
def test_records_as_ucspi_tcp(tmp_path: Path, data: bytes) -> None:
    """Input from a file (read 256 bytes at a time), output in one write: deterministic packets."""
    stdin = tmp_path / "in"
    stdin.write_bytes(data)
    prog = ["sh", "-c", 'cat > /dev/null; printf "a\\nb\\n\\nc"; exit 3']
    a = run_file([real("recordio"), *prog], stdin)
    b = run_file([ours("recordio"), *prog], stdin)
    assert (b.returncode, b.stdout, pids_named(b.stderr)) == (a.returncode, a.stdout, pids_named(a.stderr))
    assert b.returncode == 3 and b.stdout == b"a\nb\n\nc"
    assert pids_named(b.stderr).endswith(b"PID < [EOF]\nPID > a \nPID > b \nPID >  \nPID > c+\nPID > [EOF]\n")


def test_pid_is_the_programs(tmp_path: Path) -> None:
    stdin = tmp_path / "in"
    stdin.write_bytes(b"")
    res = run_file([ours("recordio"), "sh", "-c", "echo $$"], stdin)
    pid = res.stdout.strip()
    assert res.stderr == pid + b" < [EOF]\n" + pid + b" > " + pid + b" \n" + pid + b" > [EOF]\n"


def test_copies_both_ways() -> None:
    """A program that answers each line: every line passes through and is recorded."""
    res = run([ours("recordio"), "sh", "-c", 'while read x; do echo "got $x"; done'],
              input=b"one\ntwo\nthree\n")
    assert res.returncode == 0 and res.stdout == b"got one\ngot two\ngot three\n"
    lines = pids_named(res.stderr).splitlines()
    assert b"PID < [EOF]" in lines and lines[-1] == b"PID > [EOF]"
    recorded_out = b"".join(x[6:] for x in lines if x.startswith(b"PID > ") and x != b"PID > [EOF]")
    assert recorded_out.replace(b" ", b"\n").replace(b"+", b"") == b"got\none\ngot\ntwo\ngot\nthree\n"


@pytest.mark.parametrize("argv", [[], ["/nonexistent/program"], ["no-such-program-name"]])
def test_usage_and_exec_failure(argv: list[str]) -> None:
    a = run([real("recordio"), *argv])
    b = run([ours("recordio"), *argv])
    assert (b.returncode, b.stdout) == (a.returncode, a.stdout)
    # The copiers' [EOF] lines race with the fatal message: compare them as sets, and
    # without the input side's "< [EOF]", which either program may or may not
    # get to print before the exec failure ends it.
    def lines(err: bytes) -> list[bytes]:
        return sorted(x for x in pids_named(err).splitlines() if x != b"PID < [EOF]")

    assert lines(b.stderr) == lines(a.stderr)


def test_under_tcpserver() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCP")}
    with Served([ours("tcpserver"), "-1", "-HR", "-l", "x", "127.0.0.1", "0", ours("recordio"), "sh", "-c",
                 "read x; echo 250 ok $x"], env=env) as srv:
        out, _ = srv.connect(b"HELO there\r\n")
        lines = srv.wait_for(r" > \[EOF\]")
    assert out == b"250 ok HELO there\r\n"
    named = [re.sub(r"^\d+ ", "PID ", x) for x in lines]
    assert "PID < HELO there\r " in named and "PID > 250 ok HELO there\r " in named


def test_record_lines_units() -> None:
    assert record_lines(b"7", b" < ", b"a\nb") == [b"7 < a \n", b"7 < b+\n"]
    assert record_lines(b"7", b" > ", b"\n") == [b"7 >  \n"]
    assert record_lines(b"7", b" > ", b"abc\n") == [b"7 > abc \n"]
