"""Which addresses to try for a host, as qmail's dns_mxip/dns_ip/dns_cname decide.

The decisions are pure functions over a `Lookup` (anything with
`query(name, rdtype) -> (status, records)`), so tests can give them a fake
or a `Resolver` pointed at a DNS server on 127.0.0.1.

`Resolver` uses dnspython. Its nameservers come from $DNSCACHEIP when set
(djbdns's variable; pyqmail extension: a list of addresses separated by
spaces or commas, each optionally with a port, as 127.0.0.1:5353 or
[::1]:5353), else from /etc/resolv.conf. Lookups are never searched.

IPv6 (issue 18.1): a host's AAAA and A records are both asked for; its
addresses are tried IPv6 first, the families alternating (RFC 8305 section 4,
see qmail_remote for the fallback timing). ``[IPv6:...]`` literals are hosts too.

Large answers (issue 18.6): queries advertise an EDNS0 payload of `EDNS_PAYLOAD`
bytes, and dnspython asks a truncated (TC) answer again over TCP, so answers
of up to 64 KB are read whole, as notqmail 1.09's dns.c does. CNAME chains are
followed in the answer as the resolver gives them (dnspython's canonical name;
qmail's findmx/findip take the wanted type wherever the chain ends).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    import dns.resolver

    class Lookup(Protocol):
        def query(self, name: str, rdtype: str) -> tuple[int, list[str]]: ...

OK = 0
SOFT = 1  # try again later (SERVFAIL, timeout)
HARD = 2  # no such name or no such record
CNAME_LOOPS = 10
EDNS_PAYLOAD = 1232  # DNS flag day 2020: no IP fragmentation
# qmail's generator runs in an unsigned long; on the 32-bit machines it was written for that
# spreads the choice evenly, while 64-bit arithmetic would almost never move off the first
# record. pyqmail keeps the 32-bit behaviour, qmail's intent.
MASK32 = 0xFFFFFFFF

_DOTTED = re.compile(r"(\d+)\.(\d+)\.(\d+)\.(\d+)\Z", re.ASCII)


@dataclass(frozen=True, slots=True)
class IpMx:
    """An address to try (text form, as qmail prints it), the preference of its MX and the host's name."""

    ip: str
    pref: int
    name: str = field(default="", compare=False)  # the MX (or relay) name; "" for a literal


def literal(host: str) -> str | None:
    """Return the address of d.d.d.d or [d.d.d.d] (qmail's ip_scan), or of an IPv6 literal, else None.

    IPv6 (RFC 5321 4.1.3): ``[IPv6:2001:db8::1]`` (the tag in any case) and, in a route,
    ``[2001:db8::1]``; the address comes back compressed (``::1``), as DNS answers are.
    """
    bracketed = host.startswith("[") and host.endswith("]")
    inner = host[1:-1] if bracketed else host
    m = _DOTTED.match(inner)
    if m is None:
        if bracketed and ":" in inner:
            return ipv6_literal(inner[5:] if inner[:5].lower() == "ipv6:" else inner)
        return None
    return ".".join(str(int(g) & 255) for g in m.groups())


def ipv6_literal(text: str) -> str | None:
    """Return the compressed form of an IPv6 address text, None if it is not one."""
    import ipaddress

    try:
        return ipaddress.IPv6Address(text).compressed
    except ValueError:
        return None


def ipv4_bytes(ip: str) -> bytes | None:
    """Return the 4 bytes of a dotted IPv4 address, None for any other address."""
    m = _DOTTED.match(ip)
    if m is None:
        return None
    return bytes(int(g) & 255 for g in m.groups())


def ipv6_bytes(ip: str) -> bytes | None:
    """Return the 16 bytes of an IPv6 address text, None for any other address."""
    import ipaddress

    try:
        return ipaddress.IPv6Address(ip).packed
    except ValueError:
        return None


def interleave(v6: list[str], v4: list[str]) -> list[str]:
    """Return the addresses in RFC 8305 section 4's order: IPv6 first, then the families alternating."""
    out = []
    for i in range(max(len(v6), len(v4))):
        out += v6[i:i + 1] + v4[i:i + 1]
    return out


def ip_plus(dns: Lookup, host: str, pref: int) -> tuple[int, list[IpMx]]:
    """Return the addresses of host: a literal, or its AAAA and A records interleaved (IPv6 first).

    HARD only if neither family has an address for sure; SOFT if a lookup failed
    temporarily (with the addresses the other family gave, if any).
    """
    lit = literal(host) if host else None
    if lit is not None:
        return OK, [IpMx(lit, 0)]
    status, addrs = dns.query(host, "A")
    if status == SOFT:
        return SOFT, []  # as qmail: no address of this host is tried now
    st6, addrs6 = dns.query(host, "AAAA")
    if st6 != OK:
        addrs6 = []
    if status == HARD and not addrs6:
        return (SOFT if st6 == SOFT else HARD), []
    return OK, [IpMx(a, pref, host) for a in interleave(addrs6, addrs if status == OK else [])]


def ip(dns: Lookup, host: str) -> tuple[int, list[IpMx]]:
    """Return host's addresses as qmail's dns_ip (used for smtproutes relays)."""
    return ip_plus(dns, host, 0)


def order(mxs: list[tuple[int, str]], random: int) -> list[tuple[int, str]]:
    """Return the MX records in the order qmail tries them.

    Lowest preference first; among equal preferences each pick is random,
    driven by qmail's generator (random = random * 69069 + 1) from seed random.
    """
    random &= MASK32
    left = list(mxs)
    out = []
    while left:
        i = 0
        same = 1
        for j in range(1, len(left)):
            if left[j][0] < left[i][0]:
                i = j
                same = 1
            elif left[j][0] == left[i][0]:
                same += 1
                random = (random * 69069 + 1) & MASK32
                if random // 2 < 2147483647 // same:
                    i = j
        out.append(left[i])
        left[i] = left[-1]
        left.pop()
    return out


def mx_ip(dns: Lookup, host: str, random: int) -> tuple[int, list[IpMx]]:
    """Return the addresses for host's mail, as qmail's dns_mxip.

    A literal is itself; no MX records means the host's own addresses. The
    status is SOFT if some MX's addresses could not be looked up.
    """
    lit = literal(host) if host else None
    if lit is not None:
        return OK, [IpMx(lit, 0)]
    status, records = dns.query(host, "MX")
    if status == SOFT:
        return SOFT, []
    mxs = []
    for rec in records if status == OK else []:
        pref, _, name = rec.partition(" ")
        mxs.append((int(pref), name))
    if not mxs:
        return ip(dns, host)
    soft = False
    out: list[IpMx] = []
    for pref_, name in order(mxs, random):
        st, addrs = ip_plus(dns, name, pref_)
        if st == SOFT:
            soft = True
        out.extend(addrs)
    return (SOFT if soft else OK), out


def cname(dns: Lookup, host: str) -> tuple[str, int]:
    """Return (canonical name, loops) as qmail's dns_cname; loops < 0 is SOFT or -HARD (alias loop)."""
    for loop in range(CNAME_LOOPS):
        if not host or host.endswith("]"):
            return host, loop
        if host.endswith("."):
            host = host[:-1]
            continue
        status, targets = dns.query(host, "CNAME")
        if status == SOFT:
            return host, -SOFT
        if status == HARD or not targets:
            return host, loop
        host = targets[0]
    return host, -HARD


def parse_nameservers(value: str) -> list[tuple[str, int]]:
    """Return (address, port) pairs of a $DNSCACHEIP value; bad items are skipped."""
    out = []
    for item in re.split(r"[\s,]+", value.strip()):
        if not item:
            continue
        port = 53
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?", item)
        if m:
            addr = m.group(1)
            if m.group(2):
                port = int(m.group(2))
        elif item.count(":") == 1:
            addr, _, p = item.partition(":")
            if not p.isdigit():
                continue
            port = int(p)
        else:
            addr = item
        out.append((addr, port))
    return out


class Resolver:
    """Lookups through dnspython, with qmail's reading of the outcomes."""

    def __init__(self, nameservers: list[tuple[str, int]] | None = None, lifetime: float = 30.0) -> None:
        self.nameservers = nameservers
        self.lifetime = lifetime
        self._r: dns.resolver.Resolver | None = None
        self.secure: set[tuple[str, str]] = set()  # (name, type) answered with the AD bit

    def _resolver(self) -> dns.resolver.Resolver:
        # Made on first use: a route to [d.d.d.d] never pays for importing dnspython.
        if self._r is None:
            import dns.resolver

            if self.nameservers:
                import dns.nameserver

                r = dns.resolver.Resolver(configure=False)
                r.nameservers = [dns.nameserver.Do53Nameserver(a, p) for a, p in self.nameservers]
            else:
                r = dns.resolver.Resolver()
            r.lifetime = self.lifetime
            r.timeout = min(5.0, self.lifetime)
            # Ask for DNSSEC validation status (RFC 6840 section 5.7): the AD bit of the answer
            # says the resolver validated it; DANE (pyqmail.remote.dane) counts only those.
            import dns.flags

            r.flags = dns.flags.RD | dns.flags.AD
            r.use_edns(0, dns.flags.DO, EDNS_PAYLOAD)
            self._r = r
        return self._r

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Resolver:
        """Return a resolver using $DNSCACHEIP if set, else the system's."""
        value = env.get("DNSCACHEIP")
        return cls(parse_nameservers(value) if value else None)

    def query(self, name: str, rdtype: str) -> tuple[int, list[str]]:
        """Return (OK, records as text) or (SOFT|HARD, []) for name's rdtype records."""
        import dns.exception
        import dns.flags
        import dns.name
        import dns.resolver

        try:
            qname = dns.name.from_text(name) if name else dns.name.root
            ans = self._resolver().resolve(qname, rdtype, search=False, raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.YXDOMAIN, dns.name.NameTooLong,
                dns.name.LabelTooLong, dns.name.EmptyLabel, dns.name.BadEscape):
            return HARD, []
        except dns.exception.DNSException:
            return SOFT, []
        if ans.response.flags & dns.flags.AD:
            self.secure.add((name.rstrip(".").lower(), rdtype))
        if ans.rrset is None:
            return HARD, []
        out = []
        for rd in ans.rrset:
            if rdtype == "MX":
                out.append(f"{rd.preference} {rd.exchange.to_text(omit_final_dot=True)}")
            elif rdtype == "CNAME":
                out.append(rd.target.to_text(omit_final_dot=True))
            elif rdtype == "TXT":
                out.append(b"".join(rd.strings).decode("latin-1"))
            elif rdtype == "TLSA":
                out.append(f"{rd.usage} {rd.selector} {rd.mtype} {rd.cert.hex()}")
            else:
                out.append(rd.address)
        return OK, out


def authenticated(dns: Lookup, name: str, rdtype: str) -> bool:
    """Return whether dns answered name's rdtype records with the AD bit (DNSSEC-validated)."""
    return (name.rstrip(".").lower(), rdtype) in getattr(dns, "secure", ())


def local_addresses() -> set[str]:
    """Return this host's interface addresses (qmail's ipme, and IPv6 ones from /proc)."""
    import ipaddress

    from pyqmail.smtpd.ipme import addresses, ipv6_addresses

    found = {".".join(map(str, a)) for a in addresses()}
    found.update(ipaddress.IPv6Address(a).compressed for a in ipv6_addresses())
    return found
