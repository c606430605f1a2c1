"""qmail-remote(8) as a process, against SMTP and DNS peers on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CI, QHome, expect, run, world_dir
from remotekit import DROP, SILENT, BlackHole, DnsServer, SmtpServer, dead_port

from pyqmail.remote import smtpclient as sc
from pyqmail.remote.qmail_rspawn import report as rspawn_report


@pytest.fixture
def dnsd() -> DnsServer:
    d = DnsServer({})
    yield d
    d.close()


def remote(h: QHome, dnsd: DnsServer, host: str, sender: str, *recips: str, message: bytes = b"Subject: t\n\nhi\n",
           env: dict[str, str] | None = None) -> bytes:
    """Run qmail-remote; return its output (it must exit 0)."""
    e = {"PATH": os.environ["PATH"], **dnsd.env, **(env or {})}
    res = expect(run([h.bin("qmail-remote"), host, sender, *recips], input=message, env=e), 0)
    return res.stdout


def route(h: QHome, srv: SmtpServer, domain: str = "example.com") -> None:
    h.control("smtproutes", f"{domain}:[127.0.0.1]:{srv.port}\n")


def test_usage(qhome: QHome, dnsd: DnsServer) -> None:
    assert remote(qhome, dnsd, "example.com", "s@x") == sc.USAGE + b"\0"
    assert sc.USAGE == b"DI (qmail-remote) was invoked improperly. (#5.3.5)\n"


def test_message_arrives_byte_for_byte(qhome: QHome, dnsd: DnsServer) -> None:
    message = (b"Subject: dots\n\n.leading dot\n..two dots\n.\nmiddle . dot\ncr lf\r\nbare\rcr\n"
               b"8-bit \xe9\xff\x00 nul\n\n")
    with SmtpServer() as srv:
        route(qhome, srv)
        out = remote(qhome, dnsd, "example.com", "s@x.org", "a@example.com", "b@example.com", message=message)
    assert out == b"r\0r\0K127.0.0.1 accepted message.\nRemote host said: 250 ok 12345 qp 1\n\0"
    s = srv.sessions[0]
    # EHLO first (for STARTTLS, issue 13); this server does not know it (502), so HELO follows.
    assert s.commands == [b"EHLO test.example.com", b"HELO test.example.com", b"MAIL FROM:<s@x.org>", b"RCPT TO:<a@example.com>",
                          b"RCPT TO:<b@example.com>", b"DATA", b"QUIT"]
    # notqmail 1.09: CR LF goes as CR LF, a bare CR as CR LF (qmail 1.03 sent "cr lf\r\r\n").
    assert s.data == (b"Subject: dots\r\n\r\n..leading dot\r\n...two dots\r\n..\r\nmiddle . dot\r\ncr lf\r\n"
                      b"bare\r\ncr\r\n8-bit \xe9\xff\x00 nul\r\n\r\n")


def _smtp_sink() -> str:
    for path in (shutil.which("smtp-sink"), "/usr/sbin/smtp-sink"):
        if path and Path(path).exists():
            return path
    if CI:
        pytest.fail("smtp-sink missing: .ci/run installs Debian's postfix (unconfigured)")
    pytest.skip("smtp-sink (Debian postfix) not installed")


def test_line_ends_as_postfix_smtp_sink_reads_them(qhome: QHome, dnsd: DnsServer) -> None:
    """Postfix's smtp-sink, a real SMTP server, reads the lines qmail-remote sends (its dump has LF ends)."""
    sink = _smtp_sink()
    base = world_dir()
    dump = base / "dump"
    base.chmod(0o777)  # smtp-sink drops to nobody when run as root
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sink, *(["-u", "nobody"] if os.geteuid() == 0 else []), "-D", str(dump), f"127.0.0.1:{port}", "5"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = b""
    try:
        deadline = time.monotonic() + 30
        while True:  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, argv
        qhome.control("smtproutes", f"example.com:[127.0.0.1]:{port}\n")
        # "x\r.\r\n" would end DATA early if the dot after a bare CR went unstuffed (notqmail 1.09
        # sends it so); the line "after" would then reach the server as a command.
        message = b"Subject: t\n\ncr lf\r\nbare\rcr\n.dot\nx\r.\r\nafter\nend\r"
        out = remote(qhome, dnsd, "example.com", "s@x.org", "a@example.com", message=message)
        assert out == b"r\0K127.0.0.1 accepted message.\nRemote host said: 250 2.0.0 Ok\n\0"
        want = b"Subject: t\n\ncr lf\nbare\ncr\n.dot\nx\n.\nafter\nend\n"
        while not dump.exists() or want not in dump.read_bytes():
            assert time.monotonic() < deadline, dump.read_bytes() if dump.exists() else "no dump"
            time.sleep(0.05)  # smtp-sink writes its dump file on its own time
        assert dump.read_bytes().endswith(b"\n" + want + b"\n")
    finally:
        proc.kill()
        err = proc.communicate()[1]
        shutil.rmtree(base, ignore_errors=True)
    assert b"fatal" not in err, err


def test_empty_message_and_bounce_sender(qhome: QHome, dnsd: DnsServer) -> None:
    with SmtpServer() as srv:
        route(qhome, srv)
        out = remote(qhome, dnsd, "example.com", "", "a@example.com", message=b"")
    assert out.startswith(b"r\0K")
    assert srv.sessions[0].commands[1] == b"HELO test.example.com" and srv.sessions[0].commands[2] == b"MAIL FROM:<>"
    assert srv.sessions[0].data == b""


def test_helohost_and_quoting(qhome: QHome, dnsd: DnsServer) -> None:
    qhome.control("helohost", "helo.example.net\n")
    with SmtpServer() as srv:
        route(qhome, srv)
        remote(qhome, dnsd, "example.com", "a b@x", 'we"ird@example.com', "noat", "x..y@example.com")
    assert srv.sessions[0].commands[:6] == [
        b"EHLO helo.example.net", b"HELO helo.example.net", b'MAIL FROM:<"a b"@x>', b'RCPT TO:<"we\\"ird"@example.com>',
        b"RCPT TO:<noat>", b'RCPT TO:<"x..y"@example.com>']


def test_no_helohost_no_me(qhome: QHome, dnsd: DnsServer) -> None:
    qhome.control("me", None)
    assert remote(qhome, dnsd, "example.com", "s@x", "a@example.com") == b"ZUnable to read control files. (#4.3.0)\n\0"


def test_recipient_reports_and_partial_acceptance(qhome: QHome, dnsd: DnsServer) -> None:
    rcpt = [b"250 ok\r\n", b"451 try later\r\n", b"553 no such user\r\n"]
    with SmtpServer(replies={"RCPT": rcpt}) as srv:
        route(qhome, srv)
        out = remote(qhome, dnsd, "example.com", "s@x", "a@example.com", "b@example.com", "c@example.com")
    assert out == (b"r\0"
                   b"s127.0.0.1 does not like recipient.\nRemote host said: 451 try later\n\0"
                   b"h127.0.0.1 does not like recipient.\nRemote host said: 553 no such user\n\0"
                   b"K127.0.0.1 accepted message.\nRemote host said: 250 ok 12345 qp 1\n\0")


def test_all_recipients_refused_gives_up(qhome: QHome, dnsd: DnsServer) -> None:
    with SmtpServer(replies={"RCPT": b"451 greylisted\r\n"}) as srv:
        route(qhome, srv)
        out = remote(qhome, dnsd, "example.com", "s@x", "a@example.com")
    assert out == (b"s127.0.0.1 does not like recipient.\nRemote host said: 451 greylisted\n\0"
                   b"DGiving up on 127.0.0.1.\n\0")
    assert srv.sessions[0].commands[-1] == b"QUIT"
    # qmail-rspawn reads an 's' as a temporary failure of that recipient
    assert rspawn_report(0, out) == (b"Z127.0.0.1 does not like recipient.\nRemote host said: 451 greylisted\n"
                                     b"Giving up on 127.0.0.1.\n")
    with SmtpServer(replies={"RCPT": b"550 5.1.1 unknown\r\n"}) as srv:
        route(qhome, srv)
        out = remote(qhome, dnsd, "example.com", "s@x", "a@example.com")
    assert out == (b"h127.0.0.1 does not like recipient.\nRemote host said: 550 5.1.1 unknown\n\0"
                   b"DGiving up on 127.0.0.1.\n\0")
    assert rspawn_report(0, out).startswith(b"D127.0.0.1 does not like recipient.\n")


@pytest.mark.parametrize("replies, expected", [
    ({"HELO": b"501 bad\r\n"}, b"ZConnected to 127.0.0.1 but my name was rejected.\nRemote host said: 501 bad\n"),
    ({"MAIL": b"553 sender\r\n"}, b"DConnected to 127.0.0.1 but sender was rejected.\nRemote host said: 553 sender\n"),
    ({"MAIL": b"451 sender\r\n"}, b"ZConnected to 127.0.0.1 but sender was rejected.\nRemote host said: 451 sender\n"),
    ({"DATA": b"554 no data\r\n"}, b"r\0D127.0.0.1 failed on DATA command.\nRemote host said: 554 no data\n"),
    ({"DATA": b"451 no data\r\n"}, b"r\0Z127.0.0.1 failed on DATA command.\nRemote host said: 451 no data\n"),
    ({".": b"554 spam\r\n"}, b"r\0D127.0.0.1 failed after I sent the message.\nRemote host said: 554 spam\n"),
    ({".": b"452 full\r\n"}, b"r\0Z127.0.0.1 failed after I sent the message.\nRemote host said: 452 full\n"),
    ({".": b"250-first\r\n250-second\r\n250 third\r\n"},
     b"r\0K127.0.0.1 accepted message.\nRemote host said: 250-first\n250-second\n250 third\n"),
])
def test_replies_at_each_stage(qhome: QHome, dnsd: DnsServer, replies: dict[str, bytes], expected: bytes) -> None:
    with SmtpServer(replies=replies) as srv:
        route(qhome, srv)
        assert remote(qhome, dnsd, "example.com", "s@x", "a@example.com") == expected + b"\0"


def test_greeting_failed(qhome: QHome, dnsd: DnsServer) -> None:
    with SmtpServer(greeting=b"554 go away\r\n") as srv:
        route(qhome, srv)
        out = remote(qhome, dnsd, "example.com", "s@x", "a@example.com")
    assert out == b"ZConnected to 127.0.0.1 but greeting failed.\nRemote host said: 554 go away\n\0"
    assert srv.sessions[0].commands == [b"QUIT"]


def test_partial_final_line(qhome: QHome, dnsd: DnsServer) -> None:
    with SmtpServer() as srv:
        route(qhome, srv)
        out = remote(qhome, dnsd, "example.com", "s@x", "a@example.com", message=b"no newline")
    assert out == b"r\0DSMTP cannot transfer messages with partial final lines. (#5.6.2)\n\0"


def test_connection_refused(qhome: QHome, dnsd: DnsServer) -> None:
    qhome.control("smtproutes", f":[127.0.0.1]:{dead_port()}\n")
    out = remote(qhome, dnsd, "example.com", "s@x", "a@example.com")
    assert out == b"ZSorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n\0"


# -- hostile peers --------------------------------------------------------------------------

def test_peer_never_answers(qhome: QHome, dnsd: DnsServer) -> None:
    qhome.control("timeoutremote", "1\n")
    with SmtpServer(greeting=SILENT) as srv:
        route(qhome, srv)
        out = remote(qhome, dnsd, "example.com", "s@x", "a@example.com")
    assert out == b"ZConnected to 127.0.0.1 but connection died. (#4.4.2)\n\0"


def test_peer_goes_silent_after_data(qhome: QHome, dnsd: DnsServer) -> None:
    qhome.control("timeoutremote", "1\n")
    with SmtpServer(replies={".": SILENT}) as srv:
        route(qhome, srv)
        out = remote(qhome, dnsd, "example.com", "s@x", "a@example.com")
    assert out == b"r\0ZConnected to 127.0.0.1 but connection died. Possible duplicate! (#4.4.2)\n\0"


def test_ten_megabyte_reply_line(qhome: QHome, dnsd: DnsServer) -> None:
    huge = b"554 " + b"x" * (10 << 20) + b"\r\n"
    with SmtpServer(greeting=huge) as srv:
        route(qhome, srv)
        out = remote(qhome, dnsd, "example.com", "s@x", "a@example.com")
    assert out == (b"ZConnected to 127.0.0.1 but greeting failed.\nRemote host said: 554 "
                   + b"x" * (sc.HUGE_SMTP_TEXT - 4) + b"\0")
    ok = b"250 " + b"y" * (10 << 20) + b"\r\n"
    with SmtpServer(replies={"RCPT": ok}) as srv:
        route(qhome, srv)
        out = remote(qhome, dnsd, "example.com", "s@x", "a@example.com")
    assert out.startswith(b"r\0K127.0.0.1 accepted message.")


def test_peer_drops_mid_data(qhome: QHome, dnsd: DnsServer) -> None:
    message = b"Subject: big\n\n" + (b"z" * 999 + b"\n") * 16000
    with SmtpServer(drop_in_data=True) as srv:
        route(qhome, srv)
        out = remote(qhome, dnsd, "example.com", "s@x", "a@example.com", message=message)
    assert out == b"r\0ZConnected to 127.0.0.1 but connection died. (#4.4.2)\n\0"


def test_peer_drops_after_final_dot(qhome: QHome, dnsd: DnsServer) -> None:
    with SmtpServer(replies={".": DROP}) as srv:
        route(qhome, srv)
        out = remote(qhome, dnsd, "example.com", "s@x", "a@example.com")
    assert out == b"r\0ZConnected to 127.0.0.1 but connection died. Possible duplicate! (#4.4.2)\n\0"


@pytest.mark.parametrize("greeting, expected", [
    (b"hello there\r\n", b"ZConnected to 127.0.0.1 but greeting failed.\nRemote host said: hello there\n\0"),
    (b"220\r\n", None),  # a bare code is a complete reply
    # "22\n" leaves the code a byte short: the reply runs on into a next line that never comes
    (b"22\n", b"ZConnected to 127.0.0.1 but connection died. (#4.4.2)\n\0"),
    (b"220-and no end", b"ZConnected to 127.0.0.1 but connection died. (#4.4.2)\n\0"),
    (b"", b"ZConnected to 127.0.0.1 but connection died. (#4.4.2)\n\0"),
    (b"220 nul\0 in text\r\n", None),
])
def test_malformed_greetings(qhome: QHome, dnsd: DnsServer, greeting: bytes, expected: bytes | None) -> None:
    qhome.control("timeoutremote", "1\n")
    with SmtpServer(greeting=greeting if greeting else DROP) as srv:
        route(qhome, srv)
        out = remote(qhome, dnsd, "example.com", "s@x", "a@example.com")
    if expected is None:
        assert out.startswith(b"r\0K127.0.0.1 accepted message.")
    else:
        assert out == expected


def test_nul_in_reply_text_is_shown_as_question_mark(qhome: QHome, dnsd: DnsServer) -> None:
    with SmtpServer(replies={".": b"554 bad\0byte\r\n"}) as srv:
        route(qhome, srv)
        out = remote(qhome, dnsd, "example.com", "s@x", "a@example.com")
    assert out == b"r\0D127.0.0.1 failed after I sent the message.\nRemote host said: 554 bad?byte\n\0"


# -- smtproutes, the book's examples ----------------------------------------------------------

def test_book_smtproutes_examples(qhome: QHome) -> None:
    with SmtpServer() as real, SmtpServer() as two, SmtpServer() as three, SmtpServer() as sub, \
            SmtpServer() as isp, DnsServer({("realdomain.com", "A"): ["127.0.0.1"],
                                              ("realdomain.com", "MX"): ["10 elsewhere.invalid."],
                                              ("anotherdomain.com", "A"): ["127.0.0.1"]}) as d:
        qhome.control("smtproutes", "\n".join([
            f"example.com:realdomain.com:{real.port}",
            f"example2.com:[127.0.0.1]:{two.port}",
            f"example3.com:anotherdomain.com:{three.port}",
            f".example.com:[127.0.0.1]:{sub.port}",
            "example4.com:",
            f":[127.0.0.1]:{isp.port}",
            ""]))
        cases = [("example.com", real), ("EXAMPLE2.com", two), ("example3.com", three),
                 ("deep.sub.example.com", sub), ("elsewhere.org", isp)]
        for host, srv in cases:
            out = remote(qhome, d, host, "s@x", f"u@{host}")
            assert out.startswith(b"r\0K127.0.0.1 accepted message."), (host, out)
            assert srv.sessions[-1].commands[3] == f"RCPT TO:<u@{host}>".encode()
        assert [len(s.sessions) for s in (real, two, three, sub, isp)] == [1, 1, 1, 1, 1]
        assert ("realdomain.com", "MX") not in d.queries  # a relay is used as its only MX
        # "example4.com:" is an exception from the catch-all: DNS as usual, which knows nothing
        out = remote(qhome, d, "example4.com", "s@x", "u@example4.com")
        assert out == b"DSorry, I couldn't find any host named example4.com. (#5.1.2)\n\0"
        assert ("example4.com", "MX") in d.queries


def test_smtproutes_relay_name_unknown(qhome: QHome, dnsd: DnsServer) -> None:
    qhome.control("smtproutes", "example.com:nowhere.invalid:26\n")
    out = remote(qhome, dnsd, "example.com", "s@x", "u@example.com")
    assert out == b"DSorry, I couldn't find any host named nowhere.invalid. (#5.1.2)\n\0"


# -- DNS --------------------------------------------------------------------------------------

def test_best_mx_is_me(qhome: QHome) -> None:
    with DnsServer({("example.com", "MX"): ["10 mx.example.com."],
                    ("mx.example.com", "A"): ["127.0.0.1"]}) as d:
        out = remote(qhome, d, "example.com", "s@x", "u@example.com")
    assert out == sc.AMBIGMX + b"\0"
    assert sc.AMBIGMX == (b"DSorry. Although I'm listed as a best-preference MX or A for that host,\n"
                          b"it isn't in my control/locals file, so I don't treat it as local. (#5.4.6)\n")


def test_a_record_is_me(qhome: QHome) -> None:
    with DnsServer({("example.com", "A"): ["127.0.0.1"]}) as d:
        out = remote(qhome, d, "example.com", "s@x", "u@example.com")
    assert out == sc.AMBIGMX + b"\0"


def test_dns_failures(qhome: QHome) -> None:
    with DnsServer({("nomx.example.com", "TXT"): ['"x"'], ("mx.example.com", "MX"): ["10 gone.example.com."]},
                   servfail={"broken.example.com"}) as d:
        assert remote(qhome, d, "nxdomain.example.com", "s@x", "u@nxdomain.example.com") == \
            b"DSorry, I couldn't find any host named nxdomain.example.com. (#5.1.2)\n\0"
        assert remote(qhome, d, "broken.example.com", "s@x", "u@nxdomain.example.com") == \
            b"ZSorry, I couldn't find any host by that name. (#4.1.2)\n\0"
        # the recipient's domain is looked up for a CNAME first
        assert remote(qhome, d, "nxdomain.example.com", "s@x", "u@broken.example.com") == \
            b"ZCNAME lookup failed temporarily. (#4.4.3)\n\0"
        assert remote(qhome, d, "nomx.example.com", "s@x", "u@nomx.example.com") == \
            b"DSorry, I couldn't find any host named nomx.example.com. (#5.1.2)\n\0"
        assert remote(qhome, d, "mx.example.com", "s@x", "u@mx.example.com") == sc.NOMX + b"\0"


def test_outgoingip(qhome: QHome, dnsd: DnsServer) -> None:
    qhome.control("outgoingip", "127.0.0.3\n")
    with SmtpServer() as srv:
        route(qhome, srv)
        assert remote(qhome, dnsd, "example.com", "s@x", "u@example.com").startswith(b"r\0K")
    assert srv.sessions[0].peer == "127.0.0.3"


def test_ipv6_relay_by_aaaa(qhome: QHome) -> None:
    """Extension: a relay with only AAAA records is reached over IPv6."""
    try:
        srv = SmtpServer(host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    with srv, DnsServer({("v6.example.net", "AAAA"): ["::1"]}) as d:
        qhome.control("smtproutes", f"example.com:v6.example.net:{srv.port}\n")
        out = remote(qhome, d, "example.com", "s@x", "u@example.com")
    assert out == b"r\0K::1 accepted message.\nRemote host said: 250 ok 12345 qp 1\n\0"


def test_unsafe_host_in_text(qhome: QHome, dnsd: DnsServer) -> None:
    out = remote(qhome, dnsd, "bad host\x7f.example.com", "s@x", "u@x")
    assert out == b"DSorry, I couldn't find any host named bad?host?.example.com. (#5.1.2)\n\0"


def test_mx_delivery_on_port_25(qhome: QHome) -> None:
    """An MX on 127.0.0.2 (not one of this host's addresses) gets the mail; needs port 25."""
    try:
        probe = socket.socket()
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.2", 25))
        probe.close()
    except OSError:
        pytest.skip("cannot listen on 127.0.0.2:25")
    with SmtpServer(replies={".": b"250 mx took it\r\n"}, host="127.0.0.2", port=25) as mxsrv, DnsServer({("example.com", "MX"): ["10 mx1.example.com.", "20 me.example.com."],
                                        ("mx1.example.com", "A"): ["127.0.0.2"],
                                        ("me.example.com", "A"): ["127.0.0.1"],
                                        ("alias.example.com", "CNAME"): ["example.com."]}) as d:
        out = remote(qhome, d, "example.com", "s@x", "u@alias.example.com")
    assert out == b"r\0K127.0.0.2 accepted message.\nRemote host said: 250 mx took it\n\0"
    # the recipient's domain is a CNAME: qmail-remote sends the canonical name
    assert mxsrv.sessions[0].commands[3] == b"RCPT TO:<u@example.com>"


# -- tcpto ------------------------------------------------------------------------------------

def _tcpto(h: QHome) -> Path:
    return h.queue / "lock" / "tcpto"


def test_timeouts_recorded_and_host_skipped(qhome: QHome, dnsd: DnsServer) -> None:
    hole = BlackHole()
    try:
        qhome.control("timeoutconnect", "1\n")
        qhome.control("smtproutes", f":[127.0.0.1]:{hole.port}\n")
        noconn = b"ZSorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n\0"
        assert remote(qhome, dnsd, "example.com", "s@x", "u@example.com") == noconn
        table = _tcpto(qhome).read_bytes()
        assert len(table) == 1024 and table[:5] == b"\x7f\0\0\x01\x01" and table[16:] == bytes(1008)
        listing = expect(run([qhome.bin("qmail-tcpto")]), 0).stdout
        assert listing.startswith(b"127.0.0.1 timed out ") and listing.endswith(b" seconds ago; # recent timeouts: 1\n")
        # A second timeout within two minutes of the first is not counted again...
        assert remote(qhome, dnsd, "example.com", "s@x", "u@example.com") == noconn
        assert _tcpto(qhome).read_bytes()[4] == 1
        # ...one later is: the host then counts two timeouts and is skipped without trying.
        when = int.from_bytes(table[8:12], "little") - 300
        data = bytearray(table)
        data[8:12] = when.to_bytes(4, "little")
        _tcpto(qhome).write_bytes(bytes(data))
        assert remote(qhome, dnsd, "example.com", "s@x", "u@example.com") == noconn
        again = _tcpto(qhome).read_bytes()
        assert again[4] == 2
        import time
        t0 = time.monotonic()
        assert remote(qhome, dnsd, "example.com", "s@x", "u@example.com") == noconn
        assert time.monotonic() - t0 < 1  # skipped: no connection attempt, no 1-second wait
        assert _tcpto(qhome).read_bytes() == again
        assert b"# recent timeouts: 2\n" in expect(run([qhome.bin("qmail-tcpto")]), 0).stdout
        expect(run([qhome.bin("qmail-tcpok")]), 0)
        assert _tcpto(qhome).read_bytes() == bytes(1024)
        assert expect(run([qhome.bin("qmail-tcpto")]), 0).stdout == b""
    finally:
        hole.close()


def test_successful_connection_clears_the_count(qhome: QHome, dnsd: DnsServer) -> None:
    rec = bytearray(1024)
    rec[0:5] = b"\x7f\0\0\x01\x01"
    _tcpto(qhome).write_bytes(bytes(rec))
    with SmtpServer() as srv:
        route(qhome, srv)
        assert remote(qhome, dnsd, "example.com", "s@x", "u@example.com").startswith(b"r\0K")
    assert _tcpto(qhome).read_bytes()[:5] == b"\x7f\0\0\x01\0"
