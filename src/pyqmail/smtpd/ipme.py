"""This host's IPv4 addresses, as qmail's ipme finds them (netqmail: 0.0.0.0 included).

qmail-smtpd needs them only to recognize box@[d.d.d.d] addresses for
control/localiphost, so they are read on first use. IPv6 (issue 18.1):
`ipv6_addresses` (from /proc/net/if_inet6, and ``::`` as 0.0.0.0 is
included) for box@[IPv6:...] and qmail-remote's best-MX check.
"""

from __future__ import annotations

SIOCGIFCONF = 0x8912
_IFREQ = 40  # sizeof(struct ifreq) on Linux/LP64


class IpmeError(Exception):
    """The interface addresses could not be read."""


def addresses() -> set[tuple[int, int, int, int]]:
    """Return the IPv4 addresses of every interface, and 0.0.0.0; raise IpmeError on failure."""
    import array
    import fcntl
    import socket
    import struct
    import sys

    found = {(0, 0, 0, 0)}  # RFC 1122 3.2.1.3: "this host"
    size = _IFREQ * 64
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            while True:
                buf = array.array("B", bytes(size))
                req = struct.pack("iP", size, buf.buffer_info()[0])
                used = struct.unpack("iP", fcntl.ioctl(s.fileno(), SIOCGIFCONF, req))[0]
                if used + 2 * _IFREQ < size:
                    break
                size *= 2  # the list may have been cut short
    except OSError as e:
        raise IpmeError(str(e)) from e
    raw = buf.tobytes()
    for off in range(0, used, _IFREQ):
        family = int.from_bytes(raw[off + 16:off + 18], sys.byteorder)
        if family == socket.AF_INET:
            a = raw[off + 20:off + 24]
            found.add((a[0], a[1], a[2], a[3]))
    return found


IF_INET6 = "/proc/net/if_inet6"


def ipv6_addresses() -> set[bytes]:
    """Return the 16-byte IPv6 addresses of every interface, and ``::`` (none where the kernel has no IPv6)."""
    found = {bytes(16)}
    try:
        with open(IF_INET6, encoding="ascii") as f:
            for line in f:
                words = line.split()
                if words and len(words[0]) == 32:
                    found.add(bytes.fromhex(words[0]))
    except FileNotFoundError:
        pass  # IPv6 off: only "::"
    return found


def is_local6(text: bytes) -> bool:
    """Return True if text is an IPv6 address of this host (False for anything else)."""
    import ipaddress

    try:
        packed = ipaddress.IPv6Address(text.decode("ascii")).packed
    except (ValueError, UnicodeDecodeError):
        return False
    return packed in ipv6_addresses()


class Ipme:
    """A lazily read set of local addresses; call with an address to test it."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set: set[tuple[int, int, int, int]] | None = None

    def __call__(self, ip: tuple[int, int, int, int]) -> bool:
        if self._set is None:
            self._set = addresses()
        return ip in self._set
