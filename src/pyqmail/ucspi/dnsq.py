"""DNS lookups as djbdns's dns_txt and dns_ip4 make them, through dnspython, for rblsmtpd.

The caches asked are those of $DNSCACHEIP, as djbdns's clients honour it,
else the nameservers of /etc/resolv.conf, else 127.0.0.1. Beyond djbdns,
$DNSCACHEIP entries may name a port (``127.0.0.1:5353``, ``[::1]:5353``) and
may be separated by spaces or commas. Each cache is tried in turn with
timeouts of 1, 3, 11 and 45 seconds (djbdns's schedule). An answer whose
code is neither NOERROR nor NXDOMAIN, a name djbdns cannot encode, or no
answer at all is a temporary failure.

Large answers (issue 18.6; notqmail 1.09 takes answers up to 64 KB): queries
advertise an EDNS0 payload of 1232 bytes (DNS flag day 2020: no IP
fragmentation), and an answer truncated anyway (TC) is asked again over TCP
(up to 65535 bytes).
"""

from __future__ import annotations

import os
import re

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

    import dns.message

DNS_PORT = 53
TIMEOUTS = (1.0, 3.0, 11.0, 45.0)
RESOLV_CONF = "/etc/resolv.conf"
MAX_LABEL = 63
MAX_SERVERS = 16
EDNS_PAYLOAD = 1232
_V4_PORT = re.compile(r"^(\d{1,3}(?:\.\d{1,3}){3})(?::(\d+))?$")
_V6_PORT = re.compile(r"^\[([0-9A-Fa-f:.]+)\](?::(\d+))?$")


class Temporary(Exception):
    """The lookup failed temporarily: no answer could be had."""


def preload() -> None:
    """Import dnspython now (it costs tens of milliseconds) rather than at the first lookup."""
    import dns.exception  # noqa: F401
    import dns.flags  # noqa: F401
    import dns.message  # noqa: F401
    import dns.name  # noqa: F401
    import dns.query  # noqa: F401
    import dns.rcode  # noqa: F401
    import dns.rdataclass  # noqa: F401
    import dns.rdatatype  # noqa: F401


def parse_servers(text: str) -> list[tuple[str, int]]:
    """Return the (address, port) caches named by a $DNSCACHEIP value."""
    out = []
    for item in re.split(r"[\s,]+", text.strip()):
        m = _V4_PORT.match(item) or _V6_PORT.match(item)
        if m:
            out.append((m.group(1), int(m.group(2)) if m.group(2) else DNS_PORT))
        elif ":" in item:
            out.append((item, DNS_PORT))
    return out[:MAX_SERVERS]


def servers(environ: Mapping[str, str] | None = None) -> list[tuple[str, int]]:
    """Return the caches to ask: $DNSCACHEIP, else resolv.conf's nameservers, else 127.0.0.1."""
    env = os.environ if environ is None else environ
    if "DNSCACHEIP" in env:
        found = parse_servers(env["DNSCACHEIP"])
        if found:
            return found
    try:
        with open(RESOLV_CONF, encoding="latin-1") as f:
            text = f.read(1 << 16)
    except OSError:
        text = ""
    found = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            found += parse_servers(words[1])
    return found[:MAX_SERVERS] or [("127.0.0.1", DNS_PORT)]


def labels(name: bytes) -> list[bytes]:
    """Return the labels of a dotted name as djbdns reads it (empty labels skipped); raise Temporary."""
    out = [label for label in name.split(b".") if label]
    if any(len(label) > MAX_LABEL for label in out) or sum(len(x) + 1 for x in out) + 1 > 255:
        raise Temporary("name too long")
    return out


def _ask(name: bytes, rdtype_text: str, caches: list[tuple[str, int]]) -> list[object]:
    """Return the answer records of type rdtype_text (class IN) for name; raise Temporary."""
    import dns.exception
    import dns.flags
    import dns.message
    import dns.name
    import dns.query
    import dns.rcode
    import dns.rdataclass
    import dns.rdatatype

    rdtype = dns.rdatatype.from_text(rdtype_text)
    try:
        qname = dns.name.Name([*labels(name), b""])
    except dns.exception.DNSException as e:
        raise Temporary(str(e)) from e
    for timeout in TIMEOUTS:
        for address, port in caches:
            query = dns.message.make_query(qname, rdtype, use_edns=0, payload=EDNS_PAYLOAD)
            try:
                response = _udp(query, address, port, timeout)
                if response.flags & dns.flags.TC:
                    response = dns.query.tcp(query, address, timeout=timeout, port=port,
                                             one_rr_per_rrset=True)
            except (dns.exception.DNSException, OSError, ValueError, EOFError):
                continue
            if response.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                continue  # SERVFAIL, REFUSED...: djbdns asks the next cache
            records: list[object] = []
            for rrset in response.answer:
                if rrset.rdtype == rdtype and rrset.rdclass == dns.rdataclass.IN:
                    records.extend(rrset)
            return records
    raise Temporary("no cache answered")


def _udp(query: dns.message.Message, address: str, port: int, timeout: float) -> dns.message.Message:
    """Ask address over UDP; in a tcpserver worker serving several sessions, the others run meanwhile.

    Elsewhere dnspython's own blocking exchange. Both ignore datagrams that are not
    the answer (another id or question), as djbdns does, within one deadline.
    """
    import sys

    import dns.exception
    import dns.message
    import dns.query

    w = sys.modules.get("pyqmail.wait")
    if w is None or w.hub is None:
        return dns.query.udp(query, address, timeout=timeout, port=port,
                             ignore_unexpected=True, one_rr_per_rrset=True)
    import socket
    import time

    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.connect((address, port))
        s.send(query.to_wire())
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not w.readable(s.fileno(), left):
                raise dns.exception.Timeout
            try:
                data = s.recv(65535)
            except BlockingIOError:
                continue
            try:
                response = dns.message.from_wire(data, one_rr_per_rrset=True)
            except dns.exception.DNSException:
                continue  # not an answer: ignored, as ignore_unexpected does
            if query.is_response(response):
                return response


def _printable(data: bytes) -> bytes:
    return bytes(c if 32 <= c <= 126 else 0x3F for c in data)


def txt(name: bytes, caches: list[tuple[str, int]] | None = None) -> bytes:
    """Return the TXT strings of name concatenated, unprintables as '?' (b'' if none); raise Temporary."""
    records = _ask(name, "TXT", servers() if caches is None else caches)
    return b"".join(_printable(s) for r in records for s in r.strings)  # type: ignore[attr-defined]


def ip4(name: bytes, caches: list[tuple[str, int]] | None = None) -> list[str]:
    """Return the IPv4 addresses of name ([] if none); raise Temporary."""
    records = _ask(name, "A", servers() if caches is None else caches)
    return [r.address for r in records]  # type: ignore[attr-defined]


def ip6(name: bytes, caches: list[tuple[str, int]] | None = None) -> list[str]:
    """Return the IPv6 addresses of name ([] if none); raise Temporary."""
    records = _ask(name, "AAAA", servers() if caches is None else caches)
    return [r.address for r in records]  # type: ignore[attr-defined]


def mx(name: bytes, caches: list[tuple[str, int]] | None = None) -> list[tuple[int, bytes]]:
    """Return name's MX records as (preference, exchange) ([] if none; a null MX is b"."); raise Temporary."""
    records = _ask(name, "MX", servers() if caches is None else caches)
    return [(r.preference, r.exchange.to_text(omit_final_dot=True).encode("ascii"))  # type: ignore[attr-defined]
            for r in records]


def ptr(ip: str, caches: list[tuple[str, int]] | None = None) -> str | None:
    """Return the first PTR name of ip (lowercased, no final dot), None if it has none; raise Temporary."""
    import ipaddress

    try:
        name = ipaddress.ip_address(ip).reverse_pointer.encode("ascii")
    except ValueError as e:
        raise Temporary(str(e)) from e
    records = _ask(name, "PTR", servers() if caches is None else caches)
    for r in records:
        return r.target.to_text(omit_final_dot=True).lower()  # type: ignore[attr-defined,no-any-return]
    return None
