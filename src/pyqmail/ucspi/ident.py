"""An RFC 1413 (ident) client: the TCPREMOTEINFO of tcpserver -r and tcp-env.

The request ``REMOTEPORT , LOCALPORT\\r\\n`` goes to port 113 of the remote
host from the connection's local address. The answer is read up to its first
newline with spaces, tabs and carriage returns removed; what follows its third
colon is the information (``1234,25:USERID:UNIX:joe`` gives ``joe``).
"""

from __future__ import annotations

import errno
import select
import socket
import time

IDENT_PORT = 113
UCSPI_LIMIT = 257  # ucspi-tcp stops after 256 characters plus one
QMAIL_LIMIT = 998  # qmail's tcp-env keeps a 999-byte line with its NUL
_SKIP = frozenset(b" \t\r")
_COLON = 0x3A
_NEWLINE = 0x0A


def _wait(sock: socket.socket, events: int, seconds: float) -> bool:
    """Wait up to seconds for events on sock; return False on timeout.

    Through pyqmail.wait: in a tcpserver worker serving several sessions, the others run
    while a client's ident server is slow to answer (up to -t seconds, 26 by default).
    """
    from pyqmail import wait

    return wait.ready(sock.fileno(), events, min(max(0, int(seconds * 1000) + (1 if seconds > 0 else 0)),
                                                 wait.POLL_MAX_MS))


class Answer:
    """The information of an ident answer, fed as it arrives; bounded by limit."""

    __slots__ = ("limit", "colons", "info", "done")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.colons = 0
        self.info = bytearray()
        self.done = False

    def feed(self, data: bytes) -> bool:
        """Take more of the answer; return True once the information is complete."""
        for c in data:
            if c in _SKIP:
                continue
            if c == _NEWLINE:
                self.done = True
                break
            if self.colons < 3:
                if c == _COLON:
                    self.colons += 1
            else:
                self.info.append(c)
                if len(self.info) >= self.limit:
                    self.done = True
                    break
        return self.done


def parse(answer: bytes, limit: int = UCSPI_LIMIT) -> bytes | None:
    """Return the information of a whole ident answer; None if it has no newline."""
    a = Answer(limit)
    return bytes(a.info) if a.feed(answer) else None


def remoteinfo(remote: tuple[str, int], local: tuple[str, int], timeout: float,
               limit: int = UCSPI_LIMIT, overall: bool = True,
               port: int = IDENT_PORT) -> bytes | None:
    """Ask remote's ident server about the connection remote -> local; None if it did not say.

    With overall (ucspi-tcp), timeout bounds the whole exchange; otherwise
    (qmail's tcp-env) it bounds the connection and each read and write.
    """
    family = socket.AF_INET6 if ":" in remote[0] else socket.AF_INET
    start = time.monotonic()

    def left() -> float:
        return timeout - (time.monotonic() - start) if overall else timeout

    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        return None
    with sock:
        try:
            sock.bind((local[0], 0))
            sock.setblocking(False)
            err = sock.connect_ex((remote[0], port))
            if err not in (0, errno.EINPROGRESS):
                return None
            if err and not _wait(sock, select.POLLOUT, timeout):
                return None
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                return None
            request = b"%d , %d\r\n" % (remote[1], local[1])
            while request:
                if not _wait(sock, select.POLLOUT, left()):
                    return None
                request = request[sock.send(request):]
            answer = Answer(limit)
            while True:
                if not _wait(sock, select.POLLIN, left()):
                    return None
                chunk = sock.recv(128)
                if not chunk:
                    return None
                if answer.feed(chunk):
                    return bytes(answer.info)
        except (OSError, ValueError):
            return None
