"""qmail-smtpd's SIZE (RFC 1870), CHUNKING/BDAT (RFC 3030) and ENHANCEDSTATUSCODES (RFC 2034), issue 18.3-5:
exact dialogues on a socketpair, smtplib over TCP, and the pure parts (bdat.Chunks, replies.enhance)."""

from __future__ import annotations

import shutil
import smtplib
import socket
import time
from pathlib import Path

import pytest

from conftest import CI, QHome, expect, run
from queuefmt import RECEIVED
from smtpdkit import Conversation, ForkServer, queued
from test_resource_bounds import PEAK_MIB, measured
from test_smtpd import ACCEPTED, GREETING, SMTPD_RECEIVED, TCP, assert_empty_queue, dialogue, no_certificate, talk

from pyqmail.smtpd import replies
from pyqmail.smtpd.bdat import Chunks, parse

EHLO = b"250-test.example.com\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE %d\r\n250 CHUNKING\r\n"
EHLO_ESC = (b"250-test.example.com\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 0\r\n250-CHUNKING\r\n"
            b"250 ENHANCEDSTATUSCODES\r\n")
MB = 1024 * 1024


@pytest.fixture(autouse=True)
def _no_leftover_servers():
    yield
    Conversation.close_all()


@pytest.fixture
def qhome(qhome: QHome) -> QHome:
    """A home whose qmail-smtpd offers SIZE and CHUNKING (control/smtpsize, control/chunking), as `qmail up`'s."""
    qhome.control("smtpsize", "1\n")
    qhome.control("chunking", "1\n")
    return qhome


def test_bare_qmail_smtpd_keeps_qmails_ehlo_and_ignores_size_and_bdat(qhome: QHome) -> None:
    """Without the switches (a bare qmail-smtpd): qmail's EHLO, SIZE= ignored, BDAT unimplemented."""
    no_certificate(qhome)
    (qhome.path / "control" / "smtpsize").unlink()
    (qhome.path / "control" / "chunking").unlink()
    qhome.control("databytes", "1000\n")
    c = talk(qhome)
    dialogue(c, (b"EHLO c.example\r\n", b"250-test.example.com\r\n250-PIPELINING\r\n250 8BITMIME\r\n"),
             (b"MAIL FROM:<a@c.example> SIZE=10485760\r\n", b"250 ok\r\n"),
             (b"BDAT 3 LAST\r\n", replies.UNIMPLEMENTED))
    c.send(b"QUIT\r\n")
    assert c.rest() == b"221 test.example.com\r\n"
    assert c.finish()[0] == 0


def test_switches_by_environment(qhome: QHome) -> None:
    """$SMTPSIZE and $CHUNKING over the control files: `0` turns each off, anything else on."""
    no_certificate(qhome)
    c = talk(qhome, {"SMTPSIZE": "0", "CHUNKING": "0"})
    dialogue(c, (b"EHLO c.example\r\n", b"250-test.example.com\r\n250-PIPELINING\r\n250 8BITMIME\r\n"))
    c.send(b"QUIT\r\n")
    c.rest()
    c.finish()
    (qhome.path / "control" / "smtpsize").unlink()
    (qhome.path / "control" / "chunking").unlink()
    c = talk(qhome, {"SMTPSIZE": "1", "CHUNKING": "yes"})
    dialogue(c, (b"EHLO c.example\r\n", EHLO % 0))
    c.send(b"QUIT\r\n")
    c.rest()
    c.finish()


def body(mess: bytes) -> bytes:
    """Return a queued message after qmail-queue's and qmail-smtpd's Received lines."""
    rest = mess[RECEIVED.match(mess).end():]
    return rest[SMTPD_RECEIVED.match(rest).end():]


def envelope(c: Conversation) -> None:
    dialogue(c, (b"EHLO c.example\r\n", EHLO % 0),
             (b"MAIL FROM:<a@c.example>\r\n", b"250 ok\r\n"),
             (b"RCPT TO:<x@test.example.com>\r\n", b"250 ok\r\n"))


# --- SIZE ------------------------------------------------------------------------------------

def test_ehlo_shows_size_from_databytes(qhome: QHome) -> None:
    no_certificate(qhome)
    qhome.control("databytes", "1048576\n")
    c = talk(qhome)
    dialogue(c, (b"EHLO c.example\r\n", EHLO % MB), (b"HELO c.example\r\n", b"250 test.example.com\r\n"))


def test_declared_size_over_databytes_refused_at_mail_nothing_read_after(qhome: QHome) -> None:
    """10 MB declared against 1 MB databytes: 552 at MAIL; the session has no transaction and reads no data."""
    no_certificate(qhome)
    qhome.control("databytes", "1048576\n")
    c = talk(qhome)
    dialogue(c, (b"EHLO c.example\r\n", EHLO % MB),
             (b"MAIL FROM:<a@c.example> SIZE=10485760\r\n", replies.DATABYTES),
             (b"RCPT TO:<x@test.example.com>\r\n", replies.WANT_MAIL),
             (b"DATA\r\n", replies.WANT_MAIL),
             (b"MAIL FROM:<a@c.example> SIZE=1048576 BODY=8BITMIME\r\n", b"250 ok\r\n"),  # at the limit
             (b"MAIL FROM:<a@c.example> size=99999999999999999999999999\r\n", replies.DATABYTES),
             (b"MAIL FROM:<a@c.example> SIZE=junk\r\n", b"250 ok\r\n"))  # as qmail: a parameter it cannot read is ignored
    c.send(b"QUIT\r\n")
    assert c.rest() == b"221 test.example.com\r\n"
    assert c.finish()[0] == 0
    assert_empty_queue(qhome)


def test_smtplib_sends_size_and_gets_552_before_data(qhome: QHome) -> None:
    """smtplib sends SIZE= because EHLO offers it; the 552 comes at MAIL, so the 10 MB are never sent."""
    no_certificate(qhome)
    qhome.control("databytes", "1048576\n")
    msg = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n"
    msg *= 10 * 1024
    with ForkServer(qhome.bin("qmail-smtpd")) as srv:
        with smtplib.SMTP("127.0.0.1", srv.port, local_hostname="c.example", timeout=30) as s:
            start = time.monotonic()
            sent = []
            send = s.send
            s.send = lambda data: (sent.append(len(data)), send(data))[1]  # type: ignore[method-assign]
            with pytest.raises(smtplib.SMTPSenderRefused) as e:
                s.sendmail("a@c.example", ["x@test.example.com"], msg)
            assert sum(sent) < 100  # MAIL FROM:<a@c.example> size=10... only
            assert (e.value.smtp_code, e.value.smtp_error) == (552, replies.DATABYTES[4:-2])
            assert s.does_esmtp and s.esmtp_features["size"] == "1048576"
            assert s.noop() == (250, b"ok")  # the session goes on: nothing of the message was read as commands
            assert time.monotonic() - start < 5
    assert_empty_queue(qhome)


# --- CHUNKING / BDAT -------------------------------------------------------------------------

def test_bdat_several_chunks_exact_bytes(qhome: QHome) -> None:
    """Chunks are appended exactly: no dot-stuffing, bare LF is data, CR LF -> LF also across chunks."""
    no_certificate(qhome)
    c = talk(qhome)
    envelope(c)
    parts = [b"Subject: chunks\r\n\r\n.leading dot\r\n", b"bare\nLF and a split CR", b"\nLF, bare CR\r here\r",
             b"\n.\r\n", b"end"]
    for p in parts[:-1]:
        c.send(b"BDAT %d\r\n" % len(p) + p)
        assert c.reply() == replies.chunk_ok(len(p))
    c.send(b"BDAT 0\r\n")  # an empty chunk is allowed
    assert c.reply() == replies.chunk_ok(0)
    c.send(b"BDAT %d LAST\r\n" % len(parts[-1]) + parts[-1])
    assert ACCEPTED.match(c.reply())
    dialogue(c, (b"DATA\r\n", replies.WANT_MAIL))  # the transaction is over
    c.send(b"QUIT\r\n")
    assert c.rest() == b"221 test.example.com\r\n"
    assert c.finish()[0] == 0
    ((mess, sender, rcpts),) = queued(qhome.queue)
    assert (sender, rcpts) == (b"a@c.example", [b"x@test.example.com"])
    assert SMTPD_RECEIVED.match(mess[RECEIVED.match(mess).end():]).group(0).startswith(
        b"Received: from client.example.net (HELO c.example) (192.0.2.7)\n  by 192.0.2.1 with SMTP; ")
    assert body(mess) == b"Subject: chunks\n\n.leading dot\nbare\nLF and a split CR\nLF, bare CR\r here\n.\nend"


def test_bdat_pipelined_in_one_write_and_last_alone(qhome: QHome) -> None:
    no_certificate(qhome)
    c = talk(qhome)
    c.send(b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\nRCPT TO:<x@test.example.com>\r\n"
           b"BDAT 5\r\nab\r\ncBDAT 0 last\r\nQUIT\r\n")
    assert c.reply() == EHLO % 0
    assert c.lines(3) == [b"250 ok\r\n", b"250 ok\r\n", replies.chunk_ok(5)]
    assert ACCEPTED.match(c.line())
    assert c.rest() == b"221 test.example.com\r\n"
    ((mess, _, _),) = queued(qhome.queue)
    assert body(mess) == b"ab\nc"


def test_bdat_chunk_size_lies(qhome: QHome) -> None:
    """More bytes than declared: the rest is the next command. Fewer, then QUIT: QUIT is data, nothing queued."""
    no_certificate(qhome)
    c = talk(qhome)
    envelope(c)
    c.send(b"BDAT 10 LAST\r\n0123456789NOOP\r\n")
    assert ACCEPTED.match(c.reply())
    assert c.reply() == b"250 ok\r\n"
    ((mess, _, _),) = queued(qhome.queue)
    assert body(mess) == b"0123456789"

    dialogue(c, (b"MAIL FROM:<a@c.example>\r\n", b"250 ok\r\n"), (b"RCPT TO:<y@test.example.com>\r\n", b"250 ok\r\n"))
    c.send(b"BDAT 100 LAST\r\nonly this\r\nQUIT\r\n")
    c.sock.shutdown(socket.SHUT_WR)
    assert c.rest() == b""  # no reply: the chunk never ended
    assert c.finish()[0] == 1
    assert len(queued(qhome.queue)) == 1  # only the first message


def test_bdat_short_chunk_then_silence_times_out(qhome: QHome) -> None:
    """Fewer bytes than announced and a client that waits: timeoutsmtpd's 451, nothing queued."""
    no_certificate(qhome)
    qhome.control("timeoutsmtpd", "1")
    c = talk(qhome)
    envelope(c)
    c.send(b"BDAT 100 LAST\r\nonly ten b")
    start = time.monotonic()
    assert c.rest() == replies.TIMEOUT
    assert 0.9 < time.monotonic() - start < 20
    assert c.finish()[0] == 1
    assert_empty_queue(qhome)


def test_bdat_memory_bounded(qhome: QHome, tmp_path: Path) -> None:
    """One 96 MiB chunk: qmail-smtpd and its qmail-queue stay under the documented bound (test_resource_bounds)."""
    size = 96 << 20
    wire = (b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\nRCPT TO:<x@test.example.com>\r\n"
            b"BDAT %d LAST\r\n" % size + b"Subject: big\r\n\r\n" + b"z" * (size - 18) + b"\r\nQUIT\r\n")
    code, out, peak = measured(qhome.bin("qmail-smtpd"), wire, {"TCPREMOTEHOST": "c.example"}, tmp_path)
    assert code == 0
    lines = out.split(b"\r\n")
    assert lines[-4:-3] == [b"250 ok"] and ACCEPTED.match(lines[-3] + b"\r\n") and lines[-2].startswith(b"221 ")
    ((mess, _, _),) = queued(qhome.queue)
    assert len(body(mess)) == size - 3 and body(mess).endswith(b"zz\n")  # two CR LF in the header, one at the end
    assert peak < PEAK_MIB, f"qmail-smtpd peaked at {peak:.1f} MiB"


def test_bdat_out_of_order_and_mixed_with_data(qhome: QHome) -> None:
    """BDAT without MAIL or RCPT: 503 after its chunk is read and dropped; DATA after BDAT: 503."""
    no_certificate(qhome)
    c = talk(qhome)
    dialogue(c, (b"EHLO c.example\r\n", EHLO % 0))
    c.send(b"BDAT 6 LAST\r\nQUIT\r\n")  # the chunk is data even if it looks like a command
    assert c.reply() == replies.WANT_MAIL
    dialogue(c, (b"MAIL FROM:<a@c.example>\r\n", b"250 ok\r\n"))
    c.send(b"BDAT 4\r\nRSET")
    assert c.reply() == replies.WANT_RCPT
    dialogue(c, (b"RCPT TO:<x@test.example.com>\r\n", b"250 ok\r\n"))
    c.send(b"BDAT 3\r\nabc")
    assert c.reply() == replies.chunk_ok(3)
    dialogue(c, (b"DATA\r\n", replies.BDAT_AFTER),
             (b"RSET\r\n", b"250 flushed\r\n"),  # abandons the open message
             (b"BDAT 2 LAST\r\nxyNOOP\r\n", replies.WANT_MAIL),
             (b"", b"250 ok\r\n"),
             (b"MAIL FROM:<a@c.example>\r\n", b"250 ok\r\n"),
             (b"RCPT TO:<x@test.example.com>\r\n", b"250 ok\r\n"),
             (b"DATA\r\n", b"354 go ahead\r\n"))
    c.send(b"data\r\n.\r\n")
    assert ACCEPTED.match(c.reply())
    ((mess, _, _),) = queued(qhome.queue)
    assert body(mess) == b"data\n"


def test_bdat_syntax_error_ends_the_connection(qhome: QHome) -> None:
    no_certificate(qhome)
    c = talk(qhome)
    envelope(c)
    c.send(b"BDAT x\r\nwhatever\r\n")
    assert c.rest() == replies.BDAT_SYNTAX
    assert c.finish()[0] == 1
    assert_empty_queue(qhome)


def test_bdat_over_databytes_552_rest_of_chunk_dropped(qhome: QHome) -> None:
    no_certificate(qhome)
    qhome.control("databytes", "1000\n")
    c = talk(qhome)
    dialogue(c, (b"EHLO c.example\r\n", EHLO % 1000),
             (b"MAIL FROM:<a@c.example>\r\n", b"250 ok\r\n"), (b"RCPT TO:<x@test.example.com>\r\n", b"250 ok\r\n"))
    c.send(b"BDAT 600\r\n" + b"a" * 600)
    assert c.reply() == replies.chunk_ok(600)
    big = (b"RSET\r\n" * 1000)[:300000]  # what is dropped must never be read as commands
    c.send(b"BDAT %d\r\n" % len(big) + big)
    assert c.reply() == replies.DATABYTES
    c.send(b"BDAT 3 LAST\r\nabc")  # the client pipelined its last chunk: the transaction is over
    assert c.reply() == replies.WANT_MAIL
    c.send(b"QUIT\r\n")
    assert c.rest() == b"221 test.example.com\r\n"
    assert c.finish()[0] == 0
    assert_empty_queue(qhome)


def test_bdat_hops_counted_in_the_header(qhome: QHome) -> None:
    no_certificate(qhome)
    c = talk(qhome)
    envelope(c)
    msg = b"Received: x\r\n" * 60 + b"Delivered-To: y\r\n" * 40 + b"\r\n"
    c.send(b"BDAT %d\r\n" % 700 + msg[:700])  # a chunk boundary inside the header lines
    assert c.reply() == replies.chunk_ok(700)
    c.send(b"BDAT %d LAST\r\n" % (len(msg) - 700) + msg[700:])
    assert c.reply() == replies.TOO_MANY_HOPS
    assert_empty_queue(qhome)


def test_bdat_large_message_streams(qhome: QHome) -> None:
    """A 20 MB message in 4 MB chunks: queued whole (qmail-smtpd holds at most READ_SIZE bytes of it)."""
    no_certificate(qhome)
    c = talk(qhome)
    envelope(c)
    line = b"y" * 78 + b"\r\n"
    chunk = line * (4 * MB // len(line))
    for i in range(5):
        c.send(b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if i == 4 else b"") + chunk)
        reply = c.reply()
        assert reply == replies.chunk_ok(len(chunk)) if i < 4 else ACCEPTED.match(reply)
    ((mess, _, _),) = queued(qhome.queue)
    assert body(mess) == (b"y" * 78 + b"\n") * (5 * len(chunk) // len(line))


# --- ENHANCEDSTATUSCODES ---------------------------------------------------------------------

def test_enhanced_status_codes_after_ehlo_only(qhome: QHome) -> None:
    no_certificate(qhome)
    c = talk(qhome, {"ENHANCEDSTATUSCODES": "1"})
    # HELO mode: qmail's replies byte for byte
    dialogue(c, (b"HELO c.example\r\n", b"250 test.example.com\r\n"),
             (b"MAIL FROM:<a@c.example>\r\n", b"250 ok\r\n"),
             (b"RCPT TO:<x@elsewhere.example>\r\n", replies.NOGATEWAY),
             (b"EHLO c.example\r\n", EHLO_ESC),
             (b"NOOP\r\n", b"250 2.0.0 ok\r\n"),
             (b"HELP\r\n", b"214 2.0.0 " + replies.HELP[4:]),
             (b"VRFY x\r\n", b"252 2.0.0 " + replies.VRFY[4:]),
             (b"EXPN x\r\n", b"502 5.5.1 unimplemented (#5.5.1)\r\n"),
             (b"DATA\r\n", b"503 5.5.1 MAIL first (#5.5.1)\r\n"),
             (b"MAIL FROM:<a@c.example> SIZE=10\r\n", b"250 2.1.0 ok\r\n"),
             (b"RCPT TO:<x@elsewhere.example>\r\n",
              b"553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"),
             (b"RCPT TO:<x@test.example.com>\r\n", b"250 2.1.5 ok\r\n"),
             (b"BDAT 3\r\nabc", b"250 2.0.0 ok 3 bytes\r\n"),
             (b"RSET\r\n", b"250 2.0.0 flushed\r\n"),
             (b"MAIL FROM:<a@c.example>\r\n", b"250 2.1.0 ok\r\n"),
             (b"RCPT TO:<x@test.example.com>\r\n", b"250 2.1.5 ok\r\n"),
             (b"DATA\r\n", b"354 go ahead\r\n"))
    c.send(b"hi\r\n.\r\n")
    reply = c.reply()
    assert reply.startswith(b"250 2.0.0 ok ") and ACCEPTED.match(b"250 " + reply[10:])
    dialogue(c, (b"HELO c.example\r\n", b"250 test.example.com\r\n"), (b"NOOP\r\n", b"250 ok\r\n"),
             (b"EHLO c.example\r\n", EHLO_ESC))
    c.send(b"QUIT\r\n")
    assert c.rest() == b"221 2.0.0 test.example.com\r\n"


def test_enhanced_status_codes_off_by_default_and_by_control(qhome: QHome) -> None:
    no_certificate(qhome)
    c = talk(qhome)
    dialogue(c, (b"EHLO c.example\r\n", EHLO % 0), (b"NOOP\r\n", b"250 ok\r\n"))
    qhome.control("enhancedstatuscodes", "1\n")
    c = talk(qhome)
    dialogue(c, (b"EHLO c.example\r\n", EHLO_ESC), (b"NOOP\r\n", b"250 2.0.0 ok\r\n"))
    c = talk(qhome, {"ENHANCEDSTATUSCODES": "0"})  # tcprules can turn it off per client
    dialogue(c, (b"EHLO c.example\r\n", EHLO % 0), (b"NOOP\r\n", b"250 ok\r\n"))


def test_smtplib_with_enhanced_status_codes(qhome: QHome) -> None:
    no_certificate(qhome)
    qhome.control("enhancedstatuscodes", "1\n")
    qhome.control("databytes", "100\n")
    with ForkServer(qhome.bin("qmail-smtpd")) as srv:
        with smtplib.SMTP("127.0.0.1", srv.port, local_hostname="c.example", timeout=30) as s:
            s.ehlo()
            assert s.has_extn("enhancedstatuscodes") and s.has_extn("chunking")
            with pytest.raises(smtplib.SMTPSenderRefused) as e:
                s.sendmail("a@c.example", ["x@test.example.com"], b"x" * 200)
            assert e.value.smtp_error == b"5.3.4 " + replies.DATABYTES[4:-2]
            assert s.sendmail("a@c.example", ["x@test.example.com"], b"Subject: s\r\n\r\nok\r\n") == {}
    assert len(queued(qhome.queue)) == 1


def test_swaks_with_enhanced_status_codes(qhome: QHome) -> None:
    swaks = shutil.which("swaks")
    if swaks is None:
        if CI:
            pytest.fail("swaks is missing: .ci/run must install Debian's swaks")
        pytest.skip("swaks not installed")
    no_certificate(qhome)
    qhome.control("enhancedstatuscodes", "1\n")
    with ForkServer(qhome.bin("qmail-smtpd")) as srv:
        res = run([swaks, "--server", "127.0.0.1", "--port", str(srv.port), "--helo", "swaks.example",
                   "--from", "sender@swaks.example", "--to", "rcpt@test.example.com", "--body", "esc"], timeout=60)
        expect(res, 0)
        for line in (b"<-  250-CHUNKING", b"<-  250 ENHANCEDSTATUSCODES", b"<-  250 2.1.0 ok", b"<-  250 2.1.5 ok",
                     b"<-  354 go ahead", b"<-  250 2.0.0 ok ", b"<-  221 2.0.0 test.example.com"):
            assert line in res.stdout, res.explain()
        res = run([swaks, "--server", "127.0.0.1", "--port", str(srv.port), "--from", "sender@swaks.example",
                   "--to", "rcpt@elsewhere.example"], timeout=60)
        assert b"<** 553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)" in res.stdout
    ((_, sender, rcpts),) = queued(qhome.queue)
    assert (sender, rcpts) == (b"sender@swaks.example", [b"rcpt@test.example.com"])


# --- pure parts ------------------------------------------------------------------------------

@pytest.mark.parametrize("arg, want", [
    (b"0", (0, False)), (b"12 LAST", (12, True)), (b"12 last", (12, True)), (b"  7   LaSt ", (7, True)),
    (b"", None), (b"x", None), (b"-1", None), (b"12 FIRST", None), (b"1 LAST x", None), (b"9" * 19, None),
])
def test_bdat_parse(arg: bytes, want: tuple[int, bool] | None) -> None:
    assert parse(arg) == want


def test_chunks_any_split_gives_the_same_message() -> None:
    msg = (b"Received: a\r\nreceived: b\r\nDELIVERED-TO: c\r\nX-Received: no\r\n Received: no\r\nRece\r\n\r\n"
           b"Received: body, not a hop\r\nbare\nCR\r\r\nend\r")
    want = (b"Received: a\nreceived: b\nDELIVERED-TO: c\nX-Received: no\n Received: no\nRece\n\n"
            b"Received: body, not a hop\nbare\nCR\r\nend\r")
    for size in range(1, len(msg) + 1):
        ch = Chunks()
        out = b"".join(ch.feed(msg[i:i + size]) for i in range(0, len(msg), size)) + ch.end()
        assert (out, ch.hops, ch.size) == (want, 3, len(want)), size


def test_enhance_codes() -> None:
    assert replies.enhance(b"250 ok\r\n", b"2.1.5") == b"250 2.1.5 ok\r\n"
    assert replies.enhance(replies.TIMEOUT) == b"451 4.4.2 timeout (#4.4.2)\r\n"
    assert replies.enhance(b"550-first\r\n550 second (#5.7.1)\r\n") == b"550-5.7.1 first\r\n550 5.7.1 second (#5.7.1)\r\n"
    assert replies.enhance(b"451 wrong class (#5.7.1)\r\n") == b"451 4.7.1 wrong class (#5.7.1)\r\n"
    assert replies.enhance(b"550 5.7.1 has one\r\n") == b"550 5.7.1 has one\r\n"
    assert replies.enhance(b"354 go ahead\r\n334 VXNlcm5hbWU6\r\n") == b"354 go ahead\r\n334 VXNlcm5hbWU6\r\n"
    assert replies.enhance(b"421 x\r\n250 y\r\n") == b"421 4.0.0 x\r\n250 2.0.0 y\r\n"
    assert replies.enhance(b"") == b""
