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

from pyqmail.smtpd import bdat, replies
from pyqmail.smtpd.auth import SENDER_NOT_YOURS
from pyqmail.smtpd.received import Peer, safe
from pyqmail.smtpd.policy import NO_HOOKS
from pyqmail.smtpd.rcpthosts import RcptHosts
from pyqmail.smtpd.receive import badmailfrom
from pyqmail.smtputf8 import has_smtputf8, mail_parameters
from pyqmail.smtpd.receive import scan_ulong as scan_ulong  # its home was here; callers import it from here

TYPE_CHECKING = False  # typing costs milliseconds per connection; mypy sees the imports
if TYPE_CHECKING:
    from pyqmail.smtpd.auth import Policy
    from pyqmail.smtpd.policy import Hooks, Verdict
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
DROP = 5  # a check ended the connection: exit 0 after the replies (as qmail-spp's R and D)
DIE = 6  # the bad-recipient limit: exit 1 after the replies
BDAT = 7  # a BDAT chunk (Session.chunk) follows the command line: the shell reads it, then replies
SIZE_DIGITS = 18  # a longer SIZE=n is larger than any databytes

# RFC 2034 codes of 2xx replies that carry none of qmail's "(#x.y.z)", by verb (else 2.0.0).
ESC_OK = {b"mail": b"2.1.0", b"rcpt": b"2.1.5"}

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
            elif addr[at + 1:at + 7].lower() == b"[ipv6:" and addr[-1:] == b"]":
                # RFC 5321 4.1.3's IPv6 literal, when it is one of this host's addresses (issue 18.1).
                from pyqmail.smtpd.ipme import is_local6

                if is_local6(bytes(addr[at + 7:-1])):
                    del addr[at + 1:]
                    addr += liphost
    if len(addr) + 1 > ADDR_MAX:
        return None
    return bytes(addr)


class Config:
    """What qmail-smtpd reads at start: control files and environment."""

    __slots__ = ("greeting", "liphost", "rcpthosts", "badmailfrom", "databytes", "relayclient", "peer",
                 "is_local", "starttls", "auth", "forcetls", "hooks", "brtlimit", "setenv", "smtputf8", "esc",
                 "size", "chunking")

    def __init__(self, greeting: bytes, peer: Peer, liphost: bytes | None = None,
                 rcpthosts: RcptHosts | None = None,
                 badmailfrom: frozenset[bytes] | None = None, databytes: int = 0,
                 relayclient: bytes | None = None,
                 is_local: Callable[[tuple[int, int, int, int]], bool] | None = None,
                 starttls: Callable[[], bool] | None = None,
                 auth: Policy | None = None, forcetls: bool = False,
                 hooks: Hooks = NO_HOOKS, brtlimit: int = 0,
                 setenv: Callable[[bytes, bytes], None] | None = None, smtputf8: bool = False,
                 esc: bool = False, size: bool = False, chunking: bool = False) -> None:
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
        self.hooks = hooks  # the checks (pyqmail.smtpd.policy), NO_HOOKS for none
        self.brtlimit = brtlimit  # bad recipients (Verdict.badrcpt) before 421 and the end; 0: no limit
        # How relaying granted during the session reaches qmail-queue and $QMAILQUEUE filters
        # (RELAYCLIENT in the environment, as the AUTH and TLS patches); None in pure tests.
        self.setenv = setenv
        self.smtputf8 = smtputf8  # offer SMTPUTF8 (RFC 6531): control/smtputf8, $SMTPUTF8
        self.esc = esc  # offer ENHANCEDSTATUSCODES (RFC 2034): control/enhancedstatuscodes, $ENHANCEDSTATUSCODES
        # Offer SIZE (RFC 1870: control/smtpsize, $SMTPSIZE; also whenever AUTH is configured, as the
        # AUTH patch) and CHUNKING (RFC 3030: control/chunking, $CHUNKING). Off, EHLO is qmail's.
        self.size = size or auth is not None
        self.chunking = chunking


class Session:
    """One SMTP conversation's state: HELO name, envelope sender, recipients.

    It is also the read-only view checks see (pyqmail.smtpd.policy.View).
    """

    __slots__ = ("cfg", "seenmail", "flagbarf", "mailfrom", "rcpts", "rcptbytes", "helohost", "fakehelo",
                 "relayclient", "protocol", "tls", "tls_verify", "verified", "verify_err", "cipher",
                 "authuser", "auth_arg", "rcptcount", "rcptcountall", "rcpt_allowed", "badrcpts", "headers", "utf8",
                 "esc", "verb", "bdat", "chunk", "tx_mark")

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.seenmail = False
        self.flagbarf = False
        self.mailfrom = b""
        self.rcpts: list[bytearray] = []  # accepted recipients, each followed by a NUL
        self.rcptbytes = 0
        self.rcptcount = 0  # recipients accepted in this transaction
        self.rcptcountall = 0  # RCPT commands that reached the relay decision in this transaction
        self.rcpt_allowed = False  # during the rcpt hooks: relaying or rcpthosts allows the address
        self.badrcpts = 0  # refusals counted toward cfg.brtlimit in this session
        self.headers: list[bytes] = []  # header lines the checks add to the next message
        self.tx_mark = -1  # len(headers) when the transaction's first MAIL came (-1: none since the reset)
        self.utf8 = False  # this transaction's MAIL said SMTPUTF8 (and it is offered)
        self.helohost = b""
        self.fakehelo: bytes | None = None
        self.relayclient = cfg.relayclient  # see grant_relay
        self.protocol = b"SMTP"  # the Received line's "with"
        self.tls = False
        self.tls_verify: Callable[[], tuple[bytes | None, bytes | None]] | None = None
        self.verified = False
        self.verify_err: bytes | None = None
        self.cipher = b""
        self.authuser: bytes | None = None  # the authenticated user
        self.auth_arg = b""  # the AUTH command's argument, for the shell
        self.esc = False  # the client said EHLO and ENHANCEDSTATUSCODES is offered: see enhance
        self.verb = b""  # the last command's verb, lowercased
        self.bdat = False  # a BDAT transaction is open: chunks taken, LAST not yet
        self.chunk = (0, False, False)  # the BDAT chunk after the command: size, LAST, whether to queue it
        self._helo(cfg.peer.remotehost)

    # --- the view checks read (pyqmail.smtpd.policy.View) ---------------------------------

    @property
    def remoteip(self) -> bytes:
        return self.cfg.peer.remoteip

    @property
    def remotehost(self) -> bytes:
        return self.cfg.peer.remotehost

    @property
    def remoteinfo(self) -> bytes | None:
        return self.cfg.peer.remoteinfo

    @property
    def localhost(self) -> bytes:
        return self.cfg.peer.local

    @property
    def relaying(self) -> bool:
        """Whether relaying is granted: RELAYCLIENT, AUTH, a client certificate or a check."""
        return self.relayclient is not None

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

    # --- the relay decision ---------------------------------------------------------------

    def grant_relay(self) -> None:
        """Let this session relay (AUTH, a client certificate, a check): as RELAYCLIENT="" if unset."""
        if self.relayclient is None:
            self.relayclient = b""
        if self.cfg.setenv is not None:
            self.cfg.setenv(b"RELAYCLIENT", self.relayclient)

    # --- checks ---------------------------------------------------------------------------

    def _checks(self, hooks: tuple[Callable[..., Verdict | None], ...],
                arg: bytes | None) -> tuple[Verdict | None, bytes | None, bytes]:
        """Run hooks in order; return (the deciding verdict or None, the address, text to send first).

        A verdict with only a header, an address, text or relay is applied and the next hook runs.
        """
        before = b""
        for hook in hooks:
            v = hook(self) if arg is None else hook(self, arg)
            if v is None:
                continue
            if v.header:
                self.headers.append(v.header)
            if v.relay:
                self.grant_relay()
            if v.address is not None and arg is not None:
                arg = v.address
            if v.before:
                before += v.before
            if v.reply or v.stop or v.drop:
                return v, arg, before
        return None, arg, before

    @staticmethod
    def _refused(v: Verdict | None, before: bytes) -> tuple[bytes, int] | None:
        """Return the reply and step when v refuses the command or drops the connection, else None."""
        if v is None:
            return None
        if v.refuse:
            return before + v.reply, DROP if v.drop else CONTINUE
        if v.drop:
            return before, DROP
        return None

    def connect(self) -> tuple[bytes, int]:
        """Return the greeting (or the connect checks' refusal) and the next step."""
        hooks = self.cfg.hooks.connect
        if hooks:
            v, _, before = self._checks(hooks, None)
            refused = self._refused(v, before)
            if refused is not None:
                return refused  # as qmail-spp: instead of the 220 line; the session goes on
            return before + self.greeting(), CONTINUE
        return self.greeting(), CONTINUE

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
        return badmailfrom(self.cfg.badmailfrom, addr)

    def command(self, line: bytes) -> tuple[bytes, int]:
        """Return (replies, next step) for one command line; raise ControlError when qmail dies with 421."""
        verb, arg = split_command(line)
        self.verb = verb = verb.lower()
        handler = VERBS.get(verb)
        if handler is None:
            return replies.UNIMPLEMENTED, CONTINUE
        return handler(self, arg)

    # --- the verbs (VERBS below is qmail's smtpcommands[]) ----------------------------------

    def _helo_checks(self, arg: bytes) -> tuple[bytes, tuple[bytes, int] | None]:
        """Run the helo hooks for HELO or EHLO arg: (text to send first, the refusal or None)."""
        hooks = self.cfg.hooks.helo
        if not hooks:
            return b"", None
        v, _, before = self._checks(hooks, arg)
        return before, self._refused(v, before)

    def _cmd_helo(self, arg: bytes) -> tuple[bytes, int]:
        before, refused = self._helo_checks(arg)
        if refused is not None:
            return refused
        self.seenmail = self.bdat = self.esc = False
        self._helo(arg)
        return before + replies.helo(self.cfg.greeting), CONTINUE

    def _cmd_ehlo(self, arg: bytes) -> tuple[bytes, int]:
        before, refused = self._helo_checks(arg)
        if refused is not None:
            return refused
        self.seenmail = self.bdat = False
        self.esc = self.cfg.esc
        self._helo(arg)
        return before + replies.ehlo_lines(self.cfg.greeting, self.ehlo_keywords()), CONTINUE

    def ehlo_keywords(self) -> list[bytes]:
        """Return the EHLO extensions offered now, in qmail's and the patches' order (a feature adds its own here)."""
        cfg = self.cfg
        kw = []
        if not self.tls and cfg.starttls is not None and cfg.starttls():
            kw.append(b"STARTTLS")
        kw += EHLO_BASE
        if cfg.smtputf8:
            kw.append(b"SMTPUTF8")
        policy = cfg.auth
        if policy is not None and (self.tls or not cfg.forcetls):  # the AUTH patch's line
            kw.append(b"AUTH " + policy.line())
        # RFC 1870, as the AUTH patch's line (SIZE 0: no limit), then RFC 3030 and RFC 2034.
        if cfg.size:
            kw.append(b"SIZE %d" % cfg.databytes)
        if cfg.chunking:
            kw.append(b"CHUNKING")
        if cfg.esc:
            kw.append(b"ENHANCEDSTATUSCODES")
        return kw

    def enhance(self, data: bytes) -> bytes:
        """Return replies with RFC 2034 codes when the client said EHLO and they are offered (else data).

        The shell passes every reply through here; replies to EHLO and HELO are left alone.
        """
        if not self.esc or self.verb in (b"ehlo", b"helo"):
            return data
        return replies.enhance(data, ESC_OK.get(self.verb, b"2.0.0"))

    def _cmd_quit(self, arg: bytes) -> tuple[bytes, int]:
        return replies.quit(self.cfg.greeting), QUIT

    def _cmd_rset(self, arg: bytes) -> tuple[bytes, int]:
        self.seenmail = self.bdat = False
        self._reset()
        return replies.FLUSHED, CONTINUE

    def _reset(self) -> None:
        """End the transaction's check state: headers, counts, the checks' own (reset hooks)."""
        self.headers = []
        self.tx_mark = -1
        self.rcptcount = self.rcptcountall = 0
        for hook in self.cfg.hooks.reset:
            hook(self)

    def _cmd_help(self, arg: bytes) -> tuple[bytes, int]:
        return replies.HELP, CONTINUE

    def _cmd_noop(self, arg: bytes) -> tuple[bytes, int]:
        return replies.OK, CONTINUE

    def _cmd_vrfy(self, arg: bytes) -> tuple[bytes, int]:
        return replies.VRFY, CONTINUE

    def _cmd_starttls(self, arg: bytes) -> tuple[bytes, int]:
        if self.tls or self.cfg.starttls is None:
            return replies.UNIMPLEMENTED, CONTINUE
        if arg:
            return replies.STARTTLS_PARAMETERS, CONTINUE
        return b"", STARTTLS

    def _cmd_data(self, arg: bytes) -> tuple[bytes, int]:
        if self.bdat:
            return replies.BDAT_AFTER, CONTINUE  # RFC 3030 3: not both in one transaction
        if not self.seenmail:
            return replies.WANT_MAIL, CONTINUE
        if not self.rcpts:
            return replies.WANT_RCPT, CONTINUE
        before = b""
        hooks = self.cfg.hooks.data
        if hooks:
            v, _, before = self._checks(hooks, None)
            refused = self._refused(v, before)
            if refused is not None:
                return refused
        self.seenmail = False
        return before, DATA

    def _cmd_bdat(self, arg: bytes) -> tuple[bytes, int]:
        """BDAT n [LAST]: the shell reads n bytes after the line, queued or dropped, then replies.

        A refusal is sent after its chunk is read and dropped (RFC 3030 2: the data follows
        the command unasked), so the bytes after it are commands again.
        """
        if not self.cfg.chunking:
            return replies.UNIMPLEMENTED, CONTINUE  # qmail's answer: CHUNKING is not offered
        got = bdat.parse(arg)
        if got is None:
            return replies.BDAT_SYNTAX, DIE  # no way to tell where the chunk ends
        size, last = got
        self.chunk = (size, last, False)
        if not self.seenmail:
            return replies.WANT_MAIL, BDAT
        if not self.rcpts:
            return replies.WANT_RCPT, BDAT
        before = b""
        if not self.bdat:  # the first chunk: the data checks, as at DATA
            hooks = self.cfg.hooks.data
            if hooks:
                v, _, before = self._checks(hooks, None)
                refused = self._refused(v, before)
                if refused is not None:
                    return refused[0], BDAT if refused[1] == CONTINUE else refused[1]
            self.bdat = True
        self.chunk = (size, last, True)
        return before, BDAT

    def bdat_done(self) -> None:
        """The BDAT transaction ended: LAST was queued or refused, or a chunk was refused (552)."""
        self.seenmail = self.bdat = False
        self.message_done()

    def message_done(self) -> None:
        """The message after DATA was queued or refused: the checks' headers and state go."""
        if self.headers or self.cfg.hooks.reset:
            self._reset()
        self.rcptcount = self.rcptcountall = 0

    def _cmd_auth(self, arg: bytes) -> tuple[bytes, int]:
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

    def authenticated(self, user: bytes) -> tuple[bytes, int]:
        """The checkprogram accepted user: the auth checks, then relaying, TCPREMOTEINFO, ESMTPA/ESMTPSA.

        Returns the reply (235, or an auth check's refusal, which undoes the login) and the step.
        """
        before = b""
        hooks = self.cfg.hooks.auth
        if hooks:
            self.authuser = user  # the checks see who logged in
            v, _, before = self._checks(hooks, user)
            refused = self._refused(v, before)
            self.authuser = None
            if refused is not None:
                return refused
        self.authuser = user
        self.grant_relay()
        self.cfg.peer.remoteinfo = user
        self.protocol = b"ESMTPSA (" + self.cipher + b" encrypted)" if self.tls else b"ESMTPA"
        return before + replies.AUTH_OK, CONTINUE

    def _cmd_mail(self, arg: bytes) -> tuple[bytes, int]:
        if self.cfg.auth is not None and self.cfg.auth.required and self.authuser is None:
            return replies.AUTH_REQUIRED, CONTINUE
        addr = self._addr(arg)
        if addr is None:
            return replies.SYNTAX, CONTINUE
        if self.cfg.size and self.cfg.databytes and b"=" in arg and declared_size(arg) > self.cfg.databytes:
            return replies.DATABYTES, CONTINUE  # RFC 1870 6.1: before any data moves
        check = self.cfg.auth.sendercheck if self.cfg.auth is not None else None
        if check is not None and self.authuser is not None and not check.allowed(self.authuser, addr):
            return SENDER_NOT_YOURS, CONTINUE  # $SENDERCHECK (issue 14.2)
        if self.tx_mark >= 0:
            # A MAIL after MAIL (qmail needs no RSET between them): the transaction it replaces
            # takes its check headers and the checks' state with it; the session's stay.
            del self.headers[self.tx_mark:]
            for hook in self.cfg.hooks.reset:
                hook(self)
        else:
            self.tx_mark = len(self.headers)
        before = b""
        hooks = self.cfg.hooks.mail
        if hooks:
            self.rcptcount = self.rcptcountall = 0
            v, a, before = self._checks(hooks, addr)
            refused = self._refused(v, before)
            if refused is not None:
                return refused
            addr = a or b""
            self.flagbarf = False if v is not None and v.accept else self._badmailfrom(addr)
        else:
            self.flagbarf = self._badmailfrom(addr)
        self.seenmail = True
        self.bdat = False
        self.rcpts = []
        self.rcptbytes = 0
        self.rcptcount = self.rcptcountall = 0
        self.mailfrom = addr
        # RFC 6531: SMTPUTF8 only where offered; elsewhere parameters are ignored, as qmail ignores them.
        self.utf8 = self.cfg.smtputf8 and has_smtputf8(arg)
        return before + replies.OK, CONTINUE

    def _cmd_rcpt(self, arg: bytes) -> tuple[bytes, int]:
        if not self.seenmail:
            return replies.WANT_MAIL, CONTINUE
        addr = self._addr(arg)
        if addr is None:
            return replies.SYNTAX, CONTINUE
        if self.flagbarf:
            return replies.BADMAILFROM, CONTINUE
        self.rcptcountall += 1
        before = b""
        hooks = self.cfg.hooks.rcpt
        if hooks:
            allowed = self.rcpt_allowed = (self.relayclient is not None
                                           or self.cfg.rcpthosts.allowed(addr, self.utf8) or self._tls_relay())
            v, a, before = self._checks(hooks, addr)
            addr = a or b""
            if v is not None and v.refuse:
                if v.badrcpt:
                    self.badrcpts += 1
                    if self.cfg.brtlimit and self.badrcpts >= self.cfg.brtlimit:
                        return before + replies.BRTLIMIT, DIE
                return before + v.reply, DROP if v.drop else CONTINUE
            if v is not None and v.drop:
                return before, DROP
            if self.relayclient is not None:
                addr += self.relayclient
            elif not allowed and not (v is not None and v.accept):
                return before + self._nogateway(), CONTINUE
        elif self.relayclient is not None:
            addr += self.relayclient
        elif not self.cfg.rcpthosts.allowed(addr, self.utf8) and not self._tls_relay():
            return self._nogateway(), CONTINUE
        size = len(addr) + 1
        if self.rcptbytes + size > RCPT_BYTES_MAX:
            return before + replies.TOO_MANY_RCPTS, CONTINUE
        if not self.rcpts or len(self.rcpts[-1]) + size > RCPT_CHUNK:
            self.rcpts.append(bytearray())
        buf = self.rcpts[-1]
        buf += addr
        buf.append(0)
        self.rcptbytes += size
        self.rcptcount += 1
        return before + replies.OK, CONTINUE

    def _nogateway(self) -> bytes:
        return replies.nogateway_tls(self.verify_err) if self.tls else replies.NOGATEWAY

    def received(self, when: int) -> bytes:
        """Return the Received field for the message now starting (RFC 6531 3.7.3: UTF8SMTP... with SMTPUTF8)."""
        protocol = self.protocol
        if self.utf8:
            protocol = b"UTF8SMTP" + protocol[5:] if protocol.startswith(b"ESMTP") else b"UTF8" + protocol
        return self.cfg.peer.received(protocol, self.fakehelo, when)

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
        self._reset()  # nothing the checks kept from before TLS survives either
        self.seenmail = self.bdat = self.esc = False
        self.flagbarf = False
        self.mailfrom = b""
        self.rcpts = []
        self.rcptbytes = 0
        self.rcptcount = self.rcptcountall = 0
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
        self.grant_relay()
        self.protocol += b"\n  (cert " + safe(email) + b")"  # a continuation line of Received
        return True


EHLO_BASE = (b"PIPELINING", b"8BITMIME")

# qmail's smtpcommands[]: verb (lowercased) -> handler; anything else is 502.
VERBS: dict[bytes, Callable[[Session, bytes], tuple[bytes, int]]] = {
    b"rcpt": Session._cmd_rcpt,
    b"mail": Session._cmd_mail,
    b"data": Session._cmd_data,
    b"quit": Session._cmd_quit,
    b"helo": Session._cmd_helo,
    b"ehlo": Session._cmd_ehlo,
    b"auth": Session._cmd_auth,
    b"starttls": Session._cmd_starttls,
    b"rset": Session._cmd_rset,
    b"help": Session._cmd_help,
    b"noop": Session._cmd_noop,
    b"vrfy": Session._cmd_vrfy,
    b"bdat": Session._cmd_bdat,
}


def declared_size(arg: bytes) -> int:
    """Return the SIZE=n of a MAIL argument (RFC 1870), 0 when there is none or it is not a number."""
    for word in mail_parameters(arg):
        if word.startswith(b"SIZE=") and word[5:].isdigit():
            return int(word[5:]) if len(word) - 5 <= SIZE_DIGITS else 10 ** SIZE_DIGITS
    return 0


def data_reply(report: bytes, hops: bool, overflow: bool, qp: int, when: int) -> bytes:
    """Return the reply after DATA: qmail-queue's report (b"" for success), looping, databytes."""
    if not report:
        return replies.accepted(when, qp)
    if hops:
        return replies.TOO_MANY_HOPS
    if overflow:
        return replies.DATABYTES
    return replies.qq_failure(report)
