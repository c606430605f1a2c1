"""The receive policy qmail-smtpd and qmail-qmtpd share: rcpthosts, RELAYCLIENT, databytes, badmailfrom.

Read once at start, as qmail reads them:

- control/rcpthosts and control/morercpthosts.cdb (pyqmail.smtpd.rcpthosts):
  the recipient domains accepted from a client that may not relay;
- $RELAYCLIENT: set, the client relays and its value is appended to every
  recipient;
- control/databytes, overridden by $DATABYTES (qmail's scan_ulong, kept in 32
  bits; 0 is no limit, 2^32-1 becomes 2^32-2 because qmail adds one);
- control/badmailfrom (qmail-smtpd only): an envelope sender, or '@domain',
  whose RCPTs are refused.

qmail-qmqpd takes none of them (qmail's relays for any client it is run for
and has no size limit), and keeps it so. The checks beyond these are
pyqmail.smtpd.policy's, for qmail-smtpd.
"""

from __future__ import annotations

from pyqmail import control
from pyqmail.smtpd.rcpthosts import RcptHosts

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1


def scan_ulong(s: bytes) -> tuple[int, int]:
    """Return (value, digits used) of the leading decimal digits of s, wrapping as C's unsigned long."""
    u = 0
    i = 0
    for c in s:
        if not 48 <= c <= 57:
            break
        u = (u * 10 + c - 48) & _U64
        i += 1
    return u, i


class Receive:
    """One program's receive policy; load() reads it."""

    __slots__ = ("rcpthosts", "relayclient", "databytes", "badmailfrom")

    def __init__(self, rcpthosts: RcptHosts, relayclient: bytes | None, databytes: int,
                 badmailfrom: frozenset[bytes] | None = None) -> None:
        self.rcpthosts = rcpthosts
        self.relayclient = relayclient
        self.databytes = databytes
        self.badmailfrom = badmailfrom  # lowercased entries, or None (no control/badmailfrom)

    @classmethod
    def load(cls, env: Mapping[bytes, bytes], badmailfrom: bool = True) -> Receive:
        """Read the controls and env; raise ControlError or OSError if a control file cannot be read."""
        rcpthosts = RcptHosts.load()
        bmf = None
        if badmailfrom:
            lines = control.read_lines("badmailfrom")
            bmf = None if lines is None else frozenset(b.encode("latin-1").lower() for b in lines)
        return cls(rcpthosts, env.get(b"RELAYCLIENT"), databytes(env), bmf)

    def allowed(self, addr: bytes) -> bool:
        """Whether a recipient is accepted without relaying rights (rcpthosts); ControlError on a bad cdb."""
        return self.rcpthosts.allowed(addr)


def databytes(env: Mapping[bytes, bytes]) -> int:
    """Return the message size limit: control/databytes, $DATABYTES over it; 0 for none."""
    n = control.read_int("databytes", 0) & U32
    x = env.get(b"DATABYTES")
    if x is not None:
        n = scan_ulong(x)[0] & U32
    if n == U32:
        n -= 1  # qmail adds one to it
    return n


def badmailfrom(bmf: frozenset[bytes] | None, addr: bytes) -> bool:
    """Whether addr, or its '@domain', is in badmailfrom (entries lowercased), as qmail's bmfcheck."""
    if bmf is None:
        return False
    if addr.lower() in bmf:
        return True
    at = addr.rfind(b"@")
    return at != -1 and addr[at:].lower() in bmf
