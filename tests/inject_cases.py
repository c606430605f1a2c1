"""qmail-inject -n header cases: input, environment and the exact expected output.

Every case runs against a home made for silverton.berkeley.edu (so control/me
is silverton.berkeley.edu, defaultdomain and plusdomain berkeley.edu, and
defaulthost and idhost fall back to me) with QMAILUSER=joe unless the case
says otherwise. Expected outputs were worked out from qmail-header(5),
addresses(5) and qmail 1.03's rules, not taken from pyqmail's output.

{DATE} and {MSGID} in an expected output stand for the Date and Message-ID
fields qmail-inject makes; the test fills them in from the time of the run
and the process id.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FQDN = "silverton.berkeley.edu"

RP = b"Return-Path: <joe@silverton.berkeley.edu>\n"
FROM = b"From: joe@silverton.berkeley.edu\n"
CC = b"Cc: recipient list not shown: ;\n"
D = b"Date: 1 Jan 2000 00:00:00 -0000\n"
M = b"Message-ID: <1@x>\n"
DM = D + M
RD = b"Resent-Date: 2 Jan 2000 00:00:00 -0000\n"
RM = b"Resent-Message-ID: <2@x>\n"
GEN = b"{DATE}{MSGID}"
PARSE = b"qmail-inject: fatal: unable to parse this line:\n"


@dataclass
class Case:
    name: str
    stdin: bytes
    stdout: bytes
    args: tuple[str, ...] = ()
    env: dict[str, str | None] = field(default_factory=dict)  # None unsets a variable
    code: int = 0
    stderr: bytes = b""


def to_only(name: str, to: bytes, expected: bytes) -> Case:
    """A case with a dated message whose only field of interest is to."""
    return Case(name, DM + to, RP + FROM + DM + expected)


def addrs(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}{i:02d}@example.com".encode() for i in range(n)]


A8 = addrs("user", 8)
LONG_A = b"a" * 30 + b"@example.com"  # 42 bytes
LONG_B = b"b" * 17 + b"@example.com"  # 29 bytes: "To: A, B," is 78 bytes, the most a line may hold
LONG_B1 = b"b" * 18 + b"@example.com"  # 30 bytes: one too many
SHORT_C = b"c@example.com"

CASES: list[Case] = [
    # --- addresses(5) and qmail-header(5) examples -------------------------------
    Case("plain message passes", DM + b"From: a@b.c\nTo: d@e.f\n\nbody\n",
         RP + DM + b"From: a@b.c\nTo: d@e.f\n\nbody\n"),
    to_only("lone box gets defaulthost", b"To: djb\n", b"To: djb@silverton.berkeley.edu\n"),
    to_only("host without dots gets defaultdomain", b"To: djb@silverton\n",
            b"To: djb@silverton.berkeley.edu\n"),
    to_only("trailing plus gets plusdomain", b"To: eric@mammoth.cs+\n",
            b"To: eric@mammoth.cs.berkeley.edu\n"),
    to_only("plus without dots gets plusdomain only", b"To: joe@mac+\n", b"To: joe@mac.berkeley.edu\n"),
    to_only("dotted-decimal literal kept", b"To: djb@[128.32.183.163]\n", b"To: djb@[128.32.183.163]\n"),
    to_only("illegal space becomes a comma", b"To: djb fred\n",
            b"To: djb@silverton.berkeley.edu, fred@silverton.berkeley.edu\n"),
    to_only("comment before an address moves after it", b"To: (Dan) djb@a.b\n", b"To: djb@a.b (Dan)\n"),
    to_only("comment after an address stays", b"To: djb@a.b (Dan Bernstein)\n",
            b"To: djb@a.b (Dan Bernstein)\n"),
    to_only("comment after angle brackets loses its space", b"To: Joe <j@x.y> (work)\n",
            b"To: Joe <j@x.y>(work)\n"),
    to_only("name-addr form", b"To: Dan Bernstein <djb@a.b>\n", b"To: Dan Bernstein <djb@a.b>\n"),
    to_only("quoted phrase with a comma", b'To: "Bernstein, Dan" <djb@a.b>\n',
            b'To: "Bernstein, Dan" <djb@a.b>\n'),
    to_only("address group", b"To: friends: a@b.c, d@e.f;\n", b"To: friends: a@b.c, d@e.f;\n"),
    to_only("empty group", b"To: undisclosed-recipients: ;\n", b"To: undisclosed-recipients: ;\n"),
    to_only("source route stripped", b"To: <@a.b,@c.d:joe@e.f>\n", b"To: <joe@e.f>\n"),
    to_only("route without a colon leaves <>", b"To: <@a.b>\n", b"To: <>\n"),
    to_only("null address kept", b"To: <>\n", b"To: <>\n"),
    to_only("trailing dot removed", b"To: joe@a.b.\n", b"To: joe@a.b\n"),
    to_only("trailing at removed", b"To: joe@\n", b"To: joe@silverton.berkeley.edu\n"),
    to_only("box@[] not rewritten", b"To: <foo@[]>\n", b"To: <foo@[]>\n"),
    to_only("nested comment loses inner parentheses", b"To: a@b.c (x (y) z)\n", b"To: a@b.c (x y z)\n"),
    to_only("escaped quote in a quoted string", b'To: "a\\"b" <c@d.e>\n', b'To: "a\\"b" <c@d.e>\n'),
    to_only("escaped at inside an atom", b"To: a\\@b@c.d\n", b"To: a@b@c.d\n"),
    to_only("quoted local part", b'To: "john doe"@x.y\n', b'To: "john doe"@x.y\n'),
    to_only("comment inside angle brackets", b"To: <a(x)@b>\n", b"To: <a (x)@b.berkeley.edu>\n"),
    to_only("literal with an escaped bracket", b"To: a@[1\\]2]\n", b"To: a@[1\\]2]\n"),
    to_only("commas only", b"To: ,,a@b.c,,\n", b"To: , , a@b.c, ,\n"),
    to_only("semicolon without a group", b"To: a@b.c;\n", b"To: a@b.c;\n"),
    to_only("< without >", b"To: <a@b.c\n", b"To: <a@b.c\n"),
    to_only("close parenthesis inside an atom quotes it", b"To: a) b\n",
            b'To: "a\\)"@silverton.berkeley.edu, b@silverton.berkeley.edu\n'),
    to_only("blanks before the colon of a known field", b"To  : a@b.c\nSubject\t: s\n",
            b"To: a@b.c\nSubject\t: s\n"),
    to_only("continuation lines", b"To: a@b.c,\n d@e.f\nSubject: one\n\ttwo\n",
            b"To: a@b.c, d@e.f\nSubject: one\n\ttwo\n"),
    Case("field names are case-insensitive", DM + b"tO: a@b.c\ncc: d\n",
         RP + FROM + DM + b"tO: a@b.c\ncc: d@silverton.berkeley.edu\n"),
    Case("empty Cc counts as Cc", DM + b"Cc:\n", RP + FROM + DM + b"Cc:\n"),

    # --- folding at commas -----------------------------------------------------------
    to_only("long list folded at 80 columns", b"To: " + b", ".join(A8) + b"\n",
            b"To: " + b", ".join(A8[0:3]) + b",\n  " + b", ".join(A8[3:6]) + b",\n  "
            + b", ".join(A8[6:8]) + b"\n"),
    to_only("line of 78 bytes is kept", b"To: " + b", ".join([LONG_A, LONG_B, SHORT_C]) + b"\n",
            b"To: " + LONG_A + b", " + LONG_B + b",\n  " + SHORT_C + b"\n"),
    to_only("line of 79 bytes is folded", b"To: " + b", ".join([LONG_A, LONG_B1, SHORT_C]) + b"\n",
            b"To: " + LONG_A + b",\n  " + LONG_B1 + b", " + SHORT_C + b"\n"),
    to_only("folding joins continuation lines first", b"To: a@b.c,\n\td@e.f,\n  g@h.i\n",
            b"To: a@b.c, d@e.f, g@h.i\n"),

    # --- fields removed, added, rewritten --------------------------------------------
    Case("Bcc removed", DM + b"To: a@b.c\nBcc: d@e.f\n", RP + FROM + DM + b"To: a@b.c\n"),
    Case("only Bcc: recipient list not shown", DM + b"Bcc: d@e.f\n", RP + FROM + CC + DM),
    Case("no recipient field: recipient list not shown", DM + b"Subject: x\n",
         RP + FROM + CC + DM + b"Subject: x\n"),
    Case("Apparently-To is rewritten but is not To", DM + b"Apparently-To: joe\n",
         RP + FROM + CC + DM + b"Apparently-To: joe@silverton.berkeley.edu\n"),
    Case("Return-Path sets the sender and is removed", DM + b"Return-Path: <x@y.z>\nTo: a@b.c\n",
         b"Return-Path: <x@y.z>\n" + FROM + DM + b"To: a@b.c\n"),
    Case("Return-Path: the rightmost address wins", DM + b"Return-Path: a@b.c, d@e.f\nTo: a@b.c\n",
         b"Return-Path: <d@e.f>\n" + FROM + DM + b"To: a@b.c\n"),
    Case("Return-Path <> gives the null sender", DM + b"Return-Path: <>\nTo: a@b.c\n",
         b"Return-Path: <>\n" + FROM + DM + b"To: a@b.c\n"),
    Case("QMAILINJECT=s ignores Return-Path", DM + b"Return-Path: <x@y.z>\nTo: a@b.c\n",
         RP + FROM + DM + b"To: a@b.c\n", env={"QMAILINJECT": "s"}),
    Case("QMAILINJECT=s skips even an unparseable Return-Path", DM + b"Return-Path: <x@y.z\nTo: a@b.c\n",
         RP + FROM + DM + b"To: a@b.c\n", env={"QMAILINJECT": "s"}),
    Case("Content-Length removed", DM + b"Content-Length: 5\nTo: a@b.c\n\nbody\n",
         RP + FROM + DM + b"To: a@b.c\n\nbody\n"),
    Case("sender fields rewritten",
         DM + b"Sender: s\nReply-To: r@x\nErrors-To: e\nReturn-Receipt-To: rr\nTo: a@b.c\n",
         RP + FROM + DM + b"Sender: s@silverton.berkeley.edu\nReply-To: r@x.berkeley.edu\n"
         b"Errors-To: e@silverton.berkeley.edu\nReturn-Receipt-To: rr@silverton.berkeley.edu\nTo: a@b.c\n"),
    Case("other fields untouched",
         DM + b"Mail-Followup-To: joe\nDelivered-To: joe\nReceived: from x (y) by z\nTo: a@b.c\n",
         RP + FROM + DM + b"Mail-Followup-To: joe\nDelivered-To: joe\nReceived: from x (y) by z\nTo: a@b.c\n"),
    Case("From given: no From added", DM + b"From: Joe <joe@x.y>\nTo: a@b.c\n",
         RP + DM + b"From: Joe <joe@x.y>\nTo: a@b.c\n"),

    # --- resent messages ---------------------------------------------------------------
    Case("resent: Resent-From added, not From",
         DM + b"To: d@e.f\n" + RD + RM + b"Resent-To: g@h.i\n",
         RP + b"Resent-From: joe@silverton.berkeley.edu\n" + DM + b"To: d@e.f\n" + RD + RM
         + b"Resent-To: g@h.i\n"),
    Case("resent: Resent-Cc added, not Cc; Resent-Bcc removed",
         b"Subject: s\n" + RD + RM + b"Resent-Bcc: x@y.z\n",
         RP + b"Resent-From: joe@silverton.berkeley.edu\nResent-Cc: recipient list not shown: ;\n"
         + b"Subject: s\n" + RD + RM),

    # --- the default From and envelope sender -------------------------------------------
    Case("QMAILNAME gives a phrase", DM + b"To: a@b.c\n",
         RP + b'From: "Joe Q. Public" <joe@silverton.berkeley.edu>\n' + DM + b"To: a@b.c\n",
         env={"QMAILNAME": "Joe Q. Public"}),
    Case("QMAILINJECT=c gives a comment", DM + b"To: a@b.c\n",
         RP + b"From: joe@silverton.berkeley.edu (Joe Q. Public)\n" + DM + b"To: a@b.c\n",
         env={"QMAILNAME": "Joe Q. Public", "QMAILINJECT": "c"}),
    Case("quotes in the name are escaped", DM + b"To: a@b.c\n",
         RP + b'From: "Joe \\"JJ\\" Q" <joe@silverton.berkeley.edu>\n' + DM + b"To: a@b.c\n",
         env={"QMAILNAME": 'Joe "JJ" Q'}),
    Case("MAILNAME when no QMAILNAME", DM + b"To: a@b.c\n",
         RP + b'From: "M N" <joe@silverton.berkeley.edu>\n' + DM + b"To: a@b.c\n",
         env={"MAILNAME": "M N", "NAME": "N N"}),
    Case("NAME last", DM + b"To: a@b.c\n",
         RP + b'From: "N N" <joe@silverton.berkeley.edu>\n' + DM + b"To: a@b.c\n", env={"NAME": "N N"}),
    Case("QMAILNAME before MAILNAME", DM + b"To: a@b.c\n",
         RP + b'From: "Q" <joe@silverton.berkeley.edu>\n' + DM + b"To: a@b.c\n",
         env={"QMAILNAME": "Q", "MAILNAME": "M"}),
    Case("QMAILHOST", DM + b"To: a@b.c\n",
         b"Return-Path: <joe@host.example.org>\nFrom: joe@host.example.org\n" + DM + b"To: a@b.c\n",
         env={"QMAILHOST": "host.example.org", "MAILHOST": "other.example.org"}),
    Case("QMAILHOST without dots gets defaultdomain", DM + b"To: a@b.c\n",
         b"Return-Path: <joe@mailhost.berkeley.edu>\nFrom: joe@mailhost.berkeley.edu\n" + DM + b"To: a@b.c\n",
         env={"QMAILHOST": "mailhost"}),
    Case("MAILHOST", DM + b"To: a@b.c\n",
         b"Return-Path: <joe@mh.example.org>\nFrom: joe@mh.example.org\n" + DM + b"To: a@b.c\n",
         env={"MAILHOST": "mh.example.org"}),
    Case("QMAILSUSER and QMAILSHOST set only the sender", DM + b"To: a@b.c\n",
         b"Return-Path: <bounce@bounces.example.org>\n" + FROM + DM + b"To: a@b.c\n",
         env={"QMAILSUSER": "bounce", "QMAILSHOST": "bounces.example.org"}),
    Case("MAILUSER before USER", DM + b"To: a@b.c\n",
         b"Return-Path: <mu@silverton.berkeley.edu>\nFrom: mu@silverton.berkeley.edu\n" + DM + b"To: a@b.c\n",
         env={"QMAILUSER": None, "MAILUSER": "mu", "USER": "bob", "LOGNAME": "carl"}),
    Case("USER before LOGNAME", DM + b"To: a@b.c\n",
         b"Return-Path: <bob@silverton.berkeley.edu>\nFrom: bob@silverton.berkeley.edu\n" + DM + b"To: a@b.c\n",
         env={"QMAILUSER": None, "USER": "bob", "LOGNAME": "carl"}),
    Case("LOGNAME last", DM + b"To: a@b.c\n",
         b"Return-Path: <carl@silverton.berkeley.edu>\nFrom: carl@silverton.berkeley.edu\n" + DM + b"To: a@b.c\n",
         env={"QMAILUSER": None, "LOGNAME": "carl"}),
    Case("no user at all: anonymous", DM + b"To: a@b.c\n",
         b"Return-Path: <anonymous@silverton.berkeley.edu>\nFrom: anonymous@silverton.berkeley.edu\n"
         + DM + b"To: a@b.c\n", env={"QMAILUSER": None}),
    Case("user name that must be quoted", DM + b"To: a@b.c\n",
         b'Return-Path: <"j doe"@silverton.berkeley.edu>\nFrom: "j doe"@silverton.berkeley.edu\n'
         + DM + b"To: a@b.c\n", env={"QMAILUSER": "j doe"}),
    Case("QMAILINJECT=f deletes From", DM + b"From: a@b.c\nTo: d@e.f\n", RP + FROM + DM + b"To: d@e.f\n",
         env={"QMAILINJECT": "f"}),
    Case("QMAILINJECT=r: per-recipient VERP sender", DM + b"To: a@b.c\n",
         b'Return-Path: <"joe-@silverton.berkeley.edu-"@[]>\n' + FROM + DM + b"To: a@b.c\n",
         env={"QMAILINJECT": "r"}),
    Case("QMAILINJECT=r applies to Return-Path", DM + b"Return-Path: <x@y.z>\nTo: a@b.c\n",
         b'Return-Path: <"x@y.z-"@[]>\n' + FROM + DM + b"To: a@b.c\n", env={"QMAILINJECT": "r"}),
    Case("unknown QMAILINJECT letters ignored", DM + b"To: a@b.c\n", RP + FROM + DM + b"To: a@b.c\n",
         env={"QMAILINJECT": "xyz"}),
    Case("-f sender", DM + b"To: a@b.c\n", b"Return-Path: <bounce@x.y>\n" + FROM + DM + b"To: a@b.c\n",
         args=("-f", "bounce@x.y")),
    Case("-f lone box rewritten", DM + b"To: a@b.c\n",
         b"Return-Path: <bob@silverton.berkeley.edu>\n" + FROM + DM + b"To: a@b.c\n", args=("-fbob",)),
    Case("-f empty: null sender", DM + b"To: a@b.c\n", b"Return-Path: <>\n" + FROM + DM + b"To: a@b.c\n",
         args=("-f", "")),
    Case("-f before Return-Path", DM + b"Return-Path: <x@y.z>\nTo: a@b.c\n",
         b"Return-Path: <a@b.c>\n" + FROM + DM + b"To: a@b.c\n", args=("-f", "a@b.c")),
    Case("-f with QMAILINJECT=r is left alone", DM + b"To: a@b.c\n",
         b"Return-Path: <a@b.c>\n" + FROM + DM + b"To: a@b.c\n", args=("-f", "a@b.c"),
         env={"QMAILINJECT": "r"}),
    Case("-f with a quoted local part", DM + b"To: a@b.c\n",
         b'Return-Path: <"x y"@b.c>\n' + FROM + DM + b"To: a@b.c\n", args=("-f", "x y@b.c")),

    # --- hostile input -----------------------------------------------------------------
    Case("unterminated quote", DM + b'To: "abc\n', b"", code=100, stderr=PARSE + b'To: "abc\n'),
    Case("unterminated comment", DM + b"To: a@b.c (abc\n", b"", code=100, stderr=PARSE + b"To: a@b.c (abc\n"),
    Case("unterminated literal", DM + b"To: a@[1.2\n", b"", code=100, stderr=PARSE + b"To: a@[1.2\n"),
    Case("backslash at the end of a quote", DM + b'To: "abc\\', b"", code=100, stderr=PARSE + b'To: "abc\\\n'),
    Case("unparseable field shown with its continuation lines", DM + b"Cc: a@b.c,\n (d\n",
         b"", code=100, stderr=PARSE + b"Cc: a@b.c,\n (d\n"),
    Case("unparseable Bcc still fails", DM + b"Bcc: a>\n", b"", code=100, stderr=PARSE + b"Bcc: a>\n"),
    Case("unterminated quote in Subject is fine", DM + b'Subject: "abc\nTo: a@b.c\n',
         RP + FROM + DM + b'Subject: "abc\nTo: a@b.c\n'),
    Case("close parenthesis starting a word", DM + b"To: )a\n", b"", code=100, stderr=PARSE + b"To: )a\n"),
    Case("> without <", DM + b"To: a@b.c>\n", b"", code=100, stderr=PARSE + b"To: a@b.c>\n"),
    Case("group not closed", DM + b"From: g: a@b.c\n", b"", code=100, stderr=PARSE + b"From: g: a@b.c\n"),
    Case("nested groups", DM + b"To: g: h: a@b.c;;\n", b"", code=100, stderr=PARSE + b"To: g: h: a@b.c;;\n"),
    to_only("NUL in an address is quoted", b"To: a\0b@c.d\n", b'To: "a\0b"@c.d\n'),
    Case("NUL in Subject untouched", DM + b"Subject: a\0b\nTo: a@b.c\n",
         RP + FROM + DM + b"Subject: a\0b\nTo: a@b.c\n"),
    Case("NUL in a field name ends the header", DM + b"Sub\0ject: x\nmore\n",
         RP + FROM + CC + DM + b"\nSub\0ject: x\nmore\n"),
    Case("8-bit phrase is quoted", DM + b"From: J\xc3\xb6rg <j@x.y>\nTo: a@b.c\n",
         RP + DM + b'From: "J\xc3\xb6rg" <j@x.y>\nTo: a@b.c\n'),
    Case("8-bit Subject untouched", DM + b"Subject: \xe9t\xe9\nTo: a@b.c\n",
         RP + FROM + DM + b"Subject: \xe9t\xe9\nTo: a@b.c\n"),
    Case("8-bit field name ends the header", DM + b"S\xfcbject: x\n", RP + FROM + CC + DM + b"\nS\xfcbject: x\n"),
    to_only("bare CR in an address field separates words", b"To: a\rb@c.d\n",
            b"To: a@silverton.berkeley.edu, b@c.d\n"),
    Case("bare CR in Subject untouched", DM + b"Subject: a\rb\nTo: a@b.c\n",
         RP + FROM + DM + b"Subject: a\rb\nTo: a@b.c\n"),
    Case("CRLF lines: CR dropped from rewritten fields, header ends at CRLF",
         DM + b"To: a@b.c\r\nSubject: s\r\n\r\nbody\r\n",
         RP + FROM + DM + b"To: a@b.c\nSubject: s\r\n\n\r\nbody\r\n"),
    Case("header with no body", DM + b"To: a@b.c\n", RP + FROM + DM + b"To: a@b.c\n"),
    Case("last header line without newline", DM + b"To: a@b.c", RP + FROM + DM + b"To: a@b.c\n"),
    Case("body without final newline", DM + b"To: a@b.c\n\nbody", RP + FROM + DM + b"To: a@b.c\n\nbody\n"),
    Case("empty input", b"", RP + GEN + FROM + CC),
    Case("blank line only", b"\n", RP + GEN + FROM + CC + b"\n"),
    Case("no header at all", b"hello\nworld\n", RP + GEN + FROM + CC + b"\nhello\nworld\n"),
    Case("first line continued is body", b" Subject: x\n", RP + GEN + FROM + CC + b"\n Subject: x\n"),
    Case("From_ line becomes MBOX-Line", b"From joe Sat Jan  1 00:00:00 2000\n" + DM + b"To: a@b.c\n",
         RP + FROM + b"MBOX-Line: From joe Sat Jan  1 00:00:00 2000\n" + DM + b"To: a@b.c\n"),
    Case("space in a field name ends the header", DM + b"X Header: y\nTo: a@b.c\n",
         RP + FROM + CC + DM + b"\nX Header: y\nTo: a@b.c\n"),
    Case("empty field name ends the header", DM + b": y\n", RP + FROM + CC + DM + b"\n: y\n"),
    Case("line without a colon ends the header", DM + b"To: a@b.c\nnot a field\nTo: x\n",
         RP + FROM + DM + b"To: a@b.c\n\nnot a field\nTo: x\n"),
    Case("body keeps blank lines and dots", DM + b"To: a@b.c\n\n\n.\n\nx\n", RP + FROM + DM + b"To: a@b.c\n\n\n.\n\nx\n"),
]
