"""multilog(8): selection, alerts, status files, rotated logs, processors; against daemontools' multilog."""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CI, QHome, Result, expect, make_home, run
from pyqmail.svc import tai64
from pyqmail.svc.multilog import match, scan_ulong

OLD_RE = re.compile(r"@[0-9a-f]{24}\.[su]")
from test_tai64 import home, real  # noqa: E402,F401 - the daemontools peer and the shared home

STAMP_RE = re.compile(rb"^@[0-9a-f]{24} ", re.M)


def multilog(prog: str | Path, script: list[str], data: bytes, cwd: Path) -> Result:
    """Run multilog with script in cwd, stdin a regular file holding data (reads are then repeatable)."""
    src = cwd / ".input"
    src.write_bytes(data)
    try:
        with open(src, "rb") as f:
            p = subprocess.run([os.fspath(prog), *script], stdin=f, capture_output=True, cwd=cwd, timeout=120)
    finally:
        src.unlink()
    return Result([os.fspath(prog), *script], p.returncode, p.stdout, p.stderr)


def old_files(d: Path) -> list[Path]:
    """The old log files of d, oldest first."""
    return sorted(p for p in d.iterdir() if OLD_RE.fullmatch(p.name))


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def lines(n: int, width: int) -> bytes:
    return b"".join(b"%04d" % i + b"a" * (width - 5) + b"\n" for i in range(n))


# --- pure parts ---

def test_match_as_the_man_page_describes() -> None:
    assert match(b"hello", b"hello")
    assert not match(b"hello", b"hello world")
    assert match(b"named[*]: Cleaned cache *", b"named[135]: Cleaned cache of 3121 RRs")
    assert match(b"*", b"")
    assert match(b"*", b"anything at all")
    assert not match(b"", b"x")
    assert match(b"", b"")
    # A star stops at the first occurrence of the next byte: no backtracking.
    assert not match(b"*a", b"banana")
    assert match(b"*a*", b"banana")
    assert match(b"* fatal: *", b"@400000003b4a39c23294b13c fatal: out of memory")
    assert not match(b"x*", b"")
    assert match(b"**", b"a*b")  # the second star is the byte after the first


def test_scan_ulong_reads_leading_digits() -> None:
    assert [scan_ulong(x) for x in (b"4096", b"12x", b"", b"x1", b"00")] == [4096, 12, 0, 0, 0]


# --- programs ---

def test_lines_go_to_current_and_end_with_mode_744(home: QHome, tmp_path: Path) -> None:
    res = expect(multilog(home.bin("multilog"), ["./main"], b"one\ntwo\nno newline", tmp_path))
    d = tmp_path / "main"
    assert (res.stdout, res.stderr) == (b"", b"")
    assert (d / "current").read_bytes() == b"one\ntwo\nno newline\n"
    assert mode(d / "current") == 0o744
    assert mode(d) == 0o700
    assert sorted(p.name for p in d.iterdir()) == ["current", "lock", "state"]
    # A second run appends to the finished current.
    expect(multilog(home.bin("multilog"), ["./main"], b"three\n", tmp_path))
    assert (d / "current").read_bytes() == b"one\ntwo\nno newline\nthree\n"
    assert old_files(d) == []


def test_rotation_by_size(home: QHome, tmp_path: Path) -> None:
    data = lines(60, 300)
    expect(multilog(home.bin("multilog"), ["s4096", "n100", "./d"], data, tmp_path))
    olds = old_files(tmp_path / "d")
    # 300-byte lines: the first newline within 2000 bytes of 4096 ends each file.
    assert [p.stat().st_size for p in olds] == [2100] * 8
    assert all(p.name.endswith(".s") and mode(p) == 0o744 for p in olds)
    assert b"".join(p.read_bytes() for p in olds) + (tmp_path / "d" / "current").read_bytes() == data


def test_a_long_line_is_cut_at_the_size(home: QHome, tmp_path: Path) -> None:
    data = b"z" * 9000 + b"\nend\n"
    expect(multilog(home.bin("multilog"), ["s1", "./d"], data, tmp_path))  # s below 4096 means 4096
    olds = old_files(tmp_path / "d")
    assert [p.stat().st_size for p in olds] == [4096, 4096]
    assert b"".join(p.read_bytes() for p in olds) + (tmp_path / "d" / "current").read_bytes() == data


def test_n_limits_the_old_files(home: QHome, tmp_path: Path) -> None:
    data = lines(60, 300)
    expect(multilog(home.bin("multilog"), ["s4096", "n3", "./d"], data, tmp_path))
    olds = old_files(tmp_path / "d")
    assert len(olds) == 2
    # The newest survive.
    assert b"".join(p.read_bytes() for p in olds) + (tmp_path / "d" / "current").read_bytes() == data[-5400:]


def test_selection_by_patterns(home: QHome, tmp_path: Path) -> None:
    data = b"info: a\nwarning: b\nfatal: c\nwarning: d\n"
    expect(multilog(home.bin("multilog"), ["-*", "+warning: *", "./w", "+fatal: *", "./wf", "-*", "./none"],
                    data, tmp_path))
    assert (tmp_path / "w" / "current").read_bytes() == b"warning: b\nwarning: d\n"
    assert (tmp_path / "wf" / "current").read_bytes() == b"warning: b\nfatal: c\nwarning: d\n"
    assert (tmp_path / "none" / "current").read_bytes() == b""


def test_t_stamps_each_line(home: QHome, tmp_path: Path) -> None:
    before = time.time_ns()
    expect(multilog(home.bin("multilog"), ["t", "-*", "+* fatal: *", "./main"],
                    b"fatal: out of memory\nok\nfatal: again", tmp_path))
    after = time.time_ns()
    text = (tmp_path / "main" / "current").read_bytes()
    got = text.split(b"\n")
    assert got[2] == b""
    assert [ln[26:] for ln in got[:2]] == [b"fatal: out of memory", b"fatal: again"]
    for ln in got[:2]:
        assert STAMP_RE.match(ln), text
        unix, nano, used = tai64.parse(ln[1:25])
        assert used == 24 and before - 10**9 <= unix * 10**9 + nano <= after


def test_processor_output_becomes_the_old_file_and_state_carries_over(home: QHome, tmp_path: Path) -> None:
    data = lines(20, 300)
    script = ["s4096", "!tr a-z A-Z; cat <&4 >&5; echo more >&5", "./d"]
    expect(multilog(home.bin("multilog"), script, data, tmp_path))
    d = tmp_path / "d"
    olds = old_files(d)
    assert [p.read_bytes() for p in olds] == [data[:2100].upper(), data[2100:4200].upper()]
    assert all(p.name.endswith(".s") and mode(p) == 0o744 for p in olds)
    assert (d / "state").read_bytes() == b"more\nmore\n"
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith("@")) == ["current", "lock", "state"]


def test_status_file_and_alerts(home: QHome, tmp_path: Path) -> None:
    long = b"y" * 1200
    res = expect(multilog(home.bin("multilog"), ["e", "-*", "+STAT*", "=status", "+x*", "e"],
                          b"hello\nSTAT one\n" + b"x" * 250 + b"\nSTAT two\n" + long + b"\n", tmp_path))
    x_alert = b"x" * 200 + b"...\n"
    assert res.stderr == (b"hello\nSTAT one\nSTAT one\n" + x_alert + x_alert
                          + b"STAT two\nSTAT two\n" + b"y" * 200 + b"...\n")
    status = (tmp_path / "status").read_bytes()
    assert status == b"STAT two" + b"\n" * 993
    assert mode(tmp_path / "status") == 0o600
    expect(multilog(home.bin("multilog"), ["=status"], long, tmp_path))
    assert (tmp_path / "status").read_bytes() == b"y" * 1000 + b"\n"


def test_lines_past_1000_bytes_reach_the_log_whole(home: QHome, tmp_path: Path) -> None:
    data = b"-" + b"q" * 5000 + b"\n\x00\xff\r\n"
    expect(multilog(home.bin("multilog"), ["-q*", "./d"], data, tmp_path))
    assert (tmp_path / "d" / "current").read_bytes() == data


def test_locked_directory_is_fatal(home: QHome, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    fd = os.open(tmp_path / "d" / "lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        res = multilog(home.bin("multilog"), ["./d"], b"x\n", tmp_path)
    finally:
        os.close(fd)
    assert (res.returncode, res.stderr) == (111, b"multilog: fatal: unable to lock directory ./d: temporary failure\n")
    res = multilog(home.bin("multilog"), ["./d", "./d"], b"x\n", tmp_path)
    assert (res.returncode, res.stderr) == (111, b"multilog: fatal: unable to lock directory ./d: temporary failure\n")


def test_setup_failures(home: QHome, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    res = multilog(home.bin("multilog"), ["./f"], b"x\n", tmp_path)
    assert (res.returncode, res.stderr) == (111, b"multilog: fatal: unable to open directory ./f: not a directory\n")
    res = multilog(home.bin("multilog"), ["=no/such"], b"x\n", tmp_path)
    assert (res.returncode, res.stderr) == (111, b"multilog: fatal: unable to create no/such: file does not exist\n")


def test_restart_recovers_unfinished_files(home: QHome, tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "current").write_bytes(b"cut short\n")
    (d / "current").chmod(0o644)
    (d / "previous").write_bytes(b"prev\n")
    (d / "processed").write_bytes(b"done\n")
    (d / "processed").chmod(0o744)
    (d / "newstate").write_bytes(b"ns\n")
    expect(multilog(home.bin("multilog"), ["./d"], b"new\n", tmp_path))
    olds = old_files(d)
    assert [(p.suffix, p.read_bytes()) for p in olds] == [(".s", b"done\n"), (".u", b"cut short\n")]
    assert (d / "current").read_bytes() == b"new\n"
    assert (d / "state").read_bytes() == b""
    assert not (d / "previous").exists() and not (d / "newstate").exists()


# --- against daemontools ---

def layout(top: Path) -> list[tuple[str, int, str]]:
    """Every file under top: name with timestamps blanked, mode, digest of content with stamps blanked."""
    out = []
    for p in sorted(top.rglob("*")):
        if p.is_file():
            name = re.sub(r"@[0-9a-f]{24}", "@T", str(p.relative_to(top)))
            body = STAMP_RE.sub(b"@T ", p.read_bytes())
            out.append((name, mode(p), hashlib.sha256(body).hexdigest()))
    return out


def _hostile() -> bytes:
    """Lines of every awkward length (around 1000, past the 4096 size) of stars, NULs, 8-bit bytes."""
    rnd = random.Random(5)
    alphabet = b"ab*\x00\xff xyz:[]\r"
    out = bytearray()
    for _ in range(400):
        n = rnd.choice([0, 1, 5, 50, 200, 999, 1000, 1001, 1500, 5000])
        out += bytes(rnd.choice(alphabet) for _ in range(n)) + b"\n"
    return bytes(out) + b"tail"


SCRIPTS = [
    # The book's qmail-smtpd log filter for recordio; its t is not first, so it stamps nothing.
    (["-* * > *", "-* * < *", "+* * > 5*", "+* * > 4*", "t", "./smtpd"],
     b"1234 > 250 ok\n1234 < MAIL FROM:<a@b>\n1234 > 550 sorry, no mailbox here by that name. (#5.1.1)\n"
     b"1234 > 451 later\ntcpserver: status: 1/40\n1234 [EOF]\n"),
    (["s4096", "n4", "./d", "-*a*", "+*b", "./e", "-*", "+a*:*", "e", "=st", "s20000", "n2", "./g"], _hostile()),
    (["t", "s4096", "n4", "./d", "-* *a*", "+* *b", "./e", "-*", "+* a*:*", "e", "=st", "x", "", "./f"], _hostile()),
    (["-a**", "./d", "+**b", "./e", "-*:", "+a*b*", "./f", "-", "+*z*", "./g", "s99999999", "n1", "."], _hostile()),
    (["s4096", "n100", "./d"], lines(200, 100)),
    (["s4096", "n100", "./d"], lines(200, 37)),
    (["s4096", "n100", "./d"], b"".join(b"%04d" % i + b"a" * (i % 50) + b"\n" for i in range(300)) + b"z" * 9000 + b"\n"),
    (["t", "e", "=st", "s4096", "n3", "-* *a", "+* 00*", "./d", "-*", "+* *aaaa", "./e"], lines(300, 45)),
    (["e", "=st", "s5000", "n3", "-*a", "+00*", "./d", "-*", "+*aaaa", "./e", "-z*", "./f"],
     lines(300, 45) + b"y" * 3000),
    (["s4096", "n5", "!tr a-z A-Z; cat <&4 >&5; echo more >&5", "./d"], lines(200, 100)),
    (["./d", "./d"], b"x\n"),
    (["=no/such", "./d"], b"x\n"),
]


@pytest.mark.parametrize("case", range(len(SCRIPTS)))
def test_same_as_daemontools(home: QHome, tmp_path: Path, case: int) -> None:
    script, data = SCRIPTS[case]
    results = {}
    for who, prog in (("theirs", real("multilog")), ("ours", home.bin("multilog"))):
        top = tmp_path / who
        top.mkdir()
        res = multilog(prog, script, data, top)
        results[who] = (res.returncode, STAMP_RE.sub(b"@T ", res.stderr), layout(top))
    assert results["ours"] == results["theirs"]


@pytest.mark.parametrize("prep", [
    "echo old > d/current; chmod 744 d/current",
    "echo old > d/current; chmod 644 d/current; echo st > d/state",
    "echo prev > d/previous; echo pr > d/processed",
    "touch d/@400000000000000000000000.s d/@400000000000000000000001.u d/@4000000000000000000000011.s d/@40000 d/x",
])
def test_restart_same_as_daemontools(home: QHome, tmp_path: Path, prep: str) -> None:
    results = {}
    for who, prog in (("theirs", real("multilog")), ("ours", home.bin("multilog"))):
        top = tmp_path / who
        (top / "d").mkdir(parents=True)
        expect(run(["sh", "-c", prep], cwd=top))
        res = multilog(prog, ["n3", "./d"], b"x\ny", top)
        results[who] = (res.returncode, res.stderr, layout(top))
    assert results["ours"] == results["theirs"]


def test_real_tai64nlocal_reads_our_stamps(home: QHome, tmp_path: Path) -> None:
    expect(multilog(home.bin("multilog"), ["t", "./d"], b"a\nb\n", tmp_path))
    stamped = (tmp_path / "d" / "current").read_bytes()
    env = {"TZ": "UTC", "PATH": "/usr/bin:/bin"}
    theirs = expect(run([real("tai64nlocal")], input=stamped, env=env)).stdout
    ours = expect(run([home.bin("tai64nlocal")], input=stamped, env=env)).stdout
    assert ours == theirs
    assert re.fullmatch(rb"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{9} [ab]\n){2}", ours), ours


def _wait_for(path: Path, content: bytes) -> None:
    """Wait (up to 30 s) until path holds content: multilog flushes before each read."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if path.read_bytes() == content:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    raise AssertionError(f"{path} never held {content!r}")


def _wait_blocked(pid: int) -> None:
    """Wait (up to 30 s) until pid sleeps waiting for input, so a signal finds it there."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        wchan = Path(f"/proc/{pid}/wchan").read_text()
        if any(w in wchan for w in ("pipe_read", "poll", "select")):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never waited for input")


def _wait_handled(pid: int, sig: int) -> None:
    """Wait (up to 30 s) until pid has taken sig and waits for input again."""
    bit = 1 << (sig - 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        if not (int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)) & bit:
            _wait_blocked(pid)
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never took signal {sig}")


@pytest.mark.parametrize("who", ["theirs", "ours"])
def test_alrm_rotates_a_nonempty_current(home: QHome, tmp_path: Path, who: str) -> None:
    prog = real("multilog") if who == "theirs" else os.fspath(home.bin("multilog"))
    p = subprocess.Popen([prog, "./d"], stdin=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    assert p.stdin is not None and p.stderr is not None
    try:
        p.stdin.write(b"a\n")
        p.stdin.flush()
        _wait_for(tmp_path / "d" / "current", b"a\n")
        _wait_blocked(p.pid)
        p.send_signal(signal.SIGALRM)
        deadline = time.monotonic() + 30
        while not old_files(tmp_path / "d") and time.monotonic() < deadline:
            time.sleep(0.01)
        p.stdin.write(b"b\n")
    finally:
        p.stdin.close()
        err = p.stderr.read()
        p.stderr.close()
        rc = p.wait(timeout=60)
    assert (rc, err) == (0, b"")
    assert [f.read_bytes() for f in old_files(tmp_path / "d")] == [b"a\n"]
    assert (tmp_path / "d" / "current").read_bytes() == b"b\n"


@pytest.mark.parametrize("who", ["theirs", "ours"])
def test_term_finishes_the_line_and_leaves_the_rest(home: QHome, tmp_path: Path, who: str) -> None:
    prog = real("multilog") if who == "theirs" else os.fspath(home.bin("multilog"))
    r, w = os.pipe()
    try:
        p = subprocess.Popen([prog, "./d"], stdin=r, stderr=subprocess.PIPE, cwd=tmp_path)
        assert p.stderr is not None
        os.write(w, b"a\nb")  # one atomic write: multilog reads all three bytes at once
        _wait_for(tmp_path / "d" / "current", b"a\n")
        _wait_blocked(p.pid)
        p.send_signal(signal.SIGTERM)
        _wait_handled(p.pid, signal.SIGTERM)
        os.write(w, b"c\nd\n")
        err = p.stderr.read()
        p.stderr.close()
        rc = p.wait(timeout=60)
        assert (rc, err) == (0, b"")
        assert (tmp_path / "d" / "current").read_bytes() == b"a\nbc\n"
        assert mode(tmp_path / "d" / "current") == 0o744
        os.close(w)
        w = -1
        assert os.read(r, 100) == b"d\n"
    finally:
        os.close(r)
        if w != -1:
            os.close(w)


def test_failing_processor_is_run_again_like_daemontools(home: QHome, tmp_path: Path) -> None:
    # Both programs pause 5 seconds after the failure; they run side by side.
    script = ["s4096", "!if test -e ../flag; then tr a-z A-Z; else touch ../flag; exit 1; fi", "./d"]
    data = lines(20, 300)
    procs = {}
    for who, prog in (("theirs", real("multilog")), ("ours", os.fspath(home.bin("multilog")))):
        top = tmp_path / who
        top.mkdir()
        (top / ".input").write_bytes(data)
        with open(top / ".input", "rb") as f:
            procs[who] = subprocess.Popen([prog, *script], stdin=f, stderr=subprocess.PIPE, cwd=top)
    results = {}
    for who, p in procs.items():
        _, err = p.communicate(timeout=120)
        (tmp_path / who / ".input").unlink()
        results[who] = (p.returncode, err, layout(tmp_path / who))
    assert results["ours"] == results["theirs"]
    assert results["ours"][1] == b"multilog: warning: processor failed in ./d, pausing\n"
