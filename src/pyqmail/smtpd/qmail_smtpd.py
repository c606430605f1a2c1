"""qmail-smtpd: receive mail via SMTP (qmail-smtpd(8)).

The client is on descriptors 0 (read) and 1 (write), as tcpserver or a
terminal gives them; tcp-environ(5) variables describe it. This module is the
thin I/O shell around `session.Session` (the command state machine) and
`data.Blast` (the DATA filter): bounded reads with control/timeoutsmtpd
seconds for each, replies buffered and sent before each read, and the message
handed to qmail-queue (or $QMAILQUEUE) through `QQ`. A death (timeout, bare
LF, unreadable controls) sends its reply and exits 1; QUIT exits 0; the
client going away exits 1, as in qmail.
"""

from __future__ import annotations

import os
import posix
import select
import time

from pyqmail import control
from pyqmail import home as _home
from pyqmail.control import ControlError
from pyqmail.entry import program
# Everything a session needs is imported here, not when first used: tcpserver
# imports this module once in its parent, so every connection shares it.
from pyqmail.queue.qq import QQ
from pyqmail.smtpd import replies
from pyqmail.smtpd.data import END, MORE, Blast
from pyqmail.smtpd.ipme import Ipme, IpmeError
from pyqmail.smtpd.rcpthosts import RcptHosts
from pyqmail.smtpd.received import Peer
from pyqmail.smtpd.session import DATA, MAXHOPS, QUIT, Config, Session, data_reply, scan_ulong

FD_IN = 0
FD_OUT = 1
EXIT_QUIT = 0
EXIT_DEATH = 1
READ_SIZE = 65536
WRITE_SIZE = 512  # a reply at a time: a write never blocks for long after poll says it may go
LINE_MAX = 65536  # bytes kept of a command line; the rest, up to its LF, is read and dropped
DEFAULT_TIMEOUT = 1200
POLL_MAX_MS = (1 << 31) - 1  # poll() takes a C int: a longer timeout (24.8 days) is cut to this


# What tcpserver's parent says in its warm-up sessions (see preload): every
# command qmail-smtpd answers before DATA, none that queues anything.
WARM_SCRIPT = (b"EHLO warm.up\r\nHELO warm.up\r\nMAIL FROM:<warm@up>\r\nRCPT TO:<warm@up>\r\n"
               b"NOOP\r\nVRFY warm\r\nHELP\r\nRSET\r\nJUNK\r\nQUIT\r\n")
WARM_SESSIONS = 12  # CPython specialises a function's code after 8 calls


def _ms(seconds: int) -> int:
    return min(seconds * 1000, POLL_MAX_MS)


class Die(Exception):
    """End the session: send reply (if any) and exit 1."""

    def __init__(self, reply: bytes | None) -> None:
        super().__init__(reply)
        self.reply = reply


class Output:
    """Replies waiting to be sent; flushed before every read, as qmail's substdio is."""

    __slots__ = ("fd", "timeout", "buf")

    def __init__(self, fd: int, timeout: int) -> None:
        self.fd = fd
        self.timeout = timeout
        self.buf = bytearray()

    def put(self, data: bytes) -> None:
        self.buf += data

    def flush(self) -> None:
        """Send everything; raise Die(None) if the client cannot take it within the timeout."""
        while self.buf:
            p = select.poll()
            p.register(self.fd, select.POLLOUT)
            try:
                if not p.poll(_ms(self.timeout)):
                    raise Die(None)
                n = os.write(self.fd, self.buf[:WRITE_SIZE])
            except OSError:
                raise Die(None) from None
            if n <= 0:
                raise Die(None)
            del self.buf[:n]


class Input:
    """Bytes from the client, read in bounded chunks with a timeout for each."""

    __slots__ = ("fd", "timeout", "out", "buf", "pos")

    def __init__(self, fd: int, timeout: int, out: Output) -> None:
        self.fd = fd
        self.timeout = timeout
        self.out = out
        self.buf = bytearray()
        self.pos = 0

    def read(self) -> bytes:
        """Return the next chunk from the client after sending pending replies; Die on timeout or end."""
        self.out.flush()
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        try:
            if not p.poll(_ms(self.timeout)):
                raise Die(replies.TIMEOUT)
            data = os.read(self.fd, READ_SIZE)
        except OSError:
            raise Die(None) from None
        if not data:
            raise Die(None)
        return data

    def pending(self) -> bytes:
        """Return and forget the bytes read but not yet used."""
        data = bytes(self.buf[self.pos:])
        self.buf = bytearray()
        self.pos = 0
        return data

    def unread(self, data: bytes) -> None:
        """Put back bytes to be used before anything read later."""
        self.buf = bytearray(data) + self.buf[self.pos:]
        self.pos = 0

    def line(self) -> bytes:
        """Return the next line without its LF; a line longer than LINE_MAX is cut there."""
        head = None
        while True:
            nl = self.buf.find(b"\n", self.pos)
            if nl != -1:
                line = bytes(self.buf[self.pos:nl])
                self.pos = nl + 1
                return line if head is None else head
            if head is None and len(self.buf) - self.pos > LINE_MAX:
                head = bytes(self.buf[self.pos:self.pos + LINE_MAX])
            if head is not None:
                self.buf.clear()  # drop the rest of an overlong line
            else:
                del self.buf[:self.pos]
            self.pos = 0
            self.buf += self.read()


def _setup() -> tuple[Config, int]:
    """Read the control files and environment; raise Die with qmail's 421 if they cannot be read."""
    try:
        os.chdir(_home.home())
        control.me()  # qmail reads control/me first: unreadable is fatal even with smtpgreeting
        greeting = control.read_default("smtpgreeting", None)
        if greeting is None:
            raise Die(replies.CONTROL)  # neither smtpgreeting nor me: qmail refuses to run
        liphost = control.read_default("localiphost", None)
        timeout = control.read_int("timeoutsmtpd", DEFAULT_TIMEOUT) & 0xFFFFFFFF
        if timeout >= 1 << 31:
            timeout -= 1 << 32  # qmail keeps it in an int
        if timeout <= 0:
            timeout = 1
        rcpthosts = RcptHosts.load()
        bmf = control.read_lines("badmailfrom")
        badmailfrom = None if bmf is None else frozenset(b.encode("latin-1").lower() for b in bmf)
        databytes = control.read_int("databytes", 0) & 0xFFFFFFFF
    except (ControlError, OSError):
        raise Die(replies.CONTROL) from None
    env = posix.environ  # what os.environb wraps, without its Python-level calls
    x = env.get(b"DATABYTES")
    if x is not None:
        databytes = scan_ulong(x)[0] & 0xFFFFFFFF
    if databytes == 0xFFFFFFFF:
        databytes -= 1  # qmail adds one to it
    cfg = Config(greeting.encode("latin-1"), Peer.from_env(env),
                 liphost=None if liphost is None else liphost.encode("latin-1"),
                 rcpthosts=rcpthosts, badmailfrom=badmailfrom,
                 databytes=databytes, relayclient=env.get(b"RELAYCLIENT"), is_local=Ipme())
    return cfg, timeout


def _data(session: Session, inp: Input, out: Output) -> None:
    """Receive one message after DATA and queue it; the reply goes to out."""
    try:
        q = QQ(network=True)
    except OSError:
        out.put(replies.QQT_FAILURE)
        return
    qp = max(q.pid, 0)
    out.put(replies.GO_AHEAD)
    q.write(session.received(int(time.time())))
    blast = Blast()
    limit = session.cfg.databytes
    overflow = False
    data = inp.pending()
    try:
        while True:
            status, used = blast.feed(data)
            piece = blast.take()
            if not overflow:
                if limit and blast.size > limit:
                    overflow = True
                    q.fail()
                else:
                    q.write(piece)
            if status == END:
                inp.unread(data[used:])
                break
            if status != MORE:
                raise Die(replies.STRAY_NEWLINE)
            data = inp.read()
    except BaseException:
        q.fail()  # the client is gone or broke the protocol: nothing is queued
        try:
            q.close(b"", [])
        except OSError:
            pass  # safe: abandoned (no envelope end), nothing is queued; the first error is re-raised
        raise
    hops = blast.hops >= MAXHOPS
    if hops:
        q.fail()
    report = q.close(session.mailfrom, session.recipients())
    out.put(data_reply(report, hops, overflow, qp, int(time.time())))


def serve(inp: Input, out: Output, session: Session) -> int:
    """Run the conversation until QUIT (0) or a death (1)."""
    death: bytes | None
    try:
        out.put(session.greeting())
        while True:
            reply, step = session.command(inp.line())
            out.put(reply)
            if step == QUIT:
                out.flush()
                return EXIT_QUIT
            if step == DATA:
                _data(session, inp, out)
    except Die as e:
        death = e.reply
    except ControlError:
        death = replies.CONTROL
    except MemoryError:
        death = replies.NOMEM
    except IpmeError:
        death = replies.IPME
    if death is not None:
        out.put(death)
        try:
            out.flush()
        except Die:
            pass
    return EXIT_DEATH


def preload() -> None:
    """Run a few sessions on socket pairs in tcpserver's parent, before any connection.

    CPython rewrites a function's code as it warms up. Children forked from a
    parent that ran the session code share those pages unchanged; cold code
    would be written, and so copied, in every child.
    """
    import socket

    for _ in range(WARM_SESSIONS):
        try:
            cfg, timeout = _setup()
        except Die:
            return  # the children will say so
        mine, client = socket.socketpair()
        with mine, client:
            client.sendall(WARM_SCRIPT)
            client.shutdown(socket.SHUT_WR)
            out = Output(mine.fileno(), timeout)
            serve(Input(mine.fileno(), timeout, out), out, Session(cfg))


@program("qmail-smtpd", crash=EXIT_DEATH)
def main(argv: list[str]) -> int:
    """Talk SMTP on descriptors 0 and 1 until QUIT or a death."""
    try:
        cfg, timeout = _setup()
    except Die as e:
        out = Output(FD_OUT, DEFAULT_TIMEOUT)
        out.put(e.reply or b"")
        try:
            out.flush()
        except Die:
            pass
        return EXIT_DEATH
    out = Output(FD_OUT, timeout)
    return serve(Input(FD_IN, timeout, out), out, Session(cfg))
