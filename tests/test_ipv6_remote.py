"""qmail-remote over IPv6 (issue 18.1): [IPv6:...] literals, AAAA records from a local DNS server,
IPv6 first with fallback to IPv4, control/outgoingip6, lock/tcpto6 with qmail-tcpto/qmail-tcpok,
this host's IPv6 addresses in the best-MX check."""

from __future__ import annotations

import os
import socket
import time

import pytest

from conftest import QHome, expect, run
from pyqmail.remote import mx, tcpto
from pyqmail.remote import smtpclient as sc
from pyqmail.remote import smtproutes
from remotekit import DnsServer, SmtpServer, dead_port
from test_ipv6 import need_ipv6_loopback


def remote(h: QHome, dnsd: DnsServer, host: str, sender: str, *recips: str,
           message: bytes = b"Subject: t\n\nhi\n", env: dict[str, str] | None = None) -> bytes:
    e = {"PATH": os.environ["PATH"], **dnsd.env, **(env or {})}
    return expect(run([h.bin("qmail-remote"), host, sender, *recips], input=message, env=e), 0).stdout


def test_literal_units() -> None:
    assert mx.literal("[IPv6:::1]") == "::1"
    assert mx.literal("[ipv6:2001:DB8:0:0::1]") == "2001:db8::1"
    assert mx.literal("[::1]") == "::1"
    assert mx.literal("[IPv6:1.2.3.4]") is None and mx.literal("[IPv6:nonsense]") is None
    assert mx.literal("[1.2.3.4]") == "1.2.3.4" and mx.literal("example.com") is None
    assert mx.interleave(["a6", "b6", "c6"], ["a4"]) == ["a6", "a4", "b6", "c6"]
    r = smtproutes.route("[IPv6:::1]:2525")
    assert r is not None and (r.relay, r.port) == ("[IPv6:::1]", 2525)
    r = smtproutes.route("[1.2.3.4]:26")
    assert r is not None and (r.relay, r.port) == ("[1.2.3.4]", 26)
    assert "::1" in mx.local_addresses()


def test_deliver_to_an_ipv6_literal(qhome: QHome) -> None:
    """A recipient at [IPv6:::1]: sent as it is over ::1 (the literal routed to the peer's port)."""
    need_ipv6_loopback()
    with DnsServer({}) as d, SmtpServer(host="::1") as srv:
        qhome.control("smtproutes", f"[IPv6:::1]:[IPv6:::1]:{srv.port}\n")
        out = remote(qhome, d, "[IPv6:::1]", "s@x.org", "u@[IPv6:::1]")
        assert d.queries == []  # a literal needs no DNS
    assert out == b"r\0K::1 accepted message.\nRemote host said: 250 ok 12345 qp 1\n\0"
    assert srv.sessions[0].peer == "::1"
    assert b"RCPT TO:<u@[IPv6:::1]>" in srv.sessions[0].commands


def test_literal_of_this_host_is_ambiguous(qhome: QHome) -> None:
    """[IPv6:::1] without a route: ::1 is this host (ipme), as [127.0.0.1] is: qmail's ambiguous-MX bounce."""
    need_ipv6_loopback()
    with DnsServer({}) as d:
        assert remote(qhome, d, "[IPv6:::1]", "s@x.org", "u@[IPv6:::1]") == sc.AMBIGMX + b"\0"
        # The best-MX check counts IPv6 addresses: an MX whose AAAA is ::1 is this host.
    with DnsServer({("v6.example", "MX"): ["10 mx.v6.example."],
                    ("mx.v6.example", "AAAA"): ["::1"]}) as d:
        assert remote(qhome, d, "v6.example", "s@x.org", "u@v6.example") == sc.AMBIGMX + b"\0"


def test_deliver_to_an_aaaa_record(qhome: QHome) -> None:
    """A relay name with only an AAAA record, served by a local DNS server."""
    need_ipv6_loopback()
    with DnsServer({("mx6.example", "AAAA"): ["::1"]}) as d, SmtpServer(host="::1") as srv:
        qhome.control("smtproutes", f"far.example:mx6.example:{srv.port}\n")
        out = remote(qhome, d, "far.example", "s@x.org", "u@far.example")
        assert ("mx6.example", "AAAA") in d.queries
    assert out == b"r\0K::1 accepted message.\nRemote host said: 250 ok 12345 qp 1\n\0"


def test_ipv6_first_then_ipv4(qhome: QHome) -> None:
    """Both families: IPv6 is tried first; where nothing listens on ::1, IPv4 is next (same host)."""
    need_ipv6_loopback()
    records = {("both.example", "AAAA"): ["::1"], ("both.example", "A"): ["127.0.0.1"]}
    with DnsServer(records) as d, SmtpServer(host="::1") as srv6:
        qhome.control("smtproutes", f":both.example:{srv6.port}\n")
        out = remote(qhome, d, "far.example", "s@x.org", "u@far.example")
    assert out.startswith(b"r\0K::1 accepted message.") and len(srv6.sessions) == 1
    with DnsServer(records) as d, SmtpServer(host="127.0.0.1") as srv4:
        qhome.control("smtproutes", f":both.example:{srv4.port}\n")  # ::1 on that port: refused
        out = remote(qhome, d, "far.example", "s@x.org", "u@far.example")
    assert out.startswith(b"r\0K127.0.0.1 accepted message.")


def test_ipv6_silence_falls_back_within_two_seconds(qhome: QHome) -> None:
    """An IPv6 address that does not answer gets FALLBACK_DELAY seconds, then IPv4 is tried,
    and the cut-short attempt is not a timeout in lock/tcpto6."""
    need_ipv6_loopback()
    # A listening socket whose backlog is full never completes a connection: a silent host.
    full = socket.socket(socket.AF_INET6)
    full.bind(("::1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            c = socket.socket(socket.AF_INET6)
            c.setblocking(False)
            c.connect_ex(("::1", port))
            fillers.append(c)
        with DnsServer({("both.example", "AAAA"): ["::1"], ("both.example", "A"): ["127.0.0.1"]}) as d, \
                SmtpServer(host="127.0.0.1", port=port) as srv4:
            qhome.control("smtproutes", f":both.example:{port}\n")
            start = time.monotonic()
            out = remote(qhome, d, "far.example", "s@x.org", "u@far.example")
            took = time.monotonic() - start
    finally:
        for c in fillers:
            c.close()
        full.close()
    assert out.startswith(b"r\0K127.0.0.1 accepted message."), out
    assert len(srv4.sessions) == 1
    assert 1.5 < took < 15, took
    buf = (qhome.path / "queue/lock/tcpto6").read_bytes()
    assert tcpto.entries(buf, tcpto.V6) == []


def test_outgoingip6(qhome: QHome) -> None:
    """control/outgoingip6 is the source of IPv6 connections; control/outgoingip stays IPv4's."""
    need_ipv6_loopback()
    with DnsServer({}) as d, SmtpServer(host="::1") as srv:
        qhome.control("smtproutes", f":[IPv6:::1]:{srv.port}\n")
        qhome.control("outgoingip", "127.0.0.1\n")
        qhome.control("outgoingip6", "::1\n")
        out = remote(qhome, d, "far.example", "s@x.org", "u@far.example")
    assert out.startswith(b"r\0K::1 accepted message.")
    assert srv.sessions[0].peer == "::1"


def test_tcpto6_records_ipv6_timeouts(qhome: QHome) -> None:
    """An IPv6 host that times out (no IPv4 to fall back to) is kept in lock/tcpto6; qmail-tcpto
    lists it after the IPv4 hosts; twice is skipped; qmail-tcpok forgets it; lock/tcpto is untouched."""
    t6 = qhome.path / "queue/lock/tcpto6"
    assert t6.stat().st_size == tcpto.V6.size
    buf = bytearray(tcpto.V6.size)
    ip6 = mx.ipv6_bytes("2001:db8::25")
    assert ip6 is not None
    now = int(time.time())
    change = tcpto.update(bytes(buf), ip6, True, False, now - 300, tcpto.V6)
    assert change is not None
    buf[change[0] * 32:(change[0] + 1) * 32] = change[1]
    change = tcpto.update(bytes(buf), ip6, True, True, now - 10, tcpto.V6)
    assert change is not None
    buf[change[0] * 32:(change[0] + 1) * 32] = change[1]
    t6.write_bytes(bytes(buf))
    before4 = (qhome.path / "queue/lock/tcpto").read_bytes()
    out = expect(run([qhome.bin("qmail-tcpto")]), 0).stdout
    assert out.startswith(b"2001:db8::25 timed out ") and out.endswith(b"seconds ago; # recent timeouts: 2\n")
    assert tcpto.skip(bytes(buf), ip6, now, os.getpid(), tcpto.V6) == (True, True)
    with DnsServer({}) as d:
        qhome.control("smtproutes", f":[IPv6:2001:db8::25]:{dead_port()}\n")
        out = remote(qhome, d, "far.example", "s@x.org", "u@far.example")
    assert out == sc.NOCONN + b"\0"  # skipped: not even tried
    expect(run([qhome.bin("qmail-tcpok")]), 0)
    assert t6.read_bytes() == bytes(tcpto.V6.size)
    assert (qhome.path / "queue/lock/tcpto").read_bytes() == before4
    assert expect(run([qhome.bin("qmail-tcpto")]), 0).stdout == b""


@pytest.mark.parametrize("addrs", [["::1"], []])
def test_ip_plus_status(addrs: list[str]) -> None:
    """A and AAAA both asked; HARD only when neither family has an address."""
    records = {("h.example", "A"): ["127.0.0.1"]} if not addrs else {("h.example", "AAAA"): addrs}
    with DnsServer(records, servfail={"soft.example"}) as d:
        r = mx.Resolver([("127.0.0.1", d.port)], lifetime=5)
        st, got = mx.ip(r, "h.example")
        assert st == mx.OK and [a.ip for a in got] == (addrs or ["127.0.0.1"])
        assert mx.ip(r, "none.example")[0] == mx.HARD
        assert mx.ip(r, "soft.example")[0] == mx.SOFT
