"""A small DNS client for qmail-smtpd's SPF check: pyspf's DNSLookup over raw UDP datagrams.

qmail-smtpd runs in a child forked per connection, where every object code
touches for the first time costs a page copy: one lookup through dnspython's
query code cost a cold child 1.7 ms of CPU and 360 page faults, the same
query made and read here 0.2 ms and 40 (bench/smtpd.py --checks). So the
SPF check asks its few record types (A AAAA MX PTR TXT, and follows CNAMEs)
with a query put together by hand and an answer read by a bounded parser;
anything else (a truncated answer, which needs TCP; a reply that does not
parse) goes to dnspython, as pyspf would have.

dnspython's resolver (and what it imports: threading, ssl, email,
importlib.metadata...) is not loaded until that fallback needs it:
`import_spf` imports pyspf with dns.resolver standing in as a module that
loads the real one at its first attribute use. tcpserver's preloaded parent
thus stays half the size, which every fork and exit of a session pays for
(docs/DESIGN.md "Speed (bench/smtpd.py --checks)").

`lookup` has the interface of pyspf's DNSLookup: a list of ((name, type),
value) with value an address text (A, AAAA), (preference, exchange) (MX), a
name (PTR, CNAME) or the tuple of character-strings (TXT); [] for NXDOMAIN
or no such record; spf.TempError when no server answers.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import types

from pyqmail import wait as waiting

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

TYPES = {"A": 1, "NS": 2, "CNAME": 5, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28, "SPF": 99}
NAMES = {v: k for k, v in TYPES.items()}
TIMEOUTS = (1.0, 3.0, 11.0)  # seconds for a server's answer in each round (djbdns's first ones), within pyspf's timeout
EDNS_PAYLOAD = 1232  # as pyqmail's other resolvers (issue 18.6)

_servers: list[tuple[str, int]] = []
_fallback: Callable[..., Any] | None = None
_dnscacheip: str | None = None  # $DNSCACHEIP's value, for dnspython when the fallback runs
_dnspython_pointed = False  # dnspython's default resolver was pointed at a $DNSCACHEIP by _fall


class _Deferred(types.ModuleType):
    """A module standing in sys.modules (and as its package's attribute) until its first attribute use.

    `import` statements find it there without loading anything (its
    __spec__ is None, so no import waits on it); the first attribute read or set
    imports the real module, which takes its place in sys.modules and in the
    package, and every later use goes there.
    """

    def _real(self) -> types.ModuleType:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        __import__(name)
        return sys.modules[name]

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._real(), attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        setattr(self._real(), attr, value)  # e.g. dns.resolver.default_resolver = ..., before any read


def import_spf() -> Any:
    """Return pyspf, imported (the first time) without loading dnspython's resolver.

    pyspf imports dns, dns.resolver and dns.exception at its own import and
    uses dns.resolver only in its DNSLookup_dnspython, our fallback; dns and
    dns.exception (and dns.rdatatype, which pyspf checks for type SPF) are
    small and imported for real.
    """
    loaded = sys.modules.get("spf")
    if loaded is not None:
        return loaded
    if "dns.resolver" not in sys.modules:
        import dns
        import dns.exception  # noqa: F401
        import dns.rdatatype  # noqa: F401

        stand_in = _Deferred("dns.resolver")
        sys.modules["dns.resolver"] = stand_in
        setattr(dns, "resolver", stand_in)  # noqa: B010 - `import dns.resolver` binds dns; uses go through it
    import spf

    return spf


class Unreadable(Exception):
    """The answer does not parse (or is truncated): dnspython reads it instead."""


def install(servers: Sequence[tuple[str, int]], dnscacheip: str | None = None) -> None:
    """Make pyspf ask servers (address, port) through `lookup`; dnspython stays the fallback.

    dnscacheip ($DNSCACHEIP's value) is where the fallback points dnspython's
    default resolver when it runs; None leaves dnspython to read resolv.conf.
    """
    global _fallback, _dnscacheip
    spf = import_spf()

    _servers[:] = list(servers)
    _dnscacheip = dnscacheip
    if spf.DNSLookup is not lookup:
        _fallback = spf.DNSLookup
        spf.DNSLookup = lookup


def query_bytes(name: str, qtype: int, qid: int) -> bytes:
    """Return a recursive query for name and qtype with an EDNS0 OPT record."""
    wire = bytearray()
    for label in name.rstrip(".").split("."):
        raw = label.encode("idna") if not label.isascii() else label.encode()
        if not 0 < len(raw) < 64:
            raise Unreadable(f"bad label in {name!r}")
        wire += bytes([len(raw)]) + raw
    wire += b"\0"
    if len(wire) > 255:
        raise Unreadable(f"name too long: {name!r}")
    header = qid.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01"
    opt = b"\x00\x00\x29" + EDNS_PAYLOAD.to_bytes(2, "big") + b"\x00\x00\x00\x00\x00\x00"
    return header + bytes(wire) + qtype.to_bytes(2, "big") + b"\x00\x01" + opt


def _name(msg: bytes, pos: int) -> tuple[str, int]:
    """Read a possibly compressed name at pos; return (text without the final dot, position after it)."""
    labels: list[str] = []
    end = -1
    jumps = 0
    while True:
        if pos >= len(msg):
            raise Unreadable("name runs past the message")
        n = msg[pos]
        if n == 0:
            pos += 1
            break
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(msg):
                raise Unreadable("cut pointer")
            if end < 0:
                end = pos + 2
            jumps += 1
            if jumps > 64:
                raise Unreadable("pointer loop")
            pos = ((n & 0x3F) << 8) | msg[pos + 1]
            continue
        if n & 0xC0:
            raise Unreadable("unknown label type")
        labels.append(msg[pos + 1:pos + 1 + n].decode("latin-1"))
        pos += 1 + n
    return ".".join(labels), (end if end >= 0 else pos)


def parse(msg: bytes, qid: int) -> tuple[int, list[tuple[tuple[str, str], Any]]]:
    """Return (rcode, the answer records in DNSLookup's form) of a reply; raise Unreadable."""
    if len(msg) < 12 or int.from_bytes(msg[0:2], "big") != qid or not msg[2] & 0x80:
        raise Unreadable("not our answer")
    if msg[2] & 0x02:
        raise Unreadable("truncated")
    rcode = msg[3] & 0x0F
    qd = int.from_bytes(msg[4:6], "big")
    an = int.from_bytes(msg[6:8], "big")
    pos = 12
    for _ in range(qd):
        pos = _name(msg, pos)[1] + 4
    out: list[tuple[tuple[str, str], Any]] = []
    for _ in range(an):
        owner, pos = _name(msg, pos)
        if pos + 10 > len(msg):
            raise Unreadable("cut record")
        rtype = int.from_bytes(msg[pos:pos + 2], "big")
        rclass = int.from_bytes(msg[pos + 2:pos + 4], "big")
        size = int.from_bytes(msg[pos + 8:pos + 10], "big")
        start = pos + 10
        pos = start + size
        if pos > len(msg):
            raise Unreadable("cut record data")
        name = NAMES.get(rtype)
        if rclass != 1 or name is None:
            continue
        data = msg[start:pos]
        key = (owner, name)
        if rtype == 1 and size == 4:
            out.append((key, socket.inet_ntop(socket.AF_INET, data)))
        elif rtype == 28 and size == 16:
            out.append((key, socket.inet_ntop(socket.AF_INET6, data)))
        elif rtype == 15 and size >= 3:
            out.append((key, (int.from_bytes(data[:2], "big"), _name(msg, start + 2)[0])))
        elif rtype in (12, 5, 2):
            out.append((key, _name(msg, start)[0]))
        elif rtype in (16, 99):
            strings = []
            i = 0
            while i < size:
                n = data[i]
                if i + 1 + n > size:
                    raise Unreadable("cut character-string")
                strings.append(data[i + 1:i + 1 + n])
                i += 1 + n
            out.append((key, tuple(strings)))
    return rcode, out


def lookup(name: str, qtype: str, strict: object = True, timeout: float = 20) -> list[tuple[tuple[str, str], Any]]:
    """pyspf's DNSLookup: the records of qtype at name (CNAMEs included, pyspf follows them)."""
    import spf

    code = TYPES.get(qtype)
    if code is None or not _servers:
        return _fall(name, qtype, strict, timeout)
    qid = int.from_bytes(os.urandom(2), "big")
    try:
        packet = query_bytes(name, code, qid)
    except Unreadable:
        return []  # as pyspf: a name that cannot be asked has no records
    left = float(timeout)
    for wait in TIMEOUTS:
        for address, port in _servers:
            if left <= 0:
                break
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            deadline = time.monotonic() + min(wait, left)
            left -= wait
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as s:
                    s.connect((address, port))
                    s.send(packet)
                    while True:
                        # One deadline for the answer: datagrams of another id (strays, or forged
                        # ones) must not restart the wait.
                        left = max(deadline - time.monotonic(), 0.0)
                        if not waiting.readable(s.fileno(), left):
                            raise TimeoutError  # the others of a tcpserver worker ran meanwhile
                        s.settimeout(left or 1e-6)
                        reply = s.recv(65535)
                        if reply[:2] == packet[:2]:
                            break  # another id: a stray or forged datagram, ignored
            except OSError:
                continue  # timeout, refused: the next server
            try:
                rcode, records = parse(reply, qid)
            except Unreadable:
                return _fall(name, qtype, strict, timeout)  # TC (TCP needed) or odd: dnspython reads it
            if rcode == 3:
                return []  # NXDOMAIN
            if rcode != 0:
                continue  # SERVFAIL, REFUSED...: the next server, as dnscache's clients do
            return records
    raise spf.TempError(f"DNS no server answered for {name} {qtype}")


def _fall(name: str, qtype: str, strict: object, timeout: float) -> list[tuple[tuple[str, str], Any]]:
    import warnings

    import spf

    fallback = _fallback or spf.DNSLookup_dnspython
    _point_dnspython()
    with warnings.catch_warnings():
        # pyspf calls dnspython's deprecated dns.resolver.query: a warning, not a failure of the check
        # (here, not around every check: the common path never gets here).
        warnings.simplefilter("ignore", DeprecationWarning)
        return fallback(name, qtype, strict, timeout)  # type: ignore[no-any-return]


def _point_dnspython() -> None:
    """Point dnspython's default resolver at $DNSCACHEIP for the fallback, or back at resolv.conf's."""
    global _dnspython_pointed
    if _dnscacheip:
        from pyqmail.filter import dmarc

        dmarc.use_dnscacheip({"DNSCACHEIP": _dnscacheip})  # loads dnspython's resolver, here only
        _dnspython_pointed = True
    elif _dnspython_pointed:
        # An earlier session of this process (a reused tcpserver worker) pointed dnspython's
        # default resolver at its $DNSCACHEIP; this one has none: resolv.conf's, as a new process.
        import dns.resolver

        dns.resolver.reset_default_resolver()
        _dnspython_pointed = False
