"""qmail-inject(8) and qmail-header(5): header rewriting, queueing, exit codes and messages.

Programs run as processes through QMAILHOME/bin/qmail-inject; the header
cases are the table in inject_cases.py.
"""

from __future__ import annotations

import calendar
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import QHome, Result, make_home
from inject_cases import CASES, FQDN, Case
from queuefmt import RECEIVED, files, parse_todo

from pyqmail import rfc822
from pyqmail.inject import header as hdr

BASE_ENV = {"PATH": "/usr/bin:/bin", "QMAILUSER": "joe"}
FATAL = b"qmail-inject: fatal: "


@pytest.fixture(scope="module")
def home() -> Iterator[QHome]:
    """One home for silverton.berkeley.edu, shared by the read-only cases."""
    h = make_home(FQDN)
    yield h
    shutil.rmtree(h.path.parent, ignore_errors=True)


class Run:
    """One finished qmail-inject: its result, pid and the seconds it ran within."""

    def __init__(self, res: Result, pid: int, t0: int, t1: int) -> None:
        self.res = res
        self.pid = pid
        self.t0 = t0
        self.t1 = t1

    def fill(self, expected: bytes, idhost: bytes = FQDN.encode()) -> list[bytes]:
        """Return expected with {DATE}/{MSGID} filled in for each second the run may have seen."""
        if b"{" not in expected:
            return [expected]
        out = []
        for t in range(self.t0, self.t1 + 1):
            out.append(expected.replace(b"{DATE}", hdr.date_field(t))
                       .replace(b"{MSGID}", hdr.msgid_field(t, self.pid, idhost)))
        return out


def inject(h: QHome, stdin: bytes = b"", args: tuple[str, ...] | list[str] = (),
           env: dict[str, str | None] | None = None, base: dict[str, str] | None = None,
           prog: str = "qmail-inject", cwd: str | os.PathLike[str] | None = None,
           stdin_fd: int | None = None) -> Run:
    """Run qmail-inject from home h with env added to BASE_ENV (None unsets)."""
    full = dict(BASE_ENV if base is None else base)
    for k, v in (env or {}).items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    argv = [os.fspath(h.bin(prog)), *args]
    t0 = int(time.time())
    p = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin_fd is None else stdin_fd,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full, cwd=cwd)
    out, err = p.communicate(None if stdin_fd is not None else stdin, timeout=120)
    t1 = int(time.time())
    return Run(Result(argv, p.returncode, out, err), p.pid, t0, t1)


def check(run: Run, code: int, stdout: bytes | list[bytes], stderr: bytes = b"") -> None:
    res = run.res
    assert res.returncode == code, res.explain()
    assert res.stderr == stderr, res.explain()
    wanted = stdout if isinstance(stdout, list) else [stdout]
    assert res.stdout in wanted, f"{res.explain()}\nwanted: {wanted[0]!r}"


# --- the table of header cases -----------------------------------------------------------

def test_table_has_enough_cases() -> None:
    assert len(CASES) >= 60
    assert len({c.name for c in CASES}) == len(CASES), "case names must be unique"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_header_case(home: QHome, case: Case) -> None:
    run = inject(home, case.stdin, ("-n", *case.args), case.env)
    check(run, case.code, run.fill(case.stdout), case.stderr)


# --- pure units: tokens, folding, quoting, stamps -----------------------------------------

def test_tokenize_kinds() -> None:
    toks = rfc822.tokenize(b'a "q\\"x" [1.2] (c (d)) , @ . < > ; :')
    assert toks == [(rfc822.ATOM, b"a"), (rfc822.QUOTE, b'q"x'), (rfc822.LITERAL, b"1.2"),
                    (rfc822.COMMENT, b"c d"), (rfc822.COMMA, b""), (rfc822.AT, b""), (rfc822.DOT, b""),
                    (rfc822.LEFT, b""), (rfc822.RIGHT, b""), (rfc822.SEMI, b""), (rfc822.COLON, b"")]


@pytest.mark.parametrize("text", [b'"abc', b"(abc", b"[abc", b'"abc\\', b")", b"]", b"a ]", b"((a)"])
def test_tokenize_failures(text: bytes) -> None:
    assert rfc822.tokenize(text) is None


def test_atoms_with_unprintable_bytes_become_quoted() -> None:
    assert rfc822.tokenize(b"a\x01b c\x80 d]e f\\\\g") == [
        (rfc822.QUOTE, b"a\x01b"), (rfc822.QUOTE, b"c\x80"), (rfc822.QUOTE, b"d]e"), (rfc822.QUOTE, b"f\\g")]
    assert rfc822.tokenize(b"ab\\") == [(rfc822.ATOM, b"ab")]  # a trailing backslash is dropped
    assert rfc822.tokenize(b"a\\ b") == [(rfc822.ATOM, b"a b")]


def test_unparse_escapes_and_spacing() -> None:
    toks = [(rfc822.ATOM, b"To"), (rfc822.COLON, b""), (rfc822.QUOTE, b'a"(b)'), (rfc822.LEFT, b""),
            (rfc822.ATOM, b"x"), (rfc822.AT, b""), (rfc822.LITERAL, b"1]"), (rfc822.RIGHT, b""),
            (rfc822.COMMENT, b"c\n")]
    assert rfc822.unparse(toks) == b'To: "a\\"\\(b\\)" <x@[1\\]]>(c\\\n)\n'


def test_unparse_without_limit_keeps_one_line() -> None:
    toks = rfc822.tokenize(b"To: " + b", ".join([b"x" * 50] * 4))
    assert toks is not None
    assert rfc822.unparse(toks, 0) == b"To: " + b", ".join([b"x" * 50] * 4) + b"\n"


def test_addrlist_calls_back_right_to_left() -> None:
    seen: list[bytes] = []
    toks = rfc822.tokenize(b"To: a, b <c>, g: d, e;, f")
    assert toks is not None
    out = rfc822.addrlist(toks, lambda addr: seen.append(rfc822.unquote(addr)))
    assert seen == [b"f", b"e", b"d", b"c", b"a"]
    assert out is not None and rfc822.unparse(out) == b"To: a, b <c>, g: d, e;, f\n"


@pytest.mark.parametrize("box,needed", [
    (b"", True), (b"joe", False), (b"j.oe", False), (b".joe", True), (b"joe.", True), (b"j..oe", True),
    (b"j oe", True), (b"j@oe", True), (b"j\x80", True), (b"a+b-c=d", False), (b"a\x7f", True),
    (b"a/b!#$%&'*?^_`{|}~", False),
])
def test_quote_need(box: bytes, needed: bool) -> None:
    assert rfc822.quote_need(box) is needed


def test_quote2_quotes_the_part_before_the_last_at() -> None:
    assert rfc822.quote2(b"") == b""
    assert rfc822.quote2(b"a@b@c") == b'"a@b"@c'
    assert rfc822.quote2(b'x"y\\z\r\n@h') == b'"x\\"y\\\\z\\\r\\\n"@h'
    assert rfc822.quote2(b"plain@h") == b"plain@h"


def test_stamps_in_qmails_format() -> None:
    when = calendar.timegm((1995, 9, 26, 4, 46, 53, 0, 0, 0))
    assert hdr.date_field(when) == b"Date: 26 Sep 1995 04:46:53 -0000\n"
    assert hdr.msgid_field(when, 12345, b"silverton.berkeley.edu") == (
        b"Message-ID: <19950926044653.12345.qmail@silverton.berkeley.edu>\n")
    assert hdr.date_field(calendar.timegm((2001, 1, 2, 3, 4, 5, 0, 0, 0))) == b"Date: 2 Jan 2001 03:04:05 -0000\n"


@pytest.mark.parametrize("line,valid", [
    (b"Subject: x\n", True), (b"X-A.b_c: y\n", True), (b"Subject \t: x\n", True), (b": x\n", False),
    (b" x: y\n", False), (b"a b: c\n", False), (b"a\x7f: b\n", False), (b"\xe9: b\n", False), (b"nocolon\n", False),
])
def test_field_valid(line: bytes, valid: bool) -> None:
    assert hdr.field_valid(line) is valid


# --- generated fields, controls and environment ------------------------------------------

def test_date_and_message_id_are_made_when_missing(home: QHome) -> None:
    run = inject(home, b"To: a@b.c\n", ("-n",))
    want = run.fill(b"Return-Path: <joe@silverton.berkeley.edu>\n{DATE}{MSGID}"
                    b"From: joe@silverton.berkeley.edu\nTo: a@b.c\n")
    check(run, 0, want)


def test_resent_date_and_message_id_are_made(home: QHome) -> None:
    run = inject(home, b"Date: x\nMessage-ID: <y>\nFrom: a@b.c\nResent-To: d@e.f\n", ("-n",))
    want = []
    for t in range(run.t0, run.t1 + 1):
        want.append(b"Return-Path: <joe@silverton.berkeley.edu>\n"
                    + b"Resent-" + hdr.date_field(t) + b"Resent-" + hdr.msgid_field(t, run.pid, FQDN.encode())
                    + b"Resent-From: joe@silverton.berkeley.edu\n"
                    + b"Date: x\nMessage-ID: <y>\nFrom: a@b.c\nResent-To: d@e.f\n")
    check(run, 0, want)


def test_qmailinject_i_replaces_message_id(home: QHome) -> None:
    run = inject(home, b"Date: x\nMessage-ID: <old@x>\nTo: a@b.c\n", ("-n",), {"QMAILINJECT": "i"})
    check(run, 0, run.fill(b"Return-Path: <joe@silverton.berkeley.edu>\n{MSGID}"
                           b"From: joe@silverton.berkeley.edu\nDate: x\nTo: a@b.c\n"))


def test_per_message_verp(home: QHome) -> None:
    run = inject(home, b"Date: x\nMessage-ID: <y>\nTo: a@b.c\n", ("-n",), {"QMAILINJECT": "m"})
    want = [b"Return-Path: <joe-%d.%d@silverton.berkeley.edu>\n" % (t, run.pid)
            + b"From: joe@silverton.berkeley.edu\nDate: x\nMessage-ID: <y>\nTo: a@b.c\n"
            for t in range(run.t0, run.t1 + 1)]
    check(run, 0, want)


def test_per_message_and_per_recipient_verp(home: QHome) -> None:
    run = inject(home, b"Date: x\nMessage-ID: <y>\nTo: a@b.c\n", ("-n",), {"QMAILINJECT": "mr"})
    want = [b'Return-Path: <"joe-%d.%d-@silverton.berkeley.edu-"@[]>\n' % (t, run.pid)
            + b"From: joe@silverton.berkeley.edu\nDate: x\nMessage-ID: <y>\nTo: a@b.c\n"
            for t in range(run.t0, run.t1 + 1)]
    check(run, 0, want)


DATED = b"Date: x\nMessage-ID: <y>\nTo: a, b@c+, d@e\n"


def test_control_files_defaulthost_defaultdomain_plusdomain_idhost(qhome: QHome) -> None:
    qhome.control("defaulthost", "dh\n")
    qhome.control("defaultdomain", "dd.example  \n")
    qhome.control("plusdomain", "pd.example\n")
    qhome.control("idhost", "id.example\n")
    run = inject(qhome, DATED, ("-n",))
    check(run, 0, b"Return-Path: <joe@dh.dd.example>\nFrom: joe@dh.dd.example\n"
                  b"Date: x\nMessage-ID: <y>\nTo: a@dh.dd.example, b@c.pd.example, d@e.dd.example\n")
    run = inject(qhome, b"To: a@b.c\n", ("-n",))
    check(run, 0, run.fill(b"Return-Path: <joe@dh.dd.example>\n{DATE}{MSGID}From: joe@dh.dd.example\n"
                           b"To: a@b.c\n", b"id.example"))


def test_environment_overrides_controls(qhome: QHome) -> None:
    qhome.control("defaulthost", "dh\n")
    env = {"QMAILDEFAULTHOST": "eh+", "QMAILDEFAULTDOMAIN": "ed.example", "QMAILPLUSDOMAIN": "ep.example",
           "QMAILIDHOST": "ei.example"}
    run = inject(qhome, DATED, ("-n",), env)
    check(run, 0, b"Return-Path: <joe@eh.ep.example>\nFrom: joe@eh.ep.example\n"
                  b"Date: x\nMessage-ID: <y>\nTo: a@eh.ep.example, b@c.ep.example, d@e.ed.example\n")
    run = inject(qhome, b"To: a@b.c\n", ("-n",), env)
    check(run, 0, run.fill(b"Return-Path: <joe@eh.ep.example>\n{DATE}{MSGID}From: joe@eh.ep.example\n"
                           b"To: a@b.c\n", b"ei.example"))


def test_without_me_the_literal_names(qhome: QHome) -> None:
    for name in ("me", "defaultdomain", "plusdomain", "defaulthost", "idhost"):
        qhome.control(name, None)
    run = inject(qhome, b"To: a, b@c+\n", ("-n",))
    check(run, 0, run.fill(b"Return-Path: <joe@defaulthost.defaultdomain>\n{DATE}{MSGID}"
                           b"From: joe@defaulthost.defaultdomain\n"
                           b"To: a@defaulthost.defaultdomain, b@c.plusdomain\n", b"idhost"))


def test_empty_control_file_is_an_empty_value(qhome: QHome) -> None:
    qhome.control("defaultdomain", "")
    run = inject(qhome, b"Date: x\nMessage-ID: <y>\nTo: a@b\n", ("-n",))
    check(run, 0, b"Return-Path: <joe@test.example.com>\nFrom: joe@test.example.com\n"
                  b"Date: x\nMessage-ID: <y>\nTo: a@b.\n")


# --- Mail-Followup-To ----------------------------------------------------------------------

MFT_IN = b"Date: x\nMessage-ID: <y>\nFrom: me@x.y\nTo: list@Example.COM, bob@x.y\nCc: carol@z.w\n"


def test_mail_followup_to_added_for_a_listed_address(home: QHome, tmp_path: Path) -> None:
    (tmp_path / "mft").write_bytes(b"# my lists\n\nother@example.com\nLIST@example.com \t\n")
    run = inject(home, MFT_IN, ("-n",), {"QMAILMFTFILE": "mft"}, cwd=tmp_path)
    check(run, 0, b"Return-Path: <joe@silverton.berkeley.edu>\n"
                  b"Mail-Followup-To: carol@z.w,\n  list@Example.COM,\n  bob@x.y\n" + MFT_IN)


def test_mail_followup_to_quotes_local_parts(home: QHome, tmp_path: Path) -> None:
    (tmp_path / "mft").write_bytes(b"l@x.y\n")
    stdin = b'Date: x\nMessage-ID: <y>\nFrom: me@x.y\nTo: l@x.y, "a b"@c.d\n'
    run = inject(home, stdin, ("-n",), {"QMAILMFTFILE": str(tmp_path / "mft")})
    check(run, 0, b"Return-Path: <joe@silverton.berkeley.edu>\n"
                  b'Mail-Followup-To: l@x.y,\n  "a b"@c.d\n' + stdin)


@pytest.mark.parametrize("mft,stdin", [
    (b"nobody@x.y\n", MFT_IN),
    (b"list@example.com\n", MFT_IN + b"Mail-Followup-To: me@x.y\n"),
    (None, MFT_IN),
    (b"list@example.com\n", b"Date: x\nMessage-ID: <y>\nFrom: me@x.y\nBcc: list@example.com\nTo: a@b.c\n"),
])
def test_mail_followup_to_not_added(home: QHome, tmp_path: Path, mft: bytes | None, stdin: bytes) -> None:
    if mft is not None:
        (tmp_path / "mft").write_bytes(mft)
    run = inject(home, stdin, ("-n",), {"QMAILMFTFILE": str(tmp_path / "mft")})
    check(run, 0, b"Return-Path: <joe@silverton.berkeley.edu>\n" + stdin.replace(b"Bcc: list@example.com\n", b""))


def test_mail_followup_to_not_added_when_resent(home: QHome, tmp_path: Path) -> None:
    (tmp_path / "mft").write_bytes(b"list@example.com\n")
    stdin = MFT_IN + b"Resent-Date: x\nResent-Message-ID: <z>\nResent-From: a@b.c\nResent-To: d@e.f\n"
    run = inject(home, stdin, ("-n",), {"QMAILMFTFILE": str(tmp_path / "mft")})
    check(run, 0, b"Return-Path: <joe@silverton.berkeley.edu>\n" + stdin)


# --- big and hostile input --------------------------------------------------------------------

def test_ten_thousand_recipients(home: QHome) -> None:
    boxes = [b"u%05d@example.com" % i for i in range(10000)]
    stdin = b"Date: x\nMessage-ID: <y>\nTo: " + b", ".join(boxes) + b"\n\nbody\n"
    run = inject(home, stdin, ("-n",))
    lines = [b", ".join(boxes[i:i + 3]) for i in range(0, len(boxes), 3)]
    check(run, 0, b"Return-Path: <joe@silverton.berkeley.edu>\nFrom: joe@silverton.berkeley.edu\n"
                  b"Date: x\nMessage-ID: <y>\nTo: " + b",\n  ".join(lines) + b"\n\nbody\n")


def test_one_megabyte_header_lines(home: QHome) -> None:
    subject = b"Subject: " + b"s" * (1 << 20) + b"\n"
    to = b"To: " + b"a" * (1 << 20) + b"@b.c\n"
    stdin = b"Date: x\nMessage-ID: <y>\n" + subject + to + b"\nbody\n"
    run = inject(home, stdin, ("-n",))
    check(run, 0, b"Return-Path: <joe@silverton.berkeley.edu>\nFrom: joe@silverton.berkeley.edu\n" + stdin)


def test_one_megabyte_body_without_newlines(home: QHome) -> None:
    body = bytes(range(256)).replace(b"\n", b"") * 4096
    stdin = b"Date: x\nMessage-ID: <y>\nTo: a@b.c\n\n" + body
    run = inject(home, stdin, ("-n",))
    check(run, 0, b"Return-Path: <joe@silverton.berkeley.edu>\nFrom: joe@silverton.berkeley.edu\n"
          + stdin + b"\n")


def test_stdout_closed_is_not_an_error(home: QHome) -> None:
    argv = [os.fspath(home.bin("qmail-inject")), "-n"]
    p = subprocess.run(argv, input=b"To: a@b.c\n\n" + b"x" * 200000 + b"\n", stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, env=BASE_ENV, timeout=60)
    assert p.returncode == 0
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run(argv, input=b"To: a@b.c\n\nbody\n", stdout=w, stderr=subprocess.PIPE, env=BASE_ENV,
                           timeout=60)
    finally:
        os.close(w)
    assert (p.returncode, p.stderr) == (0, b"")


# --- queueing for real ----------------------------------------------------------------------------

def queued(h: QHome) -> list[tuple[bytes, list[bytes], bytes]]:
    """Return (sender, recipients, message after the Received line) for each queued message."""
    out = []
    for name in files(h.queue)["todo"]:
        num = int(name)
        env = parse_todo((h.queue / "todo" / name).read_bytes())
        mess = (h.queue / "mess" / str(num % 23) / name).read_bytes()
        m = RECEIVED.match(mess)
        assert m, mess[:200]
        assert m.group(2) == f"invoked by uid {os.getuid()}".encode()
        out.append((env.sender, env.recipients, mess[m.end():]))
    return out


def test_queued_envelope_and_message(qhome: QHome) -> None:
    stdin = b"Date: x\nMessage-ID: <y>\nTo: a, b@c.d\nCc: e@f.g\nBcc: h@i.j\nApparently-To: k@l.m\n\nbody\n"
    run = inject(qhome, stdin)
    check(run, 0, b"")
    ((sender, rcpts, mess),) = queued(qhome)
    assert sender == b"joe@test.example.com"
    # qmail reads each address list from right to left.
    assert rcpts == [b"b@c.d", b"a@test.example.com", b"e@f.g", b"h@i.j", b"k@l.m"]
    assert mess == (b"From: joe@test.example.com\nDate: x\nMessage-ID: <y>\nTo: a@test.example.com, b@c.d\n"
                    b"Cc: e@f.g\nApparently-To: k@l.m\n\nbody\n")


def test_queued_message_has_generated_fields(qhome: QHome) -> None:
    run = inject(qhome, b"Subject: s\n\nbody\n", ("x@y.z",))
    check(run, 0, b"")
    ((sender, rcpts, mess),) = queued(qhome)
    assert (sender, rcpts) == (b"joe@test.example.com", [b"x@y.z"])
    assert mess in run.fill(b"{DATE}{MSGID}From: joe@test.example.com\nCc: recipient list not shown: ;\n"
                            b"Subject: s\n\nbody\n", b"test.example.com")


STRATEGY_IN = b"To: t@x.y\nBcc: b@x.y\n\n"


@pytest.mark.parametrize("args,rcpts", [
    ((), [b"t@x.y", b"b@x.y"]),
    (("-A",), [b"t@x.y", b"b@x.y"]),
    (("r@x.y", "s"), [b"r@x.y", b"s@test.example.com"]),
    (("-A", "r@x.y"), [b"r@x.y"]),
    (("-a", "r@x.y"), [b"r@x.y"]),
    (("-a",), []),
    (("-h", "r@x.y"), [b"t@x.y", b"b@x.y"]),
    (("-h", "r@x.y(bad"), [b"t@x.y", b"b@x.y"]),  # -h does not even parse the arguments
    (("-H", "r@x.y"), [b"r@x.y", b"t@x.y", b"b@x.y"]),
    (("-H",), [b"t@x.y", b"b@x.y"]),
    (("-a", "-h", "r@x.y"), [b"t@x.y", b"b@x.y"]),
    (("-h", "-A", "r@x.y"), [b"r@x.y"]),
    (("-n", "-N", "r@x.y"), [b"r@x.y"]),
    (("--", "-r@x.y"), [b"-r@x.y"]),
])
def test_recipient_strategies(qhome: QHome, args: tuple[str, ...], rcpts: list[bytes]) -> None:
    run = inject(qhome, STRATEGY_IN, args)
    check(run, 0, b"")
    ((_, got, _),) = queued(qhome)
    assert got == rcpts


def test_resent_recipients_replace_header_recipients(qhome: QHome) -> None:
    stdin = b"To: t@x.y\nResent-To: rt@x.y\nResent-Cc: rc1@x.y, rc2@x.y\nResent-Bcc: rb@x.y\n\n"
    check(inject(qhome, stdin), 0, b"")
    ((_, got, mess),) = queued(qhome)
    assert got == [b"rt@x.y", b"rc2@x.y", b"rc1@x.y", b"rb@x.y"]
    assert b"Resent-Bcc" not in mess and b"Resent-From: joe@test.example.com\n" in mess


def test_argument_recipients_are_rewritten(qhome: QHome) -> None:
    args = ("joe", "eric@mammoth+", "x y", "<@r.s:a@b.c>", "d@e.", "@", "foo@[]", "")
    check(inject(qhome, b"\n", args), 0, b"")
    ((_, got, _),) = queued(qhome)
    # Each argument is quoted as a local part before it is parsed: "<@r.s:a" is one quoted word.
    assert got == [b"joe@test.example.com", b"eric@mammoth.example.com", b"x y@test.example.com",
                   b"<@r.s:a@b.c>", b"d@e.example.com", b"@test.example.com", b"foo@[]", b""]


def test_sender_from_option_header_and_environment(qhome: QHome) -> None:
    check(inject(qhome, b"Return-Path: <rp@x.y>\n\n", ("-f", "opt@x.y", "r@x.y")), 0, b"")
    check(inject(qhome, b"Return-Path: <rp@x.y>\n\n", ("r@x.y",)), 0, b"")
    check(inject(qhome, b"\n", ("r@x.y",), {"QMAILSUSER": "su", "QMAILSHOST": "sh.x.y"}), 0, b"")
    check(inject(qhome, b"\n", ("r@x.y",), {"QMAILINJECT": "r"}), 0, b"")
    check(inject(qhome, b"\n", ("-f", "", "r@x.y")), 0, b"")
    senders = sorted(s for s, _, _ in queued(qhome))
    assert senders == sorted([b"opt@x.y", b"rp@x.y", b"su@sh.x.y", b"joe-@test.example.com-@[]", b""])


def test_nul_in_an_address_ends_it_in_the_envelope(qhome: QHome) -> None:
    check(inject(qhome, b"To: a\0b@c.d\nReturn-Path: <s\0t@u.v>\n\n"), 0, b"")
    ((sender, got, mess),) = queued(qhome)
    assert (sender, got) == (b"s", [b"a"])
    assert b'To: "a\0b"@c.d\n' in mess


def test_ten_thousand_recipients_queued(qhome: QHome) -> None:
    boxes = [b"u%05d@example.com" % i for i in range(10000)]
    check(inject(qhome, b"To: " + b", ".join(boxes) + b"\n\nbody\n"), 0, b"")
    ((_, got, _),) = queued(qhome)
    assert got == boxes[::-1]


def test_queue_program_from_qmailqueue(qhome: QHome, tmp_path: Path) -> None:
    fake = tmp_path / "fake-queue"
    fake.write_text(f"#!/bin/sh\ncat > {tmp_path}/msg; cat <&1 > {tmp_path}/env\n")
    fake.chmod(0o755)
    run = inject(qhome, b"Date: x\nMessage-ID: <y>\nTo: a@b.c\n\nbody\n", ("-f", "s@x.y"),
                 {"QMAILQUEUE": str(fake)})
    check(run, 0, b"")
    assert (tmp_path / "msg").read_bytes() == (b"From: joe@test.example.com\nDate: x\nMessage-ID: <y>\n"
                                               b"To: a@b.c\n\nbody\n")
    assert (tmp_path / "env").read_bytes() == b"Fs@x.y\0Ta@b.c\0\0"
    assert files(qhome.queue)["todo"] == []


# --- exit codes and error messages ----------------------------------------------------------------

def script(tmp_path: Path, body: str) -> str:
    p = tmp_path / "qq"
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755)
    return str(p)


@pytest.mark.parametrize("body,code,text", [
    ("exit 0", 0, b""),
    ("exit 11", 100, b"envelope address too long for qq (#5.1.3)"),
    ("exit 31", 100, b"mail server permanently rejected message (#5.3.0)"),
    ("exit 12", 100, b"qq permanent problem (#5.3.0)"),
    ("exit 51", 111, b"qq out of memory (#4.3.0)"),
    ("exit 52", 111, b"qq timeout (#4.3.0)"),
    ("exit 53", 111, b"qq write error or disk full (#4.3.0)"),
    ("exit 54", 111, b"qq read error (#4.3.0)"),
    ("exit 55", 111, b"qq unable to read configuration (#4.3.0)"),
    ("exit 56", 111, b"qq trouble making network connection (#4.3.0)"),
    ("exit 61", 111, b"qq trouble in home directory (#4.3.0)"),
    ("exit 62", 111, b"qq trouble creating files in queue (#4.3.0)"),
    ("exit 71", 111, b"mail server temporarily rejected message (#4.3.0)"),
    ("exit 72", 111, b"connection to mail server timed out (#4.4.1)"),
    ("exit 73", 111, b"connection to mail server rejected (#4.4.1)"),
    ("exit 74", 111, b"communication with mail server failed (#4.4.2)"),
    ("exit 81", 111, b"qq internal bug (#4.3.0)"),
    ("exit 1", 111, b"qq temporary problem (#4.3.0)"),
    ("printf 'Dno thanks (#5.7.1)' >&6; exit 82", 100, b"no thanks (#5.7.1)"),
    ("printf 'Zlater (#4.3.0)' >&6; exit 82", 111, b"later (#4.3.0)"),
    ("printf 'Dx' >&6; exit 82", 111, b"qq temporary problem (#4.3.0)"),  # 2 bytes: not used (notqmail)
    ("printf 'Xyz' >&6; exit 82", 111, b"yz"),
    ("kill -9 $$", 111, b"qq crashed (#4.3.0)"),
])
def test_queue_failures(home: QHome, tmp_path: Path, body: str, code: int, text: bytes) -> None:
    run = inject(home, b"To: a@b.c\n\nbody\n", env={"QMAILQUEUE": script(tmp_path, "cat >/dev/null; " + body)})
    check(run, code, b"", FATAL + text + b"\n" if text else b"")


def test_queue_program_missing(home: QHome, tmp_path: Path) -> None:
    run = inject(home, b"To: a@b.c\n\nbody\n", env={"QMAILQUEUE": str(tmp_path / "nothing")})
    check(run, 111, b"", FATAL + b"unable to exec qq (#4.3.0)\n")


def test_no_descriptors_for_qmail_queue(home: QHome) -> None:
    import resource

    argv = [os.fspath(home.bin("qmail-inject")), "r@x.y"]
    p = subprocess.run(argv, input=b"To: a@b.c\n\nbody\n", capture_output=True, env=BASE_ENV, timeout=60,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (6, 6)))
    assert (p.returncode, p.stdout, p.stderr) == (111, b"", FATAL + b"unable to run qmail-queue\n")


def test_queue_program_that_stops_reading(home: QHome, tmp_path: Path) -> None:
    run = inject(home, b"To: a@b.c\n\n" + b"x" * 1000000 + b"\n", env={"QMAILQUEUE": script(tmp_path, "exit 0")})
    check(run, 111, b"", FATAL + b"qq read error (#4.3.0)\n")


def test_illegal_option(home: QHome) -> None:
    check(inject(home, b"", ("-x",)), 100, b"", b"qmail-inject: illegal option -- x\n")
    check(inject(home, b"", ("-nZ",)), 100, b"", b"qmail-inject: illegal option -- Z\n")


def test_option_missing_its_argument(home: QHome) -> None:
    check(inject(home, b"", ("-f",)), 100, b"", b"qmail-inject: option requires an argument -- f\n")


def test_unparseable_sender_option(home: QHome) -> None:
    check(inject(home, b"", ("-f", "x@y(z")), 100, b"", FATAL + b"unable to parse this line:\nx@y(z")


def test_unparseable_recipient_argument(home: QHome) -> None:
    check(inject(home, b"", ("ok@x.y", "x@y(z")), 100, b"", FATAL + b"unable to parse address: x@y(z\n")
    check(inject(home, b"", ("-a", "x@[y")), 100, b"", FATAL + b"unable to parse address: x@[y\n")


@pytest.mark.parametrize("name,env,value,shown", [
    ("defaultdomain", "QMAILDEFAULTDOMAIN", "a(b", b".a(b"),
    ("defaulthost", "QMAILDEFAULTHOST", "a[b", b"@a[b"),
    ("plusdomain", "QMAILPLUSDOMAIN", "a\"b", b".a\"b"),
])
def test_unparseable_control(qhome: QHome, name: str, env: str, value: str, shown: bytes) -> None:
    qhome.control(name, value + "\n")
    check(inject(qhome, b"To: a@b.c\n", ("-n",)), 100, b"", FATAL + b"unable to parse this line:\n" + shown)
    qhome.control(name, "fine\n")
    check(inject(qhome, b"To: a@b.c\n", ("-n",), {env: value}), 100, b"",
          FATAL + b"unable to parse this line:\n" + shown)


def test_unparseable_default_from(home: QHome) -> None:
    run = inject(home, b"Date: x\nMessage-ID: <y>\nTo: a@b.c\n", ("-n", "-f", "s@x.y"), {"QMAILHOST": "h:x"})
    check(run, 100, b"", FATAL + b"unable to parse this line:\nFrom: joe@h:x\n")


def test_unparseable_default_return_path(home: QHome) -> None:
    run = inject(home, b"To: a@b.c\n", ("-n",), {"QMAILSHOST": "h:x"})
    check(run, 100, b"", FATAL + b'unable to parse this line:\nReturn-Path: "joe"@h:x\n')


@pytest.mark.parametrize("name", ["me", "defaultdomain", "defaulthost", "plusdomain", "idhost"])
def test_unreadable_control_is_a_read_error(qhome: QHome, name: str) -> None:
    p = qhome.path / "control" / name
    p.unlink(missing_ok=True)
    p.mkdir()
    check(inject(qhome, b"To: a@b.c\n", ("-n",), {"QMAILDEFAULTDOMAIN": "x.y"}), 111, b"", FATAL + b"read error\n")


def test_unreadable_mft_file_is_a_read_error(home: QHome, tmp_path: Path) -> None:
    check(inject(home, b"To: a@b.c\n", ("-n",), {"QMAILMFTFILE": str(tmp_path)}), 111, b"",
          FATAL + b"read error\n")


def test_unreadable_input_is_a_read_error(home: QHome, tmp_path: Path) -> None:
    # Descriptor 0 open for writing only: reading it fails. (Python itself
    # refuses to start with a directory on descriptor 0.)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        run = inject(home, args=("-n",), stdin_fd=fd)
    finally:
        os.close(fd)
    check(run, 111, b"", FATAL + b"read error\n")


def test_missing_home_is_internal_bug(home: QHome) -> None:
    check(inject(home, b"", ("-n",), {"QMAILHOME": "/nonexistent/qmail"}), 111, b"", FATAL + b"internal bug\n")


def test_no_output_before_a_fatal_error(home: QHome) -> None:
    stdin = b"Date: x\nMessage-ID: <y>\nSubject: " + b"s" * 100000 + b"\nTo: a>\n\nbody\n"
    check(inject(home, stdin, ("-n",)), 100, b"", FATAL + b"unable to parse this line:\nTo: a>\n")


def test_print_option_does_not_queue(qhome: QHome) -> None:
    check(inject(qhome, b"Date: x\nMessage-ID: <y>\nTo: a@b.c\n", ("-n", "r@x.y")), 0,
          b"Return-Path: <joe@test.example.com>\nFrom: joe@test.example.com\nDate: x\nMessage-ID: <y>\nTo: a@b.c\n")
    assert files(qhome.queue)["todo"] == [] and files(qhome.queue)["mess"] == []
