"""qmail-smtpd: receive mail via SMTP (qmail-smtpd(8)).

The client is on descriptors 0 (read) and 1 (write), as tcpserver or a
terminal gives them; tcp-environ(5) variables describe it. This module is the
thin I/O shell around `session.Session` (the command state machine) and
`data.Blast` (the DATA filter): bounded reads with control/timeoutsmtpd
seconds for each, replies buffered and sent before each read, and the message
handed to qmail-queue (or $QMAILQUEUE) through `QQ`. A death (timeout, bare
LF, unreadable controls) sends its reply and exits 1; QUIT exits 0; the
client going away exits 1, as in qmail. The connection is a `pyqmail.net.Conn`.

TLS, as the qmail-tls patch (notqmail's smtp-tls branch), with its control files
(see pyqmail.smtpd.tls): EHLO lists STARTTLS before TLS when
control/servercert.pem is readable and $DISABLETLS is unset; STARTTLS answers
`220 ready for tls` and shakes hands within timeoutsmtpd seconds; anything the
client sent after the STARTTLS line is dropped, and the session starts over
(no HELO, MAIL or RCPT survives: RFC 3207). $SMTPS set: TLS from the first byte
(port 465). The Received line says `with ESMTPS (CIPHER encrypted)`, plus
`(cert ADDRESS)` when a client certificate in control/tlsclients allowed
relaying. A certificate that cannot be used is `454 TLS missing certificate:
REASON (#4.3.0)` and a line on descriptor 2; a failed handshake is `454 TLS
connection failed: REASON (#4.3.0)` and the end of that connection.

SMTP AUTH (RFC 4954), as the qmail-authentication patch (notqmail's smtp-auth
branch): `qmail-smtpd checkprogram subprogram...` with $SMTPAUTH set offers the
mechanisms $SMTPAUTH names (pyqmail.smtpd.auth) and runs checkprogram through the
checkpassword interface (pyqmail.auth, as qmail-popup). $FORCETLS set and not `0`:
no AUTH before TLS (538). Success: RELAYCLIENT and TCPREMOTEINFO for the session,
Received says `(USER@IP)` and `with ESMTPA` (`ESMTPSA` in TLS). Each failure is
logged with the client's IP and costs a growing delay; after control/authfailures
($AUTHFAILURES; default 3) failures the connection is closed with 421.

IPv6 (issue 18.1): an IPv6 client's address is written as the IPv6 patch's tcpserver
gives it, in the Received line `(::1)` and in the log; `box@[IPv6:ADDR]` (RFC 5321 4.1.3)
naming one of this host's IPv6 addresses is rewritten to control/localiphost, as
`box@[d.d.d.d]` is for its IPv4 addresses; relaying for IPv6 clients comes from tcpserver's
rules (`2001:db8::/32:allow,RELAYCLIENT=""`).

Checks beyond qmail's (pyqmail.smtpd.policy; docs/DESIGN.md "qmail-smtpd: where a new
check goes") run at connection, HELO/EHLO, MAIL, RCPT, DATA and after AUTH, each turned
on by its own control file or variable. control/brtlimit ($BRTLIMIT over it; absent or 0:
no limit): after that many recipients refused as unknown or bad in one session, the reply
is `421 too many invalid addresses, goodbye (#4.3.0)` and the connection ends.

Recipient validation (pyqmail.smtpd.rcptcheck): $RCPTCHECK_LOCAL (not `0`), else a nonzero
control/rcptcheck, turns on the built-in check: a local recipient (locals, virtualdomains)
that qmail-local would bounce gets `550 sorry, no mailbox here by that name (#5.1.1)`,
decided as qmail-send, qmail-lspawn and qmail-local decide (root mode: by asking
qmail-rcptcheckd); unable to decide: `451 unable to verify recipient (#4.3.0)`; relay
clients' local recipients too, remote recipients never. $RCPTCHECK names a program run with
SENDER and RECIPIENT (the RCPTCHECK patch): exit 100 is `553 sorry, no mailbox here by that
name. (#5.1.1)`, 111 `421 unable to verify recipient (#4.3.0)`, 120 or a crash `421 unable
to execute recipient check (#4.3.0)`, both ending the connection. control/validrcptto.cdb
(qmail-newvrt): `553 sorry, this recipient is not in my validrcptto list (#5.7.1)`. Neither
is asked for relay clients. Each refusal counts toward brtlimit.

qmail-spp (pyqmail.smtpd.spp): control/smtpplugins ($SPPCONFFILE) lists plugin programs
under [connection] [helo] [mail] [rcpt] [data] [auth]; each runs with SMTPHELOHOST,
SMTPMAILFROM, SMTPRCPTTO, SMTPRCPTCOUNT, SMTPRCPTCOUNTALL, SMTPRCPTHOSTSOK, SMTPAUTHUSER
and answers with qmail-spp's one-letter commands on its output (A N O E L R D S U H C P).
$NOSPP: no plugins. A plugin that cannot run, crashes or outlives $SPPTIMEOUT seconds
(default 60) is `451 qmail-spp failure: PROGRAM: WHY (#4.3.0)`.

Greeting delay (pyqmail.smtpd.greetdelay, the greetdelay patch): $SMTPD_GREETDELAY seconds
pass before the 220 line (not for $RELAYCLIENT); with $DROP_PRE_GREET, a client that talks
in that time gets `554 SMTP protocol violation` and is dropped, logged with its IP.
DNSBL (pyqmail.smtpd.dnsbl, sagredo's rbl patch): control/dnsbllist ($DNSBLLIST names
another file) lists zones asked at the first RCPT of a client that may not relay (`zone`:
TXT, 451; `-zone`: 553; `zone:text`: A record and that text, `%IP%` replaced; `+zone`:
whitelist; `=zone`: log only), answered as rblsmtpd answers; $RBLSMTPD decides first;
$DNSBLSKIP: not asked; control/dnsblfailclosed ($DNSBLFAILCLOSED): a failed lookup is
`451 temporary RBL lookup error`. A 451 ends the connection, a 553 refuses each RCPT.
HELO (pyqmail.smtpd.helo, the qregex patch): control/badhelo (regular expressions, `!`
negates; $NOBADHELO ignores it) and control/badhelonorelay (clients that may not relay),
and control/rejectforgedhelo ($REJECTFORGEDHELO): this host's name or IP literal, or
another host's IP literal, from a client elsewhere; each refuses every RCPT with `553
sorry, your HELO host name has been denied (#5.7.1)`. control/mfcheck ($MFCHECK; 2 and 3
log): at MAIL the sender's domain must have an MX, A or AAAA record: `553 sorry, your
envelope sender domain must exist (#5.7.1)`, or `451 DNS temporary failure (#4.3.0)`.
control/badrcptto (addresses and @domain): `553 sorry, mail to that recipient is not
accepted (#5.7.1)`, counted toward brtlimit. All off when their file or variable is absent.

SPF (pyqmail.smtpd.spf, Jana Saout's SPF patch): control/spfbehavior ($SPFBEHAVIOR over
it; absent or 0: off) 1 adds a `Received-SPF:` line below the Received line, 2 also answers
a DNS failure with `451 SPF lookup failure (#4.3.0)` at MAIL, 3 refuses fail, 4 softfail, 5
neutral, 6 anything but pass, with `550 EXPLANATION (#5.7.1)` at each RCPT. control/spfrules:
local mechanisms tried before the record's final `-all` (and alone without a record);
control/spfguess: the record assumed without one; control/spfexp: the explanation (the
patch's macros; default: the patch's spf.pobox.com address). $SPFRESULT is set for
qmail-queue. Clients that may relay (RELAYCLIENT, AUTH, tlsclients) are not checked.
Greylisting (pyqmail.smtpd.greylist): control/greylist `DELAY [RETRY [EXPIRY]]` (seconds;
300 172800 3024000) turns it on: a new (client /24 or /64, sender, recipient) gets `451
greylisted, try again in N seconds (#4.7.1)` at RCPT until DELAY has passed, kept in
QMAILHOME/greylist/triplets.sqlite ($GREYLISTDB), a directory the admin makes for qmaild;
control/greylistips and control/greylistdomains (client host, or SPF-passed sender domain)
and $NOGREYLIST exempt; clients that may relay are never greylisted.

SMTPUTF8 (RFC 6531; pyqmail.smtputf8): offered in EHLO when control/smtputf8 holds a number
other than 0, $SMTPUTF8 over it (set and not `0` offers, `0` does not; tcprules can set it per
client). `MAIL FROM:<...> SMTPUTF8` (with or without BODY=8BITMIME) then takes UTF-8 local parts
and domains: rcpthosts compares a recipient domain in U-label and A-label form (idna), the
Received line says `with UTF8SMTP` (`UTF8SMTPS`, `UTF8SMTPA`, `UTF8SMTPSA`: RFC 6531 3.7.3), and
the message is queued with $SMTPUTF8MAIL=1 in qmail-queue's environment, which keeps the flag
in the queue. Without the parameter (or when SMTPUTF8 is not offered) a non-ASCII address is
taken byte for byte, as qmail takes it, and the message is not flagged.

SIZE (RFC 1870): offered when control/smtpsize holds a number other than 0 ($SMTPSIZE over it,
`0`: not offered), and whenever AUTH is configured (the AUTH patch's `250 SIZE n` line). EHLO then
lists `SIZE n`, n being databytes (`SIZE 0`: no limit); `MAIL FROM:<...> SIZE=n` with n over
databytes gets `552 sorry, that message size exceeds my databytes limit (#5.3.4)` and no
transaction starts. A SIZE= that is not a number is ignored, and so is every SIZE= when SIZE is
not offered (qmail's behaviour). CHUNKING (RFC 3030; pyqmail.smtpd.bdat): offered when
control/chunking holds a number other than 0 ($CHUNKING over it); else BDAT is `502 unimplemented
(#5.5.1)`, as in qmail. `BDAT n [LAST]` is followed by exactly n bytes of
message, no dot-stuffing; CR LF is stored as LF (as after DATA), a bare LF or CR is data.
Each chunk gets `250 ok n bytes`, LAST gets DATA's reply (`250 ok TIME qp PID`, 554 hops,
552 databytes, qmail-queue's failure). A chunk past databytes gets the 552 once it is read,
and ends the transaction. BDAT without MAIL or RCPT is 503 after its chunk is read and
dropped; DATA after BDAT is `503 DATA cannot follow BDAT (#5.5.1)`; a BDAT whose size cannot
be read is `501 bad BDAT size, closing connection (#5.5.4)` and the end. BINARYMIME is not
offered. ENHANCEDSTATUSCODES (RFC 2034): offered when control/enhancedstatuscodes holds a
number other than 0, $ENHANCEDSTATUSCODES over it (`0`: not offered); after EHLO every 2xx,
4xx and 5xx reply then carries its code after the reply code (`250 2.1.0 ok`, `553 5.7.1
sorry, ... (#5.7.1)`): qmail's `(#x.y.z)`, else 2.1.0 for MAIL, 2.1.5 for RCPT, 2.0.0 or
X.0.0. Replies to HELO clients are qmail's, byte for byte.
"""

from __future__ import annotations

import os
import posix
import time

from pyqmail import control
from pyqmail import home as _home
from pyqmail import wait
from pyqmail.control import ControlError
from pyqmail.entry import program
from pyqmail.net import Conn, Gone, NetError, Timeout, TlsFailed
# Everything a session needs is imported here, not when first used: tcpserver
# imports this module once in its parent, so every connection shares it.
from pyqmail.queue.qq import QQ
from pyqmail.smtpd import greetdelay, replies
from pyqmail.smtpd.bdat import Chunks
from pyqmail.smtpd.data import END, MORE, Blast
from pyqmail.smtpd.ipme import Ipme, IpmeError
from pyqmail.smtpd import policy as _policy
from pyqmail.smtpd.auth import Exchange, Policy, SenderCheck
from pyqmail.smtpd.receive import Receive
from pyqmail.smtpd.received import Peer, safe
from pyqmail.smtputf8 import ENV_B as SMTPUTF8_ENV
from pyqmail.smtpd.session import (AUTH, BDAT, DATA, DIE, DROP, MAXHOPS, QUIT, STARTTLS, Config, Session,
                                   data_reply, scan_ulong)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable

FD_IN = 0
FD_OUT = 1
EXIT_QUIT = 0
EXIT_DEATH = 1
READ_SIZE = 65536
WRITE_SIZE = 512  # a reply at a time: a write never blocks for long after poll says it may go
LINE_MAX = 65536  # bytes kept of a command line; the rest, up to its LF, is read and dropped
DEFAULT_TIMEOUT = 1200
SERVERCERT = "control/servercert.pem"  # pyqmail.smtpd.tls reads it; here only its readability is asked
AUTH_FAILURES = 3  # failed logins in one session before the connection is closed (control/authfailures)
AUTH_DELAY = 1.0  # seconds of delay after the first failed login; doubled after each further one
AUTH_DELAY_MAX = 16.0
AUTH_CHECK_TIMEOUT = 60  # seconds the checkprogram may take; then it is killed and the reply is 454
AUTH_DELAY_ENV = b"PYQMAIL_SMTPD_AUTH_DELAY"  # test seam: AUTH_DELAY in seconds
AUTH_TIMEOUT_ENV = b"PYQMAIL_SMTPD_AUTH_TIMEOUT"  # test seam: AUTH_CHECK_TIMEOUT in seconds


# What tcpserver's parent says in its warm-up sessions (see preload): every
# command qmail-smtpd answers before DATA, none that queues anything.
WARM_SCRIPT = (b"EHLO warm.up\r\nHELO warm.up\r\nMAIL FROM:<warm@up>\r\nRCPT TO:<warm@up>\r\n"
               b"NOOP\r\nVRFY warm\r\nHELP\r\nRSET\r\nJUNK\r\nQUIT\r\n")
WARM_SESSIONS = 12  # CPython specialises a function's code after 8 calls


class Dropped(Exception):
    """A check ended the session after its reply (qmail-spp's R and D): exit 0."""


class Die(Exception):
    """End the session: send reply (if any) and exit 1."""

    def __init__(self, reply: bytes | None) -> None:
        super().__init__(reply)
        self.reply = reply


def _cert_readable() -> bool:
    """Whether STARTTLS is offered: control/servercert.pem is readable (the patch stat()s it)."""
    return os.access(SERVERCERT, os.R_OK)


class AuthRun:
    """How AUTH runs in this process: the checkprogram, the failure limit, the delay and its sleep."""

    __slots__ = ("checkprogram", "limit", "delay", "timeout", "sleep", "failures")

    def __init__(self, checkprogram: list[str], limit: int = AUTH_FAILURES, delay: float = AUTH_DELAY,
                 timeout: float = AUTH_CHECK_TIMEOUT, sleep: Callable[[float], None] = wait.sleep) -> None:
        self.checkprogram = checkprogram
        self.limit = limit
        self.delay = delay
        self.timeout = timeout
        self.sleep = sleep
        self.failures = 0

    def pause(self) -> float:
        """Sleep after the latest failure (delay, then doubled each time, at most AUTH_DELAY_MAX); return it."""
        d = min(self.delay * (1 << min(self.failures - 1, 30)), max(AUTH_DELAY_MAX, self.delay))
        if d > 0:
            self.sleep(d)
        return d


def _auth_setup(argv: list[str]) -> tuple[Policy | None, bool, AuthRun | None]:
    """Read $SMTPAUTH, $FORCETLS, control/authfailures ($AUTHFAILURES); ControlError if unreadable."""
    env = posix.environ
    force = env.get(b"FORCETLS")
    forcetls = force is not None and force != b"0"
    if len(argv) < 2:
        return None, forcetls, None  # no checkprogram: no AUTH, as the patch
    policy = Policy.from_env(env.get(b"SMTPAUTH"))
    if policy is None:
        return None, forcetls, None
    check = env.get(b"SENDERCHECK")
    if check is not None:
        locs = control.read_lines("locals") or [control.me() or ""]
        policy.sendercheck = SenderCheck.from_env(check, [d.encode("latin-1") for d in locs])
    x = env.get(b"AUTHFAILURES")
    limit = scan_ulong(x)[0] if x is not None else control.read_int("authfailures", AUTH_FAILURES)
    delay = AUTH_DELAY
    y = env.get(AUTH_DELAY_ENV)
    if y is not None:
        delay = float(y)
    z = env.get(AUTH_TIMEOUT_ENV)
    timeout = float(z) if z is not None else AUTH_CHECK_TIMEOUT
    return policy, forcetls, AuthRun(argv[1:], max(limit, 1), delay, timeout)


def _setup(argv: list[str] | None = None) -> tuple[Config, int, AuthRun | None]:
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
        env = posix.environ  # what os.environb wraps, without its Python-level calls
        recv = Receive.load(env)
        policy, forcetls, authrun = _auth_setup(argv or [])
        x = env.get(b"BRTLIMIT")
        brtlimit = scan_ulong(x)[0] if x is not None else control.read_int("brtlimit", 0)
        hooks = _policy.load(env)
        x = env.get(b"SMTPUTF8")
        utf8 = (x != b"0") if x is not None else control.read_int("smtputf8", 0) != 0
        x = env.get(b"ENHANCEDSTATUSCODES")
        esc = (x != b"0") if x is not None else control.read_int("enhancedstatuscodes", 0) != 0
        x = env.get(b"SMTPSIZE")
        size = (x != b"0") if x is not None else control.read_int("smtpsize", 0) != 0
        x = env.get(b"CHUNKING")
        chunking = (x != b"0") if x is not None else control.read_int("chunking", 0) != 0
    except (ControlError, OSError, ValueError):
        raise Die(replies.CONTROL) from None
    cfg = Config(greeting.encode("latin-1"), Peer.from_env(env),
                 liphost=None if liphost is None else liphost.encode("latin-1"),
                 rcpthosts=recv.rcpthosts, badmailfrom=recv.badmailfrom,
                 databytes=recv.databytes, relayclient=recv.relayclient, is_local=Ipme(),
                 starttls=None if b"DISABLETLS" in env else _cert_readable,
                 auth=policy, forcetls=forcetls, hooks=hooks, brtlimit=brtlimit, setenv=_setenv,
                 smtputf8=utf8, esc=esc, size=size, chunking=chunking)
    return cfg, timeout, authrun


def _setenv(name: bytes, value: bytes) -> None:
    """Set name in the environment qmail-queue and its filters get."""
    os.environb[name] = value


def _start_message(session: Session) -> QQ | None:
    """Start qmail-queue for the message after DATA or the first BDAT (None: it cannot run).

    The message begins with the Received line and the checks' lines.
    """
    if session.utf8:  # the flag qmail-queue keeps in todo/N (pyqmail.smtputf8)
        os.environb[SMTPUTF8_ENV] = b"1"
    elif SMTPUTF8_ENV in os.environb:
        del os.environb[SMTPUTF8_ENV]  # set by whoever started us: not this message's word
    try:
        q = QQ(network=True)
    except OSError:
        return None
    q.write(session.received(int(time.time())))
    if session.headers:  # the checks' lines (Received-SPF:, a plugin's H...), after ours as qmail-spp
        q.write(b"".join(session.headers))
    return q


def _abandon(q: QQ) -> None:
    """Let qmail-queue go without queueing anything (the client left or broke the protocol)."""
    q.fail()
    try:
        q.close(b"", [])
    except OSError:
        pass  # safe: abandoned (no envelope end), nothing is queued; the caller's error, if any, goes on


def _data(session: Session, conn: Conn) -> None:
    """Receive one message after DATA and queue it; the reply goes to conn."""
    q = _start_message(session)
    if q is None:
        conn.put(replies.QQT_FAILURE)
        return
    qp = max(q.pid, 0)
    conn.put(replies.GO_AHEAD)
    blast = Blast()
    limit = session.cfg.databytes
    overflow = False
    data = conn.pending()
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
                conn.unread(data[used:])
                break
            if status != MORE:
                raise Die(replies.STRAY_NEWLINE)
            data = conn.read()
    except BaseException:
        _abandon(q)  # the client is gone or broke the protocol: nothing is queued
        raise
    hops = blast.hops >= MAXHOPS
    if hops:
        q.fail()
    report = q.close(session.mailfrom, session.recipients())
    session.message_done()
    conn.put(data_reply(report, hops, overflow, qp, int(time.time())))


class Chunked:
    """An open BDAT transaction (RFC 3030): qmail-queue running, the chunks' filter, databytes passed."""

    __slots__ = ("q", "chunks", "overflow", "open")

    def __init__(self, q: QQ) -> None:
        self.q = q
        self.chunks = Chunks()
        self.overflow = False
        self.open = True

    def abandon(self) -> None:
        """Let qmail-queue go, nothing queued, unless that was done already."""
        if self.open:
            self.open = False
            _abandon(self.q)


def _skip(conn: Conn, size: int) -> None:
    """Read and drop size bytes of chunk data."""
    while size:
        size -= len(conn.chunk(min(size, READ_SIZE)))


def _bdat(session: Session, conn: Conn, reply: bytes, tx: Chunked | None) -> tuple[bytes, Chunked | None]:
    """Read the chunk after a BDAT line into the message (or drop it after a refusal).

    reply: Session's answer so far (a refusal, or the checks' text to send first).
    Returns the whole reply and the transaction still open. The chunk streams to
    qmail-queue READ_SIZE bytes at a time; past databytes the rest is read and dropped.
    """
    size, last, take = session.chunk
    if not take:
        _skip(conn, size)
        return reply, tx
    if tx is None:
        q = _start_message(session)
        if q is None:
            _skip(conn, size)
            session.bdat_done()
            return reply + replies.QQT_FAILURE, None
        tx = Chunked(q)
    q, chunks, limit = tx.q, tx.chunks, session.cfg.databytes
    try:
        left = size
        while left or last:
            if left:
                data = conn.chunk(min(left, READ_SIZE))
                left -= len(data)
                out = chunks.feed(data)
            else:
                out = chunks.end()
                last = False
            if tx.overflow:
                continue
            if limit and chunks.size > limit:
                tx.overflow = True
                q.fail()
            else:
                q.write(out)
    except BaseException:
        tx.abandon()
        raise
    if not (session.chunk[1] or tx.overflow):
        return reply + replies.chunk_ok(size), tx
    hops = chunks.hops >= MAXHOPS
    if hops:
        q.fail()
    qp = max(q.pid, 0)
    tx.open = False
    report = q.close(session.mailfrom, session.recipients())
    session.bdat_done()
    return reply + data_reply(report, hops, tx.overflow, qp, int(time.time())), None


class _Replies(Conn):
    """The client's connection; every reply goes through Session.enhance (RFC 2034, after EHLO)."""

    __slots__ = ("session",)
    session: Session | None

    def put(self, data: bytes) -> None:
        session = self.session
        Conn.put(self, data if session is None else session.enhance(data))


def _log(text: bytes) -> None:
    """Write one line to descriptor 2 (the service's log), in one write."""
    try:
        os.write(2, b"qmail-smtpd: " + text + b"\n")
    except OSError:
        pass  # safe: no log to write to; the client has had its 454 reply


def _start_tls(session: Session, conn: Conn, smtps: bool) -> None:
    """Answer STARTTLS (or begin an SMTPS session): 454 or 220, the handshake, a fresh session.

    A certificate that cannot be used is a 454 (for SMTPS, the end of the
    connection); a failed handshake is Die with the patch's 454.
    """
    from pyqmail.smtpd import tls

    try:
        ciphers = tls.ciphers(posix.environ)
        clients = tls.clients()
        ctx = tls.server_context(ciphers, bool(clients))
    except tls.Unusable as e:
        _log(b"TLS unusable: %s: %s: %s" % (SERVERCERT.encode(), e.what.encode(),
                                            e.why.encode("utf-8", "replace")))
        reply = replies.tls_failed(e.what.encode(), e.why.encode("utf-8", "replace"))
        if smtps:
            raise Die(reply) from None
        conn.pending()  # the patch's flush_io: what was pipelined after STARTTLS is dropped
        conn.put(reply)
        return
    if not smtps:
        conn.put(replies.READY_FOR_TLS)
    try:
        conn.starttls(ctx)
    except TlsFailed as e:
        raise Die(replies.tls_failed(b"connection failed", e.reason.encode("utf-8", "replace"))) from None
    assert conn.tls is not None
    obj = conn.tls

    def verify() -> tuple[bytes | None, bytes | None]:
        return _verify_client(obj, clients)

    session.tls_started(tls.cipher_name(obj), verify if ctx.verify_mode != 0 else None)


def _verify_client(obj: ssl.SSLObject, clients: frozenset[bytes]) -> tuple[bytes | None, bytes | None]:
    """Return (the certificate's address, None) if tlsclients lists it, else (None, why)."""
    from pyqmail.smtpd import tls

    email = tls.cert_email(obj)
    if email is None:
        return None, None  # no certificate (one that does not verify fails the handshake)
    if not email:
        return None, b"contains no email address"
    if email not in clients:
        return None, b"email address not in my list of tlsclients"
    return email, None  # the session grants relaying (RELAYCLIENT in the environment too, as the patch)


def _log_auth_failure(session: Session, mech: bytes, user: bytes, why: bytes) -> None:
    peer = session.cfg.peer
    _log(b"AUTH failed: ip " + safe(peer.remoteip) + b" mechanism " + safe(mech[:20]) + b" user "
         + safe(user[:100]) + b": " + why)


def _auth(session: Session, conn: Conn, run: AuthRun) -> None:
    """Run one AUTH exchange and the checkprogram; reply; Die after the session's last allowed failure."""
    from pyqmail import auth as checkpw

    # The patch's <PID.TIME@HOST>; a reused tcpserver worker serves many sessions under one pid,
    # so from its second session on the challenge carries the session's number too (a
    # challenge must never repeat: CRAM-MD5's answer to one would be good for the other).
    n = _sessions[0]
    who = b"%d" % os.getpid() if n <= 1 else b"%d.%d" % (os.getpid(), n)
    stamp = b"<%s.%d@" % (who, int(time.time())) + session.cfg.greeting.split(b" ", 1)[0] + b">"
    ex = Exchange(session.cfg.auth, session.auth_arg, stamp)  # type: ignore[arg-type]
    while not ex.done:
        conn.put(ex.prompt)
        ex.feed(conn.line(LINE_MAX))
    if ex.reply:
        if ex.reply is not replies.AUTH_TYPE:
            _log_auth_failure(session, ex.mech, ex.user, ex.reply.rstrip())
        conn.put(ex.reply)
        return
    conn.flush()
    try:
        null = os.open(os.devnull, os.O_RDWR)
    except OSError:
        conn.put(replies.auth_trouble(b"fork"))
        return
    try:
        code = checkpw.check(run.checkprogram, ex.user, ex.secret, ex.challenge, {0: null, 1: null, 2: 2},
                             run.timeout)
    except checkpw.Trouble as e:
        _log(b"AUTH unable to run checkprogram: " + e.what.encode() + b": " + e.why.encode("utf-8", "replace"))
        conn.put(replies.auth_trouble(e.what.encode()))
        return
    finally:
        os.close(null)
    if code == checkpw.ACCEPTED:
        reply, step = session.authenticated(ex.user)  # RELAYCLIENT in the environment too, as the patch
        conn.put(reply)
        if session.authuser is None:  # an auth check refused the login
            _log(b"AUTH refused by a check: ip " + safe(session.cfg.peer.remoteip) + b" user "
                 + safe(ex.user[:100]))
            if step == DROP:
                raise Dropped
            return
        os.environb[b"TCPREMOTEINFO"] = ex.user
        _log(b"AUTH ok: ip " + safe(session.cfg.peer.remoteip) + b" user " + safe(ex.user[:100]))
        return
    if code == checkpw.TEMPORARY or code < 0:
        why = b"checkprogram hung" if code == checkpw.HUNG else (
            b"checkprogram killed by signal %d" % -code if code < 0 else b"temporary failure (111)")
        _log_auth_failure(session, ex.mech, ex.user, why)
        conn.put(replies.AUTH_TEMPORARY if code == checkpw.TEMPORARY else replies.AUTH_CHILD)
        return
    run.failures += 1
    _log_auth_failure(session, ex.mech, ex.user, b"refused (exit %d), failure %d of %d" % (code, run.failures,
                                                                                           run.limit))
    run.pause()
    if run.failures >= run.limit:
        raise Die(replies.AUTH_TOO_MANY)
    conn.put(replies.AUTH_FAILED)


def serve(conn: Conn, session: Session, smtps: bool = False, authrun: AuthRun | None = None,
          greet: tuple[float, bool] = (0, False)) -> int:
    """Run the conversation until QUIT (0) or a death (1); greet: $SMTPD_GREETDELAY, $DROP_PRE_GREET."""
    death: bytes | None
    chunked: Chunked | None = None
    if isinstance(conn, _Replies):
        conn.session = session
    try:
        if smtps:
            _start_tls(session, conn, True)
        if greet[0]:
            early = greetdelay.wait(conn, greet[0], greet[1], session.cfg.peer.remoteip)
            if early is not None:
                raise Die(early)
        reply, step = session.connect()
        conn.put(reply)
        while True:
            if step == DROP:
                raise Dropped
            reply, step = session.command(conn.line(LINE_MAX))
            if step == BDAT:
                reply, chunked = _bdat(session, conn, reply, chunked)
            elif chunked is not None and not session.bdat:  # MAIL, RSET, HELO, EHLO ended it
                chunked.abandon()
                chunked = None
            conn.put(reply)
            if step == QUIT:
                conn.flush()
                conn.close_tls()
                return EXIT_QUIT
            if step == DATA:
                _data(session, conn)
            elif step == STARTTLS:
                _start_tls(session, conn, False)
            elif step == AUTH:
                if authrun is None:
                    conn.put(replies.UNIMPLEMENTED)
                else:
                    _auth(session, conn, authrun)
            elif step == DIE:
                raise Die(b"")  # the reply (brtlimit's 421) is queued: sent before the end
            if chunked is not None and not session.bdat:  # STARTTLS started over
                chunked.abandon()
                chunked = None
    except Dropped:
        try:
            conn.flush()
        except NetError:
            pass  # safe: the client is gone; the check ended the session anyway
        return EXIT_QUIT
    except Die as e:
        death = e.reply
    except Timeout as e:
        death = replies.TIMEOUT if e.reading else None
    except (Gone, NetError):
        death = None
    except ControlError:
        death = replies.CONTROL
    except MemoryError:
        death = replies.NOMEM
    except IpmeError:
        death = replies.IPME
    finally:
        if chunked is not None:  # QUIT, a drop or a death inside a BDAT transaction: nothing is queued
            chunked.abandon()
    if death is not None:
        conn.put(death)
        try:
            conn.flush()
        except NetError:
            pass  # safe: the client is gone; we exit 1 anyway
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
            cfg, timeout, _ = _setup()
        except Die:
            return  # the children will say so
        mine, client = socket.socketpair()
        with mine, client:
            client.sendall(WARM_SCRIPT)
            client.shutdown(socket.SHUT_WR)
            serve(_conn(mine.fileno(), mine.fileno(), timeout), Session(cfg))
    _preload_queue()
    if cfg.starttls is not None and cfg.starttls():
        # STARTTLS is offered: import ssl here, once, and let OpenSSL set itself up (its first
        # context loads its providers), so that no child pays for it (35 ms, and pages of its
        # own) at every STARTTLS. Without a certificate, or with $DISABLETLS, nothing is loaded.
        import ssl

        from pyqmail.smtpd import tls  # noqa: F401

        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)


def _preload_queue() -> None:
    """Import the module of the qmail-queue program each message is given to, if it is one of ours.

    spawn imports a stub's module in the process that starts it, to share it with
    every later child; here that process is the connection's own qmail-smtpd, which
    starts one qmail-queue and exits, so without this each connection unmarshals
    the module (and its imports) again: 150 page faults and a millisecond measured.
    """
    from pyqmail import spawn
    from pyqmail.queue.qq import queue_program

    try:
        stub = spawn.read_stub(queue_program())
        if stub is not None:
            __import__(stub.module, fromlist=["main"])
    except Exception:  # noqa: BLE001 - the child imports it again and reports a failure as exec would
        pass


def _conn(fd_in: int, fd_out: int, timeout: int) -> _Replies:
    conn = _Replies(fd_in, fd_out, timeout, read_size=READ_SIZE, write_size=WRITE_SIZE)
    conn.session = None
    return conn


# tcpserver may run main again in the same process for its next connection (a reused worker,
# issue 17): main keeps nothing between sessions but this count, and sets up each from the
# environment and the control files as a new process would. Whatever a session leaves in
# os.environ (SPFRESULT, RELAYCLIENT after AUTH...) is tcpserver's to reset.
REUSABLE = True
_sessions = [0]  # sessions this process has begun (the AUTH challenge's uniqueness)


@program("qmail-smtpd", crash=EXIT_DEATH)
def main(argv: list[str]) -> int:
    """Talk SMTP on descriptors 0 and 1 until QUIT or a death."""
    _sessions[0] += 1
    try:
        cfg, timeout, authrun = _setup(argv)
    except Die as e:
        conn = _conn(FD_IN, FD_OUT, DEFAULT_TIMEOUT)
        conn.put(e.reply or b"")
        try:
            conn.flush()
        except NetError:
            pass  # safe: the client is gone; we exit 1 anyway
        return EXIT_DEATH
    return serve(_conn(FD_IN, FD_OUT, timeout), Session(cfg), b"SMTPS" in posix.environ, authrun,
                 greetdelay.settings(posix.environ))  # read here: tcpserver's warm-up sessions never wait
