"""tcprules(1) rules: the text syntax, the cdb records it compiles to, and their lookup.

Pure but for `open_cdb`. A rule line is
``address:allow`` or ``address:deny``, optionally followed by
``,VAR=xvaluex`` instructions whose quote x is any repeated character. It
compiles to one cdb record per address (``1.2.3.4-7`` and ``10.2-3.`` are
ranges), keyed by the address, whose data is a list of NUL-terminated
entries: ``D`` for deny, ``+VAR=value`` per variable. tcpserver(1) looks up
the keys of `candidates` in order and follows the first record found.

IPv6 (ucspi-tcp-ipv6's forms, see DESIGN): an address may hold colons
(``::1:allow``, ``2001:db8:1::allow`` for the prefix ``2001:db8:1:``), and
a CIDR prefix ``2001:db8::/32`` is pyqmail's extension, stored as its
canonical network text so that `candidates` can look it up.
"""

from __future__ import annotations

import errno
import ipaddress
import mmap
import os
import socket
import stat

from pyqmail import cdb

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

_ULONG = 1 << 64  # C's unsigned long on the platforms qmail runs on: scan_ulong wraps
_RANGE_TOP = 255


class RuleError(Exception):
    """A rules line tcprules cannot parse; `shown` is the line as its complaint prints it."""

    def __init__(self, shown: bytes) -> None:
        super().__init__(shown)
        self.shown = shown


def scan_ulong(digits: bytes) -> tuple[int, int]:
    """Return (value, count) of the leading decimal digits, wrapping as C's unsigned long does."""
    value = 0
    n = 0
    for c in digits:
        if not 0x30 <= c <= 0x39:
            break
        value = (value * 10 + c - 0x30) % _ULONG
        n += 1
    return value, n


def _number(text: bytes, shown: bytes) -> int:
    value, n = scan_ulong(text)
    if n != len(text):
        raise RuleError(shown)
    return value


def trim(line: bytes) -> bytes:
    """Remove the trailing newlines, spaces and tabs tcprules ignores."""
    return line.rstrip(b"\n \t")


def compile_line(line: bytes) -> list[tuple[bytes, bytes]]:
    """Return the (key, data) records of one input line ([] if it holds no rule); raise RuleError."""
    if line[:1] in (b"#", b"\n"):
        return []
    text = trim(line)
    # The complaint prints the trimmed line as a C string: up to its first NUL.
    shown = text.split(b"\0", 1)[0]
    colon = _split_colon(text)
    if colon < 0:
        return []
    address = text[:colon]
    rest = text[colon + 1:]
    if rest.startswith(b"deny"):
        data = [b"D\0"]
        rest = rest[4:]
    elif rest.startswith(b"allow"):
        data = []
        rest = rest[5:]
    else:
        raise RuleError(shown)
    while rest:
        if rest[:1] != b",":
            raise RuleError(shown)
        eq = rest.find(b"=")
        if eq < 0:
            raise RuleError(shown)
        name = rest[1:eq + 1]  # with its '='
        rest = rest[eq + 1:]
        if not rest:
            raise RuleError(shown)
        quote = rest[:1]
        end = rest.find(quote, 1)
        if end < 0:
            raise RuleError(shown)
        data.append(b"+" + name + rest[1:end] + b"\0")
        rest = rest[end + 1:]
    value = b"".join(data)
    return [(key, value) for key in expand(address, shown)]


def _split_colon(text: bytes) -> int:
    """Return the index of the colon ending a line's address (-1 if none).

    0.88's: the first colon. When what follows it is not allow or deny (an
    IPv6 address such as ``::1:allow``), ucspi-tcp-ipv6's: the last colon
    before the first comma, if allow or deny follows that one.
    """
    first = text.find(b":")
    if first < 0 or text.startswith((b"allow", b"deny"), first + 1):
        return first
    comma = text.find(b",")
    last = text.rfind(b":", 0, comma if comma >= 0 else len(text))
    if last > first and text.startswith((b"allow", b"deny"), last + 1) and _ipv6_like(text[:last]):
        return last
    return first


def _ipv6_like(address: bytes) -> bool:
    """Return True if address (after an optional ``info@``) looks like an IPv6 address or prefix.

    Hex digits, colons, dots and a ``/bits``, with ``::`` or two colons at least, and an
    optional ``%interface``: so 0.88's refusals (``a:b:allow``) stay refusals.
    """
    ip = address[address.rfind(b"@") + 1:].split(b"%", 1)[0]
    return (b"::" in ip or ip.count(b":") >= 2) and not ip.strip(b"0123456789abcdefABCDEF:./")


def cidr_key(address: bytes) -> bytes | None:
    """Return the canonical key of an IPv6 CIDR prefix ``2001:db8::/32``, or None if address is not one."""
    if b"/" not in address or b":" not in address or b"@" in address or b"=" in address:
        return None
    ip, _, bits = address.partition(b"/")
    if not bits.isdigit() or len(bits) > 3:
        return None
    try:
        net = ipaddress.IPv6Network((ip.decode("ascii"), int(bits)), strict=False)
    except (ValueError, UnicodeDecodeError):
        return None
    return socket.inet_ntop(socket.AF_INET6, net.network_address.packed).encode() + b"/%d" % net.prefixlen


def cidr_candidates(ip: bytes) -> Iterator[bytes]:
    """Yield the CIDR keys of an IPv6 address, /128 first, /0 last (nothing for IPv4 or garbage)."""
    if b":" not in ip:
        return
    try:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, ip.split(b"%", 1)[0].decode("ascii")), "big")
    except (OSError, ValueError, UnicodeDecodeError):
        return
    full = (1 << 128) - 1
    for bits in range(128, -1, -1):
        net = value & (full ^ ((1 << (128 - bits)) - 1))
        # inet_ntop's text, as cidr_key stores it.
        yield socket.inet_ntop(socket.AF_INET6, net.to_bytes(16, "big")).encode() + b"/%d" % bits


def expand(address: bytes, shown: bytes = b"") -> list[bytes]:
    """Return the keys an address stands for: itself, each member of its range, or a CIDR prefix's canonical key."""
    key = cidr_key(address)
    if key is not None:
        return [key]
    if b"=" in address or b"@" in address:
        return [address]
    dash = address.find(b"-")
    if dash < 0:
        return [address]
    left = address.rfind(b".", 0, dash) + 1
    right = address.find(b".", dash + 1)
    if right < 0:
        right = len(address)
    bottom = _number(address[left:dash], shown)
    top = min(_number(address[dash + 1:right], shown), _RANGE_TOP)
    head, tail = address[:left], address[right:]
    return [head + str(n).encode() + tail for n in range(bottom, top + 1)]


def candidates(ip: bytes, host: bytes | None, info: bytes | None, cidr: bool = False) -> Iterator[bytes]:
    """Yield the keys tcpserver tries for a connection, in its order (tcprules(1) ADDRESSES).

    With cidr, an IPv6 address's CIDR keys (pyqmail's extension) follow its prefixes.
    """
    if info is not None:
        yield info + b"@" + ip
        if host is not None:
            yield info + b"@=" + host
    yield ip
    if host is not None:
        yield b"=" + host
    # Shorter and shorter prefixes ending with a dot (or, in an IPv6
    # address, a colon: our reading for the addresses 0.88 never saw).
    seps = (b".", b":") if b":" in ip else (b".",)
    for n in range(len(ip), 0, -1):
        if ip[n - 1:n] in seps:
            yield ip[:n]
    if cidr:
        yield from cidr_candidates(ip)
    if host is not None:
        for n in range(len(host)):
            if host[n:n + 1] == b".":
                yield b"=" + host[n:]
        yield b"="
    yield b""


def find(reader: cdb.Reader, ip: bytes, host: bytes | None,
         info: bytes | None) -> tuple[bytes, bytes] | None:
    """Return (key, data) of the first rule for the connection, or None; raise CDBError."""
    for key in candidates(ip, host, info, cidr=True):
        data = reader.get(key)
        if data is not None:
            return key, data
    return None


def entries(data: bytes) -> list[bytes]:
    """Return the NUL-terminated entries of a rule's data (an unterminated tail is ignored)."""
    parts = data.split(b"\0")
    return parts[:-1]


def decide(data: bytes) -> tuple[bool, list[tuple[bytes, bytes]]]:
    """Return (deny, [(name, value), ...]) as tcpserver follows a rule's data."""
    deny = False
    env = []
    for entry in entries(data):
        if entry[:1] == b"D":
            deny = True
        elif entry[:1] == b"+":
            name, eq, value = entry[1:].partition(b"=")
            if eq:
                env.append((name, value))
    return deny, env


def open_cdb(path: bytes | str) -> cdb.Reader:
    """Open a rules cdb as tcpserver does; raise OSError if it cannot be opened.

    A file shorter than the cdb header is read as far as it goes: as with C
    cdb, only a lookup that reads past its end fails (CDBError).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if st.st_size == 0:
            # ucspi-tcp's cdb_free then unmaps the failed empty mapping, and
            # its EINVAL is the error reported for the failed lookup.
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        if st.st_size < cdb.HEADER_SIZE:
            return cdb.Reader(os.read(fd, cdb.HEADER_SIZE), allow_short=True)
        return cdb.Reader(mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ))
    finally:
        os.close(fd)
