"""qmail-qmqpc: queue a mail message via QMQP (qmail-qmqpc(8)); the book's mini-qmail.

The interface is qmail-queue's: the message on descriptor 0, the envelope on
descriptor 1, qmail-queue(8)'s exit codes. The message goes to the first QMQP
server in control/qmqpservers that takes a connection (port 628, 10 seconds
to connect, 60 for each read or write); its K, Z or D reply becomes exit 0,
71 or 31. Lines that are not dotted-decimal IP addresses are skipped.

Beyond qmail: a line "d.d.d.d:port" connects to that port instead of 628
(C qmail ignores everything after the address, so such a line means port
628 there). It lets tests and unprivileged installations run a QMQP server
on another port.
"""

from __future__ import annotations

import os

from pyqmail.entry import program
from pyqmail.queue.envelope import Exit, Reader, Spool

TYPE_CHECKING = False  # typing costs milliseconds per message; mypy sees the imports
if TYPE_CHECKING:
    import socket

PORT_QMQP = 628
CONNECT_SECONDS = 10
IO_SECONDS = 60
SPOOL_MAX = 1 << 20  # message (and envelope) bytes kept in memory; the rest goes to a temporary file
# C's qmail-qmqpc passes an address of any length on and lets the server judge
# it (qmail-qmqpd refuses 1000 bytes or more with a D reply, exit 31); ours
# does the same up to this bound, which keeps its memory bounded (exit 11 past it).
QMQP_ADDR_MAX = 65536

EXIT_OK = 0
EXIT_PERM = 31
EXIT_NOMEM = 51
EXIT_READ = 54
EXIT_CONTROL = 55
EXIT_SOCKET = 56
EXIT_HOME = 61
EXIT_TEMP = 71
EXIT_CONN_TIMEOUT = 72
EXIT_CONN_REJECTED = 73
EXIT_CONN = 74
EXIT_FORMAT = 91
EXIT_BUG = 81


def server_address(line: str) -> tuple[str, int] | None:
    """Return (ip, port) for a qmqpservers line, or None if it does not start with an IP address."""
    from pyqmail.smtpd.session import ip_scan

    raw = line.encode("latin-1")
    got = ip_scan(raw)
    if got is None:
        return None
    ip, n = got
    port = PORT_QMQP
    rest = raw[n:]
    if rest[:1] == b":" and rest[1:].isdigit() and len(rest) <= 6 and 0 < int(rest[1:]) < 65536:
        port = int(rest[1:])
    return "%d.%d.%d.%d" % ip, port


def netstr(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


def spool_envelope(fd: int) -> Spool:
    """Read the envelope on fd into a Spool of QMQP netstrings, the sender's first."""
    out = Spool(SPOOL_MAX)
    try:
        for _, addr in Reader(fd, early=EXIT_FORMAT, addr_max=QMQP_ADDR_MAX).fields():
            out.write(netstr(addr[:-1]))
    except BaseException:
        out.close()
        raise
    return out


def read_envelope(fd: int) -> bytes:
    """Read the envelope on fd; return the sender and recipients as QMQP netstrings."""
    out = spool_envelope(fd)
    try:
        return b"".join(out.chunks())
    finally:
        out.close()


def deliver(ip: str, port: int, spool: Spool, after: Spool) -> int:
    """Give the message to one server; return the exit code (72 or 73: try the next server)."""
    import socket

    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        raise Exit(EXIT_SOCKET) from None
    with sock:
        sock.settimeout(CONNECT_SECONDS)
        try:
            sock.connect((ip, port))
        except TimeoutError:
            return EXIT_CONN_TIMEOUT
        except OSError:
            return EXIT_CONN_REJECTED
        sock.settimeout(IO_SECONDS)
        before = b"%d:" % spool.size
        try:
            total = len(before) + spool.size + 1 + after.size
            sock.sendall(b"%d:" % total + before)
            for chunk in spool.chunks():
                sock.sendall(chunk)
            sock.sendall(b",")
            for chunk in after.chunks():
                sock.sendall(chunk)
            sock.sendall(b",")
            while True:
                data = sock.recv(1024)
                if not data:
                    raise Exit(EXIT_CONN)
                for c in data:
                    if c == 75:  # K
                        return EXIT_OK
                    if c == 90:  # Z
                        return EXIT_TEMP
                    if c == 68:  # D
                        return EXIT_PERM
        except OSError:
            raise Exit(EXIT_CONN) from None


@program("qmail-qmqpc", crash=EXIT_BUG)
def main(argv: list[str]) -> int:
    """Queue the message on fd 0 with the envelope on fd 1 through a QMQP server."""
    from pyqmail import control
    from pyqmail import home as _home
    from pyqmail.control import ControlError

    try:
        try:
            os.chdir(_home.home())
        except OSError:
            raise Exit(EXIT_HOME) from None
        try:
            control.me()
            servers = control.read_lines("qmqpservers")
        except ControlError:
            raise Exit(EXIT_CONTROL) from None
        if servers is None:
            raise Exit(EXIT_CONTROL)
        spool = Spool(SPOOL_MAX)
        spool.slurp(0)
        after = spool_envelope(1)
        last = EXIT_CONTROL
        for line in servers:
            where = server_address(line)
            if where is None:
                continue
            code = deliver(where[0], where[1], spool, after)
            if code not in (EXIT_CONN_TIMEOUT, EXIT_CONN_REJECTED):
                return code
            last = code
        return last
    except Exit as e:
        return e.code
