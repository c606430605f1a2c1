"""qmail-send's decisions, free of I/O: retry times, recipient rewriting, VERP senders.

Addresses are bytes. Domain comparisons are case-insensitive for ASCII
letters only, as qmail's constmap compares (bytes.lower() touches A-Z only).
Where a control file lists a key twice, the last entry wins, as in constmap.
"""

from __future__ import annotations

import math

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Iterable

LOCAL = 0
REMOTE = 1
CHANNELS = (LOCAL, REMOTE)
CHANSKIP = (10, 20)  # seconds; the retry schedule's step per channel
DEFAULT_LIFETIME = 604800  # control/queuelifetime: one week
DEFAULT_CONCURRENCY = (10, 20)  # control/concurrencylocal, control/concurrencyremote
SPAWN_MAX = 120  # qmail's conf-spawn: the most deliveries a spawner runs at once (at most 255)
TOO_LONG = b"I'm not going to try again; this message has been in the queue too long.\n"


def squareroot(x: int) -> int:
    """Return the integer square root of x >= 0 (r*r <= x < (r+1)*(r+1))."""
    # qmail's squareroot works on 16 result bits; the exact root agrees below 2**32.
    return math.isqrt(x) if x > 0 else 0


def next_retry(birth: int, now: int, channel: int) -> int:
    """Return when to try a message born at birth again, after an attempt at now.

    qmail's schedule: birth + (isqrt(now - birth) + chanskip)**2, so a local
    recipient is tried about 0, 100, 400, 900, 1600... seconds after queueing
    and a remote one 0, 400, 1600, 3600... seconds after.
    """
    n = 0 if birth > now else squareroot(now - birth)
    n += CHANSKIP[channel]
    return birth + n * n


def dying(birth: int, now: int, lifetime: int) -> bool:
    """Return True if a message born at birth has outlived the queue lifetime at now."""
    return now > birth + lifetime


def verp_sender(sender: bytes, recip: bytes) -> bytes:
    """Return the envelope sender for one delivery: a VERP sender 'L@H-@[]' becomes 'L' + 'box=host' + '@H'.

    Any other sender is returned unchanged, as is a VERP sender when the
    recipient has no '@'.
    """
    if not sender.endswith(b"-@[]"):
        return sender
    body = sender[:-4]
    j = body.rfind(b"@")
    if j == -1:
        j = len(body)
    k = recip.rfind(b"@")
    if k == -1 or j + 5 > len(sender):
        return sender
    return sender[:j] + recip[:k] + b"=" + recip[k + 1:] + b"@" + sender[j + 1:len(sender) - 4]


class ColonMap:
    """A 'key:value' list (virtualdomains, recipientmap) looked up case-insensitively; last entry wins.

    Lines without a colon are ignored, as qmail ignores them.
    """

    __slots__ = ("_map",)

    def __init__(self, lines: Iterable[bytes]) -> None:
        self._map: dict[bytes, bytes] = {}
        for line in lines:
            colon = line.find(b":")
            if colon == -1:
                continue
            self._map[line[:colon].lower()] = line[colon + 1:]

    def get(self, key: bytes) -> bytes | None:
        """Return the value for key (any case), or None."""
        return self._map.get(key.lower())

    def __len__(self) -> int:
        return len(self._map)


class Rewriter:
    """qmail-send's preprocessing of one recipient: envnoathost, percenthack, recipientmap, locals, virtualdomains."""

    __slots__ = ("envnoathost", "_locals", "_percenthack", "_vdoms", "_rmap")

    def __init__(self, envnoathost: bytes, locals_: Iterable[bytes], percenthack: Iterable[bytes] = (),
                 virtualdomains: Iterable[bytes] = (), recipientmap: Iterable[bytes] = ()) -> None:
        self.envnoathost = envnoathost
        self._locals = frozenset(d.lower() for d in locals_)
        self._percenthack = frozenset(d.lower() for d in percenthack)
        self._vdoms = ColonMap(virtualdomains)
        self._rmap = ColonMap(recipientmap)

    def reread(self, locals_: Iterable[bytes], virtualdomains: Iterable[bytes]) -> None:
        """Replace locals and virtualdomains (what SIGHUP rereads)."""
        self._locals = frozenset(d.lower() for d in locals_)
        self._vdoms = ColonMap(virtualdomains)

    def is_local(self, domain: bytes) -> bool:
        """Return True if domain is listed in locals (any case)."""
        return domain.lower() in self._locals

    def rewrite(self, recip: bytes) -> tuple[int, bytes]:
        """Return (LOCAL or REMOTE, the address to deliver to) for an envelope recipient."""
        addr = recip
        at = addr.rfind(b"@")
        if at == -1:
            addr = addr + b"@" + self.envnoathost
            at = len(recip)
        # The percent hack: while the domain is listed and the box has a '%',
        # the last '%' becomes the '@' and the old domain is dropped.
        while addr[at + 1:].lower() in self._percenthack:
            pct = addr.rfind(b"%", 0, at)
            if pct == -1:
                break
            addr = addr[:pct] + b"@" + addr[pct + 1:at]
            at = pct
        if len(self._rmap):
            mapped = self._rmap.get(addr)
            if mapped is not None:
                addr = mapped
        at = addr.rfind(b"@")
        if addr[at + 1:].lower() in self._locals:
            return LOCAL, addr
        prepend = self.virtual_prepend(addr, at)
        if prepend:
            return LOCAL, prepend + b"-" + addr
        return REMOTE, addr

    def virtual_prepend(self, addr: bytes, at: int) -> bytes | None:
        """Return the virtualdomains prepend deciding addr: b'' for an exception, None if no entry matches.

        Tried in order: the whole address, the domain, each '.suffix' of the
        domain from the longest, then the empty catch-all.
        """
        n = len(addr)
        for i in range(n + 1):
            if i == 0 or i == at + 1 or i == n or (i > at and addr[i:i + 1] == b"."):
                x = self._vdoms.get(addr[i:])
                if x is not None:
                    return x
        return None

    def strip_prepend(self, recip: bytes) -> bytes:
        """Return recip without the virtualdomains prepend its domain adds (for bounce texts)."""
        i = recip.rfind(b"@")
        if i == -1:
            return recip
        domain = recip[i + 1:]
        n = len(domain)
        for j in range(n + 1):
            if j == 0 or j == n or domain[j:j + 1] == b".":
                prepend = self._vdoms.get(domain[j:])
                if prepend is not None:
                    if not prepend:
                        break
                    if recip[:len(prepend)] != prepend or recip[len(prepend):len(prepend) + 1] != b"-":
                        break
                    return recip[len(prepend) + 1:]
        return recip
