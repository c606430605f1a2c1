"""dot-qmail(5), pure: the .qmail search order, extension variables, line parsing, header lines."""

from __future__ import annotations

import pytest

from pyqmail import rfc822
from pyqmail.local import dotqmail
from pyqmail.local.dotqmail import Candidate, Instruction
from pyqmail.local.mbox import ctime
from pyqmail.local.qmail_local import delivered_to, from_line, return_path


def names(dash: bytes, ext: bytes) -> list[bytes]:
    return [c.name for c in dotqmail.candidates(dash, ext)]


# The table in qmail-local.c's comment, as dash "-" is written there as "-/".
@pytest.mark.parametrize("ext, expected", [
    (b"", [b".qmail-", b".qmail-default"]),
    (b"a", [b".qmail-a", b".qmail-default"]),
    (b"a-", [b".qmail-a-", b".qmail-a-default", b".qmail-default"]),
    (b"a-b", [b".qmail-a-b", b".qmail-a-default", b".qmail-default"]),
    (b"a-b-", [b".qmail-a-b-", b".qmail-a-b-default", b".qmail-a-default", b".qmail-default"]),
    (b"a-b-c", [b".qmail-a-b-c", b".qmail-a-b-default", b".qmail-a-default", b".qmail-default"]),
])
def test_search_order(ext: bytes, expected: list[bytes]) -> None:
    assert names(b"-", ext) == expected


def test_book_user_foo_bar_baz() -> None:
    # The seed book, chapter 3: user-foo-bar-baz in ~user (steps 1-4) ...
    assert dotqmail.candidates(b"-", b"foo-bar-baz") == [
        Candidate(b".qmail-foo-bar-baz", None),
        Candidate(b".qmail-foo-bar-default", b"baz"),
        Candidate(b".qmail-foo-default", b"bar-baz"),
        Candidate(b".qmail-default", b"foo-bar-baz"),
    ]
    # ... and in ~alias when qmail-getpw finds no user "user" (steps 5-9).
    assert names(b"-", b"user-foo-bar-baz") == [
        b".qmail-user-foo-bar-baz", b".qmail-user-foo-bar-default", b".qmail-user-foo-default",
        b".qmail-user-default", b".qmail-default"]
    assert b".qmail-foo-bar-baz-default" not in names(b"-", b"foo-bar-baz")


def test_plain_user_never_reads_dash_default() -> None:
    # "-default only matches extensions, not lack of extensions"; with an empty
    # dash qmail's loop still appends "default" to the bare ".qmail".
    assert dotqmail.candidates(b"", b"") == [Candidate(b".qmail", None), Candidate(b".qmaildefault", b"")]


def test_case_and_dots() -> None:
    assert dotqmail.safe_ext(b"Foo.Bar-BAZ..x") == b"foo:bar-baz::x"
    assert dotqmail.safe_ext(b"\xc4.\xe4") == b"\xc4:\xe4", "only ASCII letters are lowercased"
    assert dotqmail.candidates(b"-", b"Foo.Bar-X") == [
        Candidate(b".qmail-foo:bar-x", None),
        Candidate(b".qmail-foo:bar-default", b"X"),
        Candidate(b".qmail-default", b"Foo.Bar-X"),
    ]
    assert names(b"-", b"../../etc/passwd")[0] == b".qmail-::/::/etc/passwd"


def test_extension_that_spells_default() -> None:
    assert dotqmail.candidates(b"-", b"foo-Default")[0] == Candidate(b".qmail-foo-default", b"Default")
    assert dotqmail.candidates(b"-", b"xdefault")[0] == Candidate(b".qmail-xdefault", b"default")
    assert dotqmail.candidates(b"-", b"defaul")[0] == Candidate(b".qmail-defaul", None)


def test_long_extension_is_bounded_by_its_dashes() -> None:
    ext = b"-".join([b"x"] * 1000)
    cands = dotqmail.candidates(b"-", ext)
    assert len(cands) == 1 + 1000
    assert cands[-1] == Candidate(b".qmail-default", ext)


@pytest.mark.parametrize("ext, parts", [
    (b"foo-bar-baz", (b"foo-bar-baz", b"bar-baz", b"baz", b"")),
    (b"a-b-c-d-e", (b"a-b-c-d-e", b"b-c-d-e", b"c-d-e", b"d-e")),
    (b"", (b"", b"", b"", b"")),
    (b"foo", (b"foo", b"", b"", b"")),
    (b"-", (b"-", b"", b"", b"")),
    (b"--x", (b"--x", b"-x", b"x", b"")),
])
def test_ext_parts(ext: bytes, parts: tuple[bytes, ...]) -> None:
    assert dotqmail.ext_parts(ext) == parts


@pytest.mark.parametrize("host, parts", [
    (b"server1.example.com", (b"server1.example", b"server1", b"server1")),
    (b"a.b.c.d.e", (b"a.b.c.d", b"a.b.c", b"a.b")),
    (b"example.com", (b"example", b"example", b"example")),
    (b"localhost", (b"localhost", b"localhost", b"localhost")),
    (b"", (b"", b"", b"")),
    (b"trailing.", (b"trailing", b"trailing", b"trailing")),
])
def test_host_parts(host: bytes, parts: tuple[bytes, ...]) -> None:
    assert dotqmail.host_parts(host) == parts


def test_new_sender() -> None:
    ns = dotqmail.new_sender
    assert ns(b"a@b", b"joe-list", b"h.example", False, False) == b"a@b"
    assert ns(b"a@b", b"joe-list", b"h.example", True, False) == b"joe-list-owner@h.example"
    assert ns(b"a@b", b"joe-list", b"h.example", True, True) == b"joe-list-owner-@h.example-@[]"
    assert ns(b"", b"joe-list", b"h.example", True, True) == b""
    assert ns(b"#@[]", b"joe-list", b"h.example", True, True) == b"#@[]"
    assert dotqmail.owner_names(b"-", b"List.X") == (b".qmail-list:x-owner", b".qmail-list:x-owner-default")


def I(kind: str, target: bytes, shown: bytes) -> Instruction:  # noqa: E743
    return Instruction(kind, target, shown)


def test_parse_kinds() -> None:
    text = (b"# comment\n"
            b"|preline /usr/ucb/vacation djb\n"
            b"&me@new.job.com\n"
            b"me@new.job.com\n"
            b"/home/djb/Mailbox.sos\n"
            b"./Maildir/\n"
            b"+list\n"
            b"+other\n"
            b"\n"
            b"   \t\n"
            b" leading-space\n")
    assert dotqmail.parse(text) == [
        I(dotqmail.COMMENT, b"", b"# comment"),
        I(dotqmail.PROGRAM, b"preline /usr/ucb/vacation djb", b"preline /usr/ucb/vacation djb"),
        I(dotqmail.FORWARD, b"me@new.job.com", b"me@new.job.com"),
        I(dotqmail.FORWARD, b"me@new.job.com", b"me@new.job.com"),
        I(dotqmail.MBOX, b"/home/djb/Mailbox.sos", b"/home/djb/Mailbox.sos"),
        I(dotqmail.MAILDIR, b"./Maildir/", b"./Maildir/"),
        I(dotqmail.LIST, b"list", b"list"),
        I(dotqmail.IGNORED, b"other", b"other"),
        I(dotqmail.BLANK, b"", b""),
        I(dotqmail.BLANK, b"", b""),
        I(dotqmail.FORWARD, b" leading-space", b" leading-space"),
    ]


def test_parse_trailing_blanks_and_missing_newline() -> None:
    assert dotqmail.parse(b"./Mailbox \t ") == [I(dotqmail.MBOX, b"./Mailbox", b"./Mailbox")]
    assert dotqmail.parse(b"./Maildir/\t") == [I(dotqmail.MAILDIR, b"./Maildir/", b"./Maildir/")]
    assert dotqmail.parse(b"") == [I(dotqmail.BLANK, b"", b"")]
    assert dotqmail.parse(b"\n") == [I(dotqmail.BLANK, b"", b"")]
    assert dotqmail.parse(b"#x\n\n") == [I(dotqmail.COMMENT, b"", b"#x"), I(dotqmail.BLANK, b"", b"")]


def test_parse_crlf_keeps_the_cr() -> None:
    # qmail cuts only spaces and tabs: a CR stays part of the name or address.
    assert dotqmail.parse(b"./Mailbox\r\n./Maildir/\r\n&a@b\r\n|cmd\r\n") == [
        I(dotqmail.MBOX, b"./Mailbox\r", b"./Mailbox\r"),
        I(dotqmail.MBOX, b"./Maildir/\r", b"./Maildir/\r"),
        I(dotqmail.FORWARD, b"a@b\r", b"a@b\r"),
        I(dotqmail.PROGRAM, b"cmd\r", b"cmd\r"),
    ]


def test_parse_nul_bytes_end_the_target_not_the_line() -> None:
    assert dotqmail.parse(b"./Mail\0box\n./Maildir\0x/\n\0after-nul\n&a@b\0c\n|echo\0hi\n+list\0x\n") == [
        I(dotqmail.MBOX, b"./Mail", b"./Mail\0box"),
        I(dotqmail.MAILDIR, b"./Maildir", b"./Maildir\0x/"),
        I(dotqmail.BLANK, b"", b"\0after-nul"),
        I(dotqmail.FORWARD, b"a@b", b"a@b\0c"),
        I(dotqmail.PROGRAM, b"echo", b"echo\0hi"),
        I(dotqmail.LIST, b"list", b"list\0x"),
    ]


def test_parse_very_long_lines() -> None:
    long_addr = b"x" * 1_000_000 + b"@example.com"
    text = b"#" + b"c" * 5_000_000 + b"\n" + long_addr + b"\n" + b"\n" * 10000 + b"./Mailbox"
    out = dotqmail.parse(text)
    assert len(out) == 2 + 10000 + 1
    assert out[1] == I(dotqmail.FORWARD, long_addr, long_addr)
    assert out[-1] == I(dotqmail.MBOX, b"./Mailbox", b"./Mailbox")


def test_parse_binary_garbage_never_fails() -> None:
    data = bytes(range(256)) * 64
    for start in range(0, len(data), 97):
        chunk = data[start:start + 300]
        for ins in dotqmail.parse(chunk):
            assert b"\n" not in ins.shown and b"\0" not in ins.target


# The header lines (qmail_local's pure helpers).

def test_delivered_to_and_return_path() -> None:
    assert delivered_to(b"joe", b"example.com") == b"Delivered-To: joe@example.com\n"
    assert delivered_to(b"a\nb", b"c\nd") == b"Delivered-To: a_b@c_d\n"
    assert return_path(b"") == b"Return-Path: <>\n"
    assert return_path(b"a@b.c") == b"Return-Path: <a@b.c>\n"
    assert return_path(b"#@[]") == b"Return-Path: <#@[]>\n"
    assert return_path(b"a b@c") == b'Return-Path: <"a b"@c>\n'
    assert return_path(b"x@y@z") == b'Return-Path: <"x@y"@z>\n'
    assert return_path(b"no-at") == b"Return-Path: <no-at>\n"
    assert return_path(b'q"\\@h') == b'Return-Path: <"q\\"\\\\"@h>\n'
    assert return_path(b"a\nb@h\nx") == b'Return-Path: <"a\\_b"@h_x>\n'
    assert return_path(b"@h") == b'Return-Path: <""@h>\n'


@pytest.mark.parametrize("local, quoted", [
    (b"joe", b"joe"), (b"j.o.e", b"j.o.e"), (b".joe", b'".joe"'), (b"joe.", b'"joe."'),
    (b"j..oe", b'"j..oe"'), (b"a+b=c/d!#$%&'*?^_`{|}~-", b"a+b=c/d!#$%&'*?^_`{|}~-"),
    (b"a(b", b'"a(b"'), (b"a,b", b'"a,b"'), (b"a:b", b'"a:b"'), (b"a;b", b'"a;b"'),
    (b"a<b", b'"a<b"'), (b"a>b", b'"a>b"'), (b"a[b", b'"a[b"'), (b"a]b", b'"a]b"'),
    (b"\xe4", b'"\xe4"'), (b"a\x7fb", b'"a\x7fb"'), (b"a\rb", b'"a\\\rb"'), (b"a\tb", b'"a\tb"'),
])
def test_quote_local_part(local: bytes, quoted: bytes) -> None:
    assert rfc822.quote2(local + b"@h") == quoted + b"@h"


def test_from_line() -> None:
    assert ctime(0) == b"Thu Jan 01 00:00:00 1970\n"
    assert ctime(1_000_000_000) == b"Sun Sep 09 01:46:40 2001\n"
    assert ctime(951_782_400) == b"Tue Feb 29 00:00:00 2000\n"
    assert from_line(b"", 0) == b"From MAILER-DAEMON Thu Jan 01 00:00:00 1970\n"
    assert from_line(b"a b\tc\nd@e", 0) == b"From a-b-c-d@e Thu Jan 01 00:00:00 1970\n"
