"""The whole relay chain: tcpserver -> qmail-smtpd -> qmail-queue -> qmail-send -> qmail-rspawn
-> qmail-remote -> an SMTP server on 127.0.0.1, routed by control/smtproutes.

The site is a single-user home run by the test user (pqtest when root, as in sendkit); the
client relays because tcpserver's environment sets RELAYCLIENT, as the book's tcp.smtp rule
127.0.0.1:allow,RELAYCLIENT="" does.
"""

from __future__ import annotations

import re
import signal
import smtplib
import subprocess
from collections.abc import Iterator

import pytest

from conftest import expect, run
from remotekit import BlackHole, SmtpServer
from sendkit import Running, Site, make_site, maildir_messages, remove_site

FQDN = "test.example.com"
STATUS0 = b"status: local 0/10 remote 0/20"
SENDER = "joe@" + FQDN
BODY = b"Subject: chain\r\n\r\n.starts with a dot\r\nremote\r\n"


@pytest.fixture
def site() -> Iterator[Site]:
    s = make_site(FQDN)
    joe = s.mkdir("joe")
    s.maildir("joe/Maildir")
    s.assign([s.user_line("joe", joe)])
    yield s
    remove_site(s)


class Smtpd:
    """tcpserver running the site's qmail-smtpd on 127.0.0.1 as the site's user, relaying for all."""

    def __init__(self, site: Site) -> None:
        kw: dict[str, object] = {}
        if site.user is not None:
            kw = {"user": site.uid, "group": site.gid, "extra_groups": []}
        self.proc = subprocess.Popen(
            [site.home.bin("tcpserver"), "-1", "-HR", "-l", "mx." + FQDN, "127.0.0.1", "0",
             site.home.bin("qmail-smtpd")],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={"PATH": "/usr/bin:/bin", "RELAYCLIENT": ""}, **kw)  # type: ignore[call-overload]
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def send(self, rcpt: str, body: bytes = BODY) -> None:
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.example", timeout=30) as s:
            s.helo()
            s.mail(SENDER)
            assert s.rcpt(rcpt)[0] == 250
            assert s.data(body)[0] == 250

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _one_mess(site: Site) -> bytes:
    (path,) = [p for p in (site.home.queue / "mess").rglob("*") if p.is_file()]
    return path.read_bytes()


def _smtp_data(message: bytes) -> bytes:
    """The DATA bytes of message as qmail-remote sends it: CRLF lines, leading dots doubled."""
    lines = message.split(b"\n")[:-1]
    return b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines)


def _deliveries(lines: list[bytes]) -> list[bytes]:
    return [x.split(b": ", 1)[1] for x in lines if x.startswith(b"delivery ")]


def _ended(n: int) -> object:
    return lambda ls: sum(x.startswith(b"end msg ") for x in ls) >= n


def _start(site: Site) -> Running:
    d = Running(site, env=site.env(DNSCACHEIP="127.0.0.1:9"))
    d.wait_for(STATUS0)
    return d


def test_relayed_message_arrives_byte_for_byte(site: Site) -> None:
    with SmtpServer() as peer:
        site.home.control("smtproutes", f"far.example:[127.0.0.1]:{peer.port}\n")
        smtpd = Smtpd(site)
        try:
            smtpd.send("friend@far.example")
        finally:
            smtpd.close()
        # Queued before qmail-send runs, so the queue file can be read: what must arrive.
        queued = _one_mess(site)
        assert re.fullmatch(rb"Received: \(qmail \d+ invoked by uid \d+\); [^\n]+\n"
                            rb"Received: from unknown \(HELO client.example\) \(127.0.0.1\)\n"
                            rb"  by mx.test.example.com with SMTP; [^\n]+\n"
                            rb"Subject: chain\n\n.starts with a dot\nremote\n", queued), queued
        d = _start(site)
        try:
            lines = d.wait_for(_ended(1))
        finally:
            assert d.stop() == 0
    assert _deliveries(lines) == [b"success: 127.0.0.1_accepted_message./Remote_host_said:_250_ok_12345_qp_1/"]
    (s,) = peer.sessions
    assert s.commands == [b"EHLO " + FQDN.encode(), b"HELO " + FQDN.encode(), b"MAIL FROM:<joe@test.example.com>",
                          b"RCPT TO:<friend@far.example>", b"DATA", b"QUIT"]
    assert s.data == _smtp_data(queued)
    assert b"\r\n..starts with a dot\r\n" in s.data


def test_4xx_at_rcpt_defers_then_alrm_delivers(site: Site) -> None:
    with SmtpServer(replies={"RCPT": [b"451 mailbox busy\r\n", b"250 ok\r\n"]}) as peer:
        site.home.control("smtproutes", f"far.example:[127.0.0.1]:{peer.port}\n")
        smtpd = Smtpd(site)
        try:
            smtpd.send("friend@far.example")
        finally:
            smtpd.close()
        queued = _one_mess(site)
        d = _start(site)
        try:
            deferral = (b"deferral: 127.0.0.1_does_not_like_recipient./"
                        b"Remote_host_said:_451_mailbox_busy/Giving_up_on_127.0.0.1./")
            d.wait_for(lambda ls: deferral in _deliveries(ls))
            assert not _ended(1)(d.lines())  # type: ignore[operator]
            # The retry is minutes away; ALRM makes it now.
            d.signal(signal.SIGALRM)
            lines = d.wait_for(_ended(1))
        finally:
            assert d.stop() == 0
    assert _deliveries(lines) == [deferral,
                                  b"success: 127.0.0.1_accepted_message./Remote_host_said:_250_ok_12345_qp_1/"]
    first, second = peer.sessions
    assert first.commands[-2:] == [b"RCPT TO:<friend@far.example>", b"QUIT"] and first.data == b""
    assert second.data == _smtp_data(queued)


def test_5xx_at_rcpt_bounces_with_the_remote_text(site: Site) -> None:
    with SmtpServer(replies={"RCPT": b"550 no such user here\r\n"}) as peer:
        site.home.control("smtproutes", f"far.example:[127.0.0.1]:{peer.port}\n")
        smtpd = Smtpd(site)
        try:
            smtpd.send("nobody@far.example")
        finally:
            smtpd.close()
        d = _start(site)
        try:
            lines = d.wait_for(_ended(2))  # the message, then its bounce
        finally:
            assert d.stop() == 0
    assert _deliveries(lines)[0] == (b"failure: 127.0.0.1_does_not_like_recipient./"
                                     b"Remote_host_said:_550_no_such_user_here/Giving_up_on_127.0.0.1./")
    (bounce,) = maildir_messages(site.base / "joe" / "Maildir")
    assert bounce.startswith(b"Return-Path: <>\nDelivered-To: joe@test.example.com\n")
    assert (b"<nobody@far.example>:\n127.0.0.1 does not like recipient.\n"
            b"Remote host said: 550 no such user here\nGiving up on 127.0.0.1.\n") in bounce
    assert b"Subject: failure notice\n" in bounce
    assert b"\nSubject: chain\n\n.starts with a dot\nremote\n" in bounce


def test_dead_port_is_recorded_in_tcpto(site: Site) -> None:
    hole = BlackHole()
    try:
        site.home.control("timeoutconnect", "1\n")
        site.home.control("smtproutes", f"far.example:[127.0.0.1]:{hole.port}\n")
        smtpd = Smtpd(site)
        try:
            smtpd.send("friend@far.example")
        finally:
            smtpd.close()
        d = _start(site)
        try:
            noconn = b"deferral: Sorry,_I_wasn't_able_to_establish_an_SMTP_connection._(#4.4.1)/"
            d.wait_for(lambda ls: noconn in _deliveries(ls))
        finally:
            assert d.stop() == 0
    finally:
        hole.close()
    table = (site.home.queue / "lock" / "tcpto").read_bytes()
    assert len(table) == 1024 and table[:5] == b"\x7f\0\0\x01\x01"
    listing = expect(run([site.home.bin("qmail-tcpto")], user=site.user), 0).stdout
    assert listing.startswith(b"127.0.0.1 timed out ")
    assert listing.endswith(b" seconds ago; # recent timeouts: 1\n")
