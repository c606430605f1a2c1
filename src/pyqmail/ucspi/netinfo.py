"""What tcpserver and tcp-env learn about a connection's ends: addresses and host names.

Names come from the system resolver (getnameinfo/getaddrinfo: /etc/hosts,
then DNS as nsswitch.conf says), lowercased as tcp-environ(5) asks. In a
tcpserver worker serving several sessions (pyqmail.ucspi.hub), where the C
resolver's wait would hold every session, a PTR name comes from /etc/hosts,
then from DNS through pyqmail.ucspi.dnsq ($DNSCACHEIP or resolv.conf's
servers, djbdns's timeouts: as C tcpserver's dns_name4), whose wait lets the
others run.
"""

from __future__ import annotations

import socket

_MAPPED = "::ffff:"


class SoftError(Exception):
    """The resolver failed temporarily: no answer either way."""


def ip_text(host: str, v6_env: bool = False) -> str:
    """Return the address text of a socket address host (no scope; IPv4-mapped as IPv4 unless v6_env)."""
    host = host.split("%", 1)[0]
    if not v6_env and host.startswith(_MAPPED) and "." in host:
        return host[len(_MAPPED):]
    if v6_env and ":" not in host:
        return _MAPPED + host
    return host


HOSTS = "/etc/hosts"


def _hosts_name(ip: str, path: str = HOSTS) -> str | None:
    """Return the first name /etc/hosts gives ip (its first line for ip), lowercased; None if none."""
    import ipaddress

    try:
        want = ipaddress.ip_address(ip)
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except (OSError, ValueError):
        return None
    for line in data.split(b"\n"):
        fields = line.split(b"#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            if ipaddress.ip_address(fields[0].decode("ascii").split("%", 1)[0]) == want:
                return fields[1].decode("utf-8", "surrogateescape").lower()
        except (ValueError, UnicodeError):
            continue
    return None


def _in_hub() -> bool:
    import sys

    w = sys.modules.get("pyqmail.wait")
    return w is not None and w.hub is not None


def ptr(ip: str) -> str | None:
    """Return the lowercased host name of ip, or None if it has none; raise SoftError."""
    if _in_hub():
        from pyqmail.ucspi import dnsq

        name = _hosts_name(ip)
        if name is not None:
            return name
        try:
            return dnsq.ptr(ip)
        except dnsq.Temporary as e:
            raise SoftError(str(e)) from e
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sockaddr: tuple[str, int] | tuple[str, int, int, int] = (ip, 0) if family == socket.AF_INET else (ip, 0, 0, 0)
    try:
        # NI_NUMERICSERV: the port's service name is not wanted, and looking it up reads
        # /etc/services through nsswitch.conf's "services:" modules in every child.
        name, _ = socket.getnameinfo(sockaddr, socket.NI_NAMEREQD | socket.NI_NUMERICSERV)
    except socket.gaierror as e:
        if e.errno == socket.EAI_AGAIN:
            raise SoftError(str(e)) from e
        return None
    except OSError as e:
        raise SoftError(str(e)) from e
    return name.lower()


def warm() -> None:
    """Set the C library's resolver up in this process (a parent), so that forked children share it.

    The first lookup of a process reads host.conf, resolv.conf and nsswitch.conf and
    loads the modules it names; done once here (a lookup of the loopback address, which
    /etc/hosts answers), each child's lookup only reads /etc/hosts or asks the DNS.
    """
    try:
        ptr("127.0.0.1")
    except SoftError:
        pass  # safe: only a warm-up; each child asks again and handles the failure


def ptr_env(ip: str) -> bytes | None:
    """Return ip's host name as TCPREMOTEHOST/TCPLOCALHOST carry it, or None (none, or no answer now)."""
    try:
        name = ptr(ip)
    except SoftError:
        return None
    return None if not name else name.encode("utf-8", "surrogateescape")


def addresses(name: str) -> set[str]:
    """Return the addresses of name (empty if none or on failure)."""
    try:
        infos = socket.getaddrinfo(name, None, 0, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return set()
    return {ip_text(str(info[4][0])) for info in infos}


def paranoid_ok(ip: str, name: str) -> bool:
    """Return True if name's addresses include ip (tcpserver -p)."""
    return ip_text(ip) in addresses(name)
