"""qmail-qmqpd: receive mail via QMQP (qmail-qmqpd(8)).

One netstring holds the message, the sender and the recipients, each a
netstring; the one reply is a netstring starting with K, Z or D. qmail-qmqpd
relays to any address: run it only for authorized clients (it reads none of
pyqmail.smtpd.receive's rcpthosts, RELAYCLIENT, databytes, as qmail's). No read may go
past the outer netstring. Exits: 0 after replying or when the client leaves,
100 on a protocol violation, 111 on lack of resources or after an hour.
"""

from __future__ import annotations

import os
import time

from pyqmail.entry import program
from pyqmail.qmtp.netio import EXIT_GONE, EXIT_PROTOCOL, EXIT_RESOURCES, LEN_MAX, Conn, Exit, netstring

ADDR_MAX = 1000
SESSION_SECONDS = 3600
LENGTH_PREFIX_MAX = 100  # bytes the outer length may take
BAD_ADDRESS = b"Dsorry, I can't accept addresses like that (#5.1.3)"


class Bounded:
    """The client's bytes, never more than `left` of them."""

    __slots__ = ("conn", "left")

    def __init__(self, conn: Conn, left: int) -> None:
        self.conn = conn
        self.left = left

    def byte(self) -> int:
        if not self.left:
            raise Exit(EXIT_PROTOCOL)
        self.left -= 1
        return self.conn.byte()

    def chunk(self, most: int) -> bytes:
        if not self.left:
            raise Exit(EXIT_PROTOCOL)
        data = self.conn.chunk(min(most, self.left, 65536))
        self.left -= len(data)
        return data

    def getlen(self) -> int:
        """Read a netstring length up to its ':'; Exit(100) at a byte that is not a digit (notqmail 1.09)."""
        n = 0
        while True:
            ch = self.byte()
            if ch == 58:
                return n
            if n > LEN_MAX:
                raise Exit(EXIT_RESOURCES)
            if not 48 <= ch <= 57:
                raise Exit(EXIT_PROTOCOL)
            n = 10 * n + ch - 48

    def getcomma(self) -> None:
        if self.byte() != 44:
            raise Exit(EXIT_PROTOCOL)

    def getbuf(self) -> bytes | None:
        """Read a netstring address; None if it is 1000 bytes or longer or contains NUL."""
        n = self.getlen()
        too_long = n >= ADDR_MAX
        parts = []
        while n > 0:
            piece = self.chunk(n)
            if not too_long:
                parts.append(piece)
            n -= len(piece)
        self.getcomma()
        addr = b"".join(parts)
        if too_long or b"\0" in addr:
            return None
        return addr


def serve(conn: Conn) -> None:
    """Receive one message, queue it and reply."""
    from pyqmail import home as _home
    from pyqmail.queue.qq import QQ
    from pyqmail.smtpd.received import Peer

    src = Bounded(conn, LENGTH_PREFIX_MAX)
    src.left = src.getlen()
    length = src.getlen()
    try:
        os.chdir(_home.home())
        q = QQ(network=True)
    except OSError:
        raise Exit(EXIT_RESOURCES) from None
    qp = max(q.pid, 0)
    q.write(Peer.from_env().received(b"QMQP", None, int(time.time())))
    while length > 0:
        piece = src.chunk(length)
        length -= len(piece)
        q.write(piece)
    src.getcomma()

    # Recipients go to qmail-queue as they are read: nothing grows with their number.
    ok = True
    sender = src.getbuf()
    if sender is None:
        q.begin(b"")
        q.fail()
        ok = False
    else:
        q.begin(sender)
    while src.left:
        addr = src.getbuf()
        if addr is None:
            q.fail()
            ok = False
        else:
            q.to(addr)
    src.left = 1
    src.getcomma()

    result = q.close()
    if not result:
        result = b"Kok %d qp %d" % (int(time.time()), qp)
    if not ok:
        result = BAD_ADDRESS
    conn.put(netstring(result))
    conn.flush()


@program("qmail-qmqpd", crash=EXIT_RESOURCES)
def main(argv: list[str]) -> int:
    """Receive one QMQP message on descriptors 0 and 1."""
    conn = Conn(0, 1, SESSION_SECONDS)
    try:
        serve(conn)
    except Exit as e:
        return e.code
    return EXIT_GONE
