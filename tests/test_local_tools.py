"""The local tools: preline, forward, condredirect, bouncesaying, except, maildirmake,
maildir2mbox, qbiff, qreceipt, dot-forward; each run as a process, exact output and exit codes."""

from __future__ import annotations

import os
import re
import stat
import struct
from pathlib import Path

import pytest

from conftest import QHome, Result, expect, run
from pyqmail import rfc822
from pyqmail.local.mbox import ctime
from pyqmail.tools import headerbody, maildir2mbox, qbiff, qreceipt

BASE_ENV = {"PATH": "/usr/bin:/bin"}
LOCAL_ENV = {
    **BASE_ENV,
    "SENDER": "sender@example.org", "NEWSENDER": "newsender@example.org",
    "RECIPIENT": "joe-ext@test.example.com", "USER": "joe", "HOME": "/home/joe", "LOCAL": "joe-ext",
    "HOST": "test.example.com", "EXT": "ext",
    "UFLINE": "From sender@example.org Thu Jan  1 00:00:00 1970\n",
    "RPLINE": "Return-Path: <sender@example.org>\n",
    "DTLINE": "Delivered-To: joe-ext@test.example.com\n",
}
MESSAGE = b"Subject: hello\nFrom: a@b\n\nbody line\nFrom the body\n"


class Recorder:
    """A QMAILQUEUE that records what it is given and exits as told."""

    def __init__(self, base: Path) -> None:
        self.dir = base
        self.script = base / "qq"
        self.script.write_text("#!/bin/sh\ncat > \"$QQDIR/msg\"\ncat <&1 > \"$QQDIR/env\"\n"
                               "echo $$ > \"$QQDIR/pid\"\nexit ${QQEXIT:-0}\n")
        self.script.chmod(0o755)

    def env(self, code: int = 0) -> dict[str, str]:
        return {"QMAILQUEUE": str(self.script), "QQDIR": str(self.dir), "QQEXIT": str(code)}

    @property
    def queued(self) -> bool:
        return (self.dir / "env").exists()

    def envelope(self) -> tuple[bytes, list[bytes]]:
        data = (self.dir / "env").read_bytes()
        assert data.endswith(b"\0\0") and data[:1] == b"F"
        fields = data[:-2].split(b"\0")
        assert all(f[:1] == b"T" for f in fields[1:])
        return fields[0][1:], [f[1:] for f in fields[1:]]

    def message(self) -> bytes:
        return (self.dir / "msg").read_bytes()

    def pid(self) -> bytes:
        return (self.dir / "pid").read_bytes().strip()


@pytest.fixture
def qq(tmp_path: Path) -> Recorder:
    d = tmp_path / "qq"
    d.mkdir()
    return Recorder(d)


def tool(home: QHome, name: str, *args: str, env: dict[str, str] | None = None, input: bytes = b"",
         stdin_file: Path | None = None, cwd: Path | None = None) -> Result:
    env = dict(LOCAL_ENV if env is None else env)
    env.setdefault("QMAILHOME", str(home.path))
    if stdin_file is None:
        return run([home.bin(name), *args], input=input, env=env, cwd=cwd)
    import subprocess
    with open(stdin_file, "rb") as f:
        p = subprocess.run([str(home.bin(name)), *args], stdin=f, capture_output=True, env=env, cwd=cwd,
                           timeout=60)
    return Result([str(home.bin(name)), *args], p.returncode, p.stdout, p.stderr)


def msgfile(tmp_path: Path, data: bytes = MESSAGE) -> Path:
    p = tmp_path / "message"
    p.write_bytes(data)
    return p


# --- preline ---------------------------------------------------------------------------

PRELINES = (LOCAL_ENV["UFLINE"] + LOCAL_ENV["RPLINE"] + LOCAL_ENV["DTLINE"]).encode()


def test_preline_prepends_the_three_lines(qhome: QHome) -> None:
    res = expect(tool(qhome, "preline", "cat", input=MESSAGE))
    assert res.stdout == PRELINES + MESSAGE and res.stderr == b""


@pytest.mark.parametrize("opts,lines", [
    (["-f"], ["RPLINE", "DTLINE"]), (["-r"], ["UFLINE", "DTLINE"]), (["-d"], ["UFLINE", "RPLINE"]),
    (["-frd"], []), (["-f", "-F"], ["UFLINE", "RPLINE", "DTLINE"]), (["-dD", "-r"], ["UFLINE", "DTLINE"]),
    (["--", "-f"], None),
])
def test_preline_options(qhome: QHome, opts: list[str], lines: list[str] | None) -> None:
    if lines is None:
        # After --, -f is the command: it does not exist.
        res = expect(tool(qhome, "preline", *opts, input=MESSAGE), 100)
        assert res.stderr == b"preline: fatal: unable to run -f: file does not exist\n"
        return
    res = expect(tool(qhome, "preline", *opts, "cat", input=MESSAGE))
    assert res.stdout == "".join(LOCAL_ENV[n] for n in lines).encode() + MESSAGE


def test_preline_passes_the_exit_code(qhome: QHome) -> None:
    res = tool(qhome, "preline", "sh", "-c", "cat >/dev/null; echo out; exit 7", input=MESSAGE)
    assert (res.returncode, res.stdout) == (7, b"out\n")


def test_preline_usage(qhome: QHome) -> None:
    usage = b"preline: usage: preline cmd [ arg ... ]\n"
    for env_missing in ("UFLINE", "RPLINE", "DTLINE"):
        env = {k: v for k, v in LOCAL_ENV.items() if k != env_missing}
        res = expect(tool(qhome, "preline", "cat", env=env), 100)
        assert res.stderr == usage
    assert expect(tool(qhome, "preline"), 100).stderr == usage
    assert expect(tool(qhome, "preline", "-x", "cat"), 100).stderr == b"preline: illegal option -- x\n" + usage


def test_preline_child_crash_and_missing_program(qhome: QHome, tmp_path: Path) -> None:
    res = expect(tool(qhome, "preline", "sh", "-c", "kill -9 $$", input=MESSAGE), 111)
    assert res.stderr == b"preline: fatal: child crashed\n"
    res = expect(tool(qhome, "preline", "no-such-program-xyz", input=MESSAGE), 100)
    assert res.stderr == b"preline: fatal: unable to run no-such-program-xyz: file does not exist\n"


def test_preline_big_message_to_a_command_that_stops_reading(qhome: QHome) -> None:
    res = tool(qhome, "preline", "sh", "-c", "exit 0", input=b"x" * 1000000)
    assert res.returncode == 111
    assert res.stderr == b"preline: fatal: unable to copy input: broken pipe\n"
    # A small message fits qmail's buffer: the final flush's error is ignored.
    res = expect(tool(qhome, "preline", "sh", "-c", "exit 0", input=b"x" * 100))


# --- forward ---------------------------------------------------------------------------

def test_forward_queues_with_dtline(qhome: QHome, qq: Recorder) -> None:
    res = expect(tool(qhome, "forward", "a@x.example", "b@y.example", env={**LOCAL_ENV, **qq.env()}, input=MESSAGE))
    assert res.stderr == b"forward: qp " + qq.pid() + b"\n" and res.stdout == b""
    assert qq.envelope() == (b"newsender@example.org", [b"a@x.example", b"b@y.example"])
    assert qq.message() == LOCAL_ENV["DTLINE"].encode() + MESSAGE


def test_forward_without_addresses_still_queues(qhome: QHome, qq: Recorder) -> None:
    expect(tool(qhome, "forward", env={**LOCAL_ENV, **qq.env()}, input=MESSAGE))
    assert qq.envelope() == (b"newsender@example.org", [])


def test_forward_environment(qhome: QHome, qq: Recorder) -> None:
    for var in ("NEWSENDER", "DTLINE"):
        env = {k: v for k, v in {**LOCAL_ENV, **qq.env()}.items() if k != var}
        res = expect(tool(qhome, "forward", "a@x", env=env), 100)
        assert res.stderr == f"forward: fatal: {var} not set\n".encode()
    assert not qq.queued


@pytest.mark.parametrize("code,exit,text", [
    (31, 100, b"mail server permanently rejected message (#5.3.0)"),
    (11, 100, b"envelope address too long for qq (#5.1.3)"),
    (53, 111, b"qq write error or disk full (#4.3.0)"),
    (81, 111, b"qq internal bug (#4.3.0)"),
])
def test_forward_queue_failures(qhome: QHome, qq: Recorder, code: int, exit: int, text: bytes) -> None:
    res = expect(tool(qhome, "forward", "a@x", env={**LOCAL_ENV, **qq.env(code)}, input=MESSAGE), exit)
    assert res.stderr == b"forward: fatal: " + text + b"\n"


# --- condredirect ---------------------------------------------------------------------

def test_condredirect_redirects_when_program_succeeds(qhome: QHome, qq: Recorder, tmp_path: Path) -> None:
    res = expect(tool(qhome, "condredirect", "new@x.example", "grep", "-q", "^From the body",
                      env={**LOCAL_ENV, **qq.env()}, stdin_file=msgfile(tmp_path)), 99)
    assert res.stderr == b"condredirect: qp " + qq.pid() + b"\n"
    assert qq.envelope() == (b"sender@example.org", [b"new@x.example"])
    # The program read the message; condredirect rewound it before queueing.
    assert qq.message() == LOCAL_ENV["DTLINE"].encode() + MESSAGE


def test_condredirect_other_exits(qhome: QHome, qq: Recorder, tmp_path: Path) -> None:
    env = {**LOCAL_ENV, **qq.env()}
    res = expect(tool(qhome, "condredirect", "new@x", "grep", "-q", "nothing", env=env, stdin_file=msgfile(tmp_path)))
    assert res.stderr == b""
    res = expect(tool(qhome, "condredirect", "new@x", "sh", "-c", "exit 111", env=env, stdin_file=msgfile(tmp_path)), 111)
    assert res.stderr == b"condredirect: fatal: temporary child error\n"
    res = expect(tool(qhome, "condredirect", "new@x", "sh", "-c", "kill -9 $$", env=env, stdin_file=msgfile(tmp_path)), 111)
    assert res.stderr == b"condredirect: fatal: child crashed\n"
    res = expect(tool(qhome, "condredirect", "new@x", "no-such-program-xyz", env=env, stdin_file=msgfile(tmp_path)))
    assert res.stderr == b""
    assert not qq.queued


def test_condredirect_usage_and_environment(qhome: QHome, qq: Recorder, tmp_path: Path) -> None:
    usage = b"condredirect: usage: condredirect newaddress program [ arg ... ]\n"
    assert expect(tool(qhome, "condredirect"), 100).stderr == usage
    assert expect(tool(qhome, "condredirect", "new@x"), 100).stderr == usage
    env = {k: v for k, v in {**LOCAL_ENV, **qq.env()}.items() if k != "SENDER"}
    res = expect(tool(qhome, "condredirect", "new@x", "true", env=env, stdin_file=msgfile(tmp_path)), 100)
    assert res.stderr == b"condredirect: fatal: SENDER not set\n"


def test_condredirect_unseekable_input(qhome: QHome, qq: Recorder) -> None:
    res = expect(tool(qhome, "condredirect", "new@x", "true", env={**LOCAL_ENV, **qq.env()}, input=MESSAGE), 111)
    assert res.stderr == b"condredirect: fatal: unable to rewind: unseekable descriptor\n"


# --- bouncesaying, except ----------------------------------------------------------------

def test_bouncesaying(qhome: QHome, tmp_path: Path) -> None:
    res = expect(tool(qhome, "bouncesaying", "This address no longer accepts mail."), 100)
    assert res.stderr == b"This address no longer accepts mail.\n"
    res = expect(tool(qhome, "bouncesaying", "No.", "grep", "-q", "^Subject: hello", stdin_file=msgfile(tmp_path)), 100)
    assert res.stderr == b"No.\n"
    res = expect(tool(qhome, "bouncesaying", "No.", "grep", "-q", "^Subject: other", stdin_file=msgfile(tmp_path)))
    assert res.stderr == b""
    res = expect(tool(qhome, "bouncesaying", "No.", "sh", "-c", "exit 111"), 111)
    assert res.stderr == b"bouncesaying: fatal: temporary child error\n"
    res = expect(tool(qhome, "bouncesaying", "No.", "sh", "-c", "kill -9 $$"), 111)
    assert res.stderr == b"bouncesaying: fatal: child crashed\n"
    res = expect(tool(qhome, "bouncesaying"), 100)
    assert res.stderr == b"bouncesaying: usage: bouncesaying error [ program [ arg ... ] ]\n"


def test_except(qhome: QHome) -> None:
    assert expect(tool(qhome, "except", "true"), 100).stderr == b""
    assert expect(tool(qhome, "except", "false")).stderr == b""
    assert expect(tool(qhome, "except", "sh", "-c", "exit 100")).stderr == b""
    assert expect(tool(qhome, "except", "sh", "-c", "exit 111"), 111).stderr == b"except: fatal: temporary child error\n"
    assert expect(tool(qhome, "except", "sh", "-c", "kill -9 $$"), 111).stderr == b"except: fatal: child crashed\n"
    assert expect(tool(qhome, "except", "no-such-program-xyz")).stderr == b""
    assert expect(tool(qhome, "except"), 100).stderr == b"except: usage: except program [ arg ... ]\n"


def test_except_passes_stdin_and_output(qhome: QHome) -> None:
    res = expect(tool(qhome, "except", "sh", "-c", "cat; exit 3", input=b"data\n"))
    assert res.stdout == b"data\n"


# --- maildirmake -----------------------------------------------------------------------------

def test_maildirmake(qhome: QHome, tmp_path: Path) -> None:
    expect(tool(qhome, "maildirmake", "Maildir", cwd=tmp_path))
    for d in ("Maildir", "Maildir/tmp", "Maildir/new", "Maildir/cur"):
        assert stat.S_IMODE((tmp_path / d).stat().st_mode) == 0o700
    res = expect(tool(qhome, "maildirmake", "Maildir", cwd=tmp_path), 111)
    assert res.stderr == b"maildirmake: fatal: unable to mkdir Maildir: file already exists\n"
    (tmp_path / "M2").mkdir()
    res = expect(tool(qhome, "maildirmake", str(tmp_path / "M2" / "x" / "y")), 111)
    assert res.stderr == f"maildirmake: fatal: unable to mkdir {tmp_path}/M2/x/y: file does not exist\n".encode()
    assert expect(tool(qhome, "maildirmake"), 100).stderr == b"maildirmake: usage: maildirmake name\n"


# --- maildir2mbox ----------------------------------------------------------------------------

def make_maildir(base: Path) -> Path:
    md = base / "Maildir"
    for d in ("", "tmp", "new", "cur"):
        (md / d).mkdir()
    return md


def put(md: Path, sub: str, name: str, data: bytes, mtime: int) -> Path:
    p = md / sub / name
    p.write_bytes(data)
    os.utime(p, (mtime, mtime))
    return p


def test_maildir2mbox_appends_in_time_order(qhome: QHome, tmp_path: Path) -> None:
    md = make_maildir(tmp_path)
    mbox = tmp_path / "mbox"
    mbox.write_bytes(b"From old Thu Jan 01 00:00:00 1970\nold\n\n")
    put(md, "new", "2", b"Return-Path: <a b@x>\nSubject: two\n\nFrom here\n>From there\n", 86400 * 2)
    put(md, "cur", "1:2,S", b"Return-Path: <>\nSubject: one\n\nbody\n", 86400)
    put(md, "new", "3", b"Subject: three\n\nno newline at end", 86400 * 3)
    put(md, "new", ".hidden", b"x\n", 1)
    env = {**BASE_ENV, "MAILDIR": str(md), "MAIL": str(mbox), "MAILTMP": str(tmp_path / "mbox.tmp")}
    res = expect(tool(qhome, "maildir2mbox", env=env))
    assert res.stdout == b"" and res.stderr == b""
    assert mbox.read_bytes() == (
        b"From old Thu Jan 01 00:00:00 1970\nold\n\n"
        b"From MAILER-DAEMON Fri Jan 02 00:00:00 1970\nReturn-Path: <>\nSubject: one\n\nbody\n\n"
        b"From a-b@x Sat Jan 03 00:00:00 1970\nReturn-Path: <a b@x>\nSubject: two\n\n>From here\n>>From there\n\n"
        b"From XXX Sun Jan 04 00:00:00 1970\nSubject: three\n\n\n")
    assert sorted(os.listdir(md / "new")) == [".hidden"] and os.listdir(md / "cur") == []
    assert not (tmp_path / "mbox.tmp").exists()
    assert stat.S_IMODE(mbox.stat().st_mode) == 0o600


def test_maildir2mbox_nothing_new_leaves_mbox_alone(qhome: QHome, tmp_path: Path) -> None:
    md = make_maildir(tmp_path)
    env = {**BASE_ENV, "MAILDIR": str(md), "MAIL": str(tmp_path / "mbox"), "MAILTMP": str(tmp_path / "t")}
    expect(tool(qhome, "maildir2mbox", env=env))
    assert not (tmp_path / "mbox").exists()


def test_maildir2mbox_environment_and_errors(qhome: QHome, tmp_path: Path) -> None:
    md = make_maildir(tmp_path)
    full = {**BASE_ENV, "MAILDIR": str(md), "MAIL": str(tmp_path / "mbox"), "MAILTMP": str(tmp_path / "t")}
    for var in ("MAIL", "MAILTMP", "MAILDIR"):
        env = {k: v for k, v in full.items() if k != var}
        assert expect(tool(qhome, "maildir2mbox", env=env), 111).stderr == f"maildir2mbox: fatal: {var} not set\n".encode()
    env = {**full, "MAILDIR": str(tmp_path / "none")}
    res = expect(tool(qhome, "maildir2mbox", env=env), 111)
    assert res.stderr == f"maildir2mbox: fatal: unable to chdir to {tmp_path}/none: file does not exist\n".encode()
    os.rmdir(md / "cur")
    res = expect(tool(qhome, "maildir2mbox", env=full), 111)
    assert res.stderr == b"maildir2mbox: fatal: unable to scan $MAILDIR/cur: file does not exist\n"
    os.mkdir(md / "cur")
    put(md, "new", "1", b"a\n", 1000)
    env = {**full, "MAILTMP": str(tmp_path / "no" / "t")}
    res = expect(tool(qhome, "maildir2mbox", env=env), 111)
    assert res.stderr == f"maildir2mbox: fatal: unable to create {tmp_path}/no/t: file does not exist\n".encode()
    assert (md / "new" / "1").exists()


def test_maildir2mbox_cleans_old_tmp(qhome: QHome, tmp_path: Path) -> None:
    md = make_maildir(tmp_path)
    put(md, "tmp", "old", b"x", 1000)
    put(md, "tmp", "fresh", b"x", int(os.path.getmtime(md)))
    env = {**BASE_ENV, "MAILDIR": str(md), "MAIL": str(tmp_path / "mbox"), "MAILTMP": str(tmp_path / "t")}
    expect(tool(qhome, "maildir2mbox", env=env))
    assert os.listdir(md / "tmp") == ["fresh"]


def test_mbox_entry_and_prioq_units() -> None:
    assert ctime(0) == b"Thu Jan 01 00:00:00 1970\n"
    assert maildir2mbox.mbox_entry(b"", 0) == b"From XXX Thu Jan 01 00:00:00 1970\n\n"
    assert maildir2mbox.mbox_entry(b"one line no newline", 0) == b"From XXX Thu Jan 01 00:00:00 1970\n\n"
    assert maildir2mbox.mbox_entry(b"Return-Path: <\n", 0) == b"From  Thu Jan 01 00:00:00 1970\nReturn-Path: <\n\n"
    pq = maildir2mbox.PrioQ()
    for dt, name in [(5, "a"), (1, "b"), (5, "c"), (3, "d"), (1, "e")]:
        pq.insert(maildir2mbox._Elt(dt, name))
    order = []
    while (e := pq.min()) is not None:
        pq.delmin()
        order.append(e.dt)
    assert order == [1, 1, 3, 5, 5]


# --- qbiff ----------------------------------------------------------------------------------

def test_qbiff_text() -> None:
    text = qbiff.summary(list(headerbody.lines_of(b"From: x\nSubject: Hi\tthere\n\nbody \x01 here\n")))
    assert text == b"    Hi/there//body / here/"
    assert qbiff.notice(b"joe\x7f", b"a@b", text) == b"\r\n\a*** TO <joe_> FROM <a@b>\r\n" + text + b"\r\n"
    long = qbiff.summary(list(headerbody.lines_of(b"Subject: " + b"x" * 200 + b"\n\n")))
    assert long == b"    " + b"x" * 74


def test_qbiff_terminals_from_utmp(tmp_path: Path) -> None:
    fmt = struct.Struct("<hxxi32s4s32s256shhi2i4i20s")

    def rec(t: int, line: bytes, user: bytes) -> bytes:
        return fmt.pack(t, 1, line, b"", user, b"", 0, 0, 0, 0, 0, 0, 0, 0, 0, b"")
    utmp = tmp_path / "utmp"
    utmp.write_bytes(rec(7, b"pts/1", b"joe") + rec(8, b"pts/2", b"joe") + rec(7, b"pts/3", b"bob")
                     + rec(7, b"/dev/x", b"joe") + rec(7, b"a.b", b"joe") + rec(7, b"tty4", b"joe") + b"trunc")
    assert qbiff.terminals(b"joe", str(utmp)) == [b"pts/1", b"tty4"]
    assert qbiff.terminals(b"joe", str(tmp_path / "none")) == []


def test_qbiff_program_always_exits_0(qhome: QHome) -> None:
    assert expect(tool(qhome, "qbiff", input=MESSAGE)).stdout == b""
    assert expect(tool(qhome, "qbiff", env=BASE_ENV, input=MESSAGE)).stderr == b""
    assert expect(tool(qhome, "qbiff", env={**LOCAL_ENV, "USER": "x" * 40})).stdout == b""


# --- qreceipt --------------------------------------------------------------------------------

NOTICE_MSG = (b"Message-ID: <123@example.org>\nNotice-Requested-Upon-Delivery-To: Joe <joe@test.example.com>,\n"
              b" other@x\nSubject: s\n\nbody\n")


def test_qreceipt_sends_notice(qhome: QHome, qq: Recorder) -> None:
    res = expect(tool(qhome, "qreceipt", "joe@test.example.com", env={**LOCAL_ENV, **qq.env()}, input=NOTICE_MSG))
    assert res.stderr == b"" and res.stdout == b""
    assert qq.envelope() == (b"", [b"sender@example.org"])
    assert qq.message() == (
        b"From: DELIVERY NOTICE SYSTEM <sender@example.org>\nTo: <sender@example.org>\nSubject: success notice\n\n"
        b"Hi! This is the qreceipt program. Your message was delivered to the\n"
        b"following address: joe@test.example.com. Thanks for asking.\n"
        b"Your Message-ID: <123@example.org>\n")


def test_qreceipt_quotes_the_sender(qhome: QHome, qq: Recorder) -> None:
    env = {**LOCAL_ENV, **qq.env(), "SENDER": "a b@x"}
    expect(tool(qhome, "qreceipt", "other@x", env=env, input=b"Notice-Requested-Upon-Delivery-To: other@x\n\n"))
    assert qq.message().startswith(b'From: DELIVERY NOTICE SYSTEM <"a b"@x>\nTo: <"a b"@x>\n')
    assert not qq.message().endswith(b"Your ")


@pytest.mark.parametrize("sender,msg", [
    ("sender@x", b"Subject: none\n\n"),
    ("", NOTICE_MSG),
    ("#@[]", NOTICE_MSG),
    ("sender@x", b"Notice-Requested-Upon-Delivery-To: JOE@test.example.com\n\n"),  # exact match only
    ("sender@x", b"Subject: s\n\nNotice-Requested-Upon-Delivery-To: joe@test.example.com\n"),  # in the body
])
def test_qreceipt_no_notice(qhome: QHome, qq: Recorder, sender: str, msg: bytes) -> None:
    expect(tool(qhome, "qreceipt", "joe@test.example.com", env={**LOCAL_ENV, **qq.env(), "SENDER": sender}, input=msg))
    assert not qq.queued


def test_qreceipt_errors(qhome: QHome, qq: Recorder) -> None:
    usage = b"qreceipt: usage: qreceipt deliveryaddress\n"
    assert expect(tool(qhome, "qreceipt"), 100).stderr == usage
    env = {k: v for k, v in LOCAL_ENV.items() if k != "SENDER"}
    assert expect(tool(qhome, "qreceipt", "a@b", env=env), 100).stderr == usage
    bad = b"Notice-Requested-Upon-Delivery-To: (unclosed\n\n"
    res = expect(tool(qhome, "qreceipt", "a@b", env={**LOCAL_ENV, **qq.env()}, input=bad), 100)
    assert res.stderr == b"qreceipt: fatal: unable to parse this: Notice-Requested-Upon-Delivery-To: (unclosed\n"
    res = expect(tool(qhome, "qreceipt", "joe@test.example.com", env={**LOCAL_ENV, **qq.env(31)}, input=NOTICE_MSG), 100)
    assert res.stderr == b"qreceipt: fatal: permanent qmail-queue error\n"
    res = expect(tool(qhome, "qreceipt", "joe@test.example.com", env={**LOCAL_ENV, **qq.env(53)}, input=NOTICE_MSG), 111)
    assert res.stderr == b"qreceipt: fatal: temporary qmail-queue error\n"


def test_token822_units() -> None:
    toks = rfc822.tokenize(b'Joe "Q. Public" <joe\\@x@[1.2.3.4]> (a (nested) c), b')
    assert toks is not None
    assert [kind for kind, _ in toks] == [rfc822.ATOM, rfc822.QUOTE, rfc822.LEFT, rfc822.ATOM, rfc822.AT,
                                          rfc822.LITERAL, rfc822.RIGHT, rfc822.COMMENT, rfc822.COMMA, rfc822.ATOM]
    assert toks[3][1] == b"joe@x" and toks[7][1] == b"a nested c"
    got: list[bytes] = []
    rfc822.addrlist(toks, lambda a: got.append(rfc822.unquote(a)), start=0)
    assert got == [b"b", b"joe@x@[1.2.3.4]"]
    assert rfc822.tokenize(b"a\x01b") == [(rfc822.QUOTE, b"a\x01b")]
    assert rfc822.tokenize(b"a)") == [(rfc822.QUOTE, b"a)")]
    for bad in (b")a", b"]", b"(x", b'"x', b"[x", b"x\\"[:-1] + b'"\\'):
        assert rfc822.tokenize(bad) is None


def test_qreceipt_quote_units() -> None:
    assert rfc822.quote2(b"joe@x") == b"joe@x"
    assert rfc822.quote2(b"a.b.@x") == b'"a.b."@x'
    assert rfc822.quote2(b'q"x') == b'"q\\"x"'
    assert rfc822.quote2(b"") == b""


# --- dot-forward ---------------------------------------------------------------------------

def df_home(home: QHome) -> None:
    home.control("me", "me.example.com\n")
    home.control("defaultdomain", "dd.example\n")
    home.control("plusdomain", "pd.example\n")
    home.control("defaulthost", None)


def dot_forward(home: QHome, fwd: bytes, *args: str, tmp_path: Path, qq: Recorder | None = None,
                env: dict[str, str] | None = None, code: int = 0) -> Result:
    (tmp_path / "fwd").write_bytes(fwd)
    full = {**LOCAL_ENV, "USER": "joe", "HOST": "h.example", **(qq.env(code) if qq else {}), **(env or {})}
    return tool(home, "dot-forward", *args, "fwd", env=full, stdin_file=msgfile(tmp_path), cwd=tmp_path)


# Outputs of C dot-forward 0.71 for the same files (-n).
DF_CASES = [
    (b'bob, bob@foo+, carol@x, "d e"@y.z, <f@g.h>, Joe <joe@h.example>, (c)\n# comment joe\n\n', 0,
     b"forward f@g.h\nforward d e@y.z\nforward carol@x.dd.example\nforward bob@foo.pd.example\n"
     b"forward bob@me.example.com\ndirect delivery\n"),
    (b"a, b\nc;d\ne:f\n", 99, b"forward b@me.example.com\nforward a@me.example.com\nforward d@me.example.com\n"
     b"forward c@me.example.com\nforward f@me.example.com\nforward e@me.example.com\n"),
    (b'"unterminated\n', 111, b'dot-forward: fatal: unable to parse this line: "unterminated\n\n'),
    (b"<a@b\n", 99, b"forward <a@b.dd.example\n"),
    (b"x <>\n", 0, b"skipping empty file fwd\ndirect delivery\n"),
    (b"x@y", 99, b"forward x@y.dd.example\n"),
    (b"#only\n", 0, b"skipping empty file fwd\ndirect delivery\n"),
    (b"", 0, b"skipping empty file fwd\ndirect delivery\n"),
    (b"/tmp/file\n", 111, b"dot-forward: fatal: file delivery /tmp/file not supported\n"),
    (b"\\joe\n", 0, b"direct delivery\n"),
    (b"JOE@H.EXAMPLE\n", 0, b"direct delivery\n"),
    (b'joe, "|cat > piped; exit 0", bob@x.y (c) \n', 0, b"forward bob@x.y\npipe through cat > piped; exit 0\n"
     b"direct delivery\n"),
]


@pytest.mark.parametrize("fwd,code,err", DF_CASES)
def test_dot_forward_n_matches_c(qhome: QHome, tmp_path: Path, fwd: bytes, code: int, err: bytes) -> None:
    df_home(qhome)
    res = expect(dot_forward(qhome, fwd, "-n", tmp_path=tmp_path), code)
    assert res.stderr == err and res.stdout == b""


def test_dot_forward_forwards_and_pipes(qhome: QHome, tmp_path: Path, qq: Recorder) -> None:
    df_home(qhome)
    res = expect(dot_forward(qhome, b'bob@x.y, "|cat > piped; exit 0", carl\n', tmp_path=tmp_path, qq=qq), 99)
    assert res.stderr == b"dot-forward: info: qp " + qq.pid() + b"\n"
    assert (tmp_path / "piped").read_bytes() == PRELINES + MESSAGE
    assert qq.envelope() == (b"newsender@example.org", [b"carl@me.example.com", b"bob@x.y"])
    assert qq.message() == LOCAL_ENV["DTLINE"].encode() + MESSAGE


def test_dot_forward_direct_delivery_exits_0_after_forwarding(qhome: QHome, tmp_path: Path, qq: Recorder) -> None:
    df_home(qhome)
    expect(dot_forward(qhome, b"joe, bob@x.y\n", tmp_path=tmp_path, qq=qq), 0)
    assert qq.envelope()[1] == [b"bob@x.y"]


@pytest.mark.parametrize("cmd,code,err", [
    ("exit 100", 100, b""), ("exit 64", 100, b""), ("exit 3", 111, b""), ("exit 111", 111, b""),
    ("kill -9 $$", 111, b"dot-forward: fatal: child crashed\n"),
])
def test_dot_forward_command_failures(qhome: QHome, tmp_path: Path, cmd: str, code: int, err: bytes) -> None:
    df_home(qhome)
    res = expect(dot_forward(qhome, f'"|{cmd}"\n'.encode(), tmp_path=tmp_path), code)
    assert res.stderr == err


@pytest.mark.parametrize("qcode,exit,text", [
    (31, 100, b"mail server permanently rejected message (#5.3.0)"),
    (53, 111, b"qq write error or disk full (#4.3.0)"),
])
def test_dot_forward_queue_failures(qhome: QHome, tmp_path: Path, qq: Recorder, qcode: int, exit: int, text: bytes) -> None:
    df_home(qhome)
    res = expect(dot_forward(qhome, b"bob@x.y\n", tmp_path=tmp_path, qq=qq, code=qcode), exit)
    assert res.stderr == b"dot-forward: fatal: unable to forward message: " + text + b"\n"


def test_dot_forward_files_and_usage(qhome: QHome, tmp_path: Path) -> None:
    df_home(qhome)
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "fwd2").write_bytes(b"x@y.z\n")
    res = expect(tool(qhome, "dot-forward", "-n", "missing", "empty", "fwd2", cwd=tmp_path), 99)
    assert res.stderr == b"skipping empty file empty\nforward x@y.z\n"
    res = expect(tool(qhome, "dot-forward", "-n", "missing", cwd=tmp_path), 0)
    assert res.stderr == b"direct delivery\n"
    res = expect(tool(qhome, "dot-forward", "-x", "fwd2", cwd=tmp_path), 100)
    assert res.stderr == b"dot-forward: illegal option -- x\ndot-forward: usage: dot-forward [ -nN ] file ...\n"
    res = expect(tool(qhome, "dot-forward", "-n", ".", cwd=tmp_path), 111)
    assert res.stderr == b"dot-forward: fatal: unable to read .: is a directory\n"
    res = expect(tool(qhome, "dot-forward", "-n", "fwd2", env={**LOCAL_ENV, "QMAILHOME": "/nonexistent"}, cwd=tmp_path), 111)
    assert res.stderr == b"dot-forward: fatal: unable to chdir to /nonexistent: file does not exist\n"


def test_dot_forward_without_control_me(qhome: QHome, tmp_path: Path) -> None:
    for name in ("me", "defaultdomain", "plusdomain", "defaulthost"):
        qhome.control(name, None)
    res = expect(dot_forward(qhome, b"bob, x@y+\n", "-n", tmp_path=tmp_path), 99)
    assert res.stderr == b"forward x@y.me\nforward bob@me.me\n"


def test_dot_forward_hostile_lines(qhome: QHome, tmp_path: Path) -> None:
    df_home(qhome)
    res = expect(dot_forward(qhome, b"a\0b@c\n" + b"x" * 100000 + b"@y.z\n", "-n", tmp_path=tmp_path), 99)
    assert res.stderr == b"forward a\nforward " + b"x" * 100000 + b"@y.z\n"
    res = expect(dot_forward(qhome, b"<a@b>>\n", "-n", tmp_path=tmp_path), 99)
    assert res.stderr == b"forward a@b>.dd.example\n"
