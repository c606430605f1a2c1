"""The Received line qmail-smtpd, qmail-qmtpd and qmail-qmqpd put on top of a message.

    Received: from relay1.uu.net (HELO uunet.uu.net) (7@192.48.96.5)
      by silverton.berkeley.edu with SMTP; 26 Sep 1995 04:46:54 -0000

Every field that came from the network or the environment goes through
`safe`: a byte outside letters, digits and ``.@%+/=:-[]`` becomes ``?``.
"""

from __future__ import annotations

import os
import time

_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.@%+/=:-[]")
_TABLE = bytes(c if c in _SAFE else ord("?") for c in range(256))
_MONTHS = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec")


def safe(field: bytes) -> bytes:
    """Return field with every unsafe byte replaced by '?'."""
    return field.translate(_TABLE)


def date822(when: int) -> bytes:
    """Return qmail's date822fmt of when: '26 Sep 1995 04:46:54 -0000' (UTC)."""
    t = time.gmtime(when)
    return b"%d %s %d %02d:%02d:%02d -0000" % (t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year,
                                                t.tm_hour, t.tm_min, t.tm_sec)


def received(protocol: bytes, local: bytes, remoteip: bytes, remotehost: bytes,
             remoteinfo: bytes | None, helo: bytes | None, when: int) -> bytes:
    """Return the two-line Received field, final newline included."""
    out = [b"Received: from ", safe(remotehost)]
    if helo is not None:
        out += [b" (HELO ", safe(helo), b")"]
    out.append(b" (")
    if remoteinfo is not None:
        out += [safe(remoteinfo), b"@"]
    out += [safe(remoteip), b")\n  by ", safe(local), b" with ", protocol, b"; ", date822(when), b"\n"]
    return b"".join(out)


class Peer:
    """Who is on the other end, from tcp-environ(5), as qmail's network servers read it."""

    __slots__ = ("remoteip", "remotehost", "remoteinfo", "local")

    def __init__(self, remoteip: bytes, remotehost: bytes, remoteinfo: bytes | None, local: bytes) -> None:
        self.remoteip = remoteip
        self.remotehost = remotehost
        self.remoteinfo = remoteinfo
        self.local = local

    @classmethod
    def from_env(cls, env: os._Environ[bytes] | dict[bytes, bytes] | None = None) -> Peer:
        """Read TCPREMOTEIP, TCPREMOTEHOST, TCPREMOTEINFO, TCPLOCALHOST/TCPLOCALIP ('unknown' if unset)."""
        e = os.environb if env is None else env
        local = e.get(b"TCPLOCALHOST")
        if local is None:
            local = e.get(b"TCPLOCALIP")
        return cls(e.get(b"TCPREMOTEIP", b"unknown"), e.get(b"TCPREMOTEHOST", b"unknown"),
                   e.get(b"TCPREMOTEINFO"), b"unknown" if local is None else local)

    def received(self, protocol: bytes, helo: bytes | None, when: int) -> bytes:
        """Return the Received field for a message from this peer."""
        return received(protocol, self.local, self.remoteip, self.remotehost, self.remoteinfo, helo, when)
