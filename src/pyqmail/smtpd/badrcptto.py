"""qmail-smtpd's control/badrcptto, as the badrcptto patch: recipients refused at RCPT.

One entry a line, as control/badmailfrom: an address, or ``@domain`` for every
address in that domain, case ignored. A listed recipient gets ``553 sorry, mail to
that recipient is not accepted (#5.7.1)``, whoever the client is, and counts as a
bad recipient toward control/brtlimit ($BRTLIMIT). Each refusal is logged with the
client's IP. No file: no check.
"""

from __future__ import annotations

from pyqmail import control
from pyqmail.smtpd import policy
from pyqmail.smtpd.log import field, warn

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

    from pyqmail.smtpd.policy import View

BADRCPTTO = b"553 sorry, mail to that recipient is not accepted (#5.7.1)\r\n"


def listed(entries: frozenset[bytes], addr: bytes) -> bool:
    """Return whether entries (lowercased) list addr or its @domain."""
    a = addr.lower()
    if a in entries:
        return True
    at = a.rfind(b"@")
    return at != -1 and a[at:] in entries


class BadRcptTo(policy.Check):
    """control/badrcptto at RCPT."""

    name = "badrcptto"

    def __init__(self, entries: frozenset[bytes]) -> None:
        self.entries = entries

    def rcpt(self, s: View, addr: bytes) -> policy.Verdict | None:
        if not listed(self.entries, addr):
            return None
        warn(b"badrcptto: <" + field(addr) + b"> at " + field(s.remoteip))
        return policy.Verdict(BADRCPTTO, badrcpt=True)


def load(env: Mapping[bytes, bytes]) -> BadRcptTo | None:
    """Return the check when control/badrcptto exists; ControlError if it cannot be read."""
    lines = control.read_lines("badrcptto")
    if not lines:
        return None
    return BadRcptTo(frozenset(line.encode("latin-1").lower() for line in lines))


policy.register("badrcptto", load)
