"""qmail-smtpd's pure pieces: command splitting, addrparse, the session state machine, the DATA filter,
the Received line and the reply after DATA."""

from __future__ import annotations

import pytest

from pyqmail.control import DomainSet
from pyqmail.smtpd import replies
from pyqmail.smtpd.data import END, LONG_LINE, MORE, STRAY_NEWLINE, Blast
from pyqmail.smtpd.rcpthosts import RcptHosts
from pyqmail.smtpd.received import Peer, date822, received, safe
from pyqmail.smtpd.session import (CONTINUE, DATA, QUIT, Config, Session, addrparse, data_reply,
                                   ip_scan, ip_scanbracket, scan_ulong, split_command)

GREETING = b"mx.example.com"


def session(**kw: object) -> Session:
    peer = kw.pop("peer", Peer(b"192.0.2.1", b"client.example.net", None, b"mx.example.com"))
    return Session(Config(GREETING, peer, **kw))  # type: ignore[arg-type]


# --- command lines -------------------------------------------------------------------------

@pytest.mark.parametrize("line, verb, arg", [
    (b"HELO x", b"HELO", b"x"),
    (b"HELO x\r", b"HELO", b"x"),
    (b"HELO   x y ", b"HELO", b"x y "),
    (b"NOOP", b"NOOP", b""),
    (b"NOOP\r\r", b"NOOP\r", b""),            # only one CR is the line's end
    (b"", b"", b""),
    (b"MAIL\tFROM:<a>", b"MAIL\tFROM:<a>", b""),  # a tab does not separate
    (b"HELO a\0b", b"HELO", b"a"),              # a C string ends at NUL
    (b"\0HELO x", b"", b""),
    (b"MAIL FROM:<a\0@b>", b"MAIL", b"FROM:<a"),
])
def test_split_command(line: bytes, verb: bytes, arg: bytes) -> None:
    assert split_command(line) == (verb, arg)


# --- addresses -----------------------------------------------------------------------------

@pytest.mark.parametrize("arg, addr", [
    (b"FROM:<a@b.example>", b"a@b.example"),
    (b"FROM: <a@b.example>", b"a@b.example"),
    (b"FROM:<>", b""),
    (b"FROM:<a@b.example> SIZE=100 BODY=8BITMIME", b"a@b.example"),
    (b"TO:a@b.example", b"a@b.example"),           # no brackets: after ':' up to a space
    (b"TO:   a@b.example junk", b"a@b.example"),
    (b"TO:", b""),
    (b"a@b.example", b""),                          # neither '<' nor ':'
    (b"junk <a@b.example>", b"a@b.example"),        # '<' anywhere
    (b"FROM:<@r1.example,@r2.example:a@b.example>", b"a@b.example"),  # source route
    (b"FROM:<@r1.example>", b""),                   # a route without ':' eats everything
    (b'FROM:<"a b"@c.example>', b"a b@c.example"),  # quotes dropped, space kept
    (b'FROM:<"a>b"@c.example>', b"a>b@c.example"),  # '>' inside quotes
    (b"FROM:<a\\>b@c.example>", b"a>b@c.example"),  # backslash takes the next byte
    (b"FROM:<a\\\\b@c>", b"a\\b@c"),
    (b"FROM:<a@b", b"a@b"),                          # no terminator: to the end
    (b"FROM:<a\\", b"a"),                            # a final backslash escapes nothing
    (b"TO:<\x80\xff@b.example>", b"\x80\xff@b.example"),
])
def test_addrparse(arg: bytes, addr: bytes) -> None:
    assert addrparse(arg) == addr


def test_addrparse_length_limit() -> None:
    assert addrparse(b"<" + b"a" * 899 + b">") == b"a" * 899
    assert addrparse(b"<" + b"a" * 900 + b">") is None
    assert addrparse(b"<" + b"a" * 1_000_000 + b">") is None


def test_addrparse_localiphost() -> None:
    def local(ip: tuple[int, int, int, int]) -> bool:
        return ip in {(127, 0, 0, 1), (0, 0, 0, 0)}

    assert addrparse(b"<x@[127.0.0.1]>", b"mx.example.com", local) == b"x@mx.example.com"
    assert addrparse(b"<x@[0.0.0.0]>", b"mx.example.com", local) == b"x@mx.example.com"
    assert addrparse(b"<x@[192.0.2.9]>", b"mx.example.com", local) == b"x@[192.0.2.9]"
    assert addrparse(b"<x@[127.0.0.1]z>", b"mx.example.com", local) == b"x@[127.0.0.1]z"
    assert addrparse(b"<x@[127.0.0.1>", b"mx.example.com", local) == b"x@[127.0.0.1"
    assert addrparse(b"<x@[383.0.0.1]>", b"mx.example.com", local) == b"x@mx.example.com"  # octets wrap
    assert addrparse(b"<x@[127.0.0.1]>", None, local) == b"x@[127.0.0.1]"
    assert addrparse(b"<a@b@[127.0.0.1]>", b"h", local) == b"a@b@h"  # the last '@'


def test_ip_scan() -> None:
    assert ip_scan(b"1.2.3.4") == ((1, 2, 3, 4), 7)
    assert ip_scan(b"1.2.3.4:628") == ((1, 2, 3, 4), 7)
    assert ip_scan(b"001.2.3.4x") == ((1, 2, 3, 4), 9)
    assert ip_scan(b"1.2.3") is None
    assert ip_scan(b"1..2.3") is None
    assert ip_scan(b"") is None
    assert ip_scanbracket(b"[1.2.3.4]") == ((1, 2, 3, 4), 9)
    assert ip_scanbracket(b"[1.2.3.4") is None
    assert ip_scanbracket(b"1.2.3.4]") is None
    assert scan_ulong(b"18446744073709551617x") == (1, 20)


# --- the session ---------------------------------------------------------------------------

def test_helo_ehlo_and_the_simple_commands() -> None:
    s = session()
    assert s.greeting() == b"220 mx.example.com ESMTP\r\n"
    assert s.command(b"HELO there") == (b"250 mx.example.com\r\n", CONTINUE)
    assert s.command(b"ehlo there") == (b"250-mx.example.com\r\n250-PIPELINING\r\n250 8BITMIME\r\n", CONTINUE)
    assert s.command(b"NOOP whatever") == (replies.OK, CONTINUE)
    assert s.command(b"RSET") == (b"250 flushed\r\n", CONTINUE)
    assert s.command(b"VRFY root") == (b"252 send some mail, i'll try my best\r\n", CONTINUE)
    assert s.command(b"HELP") == (b"214 netqmail home page: http://qmail.org/netqmail\r\n", CONTINUE)
    assert s.command(b"EXPN list") == (b"502 unimplemented (#5.5.1)\r\n", CONTINUE)
    assert s.command(b"STARTTLS") == (replies.UNIMPLEMENTED, CONTINUE)
    assert s.command(b"") == (replies.UNIMPLEMENTED, CONTINUE)
    assert s.command(b"QuIt") == (b"221 mx.example.com\r\n", QUIT)


def test_transaction_order() -> None:
    s = session()
    assert s.command(b"RCPT TO:<a@b>") == (b"503 MAIL first (#5.5.1)\r\n", CONTINUE)
    assert s.command(b"DATA") == (b"503 MAIL first (#5.5.1)\r\n", CONTINUE)
    assert s.command(b"MAIL FROM:<s@x>") == (b"250 ok\r\n", CONTINUE)  # no HELO needed
    assert s.command(b"DATA") == (b"503 RCPT first (#5.5.1)\r\n", CONTINUE)
    assert s.command(b"RCPT TO:<r1@y>") == (replies.OK, CONTINUE)
    assert s.command(b"RCPT TO:<r1@y>") == (replies.OK, CONTINUE)  # duplicates are kept
    assert s.command(b"DATA") == (b"", DATA)
    assert (s.mailfrom, s.rcptto) == (b"s@x", [b"r1@y", b"r1@y"])
    assert s.command(b"DATA") == (replies.WANT_MAIL, CONTINUE)  # a new MAIL for each message
    assert s.command(b"MAIL FROM:<t@x>") == (replies.OK, CONTINUE)
    assert s.rcptto == []
    assert s.command(b"HELO again") == (b"250 mx.example.com\r\n", CONTINUE)
    assert s.command(b"RCPT TO:<r@y>") == (replies.WANT_MAIL, CONTINUE)  # HELO forgets MAIL


def test_no_recipient_limit() -> None:
    s = session()
    s.command(b"MAIL FROM:<>")
    for i in range(1000):
        assert s.command(b"RCPT TO:<r%d@y>" % i) == (replies.OK, CONTINUE)
    assert len(s.rcptto) == 1000


def test_syntax_errors() -> None:
    s = session()
    long = b"<" + b"a" * 900 + b">"
    assert s.command(b"MAIL FROM:" + long) == (b"555 syntax error (#5.5.4)\r\n", CONTINUE)
    assert s.command(b"RCPT TO:<a@b>") == (replies.WANT_MAIL, CONTINUE)  # a refused MAIL is no MAIL
    s.command(b"MAIL FROM:<>")
    assert s.command(b"RCPT TO:" + long) == (replies.SYNTAX, CONTINUE)


def test_rcpthosts() -> None:
    rh = RcptHosts(DomainSet(["example.com", ".sub.example.org"]))
    s = session(rcpthosts=rh)
    s.command(b"MAIL FROM:<a@elsewhere.net>")
    assert s.command(b"RCPT TO:<u@example.com>") == (replies.OK, CONTINUE)
    assert s.command(b"RCPT TO:<u@EXAMPLE.COM>") == (replies.OK, CONTINUE)
    assert s.command(b"RCPT TO:<u@a.sub.example.org>") == (replies.OK, CONTINUE)
    assert s.command(b"RCPT TO:<postmaster>") == (replies.OK, CONTINUE)  # no '@': allowed
    nogw = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
    assert s.command(b"RCPT TO:<u@sub.example.org>") == (nogw, CONTINUE)
    assert s.command(b"RCPT TO:<u@www.example.com>") == (nogw, CONTINUE)
    assert s.command(b"RCPT TO:<u@example.com@evil.net>") == (nogw, CONTINUE)  # the last '@' counts
    assert s.command(b"RCPT TO:<u@example.com.>") == (nogw, CONTINUE)
    assert s.rcptto == [b"u@example.com", b"u@EXAMPLE.COM", b"u@a.sub.example.org", b"postmaster"]


def test_relayclient_appends_and_skips_rcpthosts() -> None:
    rh = RcptHosts(DomainSet(["example.com"]))
    s = session(rcpthosts=rh, relayclient=b"-relayed")
    s.command(b"MAIL FROM:<a@b>")
    assert s.command(b"RCPT TO:<u@far.away>") == (replies.OK, CONTINUE)
    assert s.rcptto == [b"u@far.away-relayed"]
    s = session(rcpthosts=rh, relayclient=b"")
    s.command(b"MAIL FROM:<a@b>")
    s.command(b"RCPT TO:<u@far.away>")
    assert s.rcptto == [b"u@far.away"]


def test_badmailfrom() -> None:
    bmf = frozenset([b"spammer@example.net", b"@evil.example"])
    s = session(badmailfrom=bmf, relayclient=b"")
    bad = b"553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)\r\n"
    for sender in (b"spammer@example.net", b"SPAMMER@Example.NET", b"anyone@evil.example", b"x@EVIL.example"):
        assert s.command(b"MAIL FROM:<" + sender + b">") == (replies.OK, CONTINUE)  # MAIL itself is accepted
        assert s.command(b"RCPT TO:<u@example.com>") == (bad, CONTINUE)
    for sender in (b"spammer@example.net.ok", b"x@sub.evil.example", b"", b"evil.example"):
        assert s.command(b"MAIL FROM:<" + sender + b">") == (replies.OK, CONTINUE)
        assert s.command(b"RCPT TO:<u@example.com>") == (replies.OK, CONTINUE)
    s.command(b"MAIL FROM:<spammer@example.net>")
    assert s.command(b"RCPT TO:" + b"<" + b"a" * 900 + b">") == (replies.SYNTAX, CONTINUE)  # syntax first


def test_fakehelo() -> None:
    s = session()
    assert s.fakehelo is None
    s.command(b"HELO Client.Example.NET")
    assert s.fakehelo is None  # the same name as TCPREMOTEHOST, case aside
    s.command(b"HELO liar.example")
    assert s.fakehelo == b"liar.example"
    s.command(b"HELO")
    assert s.fakehelo == b""


# --- the DATA filter -----------------------------------------------------------------------

def blast_all(data: bytes, step: int = 0) -> tuple[int, int, bytes, Blast]:
    b = Blast()
    if not step:
        status, used = b.feed(data)
        return status, used, b.take(), b
    pos = 0
    out = b""
    while True:
        piece = data[pos:pos + step]
        status, used = b.feed(piece)
        out += b.take()
        if status != MORE or pos + step >= len(data):
            return status, pos + used, out, b
        pos += step


@pytest.mark.parametrize("step", [0, 1, 2, 3, 7])
@pytest.mark.parametrize("wire, message, tail", [
    (b"Subject: a\r\n\r\nbody\r\n.\r\n", b"Subject: a\n\nbody\n", b""),
    (b".\r\n", b"", b""),
    (b"a\r\n.\r\nQUIT\r\n", b"a\n", b"QUIT\r\n"),
    (b"..dot\r\n.\r\n", b".dot\n", b""),
    (b".x\r\n.\r\n", b"x\n", b""),
    (b"..\r\n.\r\n", b".\n", b""),
    (b".\rx\r\n.\r\n", b".\rx\n", b""),        # a dot before CR stays
    (b".\r\r\n.\r\n", b".\r\n", b""),
    (b"a\rb\r\n.\r\n", b"a\rb\n", b""),        # a lone CR stays
    (b"a\r\r\n.\r\n", b"a\r\n", b""),
    (b"a\r\n.\r\r\n.\r\n", b"a\n.\r\n", b""),
    (b"a\0b\x80\r\n.\r\n", b"a\0b\x80\n", b""),
    (b"a\r\n. \r\n.\r\n", b"a\n \n", b""),
])
def test_blast(wire: bytes, message: bytes, tail: bytes, step: int) -> None:
    status, used, out, _ = blast_all(wire, step)
    assert (status, out, wire[used:]) == (END, message, tail)


@pytest.mark.parametrize("wire", [b"a\n", b"a\r\nb\n", b"\n", b"a\r\n\n", b"a\r\n.\n", b"hdr\r\n\r\nbody\nmore"])
def test_blast_bare_lf(wire: bytes) -> None:
    assert Blast().feed(wire)[0] == STRAY_NEWLINE


def test_blast_hops_counted_in_header_only() -> None:
    head = b"Received: x\r\nDELIVERED-TO: y\r\nreceivedfoo\r\nDeliveredbar\r\nX-Received: no\r\n"
    status, _, _, b = blast_all(head + b"\r\nReceived: body\r\n.\r\n")
    assert status == END and b.hops == 4
    status, _, _, b = blast_all(b"received\r\n.Received: stuffed\r\n.\r\n")
    assert b.hops == 1


def test_blast_long_lines_stream() -> None:
    line = b"x" * (LONG_LINE * 3 + 5)
    wire = b"Subject: big\r\n\r\n" + line + b"\r\n." + line + b"\r\n.\r\n"
    b = Blast()
    out = b""
    biggest = 0
    for i in range(0, len(wire), 4096):
        status, _ = b.feed(wire[i:i + 4096])
        out += b.take()
        biggest = max(biggest, len(b._part))
        if status != MORE:
            break
    assert status == END
    assert out == b"Subject: big\n\n" + line + b"\n" + line + b"\n"
    assert biggest <= LONG_LINE + 4096
    assert b.size == len(out)


def test_blast_long_line_with_bare_lf_at_its_end() -> None:
    b = Blast()
    assert b.feed(b"y" * (LONG_LINE + 10))[0] == MORE
    assert b.feed(b"yy\n")[0] == STRAY_NEWLINE


def test_blast_long_dot_line_keeps_crlf_across_pieces() -> None:
    b = Blast()
    assert b.feed(b"." + b"z" * LONG_LINE + b"\r")[0] == MORE
    assert b.feed(b"\n.\r\n") == (END, 4)
    assert b.take() == b"z" * LONG_LINE + b"\n"


# --- Received and the reply after DATA -----------------------------------------------------

def test_received_line() -> None:
    assert date822(0) == b"1 Jan 1970 00:00:00 -0000"
    assert date822(1234567890) == b"13 Feb 2009 23:31:30 -0000"
    assert safe(b"a b(c)\x80%+/=:-[]@.") == b"a?b?c??%+/=:-[]@."
    got = received(b"SMTP", b"mx.example.com", b"192.0.2.1", b"client.example.net", b"joe", b"liar", 1234567890)
    assert got == (b"Received: from client.example.net (HELO liar) (joe@192.0.2.1)\n"
                   b"  by mx.example.com with SMTP; 13 Feb 2009 23:31:30 -0000\n")
    got = received(b"QMTP", b"unknown", b"unknown", b"unknown", None, None, 0)
    assert got == b"Received: from unknown (unknown)\n  by unknown with QMTP; 1 Jan 1970 00:00:00 -0000\n"
    got = received(b"SMTP", b"l", b"i", b"h", None, b"", 0)
    assert got.startswith(b"Received: from h (HELO ) (i)\n")


def test_peer_from_env() -> None:
    p = Peer.from_env({})
    assert (p.remoteip, p.remotehost, p.remoteinfo, p.local) == (b"unknown", b"unknown", None, b"unknown")
    p = Peer.from_env({b"TCPLOCALIP": b"10.0.0.1", b"TCPREMOTEINFO": b"", b"TCPREMOTEHOST": b"h"})
    assert (p.remotehost, p.remoteinfo, p.local) == (b"h", b"", b"10.0.0.1")
    p = Peer.from_env({b"TCPLOCALIP": b"10.0.0.1", b"TCPLOCALHOST": b""})
    assert p.local == b""  # set but empty still wins


def test_data_reply() -> None:
    assert data_reply(b"", False, False, 4321, 1234567890) == b"250 ok 1234567890 qp 4321\r\n"
    assert data_reply(b"", True, True, 1, 1) == b"250 ok 1 qp 1\r\n"
    zrd = b"Zqq read error (#4.3.0)"
    assert data_reply(zrd, True, True, 1, 1) == b"554 too many hops, this message is looping (#5.4.6)\r\n"
    assert data_reply(zrd, False, True, 1, 1) == \
        b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n"
    assert data_reply(zrd, False, False, 1, 1) == b"451 qq read error (#4.3.0)\r\n"
    assert data_reply(b"Dmail server permanently rejected message (#5.3.0)", False, False, 1, 1) == \
        b"554 mail server permanently rejected message (#5.3.0)\r\n"
