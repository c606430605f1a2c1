"""SPF without dnspython's resolver in tcpserver's parent (issue 15's speed; docs/DESIGN.md
"Speed (bench/smtpd.py --checks)").

pyspf imports dnspython's resolver, and with it threading, ssl, email and
importlib.metadata, which doubled the memory of tcpserver's preloaded parent
(every fork and exit of a session pays for it). pyqmail.smtpd.spfdns answers
pyspf's lookups; dnspython is only its fallback, so it is imported with
dns.resolver deferred to its first use. These tests run what tcpserver's
parent runs, in a fresh interpreter (this one has dnspython loaded), and the
fallback in a child: a record too big for UDP read over TCP by dnspython,
pointed at $DNSCACHEIP there.
"""

from __future__ import annotations

import json
import os
import pwd
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import IS_ROOT, TEST_USER
from remotekit import DnsServer
from sendkit import Site, make_site, remove_site

FQDN = "test.example.com"
CLIENT = "127.0.0.2"  # not 127.0.0.1, which SPF passes as local without asking DNS
SRC = str(Path(__file__).resolve().parent.parent / "src")

PARENT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from pyqmail.ucspi import tcpserver
tcpserver.preload([sys.argv[2]])
loaded = sorted(n for n, m in sys.modules.items() if type(m).__name__ != "_Deferred")
spf = sys.modules.get("spf")
smtpd_spf = sys.modules.get("pyqmail.smtpd.spf")
spfdns = sys.modules.get("pyqmail.smtpd.spfdns")
print(json.dumps({"modules": loaded, "spfdns": spf is not None and spf.DNSLookup is spfdns.lookup,
                  "warmed": smtpd_spf is not None and smtpd_spf._warmed,
                  "servers": spfdns._servers if spfdns else None}))
"""


@pytest.fixture
def site() -> Site:
    s = make_site(FQDN)
    yield s
    remove_site(s)


def _parent(site: Site, env: dict[str, str]) -> dict[str, object]:
    r = subprocess.run([sys.executable, "-c", PARENT, SRC, str(site.home.bin("qmail-smtpd"))],
                       capture_output=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "QMAILHOME": str(site.home.path), **env})
    assert r.returncode == 0, r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    return out


HEAVY = ("dns.resolver", "dns.message", "dns.query", "threading", "ssl", "importlib.metadata", "zipfile")


@pytest.mark.parametrize("dnscacheip", [True, False])
def test_preloaded_parent_with_spf_has_no_dnspython_resolver_nor_threading(site: Site, dnscacheip: bool) -> None:
    """The parent as bench/smtpd.py --checks runs it (recipient validation and greylisting too): SPF on
    adds pyspf and the small part of dnspython it checks at import, not the resolver's chain."""
    site.home.control("rcptcheck", "1\n")
    site.home.control("greylist", "300\n")
    site.mkdir("qmail/greylist", 0o700)
    env = {"DNSCACHEIP": "127.0.0.1:5399"} if dnscacheip else {}
    off = _parent(site, env)
    site.home.control("spfbehavior", "3\n")
    on = _parent(site, env)
    modules = on["modules"]
    assert isinstance(modules, list) and isinstance(off["modules"], list)
    assert on["spfdns"] and on["warmed"] and "spf" in modules
    assert "dns.resolver" not in modules and "threading" not in modules
    added = set(modules) - set(off["modules"])
    assert not added & set(HEAVY), added
    if dnscacheip:
        assert on["servers"] == [["127.0.0.1", 5399]]
    else:  # resolv.conf's nameservers, as rblsmtpd reads them
        from pyqmail.ucspi import dnsq

        assert on["servers"] == [list(x) for x in dnsq.servers({})]


def test_fallback_loads_dnspython_at_first_use() -> None:
    """In a fresh interpreter (dns.resolver stands in, then is real): pyspf through spfdns, a truncated answer, dnspython read over TCP."""
    mechs = " ".join(f"ip4:10.{i // 256}.{i % 256}.0/24" for i in range(230))
    record = f"v=spf1 {mechs} ip4:192.0.2.7 -all"
    rdata = " ".join(f'"{record[i:i + 250]}"' for i in range(0, len(record), 250))
    code = """
import sys
sys.path.insert(0, sys.argv[1])
from pyqmail.smtpd import spf
spf._point_dns(sys.argv[2].encode())
before = "dns.resolver" in sys.modules and type(sys.modules["dns.resolver"]).__name__
s = spf.Settings(3)
good = spf.check(s, "192.0.2.7", "a@big.example", "mx.big.example", "me").result
bad = spf.check(s, "198.51.100.1", "a@big.example", "mx.big.example", "me").result
import dns.resolver
print(before, type(sys.modules["dns.resolver"]).__name__, good, bad,
      [ns.address for ns in dns.resolver.default_resolver.nameservers])
# The next session of a reused tcpserver worker, without $DNSCACHEIP: resolv.conf's again.
spf._point_dns(None)
from pyqmail.smtpd import spfdns
spfdns._point_dnspython()
print(dns.resolver.default_resolver.nameservers == dns.resolver.Resolver().nameservers)
"""
    with DnsServer({("big.example", "TXT"): [rdata]}) as d:
        r = subprocess.run([sys.executable, "-c", code, SRC, f"127.0.0.1:{d.port}"], capture_output=True,
                           timeout=120, env={"PATH": "/usr/bin:/bin"})
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [b"_Deferred", b"module", b"pass", b"fail", b"['127.0.0.1']", b"True"], r.stdout
        assert "udp-truncated" in d.transports and "tcp" in d.transports, d.transports


def test_session_fallback_over_tcp_under_tcpserver(site: Site) -> None:
    """A tcpserver child reads a 4 KB SPF record (truncated over UDP) through dnspython over TCP."""
    if not IS_ROOT:
        pytest.skip("the site belongs to the test user and tcpserver runs as that user: needs root")
    home = site.home
    home.control("spfbehavior", "3\n")
    u = site.mkdir("users")
    site.mkdir("users/joe")
    site.maildir("users/joe/Maildir")
    (u / "joe" / ".qmail").write_text("./Maildir/\n")
    os.chown(u / "joe" / ".qmail", site.uid, site.gid)
    site.assign([f"=joe:{TEST_USER}:{site.uid}:{site.gid}:{u}/joe:::"])
    mechs = " ".join(f"ip4:10.{i // 256}.{i % 256}.0/24" for i in range(230))
    records: dict[tuple[str, str], list[str]] = {}
    for name, last in (("pass.example", f"ip4:{CLIENT}"), ("fail.example", "ip4:192.0.2.7")):
        record = f"v=spf1 {mechs} {last} -all"
        records[(name, "TXT")] = [" ".join(f'"{record[i:i + 250]}"' for i in range(0, len(record), 250))]
    pw = pwd.getpwnam(TEST_USER)
    with DnsServer(records) as d:
        p = subprocess.Popen([str(home.bin("tcpserver")), "-1", "-HR", "-u", str(pw.pw_uid),
                              "-g", str(pw.pw_gid), "-l", FQDN, "127.0.0.1", "0", str(home.bin("qmail-smtpd"))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={"PATH": "/usr/bin:/bin", "DNSCACHEIP": f"127.0.0.1:{d.port}"})
        try:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line.strip().isdigit(), (line, p.poll())
            with smtplib.SMTP("127.0.0.1", int(line), local_hostname="client.example", timeout=60,
                              source_address=(CLIENT, 0)) as s:
                assert s.mail("a@pass.example")[0] == 250
                assert s.rcpt(f"joe@{FQDN}")[0] == 250
                s.rset()
                assert s.mail("b@fail.example")[0] == 250
                code, text = s.rcpt(f"joe@{FQDN}")
                assert code == 550 and text.startswith(b"See http://spf.pobox.com/why.html?sender=b%40fail.example"), \
                    (code, text)
        finally:
            p.terminate()
            p.communicate(timeout=30)
        assert d.transports.count("tcp") >= 2, d.transports
