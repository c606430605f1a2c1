"""Maildir and mbox deliveries: the modules with injected clock/pid/host, and qmail-local's files byte for byte."""

from __future__ import annotations

import fcntl
import os
import random
import re
import resource
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import QHome
from pyqmail.local import maildir, mbox
from pyqmail.local.qmail_local import MAILDIR_CHDIR, MAILDIR_TEMPORARY, REWIND
from test_qmail_local import (  # noqa: F401 - home and user_home are fixtures
    PATH, Home, check_from_time, fails, from_line_re, home, local_args, ok, qlocal, user_home,
)


def reference_quote(body: bytes) -> bytes:
    """mbox(5) as qmail writes it, the slow obvious way: '>' before ^>*From, newline at the end."""
    out = re.sub(rb"(?m)^(>*From )", rb">\1", body)
    if out and not out.endswith(b"\n"):
        out += b"\n"
    return out


# ---------------------------------------------------------------------------
# The From_ quoting filter.

@pytest.mark.parametrize("body", [
    b"", b"\n", b"From x\n", b"From", b"From ", b">From x\n", b">>>From x\n", b" From x\n", b"FROM x\n",
    b"From\tx\n", b"Fro\nFrom \n", b">\n>From\n>From \n", b"x\nFrom y", b">" * 100 + b"From z",
    b"a\n\nFrom b\n\n>From c\n", b">>>", b">>>\n", b"Fromage\n",
])
def test_quoter_cases(body: bytes) -> None:
    q = mbox.FromQuoter()
    assert q.feed(body) + q.end() == reference_quote(body)


def test_quoter_any_chunking() -> None:
    rnd = random.Random(1)
    pieces = [b"From ", b">", b"\n", b"Fro", b"m", b" ", b"x", b"From", b">>From ", b"\r\n", b"\0"]
    for _ in range(3000):
        body = b"".join(rnd.choice(pieces) for _ in range(rnd.randrange(0, 40)))
        q = mbox.FromQuoter()
        out = bytearray()
        i = 0
        while i < len(body):
            n = rnd.randrange(1, 6)
            out += q.feed(body[i:i + n])
            i += n
        out += q.end()
        assert bytes(out) == reference_quote(body), body


def test_quoter_long_runs_stay_bounded() -> None:
    q = mbox.FromQuoter()
    out = q.feed(b">" * 1_000_000)
    assert len(out) == 1_000_000, "a run of '>' is passed on at once, not held"
    assert q.feed(b"From x") == b">From x"
    assert q.end() == b"\n"


# ---------------------------------------------------------------------------
# maildir.deliver with everything injected.

def make_maildir(base: Path, name: str = "Maildir") -> Path:
    d = base / name
    for sub in ("tmp", "new", "cur"):
        (d / sub).mkdir(parents=True)
    return d


def message_fd(tmp_path: Path, data: bytes, offset: int = 0) -> int:
    p = tmp_path / "message"
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    os.lseek(fd, offset, os.SEEK_SET)
    return fd


class Clock:
    def __init__(self, *times: float) -> None:
        self.times = list(times)
        self.slept: list[float] = []

    def now(self) -> float:
        return self.times.pop(0) if len(self.times) > 1 else self.times[0]

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def test_maildir_unique_name_from_clock_pid_host(tmp_path: Path) -> None:
    md = make_maildir(tmp_path)
    fd = message_fd(tmp_path, b"0123456789", offset=3)
    clock = Clock(1000.9)
    try:
        assert maildir.deliver(os.fsencode(md), fd, b"HEAD\n", pid=4242, host=b"host.example",
                               clock=clock.now, sleep=clock.sleep) == maildir.OK
    finally:
        os.close(fd)
    assert [p.name for p in (md / "new").iterdir()] == ["1000.4242.host.example"]
    assert (md / "new" / "1000.4242.host.example").read_bytes() == b"HEAD\n3456789"
    assert list((md / "tmp").iterdir()) == []
    assert clock.slept == []


def test_maildir_name_collision_sleeps_and_retries(tmp_path: Path) -> None:
    md = make_maildir(tmp_path)
    (md / "tmp" / "1000.7.h").write_bytes(b"someone else's")
    (md / "tmp" / "1002.7.h").mkdir()
    clock = Clock(1000, 1002, 1004)
    fd = message_fd(tmp_path, b"m")
    try:
        assert maildir.deliver(os.fsencode(md), fd, b"", pid=7, host=b"h", clock=clock.now,
                               sleep=clock.sleep) == maildir.OK
    finally:
        os.close(fd)
    assert clock.slept == [maildir.RETRY_SLEEP, maildir.RETRY_SLEEP]
    assert [p.name for p in (md / "new").iterdir()] == ["1004.7.h"]
    assert (md / "tmp" / "1000.7.h").read_bytes() == b"someone else's", "never touches another's file"


def test_maildir_gives_up_after_three_tries(tmp_path: Path) -> None:
    md = make_maildir(tmp_path)
    (md / "tmp" / "5.1.h").write_bytes(b"")
    clock = Clock(5)
    fd = message_fd(tmp_path, b"m")
    try:
        assert maildir.deliver(os.fsencode(md), fd, b"", pid=1, host=b"h", clock=clock.now,
                               sleep=clock.sleep) == maildir.TEMPORARY
    finally:
        os.close(fd)
    assert clock.slept == [2, 2]
    assert list((md / "new").iterdir()) == []


@pytest.mark.parametrize("broken, outcome", [
    ("no-tmp", maildir.TEMPORARY),
    ("no-new", maildir.TEMPORARY),
    ("no-maildir", maildir.NO_CHDIR),
    ("file", maildir.NO_CHDIR),
])
def test_maildir_broken(tmp_path: Path, broken: str, outcome: int) -> None:
    md = make_maildir(tmp_path)
    if broken == "no-tmp":
        (md / "tmp").rmdir()
    elif broken == "no-new":
        (md / "new").rmdir()
    elif broken == "no-maildir":
        shutil.rmtree(md)
    else:
        shutil.rmtree(md)
        md.write_bytes(b"")
    fd = message_fd(tmp_path, b"m")
    clock = Clock(9)
    try:
        assert maildir.deliver(os.fsencode(md), fd, b"", pid=1, host=b"h", clock=clock.now,
                               sleep=clock.sleep) == outcome
    finally:
        os.close(fd)
    if (md / "tmp").is_dir():
        assert list((md / "tmp").iterdir()) == [], "tmp/ is cleaned up"


def test_maildir_read_error(tmp_path: Path) -> None:
    md = make_maildir(tmp_path)
    fd = os.open(tmp_path / "wo", os.O_WRONLY | os.O_CREAT)  # reading it fails
    try:
        assert maildir.deliver(os.fsencode(md), fd, b"x", pid=1, host=b"h", clock=Clock(1).now,
                               sleep=Clock(1).sleep) == maildir.READ_ERROR
    finally:
        os.close(fd)
    assert list((md / "tmp").iterdir()) == [] and list((md / "new").iterdir()) == []


def test_maildir_timer(tmp_path: Path) -> None:
    md = make_maildir(tmp_path)
    r, w = os.pipe()  # a message that never ends
    try:
        assert maildir.deliver(os.fsencode(md), r, b"x", pid=1, host=b"h", clock=Clock(1).now,
                               sleep=Clock(1).sleep, timer=1) == maildir.TIMEOUT
    finally:
        os.close(r)
        os.close(w)
    assert list((md / "tmp").iterdir()) == [] and list((md / "new").iterdir()) == []


def test_hostname_is_bounded() -> None:
    h = maildir.hostname()
    assert 0 < len(h) <= maildir.HOST_MAX
    assert maildir.unique_name(12.99, 34, b"h") == b"12.34.h"


# ---------------------------------------------------------------------------
# mbox.deliver.

def test_mbox_lock_timeout(tmp_path: Path) -> None:
    box = tmp_path / "Mailbox"
    box.write_bytes(b"old\n")
    holder = os.open(box, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    fd = message_fd(tmp_path, b"m\n")
    try:
        assert mbox.deliver(os.fsencode(box), fd, b"H\n", lock_seconds=1) == (mbox.LOCK_TIMEOUT, None)
    finally:
        os.close(fd)
        os.close(holder)
    assert box.read_bytes() == b"old\n"


def test_mbox_read_error_truncates_back(tmp_path: Path) -> None:
    box = tmp_path / "Mailbox"
    box.write_bytes(b"old contents\n")
    fd = os.open(tmp_path / "wo", os.O_WRONLY | os.O_CREAT)
    try:
        outcome, err = mbox.deliver(os.fsencode(box), fd, b"From x\n" * 20000)
    finally:
        os.close(fd)
    assert outcome == mbox.READ_ERROR and err is not None
    assert box.read_bytes() == b"old contents\n"


def test_mbox_open_error(tmp_path: Path) -> None:
    fd = message_fd(tmp_path, b"m")
    try:
        outcome, err = mbox.deliver(os.fsencode(tmp_path / "no" / "box"), fd, b"")
    finally:
        os.close(fd)
    assert outcome == mbox.OPEN_ERROR and isinstance(err, FileNotFoundError)


# ---------------------------------------------------------------------------
# qmail-local's mbox and Maildir files, byte for byte.

BODY = (b"Subject: quoting\n\nFrom the start\n>From quoted\n>>From twice\n From not\nFrom\nFromage\n"
        b"FROM no\n\n>\nlast line without newline")


def test_mbox_delivery_bytes(qhome: QHome, home: Home) -> None:
    home.write("Mailbox", b"existing mail\n\n", 0o600)
    before = time.time()
    ok(qlocal(qhome, local_args(home, b"joe", sender=b"a b@x.example"), message=BODY), b"did 1+0+0\n")
    after = time.time()
    data = (home.path / "Mailbox").read_bytes()
    assert data.startswith(b"existing mail\n\n")
    data = data[len(b"existing mail\n\n"):]
    m = from_line_re(b"a-b@x.example").match(data)
    assert m, data
    check_from_time(m.group(1), before, after)
    assert data[m.end():] == (
        b'Return-Path: <"a b"@x.example>\n'
        b"Delivered-To: joe@test.example.com\n"
        b"Subject: quoting\n\n>From the start\n>>From quoted\n>>>From twice\n From not\nFrom\nFromage\n"
        b"FROM no\n\n>\nlast line without newline\n"
        b"\n")
    assert stat.S_IMODE((home.path / "Mailbox").stat().st_mode) == 0o600


def test_mbox_new_file_and_bounce_sender(qhome: QHome, home: Home) -> None:
    ok(qlocal(qhome, local_args(home, sender=b""), message=b""), b"did 1+0+0\n")
    data = (home.path / "Mailbox").read_bytes()
    m = from_line_re(b"MAILER-DAEMON").match(data)
    assert m, data
    assert data[m.end():] == b"Return-Path: <>\nDelivered-To: joe@test.example.com\n\n"
    assert stat.S_IMODE((home.path / "Mailbox").stat().st_mode) == 0o600


def test_two_deliveries_append(qhome: QHome, home: Home) -> None:
    home.write(".qmail", b"./Mailbox\n./Mailbox\n")
    ok(qlocal(qhome, local_args(home), message=b"x\n"), b"did 2+0+0\n")
    data = (home.path / "Mailbox").read_bytes()
    entries = re.findall(rb"From sender@remote\.example [^\n]*\n", data)
    assert len(entries) == 2
    one = (b"Return-Path: <sender@remote.example>\nDelivered-To: joe@test.example.com\nx\n\n")
    assert re.fullmatch(rb"(From [^\n]*\n" + re.escape(one) + rb"){2}", data), data


def test_maildir_delivery_bytes(qhome: QHome, home: Home) -> None:
    home.maildir()
    home.write(".qmail", b"./Maildir/\n")
    before = int(time.time())
    ok(qlocal(qhome, local_args(home, sender=b"weird\"q@x.example"), message=BODY), b"did 1+0+0\n")
    after = int(time.time())
    (mail,) = (home.path / "Maildir" / "new").iterdir()
    m = re.fullmatch(r"(\d+)\.(\d+)\.(.+)", mail.name)
    assert m and before <= int(m.group(1)) <= after, mail.name
    assert m.group(3).encode() == maildir.hostname()
    # No From_, no quoting, no added newline.
    assert mail.read_bytes() == (b'Return-Path: <"weird\\"q"@x.example>\n'
                                 b"Delivered-To: joe@test.example.com\n" + BODY)
    assert stat.S_IMODE(mail.stat().st_mode) == 0o600
    assert list((home.path / "Maildir" / "tmp").iterdir()) == []
    assert list((home.path / "Maildir" / "cur").iterdir()) == []


def test_two_maildir_deliveries_in_one_second_get_two_names(qhome: QHome, home: Home) -> None:
    home.maildir()
    home.write(".qmail", b"./Maildir/\n./Maildir/\n./Maildir/\n")
    ok(qlocal(qhome, local_args(home), message=b"m"), b"did 3+0+0\n")
    mails = list((home.path / "Maildir" / "new").iterdir())
    assert len(mails) == 3
    for mail in mails:
        assert mail.read_bytes() == b"Return-Path: <sender@remote.example>\nDelivered-To: joe@test.example.com\nm"


def test_absolute_paths_and_message_without_separator(qhome: QHome, home: Home) -> None:
    home.maildir("md")
    msg = b"no header\nno separator\nFrom here"
    home.write(".qmail", os.fsencode(home.path) + b"/box\n" + os.fsencode(home.path) + b"/md/\n")
    ok(qlocal(qhome, local_args(home), message=msg), b"did 2+0+0\n")
    head = b"Return-Path: <sender@remote.example>\nDelivered-To: joe@test.example.com\n"
    (mail,) = (home.path / "md" / "new").iterdir()
    assert mail.read_bytes() == head + msg
    box = (home.path / "box").read_bytes()
    assert box.split(b"\n", 1)[1] == head + b"no header\nno separator\n>From here\n\n"


def test_maildir_without_tmp(qhome: QHome, home: Home) -> None:
    home.maildir()
    (home.path / "Maildir" / "tmp").rmdir()
    home.write(".qmail", b"./Maildir/\n")
    fails(qlocal(qhome, local_args(home)), 111, MAILDIR_TEMPORARY + b"\n")
    assert list((home.path / "Maildir" / "new").iterdir()) == []


def test_maildir_without_new(qhome: QHome, home: Home) -> None:
    home.maildir()
    (home.path / "Maildir" / "new").rmdir()
    home.write(".qmail", b"./Maildir/\n")
    fails(qlocal(qhome, local_args(home)), 111, MAILDIR_TEMPORARY + b"\n")
    assert list((home.path / "Maildir" / "tmp").iterdir()) == []


def test_missing_maildir(qhome: QHome, home: Home) -> None:
    home.write(".qmail", b"./Maildir/\n")
    fails(qlocal(qhome, local_args(home)), 111, MAILDIR_CHDIR + b"\n")


def test_unsearchable_maildir(qhome: QHome, user_home: Home) -> None:
    user_home.maildir()
    (user_home.path / "Maildir").chmod(0o600)
    user_home.write(".qmail", b"./Maildir/\n")
    fails(qlocal(qhome, local_args(user_home), user=user_home.user), 111, MAILDIR_CHDIR + b"\n")


@pytest.mark.parametrize("line, text", [
    (b"./sub/Mailbox", b"Unable to open ./sub/Mailbox: file does not exist. (#4.2.1)\n"),
    (b"./dir", b"Unable to open ./dir: is a directory. (#4.2.1)\n"),
    (b"/dev/null", b"Unable to write /dev/null: invalid argument. (#4.3.0)\n"),  # fsync refuses it
    (b"/dev/full", b"Unable to write /dev/full: out of disk space. (#4.3.0)\n"),
])
def test_mbox_failures(qhome: QHome, home: Home, line: bytes, text: bytes) -> None:
    home.mkdir("dir")
    home.write(".qmail", line + b"\n")
    fails(qlocal(qhome, local_args(home)), 111, text)


def _fsize_limit(limit: int):  # type: ignore[no-untyped-def]
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_limit


def test_mbox_write_error_truncates_back(qhome: QHome, home: Home) -> None:
    old = b"From old\nSubject: old mail\n\nold body\n\n" * 30
    home.write("Mailbox", old, 0o600)
    big = b"Subject: big\n\n" + b"From line\n" * 20000
    fails(qlocal(qhome, local_args(home), message=big, preexec=_fsize_limit(len(old) + 5000)), 111,
          b"Unable to write ./Mailbox: file too big. (#4.3.0)\n")
    assert (home.path / "Mailbox").read_bytes() == old


def test_maildir_write_error_leaves_nothing(qhome: QHome, home: Home) -> None:
    home.maildir()
    home.write(".qmail", b"./Maildir/\n")
    fails(qlocal(qhome, local_args(home), message=b"x" * 100000, preexec=_fsize_limit(50000)), 111,
          MAILDIR_TEMPORARY + b"\n")
    assert list((home.path / "Maildir" / "tmp").iterdir()) == []
    assert list((home.path / "Maildir" / "new").iterdir()) == []


def test_mbox_waits_for_the_lock(qhome: QHome, home: Home) -> None:
    box = home.write("Mailbox", b"", 0o600)
    holder = os.open(box, os.O_WRONLY | os.O_APPEND)
    fcntl.flock(holder, fcntl.LOCK_EX)
    with tempfile.TemporaryFile() as msg:
        msg.write(b"new\n")
        msg.seek(0)
        argv = [os.fsencode(qhome.bin("qmail-local")), *local_args(home)]
        proc = subprocess.Popen(argv, stdin=msg, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"PATH": PATH})
        try:
            # Wait until qmail-local is queued on the lock ("->" in /proc/locks), then write as the holder.
            ino = str(box.stat().st_ino)
            deadline = time.monotonic() + 30
            while not any("->" in line and f":{ino} " in line for line in Path("/proc/locks").read_text().splitlines()):
                assert proc.poll() is None and time.monotonic() < deadline, "qmail-local did not wait for the lock"
                time.sleep(0.01)
            os.write(holder, b"written while locked\n")
        finally:
            os.close(holder)
        out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (0, b"did 1+0+0\n", b"")
    data = box.read_bytes()
    assert data.startswith(b"written while locked\nFrom sender@remote.example ")
    assert data.endswith(b"Delivered-To: joe@test.example.com\nnew\n\n")


# ---------------------------------------------------------------------------
# A 20 MB message through every kind of delivery.

def test_twenty_megabyte_message(qhome: QHome, home: Home) -> None:
    rnd = random.Random(20)
    lines = [b"Subject: big\n", b"\n"]
    size = 0
    while size < 20 << 20:
        kind = rnd.randrange(6)
        line = (b"From x\n", b">From y\n", b"x" * rnd.randrange(0, 2000) + b"\n",
                b"\0\r\xff binary \n", b"y" * 300_000 + b"\n", b"From " + b"z" * 70 + b"\n")[kind]
        lines.append(line)
        size += len(line)
    big = b"".join(lines) + b"no final newline"
    home.maildir()
    home.write(".qmail", b"./Mailbox\n./Maildir/\n|cat > prog.out\n")
    ok(qlocal(qhome, local_args(home), message=big), b"did 2+0+1\n")
    head = b"Return-Path: <sender@remote.example>\nDelivered-To: joe@test.example.com\n"
    (mail,) = (home.path / "Maildir" / "new").iterdir()
    assert mail.read_bytes() == head + big
    assert (home.path / "prog.out").read_bytes() == big
    box = (home.path / "Mailbox").read_bytes()
    first, rest = box.split(b"\n", 1)
    assert first.startswith(b"From sender@remote.example ")
    assert rest == head + reference_quote(big) + b"\n"


def test_rewind_failure_mentions_nothing_else(qhome: QHome, home: Home) -> None:
    home.maildir()
    home.write(".qmail", b"./Maildir/\n")
    r, w = os.pipe()
    os.close(w)
    try:
        fails(qlocal(qhome, local_args(home), stdin=r), 111, REWIND + b"\n")
    finally:
        os.close(r)
