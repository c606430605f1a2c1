"""qmail-remote: send mail via SMTP (qmail-remote(8)).

    qmail-remote host sender recip [recip ...]

The message is on descriptor 0. The results go to descriptor 1: a report
per recipient (r, h or s), then a message report (K, Z or D), each a letter,
a text and a NUL. The exit code is always 0; a crash is a Z report.

Routes come from control/smtproutes, else DNS (pyqmail.remote.mx: the
resolver honours $DNSCACHEIP). Hosts that keep timing out are skipped for
a while through queue/lock/tcpto. Extension: control/outgoingip, if set,
is the local address connections are made from.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time

from pyqmail import control
from pyqmail import home as _home
from pyqmail.entry import program
from pyqmail.remote import mx, smtproutes, tcpto
from pyqmail.remote import smtpclient as sc
from pyqmail.smtpd.ipme import IpmeError

FD_MESSAGE = 0
FD_REPORT = 1
DEFAULT_TIMEOUT_CONNECT = 60
DEFAULT_TIMEOUT_REMOTE = 1200
PREF_NONE = 100000
PREF_RELAY = 300000
PREF_ALIASES = 500000
TCPTO_PATH = "queue/lock/tcpto"
CHUNK = 65536


class _Dropped(Exception):
    """The SMTP connection failed or timed out."""


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        pass  # qmail: if the report cannot be written, just exit 0


def _on_crash(reason: str) -> None:
    _write_all(FD_REPORT, sc.CRASH + b"\0")


class Smtp:
    """The SMTP connection: qmail's timeouts on every read and write."""

    def __init__(self, sock: socket.socket, timeout: int) -> None:
        self.sock = sock
        self.timeout = timeout
        self.pending = b""
        self.text = b""
        self.critical = False  # the final dot is sent: a dropped connection may duplicate

    def _wait(self, write: bool) -> None:
        if not _ready(self.sock, write, self.timeout):
            raise _Dropped()

    def send(self, data: bytes) -> None:
        """Send all of data, or raise _Dropped."""
        view = memoryview(data)
        while view:
            self._wait(True)
            try:
                n = self.sock.send(view[:CHUNK])
            except BlockingIOError:
                continue
            except OSError as e:
                raise _Dropped() from e
            view = view[n:]

    def reply(self) -> int:
        """Read one reply; return its code and keep its text, or raise _Dropped."""
        rep = sc.Reply()
        while True:
            if self.pending:
                used = rep.feed(self.pending)
                self.pending = self.pending[used:]
                if rep.done:
                    self.text = bytes(rep.text)
                    return rep.code
            self._wait(False)
            try:
                data = self.sock.recv(CHUNK)
            except BlockingIOError:
                continue
            except OSError as e:
                raise _Dropped() from e
            if not data:
                raise _Dropped()
            self.pending = data

    def command(self, line: bytes) -> int:
        """Send a command line and return the reply's code."""
        self.send(line + b"\r\n")
        return self.reply()


def _ready(sock: socket.socket, write: bool, timeout: int) -> bool:
    """Wait up to timeout seconds for sock to be writable (or readable); return whether it is."""
    p = select.poll()
    p.register(sock.fileno(), select.POLLOUT if write else select.POLLIN)
    return bool(p.poll(max(timeout, 0) * 1000))


def _quit(conn: Smtp, partner: bytes, what: tuple[bytes, bytes]) -> bytes:
    conn.send(b"QUIT\r\n")  # waiting for the answer is "just too ridiculous" (qmail)
    return sc.final(what, partner, conn.text)


def _blast(conn: Smtp, msgfd: int) -> bytes | None:
    """Send the message and the final dot; return a report if the message cannot be sent."""
    stuffer = sc.Stuffer()
    buf = bytearray()
    while True:
        try:
            chunk = os.read(msgfd, CHUNK)
        except OSError:
            return sc.READ
        if not chunk:
            break
        buf += stuffer.feed(chunk)
        if len(buf) >= CHUNK:
            conn.send(bytes(buf))
            buf.clear()
    buf += stuffer.end()
    if not stuffer.complete():
        return sc.PARTIAL_LINE
    buf += b".\r\n"
    conn.critical = True
    conn.send(bytes(buf))
    return None


def smtp(conn: Smtp, partner: bytes, helohost: bytes, sender: bytes, recips: list[bytes], msgfd: int) -> bytes:
    """Run the SMTP conversation; return every report, NUL-terminated."""
    out = bytearray()

    def last(report: bytes) -> bytes:
        return bytes(out) + report + b"\0"

    try:
        if conn.reply() != 220:
            return last(_quit(conn, partner, sc.GREETING_FAILED))
        if conn.command(b"HELO " + helohost) != 250:
            return last(_quit(conn, partner, sc.HELO_REJECTED))
        code = conn.command(b"MAIL FROM:<" + sender + b">")
        if code >= 500:
            return last(_quit(conn, partner, sc.SENDER_REJECTED_PERM))
        if code >= 400:
            return last(_quit(conn, partner, sc.SENDER_REJECTED_TEMP))
        bother = False
        for recip in recips:
            code = conn.command(b"RCPT TO:<" + recip + b">")
            out += sc.recipient(code, partner, conn.text) + b"\0"
            if code < 400:
                bother = True
            conn.text = b""
        if not bother:
            return last(_quit(conn, partner, sc.GIVING_UP))
        code = conn.command(b"DATA")
        if code >= 500:
            return last(_quit(conn, partner, sc.DATA_FAILED_PERM))
        if code >= 400:
            return last(_quit(conn, partner, sc.DATA_FAILED_TEMP))
        failed = _blast(conn, msgfd)
        if failed is not None:
            return last(failed)
        code = conn.reply()
        conn.critical = False
        if code >= 500:
            return last(_quit(conn, partner, sc.AFTER_DATA_PERM))
        if code >= 400:
            return last(_quit(conn, partner, sc.AFTER_DATA_TEMP))
        return last(_quit(conn, partner, sc.ACCEPTED))
    except _Dropped:
        return last(sc.dropped(partner, conn.critical))


def connect(ip: str, port: int, timeout: int, source: str | None) -> tuple[socket.socket | None, bool]:
    """Connect within timeout seconds; return (socket or None, whether it timed out)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if source is not None and (":" in source) == (family == socket.AF_INET6):
            sock.bind((source, 0))
        sock.setblocking(False)
        err = sock.connect_ex((ip, port))
        if err == 0:
            return sock, False
        if err != errno.EINPROGRESS:
            sock.close()
            return None, False
        if not _ready(sock, True, timeout):
            sock.close()
            return None, True
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            sock.close()
            return None, err == errno.ETIMEDOUT
        return sock, False
    except OSError:
        sock.close()
        raise


def _mangle(addr: bytes, dns: mx.Lookup | None) -> tuple[bytes, bool, bytes | None]:
    """Return (address for SMTP, is an alias, failure report) as qmail's addrmangle."""
    at = addr.rfind(b"@")
    if at < 0:
        return addr, dns is not None, None
    host = addr[at + 1:]
    alias = False
    if dns is not None:
        name, loops = mx.cname(dns, host.decode("latin-1"))
        if loops == -mx.SOFT:
            return b"", True, sc.DNSCANON
        alias = loops != 0
        host = name.encode("latin-1")
    return sc.quote_box(addr[:at]) + b"@" + host, alias, None


def deliver(argv: list[str], env: dict[str, str], dns: mx.Lookup | None = None) -> bytes:
    """Deliver the message on descriptor 0; return qmail-remote's whole output."""
    if len(argv) < 4:
        return sc.USAGE + b"\0"
    try:
        os.chdir(_home.home())
    except OSError:
        return sc.CHDIR + b"\0"
    try:
        timeout = control.read_int("timeoutremote", DEFAULT_TIMEOUT_REMOTE)
        timeout_connect = control.read_int("timeoutconnect", DEFAULT_TIMEOUT_CONNECT)
        helo = control.read_default("helohost", None)
        route_lines = control.read_lines("smtproutes") or []
        source = control.read_line("outgoingip")
    except control.ControlError:
        return sc.CONTROL + b"\0"
    if helo is None:
        return sc.CONTROL + b"\0"
    args = [os.fsencode(a) for a in argv]
    host = args[1].decode("latin-1")
    route = smtproutes.lookup(smtproutes.parse(route_lines), host)
    port = smtproutes.DEFAULT_PORT
    if route is not None:
        host, port = route.relay, route.port
    resolver: mx.Lookup = dns if dns is not None else mx.Resolver.from_env(env)
    sender, _, _ = _mangle(args[2], None)
    try:
        me = mx.local_addresses()
    except (OSError, IpmeError):
        return sc.OSERR + b"\0"
    all_aliases = True
    recips = []
    for arg in args[3:]:
        addr, alias, failed = _mangle(arg, None if route is not None else resolver)
        if failed is not None:
            return failed + b"\0"
        all_aliases = all_aliases and alias
        recips.append(addr)
    seed = int(time.time()) + (os.getpid() << 16)
    if route is not None:
        status, ips = mx.ip(resolver, host)
    else:
        status, ips = mx.mx_ip(resolver, host, seed)
    if status == mx.SOFT and not ips:
        return sc.DNS_TEMP + b"\0"
    if status == mx.HARD:
        return sc.perm_dns(host.encode("latin-1")) + b"\0"
    if not ips:
        return sc.NOMX + b"\0"
    pref_me = min([a.pref for a in ips if a.ip in me], default=PREF_NONE)
    if route is not None:
        pref_me = PREF_RELAY
    if all_aliases:
        pref_me = PREF_ALIASES
    candidates = [a for a in ips if a.pref < pref_me]
    if not candidates:
        return sc.AMBIGMX + b"\0"
    table = tcpto.Table(TCPTO_PATH)
    for a in candidates:
        ip4 = mx.ipv4_bytes(a.ip)
        if ip4 is not None and table.skip(ip4, int(time.time())):
            continue
        try:
            sock, timed_out = connect(a.ip, port, timeout_connect, source)
        except OSError:
            return sc.OSERR + b"\0"
        if ip4 is not None:
            table.record(ip4, timed_out, int(time.time()))
        if sock is not None:
            with sock:
                return smtp(Smtp(sock, timeout), a.ip.encode("ascii"), helo.encode("latin-1"),
                            sender, recips, FD_MESSAGE)
    return sc.NOCONN + b"\0"


def preload() -> None:
    """Import what every delivery needs lazily, for a parent that forks many (qmail-rspawn)."""
    import array  # noqa: F401 - the modules pyqmail.smtpd.ipme imports when called
    import fcntl  # noqa: F401
    import ipaddress  # noqa: F401
    import struct  # noqa: F401

    import pyqmail.smtpd.ipme  # noqa: F401


@program("qmail-remote", crash=0, on_crash=_on_crash)
def main(argv: list[str]) -> int:
    """Send the message on descriptor 0 and print qmail-remote(8)'s reports; exit 0."""
    _write_all(FD_REPORT, deliver(argv, dict(os.environ)))
    return 0
