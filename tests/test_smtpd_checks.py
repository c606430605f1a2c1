"""qmail-smtpd's admin checks of issue 15.6/15.7: control/dnsbllist (DNS from a server on 127.0.0.1),
the greeting delay and early talkers ($SMTPD_GREETDELAY, $DROP_PRE_GREET), badhelo/badhelonorelay/
rejectforgedhelo, mfcheck and badrcptto: the pure decisions, then qmail-smtpd with smtplib, swaks and
scripted socket clients."""

from __future__ import annotations

import ipaddress
import shutil
import smtplib
import socket
import subprocess
import time

import pytest

from conftest import CI, QHome
from queuefmt import files
from smtpdkit import Conversation, ForkServer
from ucspikit import DNSServer

from pyqmail.smtpd import badrcptto, dnsbl, greetdelay, helo, mfcheck
from pyqmail.ucspi import dnsq
from pyqmail.ucspi.rbl import reverse

GREETING = b"220 test.example.com ESMTP\r\n"


# --- dnsbllist: the patch's syntax and rblsmtpd's decision ---------------------------------------

@pytest.mark.parametrize("line,source", [
    (b"zen.example", dnsbl.Source(dnsbl.TXT, b"zen.example")),
    (b"  -zen.example ", dnsbl.Source(dnsbl.TXT, b"zen.example", True)),
    (b"zen.example:Message rejected", dnsbl.Source(dnsbl.A, b"zen.example", False, b"Message rejected")),
    (b"-zen.example:Message rejected", dnsbl.Source(dnsbl.A, b"zen.example", True, b"Message rejected")),
    (b"zen.example:-Message rejected", dnsbl.Source(dnsbl.A, b"zen.example", True, b"Message rejected")),
    (b"-zen.example:-Blocked from %IP%", dnsbl.Source(dnsbl.A, b"zen.example", True, b"Blocked from %IP%")),
    (b"+white.example", dnsbl.Source(dnsbl.WHITE, b"white.example")),
    (b"+white.example:Whitelist test", dnsbl.Source(dnsbl.WHITE, b"white.example", False, b"Whitelist test")),
    (b"=log.example", dnsbl.Source(dnsbl.LOG, b"log.example")),
    (b"zen.example:", None),
    (b"zen.example:-", None),
    (b"-", None),
    (b":text", None),
])
def test_dnsbllist_syntax(line: bytes, source: dnsbl.Source | None) -> None:
    assert dnsbl.parse(line) == source


def fake_dns(txt: dict[bytes, bytes] | None = None, a: dict[bytes, list[str]] | None = None,
             fail: frozenset[bytes] = frozenset()):
    asked: list[bytes] = []

    def lookup_txt(name: bytes) -> bytes:
        asked.append(b"TXT " + name)
        if name in fail:
            raise dnsq.Temporary("test")
        return (txt or {}).get(name, b"")

    def lookup_a(name: bytes) -> list[str]:
        asked.append(b"A " + name)
        if name in fail:
            raise dnsq.Temporary("test")
        return (a or {}).get(name, [])

    return lookup_txt, lookup_a, asked


def decide(lines: list[bytes], txt=None, a=None, fail=frozenset(), rblsmtpd=None, fail_closed=False,
           ip=b"1.2.3.4") -> tuple[bytes | None, list[bytes], list[bytes]]:
    lt, la, asked = fake_dns(txt, a, fail)
    logged: list[bytes] = []
    sources = [s for s in map(dnsbl.parse, lines) if s is not None]
    d = dnsbl.decide(ip, sources, rblsmtpd, fail_closed, lt, la, logged.append)
    return (d.message() if d.blocked else None), asked, logged


def test_dnsbl_txt_listed_451_and_553() -> None:
    listed = {b"4.3.2.1.zen.example": b"Listed: see https://zen.example/?1.2.3.4"}
    assert decide([b"zen.example"], listed)[0] == b"451 Listed: see https://zen.example/?1.2.3.4"
    assert decide([b"-zen.example"], listed)[0] == b"553 Listed: see https://zen.example/?1.2.3.4"
    msg, asked, logged = decide([b"other.example", b"-zen.example", b"never.example"], listed)
    assert msg == b"553 Listed: see https://zen.example/?1.2.3.4"
    assert asked == [b"TXT 4.3.2.1.other.example", b"TXT 4.3.2.1.zen.example"]  # the first that lists ends it
    assert logged == [b"dnsbl: ip 1.2.3.4 query 4.3.2.1.other.example result pass",
                      b"dnsbl: ip 1.2.3.4 query 4.3.2.1.zen.example result listed: "
                      b"Listed: see https://zen.example/?1.2.3.4"]


def test_dnsbl_a_query_custom_text() -> None:
    a = {b"4.3.2.1.zen.example": ["127.0.0.2"]}
    msg, asked, _ = decide([b"zen.example:-Blocked, see https://zen.example/?%IP%"], a=a)
    assert msg == b"553 Blocked, see https://zen.example/?1.2.3.4"
    assert asked == [b"A 4.3.2.1.zen.example"]
    assert decide([b"zen.example:Try later"], a=a)[0] == b"451 Try later"
    assert decide([b"zen.example:Try later"], a={})[0] is None


def test_dnsbl_whitelist_and_log_only() -> None:
    listed = {b"4.3.2.1.zen.example": b"listed"}
    white = {b"4.3.2.1.white.example": ["127.0.0.2"]}
    msg, asked, logged = decide([b"+white.example", b"zen.example"], listed, white)
    assert msg is None and asked == [b"A 4.3.2.1.white.example"]
    assert logged == [b"dnsbl: ip 1.2.3.4 query 4.3.2.1.white.example result whitelisted"]
    msg, asked, logged = decide([b"=zen.example"], listed)
    assert msg is None
    assert logged == [b"dnsbl: ip 1.2.3.4 query 4.3.2.1.zen.example result listed (ignored): listed"]


def test_dnsbl_lookup_failures() -> None:
    listed = {b"4.3.2.1.zen.example": b"listed"}
    down = frozenset({b"4.3.2.1.down.example"})
    # A failed source makes a later listing 451 (rblsmtpd: must not bounce) ...
    msg, _, logged = decide([b"down.example", b"-zen.example"], listed, fail=down)
    assert msg == b"451 listed"
    assert logged[0] == b"dnsbl: ip 1.2.3.4 query 4.3.2.1.down.example result dnserr"
    # ... passes when nothing lists (fail open) ...
    assert decide([b"down.example"], fail=down)[0] is None
    # ... and refuses with dnsblfailclosed.
    assert decide([b"down.example"], fail=down, fail_closed=True)[0] == b"451 temporary RBL lookup error"


def test_dnsbl_rblsmtpd_variable_first() -> None:
    listed = {b"4.3.2.1.zen.example": b"listed"}
    assert decide([b"zen.example"], listed, rblsmtpd=b"")[0:2] == (None, [])
    assert decide([b"zen.example"], listed, rblsmtpd=b"-go away")[0:2] == (b"553 go away", [])
    assert decide([], rblsmtpd=b"not now")[0] == b"451 not now"


def test_dnsbl_text_cut_and_printable() -> None:
    msg = decide([b"zen.example"], {b"4.3.2.1.zen.example": b"x\ty" + b"z" * 300})[0]
    assert msg == b"451 x?y" + b"z" * 197


def test_dnsbl_ipv6_nibbles() -> None:
    ip = b"2001:db8::567:89ab"
    name = b"b.a.9.8.7.6.5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2."
    assert reverse(ip) == name  # RFC 5782 section 2.4's example
    msg, asked, _ = decide([b"-zen.example"], {name + b"zen.example": b"v6 listed"}, ip=ip)
    assert (msg, asked) == (b"553 v6 listed", [b"TXT " + name + b"zen.example"])
    assert reverse(b"::ffff:1.2.3.4") == b"4.3.2.1."


# --- HELO, sender domain, badrcptto: the pure parts ----------------------------------------------

def never_local(ip: tuple[int, int, int, int]) -> bool:
    return ip == (192, 0, 2, 1)


MINE = frozenset({b"test.example.com", b"localhost"})


@pytest.mark.parametrize("name,why", [
    (b"client.example.net", None),
    (b"[192.0.2.7]", None),  # the client's own address
    (b"192.0.2.7", None),
    (b"[192.0.2.8]", b"IP literal of another host"),
    (b"198.51.100.1", b"IP literal of another host"),
    (b"[192.0.2.1]", b"this host's IP literal"),
    (b"[127.0.0.1]", b"this host's IP literal"),
    (b"[IPv6:::1]", b"this host's IP literal"),
    (b"[IPv6:2001:db8::1]", b"IP literal of another host"),
    (b"TEST.example.COM.", b"this host's name"),
    (b"localhost", b"this host's name"),
])
def test_forged_helo(name: bytes, why: bytes | None) -> None:
    assert helo.forged(name, b"192.0.2.7", MINE, never_local) == why


def test_forged_helo_ipv6_client() -> None:
    assert helo.forged(b"[IPv6:2001:db8::7]", b"2001:db8::7", MINE, never_local) is None
    assert helo.forged(b"[IPv6:2001:DB8:0::7]", b"2001:db8::7", MINE, never_local) is None
    assert ipaddress.ip_address("2001:db8::7")  # the literal is compared as an address, not as text


def test_badhelo_patterns() -> None:
    pats = helo.patterns(["^[0-9.]+$", "!\\.", "^example\\.com$", "[unbalanced"])
    assert helo.matches(pats, b"1.2.3.4") == b"^[0-9.]+$"
    assert helo.matches(pats, b"nodots") == b"!\\."
    assert helo.matches(pats, b"EXAMPLE.com") == b"^example\\.com$"
    assert helo.matches(pats, b"mail.example.com") is None
    assert helo.matches(pats, b"a[unbalanced.b") == b"[unbalanced"  # not a regex: matched as text


def test_mfcheck_resolve() -> None:
    def mx(d: bytes) -> list[tuple[int, bytes]]:
        if d == b"down.example":
            raise dnsq.Temporary("x")
        return {b"mx.example": [(10, b"mail.mx.example")], b"null.example": [(0, b".")]}.get(d, [])

    def ip4(d: bytes) -> list[str]:
        return ["192.0.2.9"] if d == b"a.example" else []

    def ip6(d: bytes) -> list[str]:
        return ["2001:db8::9"] if d == b"aaaa.example" else []

    r = [mfcheck.resolve(d, mx, ip4, ip6) for d in (b"mx.example", b"a.example", b"aaaa.example",
                                                     b"null.example", b"none.example", b"down.example",
                                                     b"[192.0.2.9]")]
    assert r == [mfcheck.PASS, mfcheck.PASS, mfcheck.PASS, mfcheck.HARD, mfcheck.HARD, mfcheck.SOFT, mfcheck.PASS]


def test_badrcptto_listed() -> None:
    entries = frozenset({b"spamtrap@test.example.com", b"@dead.example"})
    assert badrcptto.listed(entries, b"SpamTrap@Test.Example.COM")
    assert badrcptto.listed(entries, b"anyone@DEAD.example")
    assert not badrcptto.listed(entries, b"postmaster@test.example.com")
    assert not badrcptto.listed(entries, b"spamtrap")


def test_greetdelay_settings() -> None:
    assert greetdelay.settings({}) == (0, False)
    assert greetdelay.settings({b"SMTPD_GREETDELAY": b"5"}) == (5, False)
    assert greetdelay.settings({b"SMTPD_GREETDELAY": b"5", b"DROP_PRE_GREET": b"1"}) == (5, True)
    assert greetdelay.settings({b"SMTPD_GREETDELAY": b"5", b"DROP_PRE_GREET": b"0"}) == (5, False)
    assert greetdelay.settings({b"SMTPD_GREETDELAY": b"0.25s"}) == (0.25, False)
    assert greetdelay.settings({b"SMTPD_GREETDELAY": b"x"}) == (0, False)
    assert greetdelay.settings({b"SMTPD_GREETDELAY": b"5", b"DROP_PRE_GREET": b"1",
                                b"RELAYCLIENT": b""}) == (0, False)


# --- dnsq's MX and AAAA lookups, from a server on 127.0.0.1 --------------------------------------

def test_dnsq_mx_and_aaaa() -> None:
    records: dict[str, dict[str, list[object]]] = {
        "mx.example": {"MX": ["10 mail.mx.example.", "20 backup.mx.example."]},
        "null.example": {"MX": ["0 ."]},
        "aaaa.example": {"AAAA": ["2001:db8::9"]},
    }
    with DNSServer(records, servfail=["down.example"]) as srv:
        caches = [srv.address]
        assert sorted(dnsq.mx(b"mx.example", caches)) == [(10, b"mail.mx.example"), (20, b"backup.mx.example")]
        assert dnsq.mx(b"null.example", caches) == [(0, b".")]
        assert dnsq.mx(b"aaaa.example", caches) == []
        assert dnsq.ip6(b"aaaa.example", caches) == ["2001:db8::9"]
        assert dnsq.mx(b"nothing.example", caches) == []


# --- qmail-smtpd with the checks: real clients ----------------------------------------------------

BL = "bl.test"  # 127.0.0.1 listed here with a TXT record
AL = "al.test"  # ... and here with an A record
WL = "wl.test"  # ... whitelisted here
RECORDS: dict[str, dict[str, list[object]]] = {
    f"1.0.0.127.{BL}": {"TXT": [b"Listed, see https://bl.test/?127.0.0.1"], "A": ["127.0.0.2"]},
    f"1.0.0.127.{AL}": {"A": ["127.0.0.2"]},
    f"1.0.0.127.{WL}": {"A": ["127.0.0.2"]},
    f"7.2.0.192.{BL}": {"TXT": [b"192.0.2.7 listed"]},
    "mx.example": {"MX": ["10 mail.mx.example."]},
    "a.example": {"A": ["192.0.2.9"]},
    "aaaa.example": {"AAAA": ["2001:db8::9"]},
    "null.example": {"MX": ["0 ."]},
}
SERVFAIL = [f"1.0.0.127.down.test", "down.example"]


@pytest.fixture(autouse=True)
def _no_leftover_servers():
    yield
    Conversation.close_all()


@pytest.fixture
def dns():
    with DNSServer(RECORDS, servfail=SERVFAIL) as srv:
        yield srv


def swaks_path() -> str:
    path = shutil.which("swaks")
    if path is None:
        if CI:
            pytest.fail("swaks is missing: .ci/run must install Debian's swaks")
        pytest.skip("swaks not installed")
    return path


def send(port: int, rcpts: list[str], sender: str = "a@mx.example", helo_name: str = "client.example"
         ) -> tuple[dict[str, tuple[int, bytes]], smtplib.SMTPResponseException | None]:
    """Send one message with smtplib; return (refused recipients, the exception ending it or None)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname=helo_name, timeout=30) as s:
        try:
            return s.sendmail(sender, rcpts, "Subject: t\r\n\r\nbody\r\n"), None
        except smtplib.SMTPRecipientsRefused as e:
            return e.recipients, None
        except (smtplib.SMTPResponseException, smtplib.SMTPServerDisconnected) as e:
            return {}, e  # type: ignore[return-value]


def queued_count(qhome: QHome) -> int:
    return len(files(qhome.queue)["mess"])


def test_dnsbl_553_refuses_every_rcpt(qhome: QHome, dns: DNSServer) -> None:
    qhome.control("dnsbllist", f"# comment\nnot.listed.test\n-{BL}\n")
    with ForkServer(qhome.bin("qmail-smtpd"), {"DNSCACHEIP": dns.dnscacheip}) as srv:
        refused, end = send(srv.port, ["a@test.example.com", "b@test.example.com"])
        assert end is None
        assert refused == {r: (553, b"Listed, see https://bl.test/?127.0.0.1")
                           for r in ("a@test.example.com", "b@test.example.com")}
        log = srv.stderr()
    assert queued_count(qhome) == 0
    assert (f"dnsbl: ip 127.0.0.1 query 1.0.0.127.{BL} result listed").encode() in log
    assert b"dnsbl: refused ip 127.0.0.1: 553 Listed" in log
    assert [q for q in dns.queries if q[0].endswith(BL)] == [(f"1.0.0.127.{BL}", "TXT")]  # once a session


def test_dnsbl_not_asked_without_tcpremoteip(qhome: QHome, dns: DNSServer) -> None:
    """qmail-smtpd run without $TCPREMOTEIP (by hand, inetd, tcpserver's warm-up sessions) has no
    address to look up: "unknown" must not become a query for unknown.ZONE."""
    qhome.control("dnsbllist", f"-{BL}\n")
    c = Conversation(qhome.bin("qmail-smtpd"), {"DNSCACHEIP": dns.dnscacheip})
    c.send(b"HELO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<a@test.example.com>\r\nQUIT\r\n")
    out = c.rest().split(b"\r\n")[:-1]
    _, err = c.finish()
    assert out[3] == b"250 ok", out
    assert b"dnsbl" not in err and not dns.queries


def test_dnsbl_451_drops_the_connection(qhome: QHome, dns: DNSServer) -> None:
    qhome.control("dnsbllist", f"{AL}:Blocked %IP%, try later\n")
    env = {"DNSCACHEIP": dns.dnscacheip}
    with ForkServer(qhome.bin("qmail-smtpd"), env) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
            f = sock.makefile("rb")
            assert f.readline() == GREETING
            sock.sendall(b"HELO x\r\nMAIL FROM:<a@mx.example>\r\nRCPT TO:<a@test.example.com>\r\n")
            assert f.readline() == b"250 test.example.com\r\n"
            assert f.readline() == b"250 ok\r\n"
            assert f.readline() == b"451 Blocked 127.0.0.1, try later\r\n"
            assert f.read() == b""  # the connection ends


def test_dnsbl_skipped_for_relay_clients_whitelist_and_dnsblskip(qhome: QHome, dns: DNSServer) -> None:
    qhome.control("dnsbllist", f"-{BL}\n")
    for env in ({"RELAYCLIENT": ""}, {"DNSBLSKIP": ""}, {"RBLSMTPD": ""}, {"DNSBLLIST": "control/other"}):
        with ForkServer(qhome.bin("qmail-smtpd"), dict(env, DNSCACHEIP=dns.dnscacheip)) as srv:
            assert send(srv.port, ["a@test.example.com"]) == ({}, None), env
    qhome.control("dnsbllist", f"+{WL}\n-{BL}\n")
    with ForkServer(qhome.bin("qmail-smtpd"), {"DNSCACHEIP": dns.dnscacheip}) as srv:
        assert send(srv.port, ["a@test.example.com"]) == ({}, None)
    assert queued_count(qhome) == 5


def test_dnsbl_failclosed_and_swaks(qhome: QHome, dns: DNSServer) -> None:
    qhome.control("dnsbllist", "down.test\n")
    qhome.control("dnsblfailclosed", "1")
    with ForkServer(qhome.bin("qmail-smtpd"), {"DNSCACHEIP": dns.dnscacheip}) as srv:
        res = subprocess.run([swaks_path(), "--server", "127.0.0.1", "--port", str(srv.port), "--from",
                              "a@mx.example", "--to", "a@test.example.com"], capture_output=True, timeout=60)
    assert res.returncode == 24, res.stdout  # swaks: no recipients accepted
    assert b"<** 451 temporary RBL lookup error" in res.stdout


def test_dnsbl_ipv4_client_on_a_pipe(qhome: QHome, dns: DNSServer) -> None:
    """Exact dialogue for another client address (TCPREMOTEIP), through swaks --pipe."""
    qhome.control("dnsbllist", f"-{BL}\n")
    res = subprocess.run([swaks_path(), "--pipe", str(qhome.bin("qmail-smtpd")), "--from", "a@mx.example",
                          "--to", "a@test.example.com"], capture_output=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "TCPREMOTEIP": "192.0.2.7", "DNSCACHEIP": dns.dnscacheip})
    assert b"<** 553 192.0.2.7 listed" in res.stdout, res.stdout


def test_dnsbl_ipv6_client(qhome: QHome) -> None:
    """An IPv6 client (TCPREMOTEIP as tcpserver -6 sets it) is looked up by its reversed nibbles."""
    nibbles = "7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
    qhome.control("dnsbllist", f"-{BL}\n")
    with DNSServer({f"{nibbles}.{BL}": {"TXT": [b"v6 client listed"]}}) as srv:
        res = subprocess.run([swaks_path(), "--pipe", str(qhome.bin("qmail-smtpd")), "--from", "a@mx.example",
                              "--to", "a@test.example.com"], capture_output=True, timeout=60,
                             env={"PATH": "/usr/bin:/bin", "TCPREMOTEIP": "2001:db8::7",
                                  "DNSCACHEIP": srv.dnscacheip})
        assert (f"{nibbles}.{BL}", "TXT") in srv.queries
    assert b"<** 553 v6 client listed" in res.stdout, res.stdout


# --- greeting delay and early talkers ------------------------------------------------------------

DELAY = {"SMTPD_GREETDELAY": "1", "DROP_PRE_GREET": "1"}


def test_early_talker_refused(qhome: QHome) -> None:
    with ForkServer(qhome.bin("qmail-smtpd"), DELAY) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
            start = time.monotonic()
            sock.sendall(b"EHLO early.example\r\n")  # before the greeting
            f = sock.makefile("rb")
            assert f.read() == b"554 SMTP protocol violation\r\n"  # no 220, then the end
            assert time.monotonic() - start < 1.0  # refused at once, not after the delay
        deadline = time.monotonic() + 10
        while b"GREETDELAY" not in srv.stderr() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b"qmail-smtpd: GREETDELAY from 127.0.0.1: client sent data before greeting\n" in srv.stderr()
    assert queued_count(qhome) == 0


def test_client_gone_during_the_delay_is_logged(qhome: QHome) -> None:
    with ForkServer(qhome.bin("qmail-smtpd"), DELAY) as srv:
        socket.create_connection(("127.0.0.1", srv.port), timeout=30).close()
        deadline = time.monotonic() + 10
        while b"GREETDELAY" not in srv.stderr() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b"qmail-smtpd: GREETDELAY from 127.0.0.1: client disconnected\n" in srv.stderr()


def test_patient_client_passes(qhome: QHome) -> None:
    no_cert(qhome)
    with ForkServer(qhome.bin("qmail-smtpd"), dict(DELAY, SMTPD_GREETDELAY="0.2")) as srv:
        start = time.monotonic()
        with smtplib.SMTP("127.0.0.1", srv.port, local_hostname="patient.example", timeout=30) as s:
            waited = time.monotonic() - start
            assert s.sendmail("a@mx.example", ["a@test.example.com"], "Subject: t\r\n\r\nbody\r\n") == {}
        res = subprocess.run([swaks_path(), "--server", "127.0.0.1", "--port", str(srv.port), "--from",
                              "a@mx.example", "--to", "a@test.example.com"], capture_output=True, timeout=60)
        assert res.returncode == 0, res.stdout
    assert 0.2 <= waited < 5
    assert queued_count(qhome) == 2


def test_early_talker_without_drop_is_ignored(qhome: QHome) -> None:
    with ForkServer(qhome.bin("qmail-smtpd"), {"SMTPD_GREETDELAY": "1"}) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
            sock.sendall(b"HELO early.example\r\n")
            f = sock.makefile("rb")
            assert f.readline() == GREETING  # after the delay; the early line was dropped
            sock.sendall(b"QUIT\r\n")
            assert f.read() == b"221 test.example.com\r\n"
        assert b"client sent data before greeting. ignoring" in srv.stderr()


def test_relay_client_not_delayed(qhome: QHome) -> None:
    c = Conversation(qhome.bin("qmail-smtpd"), dict(DELAY, SMTPD_GREETDELAY="30", RELAYCLIENT=""))
    c.send(b"QUIT\r\n")  # early, but RELAYCLIENT skips the delay and the check
    assert c.lines(2) == [GREETING, b"221 test.example.com\r\n"]


def no_cert(qhome: QHome) -> None:
    (qhome.path / "control" / "servercert.pem").unlink(missing_ok=True)


# --- HELO checks, mfcheck, badrcptto -------------------------------------------------------------

def pipe(qhome: QHome, script: bytes, env: dict[str, str]) -> tuple[list[bytes], bytes]:
    """Run qmail-smtpd on a socketpair as client 192.0.2.7; send script; return its replies and log."""
    c = Conversation(qhome.bin("qmail-smtpd"), dict({"TCPREMOTEIP": "192.0.2.7"}, **env))
    c.send(script)
    out = c.rest().split(b"\r\n")[:-1]
    _, err = c.finish()
    return out, err


def test_badhelo_and_badhelonorelay(qhome: QHome) -> None:
    qhome.control("badhelo", "^friend$\n")
    qhome.control("badhelonorelay", "^[0-9.]+$\n")
    script = (b"HELO friend\r\nMAIL FROM:<a@b>\r\nRCPT TO:<a@test.example.com>\r\n"
              b"HELO 1.2.3.4\r\nMAIL FROM:<a@b>\r\nRCPT TO:<a@test.example.com>\r\nQUIT\r\n")
    out, err = pipe(qhome, script, {})
    assert out[3] == out[6] == helo.BADHELO.rstrip()
    assert b"badhelo: <friend> at 192.0.2.7 matches pattern: ^friend$" in err
    assert b"badhelonorelay: <1.2.3.4> at 192.0.2.7 matches pattern: ^[0-9.]+$" in err
    out, _ = pipe(qhome, script, {"RELAYCLIENT": ""})
    assert out[3] == helo.BADHELO.rstrip() and out[6] == b"250 ok"  # badhelonorelay spares relay clients
    out, _ = pipe(qhome, script, {"NOBADHELO": ""})
    assert out[3] == b"250 ok" and out[6] == helo.BADHELO.rstrip()


def test_forged_helo_refused_at_rcpt(qhome: QHome) -> None:
    qhome.control("rejectforgedhelo", "1")
    for name, ok in ((b"test.example.com", False), (b"[192.0.2.8]", False), (b"[127.0.0.1]", False),
                     (b"[192.0.2.7]", True), (b"client.example.net", True)):
        out, err = pipe(qhome, b"EHLO " + name + b"\r\nMAIL FROM:<a@b>\r\nRCPT TO:<a@test.example.com>\r\nQUIT\r\n",
                        {})
        assert (out[-2] == b"250 ok") == ok, (name, out)
        if not ok:
            assert out[-2] == helo.BADHELO.rstrip()
            assert b"forged HELO <" + name + b"> at 192.0.2.7: " in err
    out, _ = pipe(qhome, b"HELO test.example.com\r\nMAIL FROM:<a@b>\r\nRCPT TO:<a@test.example.com>\r\nQUIT\r\n",
                  {"REJECTFORGEDHELO": "0"})
    assert out[-2] == b"250 ok"
    # A client on this host (127.0.0.1, smtplib) may say this host's name.
    with ForkServer(qhome.bin("qmail-smtpd")) as srv:
        assert send(srv.port, ["a@test.example.com"], helo_name="test.example.com") == ({}, None)


def test_mfcheck(qhome: QHome, dns: DNSServer) -> None:
    qhome.control("mfcheck", "2")
    env = {"DNSCACHEIP": dns.dnscacheip}
    with ForkServer(qhome.bin("qmail-smtpd"), env) as srv:
        for sender in ("a@mx.example", "a@a.example", "a@aaaa.example", "", "a@[192.0.2.9]"):
            assert send(srv.port, ["a@test.example.com"], sender=sender) == ({}, None), sender
        for sender, code, text in (("a@nx.example", 553, mfcheck.MUST_EXIST), ("a@null.example", 553,
                                   mfcheck.MUST_EXIST), ("nodomain", 553, mfcheck.MUST_EXIST),
                                   ("a@down.example", 451, mfcheck.DNS_TEMPORARY)):
            _, end = send(srv.port, ["a@test.example.com"], sender=sender)
            assert isinstance(end, smtplib.SMTPSenderRefused), sender
            assert (end.smtp_code, end.smtp_error + b"\r\n") == (code, text[4:]), sender
        log = srv.stderr()
    assert b"MFCHECK fail [127.0.0.1] nx.example\n" in log
    assert b"MFCHECK fail [127.0.0.1] down.example (DNS temporary failure)\n" in log
    with ForkServer(qhome.bin("qmail-smtpd"), dict(env, MFCHECK="0")) as srv:
        assert send(srv.port, ["a@test.example.com"], sender="a@nx.example") == ({}, None)
    with ForkServer(qhome.bin("qmail-smtpd"), dict(env, RELAYCLIENT="")) as srv:
        assert send(srv.port, ["a@test.example.com"], sender="a@nx.example") == ({}, None)
    assert queued_count(qhome) == 7


def test_badrcptto_counts_toward_brtlimit(qhome: QHome) -> None:
    qhome.control("badrcptto", "spamtrap@test.example.com\n@dead.test.example.com\n")
    with ForkServer(qhome.bin("qmail-smtpd")) as srv:
        refused, end = send(srv.port, ["SpamTrap@test.example.com", "x@DEAD.test.example.com", "ok@test.example.com"])
        assert end is None
        assert refused == {"SpamTrap@test.example.com": (553, badrcptto.BADRCPTTO[4:-2]),
                           "x@DEAD.test.example.com": (553, badrcptto.BADRCPTTO[4:-2])}
        assert b"badrcptto: <SpamTrap@test.example.com> at 127.0.0.1\n" in srv.stderr()
    assert queued_count(qhome) == 1
    out, _ = pipe(qhome, b"HELO x\r\nMAIL FROM:<a@b>\r\n" + b"RCPT TO:<spamtrap@test.example.com>\r\n" * 3, {
        "BRTLIMIT": "2"})
    assert out[3] == badrcptto.BADRCPTTO.rstrip()
    assert out[4] == b"421 too many invalid addresses, goodbye (#4.3.0)"  # the limit: the connection ends
    assert len(out) == 5
