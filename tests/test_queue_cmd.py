"""`qmail queue list|show|delete|expire|retry` on real queued messages, with qmail-send stopped and running."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from conftest import TEST_USER, VENV_BIN, QHome, Result, expect, run
from queuefmt import files, messages
from sendkit import Running, Site, make_site, remove_site
from pyqmail.admin import queue as qcmd

FQDN = "test.example.com"
SPLIT = 23
HEAD = re.compile(rb"^(\d+)  (\d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d) GMT  (\d+) bytes  <(.*)>  (.*)$")


@pytest.fixture
def site() -> Site:
    s = make_site(FQDN)
    # No test goes to the network: remote deliveries get qmail-rspawn's deferral.
    s.home.bin("qmail-remote").unlink(missing_ok=True)
    yield s
    remove_site(s)


def qmail(site: Site, *args: str, code: int = 0, user: str | None = "site") -> Result:
    """Run `qmail ARGS --home HOME` (as the site's user unless user is given) and check the exit code."""
    who = site.user if user == "site" else user
    res = run([VENV_BIN / "qmail", *args, "--home", str(site.home.path)], user=who, env={"PATH": "/usr/bin:/bin"})
    return expect(res, code)


def inject(site: Site, *recips: str, body: bytes = b"Subject: test\n\nhello\n", sender: str = "s@x.example") -> int:
    """Queue a message with qmail-inject (qmail-send not running); return its number."""
    before = set(messages(site.home.queue))
    expect(run([site.home.bin("qmail-inject"), "-f", sender, *recips], input=body, user=site.user,
               env=site.env(USER=site.user or "root")))
    (num,) = set(messages(site.home.queue)) - before
    return num


def mess_path(site: Site, num: int) -> Path:
    return site.home.queue / "mess" / str(num % SPLIT) / str(num)


def preprocess(site: Site, num: int) -> None:
    """Run qmail-send until message num is preprocessed and its remote delivery deferred, then stop it."""
    d = Running(site)
    try:
        d.wait_for(lambda ls: any(x.startswith(b"delivery ") and b"deferral" in x for x in ls))
    finally:
        assert d.stop() == 0
    assert messages(site.home.queue)[num] == "S5"


# --- list and show ------------------------------------------------------------------------

def test_list_shows_queued_messages_with_their_recipients(site: Site) -> None:
    a = inject(site, "joe@" + FQDN, "bob@remote.example")
    b = inject(site, "ann@other.example", sender="")
    out = qmail(site, "queue", "list").stdout.split(b"\n")
    assert out[-1] == b""
    assert out[-2] == b"2 messages"
    blocks: dict[int, list[bytes]] = {}
    current = -1
    for line in out[:-2]:
        m = HEAD.match(line)
        if m:
            current = int(m.group(1))
            blocks[current] = [line]
            assert int(m.group(3)) == mess_path(site, current).stat().st_size
            assert m.group(5) == b"queued (not yet preprocessed by qmail-send)"
        else:
            blocks[current].append(line)
    assert sorted(blocks) == sorted([a, b])
    assert HEAD.match(blocks[a][0]).group(4) == b"s@x.example"  # type: ignore[union-attr]
    assert blocks[a][1:] == [b"  -       not done  joe@test.example.com", b"  -       not done  bob@remote.example"]
    assert HEAD.match(blocks[b][0]).group(4) == b""  # type: ignore[union-attr]
    assert blocks[b][1:] == [b"  -       not done  ann@other.example"]


def test_list_of_an_empty_queue(site: Site) -> None:
    assert qmail(site, "queue", "list").stdout == b"0 messages\n"


def test_show_prints_envelope_then_the_message_byte_for_byte(site: Site) -> None:
    num = inject(site, "joe@" + FQDN, body=b"Subject: show me\n\nline\x01 two\n")
    res = qmail(site, "queue", "show", str(num))
    head, _, body = res.stdout.partition(b"\n\n")
    assert body == mess_path(site, num).read_bytes()
    lines = head.split(b"\n")
    assert lines[0] == b"message: %d" % num
    assert lines[1] == b"state: queued (not yet preprocessed by qmail-send)"
    assert re.fullmatch(rb"date: \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d GMT", lines[2])
    assert lines[3:] == [b"size: %d bytes" % len(body), b"sender: <s@x.example>",
                         b"recipient: not done: joe@test.example.com"]
    # "#N" is accepted too, as list and messages print numbers
    assert qmail(site, "queue", "show", f"#{num}").stdout == res.stdout


def test_preprocessed_message_lists_channels_and_done_marks(site: Site) -> None:
    num = inject(site, "nobody-here@" + FQDN, "bob@remote.example")
    preprocess(site, num)
    out = qmail(site, "queue", "list").stdout.split(b"\n")
    m = HEAD.match(out[0])
    assert m and int(m.group(1)) == num and m.group(5) in (b"preprocessed", b"preprocessed, bouncing")
    assert b"  remote  not done  bob@remote.example" in out
    show = qmail(site, "queue", "show", str(num)).stdout
    assert b"recipient: remote, not done: bob@remote.example\n" in show


def test_unknown_message_and_bad_usage(site: Site) -> None:
    res = qmail(site, "queue", "show", "12345", code=1)
    assert res.stderr == f"qmail queue: no message #12345 in the queue of {site.home.path}\n".encode()
    qmail(site, "queue", "delete", "12345", code=1)
    assert qmail(site, "queue", "show", "12x", code=100).stderr == b"qmail queue: not a message number: 12x\n"
    qmail(site, "queue", "frobnicate", code=100)
    qmail(site, "queue", code=100)
    assert qmail(site, "queue", "list", "--help").stdout.startswith(b"usage: qmail queue list")


def test_missing_queue_is_a_temporary_failure(tmp_path: Path) -> None:
    res = run([VENV_BIN / "qmail", "queue", "list", "--home", str(tmp_path / "none")], env={"PATH": "/usr/bin:/bin"})
    expect(res, 111)
    assert b"unable to enter" in res.stderr


# --- delete -------------------------------------------------------------------------------

def test_delete_of_a_queued_message_removes_every_file(site: Site) -> None:
    keep = inject(site, "keep@" + FQDN)
    num = inject(site, "joe@" + FQDN)
    res = qmail(site, "queue", "delete", str(num))
    assert res.stdout == (b"removed queue/intd/%d\nremoved queue/todo/%d\nremoved queue/mess/%d/%d\n"
                          b"deleted message #%d\n" % (num, num, num % SPLIT, num, num))
    assert messages(site.home.queue) == {keep: "S4"}


def test_delete_of_a_preprocessed_message_in_qmail_sends_order(site: Site) -> None:
    num = inject(site, "nobody-here@" + FQDN, "bob@remote.example")
    preprocess(site, num)
    res = qmail(site, "queue", "delete", str(num))
    removed = [line.split(b"/")[1] for line in res.stdout.split(b"\n") if line.startswith(b"removed ")]
    order = [k.encode() for k in qcmd.DELETE_ORDER]
    assert removed == sorted(removed, key=order.index)
    assert removed[-2:] == [b"info", b"mess"] and b"remote" in removed
    assert all(not names for names in files(site.home.queue).values())
    # qmail-send starts cleanly on the emptied queue
    d = Running(site)
    try:
        d.wait_for(b"status: local 0/10 remote 0/20")
    finally:
        assert d.stop() == 0


def test_delete_is_refused_while_qmail_send_runs(site: Site) -> None:
    num = inject(site, "bob@remote.example")
    before = files(site.home.queue)
    d = Running(site)
    try:
        d.wait_for(lambda ls: any(b"deferral" in x for x in ls))
        res = qmail(site, "queue", "delete", str(num), code=111)
        assert res.stderr == (b"qmail queue: refusing to delete #%d: qmail-send is running (pid %d); stop it first "
                              b"(qmail down, or svc -d the qmail-send service)\n" % (num, d.proc.pid))
        assert res.stdout == b""
        assert num in messages(site.home.queue)
    finally:
        assert d.stop() == 0
    assert before["mess"] == files(site.home.queue)["mess"]


def test_qmail_send_cannot_start_while_delete_holds_the_lock(site: Site) -> None:
    import fcntl

    fd = os.open(site.home.queue / "lock" / "sendmutex", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        num = inject(site, "joe@" + FQDN)
        res = qmail(site, "queue", "delete", str(num), code=111)
        assert b"qmail-send is running" in res.stderr  # the lock is all delete trusts
    finally:
        os.close(fd)
    qmail(site, "queue", "delete", str(num))


# --- expire and retry -----------------------------------------------------------------

def test_expire_with_qmail_send_stopped_sets_the_birth_back(site: Site) -> None:
    num = inject(site, "bob@remote.example")
    preprocess(site, num)
    info = site.home.queue / "info" / str(num % SPLIT) / str(num)
    remote = site.home.queue / "remote" / str(num % SPLIT) / str(num)
    (site.home.path / "control" / "queuelifetime").write_text("3600\n")
    now = time.time()
    res = qmail(site, "queue", "expire", str(num))
    lines = res.stdout.split(b"\n")
    assert lines[0].startswith(b"expire #%d: queue/info/%d/%d now dates from " % (num, num % SPLIT, num))
    assert lines[0].endswith(b" GMT, past queuelifetime (3600 seconds)")
    assert lines[1] == (b"qmail-send is not running: when it starts it tries the remaining recipients once more "
                        b"and bounces those that fail")
    assert now - 3600 - 10 < info.stat().st_mtime < now - 3600
    assert abs(remote.stat().st_mtime - now) < 10  # due now
    # started, qmail-send gives up on it at once
    d = Running(site)
    try:
        lines_ = d.wait_for(b"end msg %d" % num)
    finally:
        assert d.stop() == 0
    assert any(b"I'm_not_going_to_try_again" in x for x in lines_), lines_


def test_expire_while_qmail_send_runs_signals_it(site: Site) -> None:
    num = inject(site, "bob@remote.example")
    d = Running(site)
    try:
        d.wait_for(lambda ls: any(b"deferral" in x for x in ls))
        res = qmail(site, "queue", "expire", str(num))
        assert res.stdout.split(b"\n")[1] == (
            b"qmail-send (pid %d) is running: sent it ALRM; it tries the remaining recipients once more "
            b"and bounces those that fail" % d.proc.pid)
        lines = d.wait_for(b"end msg %d" % num)
    finally:
        assert d.stop() == 0
    assert any(b"I'm_not_going_to_try_again" in x for x in lines), lines


def test_expire_of_a_message_not_yet_preprocessed_is_refused(site: Site) -> None:
    num = inject(site, "bob@remote.example")
    res = qmail(site, "queue", "expire", str(num), code=1)
    assert b"is not preprocessed yet" in res.stderr
    assert messages(site.home.queue) == {num: "S4"}


def test_retry_sends_alrm_to_a_running_qmail_send(site: Site) -> None:
    num = inject(site, "bob@remote.example")
    d = Running(site)
    try:
        d.wait_for(lambda ls: sum(b"deferral" in x for x in ls) == 1)
        res = qmail(site, "queue", "retry")
        assert res.stdout == b"sent ALRM to qmail-send (pid %d): every waiting recipient is due now\n" % d.proc.pid
        # the next remote try would be 400 seconds away without the ALRM
        lines = d.wait_for(lambda ls: sum(b"deferral" in x for x in ls) == 2, timeout=30)
    finally:
        assert d.stop() == 0
    assert sum(x.startswith(b"starting delivery") and b"msg %d " % num in x for x in lines) == 2


def test_retry_with_qmail_send_stopped_makes_lists_due(site: Site) -> None:
    num = inject(site, "bob@remote.example")
    preprocess(site, num)
    remote = site.home.queue / "remote" / str(num % SPLIT) / str(num)
    assert remote.stat().st_mtime > time.time() + 100  # qmail-send saved its next retry
    res = qmail(site, "queue", "retry")
    assert res.stdout == b"qmail-send is not running: 1 recipient list made due now; they are tried when it starts\n"
    assert abs(remote.stat().st_mtime - time.time()) < 10


# --- the lock table -----------------------------------------------------------------------

def test_parse_locks_finds_the_flock_holder() -> None:
    text = ("1: POSIX  ADVISORY  WRITE 111 fe:00:2146316 0 EOF\n"
            "2: FLOCK  ADVISORY  WRITE 222 fe:00:2146316 0 EOF\n"
            "2: -> FLOCK  ADVISORY  WRITE 333 fe:00:2146316 0 EOF\n"
            "3: FLOCK  ADVISORY  WRITE 444 08:01:99 0 EOF\n")
    assert qcmd.parse_locks(text, 0xFE, 0, 2146316) == 222
    assert qcmd.parse_locks(text, 8, 1, 99) == 444
    assert qcmd.parse_locks(text, 8, 1, 98) is None


@pytest.mark.parametrize("text", ["", "garbage\n", "1: FLOCK\n", "1: FLOCK ADVISORY WRITE -1 fe:00:5 0 EOF\n",
                                  "1: FLOCK ADVISORY WRITE x fe:00:5 0 EOF\n", "\0" * 100, "1: -> FLOCK\n"])
def test_parse_locks_hostile_lines(text: str) -> None:
    assert qcmd.parse_locks(text, 0xFE, 0, 5) is None


def test_records_of_truncated_envelopes() -> None:
    assert qcmd.records(b"") == []
    assert qcmd.records(b"Fa@b") == []
    assert qcmd.records(b"Fa@b\0Tc") == [b"Fa@b"]


# --- a root-mode installation ---------------------------------------------------------

def test_root_mode_queue_as_root_and_as_an_ordinary_user(root_home: QHome) -> None:
    res = run([root_home.bin("qmail-inject"), "-f", "a@b.example", "joe@" + FQDN], input=b"Subject: r\n\nb\n",
              env={"PATH": "/usr/bin:/bin"})
    expect(res)
    (num,) = messages(root_home.queue)
    env = {"PATH": "/usr/bin:/bin"}
    out = expect(run([VENV_BIN / "qmail", "queue", "list", "--home", str(root_home.path)], env=env)).stdout
    assert out.startswith(b"%d  " % num) and out.endswith(b"\n  -       not done  joe@test.example.com\n1 message\n")
    res = run([VENV_BIN / "qmail", "queue", "list", "--home", str(root_home.path)], env=env, user=TEST_USER)
    expect(res, 111)
    assert res.stderr == f"qmail queue: unable to enter {root_home.path}/queue: access denied\n".encode()
    expect(run([VENV_BIN / "qmail", "queue", "delete", str(num), "--home", str(root_home.path)], env=env))
    assert messages(root_home.queue) == {}
