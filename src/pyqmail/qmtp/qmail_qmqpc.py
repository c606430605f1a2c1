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

TYPE_CHECKING = False  # typing costs milliseconds per message; mypy sees the imports
if TYPE_CHECKING:
    import socket
    from typing import IO

PORT_QMQP = 628
CONNECT_SECONDS = 10
IO_SECONDS = 60
SPOOL_MAX = 1 << 20  # message bytes kept in memory; the rest goes to a temporary file

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


class Exit(Exception):
    """End with this qmail-queue exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


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


class Spool:
    """The message from descriptor 0: in memory, or in a temporary file past SPOOL_MAX."""

    __slots__ = ("head", "file", "size")

    def __init__(self) -> None:
        self.head = bytearray()
        self.file: IO[bytes] | None = None
        self.size = 0

    def slurp(self, fd: int) -> None:
        """Read fd to its end; raise Exit(54) (51 for lack of memory) on failure."""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except MemoryError:
                raise Exit(EXIT_NOMEM) from None
            except OSError:
                raise Exit(EXIT_READ) from None
            if not chunk:
                return
            self.size += len(chunk)
            if self.file is None and len(self.head) + len(chunk) <= SPOOL_MAX:
                self.head += chunk
                continue
            try:
                if self.file is None:
                    import tempfile

                    self.file = tempfile.TemporaryFile()
                self.file.write(chunk)
            except OSError:
                raise Exit(EXIT_READ) from None

    def send(self, sock: socket.socket) -> None:
        """Send the message on sock."""
        sock.sendall(self.head)
        if self.file is not None:
            self.file.flush()
            self.file.seek(0)
            while True:
                data = self.file.read(65536)
                if not data:
                    break
                sock.sendall(data)


def netstr(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


def read_envelope(fd: int) -> bytes:
    """Read the envelope on fd; return the sender and recipients as QMQP netstrings."""
    out = bytearray()
    buf = b""
    first = True
    while True:
        nul = buf.find(b"\0")
        if nul == -1:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                raise Exit(EXIT_READ) from None
            if not chunk:
                raise Exit(EXIT_FORMAT)  # the envelope ended without its final NUL
            buf += chunk
            continue
        line = buf[:nul]
        buf = buf[nul + 1:]
        if first:
            if not line or line[:1] != b"F":
                raise Exit(EXIT_FORMAT)
            first = False
        else:
            if not line:
                return bytes(out)
            if line[:1] != b"T":
                raise Exit(EXIT_FORMAT)
        out += netstr(line[1:])


def deliver(ip: str, port: int, spool: Spool, after: bytes) -> int:
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
            total = len(before) + spool.size + len(after)
            sock.sendall(b"%d:" % total + before)
            spool.send(sock)
            sock.sendall(after + b",")
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
        spool = Spool()
        spool.slurp(0)
        after = b"," + read_envelope(1)
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
