"""SMTPUTF8 (RFC 6531-6533, issue 18.2) through the whole path: qmail-smtpd -> qmail-queue (the flag in
todo/N) -> qmail-send (the flag in info/N) -> qmail-local (a UTF-8 .qmail- extension and its Maildir)
and -> qmail-remote (A-labels for DNS and ASCII peers, SMTPUTF8 only where offered, 5.6.7 where not),
bounces to UTF-8 senders, qmail-inject. smtplib is the client (mail_options=['SMTPUTF8']); the SMTPUTF8
peer is a private Postfix with smtputf8_enable = yes started by the test (root; CI fails without it).
"""

from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import QHome, expect, run
from pyqmail import smtputf8
from pyqmail.control import DomainSet
from pyqmail.smtpd.rcpthosts import RcptHosts
from pyqmail.smtpd.received import Peer
from pyqmail.smtpd.session import CONTINUE, Config, Session
from remotekit import DnsServer, SmtpServer
from sendkit import Running, Site, make_site, maildir_messages, remove_site
from tlskit import Postfix, make_ca, make_leaf

FQDN = "test.example.com"
IDN = "例子.广告"
IDN_A = "xn--fsqu00a.xn--4rr70v"
FAR = "bücher.example"
FAR_A = "xn--bcher-kva.example"
SENDER = "用户@" + IDN  # delivered locally: virtualdomains -> joe-用户 -> ~joe/.qmail-用户
LOCAL_RCPT = "收件人@" + IDN  # -> ~joe/.qmail-收件人 -> ./Maildir-收件人/
REMOTE_RCPT = "пользователь@" + FAR
MX = "127.0.0.2"  # not one of this host's addresses (qmail-remote's best-MX check skips those)
BODY = ("From: 用户 <用户@例子.广告>\r\nTo: 收件人@例子.广告\r\nSubject: Grüße, 你好\r\n\r\n"
        "UTF-8 body ✓\r\n").encode()


def u8(text: str) -> str:
    """The UTF-8 bytes of text, as the latin-1 str QHome.control writes byte for byte."""
    return text.encode().decode("latin-1")


def todo_records(site: Site) -> list[bytes]:
    (path,) = [p for p in (site.home.queue / "todo").iterdir()]
    return path.read_bytes().split(b"\0")[:-1]


# --- pure pieces ---------------------------------------------------------------------------------

def test_mail_parameters_labels_and_records() -> None:
    assert smtputf8.mail_parameters(b'FROM:<"a>b"@x> smtputf8 BODY=8BITMIME') == [b"SMTPUTF8", b"BODY=8BITMIME"]
    assert smtputf8.mail_parameters(b"FROM:a@b SMTPUTF8") == []  # qmail's bracketless form has none
    assert smtputf8.alabel(IDN.encode()) == IDN_A.encode()
    assert smtputf8.ulabel(IDN_A.encode()) == IDN.encode()
    assert smtputf8.alabel(b"Example.COM") == b"Example.COM"  # ASCII: untouched, idna not even imported
    assert smtputf8.alabel(b"\xff\xfe.example") is None  # legacy 8-bit bytes are no IDN
    assert smtputf8.todo_u(1000, True) == b"u1000 SMTPUTF8\0" and smtputf8.todo_u(7, False) == b"u7\0"
    assert smtputf8.u_flags(b"1000 SMTPUTF8") == [b"SMTPUTF8"] and smtputf8.u_flags(b"7") == []


def _session(utf8_offered: bool, rcpthosts: list[str]) -> Session:
    peer = Peer(b"192.0.2.1", b"client.example.net", None, b"mx.example.com")
    hosts = RcptHosts(DomainSet([u8(h) for h in rcpthosts]), None)
    return Session(Config(b"mx.example.com", peer, rcpthosts=hosts, smtputf8=utf8_offered))


def test_session_offers_smtputf8_only_when_switched_on_and_flags_the_transaction() -> None:
    off = _session(False, [FAR_A])
    assert b"SMTPUTF8" not in off.command(b"EHLO c")[0]
    assert off.command(f"MAIL FROM:<{SENDER}> SMTPUTF8".encode()) == (b"250 ok\r\n", CONTINUE)
    assert not off.utf8  # not offered: the parameter is ignored, as qmail ignores parameters
    # Without SMTPUTF8 a U-label domain is compared byte for byte, as qmail: not the A-label entry.
    assert off.command(f"RCPT TO:<{REMOTE_RCPT}>".encode())[0].startswith(b"553 ")
    assert off.received(0).startswith(b"Received: from client.example.net (HELO c) (192.0.2.1)\n"
                                      b"  by mx.example.com with SMTP;")

    on = _session(True, [FAR_A, IDN])
    assert b"250-SMTPUTF8\r\n" in on.command(b"EHLO c")[0] or b"250 SMTPUTF8\r\n" in on.command(b"EHLO c")[0]
    assert on.command(b"MAIL FROM:<a@b.example>")[0] == b"250 ok\r\n" and not on.utf8
    assert on.received(0).split(b"\n")[1].startswith(b"  by mx.example.com with SMTP;")
    assert on.command(f"MAIL FROM:<{SENDER}> SMTPUTF8 BODY=8BITMIME".encode()) == (b"250 ok\r\n", CONTINUE)
    assert on.utf8 and on.mailfrom == SENDER.encode()
    assert on.command(f"RCPT TO:<{REMOTE_RCPT}>".encode())[0] == b"250 ok\r\n"  # U-label vs A-label entry
    assert on.command(f"RCPT TO:<x@{IDN_A}>".encode())[0] == b"250 ok\r\n"  # A-label vs U-label entry
    assert on.command(b"RCPT TO:<x@elsewhere.example>")[0].startswith(b"553 ")
    assert on.rcptto == [REMOTE_RCPT.encode(), f"x@{IDN_A}".encode()]
    assert b"  by mx.example.com with UTF8SMTP;" in on.received(0)  # RFC 6531 3.7.3
    on.protocol = b"ESMTPSA (TLS_AES_128_GCM_SHA256 encrypted)"
    assert b"with UTF8SMTPSA (TLS_AES_128_GCM_SHA256 encrypted);" in on.received(0)


# --- qmail-remote alone: IDN through A-labels, SMTPUTF8 where offered, 5.6.7 where not ----------

def _remote(h: QHome, d: DnsServer, port: int, host: str, sender: str, *recips: str,
            message: bytes = BODY.replace(b"\r\n", b"\n")) -> bytes:
    env = {"PATH": os.environ["PATH"], **d.env, "PYQMAIL_SMTP_PORT": str(port)}
    with tempfile.TemporaryFile() as f:  # a file, as qmail-rspawn gives it: its header can be read
        f.write(message)
        f.seek(0)
        p = subprocess.run([str(h.bin("qmail-remote")), host, sender, *recips], stdin=f, capture_output=True,
                           env=env, timeout=60)
    assert p.returncode == 0, p
    return p.stdout


def _idn_dns() -> DnsServer:
    return DnsServer({(FAR_A, "MX"): [f"10 mx.{FAR_A}."], (f"mx.{FAR_A}", "A"): [MX]})


EHLO_UTF8 = b"250-peer\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"
EHLO_ASCII = b"250-peer\r\n250 8BITMIME\r\n"


def test_remote_idn_domain_resolved_through_its_a_label_and_sent_with_smtputf8(qhome: QHome) -> None:
    with _idn_dns() as d, SmtpServer(host=MX, replies={"EHLO": EHLO_UTF8}) as peer:
        out = _remote(qhome, d, peer.port, FAR, SENDER, REMOTE_RCPT)
    assert out.startswith(b"r\0K127.0.0.2 accepted message.\n"), out
    assert (FAR_A, "MX") in d.queries and (f"mx.{FAR_A}", "A") in d.queries
    assert all(name.isascii() for name, _ in d.queries)  # DNS never saw a U-label
    (s,) = peer.sessions
    assert s.commands[1:4] == [f"MAIL FROM:<{SENDER}> SMTPUTF8".encode(), f"RCPT TO:<{REMOTE_RCPT}>".encode(),
                               b"DATA"]
    assert "UTF-8 body ✓".encode() in s.data


def test_remote_ascii_peer_gets_a_labels_and_a_utf8_local_part_fails_with_5_6_7(qhome: QHome) -> None:
    with _idn_dns() as d, SmtpServer(host=MX, replies={"EHLO": EHLO_ASCII}) as peer:
        out = _remote(qhome, d, peer.port, FAR, "joe@" + IDN, "info@" + FAR, REMOTE_RCPT)
    (s,) = peer.sessions
    assert s.commands[1:4] == [f"MAIL FROM:<joe@{IDN_A}>".encode(), f"RCPT TO:<info@{FAR_A}>".encode(), b"DATA"]
    assert out == (b"r\0h127.0.0.2 does not offer SMTPUTF8 and this address has a non-ASCII local part:\n"
                   b"non-ASCII addresses are not permitted for that recipient (RFC 6531, 553 5.6.7). (#5.6.7)\n\0"
                   b"K127.0.0.2 accepted message.\nRemote host said: 250 ok 12345 qp 1\n\0")


def test_remote_ascii_peer_and_a_utf8_sender_fail_the_message_before_mail(qhome: QHome) -> None:
    with _idn_dns() as d, SmtpServer(host=MX, replies={"EHLO": EHLO_ASCII}) as peer:
        out = _remote(qhome, d, peer.port, FAR, SENDER, "info@" + FAR)
    (s,) = peer.sessions
    assert [c.split(b" ")[0] for c in s.commands] == [b"EHLO", b"QUIT"]
    assert out == (b"DConnected to 127.0.0.2 but it does not offer SMTPUTF8 and the sender address has a non-ASCII"
                   b" local part:\nnon-ASCII addresses are not permitted for that sender (RFC 6531, 553 5.6.7)."
                   b" (#5.6.7)\n\0")


def test_remote_utf8_header_with_ascii_envelope_uses_smtputf8_only_when_offered(qhome: QHome) -> None:
    for ehlo, mail in ((EHLO_UTF8, f"MAIL FROM:<joe@{FAR_A}> SMTPUTF8"), (EHLO_ASCII, f"MAIL FROM:<joe@{FAR_A}>")):
        with _idn_dns() as d, SmtpServer(host=MX, replies={"EHLO": ehlo}) as peer:
            out = _remote(qhome, d, peer.port, FAR, "joe@" + FAR_A, "info@" + FAR_A)
        assert out.startswith(b"r\0K127.0.0.2 accepted message."), out
        assert peer.sessions[0].commands[1] == mail.encode()
    # An ASCII message to a peer offering SMTPUTF8: byte for byte what qmail says.
    with _idn_dns() as d, SmtpServer(host=MX, replies={"EHLO": EHLO_UTF8}) as peer:
        _remote(qhome, d, peer.port, FAR_A, "joe@x.example", "info@" + FAR_A, message=b"Subject: a\n\nb\n")
    assert peer.sessions[0].commands[1] == b"MAIL FROM:<joe@x.example>"


# --- the whole path -------------------------------------------------------------------------------

@pytest.fixture
def site() -> Iterator[Site]:
    s = make_site(FQDN)
    joe = s.mkdir("joe")
    for md in ("joe/Maildir", "joe/Maildir-收件人"):
        s.maildir(md)
    for ext, text in ((".qmail-收件人", "./Maildir-收件人/\n"), (".qmail-用户", "./Maildir/\n")):
        p = joe / ext
        p.write_text(text)
        os.chown(p, s.uid, s.gid)
    s.assign([s.user_line("joe", joe), s.user_line("joe-", joe, wild=True)])
    h = s.home
    h.control("virtualdomains", u8(f"{IDN}:joe\n"))
    h.control("rcpthosts", u8(f"{FQDN}\n{IDN}\n{FAR_A}\n"))  # the far domain as its A-label
    h.control("smtputf8", "1\n")
    yield s
    remove_site(s)


class Smtpd:
    """tcpserver running the site's qmail-smtpd on 127.0.0.1 as the site's user (no RELAYCLIENT)."""

    def __init__(self, site: Site) -> None:
        kw: dict[str, object] = {}
        if site.user is not None:
            kw = {"user": site.uid, "group": site.gid, "extra_groups": []}
        self.proc = subprocess.Popen(
            [site.home.bin("tcpserver"), "-1", "-HR", "-l", "mx." + FQDN, "127.0.0.1", "0",
             site.home.bin("qmail-smtpd")],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"},
            **kw)  # type: ignore[call-overload]
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def send(self, sender: str, recips: list[str], body: bytes = BODY) -> None:
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.example", timeout=30) as s:
            s.ehlo()
            assert s.has_extn("smtputf8")
            refused = s.sendmail(sender, recips, body, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
            assert refused == {}

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _queue(site: Site, sender: str, recips: list[str]) -> list[bytes]:
    smtpd = Smtpd(site)
    try:
        smtpd.send(sender, recips)
    finally:
        smtpd.close()
    return todo_records(site)


def _ended(n: int) -> object:
    return lambda ls: sum(x.startswith(b"end msg ") for x in ls) >= n


def _deliveries(lines: list[bytes]) -> list[bytes]:
    return [x.split(b": ", 1)[1] for x in lines if x.startswith(b"delivery ")]


@pytest.fixture
def postfix() -> Iterator[Postfix]:
    base = Path(tempfile.mkdtemp(prefix="pyqmail-utf8-postfix-", dir="/tmp"))
    base.chmod(0o755)
    pf = None
    try:
        ca = make_ca(base, "utf8ca")
        leaf = make_leaf(base, "pfx", ca, ["pfx.example.test"])
        pf = Postfix(base / "pf", leaf, main_extra={"smtputf8_enable": "yes"})
        yield pf
    finally:
        if pf is not None:
            pf.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_utf8_message_through_smtpd_queue_local_maildir_and_postfix(site: Site, postfix: Postfix) -> None:
    site.home.control("smtproutes", f"{FAR_A}:[127.0.0.1]:{postfix.port}\n")  # keyed by the A-label
    todo = _queue(site, SENDER, [LOCAL_RCPT, REMOTE_RCPT])
    assert todo[0] == b"u%d SMTPUTF8" % site.uid  # the flag, after the uid (C's scan_ulong stops at the space)
    assert todo[2:] == [b"F" + SENDER.encode(), b"T" + LOCAL_RCPT.encode(), b"T" + REMOTE_RCPT.encode()]
    d = Running(site, env=site.env(DNSCACHEIP="127.0.0.1:9"))
    try:
        lines = d.wait_for(_ended(1))
    finally:
        assert d.stop() == 0
    assert all(x.startswith(b"success: ") for x in _deliveries(lines)), lines
    (msg,) = maildir_messages(site.base / "joe" / "Maildir-收件人")
    assert msg.startswith(f"Return-Path: <{SENDER}>\nDelivered-To: joe-{LOCAL_RCPT}\n".encode()), msg
    assert b"  by mx.test.example.com with UTF8SMTP;" in msg
    assert msg.endswith(BODY.replace(b"\r\n", b"\n"))
    (copy,) = postfix.messages()
    assert "Subject: Grüße, 你好".encode() in copy and "UTF-8 body ✓".encode() in copy
    env = subprocess.run(["postcat", "-c", str(postfix.conf), "-e", *map(str, postfix.queue.glob("incoming/**/*"))],
                         capture_output=True, env=postfix.env, timeout=30).stdout
    assert f"sender: {SENDER}".encode() in env and f"recipient: {REMOTE_RCPT}".encode() in env, env
    # Postfix's message_size record ends in its SMTPUTF8 flags: bit 0, the client said SMTPUTF8.
    (size,) = [x for x in env.split(b"\n") if x.startswith(b"message_size:")]
    assert int(size.split()[-1]) & 1, size


def test_downgrade_bounces_to_the_utf8_sender_with_5_6_7(site: Site) -> None:
    with SmtpServer(replies={"EHLO": EHLO_ASCII}) as peer:
        site.home.control("smtproutes", f"{FAR_A}:[127.0.0.1]:{peer.port}\n")
        _queue(site, SENDER, [REMOTE_RCPT])
        d = Running(site, env=site.env(DNSCACHEIP="127.0.0.1:9"))
        try:
            lines = d.wait_for(_ended(2))  # the message, then its bounce (delivered locally)
        finally:
            assert d.stop() == 0
    assert _deliveries(lines)[0].startswith(b"failure: Connected_to_127.0.0.1_but_it_does_not_offer_SMTPUTF8_")
    assert b"(#5.6.7)" in _deliveries(lines)[0]
    assert [c.split(b" ")[0] for c in peer.sessions[0].commands] == [b"EHLO", b"QUIT"]  # no MAIL, no downgrade
    (bounce,) = maildir_messages(site.base / "joe" / "Maildir")
    head, _, text = bounce.partition(b"\n\n")
    assert head.startswith(f"Return-Path: <>\nDelivered-To: joe-{SENDER}\n".encode())
    assert f"\nTo: {SENDER}\n".encode() in head  # unquoted UTF-8 local part (RFC 6532)
    assert b"\nContent-Type: text/plain; charset=utf-8\n" in head and b"\nMIME-Version: 1.0\n" in head
    assert f"<{REMOTE_RCPT}>:\nConnected to 127.0.0.1 but it does not offer SMTPUTF8".encode() in text
    assert b"(RFC 6531, 553 5.6.7). (#5.6.7)\n" in text
    assert f"--- Below this line is a copy of the message.\n\nReturn-Path: <{SENDER}>\n".encode() in text


def test_info_file_keeps_the_flag_after_the_sender(site: Site) -> None:
    site.home.bin("qmail-remote").unlink()  # the remote delivery defers: info/N stays to be read
    _queue(site, SENDER, [REMOTE_RCPT])
    d = Running(site, env=site.env(DNSCACHEIP="127.0.0.1:9"))
    try:
        d.wait_for(lambda ls: any(b"deferral" in x for x in ls))
        (info,) = [p for p in (site.home.queue / "info").rglob("*") if p.is_file()]
        # C's qmail-send and qmail-qread read the first record only: the sender, as ever.
        assert info.read_bytes() == b"F" + SENDER.encode() + b"\0ESMTPUTF8\0"
        # qmail-qread (C's too) reads the bytes after F's NUL as local/N's start: E is skipped.
        listing = expect(run([site.home.bin("qmail-qread")], user=site.user)).stdout.split(b"\n")
        assert [x.split(b"\t")[1:2] for x in listing[1:-1]] == [[b"remote"]], listing
    finally:
        d.stop()


def test_ascii_client_gets_qmails_behaviour_and_no_flag(site: Site) -> None:
    smtpd = Smtpd(site)
    try:
        with smtplib.SMTP("127.0.0.1", smtpd.port, local_hostname="client.example", timeout=30) as s:
            assert s.sendmail("joe@" + FQDN, ["joe@" + FQDN], b"Subject: ascii\r\n\r\nx\r\n") == {}
    finally:
        smtpd.close()
    assert todo_records(site)[0] == b"u%d" % site.uid


def test_qmail_inject_takes_utf8_addresses_and_flags_the_message(site: Site) -> None:
    res = run([site.home.bin("qmail-inject"), "-f", SENDER, LOCAL_RCPT], user=site.user,
              input=BODY.replace(b"\r\n", b"\n"), env=site.env(USER=site.user or "root"))
    expect(res)
    todo = todo_records(site)
    assert todo[0] == b"u%d SMTPUTF8" % site.uid
    assert todo[2:] == [b"F" + SENDER.encode(), b"T" + LOCAL_RCPT.encode()]
    (mess,) = [p for p in (site.home.queue / "mess").rglob("*") if p.is_file()]
    assert f"\nTo: {LOCAL_RCPT}\n".encode() in mess.read_bytes()  # not quoted word by word
    assert "\nFrom: 用户 <用户@例子.广告>\n".encode() in mess.read_bytes()


def test_root_mode_flag_crosses_qmail_queued(root_home: QHome) -> None:
    """qmail-smtpd runs as qmaild in root mode: its qmail-queue hands the message to qmail-queued,
    asking with the SMTPUTF8 request (`U`) instead of `Q` when $SMTPUTF8MAIL is set."""
    from test_qmail_queue import envelope, qq

    p = subprocess.Popen([root_home.bin("qmail-queued")], env={"PATH": "/usr/bin:/bin"}, stderr=subprocess.DEVNULL)
    try:
        sock = root_home.path / "run" / "qmail-queue.sock"
        for _ in range(1000):
            if sock.exists():
                break
            assert p.poll() is None
            time.sleep(0.01)
        for flag, first in (("1", b"u%d SMTPUTF8"), ("0", b"u%d")):
            r = qq(root_home, b"Subject: x\n\ny\n", envelope(SENDER.encode(), LOCAL_RCPT.encode()),
                   extra_env={smtputf8.ENV: flag}, user="qmaild")
            assert r.returncode == 0, r.stderr
            (todo,) = list((root_home.queue / "todo").iterdir())
            assert todo.read_bytes().split(b"\0")[0] == first % pwd.getpwnam("qmaild").pw_uid
            for d in ("todo", "intd"):
                (root_home.queue / d / todo.name).unlink()
    finally:
        p.terminate()
        p.wait(timeout=10)
