"""qmail-smtpd's sender-domain check: control/mfcheck and $MFCHECK, as John Simpson's mfcheck patch
(qmail-1.03-mfcheck.3.patch, in his combined patch).

control/mfcheck holds a number ($MFCHECK overrides it): 0 (the default) is off; 1
checks at MAIL that the envelope sender's domain resolves: it has an MX record, or
else an A or AAAA record. 2 also logs each failure, 3 each success too. The null
sender ``<>``, qmail's ``#@[]`` and a domain literal (``[1.2.3.4]``) pass. A sender
without a domain, a domain that does not exist or has none of those records (or only
RFC 7505's null MX): ``553 sorry, your envelope sender domain must exist (#5.7.1)``.
No DNS answer: ``451 DNS temporary failure (#4.3.0)``. Beyond the patch, a client
that may relay (RELAYCLIENT, AUTH, a tlsclients certificate) is not checked, nor a
session without $TCPREMOTEIP.
"""

from __future__ import annotations

from pyqmail import control
from pyqmail.smtpd import policy
from pyqmail.smtpd.log import field, warn
from pyqmail.ucspi import dnsq
from pyqmail.ucspi.rules import scan_ulong

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from pyqmail.smtpd.policy import View

MUST_EXIST = b"553 sorry, your envelope sender domain must exist (#5.7.1)\r\n"
DNS_TEMPORARY = b"451 DNS temporary failure (#4.3.0)\r\n"
PASS, HARD, SOFT = 0, 1, 2


def resolve(domain: bytes, mx: Callable[[bytes], list[tuple[int, bytes]]],
            ip4: Callable[[bytes], list[str]], ip6: Callable[[bytes], list[str]]) -> int:
    """Return PASS if domain has an MX (not null) or else an A or AAAA record, HARD if not, SOFT if DNS failed."""
    if domain[:1] == b"[" and domain[-1:] == b"]":
        return PASS  # a domain literal names an address, nothing to look up
    try:
        exchanges = mx(domain)
        if exchanges:
            return HARD if all(host in (b".", b"") for _, host in exchanges) else PASS
        return PASS if ip4(domain) or ip6(domain) else HARD
    except dnsq.Temporary:
        return SOFT


class MfCheck(policy.Check):
    """The envelope sender's domain must resolve (at MAIL)."""

    name = "mfcheck"

    def __init__(self, level: int, mx: Callable[[bytes], list[tuple[int, bytes]]] = dnsq.mx,
                 ip4: Callable[[bytes], list[str]] = dnsq.ip4, ip6: Callable[[bytes], list[str]] = dnsq.ip6) -> None:
        self.level = level
        self.mx = mx
        self.ip4 = ip4
        self.ip6 = ip6

    def mail(self, s: View, addr: bytes) -> policy.Verdict | None:
        if not addr or addr == b"#@[]" or s.relaying or s.authuser is not None or not s.remoteip:
            return None  # no client address: tcpserver's parent warming up (or a local pipe)
        at = addr.rfind(b"@")
        domain = addr[at + 1:] if at != -1 else b""
        if not domain:
            if self.level > 1:
                warn(b"MFCHECK invalid [" + field(s.remoteip) + b"] " + field(addr))
            return policy.Verdict(MUST_EXIST)
        result = resolve(domain, self.mx, self.ip4, self.ip6)
        if result == PASS:
            if self.level > 2:
                warn(b"MFCHECK pass [" + field(s.remoteip) + b"] " + field(domain))
            return None
        if self.level > 1:
            warn(b"MFCHECK fail [" + field(s.remoteip) + b"] " + field(domain)
                 + (b" (DNS temporary failure)" if result == SOFT else b""))
        return policy.Verdict(DNS_TEMPORARY if result == SOFT else MUST_EXIST)


def load(env: Mapping[bytes, bytes]) -> MfCheck | None:
    """Return the check when $MFCHECK or control/mfcheck is not 0; ControlError if unreadable."""
    x = env.get(b"MFCHECK")
    level = scan_ulong(x)[0] if x is not None else control.read_int("mfcheck", 0)
    if not level:
        return None
    dnsq.preload()  # in tcpserver's parent (qmail_smtpd.preload), once for every child
    return MfCheck(level)


policy.register("mfcheck", load)
