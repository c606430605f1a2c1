"""The RBL decision of rblsmtpd(1), shared by rblsmtpd and qmail-smtpd's control/dnsbllist.

`reverse` makes the query prefix of a client address (RFC 5782: the octets
of an IPv4 address reversed, the nibbles of an IPv6 address reversed);
`Decision` is ucspi-tcp's decision, one source at a time, with the lookups
given (no I/O here).
"""

from __future__ import annotations

import socket

from pyqmail.ucspi import dnsq

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

MAX_TEXT = 200
LOOKUP_ERROR = b"temporary RBL lookup error"

UNDECIDED, ACCEPTED_CLIENT, REFUSE, BOUNCE = 0, 1, 2, 3


def reverse(ip: bytes) -> bytes:
    """Return the RBL query prefix of an address: ``4.3.2.1.`` for 1.2.3.4 (IPv6: its nibbles)."""
    if not ip:
        return b""
    if b":" in ip:
        try:
            packed = socket.inet_pton(socket.AF_INET6, ip.decode("ascii"))
        except (OSError, UnicodeError, ValueError):
            packed = b""
        if packed[:12] == b"\0" * 10 + b"\xff\xff":
            ip = socket.inet_ntoa(packed[12:]).encode()
        elif packed:
            return b"".join(b"%x.%x." % (c & 15, c >> 4) for c in reversed(packed))
    return b".".join(reversed(ip.split(b"."))) + b"."


class Decision:
    """rblsmtpd's decision, made one source at a time (pure: lookups are given)."""

    __slots__ = ("decision", "text", "bounce_listed", "fail_closed", "must_not_bounce", "prefix")

    def __init__(self, ip: bytes, rblsmtpd: bytes | None) -> None:
        self.decision = UNDECIDED
        self.text = b""
        self.bounce_listed = False  # -b
        self.fail_closed = False  # -c
        self.must_not_bounce = False
        self.prefix = reverse(ip)
        if rblsmtpd is not None:
            if not rblsmtpd:
                self.decision = ACCEPTED_CLIENT
            elif rblsmtpd[:1] == b"-":
                self.decision, self.text = BOUNCE, rblsmtpd[1:]
            else:
                self.decision, self.text = REFUSE, rblsmtpd

    def rbl(self, base: bytes, txt: Callable[[bytes], bytes]) -> None:
        """Ask an RBL source (txt looks up a name's TXT text, raising dnsq.Temporary)."""
        if self.decision:
            return
        try:
            self.text = txt(self.prefix + base)
        except dnsq.Temporary:
            self.must_not_bounce = True
            if self.fail_closed:
                self.text = LOOKUP_ERROR
                self.decision = REFUSE
            return
        if self.text:
            self.decision = BOUNCE if self.bounce_listed else REFUSE

    def antirbl(self, base: bytes, ip4: Callable[[bytes], list[str]]) -> None:
        """Ask an anti-RBL source (ip4 looks up a name's addresses, raising dnsq.Temporary)."""
        if self.decision:
            return
        try:
            listed = bool(ip4(self.prefix + base))
        except dnsq.Temporary:
            self.must_not_bounce = True
            if not self.fail_closed:
                self.decision = ACCEPTED_CLIENT
            return
        if listed:
            self.decision = ACCEPTED_CLIENT

    @property
    def blocked(self) -> bool:
        return self.decision >= REFUSE

    def message(self) -> bytes:
        """Return the refusal (without CRLF): 451 or 553, the text cut at 200, unprintables as '?'."""
        code = b"451 " if self.must_not_bounce or self.decision == REFUSE else b"553 "
        text = code + self.text[:MAX_TEXT]
        return bytes(c if 32 <= c <= 126 else 0x3F for c in text)
