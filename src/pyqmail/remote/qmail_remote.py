"""qmail-remote: send mail via SMTP (qmail-remote(8)).

    qmail-remote host sender recip [recip ...]

The message is on descriptor 0. The results go to descriptor 1: a report
per recipient (r, h or s), then a message report (K, Z or D), each a letter,
a text and a NUL. The exit code is always 0; a crash is a Z report.

Routes come from control/smtproutes, else DNS (pyqmail.remote.mx: the
resolver honours $DNSCACHEIP). Hosts that keep timing out are skipped for
a while through queue/lock/tcpto. Extension: control/outgoingip, if set,
is the local address connections are made from.

IPv6 (issue 18.1): a host's AAAA and A addresses are tried IPv6 first, the families
alternating (pyqmail.remote.mx); an IPv6 attempt that has an IPv4 address of the same host
after it waits at most FALLBACK_DELAY (2) seconds before that one is tried (RFC 8305's
connection attempt delay at its longest, tried one after the other, not raced), and such a
cut-short attempt is not counted as a timeout. ``[IPv6:addr]`` is a literal host (also in
control/smtproutes: ``domain:[IPv6:::1]:2525``). control/outgoingip6 is the local address of
IPv6 connections, as control/outgoingip is of IPv4 ones. IPv6 hosts that time out are kept
in queue/lock/tcpto6 (pyqmail.remote.tcpto). This host's IPv6 addresses count for the
best-MX check, as its IPv4 ones do.

TLS, as the qmail-tls patch's qmail-remote, plus DANE and MTA-STS (pyqmail.remote.tls, dane,
mtasts): EHLO, then STARTTLS whenever the server offers it (HELO when EHLO is refused);
control/tlshosts/FQDN.pem makes TLS and a certificate verifying against that CA file (with
FQDN's name) required, control/notlshosts/FQDN forbids TLS to FQDN (qmail 1.03's HELO
conversation), control/tlshosts/exhaustivelist forbids opportunistic TLS to every other host;
an smtproutes port 465 means TLS from the first byte. DNSSEC-authenticated TLSA records at
_PORT._tcp.FQDN make TLS and their match required (DANE); an MTA-STS policy in enforce mode
limits the MX hosts to its patterns and requires TLS with a certificate valid for the MX name.
A failed handshake defers the message (Z), as in the patch. Every message report made after
a handshake ends with a TLS line (smtpclient.tls_note). Test seams: $PYQMAIL_SMTP_PORT (the
port of MX deliveries, 25) and $PYQMAIL_MTASTS_PORT (the policy's HTTPS port, 443).

SMTP AUTH to a smarthost (RFC 4954; pyqmail.remote.auth). A control/smtproutes line may end in
credentials, in the qmail-remote-auth patch's form or the qmail-authentication patch's:

    :smarthost.example.net:587 user password
    :smarthost.example.net:587|user|password

control/authsenders routes by envelope sender (the qmail-authentication patch's file, read before
smtproutes): sender[:relay[:port]] and credentials, the sender key being the whole address,
@domain, .domain (subdomains) or empty (every sender, bounces included); an empty relay keeps the
host's usual route, and its credentials are used only when that route is a relay smtproutes
names: never with an MX found in DNS, which anyone's domain can name. With credentials qmail-remote authenticates after EHLO with the first of
CRAM-MD5, PLAIN, LOGIN the server offers (CRAM-MD5 first: a man in the middle of unverified TLS
learns only a digest). Credentials go only inside TLS: without it the message is deferred
("... sent only inside TLS"), unless the user is written with a leading '-' (removed before
use). A server offering none of the three defers the message; a 5xx reply to AUTH (535) is a
permanent failure (D) with the server's text, any other refusal (454) a temporary one (Z).
qmail-remote reads these files as qmailr: once they hold passwords, make them owned by qmailr,
mode 600, readable by no other user (qmail doctor checks it).

SMTPUTF8 (RFC 6531; pyqmail.smtputf8). Internationalised domains are looked up in DNS, matched
against control/smtproutes and sent to a peer without SMTPUTF8 as A-labels (xn--..., the idna
library). A message needs SMTPUTF8 when an address has a non-ASCII UTF-8 local part or domain,
or its header holds UTF-8 (RFC 6532); it is sent with `MAIL FROM:<...> SMTPUTF8`, addresses as
written (UTF-8 local parts unquoted), only to a peer whose EHLO reply offers SMTPUTF8. A peer
that does not offer it (or the HELO conversation of control/notlshosts) gets A-label domains,
and an address whose local part is UTF-8 is not sent to it: a recipient's is a permanent
failure of that recipient, the sender's of the message, each with the text `non-ASCII addresses
are not permitted for that recipient (RFC 6531, 553 5.6.7). (#5.6.7)` (no downgrade: RFC 6531
forbids changing the address). Local parts of legacy 8-bit bytes that are not UTF-8, and 8-bit
headers that are not UTF-8, go as qmail sends them. The message's SMTPUTF8 flag in the queue is
not visible here (info/N is qmails' and qmail-rspawn's protocol has no room): what needs the
flag shows in the addresses or the header.

SIZE (RFC 1870): to a server whose EHLO lists SIZE, MAIL carries `SIZE=n`, n being the bytes
the message makes on the wire (line ends as CR LF, without the dots added for stuffing), when
the message on descriptor 0 is a file (as qmail-rspawn gives it; from a pipe the size is not
known and no SIZE= is sent). A 5xx at MAIL (552: too big for the server) is a permanent failure.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import ssl
import stat
import time
from dataclasses import dataclass, field

from pyqmail import control, net, smtputf8
from pyqmail import home as _home
from pyqmail.entry import program
from pyqmail.remote import auth, dane, mtasts, mx, smtproutes, tcpto, tls
from pyqmail.remote import smtpclient as sc
from pyqmail.smtpd.ipme import IpmeError

FD_MESSAGE = 0
FD_REPORT = 1
DEFAULT_TIMEOUT_CONNECT = 60
DEFAULT_TIMEOUT_REMOTE = 1200
PREF_NONE = 100000
PREF_RELAY = 300000
PREF_ALIASES = 500000
TCPTO_PATH = "queue/lock/tcpto"
TCPTO6_PATH = "queue/lock/tcpto6"
FALLBACK_DELAY = 2  # seconds an IPv6 attempt gets before the same host's IPv4 address is tried
CHUNK = 65536
SMTPS_PORT = 465
X509_V_ERR_HOSTNAME_MISMATCH = 62


class _Dropped(Exception):
    """The SMTP connection failed or timed out."""


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        pass  # qmail: if the report cannot be written, just exit 0


_crashes = 0  # deliveries of this process that ended in the crash report (a worker of qmail-rspawn retires)
_served = 0  # deliveries this process began before the present one (a worker's earlier ones; 0 in a child)


def _on_crash(reason: str) -> None:
    global _crashes
    _crashes += 1
    _write_all(FD_REPORT, sc.CRASH + b"\0")


def worker_reset() -> bool:
    """Make this module ready for another delivery in the same process; return False if it must not serve one.

    qmail-rspawn's workers (pyqmail.remote.qmail_rspawn) call it after each delivery. Every
    delivery reads its control files, makes its resolver, TLS contexts and tcpto tables afresh
    and closes its sockets: nothing of one delivery is kept in this module but the crash count
    and the count of deliveries (it varies the MX choice and the tcpto back-off, as a new pid did).
    x509verify keeps the libcrypto handle it loaded (code, not data). A delivery that crashed
    may have left anything half done: the worker exits.
    """
    return _crashes == 0


class Smtp:
    """The SMTP conversation on one connection (pyqmail.net): qmail's timeout on every read and write."""

    def __init__(self, sock: socket.socket, timeout: int) -> None:
        self.sock = sock
        self.conn = net.Conn(sock.fileno(), sock.fileno(), timeout)
        self.text = b""
        self.critical = False  # the final dot is sent: a dropped connection may duplicate
        self.why = b""  # a TLS error that ended the connection
        self.tls_note = b""  # the report's TLS line once TLS is up

    def _dropped(self, e: net.NetError) -> _Dropped:
        err = e.error if isinstance(e, net.Gone) else None
        # An SSLEOFError is the peer closing without close_notify: a dropped connection, as in plain text.
        if isinstance(err, ssl.SSLError) and not isinstance(err, ssl.SSLEOFError):
            self.why = net.reason(err).encode("latin-1", "replace")
        return _Dropped()

    def send(self, data: bytes) -> None:
        """Send all of data, or raise _Dropped."""
        self.conn.put(data)
        try:
            self.conn.flush()
        except net.NetError as e:
            raise self._dropped(e) from e

    def starttls(self, ctx: ssl.SSLContext, name: str | None) -> None:
        """Shake hands on this connection (bytes read ahead are dropped: RFC 3207 section 4.2); net.TlsFailed."""
        self.conn.starttls(ctx, server_side=False, server_hostname=name or None)

    def reply(self) -> int:
        """Read one reply; return its code and keep its text, or raise _Dropped."""
        rep = sc.Reply()
        try:
            while True:
                data = self.conn.chunk(CHUNK)
                used = rep.feed(data)
                if rep.done:
                    if used < len(data):
                        self.conn.unread(data[used:])
                    self.text = bytes(rep.text)
                    return rep.code
        except net.NetError as e:
            raise self._dropped(e) from e

    def command(self, line: bytes) -> int:
        """Send a command line and return the reply's code."""
        self.send(line + b"\r\n")
        return self.reply()


def _ready(sock: socket.socket, write: bool, timeout: int) -> bool:
    """Wait up to timeout seconds for sock to be writable (or readable); return whether it is."""
    p = select.poll()
    p.register(sock.fileno(), select.POLLOUT if write else select.POLLIN)
    return bool(p.poll(max(timeout, 0) * 1000))


def _quit(conn: Smtp, partner: bytes, what: tuple[bytes, bytes]) -> bytes:
    conn.send(b"QUIT\r\n")  # waiting for the answer is "just too ridiculous" (qmail)
    return sc.final(what, partner, conn.text) + conn.tls_note


@dataclass
class Utf8:
    """A message that needs SMTPUTF8 (RFC 6531): its addresses as sent with SMTPUTF8.

    sender_ok and recips_ok say whether an address has an ASCII form for a peer
    without SMTPUTF8 (smtp()'s sender and recips); a UTF-8 local part has none.
    """

    sender: bytes
    recips: list[bytes]
    sender_ok: bool
    recips_ok: list[bool]


@dataclass
class Plan:
    """What TLS a connection must have (decided before connecting; see plan())."""

    use_tls: bool = True  # False: no TLS at all, qmail 1.03's HELO conversation
    smtps: bool = False  # TLS from the first byte (smtproutes port 465)
    required: bytes = b""  # why TLS is required (a report's words), empty when it is opportunistic
    name: str = ""  # the host's name: SNI and the name certificates are checked against
    cafile: str | None = None  # control/tlshosts/NAME.pem
    tlsa: list[dane.Tlsa] = field(default_factory=list)  # authenticated TLSA records (usable or not)
    sts: mtasts.Policy | None = None  # an MTA-STS policy in enforce or testing mode
    settings: tls.Settings = field(default_factory=lambda: tls.Settings(None, None))


def _ehlo_keywords(text: bytes) -> set[bytes]:
    """Return the upper-cased keywords of an EHLO reply's text (its lines after the first)."""
    return {line[4:].split(b" ", 1)[0].upper() for line in text.split(b"\n")[1:] if len(line) > 4}


def _verify_failed(conn: Smtp, partner: bytes, text: bytes) -> bytes:
    conn.send(b"QUIT\r\n")
    return sc.tls_failed(text, partner, True)


def _start_tls(conn: Smtp, plan: Plan, partner: bytes) -> bytes | None:
    """Shake hands and check the peer as plan says; return a report if the message must wait."""
    name = plan.name.encode("latin-1")
    try:
        if plan.cafile is not None:
            ctx = tls.context(plan.settings, cafile=plan.cafile, hostname_check=bool(plan.name))
        elif plan.sts is not None and plan.sts.mode == "enforce" and not plan.tlsa:
            ctx = tls.context(plan.settings, system_cas=True, hostname_check=True)
        else:
            ctx = tls.context(plan.settings)
    except (ssl.SSLError, OSError) as e:
        what = plan.cafile or "CA certificates"
        err = tls.reason(e) if isinstance(e, ssl.SSLError) else (e.strerror or str(e))
        return sc.tls_failed(b"TLS unable to load " + what.encode("latin-1") + b": " + err.encode("latin-1"),
                             partner, False)
    try:
        conn.starttls(ctx, plan.name or None)
    except net.TlsFailed as e:
        v = e.error
        if not isinstance(v, ssl.SSLCertVerificationError):
            return sc.tls_failed(sc.tls_connect(e.reason.encode("latin-1", "replace")), partner, True)
        msg = str(v.verify_message).encode("latin-1", "replace")
        if v.verify_code == X509_V_ERR_HOSTNAME_MISMATCH:
            text = sc.tls_unverified_name(name)
        elif plan.cafile is not None:
            text = sc.tls_unverified_ca(plan.cafile.encode("latin-1"), msg)
        else:
            text = sc.tls_unverified(name, b"MTA-STS", msg)
        return sc.tls_failed(text, partner, True)
    except net.NetError:
        raise _Dropped() from None  # what was queued before the handshake could not be sent
    session = conn.conn.tls
    assert session is not None
    verified: bytes | None = None
    testing: bytes | None = None
    if plan.cafile is not None:
        verified = b"control/tlshosts/" + name + b".pem"
    elif plan.tlsa:
        if any(r.usable for r in plan.tlsa):
            how, why = dane.check(plan.tlsa, tls.peer_chain(session), [plan.name])
            if how is None:
                return _verify_failed(conn, partner, sc.tls_unverified(name, b"DANE", why.encode("latin-1")))
            verified = how.encode("ascii")
    elif plan.sts is not None and plan.sts.mode == "enforce":
        verified = b"MTA-STS"
    elif plan.sts is not None:
        from pyqmail.remote import x509verify

        why_not = x509verify.verify(tls.peer_chain(session), [], [plan.name], default_paths=True)
        notes = [] if plan.sts.allows(plan.name) else [name + b" is not an MX host of the policy"]
        if why_not is not None:
            notes.append(b"certificate not valid for " + name + b": " + why_not.encode("latin-1"))
        testing = b"; ".join(notes) or None
    conn.tls_note = sc.tls_note(tls.describe(session).encode("latin-1"), verified, testing)
    return None


def _blast(conn: Smtp, msgfd: int) -> bytes | None:
    """Send the message and the final dot; return a report if the message cannot be sent."""
    stuffer = sc.Stuffer()
    buf = bytearray()
    while True:
        try:
            chunk = os.read(msgfd, CHUNK)
        except OSError:
            return sc.READ
        if not chunk:
            break
        buf += stuffer.feed(chunk)
        if len(buf) >= CHUNK:
            conn.send(bytes(buf))
            buf.clear()
    buf += stuffer.end()
    if not stuffer.complete():
        return sc.PARTIAL_LINE
    buf += b".\r\n"
    conn.critical = True
    conn.send(bytes(buf))
    return None


def _hello(conn: Smtp, partner: bytes, helohost: bytes, plan: Plan) -> bytes | None:
    """Say EHLO (or HELO) and set up TLS as plan says; return a report if the message must wait."""
    if not plan.use_tls:
        return None if conn.command(b"HELO " + helohost) == 250 else _quit(conn, partner, sc.HELO_REJECTED)
    code = 250
    if not plan.smtps:
        code = conn.command(b"EHLO " + helohost)
        if code == 250 and b"STARTTLS" in _ehlo_keywords(conn.text):
            if conn.command(b"STARTTLS") == 220:
                conn.text = b""
                failed = _start_tls(conn, plan, partner)
                if failed is not None:
                    return failed
                code = conn.command(b"EHLO " + helohost)
            elif plan.required:
                conn.send(b"QUIT\r\n")
                return sc.tls_failed(sc.starttls_rejected(plan.required), partner, False) + sc.said(conn.text)
            else:
                conn.text = b""
        elif plan.required:
            conn.send(b"QUIT\r\n")
            return sc.tls_failed(sc.no_tls(plan.required), partner, False)
    else:
        code = conn.command(b"EHLO " + helohost)
    if code != 250 and conn.command(b"HELO " + helohost) != 250:
        return _quit(conn, partner, sc.HELO_REJECTED)
    return None


def _login(conn: Smtp, partner: bytes, login: auth.Credentials) -> bytes | None:
    """Authenticate after EHLO (conn.text is its reply); return a report if the message must not go on."""
    if conn.conn.tls is None and not login.plaintext_ok:
        conn.text = b""
        return _quit(conn, partner, sc.AUTH_NO_TLS)
    mechs = auth.choose(auth.mechanisms(conn.text))
    if not mechs:
        conn.text = b""
        return _quit(conn, partner, sc.AUTH_NONE_OFFERED)
    code, mech = 0, mechs[0]
    for mech in mechs:
        if mech == auth.PLAIN:
            code = conn.command(b"AUTH PLAIN " + auth.plain(login))
        else:
            code = conn.command(b"AUTH " + mech)
            if code == 504:  # offered but refused: the next mechanism
                continue
            if code == 334 and mech == auth.CRAM:
                response = auth.cram_md5(login, conn.text[4:])
                code = conn.command(response if response is not None else b"*")
            elif code == 334:
                code = conn.command(auth.b64(login.user))
                if code == 334:
                    code = conn.command(auth.b64(login.password))
        break
    if code == 235:
        conn.text = b""
        return None
    return _quit(conn, partner, sc.auth_rejected(code, mech))


def smtp(conn: Smtp, partner: bytes, helohost: bytes, sender: bytes, recips: list[bytes], msgfd: int,
         plan: Plan | None = None, login: auth.Credentials | None = None, utf8: Utf8 | None = None) -> bytes:
    """Run the SMTP conversation; return every report, NUL-terminated.

    utf8: the message needs SMTPUTF8; sent with it if the peer offers it, else
    its addresses without an ASCII form fail (5.6.7).
    """
    out = bytearray()
    plan = plan if plan is not None else Plan(use_tls=False)

    def last(report: bytes) -> bytes:
        return bytes(out) + report + b"\0"

    try:
        if plan.smtps:
            failed = _start_tls(conn, plan, partner)
            if failed is not None:
                return last(failed)
        if conn.reply() != 220:
            return last(_quit(conn, partner, sc.GREETING_FAILED))
        failed = _hello(conn, partner, helohost, plan)
        keywords = _ehlo_keywords(conn.text) if failed is None else set()
        use_utf8 = utf8 is not None and b"SMTPUTF8" in keywords
        if failed is None and login is not None:
            failed = _login(conn, partner, login)
        if failed is not None:
            return last(failed)
        params = b""
        refuse = [False] * len(recips)
        if use_utf8:
            assert utf8 is not None
            sender, recips, params = utf8.sender, utf8.recips, b" SMTPUTF8"
        elif utf8 is not None:
            if not utf8.sender_ok:
                conn.send(b"QUIT\r\n")
                return last(sc.no_smtputf8_sender(partner))
            refuse = [not ok for ok in utf8.recips_ok]
        if b"SIZE" in keywords:  # RFC 1870: a server that cannot take it says 552 now, a permanent D
            size = message_size(msgfd)
            if size is not None:
                params += b" SIZE=%d" % size
        code = conn.command(b"MAIL FROM:<" + sender + b">" + params)
        if code >= 500:
            return last(_quit(conn, partner, sc.SENDER_REJECTED_PERM))
        if code >= 400:
            return last(_quit(conn, partner, sc.SENDER_REJECTED_TEMP))
        bother = False
        for recip, no in zip(recips, refuse):
            if no:
                out += sc.no_smtputf8_recipient(partner) + b"\0"
                continue
            code = conn.command(b"RCPT TO:<" + recip + b">")
            out += sc.recipient(code, partner, conn.text) + b"\0"
            if code < 400:
                bother = True
            conn.text = b""
        if not bother:
            return last(_quit(conn, partner, sc.GIVING_UP))
        code = conn.command(b"DATA")
        if code >= 500:
            return last(_quit(conn, partner, sc.DATA_FAILED_PERM))
        if code >= 400:
            return last(_quit(conn, partner, sc.DATA_FAILED_TEMP))
        failed = _blast(conn, msgfd)
        if failed is not None:
            return last(failed)
        code = conn.reply()
        conn.critical = False
        if code >= 500:
            return last(_quit(conn, partner, sc.AFTER_DATA_PERM))
        if code >= 400:
            return last(_quit(conn, partner, sc.AFTER_DATA_TEMP))
        return last(_quit(conn, partner, sc.ACCEPTED))
    except _Dropped:
        return last(sc.dropped(partner, conn.critical, conn.why))


def message_size(fd: int) -> int | None:
    """Return the bytes the message on fd makes on the wire; None if fd is no file.

    Every line end (LF, CR LF or a bare CR: smtpclient.Stuffer) goes as CR LF, so each LF and
    each CR adds a byte and each CR LF pair takes back two. RFC 1870's size leaves out the dots
    added for dot-stuffing and the final dot. Read with pread: fd's offset stays where it is.
    """
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        pos = start = os.lseek(fd, 0, os.SEEK_CUR)
        extra = 0
        cr = False  # the previous chunk ended in CR
        while True:
            chunk = os.pread(fd, CHUNK, pos)
            if not chunk:
                break
            crs = chunk.count(b"\r")  # usually none: the queue keeps LF line ends
            extra += chunk.count(b"\n") + (crs - 2 * chunk.count(b"\r\n") if crs else 0)
            if cr and chunk[:1] == b"\n":
                extra -= 2
            cr = chunk.endswith(b"\r")
            pos += len(chunk)
    except OSError:
        return None  # the message read itself will say what is wrong
    return pos - start + extra


def connect(ip: str, port: int, timeout: int, source: str | None,
            source6: str | None = None) -> tuple[socket.socket | None, bool]:
    """Connect within timeout seconds (from source, or source6 for IPv6); return (socket or None, whether it timed out)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    if family == socket.AF_INET6 and source6 is not None:
        source = source6
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if source is not None and (":" in source) == (family == socket.AF_INET6):
            sock.bind((source, 0))
        sock.setblocking(False)
        err = sock.connect_ex((ip, port))
        if err == 0:
            return sock, False
        if err != errno.EINPROGRESS:
            sock.close()
            return None, False
        if not _ready(sock, True, timeout):
            sock.close()
            return None, True
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            sock.close()
            return None, err == errno.ETIMEDOUT
        return sock, False
    except OSError:
        sock.close()
        raise


def _mangle(addr: bytes, dns: mx.Lookup | None) -> tuple[bytes, bool, bytes | None, bytes | None]:
    """Return (address for SMTP, is an alias, failure report, SMTPUTF8 form) as qmail's addrmangle.

    The address for SMTP has its domain as A-labels; the SMTPUTF8 form, given only
    for an address that is not ASCII, keeps the domain as written (unless a CNAME
    replaced it) and leaves a UTF-8 local part unquoted.
    """
    at = addr.rfind(b"@")
    if at < 0:
        return addr, dns is not None, None, None if addr.isascii() else addr
    host = ahost = addr[at + 1:]
    if not host.isascii():
        ahost = smtputf8.alabel(host) or host  # not an IDN: as qmail, looked up as it is
    alias = False
    if dns is not None:
        name, loops = mx.cname(dns, ahost.decode("latin-1"))
        if loops == -mx.SOFT:
            return b"", True, sc.DNSCANON, None
        alias = loops != 0
        ahost = name.encode("latin-1")
        if alias:
            host = ahost
    plain = sc.quote_box(addr[:at]) + b"@" + ahost
    if addr.isascii():
        return plain, alias, None, None
    return plain, alias, None, sc.quote_box(addr[:at], True) + b"@" + host


def _utf8_box(addr: bytes) -> bool:
    """Whether addr's local part is UTF-8 and not ASCII: it has no form for a peer without SMTPUTF8."""
    box = smtputf8.split(addr)[0]
    if box.isascii():
        return False
    try:
        box.decode("utf-8")
    except UnicodeDecodeError:
        return False  # legacy 8-bit bytes: sent as qmail sends them
    return True


@dataclass
class _TlsControl:
    """The TLS control files, read once per delivery."""

    settings: tls.Settings
    exhaustive: bool


def _read_tls_control() -> _TlsControl:
    """Read the TLS control files; raise control.ControlError if one cannot be read."""
    ciphers = control.read_lines(tls.CIPHERS)
    clientcert = tls.CLIENTCERT if _exists(tls.CLIENTCERT) else None
    return _TlsControl(tls.Settings(":".join(ciphers) if ciphers else None, clientcert),
                       _exists("control/tlshosts/exhaustivelist"))


def _exists(path: str) -> bool:
    """Return whether path exists (qmail's stat() == 0); raise control.ControlError if that cannot be told."""
    try:
        os.stat(path)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise control.ControlError(path) from e


def _safe_name(name: str) -> bool:
    # A host name that is also a harmless file name under control/tlshosts/.
    return bool(name) and "/" not in name and not name.startswith(".") and "\0" not in name


def plan(a: mx.IpMx, port: int, tc: _TlsControl, dns: mx.Lookup, secure_domain: bool,
         sts: mtasts.Policy | None, smtps: bool) -> tuple[Plan, bytes | None]:
    """Return the TLS plan for a connection to a, or a report saying why a must not be tried now.

    Precedence: tlshosts/NAME.pem, notlshosts/NAME, DANE (TLSA records of a DNSSEC-secure host),
    MTA-STS, tlshosts/exhaustivelist, opportunistic TLS.
    """
    name = a.name.rstrip(".")
    p = Plan(smtps=smtps, name=name, settings=tc.settings)
    if _safe_name(name):
        pem = f"control/tlshosts/{name}.pem"
        if _exists(pem):
            p.cafile = pem
            p.required = pem.encode("latin-1") + b" exists"
            return p, None
        if _exists(f"control/notlshosts/{name}"):
            p.use_tls = smtps
            return p, None
    if name and secure_domain and (mx.authenticated(dns, name, "A") or mx.authenticated(dns, name, "AAAA")):
        base = f"_{port}._tcp.{name}"
        status, records = dns.query(base, "TLSA")
        if status == mx.SOFT:
            return p, sc.tlsa_temp(base.encode("latin-1"))
        if status == mx.OK and mx.authenticated(dns, base, "TLSA"):
            p.tlsa = [r for r in (dane.parse(t) for t in records) if r is not None]
            if p.tlsa:
                p.required = b"TLSA records exist"
                return p, None
    if sts is not None:
        p.sts = sts
        if sts.mode == "enforce":
            p.required = b"the MTA-STS policy is enforce"
        return p, None
    if tc.exhaustive:
        p.use_tls = smtps
    return p, None


def deliver(argv: list[str], env: dict[str, str], dns: mx.Lookup | None = None) -> bytes:
    """Deliver the message on descriptor 0; return qmail-remote's whole output."""
    global _served
    # qmail varies the MX choice and the tcpto back-off by the pid of each qmail-remote; a
    # worker's deliveries share a pid, so its count of earlier deliveries varies them too.
    salt = os.getpid() + _served
    _served += 1
    if len(argv) < 4:
        return sc.USAGE + b"\0"
    try:
        os.chdir(_home.home())
    except OSError:
        return sc.CHDIR + b"\0"
    try:
        timeout = control.read_int("timeoutremote", DEFAULT_TIMEOUT_REMOTE)
        timeout_connect = control.read_int("timeoutconnect", DEFAULT_TIMEOUT_CONNECT)
        helo = control.read_default("helohost", None)
        route_lines = control.read_lines("smtproutes") or []
        senders = auth.parse_authsenders(control.read_lines("authsenders") or [])
        source = control.read_line("outgoingip")
        source6 = control.read_line("outgoingip6")
        tc = _read_tls_control()
    except control.ControlError:
        return sc.CONTROL + b"\0"
    if helo is None:
        return sc.CONTROL + b"\0"
    args = [os.fsencode(a) for a in argv]
    hostb = args[1]
    if not hostb.isascii():
        hostb = smtputf8.alabel(hostb) or hostb  # an IDN: DNS, smtproutes and MTA-STS see its A-labels
    host = hostb.decode("latin-1")
    domain = host
    sender, _, _, sender8 = _mangle(args[2], None)
    route = smtproutes.lookup(smtproutes.parse(route_lines), host)
    login = route.login if route is not None else None
    by_sender = auth.lookup_sender(senders, sender.decode("latin-1")) if senders else None
    if by_sender is not None:  # authsenders before smtproutes; an empty relay keeps the host's route
        relay, login = auth.split(by_sender)
        if relay:
            route = smtproutes.route(relay)
    if route is None:
        login = None  # credentials go only to a relay the admin named, never to an MX found in DNS
    port = smtproutes.DEFAULT_PORT
    if route is not None:
        host, port = route.relay, route.port
    elif env.get("PYQMAIL_SMTP_PORT", "").isdigit():
        port = int(env["PYQMAIL_SMTP_PORT"]) & 0xFFFF  # a test seam: MX hosts on a port other than 25
    resolver: mx.Lookup = dns if dns is not None else mx.Resolver.from_env(env)
    try:
        me = mx.local_addresses()
    except (OSError, IpmeError):
        return sc.OSERR + b"\0"
    all_aliases = True
    recips = []
    recips8: list[bytes | None] = []
    for arg in args[3:]:
        addr, alias, failed, addr8 = _mangle(arg, None if route is not None else resolver)
        if failed is not None:
            return failed + b"\0"
        all_aliases = all_aliases and alias
        recips.append(addr)
        recips8.append(addr8)
    utf8 = None
    if sender8 is not None or any(r is not None for r in recips8) or smtputf8.header_utf8(FD_MESSAGE):
        utf8 = Utf8(sender8 or sender, [r8 or r for r, r8 in zip(recips, recips8)], not _utf8_box(args[2]),
                    [not _utf8_box(a) for a in args[3:]])
    seed = int(time.time()) + (salt << 16)
    if route is not None:
        status, ips = mx.ip(resolver, host)
    else:
        status, ips = mx.mx_ip(resolver, host, seed)
    if status == mx.SOFT and not ips:
        return sc.DNS_TEMP + b"\0"
    if status == mx.HARD:
        return sc.perm_dns(host.encode("latin-1")) + b"\0"
    if not ips:
        return sc.NOMX + b"\0"
    pref_me = min([a.pref for a in ips if a.ip in me], default=PREF_NONE)
    if route is not None:
        pref_me = PREF_RELAY
    if all_aliases:
        pref_me = PREF_ALIASES
    candidates = [a for a in ips if a.pref < pref_me]
    if not candidates:
        return sc.AMBIGMX + b"\0"
    # DNSSEC: an MX host's TLSA records count only if the domain's MX answer (or, for a route
    # or a host without MX, nothing more than the host's own address answer) was validated.
    secure_domain = route is not None or mx.literal(domain) is not None or \
        mx.authenticated(resolver, domain, "MX") or candidates[0].name == domain
    sts = None
    if route is None and mx.literal(domain) is None and domain:
        sts_port = env.get("PYQMAIL_MTASTS_PORT", "")
        sts = mtasts.policy(domain, resolver, int(sts_port) if sts_port.isdigit() else mtasts.DEFAULT_PORT)
        if sts is not None and sts.mode == "none":
            sts = None
        if sts is not None and sts.mode == "enforce":
            candidates = [a for a in candidates if a.name and sts.allows(a.name)]
            if not candidates:
                return sc.sts_no_mx(domain.encode("latin-1")) + b"\0"
    table = tcpto.Table(TCPTO_PATH, pid=salt)
    table6 = tcpto.Table(TCPTO6_PATH, pid=salt, lay=tcpto.V6)
    refused = b""
    for n, a in enumerate(candidates):
        ip4 = mx.ipv4_bytes(a.ip)
        ip6 = mx.ipv6_bytes(a.ip) if ip4 is None else None
        if ip4 is not None and table.skip(ip4, int(time.time())):
            continue
        if ip6 is not None and table6.skip(ip6, int(time.time())):
            continue
        try:
            p, refusal = plan(a, port, tc, resolver, secure_domain, sts, port == SMTPS_PORT)
        except control.ControlError:
            return sc.CONTROL + b"\0"
        if refusal is not None:
            refused = refusal
            continue
        wait = timeout_connect
        if ip6 is not None and any(b.name == a.name and b.pref == a.pref and ":" not in b.ip
                                   for b in candidates[n + 1:]):
            wait = min(wait, FALLBACK_DELAY)  # RFC 8305: the IPv4 address of the same host next
        try:
            sock, timed_out = connect(a.ip, port, wait, source, source6)
        except OSError:
            return sc.OSERR + b"\0"
        if ip4 is not None:
            table.record(ip4, timed_out, int(time.time()))
        elif ip6 is not None:
            table6.record(ip6, timed_out and wait == timeout_connect, int(time.time()))
        if sock is not None:
            conn = Smtp(sock, timeout)
            try:
                return smtp(conn, a.ip.encode("ascii"), helo.encode("latin-1"), sender, recips, FD_MESSAGE, p,
                            login, utf8)
            finally:
                conn.sock.close()
                sock.close()
    return (refused or sc.NOCONN) + b"\0"


def preload() -> None:
    """Import what every delivery needs lazily, for a parent that forks many (qmail-rspawn)."""
    import array  # noqa: F401 - the modules pyqmail.smtpd.ipme imports when called
    import fcntl  # noqa: F401
    import ipaddress  # noqa: F401
    import struct  # noqa: F401

    import pyqmail.smtpd.ipme  # noqa: F401
    import ssl  # noqa: F401 - opportunistic TLS needs it on most deliveries


@program("qmail-remote", crash=0, on_crash=_on_crash)
def main(argv: list[str]) -> int:
    """Send the message on descriptor 0 and print qmail-remote(8)'s reports; exit 0."""
    _write_all(FD_REPORT, deliver(argv, dict(os.environ)))
    return 0
