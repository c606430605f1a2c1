"""Fuzzing tcprules(1): rule lines, their cdb, and tcpserver's lookup against a plain reading.

Properties: compile_line raises only RuleError; rules compiled into a cdb
and looked up as tcpserver does decide exactly what a plain reading of the
rules file decides: for the connection's addresses in tcprules(1)'s order
(info@ip, info@=host, ip, =host, ip prefixes ending in '.', =.host suffixes,
'=', the empty rule), the first rule line in the file whose address is that
one (or whose range a.b.c.x-y holds it) wins; deny or allow, and its
variables in order.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from fuzzkit import bounded, tracing  # noqa: F401  (tracing: an autouse fixture)
from pyqmail import cdb
from pyqmail.ucspi import rules

PIECE = st.sampled_from([b":", b"allow", b"deny", b",", b"=", b"X", b'"', b"'", b"1.2.3.", b"-", b"0", b"99999",
                         b"18446744073709551616", b"#", b"\n", b" ", b"\t", b"\0", b"@", b"=host"])
LINE = st.one_of(st.binary(max_size=120), st.lists(PIECE, max_size=20).map(b"".join))


@given(LINE)
@bounded
def test_compile_any_line(line: bytes) -> None:
    try:
        recs = rules.compile_line(line)
    except rules.RuleError as e:
        assert b"\0" not in e.shown
        return
    assert len(recs) <= 256
    for key, data in recs:
        assert data == b"" or data.endswith(b"\0")


OCTET = st.sampled_from([b"1", b"2", b"10", b"0", b"255"])
IP = st.tuples(OCTET, OCTET, OCTET, OCTET).map(b".".join)
HOST = st.sampled_from([b"a.example", b"b.a.example", b"example", b"x"])
INFO = st.sampled_from([b"joe", b"root"])


def _range(n: int, m: int) -> bytes:
    return b"%d-%d" % (n, m)


RANGE_PART = st.tuples(st.integers(0, 12), st.integers(0, 300)).map(lambda t: _range(*t))
ADDRESS = st.one_of(
    st.just(b""), IP,
    st.tuples(OCTET, OCTET).map(lambda t: t[0] + b"." + t[1] + b"."),
    st.tuples(OCTET, OCTET, OCTET, RANGE_PART).map(b".".join),
    st.tuples(OCTET, RANGE_PART).map(lambda t: t[0] + b"." + t[1] + b"."),
    HOST.map(lambda h: b"=" + h), HOST.map(lambda h: b"=." + h), st.just(b"="),
    st.tuples(INFO, IP).map(b"@".join),
    st.tuples(INFO, HOST).map(lambda t: t[0] + b"@=" + t[1]),
)
VAR = st.tuples(st.sampled_from([b"TCPREMOTEHOST", b"RELAYCLIENT", b"X"]), st.sampled_from(b"\"'x/|"),
                st.binary(max_size=10))


@dataclass
class Rule:
    address: bytes
    deny: bool
    env: list[tuple[bytes, bytes]]

    def line(self) -> bytes:
        out = self.address + (b":deny" if self.deny else b":allow")
        for name, value in self.env:
            out += b"," + name + b"=" + bytes((self.quote(value),)) + value + bytes((self.quote(value),))
        return out + b"\n"

    @staticmethod
    def quote(value: bytes) -> int:
        return next(q for q in b"\"'|/%!" if q not in value)


def _clean_value(v: bytes) -> bytes:
    # A value cannot hold NUL (the record's separator) and ends before trailing blanks are trimmed.
    return v.replace(b"\0", b"").replace(b"\n", b"")


RULE = st.builds(Rule, ADDRESS, st.booleans(),
                 st.lists(VAR.map(lambda t: (t[0], _clean_value(t[2]))), max_size=3))


def _matches(rule_address: bytes, key: bytes) -> bool:
    """A plain reading of one rule's address against one lookup key."""
    if rule_address == key:
        return True
    if b"=" in rule_address or b"@" in rule_address or b"-" not in rule_address:
        return False
    head, _, rest = rule_address.partition(b"-")
    left = head.rfind(b".") + 1
    prefix, low = head[:left], head[left:]
    high, dot, tail = rest.partition(b".")
    tail = dot + tail
    if not (low.isdigit() and high.isdigit()):
        return False
    if not (key.startswith(prefix) and key.endswith(tail) and len(key) >= len(prefix) + len(tail)):
        return False
    middle = key[len(prefix):len(key) - len(tail)]
    return middle.isdigit() and str(int(middle)).encode() == middle and \
        int(low) <= int(middle) <= min(int(high), 255)


def _plain_keys(ip: bytes, host: bytes | None, info: bytes | None) -> list[bytes]:
    keys = []
    if info is not None:
        keys.append(info + b"@" + ip)
        if host is not None:
            keys.append(info + b"@=" + host)
    keys.append(ip)
    if host is not None:
        keys.append(b"=" + host)
    parts = ip.split(b".")
    for n in range(len(parts) - 1, 0, -1):
        keys.append(b".".join(parts[:n]) + b".")
    if host is not None:
        labels = host.split(b".")
        for n in range(1, len(labels)):
            keys.append(b"=." + b".".join(labels[n:]))
        keys.append(b"=")
    keys.append(b"")
    return keys


@given(st.lists(RULE, max_size=12), st.lists(st.tuples(IP, st.one_of(st.none(), HOST),
                                                        st.one_of(st.none(), INFO)), min_size=1, max_size=6))
@bounded
def test_lookup_equals_a_plain_reading(rule_list: list[Rule], conns: list[tuple[bytes, bytes | None, bytes | None]],
                                       ) -> None:
    f = io.BytesIO()
    w = cdb.Writer(f)
    for r in rule_list:
        for key, data in rules.compile_line(r.line()):
            w.add(key, data)
    w.finish()
    reader = cdb.Reader(f.getvalue())
    for ip, host, info in conns:
        found = rules.find(reader, ip, host, info)
        want = None
        for key in _plain_keys(ip, host, info):
            want = next((r for r in rule_list if _matches(r.address, key)), None)
            if want is not None:
                break
        if want is None:
            assert found is None
            continue
        assert found is not None, (ip, host, info)
        assert rules.decide(found[1]) == (want.deny, want.env)
