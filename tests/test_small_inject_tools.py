"""predate, datemail and mailsubj: output, children, exit codes, as qmail 1.03's versions."""

from __future__ import annotations

import calendar
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from conftest import QHome, expect, run
from pyqmail.inject import predate, script
from pyqmail.inject.mailsubj import message_head

PATH = "/usr/bin:/bin"
DATE = re.compile(rb"^Date: ([1-9]|[12]\d|3[01]) (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) (\d{4}) "
                  rb"(\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)\n")


def recorder(path: Path, out: Path, code: int = 0) -> None:
    """Make path a program that records its argv and input in out, then exits code."""
    path.unlink(missing_ok=True)
    path.write_text("#!/bin/sh\n"
                    f"{{ printf '%s\\0' \"$0\" \"$@\"; printf -- '---\\0'; cat; }} > '{out}'\n"
                    f"exit {code}\n")
    path.chmod(0o755)


def recorded(out: Path) -> tuple[list[bytes], bytes]:
    """Return (argv, input) a recorder saw."""
    data = out.read_bytes()
    head, _, body = data.partition(b"---\0")
    return head.split(b"\0")[:-1], body


def check_date(line: bytes, before: float, after: float, offset_minutes: int, offset_seconds: int | None = None) -> None:
    """Assert line is predate's Date line for a time in [before, after] at the given zone offset.

    offset_seconds is the zone's exact offset where it is not whole minutes.
    """
    m = DATE.match(line)
    assert m, line
    day, mon, year, hh, mm, ss, sign, zh, zm = (g.decode() for g in m.groups())
    zone = (int(zh) * 60 + int(zm)) * (-1 if sign == "-" else 1)
    assert zone == offset_minutes, line
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
    local = calendar.timegm((int(year), months.index(mon) + 1, int(day), int(hh), int(mm), int(ss)))
    when = local - (zone * 60 if offset_seconds is None else offset_seconds)
    assert int(before) <= when <= int(after) + 1, (line, before, after)


# --- predate ---------------------------------------------------------------------

@pytest.mark.parametrize("tz,minutes,seconds", [
    ("UTC0", 0, 0), ("EST5", -300, -18000), ("IST-5:30", 330, 19800), ("XYZ+3:15", -195, -11700),
    ("ABC-0:00:45", 1, 45),  # 45 seconds east rounds to +0001
    ("ABC+0:00:29", 0, -29),  # 29 seconds west rounds to -0000
])
def test_predate_puts_local_date_with_numeric_zone_on_top(qhome: QHome, tz: str, minutes: int,
                                                          seconds: int) -> None:
    before = time.time()
    res = expect(run([qhome.bin("predate"), "cat"], input=b"Subject: hi\n\nbody\n", env={"PATH": PATH, "TZ": tz}))
    after = time.time()
    line, rest = res.stdout.split(b"\n", 1)
    check_date(line + b"\n", before, after, minutes, seconds)
    assert rest == b"Subject: hi\n\nbody\n"
    assert res.stderr == b""
    if tz == "ABC+0:00:29":
        assert line.endswith(b" -0000")


def test_predate_date_header_is_a_pure_function_of_time() -> None:
    saved = os.environ.get("TZ")
    try:
        os.environ["TZ"] = "UTC0"
        time.tzset()
        assert predate.date_header(0) == b"Date: 1 Jan 1970 00:00:00 +0000\n"
        assert predate.date_header(951782400) == b"Date: 29 Feb 2000 00:00:00 +0000\n"
        os.environ["TZ"] = "EST5"
        time.tzset()
        assert predate.date_header(0) == b"Date: 31 Dec 1969 19:00:00 -0500\n"
        os.environ["TZ"] = "NPT-5:45"
        time.tzset()
        assert predate.date_header(1800000000) == b"Date: 15 Jan 2027 13:45:00 +0545\n"
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()


def test_predate_usage(qhome: QHome) -> None:
    res = expect(run([qhome.bin("predate")], env={"PATH": PATH}), 100)
    assert res.stdout == b""
    assert res.stderr == b"predate: usage: predate child\n"


def test_predate_unable_to_exec(qhome: QHome) -> None:
    res = expect(run([qhome.bin("predate"), "/nonexistent/program"], input=b"x\n", env={"PATH": PATH}), 111)
    assert res.stderr == b"predate: fatal: unable to exec\n"
    res = expect(run([qhome.bin("predate"), "no-such-program-anywhere"], env={"PATH": PATH}), 111)
    assert res.stderr == b"predate: fatal: unable to exec\n"


def test_predate_child_crashed(qhome: QHome) -> None:
    res = expect(run([qhome.bin("predate"), "sh", "-c", "kill -9 $$"], env={"PATH": PATH}), 111)
    assert res.stderr == b"predate: fatal: child crashed\n"


@pytest.mark.parametrize("code", [0, 1, 42, 100, 111, 255])
def test_predate_exits_with_the_childs_code(qhome: QHome, code: int) -> None:
    res = run([qhome.bin("predate"), "sh", "-c", f"cat >/dev/null; exit {code}"], input=b"a\n" * 1000,
              env={"PATH": PATH})
    expect(res, code)
    assert res.stderr == b""


def test_predate_child_that_reads_nothing_does_not_hang_it(qhome: QHome) -> None:
    res = run([qhome.bin("predate"), "sh", "-c", "exit 3"], input=b"x" * (4 << 20), env={"PATH": PATH})
    expect(res, 3)


def test_predate_passes_args_and_big_input_intact(qhome: QHome, tmp_path: Path) -> None:
    out = tmp_path / "rec"
    prog = tmp_path / "prog"
    recorder(prog, out, 0)
    body = bytes(range(256)) * 8192 + b"no final newline"
    expect(run([qhome.bin("predate"), prog, "a b", "", "-x"], input=body, env={"PATH": PATH, "TZ": "UTC0"}))
    argv, data = recorded(out)
    assert argv == [os.fsencode(prog), b"a b", b"", b"-x"]
    line, rest = data.split(b"\n", 1)
    assert DATE.match(line + b"\n")
    assert rest == body


def test_predate_passes_open_descriptors_on_as_exec_does(qhome: QHome) -> None:
    r, w = os.pipe()
    try:
        res = run([qhome.bin("predate"), sys.executable, "-c", f"import os; os.write({w}, b'through')"],
                  env={"PATH": PATH}, pass_fds=[w])
        os.close(w)
        w = -1
        expect(res)
        assert os.read(r, 100) == b"through"
    finally:
        os.close(r)
        if w != -1:
            os.close(w)


# --- datemail --------------------------------------------------------------------

def test_datemail_runs_predate_and_sendmail(qhome: QHome, tmp_path: Path) -> None:
    out = tmp_path / "rec"
    recorder(qhome.bin("sendmail"), out, 7)
    before = time.time()
    res = run([qhome.bin("datemail"), "-t", "-f", "a b@example.com"], input=b"To: x@example.com\n\nhi\n",
              env={"PATH": PATH, "TZ": "EST5"})
    after = time.time()
    expect(res, 7)
    assert res.stdout == b"" and res.stderr == b""
    argv, data = recorded(out)
    assert argv == [os.fsencode(qhome.bin("sendmail")), b"-t", b"-f", b"a b@example.com"]
    line, rest = data.split(b"\n", 1)
    check_date(line + b"\n", before, after, -300)
    assert rest == b"To: x@example.com\n\nhi\n"


def test_datemail_without_args(qhome: QHome, tmp_path: Path) -> None:
    out = tmp_path / "rec"
    recorder(qhome.bin("sendmail"), out)
    expect(run([qhome.bin("datemail")], input=b"", env={"PATH": PATH, "TZ": "UTC0"}))
    argv, data = recorded(out)
    assert argv == [os.fsencode(qhome.bin("sendmail"))]
    assert DATE.match(data) and data.endswith(b" +0000\n")


def test_datemail_sendmail_crash_is_predates_fatal(qhome: QHome) -> None:
    sendmail = qhome.bin("sendmail")
    sendmail.unlink()
    sendmail.write_text("#!/bin/sh\nkill -TERM $$\n")
    sendmail.chmod(0o755)
    res = expect(run([qhome.bin("datemail")], env={"PATH": PATH}), 111)
    assert res.stderr == b"predate: fatal: child crashed\n"


def test_datemail_sendmail_missing(qhome: QHome) -> None:
    qhome.bin("sendmail").unlink()
    res = expect(run([qhome.bin("datemail")], env={"PATH": PATH}), 111)
    assert res.stderr == b"predate: fatal: unable to exec\n"


def test_datemail_predate_missing_or_not_executable(qhome: QHome) -> None:
    pred = qhome.bin("predate")
    pred.unlink()
    res = expect(run([qhome.bin("datemail"), "-t"], env={"PATH": PATH}), 127)
    assert res.stderr == os.fsencode(f"{qhome.bin('datemail')}: 3: exec: {pred}: not found\n")
    pred.write_text("#!/bin/sh\nexit 0\n")
    pred.chmod(0o644)
    res = expect(run([qhome.bin("datemail"), "-t"], env={"PATH": PATH}), 126)
    assert res.stderr == os.fsencode(f"{qhome.bin('datemail')}: 3: exec: {pred}: Permission denied\n")


def test_datemail_dies_by_predates_signal(qhome: QHome) -> None:
    pred = qhome.bin("predate")
    pred.unlink()
    pred.write_text("#!/bin/sh\nkill -USR1 $$\n")
    pred.chmod(0o755)
    res = run([qhome.bin("datemail")], env={"PATH": PATH})
    assert res.returncode == -10, res.explain()  # SIGUSR1, passed on as exec would


# --- mailsubj --------------------------------------------------------------------

def test_mailsubj_feeds_qmail_inject(qhome: QHome, tmp_path: Path) -> None:
    out = tmp_path / "rec"
    recorder(qhome.bin("qmail-inject"), out, 0)
    res = run([qhome.bin("mailsubj"), "Hello there", "a@example.com", "b@example.com"], input=b"line 1\nline 2\n",
              env={"PATH": PATH})
    expect(res)
    assert res.stdout == b"" and res.stderr == b""
    argv, data = recorded(out)
    assert argv == [os.fsencode(qhome.bin("qmail-inject"))]
    assert data == b"Subject: Hello there\nTo: a@example.com b@example.com\n\nline 1\nline 2\n"


def test_mailsubj_subject_only_and_empty_body(qhome: QHome, tmp_path: Path) -> None:
    out = tmp_path / "rec"
    recorder(qhome.bin("qmail-inject"), out, 0)
    expect(run([qhome.bin("mailsubj"), ""], input=b"", env={"PATH": PATH}))
    assert recorded(out)[1] == b"Subject: \nTo:\n\n"


@pytest.mark.parametrize("code", [0, 100, 111])
def test_mailsubj_exits_with_qmail_injects_code(qhome: QHome, tmp_path: Path, code: int) -> None:
    recorder(qhome.bin("qmail-inject"), tmp_path / "rec", code)
    expect(run([qhome.bin("mailsubj"), "s", "a@b"], input=b"x\n", env={"PATH": PATH}), code)


def test_mailsubj_echo_escapes_as_dash_does(qhome: QHome, tmp_path: Path) -> None:
    out = tmp_path / "rec"
    recorder(qhome.bin("qmail-inject"), out, 0)
    expect(run([qhome.bin("mailsubj"), r"a\tb\0101\08\1234\\\q\ ", r"x\cy", "z"], input=b"body\n",
               env={"PATH": PATH}))
    assert recorded(out)[1] == b"Subject: a\tbA\x008S4\\\\q\\ \nTo: x\nbody\n"


def test_mailsubj_without_subject(qhome: QHome) -> None:
    res = expect(run([qhome.bin("mailsubj")], env={"PATH": PATH}), 2)
    assert res.stderr == os.fsencode(f"{qhome.bin('mailsubj')}: 4: shift: can't shift that many\n")


def test_mailsubj_qmail_inject_missing_or_unrunnable(qhome: QHome) -> None:
    inject = qhome.bin("qmail-inject")
    inject.unlink()
    res = expect(run([qhome.bin("mailsubj"), "s", "a@b"], input=b"x\n", env={"PATH": PATH}), 127)
    assert res.stderr == os.fsencode(f"{qhome.bin('mailsubj')}: 9: {inject}: not found\n")
    inject.mkdir()
    res = expect(run([qhome.bin("mailsubj"), "s", "a@b"], input=b"x\n", env={"PATH": PATH}), 126)
    assert res.stderr == os.fsencode(f"{qhome.bin('mailsubj')}: 9: {inject}: Permission denied\n")


@pytest.mark.parametrize("signame,signum,said", [
    ("TERM", 15, b"Terminated\n"), ("HUP", 1, b"Hangup\n"), ("PIPE", 13, b""), ("INT", 2, b""),
])
def test_mailsubj_qmail_inject_killed(qhome: QHome, signame: str, signum: int, said: bytes) -> None:
    inject = qhome.bin("qmail-inject")
    inject.unlink()
    inject.write_text(f"#!/bin/sh\nkill -{signame} $$\n")
    inject.chmod(0o755)
    res = expect(run([qhome.bin("mailsubj"), "s", "a@b"], input=b"x\n", env={"PATH": PATH}), 128 + signum)
    assert res.stderr == said


def test_mailsubj_qmail_inject_reading_nothing(qhome: QHome) -> None:
    inject = qhome.bin("qmail-inject")
    inject.unlink()
    inject.write_text("#!/bin/sh\nexit 5\n")
    inject.chmod(0o755)
    expect(run([qhome.bin("mailsubj"), "s", "a@b"], input=b"y" * (4 << 20), env={"PATH": PATH}), 5)


# --- dash's echo, the shell's messages -------------------------------------------

@pytest.mark.parametrize("args,expected", [
    ([b"Subject:", b"hi"], b"Subject: hi\n"),
    ([b"To:"], b"To:\n"),
    ([b""], b"\n"),
    ([b"To:", b"", b""], b"To:  \n"),
    ([b"a\\nb"], b"a\nb\n"),
    ([b"a\\cb", b"c"], b"a"),
    ([b"a", b"\\c"], b"a "),
    ([b"\\a\\b\\e\\f\\r\\t\\v\\\\"], b"\a\b\x1b\f\r\t\v\\\n"),
    ([b"\\0101", b"\\101", b"\\0", b"\\08", b"\\1234", b"\\0777"], b"A A \0 \x008 S4 \xff\n"),
    ([b"\\x41\\8\\q\\"], b"\\x41\\8\\q\\\n"),
    ([b"-n", b"x"], b"-n x\n"),
])
def test_echo(args: list[bytes], expected: bytes) -> None:
    assert script.echo(args) == expected


def _dash() -> str | None:
    sh = shutil.which("dash")
    return sh


@pytest.mark.parametrize("subject,recips", [
    (b"plain", [b"a@b", b"c@d"]),
    (b"tab\\there", [b"x\\ny"]),
    (b"\\0101\\08\\1234\\\\\\q\\", [b"c\\cd", b"e"]),
    (b"stop\\c here", []),
    (b"\\e\\v\\f", [b"\\0"]),
])
def test_message_head_matches_dash(subject: bytes, recips: list[bytes]) -> None:
    dash = _dash()
    if dash is None:
        pytest.skip("dash not installed")
    res = expect(run([dash, "-c", 'echo Subject: "$1"; shift; echo To: ${1+"$@"}; echo ""', "sh",
                      os.fsdecode(subject), *map(os.fsdecode, recips)]))
    assert message_head(subject, recips) == res.stdout


def test_exec_failure_texts() -> None:
    import errno
    assert script.exec_failure(b"p", 3, "/x", OSError(errno.ENOENT, "x"), True) == (
        b"p: 3: exec: /x: not found\n", 127)
    assert script.exec_failure(b"p", 9, "/x", OSError(errno.EACCES, "x"), False) == (
        b"p: 9: /x: Permission denied\n", 126)
    assert script.exec_failure(b"p", 9, "/x", OSError(errno.ENOTDIR, "x"), False) == (b"p: 9: /x: not found\n", 2)
    assert script.exec_failure(b"p", 9, "/x", OSError(errno.ENOEXEC, "x"), False) == (
        b"p: 9: /x: Exec format error\n", 2)
