"""Every reply qmail-smtpd sends, byte for byte as netqmail 1.06's (qmail 1.03 plus the HELP text),
and notqmail 1.09's bare-LF reply.

Tests import these same constants (STYLE principle 3).
"""

from __future__ import annotations

import re

CRLF = b"\r\n"

# Deaths: the reply, then the connection is dropped (exit 1).
TIMEOUT = b"451 timeout (#4.4.2)\r\n"
NOMEM = b"421 out of memory (#4.3.0)\r\n"
CONTROL = b"421 unable to read controls (#4.3.0)\r\n"
IPME = b"421 unable to figure out my IP addresses (#4.3.0)\r\n"
# notqmail 1.09 points at the page that exists today (1.03 named http://pobox.com/~djb/...).
STRAY_NEWLINE = b"451 See https://cr.yp.to/docs/smtplf.html.\r\n"

# Refusals; the session goes on.
BADMAILFROM = b"553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)\r\n"
NOGATEWAY = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
UNIMPLEMENTED = b"502 unimplemented (#5.5.1)\r\n"
SYNTAX = b"555 syntax error (#5.5.4)\r\n"
WANT_MAIL = b"503 MAIL first (#5.5.1)\r\n"
WANT_RCPT = b"503 RCPT first (#5.5.1)\r\n"
QQT_FAILURE = b"451 qqt failure (#4.3.0)\r\n"
TOO_MANY_HOPS = b"554 too many hops, this message is looping (#5.4.6)\r\n"
DATABYTES = b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n"
TOO_MANY_RCPTS = b"452 sorry, too many recipients (#4.5.3)\r\n"  # not in qmail: see session.RCPT_BYTES_MAX
# The bad-recipient limit (control/brtlimit, $BRTLIMIT), as the brtlimit patch says it; then the end.
BRTLIMIT = b"421 too many invalid addresses, goodbye (#4.3.0)\r\n"

# Successes.
OK = b"250 ok\r\n"
FLUSHED = b"250 flushed\r\n"
VRFY = b"252 send some mail, i'll try my best\r\n"
HELP = b"214 netqmail home page: http://qmail.org/netqmail\r\n"
GO_AHEAD = b"354 go ahead\r\n"
EHLO_EXTENSIONS = b"250-PIPELINING\r\n250 8BITMIME\r\n"

# CHUNKING (RFC 3030; pyqmail.smtpd.bdat). The refusals use qmail's words where qmail has them
# (503 MAIL first, 552 databytes); a BDAT whose size cannot be read leaves no way to find the
# next command, so the connection ends after BDAT_SYNTAX.
BDAT_SYNTAX = b"501 bad BDAT size, closing connection (#5.5.4)\r\n"
BDAT_AFTER = b"503 DATA cannot follow BDAT (#5.5.1)\r\n"


def chunk_ok(size: int) -> bytes:
    """Return the reply to a BDAT chunk that is not the last: how many bytes it held."""
    return b"250 ok %d bytes\r\n" % size

# STARTTLS, as the qmail-tls patch (notqmail's smtp-tls branch) says it.
EHLO_STARTTLS = b"250-STARTTLS\r\n"
READY_FOR_TLS = b"220 ready for tls\r\n"
STARTTLS_PARAMETERS = b"501 Syntax error (no parameters allowed) (#5.5.4)\r\n"


def greeting(text: bytes) -> bytes:
    """Return the 220 line for control/smtpgreeting text."""
    return b"220 " + text + b" ESMTP\r\n"


def helo(text: bytes) -> bytes:
    """Return the reply to HELO."""
    return b"250 " + text + CRLF


def ehlo(text: bytes, starttls: bool = False) -> bytes:
    """Return the reply to EHLO: the greeting, STARTTLS when offered, then PIPELINING and 8BITMIME."""
    if starttls:
        return b"250-" + text + CRLF + EHLO_STARTTLS + EHLO_EXTENSIONS
    return b"250-" + text + CRLF + EHLO_EXTENSIONS


def ehlo_lines(text: bytes, keywords: list[bytes]) -> bytes:
    """Return the reply to EHLO: the greeting line, then one line per keyword (Session.ehlo_keywords)."""
    out = [b"250-", text, CRLF]
    last = len(keywords) - 1
    for i, kw in enumerate(keywords):
        out += [b"250 " if i == last else b"250-", kw, CRLF]
    return b"".join(out)


def tls_failed(what: bytes, why: bytes | None) -> bytes:
    """Return the patch's 454 for a TLS problem: what failed, and OpenSSL's reason."""
    return b"454 TLS " + what + (b": " + why if why else b"") + b" (#4.3.0)\r\n"


def nogateway_tls(why: bytes | None) -> bytes:
    """Return the 553 for a relay attempt inside TLS without a certificate that allows it (the patch's text)."""
    return (b"553 sorry, that domain isn't in my list of allowed rcpthosts; no valid cert for gatewaying"
            + (b": " + why if why else b"") + b" (#5.7.1)\r\n")


def quit(text: bytes) -> bytes:
    """Return the reply to QUIT."""
    return b"221 " + text + CRLF


def accepted(when: int, qp: int) -> bytes:
    """Return the reply for a queued message: the time and qmail-queue's pid."""
    return b"250 ok %d qp %d\r\n" % (when, qp)


def qq_failure(report: bytes) -> bytes:
    """Return the reply for a D (554) or Z (451) report of qmail-queue."""
    return (b"554 " if report[:1] == b"D" else b"451 ") + report[1:] + CRLF


# SMTP AUTH (RFC 4954), as Erwin Hoffmann's qmail-authentication patch (notqmail's smtp-auth
# branch) says it; 538 as Marcel Telka's force-tls patch; see docs/DESIGN.md "SMTP AUTH".
AUTH_OK = b"235 ok, go ahead (#2.0.0)\r\n"
AUTH_FAILED = b"535 authentication failed (#5.7.1)\r\n"
AUTH_TYPE = b"504 auth type unimplemented (#5.5.1)\r\n"
AUTH_INPUT = b"501 malformed auth input (#5.5.4)\r\n"
AUTH_CANCELLED = b"501 auth exchange cancelled (#5.0.0)\r\n"
AUTH_ALREADY = b"503 you're already authenticated (#5.5.0)\r\n"
AUTH_IN_TRANSACTION = b"503 no auth during mail transaction (#5.5.0)\r\n"
AUTH_REQUIRED = b"530 authentication required (#5.7.1)\r\n"
AUTH_NEED_TLS = b"538 auth not available without TLS (#5.3.3)\r\n"
AUTH_TEMPORARY = b"454 temporary authentication failure (#4.3.0)\r\n"
AUTH_CHILD = b"454 oops, problem with child and I can't auth (#4.3.0)\r\n"
AUTH_TOO_MANY = b"421 too many authentication failures, closing connection (#4.7.0)\r\n"
AUTH_USERNAME = b"334 VXNlcm5hbWU6\r\n"  # base64 "Username:"
AUTH_PASSWORD = b"334 UGFzc3dvcmQ6\r\n"  # base64 "Password:"
AUTH_EMPTY = b"334 \r\n"  # PLAIN without an initial response


def auth_trouble(what: bytes) -> bytes:
    """Return the patch's 454 when the checkprogram cannot be run: what is pipe, write or fork."""
    text = {b"pipe": b"unable to open pipe", b"write": b"unable to write pipe"}.get(what, b"child won't start")
    return b"454 oops, " + text + b" and I can't auth (#4.3.0)\r\n"


def ehlo_auth(text: bytes, starttls: bool, mechanisms: bytes | None, size: int) -> bytes:
    """Return the reply to EHLO when a checkprogram is given and $SMTPAUTH set (the patch's lines).

    mechanisms: the AUTH line's words, or None when AUTH is not offered now ($FORCETLS before TLS).
    """
    out = [b"250-", text, CRLF]
    if starttls:
        out.append(EHLO_STARTTLS)
    out.append(b"250-PIPELINING\r\n250-8BITMIME\r\n")
    if mechanisms is not None:
        out += [b"250-AUTH ", mechanisms, CRLF]
    out.append(b"250 SIZE %d\r\n" % size)
    return b"".join(out)


# ENHANCEDSTATUSCODES (RFC 2034): after EHLO, every 2xx/4xx/5xx reply but the replies to EHLO
# and HELO gets the code at the start of the text of each of its lines. The code is qmail's own
# "(#x.y.z)", which stays at the end as well; a reply without one gets ok (250 at MAIL: 2.1.0,
# at RCPT: 2.1.5; else 2.0.0) or X.0.0; a text that starts with a code already is left alone.
_QMAIL_CODE = re.compile(rb"\(#[245]\.([0-9]{1,3})\.([0-9]{1,3})\)")
_HAS_CODE = re.compile(rb"[245]\.[0-9]{1,3}\.[0-9]{1,3}(?: |$)")


def enhance(data: bytes, ok: bytes = b"2.0.0") -> bytes:
    """Return data (whole reply lines) with RFC 2034 codes after each 2xx/4xx/5xx reply code."""
    lines = data.split(CRLF)
    tail = lines.pop()  # b"" when data ends in CRLF
    out: list[bytes] = []
    reply: list[bytes] = []
    for line in lines:
        reply.append(line)
        if line[3:4] != b"-":
            out += _coded(reply, ok)
            reply = []
    out += reply
    out.append(tail)
    return CRLF.join(out)


def _coded(reply: list[bytes], ok: bytes) -> list[bytes]:
    cls = reply[0][:1]
    if cls not in (b"2", b"4", b"5") or _HAS_CODE.match(reply[0], 4):
        return reply
    found: re.Match[bytes] | None = None
    for line in reply:
        for m in _QMAIL_CODE.finditer(line):
            found = m  # the last one: qmail puts it at the end
    if found is not None:
        code = cls + b"." + found.group(1) + b"." + found.group(2)
    elif cls == b"2":
        code = ok
    else:
        code = cls + b".0.0"
    return [line[:4].ljust(4) + code + (b" " + line[4:] if line[4:] else b"") for line in reply]
