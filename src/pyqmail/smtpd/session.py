"""qmail-smtpd's SMTP state machine: one command line in, replies out, no I/O.

`Session.command` takes a line as read from the client (LF removed) and
returns the bytes to answer and what the shell must do next (go on, quit,
or receive a message). Address parsing is qmail's addrparse: the first '<'
starts the address and '>' ends it; without '<', the address starts after
the first ':' and ends at a space. Quotes are dropped, a backslash takes the
next byte literally, a source route (@a,@b:) is stripped, and an address
longer than 899 bytes is a syntax error.
"""

from __future__ import annotations

from pyqmail.smtpd import replies
from pyqmail.smtpd.auth import SENDER_NOT_YOURS
from pyqmail.smtpd.received import Peer, safe
from pyqmail.smtpd.rcpthosts import RcptHosts

TYPE_CHECKING = False  # typing costs milliseconds per connection; mypy sees the imports
if TYPE_CHECKING:
    from pyqmail.smtpd.auth import Policy
    from collections.abc import Callable, Iterator

ADDR_MAX = 900  # bytes of an address, qmail's terminating NUL included
# The recipients of one transaction are kept as qmail keeps them, as
# NUL-terminated addresses, in buffers of RCPT_CHUNK bytes (one growing
# buffer would be copied as it grows, and the copies left behind in the heap
# would double the memory). Past RCPT_BYTES_MAX bytes a RCPT gets 452
# (RFC 5321 4.5.3.1.10; 4.5.3.1.8's minimum of 100 recipients needs 90 000
# bytes at most), which bounds a session's memory whatever the client sends.
RCPT_BYTES_MAX = 16 * 1024 * 1024
RCPT_CHUNK = 65536
MAXHOPS = 100

# What the shell does after sending the replies.
CONTINUE = 0
QUIT = 1
DATA = 2
STARTTLS = 3  # set TLS up (the shell sends 220 or 454), then call Session.tls_started
AUTH = 4  # run the AUTH exchange of Session.auth_arg (the shell), then call Session.authenticated

_U64 = (1 << 64) - 1


def scan_ulong(s: bytes) -> tuple[int, int]:
    """Return (value, digits used) of the leading decimal digits of s, wrapping as C's unsigned long."""
    u = 0
    i = 0
    for c in s:
        if not 48 <= c <= 57:
            break
        u = (u * 10 + c - 48) & _U64
        i += 1
    return u, i


def ip_scan(s: bytes) -> tuple[tuple[int, int, int, int], int] | None:
    """Parse a dotted quad at the start of s; return (octets, length) or None (qmail's ip_scan)."""
    octets = []
    pos = 0
    for part in range(4):
        if part:
            if s[pos:pos + 1] != b".":
                return None
            pos += 1
        u, n = scan_ulong(s[pos:])
        if not n:
            return None
        octets.append(u & 0xFF)  # stored in an unsigned char
        pos += n
    return (octets[0], octets[1], octets[2], octets[3]), pos


def ip_scanbracket(s: bytes) -> tuple[tuple[int, int, int, int], int] | None:
    """Parse '[d.d.d.d]' at the start of s; return (octets, length) or None."""
    if s[:1] != b"[":
        return None
    got = ip_scan(s[1:])
    if got is None:
        return None
    ip, n = got
    if s[n + 1:n + 2] != b"]":
        return None
    return ip, n + 2


def split_command(line: bytes) -> tuple[bytes, bytes]:
    """Return (verb, argument) of a command line; a trailing CR and anything after a NUL are ignored."""
    if line.endswith(b"\r"):
        line = line[:-1]
    nul = line.find(b"\0")
    if nul != -1:
        line = line[:nul]  # qmail's command is a C string
    sp = line.find(b" ")
    if sp == -1:
        return line, b""
    return line[:sp], line[sp:].lstrip(b" ")


def addrparse(arg: bytes, liphost: bytes | None = None,
              is_local: Callable[[tuple[int, int, int, int]], bool] | None = None) -> bytes | None:
    """Return the address in a MAIL/RCPT argument, or None if it is too long."""
    lt = arg.find(b"<")
    if lt != -1:
        terminator = ord(">")
        rest = arg[lt + 1:]
    else:  # no brackets: after the first ':', up to a space
        terminator = ord(" ")
        colon = arg.find(b":")
        rest = arg[colon + 1:] if colon != -1 else b""
        rest = rest.lstrip(b" ")
    if rest[:1] == b"@":  # source route
        colon = rest.find(b":")
        rest = rest[colon + 1:] if colon != -1 else b""
    addr = bytearray()
    escaped = quoted = False
    for ch in rest:
        if escaped:
            addr.append(ch)
            escaped = False
        elif not quoted and ch == terminator:
            break
        elif ch == 92:  # backslash
            escaped = True
        elif ch == 34:  # double quote
            quoted = not quoted
        else:
            addr.append(ch)
    if liphost is not None and is_local is not None:
        at = addr.rfind(b"@")
        if at != -1 and addr[at + 1:at + 2] == b"[":
            got = ip_scanbracket(bytes(addr[at + 1:]))
            if got is not None and at + 1 + got[1] == len(addr) and is_local(got[0]):
                del addr[at + 1:]
                addr += liphost
    if len(addr) + 1 > ADDR_MAX:
        return None
    return bytes(addr)


class Config:
    """What qmail-smtpd reads at start: control files and environment."""

    __slots__ = ("greeting", "liphost", "rcpthosts", "badmailfrom", "databytes", "relayclient", "peer",
                 "is_local", "starttls", "auth", "forcetls")

    def __init__(self, greeting: bytes, peer: Peer, liphost: bytes | None = None,
                 rcpthosts: RcptHosts | None = None,
                 badmailfrom: frozenset[bytes] | None = None, databytes: int = 0,
                 relayclient: bytes | None = None,
                 is_local: Callable[[tuple[int, int, int, int]], bool] | None = None,
                 starttls: Callable[[], bool] | None = None,
                 auth: Policy | None = None, forcetls: bool = False) -> None:
        self.greeting = greeting
        self.peer = peer
        self.liphost = liphost
        self.rcpthosts = rcpthosts or RcptHosts(None)
        self.badmailfrom = badmailfrom  # lowercased entries, or None
        self.databytes = databytes  # 0: no limit
        self.relayclient = relayclient
        self.is_local = is_local
        # None: no STARTTLS ($DISABLETLS); else whether to offer it now (a certificate is readable).
        self.starttls = starttls
        # SMTP AUTH ($SMTPAUTH and a checkprogram), and $FORCETLS: no AUTH offered or taken before TLS.
        self.auth = auth
        self.forcetls = forcetls


class Session:
    """One SMTP conversation's state: HELO name, envelope sender, recipients."""

    __slots__ = ("cfg", "seenmail", "flagbarf", "mailfrom", "rcpts", "rcptbytes", "helohost", "fakehelo",
                 "relayclient", "protocol", "tls", "tls_verify", "verified", "verify_err", "cipher",
                 "authuser", "auth_arg")

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.seenmail = False
        self.flagbarf = False
        self.mailfrom = b""
        self.rcpts: list[bytearray] = []  # accepted recipients, each followed by a NUL
        self.rcptbytes = 0
        self.helohost = b""
        self.fakehelo: bytes | None = None
        self.relayclient = cfg.relayclient  # a client certificate in tlsclients sets it to b""
        self.protocol = b"SMTP"  # the Received line's "with"
        self.tls = False
        self.tls_verify: Callable[[], tuple[bytes | None, bytes | None]] | None = None
        self.verified = False
        self.verify_err: bytes | None = None
        self.cipher = b""
        self.authuser: bytes | None = None  # the authenticated user
        self.auth_arg = b""  # the AUTH command's argument, for the shell
        self._helo(cfg.peer.remotehost)

    @property
    def rcptto(self) -> list[bytes]:
        """The recipients accepted so far, in order."""
        return list(self.recipients())

    def recipients(self) -> Iterator[bytes]:
        """Yield the recipients accepted so far, one at a time."""
        for buf in self.rcpts:
            pos = 0
            while pos < len(buf):
                end = buf.index(0, pos)
                yield bytes(buf[pos:end])
                pos = end + 1

    def greeting(self) -> bytes:
        """Return the 220 line."""
        return replies.greeting(self.cfg.greeting)

    def _helo(self, arg: bytes) -> None:
        self.helohost = arg
        # The HELO name is shown in Received only where it differs from TCPREMOTEHOST.
        self.fakehelo = None if arg.lower() == self.cfg.peer.remotehost.lower() else arg

    def _addr(self, arg: bytes) -> bytes | None:
        return addrparse(arg, self.cfg.liphost, self.cfg.is_local)

    def _badmailfrom(self, addr: bytes) -> bool:
        bmf = self.cfg.badmailfrom
        if bmf is None:
            return False
        if addr.lower() in bmf:
            return True
        at = addr.rfind(b"@")
        return at != -1 and addr[at:].lower() in bmf

    def command(self, line: bytes) -> tuple[bytes, int]:
        """Return (replies, next step) for one command line; raise ControlError when qmail dies with 421."""
        verb, arg = split_command(line)
        verb = verb.lower()
        if verb == b"rcpt":
            return self._rcpt(arg), CONTINUE
        if verb == b"mail":
            return self._mail(arg), CONTINUE
        if verb == b"data":
            if not self.seenmail:
                return replies.WANT_MAIL, CONTINUE
            if not self.rcpts:
                return replies.WANT_RCPT, CONTINUE
            self.seenmail = False
            return b"", DATA
        if verb == b"quit":
            return replies.quit(self.cfg.greeting), QUIT
        if verb == b"helo":
            self.seenmail = False
            self._helo(arg)
            return replies.helo(self.cfg.greeting), CONTINUE
        if verb == b"ehlo":
            self.seenmail = False
            self._helo(arg)
            starttls = not self.tls and self.cfg.starttls is not None and self.cfg.starttls()
            policy = self.cfg.auth
            if policy is None:
                return replies.ehlo(self.cfg.greeting, starttls), CONTINUE
            mechs = policy.line() if self.tls or not self.cfg.forcetls else None
            return replies.ehlo_auth(self.cfg.greeting, starttls, mechs, self.cfg.databytes), CONTINUE
        if verb == b"auth":
            return self._auth(arg)
        if verb == b"starttls":
            if self.tls or self.cfg.starttls is None:
                return replies.UNIMPLEMENTED, CONTINUE
            if arg:
                return replies.STARTTLS_PARAMETERS, CONTINUE
            return b"", STARTTLS
        if verb == b"rset":
            self.seenmail = False
            return replies.FLUSHED, CONTINUE
        if verb == b"help":
            return replies.HELP, CONTINUE
        if verb == b"noop":
            return replies.OK, CONTINUE
        if verb == b"vrfy":
            return replies.VRFY, CONTINUE
        return replies.UNIMPLEMENTED, CONTINUE

    def _auth(self, arg: bytes) -> tuple[bytes, int]:
        if self.cfg.auth is None:
            return replies.UNIMPLEMENTED, CONTINUE
        if self.cfg.forcetls and not self.tls:
            return replies.AUTH_NEED_TLS, CONTINUE
        if self.authuser is not None:
            return replies.AUTH_ALREADY, CONTINUE
        if self.seenmail:
            return replies.AUTH_IN_TRANSACTION, CONTINUE
        self.auth_arg = arg
        return b"", AUTH

    def authenticated(self, user: bytes) -> None:
        """The checkprogram accepted user: relaying, TCPREMOTEINFO and Received's ESMTPA/ESMTPSA."""
        self.authuser = user
        self.relayclient = b""
        self.cfg.peer.remoteinfo = user
        self.protocol = b"ESMTPSA (" + self.cipher + b" encrypted)" if self.tls else b"ESMTPA"

    def _mail(self, arg: bytes) -> bytes:
        if self.cfg.auth is not None and self.cfg.auth.required and self.authuser is None:
            return replies.AUTH_REQUIRED
        addr = self._addr(arg)
        if addr is None:
            return replies.SYNTAX
        check = self.cfg.auth.sendercheck if self.cfg.auth is not None else None
        if check is not None and self.authuser is not None and not check.allowed(self.authuser, addr):
            return SENDER_NOT_YOURS  # $SENDERCHECK (issue 14.2)
        self.flagbarf = self._badmailfrom(addr)
        self.seenmail = True
        self.rcpts = []
        self.rcptbytes = 0
        self.mailfrom = addr
        return replies.OK

    def _rcpt(self, arg: bytes) -> bytes:
        if not self.seenmail:
            return replies.WANT_MAIL
        addr = self._addr(arg)
        if addr is None:
            return replies.SYNTAX
        if self.flagbarf:
            return replies.BADMAILFROM
        if self.relayclient is not None:
            addr += self.relayclient
        elif not self.cfg.rcpthosts.allowed(addr) and not self._tls_relay():
            return replies.nogateway_tls(self.verify_err) if self.tls else replies.NOGATEWAY
        size = len(addr) + 1
        if self.rcptbytes + size > RCPT_BYTES_MAX:
            return replies.TOO_MANY_RCPTS
        if not self.rcpts or len(self.rcpts[-1]) + size > RCPT_CHUNK:
            self.rcpts.append(bytearray())
        buf = self.rcpts[-1]
        buf += addr
        buf.append(0)
        self.rcptbytes += size
        return replies.OK

    def received(self, when: int) -> bytes:
        """Return the Received field for the message now starting."""
        return self.cfg.peer.received(self.protocol, self.fakehelo, when)

    def tls_started(self, cipher: bytes,
                    verify: Callable[[], tuple[bytes | None, bytes | None]] | None = None) -> None:
        """Start over inside TLS: no HELO, MAIL or RCPT state survives (RFC 3207 section 4.2).

        verify, called at most once, when a recipient needs relaying, returns the
        client certificate's address if it is in tlsclients, else (None, why).
        """
        self.tls = True
        self.cipher = cipher
        self.protocol = b"ESMTPS (" + cipher + b" encrypted)"
        if self.authuser is not None:  # AUTH in plain text, then STARTTLS: still that user
            self.protocol = b"ESMTPSA (" + cipher + b" encrypted)"
        self.tls_verify = verify
        self.seenmail = False
        self.flagbarf = False
        self.mailfrom = b""
        self.rcpts = []
        self.rcptbytes = 0
        self._helo(self.cfg.peer.remotehost)

    def _tls_relay(self) -> bool:
        """Whether the client's certificate allows relaying (asked once per session, as the patch)."""
        if not self.tls or self.verified or self.tls_verify is None:
            return False
        self.verified = True
        email, why = self.tls_verify()
        if email is None:
            self.verify_err = why
            return False
        self.relayclient = b""
        self.protocol += b"\n  (cert " + safe(email) + b")"  # a continuation line of Received
        return True


def data_reply(report: bytes, hops: bool, overflow: bool, qp: int, when: int) -> bytes:
    """Return the reply after DATA: qmail-queue's report (b"" for success), looping, databytes."""
    if not report:
        return replies.accepted(when, qp)
    if hops:
        return replies.TOO_MANY_HOPS
    if overflow:
        return replies.DATABYTES
    return replies.qq_failure(report)
