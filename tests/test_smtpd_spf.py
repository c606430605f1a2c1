"""SPF in qmail-smtpd (issue 15.4): the SPF patch's spfbehavior table, its Received-SPF texts, spfrules,
spfexp, and RFC 7208's lookup limit, against a DNS server on 127.0.0.1."""

from __future__ import annotations

import shutil
import smtplib
import socket
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from conftest import CI, QHome
from pyqmail.smtpd import spf
from queuefmt import files
from smtpdkit import ForkServer
from ucspikit import DNSServer

CLIENT = "127.0.0.2"  # not 127.0.0.1, which the patch passes as local without asking DNS
RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")

# behavior -> result -> OK/TEMP/REFUSE, as the patch's switch (fall-through from none down to fail).
EXPECTED = {
    0: {r: spf.OK for r in RESULTS},
    1: {r: spf.OK for r in RESULTS},
    2: {**{r: spf.OK for r in RESULTS}, "temperror": spf.TEMP},
    3: {**{r: spf.OK for r in RESULTS}, "temperror": spf.TEMP, "fail": spf.REFUSE},
    4: {**{r: spf.OK for r in RESULTS}, "temperror": spf.TEMP, "fail": spf.REFUSE, "softfail": spf.REFUSE},
    5: {**{r: spf.REFUSE for r in RESULTS}, "pass": spf.OK, "none": spf.OK, "permerror": spf.OK,
        "temperror": spf.TEMP},
    6: {**{r: spf.REFUSE for r in RESULTS}, "pass": spf.OK, "temperror": spf.TEMP},
}


def records() -> dict[str, dict[str, list[object]]]:
    """The zone: one domain per SPF result for a client at CLIENT."""
    many = [f"include:i{k}.many.example" for k in range(20)]
    zone: dict[str, dict[str, list[object]]] = {
        "pass.example": {"TXT": [f"v=spf1 ip4:{CLIENT} -all".encode()]},
        "fail.example": {"TXT": [b"v=spf1 ip4:192.0.2.1 -all"]},
        "softfail.example": {"TXT": [b"v=spf1 ip4:192.0.2.1 ~all"]},
        "neutral.example": {"TXT": [b"v=spf1 ip4:192.0.2.1 ?all"]},
        "none.example": {"A": ["192.0.2.1"]},
        "permerror.example": {"TXT": [(("v=spf1 " + " ".join(many[:10])).encode(),
                                       (" " + " ".join(many[10:]) + " -all").encode())]},
        "exp.example": {"TXT": [b"v=spf1 -all exp=why.exp.example"]},
        "why.exp.example": {"TXT": [b"%{i} may not send for %{d}"]},
        "helo.example": {"TXT": [f"v=spf1 ip4:{CLIENT} -all".encode()]},
    }
    for k in range(20):
        zone[f"i{k}.many.example"] = {"TXT": [b"v=spf1 -all"]}
    return zone


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer(records(), servfail=["temperror.example"]) as server:
        yield server


def test_decide_table() -> None:
    """Each spfbehavior level 0-6 against each result, and 7 behaving as 6."""
    for behavior, table in EXPECTED.items():
        for result, want in table.items():
            assert spf.decide(result, behavior) == want, (behavior, result)
    assert all(spf.decide(r, 7) == EXPECTED[6][r] for r in RESULTS)


def check(dns: DNSServer, sender: str, settings: spf.Settings | None = None, ip: str = CLIENT,
          helo: str = "client.example") -> spf.Verdict:
    return spf.check(settings or spf.Settings(1), ip, sender, helo, "mx.test", {"DNSCACHEIP": dns.dnscacheip})


def test_each_result_and_its_header(dns: DNSServer) -> None:
    """The patch's Received-SPF texts, with its words error and unknown for temperror and permerror."""
    got = {r: check(dns, f"alice@{r}.example") for r in RESULTS}
    assert {r: v.result for r, v in got.items()} == {r: r for r in RESULTS}
    h = {r: v.field.decode() for r, v in got.items()}
    assert h["pass"] == ("Received-SPF: pass (mx.test: SPF record at pass.example designates 127.0.0.2 as "
                         "permitted sender)\n")
    assert h["fail"] == ("Received-SPF: fail (mx.test: SPF record at fail.example does not designate 127.0.0.2 "
                         "as permitted sender)\n")
    assert h["softfail"] == ("Received-SPF: softfail (mx.test: transitioning SPF record at softfail.example does "
                             "not designate 127.0.0.2 as permitted sender)\n")
    assert h["neutral"] == ("Received-SPF: neutral (mx.test: 127.0.0.2 is neither permitted nor denied by SPF "
                            "record at neutral.example)\n")
    assert h["none"] == ("Received-SPF: none (mx.test: domain at none.example does not designate permitted "
                         "sender hosts)\n")
    assert h["temperror"] == ("Received-SPF: error (mx.test: error in processing during lookup of "
                              "temperror.example: DNS problem)\n")
    assert h["permerror"] == "Received-SPF: unknown (mx.test: Too many DNS lookups)\n"


def test_twenty_includes_end_in_permerror_after_ten_lookups(dns: DNSServer) -> None:
    """RFC 7208 4.6.4: more than 10 lookups is permerror; the evaluation stops at the limit."""
    before = len(dns.queries)
    v = check(dns, "bob@permerror.example")
    assert v.result == "permerror"
    asked = [n for n, _ in dns.queries[before:] if n.endswith(".many.example")]
    assert 10 <= len(asked) <= 11, asked


def test_explanation_default_spfexp_and_record_exp(dns: DNSServer) -> None:
    v = check(dns, "alice@fail.example")
    assert v.refusal() == (b"550 See http://spf.pobox.com/why.html?sender=alice%40fail.example&ip=127.0.0.2"
                           b"&receiver=mx.test (#5.7.1)\r\n")
    v = check(dns, "alice@fail.example", spf.Settings(3, exp="Refused: %{xs}%_for %{s}.%nline two"))
    assert v.refusal() == b"550 Refused: SPF record at fail.example for alice@fail.example.%nline two (#5.7.1)\r\n"
    v = check(dns, "alice@fail.example", spf.Settings(3, exp="one %{d}"))
    v.explanation += b"\ntwo"
    assert v.refusal() == b"550-one fail.example\r\n550 two (#5.7.1)\r\n"
    # The record's exp= wins over control/spfexp (RFC 7208 6.2).
    v = check(dns, "alice@exp.example", spf.Settings(3, exp="not this"))
    assert v.result == "fail"
    assert v.refusal() == b"550 127.0.0.2 may not send for exp.example (#5.7.1)\r\n"


def test_spfrules_before_the_final_all_and_without_a_record(dns: DNSServer) -> None:
    rules = spf.Settings(3, rules=f"ip4:{CLIENT}")
    for sender in ("a@fail.example", "a@softfail.example", "a@none.example"):
        v = check(dns, sender, rules)
        assert v.result == "pass", (sender, v.field)
        assert b"local policy designates 127.0.0.2" in v.field
    # Rules that do not match change nothing.
    v = check(dns, "a@fail.example", spf.Settings(3, rules="ip4:198.51.100.7"))
    assert v.result == "fail" and b"SPF record at fail.example" in v.field
    v = check(dns, "a@none.example", spf.Settings(3, rules="ip4:198.51.100.7"))
    assert v.result == "none"
    assert spf.insert_rules("v=spf1 mx -a:x.example -all", "ip4:1.2.3.4") == \
        "v=spf1 mx ip4:1.2.3.4 -a:x.example -all"
    assert spf.insert_rules("v=spf1 mx ~all", "a") == "v=spf1 mx a ~all"
    assert spf.insert_rules("v=spf1 mx", "a") == "v=spf1 mx"


def test_local_addresses_pass_without_dns_and_bounce_uses_helo(dns: DNSServer) -> None:
    before = len(dns.queries)
    v = check(dns, "a@fail.example", ip="127.0.0.1")
    assert v.result == "pass"
    assert v.field == b"Received-SPF: pass (mx.test: local policy designates 127.0.0.1 as permitted sender)\n"
    assert len(dns.queries) == before
    v = check(dns, "", helo="helo.example")
    assert v.result == "pass" and v.domain == "helo.example"
    v = check(dns, "a@pass.example", ip="")
    assert v.result == "permerror"
    assert v.field == b"Received-SPF: unknown (mx.test: No IP address in conversation)\n"


def test_macro_expansion() -> None:
    values = {"s": "strong-bad@email.example.com", "d": "email.example.com", "i": "192.0.2.3",
              "xR": "mx.example.org"}
    assert spf.expand("%{d2}", values) == "example.com"
    assert spf.expand("%{dr}", values) == "com.example.email"
    assert spf.expand("%{ir}.%{v}", {**values, "v": "in-addr"}) == "3.2.0.192.in-addr"
    assert spf.expand("%{S}|%{xR}|%%|%_|%-", values) == "strong-bad%40email.example.com|mx.example.org|%| |%20"
    assert spf.expand("%{l-}", {"l": "a-b-c"}) == "a.b.c"


# --- qmail-smtpd with smtplib and swaks ------------------------------------------------------------

def queued(qhome: QHome) -> list[bytes]:
    """Return the messages in the queue (mess/), oldest first."""
    paths = [qhome.queue / "mess" / name for name in files(qhome.queue)["mess"]]
    return [p.read_bytes() for p in sorted(paths, key=lambda p: p.stat().st_mtime_ns)]


def swaks_path() -> str:
    path = shutil.which("swaks")
    if path is None:
        if CI:
            pytest.fail("swaks is missing: .ci/run must install Debian's swaks")
        pytest.skip("swaks not installed")
    return path


def transaction(client: smtplib.SMTP, sender: str) -> tuple[int, int, bytes]:
    """MAIL, RCPT and (when both are accepted) DATA; return the MAIL and RCPT codes and the RCPT text."""
    code, _ = client.mail(sender)
    if code != 250:
        client.rset()
        return code, 0, b""
    rcode, rtext = client.rcpt("bob@test.example.com")
    if rcode == 250:
        assert client.data(b"Subject: spf\r\n\r\nbody\r\n")[0] == 250
    else:
        client.rset()
    return code, rcode, rtext


@pytest.mark.parametrize("behavior", range(7))
def test_each_level_with_each_result(qhome: QHome, dns: DNSServer, behavior: int) -> None:
    """pass, fail, softfail, neutral, none, temperror, permerror at spfbehavior 0-6 ($SPFBEHAVIOR), smtplib."""
    env = {"DNSCACHEIP": dns.dnscacheip, "SPFBEHAVIOR": str(behavior), "TCPLOCALHOST": "mx.test"}
    got = {}
    with ForkServer(qhome.bin("qmail-smtpd"), env) as srv:
        with smtplib.SMTP("127.0.0.1", srv.port, source_address=(CLIENT, 0), timeout=30) as c:
            c.ehlo("client.example")
            for r in RESULTS:
                got[r] = transaction(c, f"alice@{r}.example")
    for r in RESULTS:
        want = EXPECTED[behavior][r]
        mail, rcpt, text = got[r]
        if want == spf.TEMP:
            assert mail == 451, (r, got[r])
        elif want == spf.REFUSE:
            assert (mail, rcpt) == (250, 550), (r, got[r])
            assert text == (f"See http://spf.pobox.com/why.html?sender=alice%40{r}.example&ip={CLIENT}"
                            f"&receiver=mx.test (#5.7.1)").encode()
        else:
            assert (mail, rcpt) == (250, 250), (r, got[r])
    accepted = [r for r in RESULTS if EXPECTED[behavior][r] == spf.OK]
    msgs = queued(qhome)
    assert len(msgs) == len(accepted)
    for r, m in zip(accepted, msgs):
        head = m.split(b"\n\n", 1)[0].split(b"\n")
        assert head[0].startswith(b"Received: (qmail ")  # qmail-queue's
        assert head[1].startswith(b"Received: from unknown (HELO client.example) (127.0.0.2)")
        if behavior == 0:
            assert not any(h.startswith(b"Received-SPF:") for h in head), m
        else:
            word = spf.RECEIVED_WORDS[r].encode()
            assert head[3].startswith(b"Received-SPF: " + word + b" (mx.test: "), (r, head)  # below Received


def test_temperror_451_text_and_relay_clients_not_checked(qhome: QHome, dns: DNSServer) -> None:
    env = {"DNSCACHEIP": dns.dnscacheip, "TCPLOCALHOST": "mx.test"}
    qhome.control("spfbehavior", "6\n")
    with ForkServer(qhome.bin("qmail-smtpd"), env) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30, source_address=(CLIENT, 0)) as sock:
            f = sock.makefile("rb")
            f.readline()
            sock.sendall(b"HELO c\r\nMAIL FROM:<a@temperror.example>\r\nMAIL FROM:<a@fail.example>\r\n"
                         b"RCPT TO:<bob@test.example.com>\r\nRCPT TO:<carol@test.example.com>\r\nQUIT\r\n")
            assert f.readline() == b"250 test.example.com\r\n"
            assert f.readline() == b"451 SPF lookup failure (#4.3.0)\r\n"
            assert f.readline() == b"250 ok\r\n"
            refusal = (b"550 See http://spf.pobox.com/why.html?sender=a%40fail.example&ip=127.0.0.2"
                       b"&receiver=mx.test (#5.7.1)\r\n")
            assert f.readline() == refusal
            assert f.readline() == refusal
    # RELAYCLIENT: no check, no header, no $SPFRESULT; SPFBEHAVIOR=0 overrides the control file.
    before = len(dns.queries)
    for extra in ({"RELAYCLIENT": ""}, {"SPFBEHAVIOR": "0"}):
        with ForkServer(qhome.bin("qmail-smtpd"), dict(env, **extra)) as srv:
            with smtplib.SMTP("127.0.0.1", srv.port, source_address=(CLIENT, 0), timeout=30) as c:
                assert transaction(c, "a@fail.example")[:2] == (250, 250)
    assert len(dns.queries) == before
    assert not any(b"Received-SPF" in m for m in queued(qhome))


def test_swaks_refused_and_spfrules_spfexp(qhome: QHome, dns: DNSServer) -> None:
    env = {"DNSCACHEIP": dns.dnscacheip, "TCPLOCALHOST": "mx.test"}
    qhome.control("spfbehavior", "3\n")
    qhome.control("spfexp", "Not from %{i} for %{o}: see https://%{o}/spf\n")
    with ForkServer(qhome.bin("qmail-smtpd"), env) as srv:
        res = subprocess.run([swaks_path(), "--server", "127.0.0.1", "--port", str(srv.port), "--local-interface",
                              CLIENT, "--from", "a@fail.example", "--to", "bob@test.example.com"],
                             capture_output=True, timeout=60)
        assert res.returncode == 24, res.stdout  # no recipient accepted
        assert b"<** 550 Not from 127.0.0.2 for fail.example: see https://fail.example/spf (#5.7.1)" in res.stdout
        res = subprocess.run([swaks_path(), "--server", "127.0.0.1", "--port", str(srv.port), "--local-interface",
                              CLIENT, "--from", "a@pass.example", "--to", "bob@test.example.com"],
                             capture_output=True, timeout=60)
        assert res.returncode == 0, res.stdout
    qhome.control("spfrules", f"ip4:{CLIENT}\n")
    with ForkServer(qhome.bin("qmail-smtpd"), env) as srv:
        res = subprocess.run([swaks_path(), "--server", "127.0.0.1", "--port", str(srv.port), "--local-interface",
                              CLIENT, "--from", "a@fail.example", "--to", "bob@test.example.com"],
                             capture_output=True, timeout=60)
        assert res.returncode == 0, res.stdout
    msgs = queued(qhome)
    assert b"\nReceived-SPF: pass (mx.test: SPF record at pass.example designates 127.0.0.2" in msgs[0]
    assert b"\nReceived-SPF: pass (mx.test: local policy designates 127.0.0.2 as permitted sender)\n" in msgs[1]


def test_spfresult_reaches_the_queue_filter_for_dmarc(qhome: QHome, dns: DNSServer, tmp_path: Path) -> None:
    """$SPFRESULT travels in qmail-queue's environment ($QMAILQUEUE: a filter sees it), for qmail-dkim's DMARC."""
    seen = tmp_path / "seen"
    filt = tmp_path / "filter"
    filt.write_text(f"#!/bin/sh\necho \"$SPFRESULT\" >> {seen}\nexec {qhome.bin('qmail-queue')}\n")
    filt.chmod(0o755)
    env = {"DNSCACHEIP": dns.dnscacheip, "SPFBEHAVIOR": "1", "QMAILQUEUE": str(filt)}
    with ForkServer(qhome.bin("qmail-smtpd"), env) as srv:
        with smtplib.SMTP("127.0.0.1", srv.port, source_address=(CLIENT, 0), timeout=30) as c:
            for r in ("pass", "fail", "temperror"):
                assert transaction(c, f"a@{r}.example")[:2] == (250, 250)
    assert seen.read_text().split() == ["pass", "fail", "error"]
    from pyqmail.filter import dmarc

    assert dmarc.spf_check(CLIENT, "a@x.example", "h", {"SPFRESULT": "error"}) == ("temperror", "x.example")


# --- pyqmail.smtpd.spfdns: pyspf's DNSLookup over raw datagrams ------------------------------------

@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pyspf's DNSLookup_dnspython calls dns.resolver.query
def test_spfdns_answers_as_dnspython(monkeypatch: pytest.MonkeyPatch) -> None:
    """A, AAAA, MX, PTR, TXT (several strings), a CNAME chain, NXDOMAIN and SERVFAIL, against DNSLookup_dnspython."""
    import spf as pyspf

    from pyqmail.filter import dmarc
    from pyqmail.smtpd import spfdns
    from remotekit import DnsServer

    records = {("host.example", "A"): ["192.0.2.7", "192.0.2.8"], ("host.example", "AAAA"): ["2001:db8::7"],
               ("example", "MX"): ["10 mx1.example.", "20 host.example."],
               ("7.2.0.192.in-addr.arpa", "PTR"): ["host.example."],
               ("long.example", "TXT"): ['"v=spf1 " "ip4:192.0.2.0/24 " "-all"'],
               ("alias.example", "CNAME"): ["long.example."]}
    with DnsServer(records, servfail={"broken.example"}) as server:
        monkeypatch.setattr(spfdns, "_servers", [("127.0.0.1", server.port)])
        dmarc.use_dnscacheip(server.env)
        for name, qtype in [("host.example", "A"), ("host.example", "AAAA"), ("example", "MX"),
                            ("7.2.0.192.in-addr.arpa", "PTR"), ("long.example", "TXT"), ("nothing.example", "TXT"),
                            ("host.example", "TXT")]:
            mine = spfdns.lookup(name, qtype)
            theirs = pyspf.DNSLookup_dnspython(name, qtype)
            norm = [(k, (v[0], str(v[1]).rstrip(".")) if qtype == "MX" else v) for k, v in theirs]
            assert sorted(mine) == sorted(norm), (name, qtype, mine, theirs)
        assert spfdns.lookup("long.example", "TXT")[0][1] == (b"v=spf1 ", b"ip4:192.0.2.0/24 ", b"-all")
        # A CNAME comes with the chain (pyspf follows it), as the server sends it.
        assert spfdns.lookup("alias.example", "TXT") == [
            (("alias.example", "CNAME"), "long.example"),
            (("long.example", "TXT"), (b"v=spf1 ", b"ip4:192.0.2.0/24 ", b"-all"))]
        with pytest.raises(pyspf.TempError):
            spfdns.lookup("broken.example", "TXT", timeout=2)


def test_spfdns_truncated_or_odd_answers_go_to_dnspython(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyqmail.smtpd import spfdns

    q = spfdns.query_bytes("example.com", 16, 0x1234)
    tc = bytearray(q[:12]) + q[12:-11]
    tc[2] |= 0x82  # QR, TC
    with pytest.raises(spfdns.Unreadable, match="truncated"):
        spfdns.parse(bytes(tc), 0x1234)
    with pytest.raises(spfdns.Unreadable):
        spfdns.parse(b"\x12\x34\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00\xc0\x0c", 0x1234)  # pointer loop
    asked = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as srv:
        srv.bind(("127.0.0.1", 0))
        monkeypatch.setattr(spfdns, "_servers", [srv.getsockname()])
        monkeypatch.setattr(spfdns, "_fallback", lambda *a: asked.append(a) or [])

        import threading

        def truncate() -> None:
            data, peer = srv.recvfrom(4096)
            reply = bytearray(data[:12]) + data[12:-11]
            reply[2] |= 0x82
            reply[10:12] = b"\0\0"
            srv.sendto(bytes(reply), peer)

        t = threading.Thread(target=truncate)
        t.start()
        assert spfdns.lookup("big.example", "TXT", True, 5) == []
        t.join()
    assert asked == [("big.example", "TXT", True, 5)]
