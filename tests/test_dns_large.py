"""Large DNS answers (issue 18.6) from a local DNS server (remotekit.DnsServer: UDP with
truncation at the client's EDNS0 size, and TCP): answers over 512 bytes come whole over UDP
thanks to EDNS0, larger ones are asked again over TCP, in rblsmtpd's dnsq, qmail-remote's
resolver and pyspf (qmail-dkim's and qmail-smtpd's SPF check)."""

from __future__ import annotations

import warnings

import dns.message
import dns.query

from pyqmail.filter import dmarc
from pyqmail.remote import mx
from pyqmail.ucspi import dnsq
from remotekit import DnsServer


def txt_rdata(size: int, fill: str = "a") -> str:
    """Return TXT rdata text of size bytes in character-strings of 250."""
    chunks = [fill * min(250, size - i) for i in range(0, size, 250)]
    return " ".join(f'"{c}"' for c in chunks)


RECORDS = {
    ("small.example", "TXT"): [txt_rdata(100)],
    ("k1.example", "TXT"): [txt_rdata(1000, "b")],
    ("k4.example", "TXT"): [txt_rdata(4096, "c")],
    ("k60.example", "TXT"): [txt_rdata(60000, "d")],
    ("alias.example", "CNAME"): ["alias2.example."],
    ("alias2.example", "CNAME"): ["k4.example."],
}


def test_server_truncates_at_the_edns_size() -> None:
    """The kit itself: 512 bytes without EDNS0, the advertised size with it, TC beyond."""
    with DnsServer(RECORDS) as d:
        q = dns.message.make_query("k1.example", "TXT")
        r = dns.query.udp(q, "127.0.0.1", port=d.port, timeout=5)
        assert r.flags & dns.flags.TC and not r.answer
        q = dns.message.make_query("k1.example", "TXT", use_edns=0, payload=1232)
        r = dns.query.udp(q, "127.0.0.1", port=d.port, timeout=5)
        assert not r.flags & dns.flags.TC and len(r.answer[0][0].strings) == 4
        r = dns.query.tcp(dns.message.make_query("k60.example", "TXT"), "127.0.0.1", port=d.port, timeout=5)
        assert sum(len(s) for s in r.answer[0][0].strings) == 60000


def test_dnsq_txt_edns_and_tcp() -> None:
    """rblsmtpd's lookups: 1 KB over UDP (EDNS0 1232), 4 KB and 60 KB over TCP after TC."""
    with DnsServer(RECORDS) as d:
        caches = [("127.0.0.1", d.port)]
        assert dnsq.txt(b"k1.example", caches) == b"b" * 1000
        assert d.transports == ["udp"]
        assert dnsq.txt(b"k4.example", caches) == b"c" * 4096
        assert d.transports[1:] == ["udp-truncated", "tcp"]
        assert dnsq.txt(b"k60.example", caches) == b"d" * 60000
        assert d.transports[3:] == ["udp-truncated", "tcp"]


def test_qmail_remote_resolver_edns_tcp_and_cname_chain() -> None:
    """qmail-remote's resolver: the same sizes; a CNAME chain is followed to the 4 KB TXT."""
    with DnsServer(RECORDS) as d:
        r = mx.Resolver([("127.0.0.1", d.port)], lifetime=10)
        assert r.query("k1.example", "TXT") == (mx.OK, ["b" * 1000])
        assert d.transports == ["udp"]
        assert r.query("k4.example", "TXT") == (mx.OK, ["c" * 4096])
        assert r.query("k60.example", "TXT") == (mx.OK, ["d" * 60000])
        assert d.transports[1:] == ["udp-truncated", "tcp", "udp-truncated", "tcp"]
        assert r.query("alias.example", "TXT") == (mx.OK, ["c" * 4096])


def test_pyspf_reads_a_4k_spf_record_over_tcp() -> None:
    """SPF (pyspf through dnspython's default resolver, as qmail-dkim and qmail-smtpd point it):
    a 4 KB record (ip4 mechanisms) that only TCP can carry decides pass and fail."""
    import spf

    mechs = " ".join(f"ip4:10.{i // 256}.{i % 256}.0/24" for i in range(230))
    assert len(mechs) > 4000
    record = f"v=spf1 {mechs} ip4:192.0.2.7 -all"
    rdata = " ".join(f'"{record[i:i + 250]}"' for i in range(0, len(record), 250))
    with DnsServer({("big.example", "TXT"): [rdata]}) as d:
        import dns.resolver

        saved = dns.resolver.default_resolver
        try:
            dmarc.use_dnscacheip({"DNSCACHEIP": f"127.0.0.1:{d.port}"})
            with warnings.catch_warnings():
                # pyspf calls dnspython's deprecated dns.resolver.query (as in pyqmail.smtpd.spf).
                warnings.simplefilter("ignore", DeprecationWarning)
                assert spf.check2(i="192.0.2.7", s="a@big.example", h="mx.big.example")[0] == "pass"
                assert spf.check2(i="198.51.100.1", s="a@big.example", h="mx.big.example")[0] == "fail"
        finally:
            dns.resolver.default_resolver = saved
        assert "tcp" in d.transports
