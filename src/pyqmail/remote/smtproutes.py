"""control/smtproutes: artificial SMTP routes (qmail-control(5), qmail-remote(8)).

A line is domain:relay or domain:relay:port; a relay may be an IPv6 literal
(``[IPv6:2001:db8::1]``, pyqmail's reading: the relay ends at its ``]``),
and so may a key (``[IPv6:::1]:relay``: the key ends at ``]:``). The host is looked up as
itself, then as each suffix starting at a dot (.example.com matches
sub.example.com but not example.com), then as the empty domain; the most
specific key wins, and of lines with the same key the last one (as qmail's
constmap). Keys compare ASCII-case-insensitively; lines without a colon are
ignored. An empty relay means "use DNS as usual". Credentials may follow
relay[:port] (`relay:port user password` or `relay:port|user|password`:
pyqmail.remote.auth); they are never part of the relay or the port.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyqmail.control import lower
from pyqmail.remote import auth

DEFAULT_PORT = 25


@dataclass(frozen=True, slots=True)
class Route:
    """Where smtproutes sends a host: relay (a name, [d.d.d.d] or empty), port, and a login if any."""

    relay: str
    port: int
    login: auth.Credentials | None = None


def parse(lines: list[str]) -> dict[str, str]:
    """Return the key -> value map of smtproutes lines."""
    routes: dict[str, str] = {}
    for line in lines:
        end = line.find("]:") + 1 if line.startswith("[") else 0
        if end:  # an address literal as the key: [IPv6:::1]:relay
            key, colon, value = line[:end], ":", line[end + 1:]
        else:
            key, colon, value = line.partition(":")
        if colon:
            routes[lower(key)] = value
    return routes


def _scan_ulong(text: str) -> int:
    n = 0
    for ch in text:
        if not ("0" <= ch <= "9"):
            break
        n = (n * 10 + ord(ch) - 48) & 0xFFFFFFFFFFFFFFFF
    return n


def lookup(routes: dict[str, str], host: str) -> Route | None:
    """Return the route for host, or None to look up its MX records."""
    value = None
    for i in range(len(host) + 1):
        if i == 0 or i == len(host) or host[i] == ".":
            value = routes.get(lower(host[i:]))
            if value is not None:
                break
    return route(value or "")


def route(value: str) -> Route | None:
    """Return the route a line's value (relay[:port], credentials) names, None for an empty relay."""
    value, creds = auth.split(value)
    if not value:
        return None
    end = value.find("]") + 1
    if value.startswith("[") and end and value[end:end + 1] in ("", ":"):
        # An address literal, whose IPv6 form holds colons: [IPv6:::1]:2525.
        relay, colon, port = value[:end], value[end:end + 1], value[end + 1:]
    else:
        relay, colon, port = value.partition(":")
    # qmail scans the port as an unsigned long and connects to its low 16 bits.
    return Route(relay, _scan_ulong(port) & 0xFFFF if colon else DEFAULT_PORT, creds)
