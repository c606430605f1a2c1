"""qmail-pop3d: distribute mail via POP (qmail-pop3d(8)).

Usage: qmail-pop3d maildirname, run as the user in the user's home (as
checkpassword leaves it). The Maildir is listed once at start, in order of
mtime; DELE only marks, QUIT unlinks the marked messages and moves the rest
of new/ to cur/ with ":2,". LIST sizes are file sizes; RETR and TOP send CRLF
lines, dot-stuffed, with qmail's extra blank line before the final dot. Any
end of the session (QUIT, end of input, the 20-minute timeout) exits 0.
"""

from __future__ import annotations

import os
import time

from pyqmail.entry import program
from pyqmail.pop3.mailbox import COPY_CHUNK, Blaster, Message, ScanError, clean_tmp, scan
from pyqmail.pop3.protocol import OK, READ_SIZE, Closed, connect, err, readline, scan_ulong, split_command

TYPE_CHECKING = False  # typing costs milliseconds per login; mypy sees the imports
if TYPE_CHECKING:
    from pyqmail import net

EXIT = 0  # qmail-pop3d's die()
EXIT_ROOT = 1
FD_IN = 0
FD_OUT = 1
FD_ERR = 2

ERR_NOMAILDIR = err("this user has no $HOME/Maildir")
ERR_SCAN = err("unable to scan $HOME/Maildir")
ERR_SYNTAX = err("syntax error")
ERR_UNIMPL = err("unimplemented")
ERR_DELETED = err("already deleted")
ERR_NOZERO = err("messages are counted from 1")
ERR_TOOBIG = err("not that many messages")
ERR_NOSUCH = err("unable to open that message")
ERR_NOUNLINK = err("unable to unlink all deleted messages")
ROOT_REFUSED = b"qmail-pop3d invoked as uid 0, terminating\n"


class Session:
    """The transaction state of one POP3 session over a listed Maildir (RFC 1939 section 5)."""

    def __init__(self, messages: list[Message], conn: net.Conn | None = None) -> None:
        self.messages = messages
        self.last = 0  # the highest message number accessed (LAST, from RFC 1460)
        self.conn = conn

    def send(self, data: bytes) -> None:
        """Queue a reply for the client (sent before the next read, or once OUT_MAX bytes wait)."""
        assert self.conn is not None
        self.conn.put(data)

    def msgno(self, arg: bytes) -> int:
        """Return the index that arg names, or -1 after sending qmail's error for it."""
        n, used = scan_ulong(arg)
        if not used:
            self.send(ERR_SYNTAX)
            return -1
        if n == 0:
            self.send(ERR_NOZERO)
            return -1
        if n > len(self.messages):
            self.send(ERR_TOOBIG)
            return -1
        if self.messages[n - 1].deleted:
            self.send(ERR_DELETED)
            return -1
        return n - 1

    def stat(self, arg: bytes) -> None:
        # The count includes messages marked deleted; the total does not (as qmail).
        total = sum(m.size for m in self.messages if not m.deleted)
        self.send(b"+OK %d %d\r\n" % (len(self.messages), total))

    def listing(self, arg: bytes, uidl: bool) -> None:
        def entry(i: int) -> bytes:
            m = self.messages[i]
            return b"%d " % (i + 1) + (m.uid if uidl else b"%d" % m.size) + b"\r\n"

        if arg:
            i = self.msgno(arg)
            if i >= 0:
                self.send(b"+OK " + entry(i))
            return
        lines = [OK]
        lines += [entry(i) for i, m in enumerate(self.messages) if not m.deleted]
        lines.append(b".\r\n")
        self.send(b"".join(lines))

    def dele(self, arg: bytes) -> None:
        i = self.msgno(arg)
        if i < 0:
            return
        self.messages[i].deleted = True
        self.last = max(self.last, i + 1)
        self.send(OK)

    def rset(self, arg: bytes) -> None:
        for m in self.messages:
            m.deleted = False
        self.last = 0
        self.send(OK)

    def top(self, arg: bytes) -> None:
        """RETR n and TOP n lines (qmail treats RETR n m as TOP n m)."""
        i = self.msgno(arg)
        if i < 0:
            return
        _, used = scan_ulong(arg)
        rest = arg[used:].lstrip(b" ")
        lines, used = scan_ulong(rest)
        limit = (lines + 1) % (1 << 64) if used else 0
        try:
            fd = os.open(self.messages[i].fn, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            self.send(ERR_NOSUCH)
            return
        try:
            blaster = Blaster(limit)
            # "+OK" goes out with the message's first bytes, in one write, as
            # qmail's buffered output sends it: alone, it would wait for the
            # client's delayed acknowledgement (40 ms per RETR). (The pieces
            # are also held here so that a subclass's send sees whole replies.)
            pending = [OK]
            size = len(OK)
            while not blaster.done:
                try:
                    data = os.read(fd, COPY_CHUNK)
                except OSError as e:
                    # Mid-message there is no way to say so in POP: end the session, as qmail.
                    raise Closed(str(e)) from e
                if not data:
                    break
                piece = blaster.feed(data)
                pending.append(piece)
                size += len(piece)
                if size >= COPY_CHUNK:
                    self.send(b"".join(pending))
                    pending, size = [], 0
            pending.append(blaster.end())
            self.send(b"".join(pending))
        finally:
            os.close(fd)

    def last_(self, arg: bytes) -> None:
        self.send(b"+OK %d\r\n" % self.last)

    def noop(self, arg: bytes) -> None:
        self.send(OK)

    def quit(self) -> None:
        """Unlink the marked messages, move the rest of new/ to cur/, say +OK."""
        for m in self.messages:
            if m.deleted:
                try:
                    os.unlink(m.fn)
                except OSError:
                    self.send(ERR_NOUNLINK)
            elif m.fn.startswith("new/"):
                try:
                    os.rename(m.fn, "cur/" + m.fn[4:] + ":2,")
                except OSError:
                    pass  # it stays in new/ and is listed again next time
        self.send(OK)


def _refuse_root() -> int:
    try:
        os.write(FD_ERR, ROOT_REFUSED)
    except OSError:
        pass  # safe: stderr gone; the exit code says why
    return EXIT_ROOT


@program("qmail-pop3d", crash=EXIT)
def main(argv: list[str]) -> int:
    """Serve the Maildir argv[1] over POP3 on descriptors 0 and 1; exit 0 (1 if run as root)."""
    from pyqmail import net

    if os.getuid() == 0:
        return _refuse_root()
    conn = connect(FD_IN, FD_OUT, read_size=READ_SIZE)  # the last reader: what it reads ahead is its own
    try:
        try:
            return _serve(argv, conn)
        finally:
            conn.flush()
    except (Closed, net.NetError):
        return EXIT


def _serve(argv: list[str], conn: net.Conn) -> int:
    if len(argv) < 2:
        conn.put(ERR_NOMAILDIR)
        return EXIT
    try:
        os.chdir(argv[1])
    except OSError:
        conn.put(ERR_NOMAILDIR)
        return EXIT
    now = int(time.time())
    clean_tmp(now)
    try:
        messages = scan(now)
    except ScanError:
        conn.put(ERR_SCAN)
        return EXIT
    session = Session(messages, conn)
    session.send(OK)
    handlers = {
        b"stat": session.stat,
        b"list": lambda arg: session.listing(arg, uidl=False),
        b"uidl": lambda arg: session.listing(arg, uidl=True),
        b"dele": session.dele,
        b"retr": session.top,
        b"rset": session.rset,
        b"last": session.last_,
        b"top": session.top,
        b"noop": session.noop,
    }
    while True:
        verb, arg = split_command(readline(conn))
        if verb == b"quit":
            session.quit()
            return EXIT
        handler = handlers.get(verb)
        if handler is None:
            session.send(ERR_UNIMPL)
        else:
            handler(arg)
