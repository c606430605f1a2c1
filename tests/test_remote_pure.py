"""qmail-remote's pure parts: reply parsing, DATA encoding, quoting, smtproutes, MX choice."""

from __future__ import annotations

import os

import pytest

from remotekit import DnsServer

from pyqmail.remote import mx, qmail_remote, smtproutes
from pyqmail.remote import smtpclient as sc


def parse(data: bytes, step: int = 0) -> tuple[sc.Reply, int]:
    r = sc.Reply()
    used = 0
    if step:
        for i in range(0, len(data), step):
            if r.done:
                break
            used += r.feed(data[i:i + step])
    else:
        used = r.feed(data)
    return r, used


@pytest.mark.parametrize("data, code, text", [
    (b"250 ok\r\n", 250, b"250 ok\n"),
    (b"250-a\r\n250-b\r\n250 c\r\nNEXT", 250, b"250-a\n250-b\n250 c\n"),
    (b"220\r\n", 220, b"220\n"),
    (b"220\n", 220, b"220\n"),
    (b"xyz\n", 8004, b"xyz\n"),  # qmail takes any three bytes as digits
    (b"554-a\r\n999 z\r\n", 554, b"554-a\n999 z\n"),  # later lines' codes are not checked
])
def test_reply_parser(data: bytes, code: int, text: bytes) -> None:
    for step in (0, 1, 2, 3, 5):
        r, used = parse(data, step)
        assert r.done and r.code == code and bytes(r.text) == text
        assert data[used:] in (b"", b"NEXT")


def test_reply_codes_wrap_like_unsigned_long() -> None:
    r, _ = parse(b" 22\n")
    assert r.code == ((32 - 48) * 100 + 2 * 10 + 2) % 2**64 and r.code >= 500


def test_reply_incomplete_and_huge() -> None:
    r, used = parse(b"250-first\r\n250 sec")
    assert not r.done and used == len(b"250-first\r\n250 sec")
    r = sc.Reply()
    r.feed(b"550 ")
    for _ in range(100):
        r.feed(b"z\r" * 50_000)
    assert not r.done
    r.feed(b"\r\nrest")
    assert r.done and len(r.text) == sc.HUGE_SMTP_TEXT and b"\r" not in r.text


def stuff(message: bytes, cuts: list[int]) -> tuple[bytes, bool]:
    s = sc.Stuffer()
    out = b""
    last = 0
    for c in [*cuts, len(message)]:
        out += s.feed(message[last:c])
        last = c
    out += s.end()
    return out, s.complete()


def test_stuffer_at_every_chunk_boundary() -> None:
    message = b".a\n..b\nc.\n.\n\r\n\n.x\r.y\rz\r\r\n.x"
    want = b"..a\r\n...b\r\nc.\r\n..\r\n\r\n\r\n..x\r\n..y\r\nz\r\n\r\n..x"
    for i in range(len(message) + 1):
        for j in range(i, len(message) + 1):
            assert stuff(message, [i, j]) == (want, False)
    assert stuff(b"", []) == (b"", True)
    assert stuff(b"a\n", [1]) == (b"a\r\n", True)
    assert stuff(b"a\r", [1]) == (b"a\r\n", True)  # a final CR ends the last line


# What notqmail 1.09's qmail-remote (built from source) sends for these messages: CR LF as
# CR LF, a bare CR as CR LF, LF as CR LF (qmail 1.03 sent CR CR LF for CR LF).
@pytest.mark.parametrize("message, wire", [
    (b"a\r\nb\n", b"a\r\nb\r\n"),
    (b"a\rb\n", b"a\r\nb\r\n"),
    (b"a\r", b"a\r\n"),
    (b"\r\n", b"\r\n"),
    (b"a\n\rb\n", b"a\r\n\r\nb\r\n"),
    (b".a\r\n..b\r", b"..a\r\n...b\r\n"),
])
def test_stuffer_as_notqmail_1_09(message: bytes, wire: bytes) -> None:
    assert stuff(message, []) == (wire, True)


# Where notqmail 1.09 puts a bare CR or an unstuffed dot on the wire (it sends the byte after a
# bare CR as it is), every CR ends a line and the new line is stuffed.
@pytest.mark.parametrize("message, wire, c_wire", [
    (b"a\r\r\n", b"a\r\n\r\n", b"a\r\n\r\r\n"),
    (b"x\r\rz\n", b"x\r\n\r\nz\r\n", b"x\r\n\rz\r\n"),
    (b"x\r.y\n", b"x\r\n..y\r\n", b"x\r\n.y\r\n"),
    (b".\r.\n", b"..\r\n..\r\n", b"..\r\n.\r\n"),  # C's would end DATA there
])
def test_stuffer_where_notqmail_breaks_the_protocol(message: bytes, wire: bytes, c_wire: bytes) -> None:
    assert stuff(message, []) == (wire, True)
    assert wire != c_wire


@pytest.mark.parametrize("box, quoted", [
    (b"user", b"user"), (b"a.b", b"a.b"), (b"", b'""'), (b".a", b'".a"'), (b"a.", b'"a."'),
    (b"a..b", b'"a..b"'), (b"a b", b'"a b"'), (b'a"b', b'"a\\"b"'), (b"a\\b", b'"a\\\\b"'),
    (b"\xe9", b'"\xe9"'), (b"a(b)", b'"a(b)"'), (b"x+y=z", b"x+y=z"),
])
def test_quote_box(box: bytes, quoted: bytes) -> None:
    assert sc.quote_box(box) == quoted


BOOK = ["example.com:realdomain.com", "example2.com:[1.2.3.4]", "example3.com:anotherdomain.com:26",
        ".example.com:subs.example.net", "example4.com:", ":mail.isp.com:1000", "no colon here"]


@pytest.mark.parametrize("host, want", [
    ("example.com", smtproutes.Route("realdomain.com", 25)),
    ("EXAMPLE.COM", smtproutes.Route("realdomain.com", 25)),
    ("example2.com", smtproutes.Route("[1.2.3.4]", 25)),
    ("example3.com", smtproutes.Route("anotherdomain.com", 26)),
    ("a.b.example.com", smtproutes.Route("subs.example.net", 25)),
    ("example4.com", None),
    ("other.org", smtproutes.Route("mail.isp.com", 1000)),
    ("no colon here", smtproutes.Route("mail.isp.com", 1000)),
])
def test_smtproutes_book(host: str, want: smtproutes.Route | None) -> None:
    assert smtproutes.lookup(smtproutes.parse(BOOK), host) == want


def test_smtproutes_details() -> None:
    routes = smtproutes.parse(["a.com:first", "a.com:second", "b.com:h:", "c.com:h:70000x", "d.com::26"])
    assert smtproutes.lookup(routes, "a.com") == smtproutes.Route("second", 25)  # constmap: last wins
    assert smtproutes.lookup(routes, "b.com") == smtproutes.Route("h", 0)
    assert smtproutes.lookup(routes, "c.com") == smtproutes.Route("h", 70000 & 0xFFFF)
    assert smtproutes.lookup(routes, "d.com") == smtproutes.Route("", 26)
    assert smtproutes.lookup(routes, "x.a.com") is None
    assert smtproutes.lookup({}, "a.com") is None


def test_literals() -> None:
    assert mx.literal("[1.2.3.4]") == "1.2.3.4"
    assert mx.literal("1.2.3.4") == "1.2.3.4"
    assert mx.literal("[1.2.3]") is None
    assert mx.literal("host.example") is None
    assert mx.ipv4_bytes("127.0.0.1") == b"\x7f\0\0\x01"
    assert mx.ipv4_bytes("::1") is None


def test_mx_order_preference_then_random() -> None:
    records = [(20, "c"), (10, "a"), (30, "d"), (10, "b")]
    for seed in range(50):
        got = mx.order(records, seed)
        assert [p for p, _ in got] == [10, 10, 20, 30]
        assert got == mx.order(records, seed)  # seedable: the same seed, the same order
    firsts = {mx.order(records, 1_700_000_000 + (pid << 16))[0][1] for pid in range(200)}
    assert firsts == {"a", "b"}


def test_mx_equal_preference_spreads() -> None:
    records = [(10, n) for n in "abcd"]
    counts = dict.fromkeys("abcd", 0)
    for seed in range(4000):
        counts[mx.order(records, seed * 7919 + (seed << 16))[0][1]] += 1
    assert all(600 < c < 1400 for c in counts.values()), counts


ZONE = {
    ("example.com", "MX"): ["20 mx2.example.com.", "10 mx1.example.com.", "30 mx3.example.com."],
    ("mx1.example.com", "A"): ["10.0.0.1", "10.0.0.11"],
    ("mx2.example.com", "A"): ["10.0.0.2"],
    ("mx3.example.com", "AAAA"): ["2001:db8::3"],
    ("plain.example.com", "A"): ["10.0.0.9"],
    ("alias.example.com", "CNAME"): ["plain.example.com."],
    ("mxalias.example.com", "CNAME"): ["example.com."],
    ("loop1.example.com", "CNAME"): ["loop2.example.com."],
    ("loop2.example.com", "CNAME"): ["loop1.example.com."],
    ("soft.example.com", "MX"): ["10 mx1.example.com.", "20 broken.example.com."],
}


@pytest.fixture(scope="module")
def resolver() -> mx.Resolver:
    d = DnsServer(ZONE, servfail={"broken.example.com"})
    yield mx.Resolver.from_env(d.env)
    d.close()


def test_mx_ip_against_dns(resolver: mx.Resolver) -> None:
    status, ips = mx.mx_ip(resolver, "example.com", 1)
    assert status == mx.OK
    # best preference first; a host's A records in the order the server gave them (it shuffles)
    assert [a.pref for a in ips] == [10, 10, 20, 30]
    assert {a.ip for a in ips[:2]} == {"10.0.0.1", "10.0.0.11"}
    assert ips[2:] == [mx.IpMx("10.0.0.2", 20), mx.IpMx("2001:db8::3", 30)]
    assert mx.mx_ip(resolver, "plain.example.com", 1) == (mx.OK, [mx.IpMx("10.0.0.9", 0)])
    assert mx.mx_ip(resolver, "alias.example.com", 1) == (mx.OK, [mx.IpMx("10.0.0.9", 0)])
    assert mx.mx_ip(resolver, "nowhere.example.com", 1) == (mx.HARD, [])
    assert mx.mx_ip(resolver, "broken.example.com", 1) == (mx.SOFT, [])
    status, ips = mx.mx_ip(resolver, "soft.example.com", 1)
    assert status == mx.SOFT and {a.ip for a in ips} == {"10.0.0.1", "10.0.0.11"}
    assert mx.mx_ip(resolver, "[10.1.2.3]", 1) == (mx.OK, [mx.IpMx("10.1.2.3", 0)])
    assert mx.ip(resolver, "example.com") == (mx.HARD, [])  # a relay's MX records are not used


def test_cname(resolver: mx.Resolver) -> None:
    assert mx.cname(resolver, "plain.example.com") == ("plain.example.com", 0)
    assert mx.cname(resolver, "alias.example.com") == ("plain.example.com", 1)
    assert mx.cname(resolver, "alias.example.com.") == ("plain.example.com", 2)
    assert mx.cname(resolver, "[1.2.3.4]") == ("[1.2.3.4]", 0)
    assert mx.cname(resolver, "loop1.example.com")[1] == -mx.HARD
    assert mx.cname(resolver, "broken.example.com") == ("broken.example.com", -mx.SOFT)


def test_nameserver_variable() -> None:
    assert mx.parse_nameservers("127.0.0.1") == [("127.0.0.1", 53)]
    assert mx.parse_nameservers(" 127.0.0.1:5353, [::1]:54 10.0.0.1 bad:port") == [
        ("127.0.0.1", 5353), ("::1", 54), ("10.0.0.1", 53)]


def test_crash_is_a_z_report(monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = os.pipe()

    def boom(argv: list[str], env: dict[str, str], dns: object = None) -> bytes:
        raise RuntimeError("boom")

    monkeypatch.setattr(qmail_remote, "deliver", boom)
    monkeypatch.setattr(qmail_remote, "FD_REPORT", w)
    assert qmail_remote.main(["qmail-remote", "h", "s", "r"]) == 0
    os.close(w)
    with os.fdopen(r, "rb") as f:
        assert f.read() == b"ZSorry, qmail-remote had an internal error. (#4.3.0)\n\0"
