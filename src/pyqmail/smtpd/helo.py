"""qmail-smtpd's HELO checks: control/badhelo and control/badhelonorelay (the qregex patch, as in
jms1's and sagredo's qmail), and a forged-HELO check of pyqmail's own (control/rejectforgedhelo).

The HELO/EHLO name is judged when given; the refusal comes at each RCPT (as qregex:
the client may still authenticate, and a refused HELO refuses every recipient, not
the connection), all with qregex's ``553 sorry, your HELO host name has been denied
(#5.7.1)`` and a log line with the name and the client's IP. Off unless a file or
variable turns it on; a client that never says HELO/EHLO is not judged.

- control/badhelo: one pattern a line, a POSIX extended regular expression
  matched anywhere in the name, case ignored (qregex's REG_EXTENDED|REG_ICASE;
  read with Python's re, which agrees on the patterns admins write: ``^``, ``$``,
  ``\\.``, ``[0-9]``, ``|``, ``.*``); ``!pattern`` matches a name the pattern does not.
  $NOBADHELO set: ignored.
- control/badhelonorelay: the same, only for clients that may not relay.
- control/rejectforgedhelo (a number, not 0; $REJECTFORGEDHELO overrides), for a
  client that may not relay and is not this host (loopback or one of its addresses):
  the name is this host's (control/me, the first word of control/smtpgreeting,
  control/localiphost, ``localhost``) or one of its IP literals, or an IP literal
  (``[1.2.3.4]``, ``1.2.3.4``, ``[IPv6:...]``) that is not the client's own address.
"""

from __future__ import annotations

import ipaddress
import re

from pyqmail import control
from pyqmail.smtpd import policy
from pyqmail.smtpd.ipme import Ipme
from pyqmail.smtpd.log import field, warn
from pyqmail.ucspi.rules import scan_ulong

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from pyqmail.smtpd.policy import View

BADHELO = b"553 sorry, your HELO host name has been denied (#5.7.1)\r\n"

Patterns = list[tuple[bool, "re.Pattern[bytes]", bytes]]


def patterns(lines: list[str]) -> Patterns:
    """Return (negated, regex, line) for each qregex line; a line that is not a valid regex matches itself."""
    out = []
    for line in lines:
        negate = line.startswith("!")
        text = line[1:] if negate else line
        raw = text.encode("latin-1")
        try:
            rx = re.compile(raw, re.IGNORECASE)
        except re.error:
            rx = re.compile(re.escape(raw), re.IGNORECASE)
        out.append((negate, rx, line.encode("latin-1")))
    return out


def matches(pats: Patterns, name: bytes) -> bytes | None:
    """Return the first line (with its '!') that the name matches, or None (qregex's bmcheck)."""
    for negate, rx, line in pats:
        if (rx.search(name) is not None) != negate:
            return line
    return None


def literal(name: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Return the address a HELO name gives as an IP literal ([1.2.3.4], 1.2.3.4, [IPv6:::1]), else None."""
    text = name.decode("latin-1")
    if text[:1] == "[" and text[-1:] == "]":
        text = text[1:-1]
        if text[:5].lower() == "ipv6:":
            try:
                return ipaddress.IPv6Address(text[5:])
            except ValueError:
                return None
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        return None


def _address(ip: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        a = ipaddress.ip_address(ip.decode("latin-1"))
    except ValueError:
        return None
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


def forged(name: bytes, client: bytes, mine: frozenset[bytes],
           is_local: Callable[[tuple[int, int, int, int]], bool]) -> bytes | None:
    """Return why name is a forged HELO of a client (its IP) that is not this host, or None."""
    lit = literal(name)
    if lit is not None:
        if lit.is_loopback or lit.is_unspecified or (
                isinstance(lit, ipaddress.IPv4Address) and is_local(tuple(lit.packed))):  # type: ignore[arg-type]
            return b"this host's IP literal"
        if lit != _address(client):
            return b"IP literal of another host"
        return None
    if name.lower().rstrip(b".") in mine:
        return b"this host's name"
    return None


def _is_this_host(client: bytes, is_local: Callable[[tuple[int, int, int, int]], bool]) -> bool:
    a = _address(client)
    if a is None:
        return False
    if a.is_loopback:
        return True
    return isinstance(a, ipaddress.IPv4Address) and is_local(tuple(a.packed))  # type: ignore[arg-type]


class Helo(policy.Check):
    """badhelo, badhelonorelay and rejectforgedhelo: judged at HELO/EHLO, refused at RCPT."""

    name = "helo"

    def __init__(self, bad: Patterns | None, badnorelay: Patterns | None, forged: bool,
                 mine: frozenset[bytes], is_local: Callable[[tuple[int, int, int, int]], bool]) -> None:
        self.bad = bad
        self.badnorelay = badnorelay
        self.forged = forged
        self.mine = mine
        self.is_local = is_local
        # The names judged at HELO/EHLO -> why badhelo refuses them (None: it does not). Both the
        # session's current name and the one being given are kept: a check after this one may
        # refuse the new HELO, and the session then keeps its old name (and its verdict).
        self.judged: dict[bytes, bytes | None] = {}

    def helo(self, s: View, name: bytes) -> policy.Verdict | None:
        barf = None
        if self.bad:
            hit = matches(self.bad, name)
            if hit is not None:
                barf = (b"badhelo: <" + field(name) + b"> at " + field(s.remoteip)
                        + b" matches pattern: " + field(hit))
        current = s.helohost
        self.judged = {current: self.judged[current]} if current in self.judged else {}
        self.judged[name] = barf
        return None

    def rcpt(self, s: View, addr: bytes) -> policy.Verdict | None:
        name = s.helohost
        if name not in self.judged:
            return None  # no HELO/EHLO since the start (or since STARTTLS)
        why = self.judged[name]
        if why is None and not s.relaying and s.authuser is None:
            if self.badnorelay:
                hit = matches(self.badnorelay, name)
                if hit is not None:
                    why = (b"badhelonorelay: <" + field(name) + b"> at " + field(s.remoteip)
                           + b" matches pattern: " + field(hit))
            if why is None and self.forged and not _is_this_host(s.remoteip, self.is_local):
                reason = forged(name, s.remoteip, self.mine, self.is_local)
                if reason is not None:
                    why = b"forged HELO <" + field(name) + b"> at " + field(s.remoteip) + b": " + reason
        if why is None:
            return None
        warn(why)
        return policy.Verdict(BADHELO)


def _mine() -> frozenset[bytes]:
    names = {b"localhost"}
    for value in (control.me(), (control.read_default("smtpgreeting", None) or "").split(" ")[0],
                  control.read_default("localiphost", None)):
        if value:
            names.add(value.encode("latin-1").lower().rstrip(b"."))
    return frozenset(names)


def load(env: Mapping[bytes, bytes]) -> Helo | None:
    """Return the check when badhelo, badhelonorelay or rejectforgedhelo asks for one; ControlError if unreadable."""
    bad = None if b"NOBADHELO" in env else control.read_lines("badhelo")
    badnorelay = control.read_lines("badhelonorelay")
    x = env.get(b"REJECTFORGEDHELO")
    forged_on = scan_ulong(x)[0] != 0 if x is not None else control.read_int("rejectforgedhelo", 0) != 0
    if not bad and not badnorelay and not forged_on:
        return None
    return Helo(patterns(bad) if bad else None, patterns(badnorelay) if badnorelay else None, forged_on,
                _mine() if forged_on else frozenset(), Ipme())


policy.register("helo", load)
