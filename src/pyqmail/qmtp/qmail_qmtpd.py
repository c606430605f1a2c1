"""qmail-qmtpd: receive mail via QMTP (qmail-qmtpd(8)).

Each message is a netstring of (a mode byte, LF or CR, then the message),
a netstring sender and a netstring of netstring recipients. The reply is one
netstring per recipient: K (queued, with the time and qmail-queue's pid), Z
or D with qmail's text. rcpthosts, morercpthosts, RELAYCLIENT, databytes and
DATABYTES work as for qmail-smtpd (one reader for both: pyqmail.smtpd.receive). Exits: 0 when the client is done, 100 on
a protocol violation, 111 on lack of resources or after an hour.
"""

from __future__ import annotations

import os
import time

from pyqmail.entry import program
from pyqmail.qmtp.netio import (EXIT_PROTOCOL, EXIT_RESOURCES, LEN_MAX, Conn, Exit, digit_step,
                                netstring)

TYPE_CHECKING = False  # typing costs milliseconds per connection; mypy sees the imports
if TYPE_CHECKING:
    from pyqmail.queue.qq import QQ

ADDR_MAX = 1000  # an address this long or longer is refused
SESSION_SECONDS = 3600
REFUSED_DOMAIN = b"66:Dsorry, that domain isn't in my list of allowed rcpthosts (#5.7.1),"
REFUSED_RECIPIENT = b"46:Dsorry, I can't handle that recipient (#5.1.3),"
BAD_SENDER = b"Dunacceptable sender (#5.1.7)"
TOO_BIG = b"Dsorry, that message size exceeds my databytes limit (#5.3.4)"
# Past RCPT_MAX recipients in one message each further one is deferred (as
# RFC 5321 4.5.3.1.10's 452): the client sends it again in another message.
RCPT_MAX = 1000000
TOO_MANY = b"36:Zsorry, too many recipients (#4.5.3),"

# What became of one recipient.
ACCEPTED = 0
DOMAIN = 1  # not in rcpthosts
UNUSABLE = 2  # too long, or contains NUL


def getlen(conn: Conn) -> int:
    """Read a netstring length up to its ':'; Exit(100) at a byte that is not a digit (notqmail 1.09).

    The lengths inside the recipient list are read by one_message without
    that check, as notqmail reads them.
    """
    n = 0
    while True:
        ch = conn.byte()
        if ch == 58:
            return n
        if n > LEN_MAX:
            raise Exit(EXIT_RESOURCES)
        if not 48 <= ch <= 57:
            raise Exit(EXIT_PROTOCOL)
        n = 10 * n + ch - 48


def getcomma(conn: Conn) -> None:
    """Read the ',' ending a netstring; Exit(100) if it is anything else."""
    if conn.byte() != 44:
        raise Exit(EXIT_PROTOCOL)


def skip(conn: Conn, n: int) -> None:
    """Read and drop n bytes."""
    while n > 0:
        n -= len(conn.chunk(min(n, 65536)))


def read_exact(conn: Conn, n: int) -> bytes:
    """Read n bytes (n small: an address)."""
    parts = []
    while n > 0:
        piece = conn.chunk(n)
        parts.append(piece)
        n -= len(piece)
    return b"".join(parts)


class Settings:
    """Controls and environment read at start."""

    __slots__ = ("rcpthosts", "relayclient", "databytes", "peer")

    def __init__(self) -> None:
        from pyqmail import control
        from pyqmail.control import ControlError
        from pyqmail.smtpd.receive import Receive
        from pyqmail.smtpd.received import Peer

        env = os.environb
        try:
            control.me()
            recv = Receive.load(env, badmailfrom=False)  # qmail-qmtpd reads no badmailfrom
        except (ControlError, OSError):
            raise Exit(EXIT_RESOURCES) from None
        self.rcpthosts = recv.rcpthosts
        self.relayclient = recv.relayclient
        self.databytes = recv.databytes
        self.peer = Peer.from_env(env)


def _body(conn: Conn, q: QQ, length: int, dos: bool, limit: int) -> bool:
    """Copy the message body to qmail-queue; return False if it passed databytes."""
    size = 0
    ok = True
    held = b""  # a CR that may start CR LF
    if not dos and limit and length > limit:
        ok = False
        q.fail()
    while length > 0:
        piece = conn.chunk(min(length, 65536))
        length -= len(piece)
        if dos:
            piece = held + piece
            held = b""
            if piece.endswith(b"\r") and length > 0:
                held = b"\r"
                piece = piece[:-1]
            piece = piece.replace(b"\r\n", b"\n")
            size += len(piece)
            if ok and limit and size > limit:
                ok = False
                q.fail()
        if ok:
            q.write(piece)
    return ok


def one_message(conn: Conn, cfg: Settings) -> None:
    """Receive one message and queue the reply for its recipients."""
    from pyqmail.control import ControlError
    from pyqmail.queue.qq import QQ

    length = getlen(conn)
    if length == 0:
        raise Exit(EXIT_PROTOCOL)
    try:
        q = QQ(network=True)
    except OSError:
        raise Exit(EXIT_RESOURCES) from None
    qp = max(q.pid, 0)
    mode = conn.byte()
    length -= 1
    if mode not in (10, 13):
        raise Exit(EXIT_PROTOCOL)
    q.write(cfg.peer.received(b"QMTP", None, int(time.time())))
    size_ok = _body(conn, q, length, mode == 13, cfg.databytes)
    getcomma(conn)

    n = getlen(conn)
    sender_ok = True
    if n >= ADDR_MAX:
        sender_ok = False
        sender = b""
        skip(conn, n)
    else:
        sender = read_exact(conn, n)
        if b"\0" in sender:
            sender_ok = False
    getcomma(conn)
    q.begin(sender)
    if not sender_ok:
        q.fail()

    # One byte per recipient (its outcome, as C's failure string), and only
    # for the first RCPT_MAX: every later one gets the same reply, so a
    # count is enough. Accepted recipients go to qmail-queue as they come.
    outcome = bytearray()
    over = 0
    bother = False
    relay = cfg.relayclient
    biglen = getlen(conn)
    while biglen > 0:
        # Fast path: up to 9 digits and their ':' already read, inside the
        # list. The byte loop below gives the same result for them.
        buf, pos = conn.buf, conn.pos
        colon = buf.find(b":", pos, pos + 10)
        digits = buf[pos:colon]
        if colon != -1 and colon - pos < biglen and (digits.isdigit() or colon == pos):
            n = int(digits) if digits else 0
            biglen -= colon - pos + 1
            conn.pos = colon + 1
        else:
            n = 0
            while True:
                if not biglen:
                    raise Exit(EXIT_PROTOCOL)
                ch = conn.byte()
                biglen -= 1
                if ch == 58:
                    break
                if n > LEN_MAX:
                    raise Exit(EXIT_RESOURCES)
                n = digit_step(n, ch)
        if n >= biglen:
            raise Exit(EXIT_PROTOCOL)
        if len(outcome) >= RCPT_MAX:
            over += 1
            skip(conn, n)
        elif n + len(relay or b"") >= ADDR_MAX:
            outcome.append(UNUSABLE)
            skip(conn, n)
        else:
            addr = read_exact(conn, n)
            state = UNUSABLE if b"\0" in addr else ACCEPTED
            if relay is not None:
                addr += relay
            else:
                try:
                    if not cfg.rcpthosts.allowed(addr):
                        state = DOMAIN
                except ControlError:
                    raise Exit(EXIT_RESOURCES) from None
            if state == ACCEPTED:
                q.to(addr)
                bother = True
            outcome.append(state)
        getcomma(conn)
        biglen -= n + 1
    getcomma(conn)

    if not bother:
        q.fail()
    result = q.close()
    if not sender_ok:
        result = BAD_SENDER
    if not size_ok:
        result = TOO_BIG
    if not result:
        result = b"Kok %d qp %d" % (int(time.time()), qp)
    accepted = netstring(result)
    texts = (accepted, REFUSED_DOMAIN, REFUSED_RECIPIENT)
    for state in outcome:
        conn.put(texts[state])
    while over:
        k = min(over, 1000)
        conn.put(TOO_MANY * k)
        over -= k
    # The replies go out when the client is read from again.


@program("qmail-qmtpd", crash=EXIT_RESOURCES)
def main(argv: list[str]) -> int:
    """Receive QMTP messages on descriptors 0 and 1 until the client leaves."""
    from pyqmail import home as _home

    conn = Conn(0, 1, SESSION_SECONDS)
    try:
        try:
            os.chdir(_home.home())
        except OSError:
            raise Exit(EXIT_RESOURCES) from None
        cfg = Settings()
        while True:
            one_message(conn, cfg)
    except Exit as e:
        return e.code
