"""qmail-remote's SMTP client, free of I/O: reply parsing, DATA encoding, report texts.

Reports are qmail-remote(8)'s: a letter (r/h/s per recipient, then K/Z/D),
a text, and a NUL; the texts are qmail 1.03's.
"""

from __future__ import annotations

from pyqmail import rfc822

HUGE_SMTP_TEXT = 5000  # qmail keeps this much of a reply for "Remote host said:"
MASK64 = 0xFFFFFFFFFFFFFFFF

NOMEM = b"ZOut of memory. (#4.3.0)\n"
OSERR = b"ZSystem resources temporarily unavailable. (#4.3.0)\n"
NOCONN = b"ZSorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n"
READ = b"ZUnable to read message. (#4.3.0)\n"
DNSCANON = b"ZCNAME lookup failed temporarily. (#4.4.3)\n"
DNS_TEMP = b"ZSorry, I couldn't find any host by that name. (#4.1.2)\n"
CHDIR = b"ZUnable to switch to home directory. (#4.3.0)\n"
CONTROL = b"ZUnable to read control files. (#4.3.0)\n"
PARTIAL_LINE = b"DSMTP cannot transfer messages with partial final lines. (#5.6.2)\n"
USAGE = b"DI (qmail-remote) was invoked improperly. (#5.3.5)\n"
NOMX = b"DSorry, I couldn't find a mail exchanger or IP address. (#5.4.4)\n"
AMBIGMX = (b"DSorry. Although I'm listed as a best-preference MX or A for that host,\n"
           b"it isn't in my control/locals file, so I don't treat it as local. (#5.4.6)\n")
CRASH = b"ZSorry, qmail-remote had an internal error. (#4.3.0)\n"

# Message reports after a reply, as (text before the partner's address, text after it).
GREETING_FAILED = (b"ZConnected to ", b" but greeting failed")
HELO_REJECTED = (b"ZConnected to ", b" but my name was rejected")
SENDER_REJECTED_PERM = (b"DConnected to ", b" but sender was rejected")
SENDER_REJECTED_TEMP = (b"ZConnected to ", b" but sender was rejected")
GIVING_UP = (b"DGiving up on ", b"")
DATA_FAILED_PERM = (b"D", b" failed on DATA command")
DATA_FAILED_TEMP = (b"Z", b" failed on DATA command")
AFTER_DATA_PERM = (b"D", b" failed after I sent the message")
AFTER_DATA_TEMP = (b"Z", b" failed after I sent the message")
ACCEPTED = (b"K", b" accepted message")
# SMTP AUTH to a smarthost (pyqmail's texts; the qmail-authentication patch's say "authentication
# was rejected (MECH)" too, but it defers every refusal: RFC 4954 makes 535 permanent).
AUTH_NO_TLS = (b"ZConnected to ", b" but TLS is not up and this route's password is sent only inside TLS"
               b" (a user starting with - allows plain text) (#4.7.0)")
AUTH_NONE_OFFERED = (b"ZConnected to ", b" but it offers none of the AUTH mechanisms CRAM-MD5 PLAIN LOGIN"
                     b" (#4.7.0)")


def auth_rejected(code: int, mech: bytes) -> tuple[bytes, bytes]:
    """Return the message report for a refused AUTH: D for 5xx (535 and the like), Z otherwise (454)."""
    letter = b"D" if 500 <= code < 600 else b"Z"
    return letter + b"Connected to ", b" but authentication was rejected (AUTH " + mech + b")"


def safe(text: bytes) -> bytes:
    """Return text with every byte outside 33..126 replaced by '?' (qmail's outsafe)."""
    return bytes(c if 33 <= c <= 126 else 63 for c in text)


# SMTPUTF8 (RFC 6531 3.2): an address with a UTF-8 local part has no ASCII form; a next hop that
# does not offer SMTPUTF8 cannot take it, and RFC 6531 forbids changing the address (downgrade).
NO_SMTPUTF8 = b"non-ASCII addresses are not permitted for that %s (RFC 6531, 553 5.6.7). (#5.6.7)\n"


def no_smtputf8_recipient(partner: bytes) -> bytes:
    """Return the recipient report (h) for a UTF-8 local part the next hop cannot take."""
    return (b"h" + partner + b" does not offer SMTPUTF8 and this address has a non-ASCII local part:\n"
            + NO_SMTPUTF8 % b"recipient")


def no_smtputf8_sender(partner: bytes) -> bytes:
    """Return the message report (D) for a sender with a UTF-8 local part the next hop cannot take."""
    return (b"DConnected to " + partner + b" but it does not offer SMTPUTF8 and the sender address has a"
            b" non-ASCII local part:\n" + NO_SMTPUTF8 % b"sender")


def perm_dns(host: bytes) -> bytes:
    """Return the report for a host DNS says does not exist."""
    return b"DSorry, I couldn't find any host named " + safe(host) + b". (#5.1.2)\n"


def dropped(partner: bytes, critical: bool, why: bytes = b"") -> bytes:
    """Return the report for a connection that died (critical: after the final dot; why: a TLS error)."""
    dup = b"Possible duplicate! " if critical else b""
    return b"ZConnected to " + partner + b" but connection died. " + dup + (why + b" " if why else b"") + b"(#4.4.2)\n"


# TLS (the qmail-tls patch's texts where it has one; it ends them with "; connecting to IP." before
# the handshake and "; connected to IP." after it, and gives no enhanced status code).
def tls_failed(text: bytes, partner: bytes, after_handshake: bool) -> bytes:
    """Return a Z report for a TLS failure: text, then where."""
    return b"Z" + text + (b"; connected to " if after_handshake else b"; connecting to ") + partner + b".\n"


def no_tls(why: bytes) -> bytes:
    """The server does not offer STARTTLS (or EHLO) but TLS is required (why: the requirement)."""
    return b"No TLS achieved while " + why


def starttls_rejected(why: bytes) -> bytes:
    return b"STARTTLS rejected while " + why


def tls_connect(reason: bytes) -> bytes:
    return b"TLS connect failed: " + reason


def tls_unverified_ca(cafile: bytes, reason: bytes) -> bytes:
    return b"TLS unable to verify server with " + cafile + b": " + reason


def tls_unverified_name(host: bytes) -> bytes:
    # the patch writes "dNSNnames"
    return b"TLS unable to verify server " + host + b": certificate contains no matching dNSNames"


def tls_unverified(host: bytes, how: bytes, reason: bytes) -> bytes:
    """A DANE or MTA-STS check failed (how: b"DANE", b"MTA-STS")."""
    return b"TLS unable to verify server " + host + b" with " + how + b": " + reason


def tls_note(version_cipher: bytes, verified: bytes | None, testing: bytes | None = None) -> bytes:
    """Return the line every message report ends with after a TLS handshake (pyqmail's form).

    'TLS: TLSv1.3 TLS_AES_256_GCM_SHA384, verified (DANE-EE).' or '..., not verified.', then, in
    MTA-STS testing mode, 'MTA-STS testing: ...' for what enforce mode would have refused.
    A report without a TLS line is of a plain-text session.
    """
    state = b"verified (" + verified + b")" if verified else b"not verified"
    out = b"TLS: " + version_cipher + b", " + state + b".\n"
    if testing:
        out += b"MTA-STS testing: " + testing + b".\n"
    return out


def sts_no_mx(domain: bytes) -> bytes:
    return b"ZThe MTA-STS policy of " + safe(domain) + b" (enforce) lists none of its MX hosts. (#4.7.5)\n"


def tlsa_temp(name: bytes) -> bytes:
    return b"ZTLSA lookup for " + safe(name) + b" failed temporarily. (#4.4.3)\n"


def said(text: bytes) -> bytes:
    """Return 'Remote host said: ' and a reply's text, NULs made '?', or nothing for no text."""
    if not text:
        return b""
    return b"Remote host said: " + text.replace(b"\0", b"?")


def final(what: tuple[bytes, bytes], partner: bytes, text: bytes) -> bytes:
    """Return the message report qmail's quit() prints (after sending QUIT)."""
    return what[0] + partner + what[1] + b".\n" + said(text)


def recipient(code: int, partner: bytes, text: bytes) -> bytes:
    """Return the recipient report for a reply to RCPT."""
    if code >= 500:
        return b"h" + partner + b" does not like recipient.\n" + said(text)
    if code >= 400:
        return b"s" + partner + b" does not like recipient.\n" + said(text)
    return b"r"


# qmail's quote: a local part is sent bare if it is a dot-atom, else quoted.
quote_box = rfc822.quote


class Reply:
    """Push parser for one SMTP reply, byte for byte as qmail's smtpcode().

    The code is the first three bytes taken as digits without checking
    (so malformed replies give codes such as 8004); a '-' after a line's
    code means another line follows. The text is every byte read but CR,
    at most HUGE_SMTP_TEXT of them.
    """

    _CODE, _AFTER, _CONT, _CONT_CODE, _LAST = range(5)

    def __init__(self) -> None:
        self.code = 0
        self.text = bytearray()
        self.done = False
        self._state = self._CODE
        self._need = 3

    def _keep(self, seg: bytes) -> None:
        room = HUGE_SMTP_TEXT - len(self.text)
        if room > 0:
            self.text += seg.replace(b"\r", b"")[:room]

    def feed(self, data: bytes) -> int:
        """Consume bytes of data until the reply ends; return how many were consumed."""
        pos = 0
        while pos < len(data) and not self.done:
            st = self._state
            if st in (self._CODE, self._CONT_CODE):
                seg = data[pos:pos + self._need]
                if st == self._CODE:
                    for c in seg:
                        self.code = (self.code * 10 + (c - 48)) & MASK64
                self._need -= len(seg)
                if not self._need:
                    self._state = self._AFTER
            elif st == self._AFTER:
                seg = data[pos:pos + 1]
                if seg == b"-":
                    self._state = self._CONT
                elif seg == b"\n":
                    self.done = True
                else:
                    self._state = self._LAST
            else:
                nl = data.find(b"\n", pos)
                seg = data[pos:] if nl < 0 else data[pos:nl + 1]
                if nl >= 0:
                    if st == self._LAST:
                        self.done = True
                    else:
                        self._state, self._need = self._CONT_CODE, 3
            self._keep(seg)
            pos += len(seg)
        return pos


class Stuffer:
    """Encode a message for DATA as notqmail 1.09's qmail-remote: every line ending (LF, CR LF,
    or a bare CR) becomes CRLF, and a line starting with a dot gets a second one.

    qmail 1.03 sent a CR as it was (CR CR LF for CR LF). Where 1.09 itself would put a bare CR
    or an unstuffed dot on the wire (the byte after a bare CR is sent as it is, so CR CR or
    CR '.'), each CR is a line end here too and the new line is dot-stuffed: a line "." made
    from "x\r.\r\n" would otherwise end DATA early.
    """

    def __init__(self) -> None:
        self.at_line_start = True
        self._cr = False  # the last byte fed was a CR: CR LF or a bare CR, the next byte tells

    def feed(self, chunk: bytes) -> bytes:
        """Return the SMTP form of the next piece of the message."""
        if not chunk:
            return b""
        if self._cr:
            chunk = b"\r" + chunk
        self._cr = chunk.endswith(b"\r")
        if self._cr:
            chunk = chunk[:-1]
        return self._lines(chunk)

    def end(self) -> bytes:
        """Return what is held back at the end of the message (a final CR, as CRLF)."""
        if not self._cr:
            return b""
        self._cr = False
        return self._lines(b"\r")

    def _lines(self, data: bytes) -> bytes:
        if not data:
            return b""
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        out = data.replace(b"\n.", b"\n..").replace(b"\n", b"\r\n")
        if self.at_line_start and data[:1] == b".":
            out = b"." + out
        self.at_line_start = data.endswith(b"\n")
        return out

    def complete(self) -> bool:
        """Return False if the message ended inside a line (SMTP cannot carry that); call after end()."""
        return self.at_line_start and not self._cr
