"""qmail-remote's SMTP AUTH client (RFC 4954), free of I/O: credentials in route lines, mechanisms.

Credentials follow a route's relay[:port] in control/smtproutes and control/authsenders, in
either form admins know:

    domain:relay:port user password     (Tom Clegg's qmail-remote-auth patch, qmail-ldap, John Simpson)
    domain:relay:port|user|password     (Erwin Hoffmann's qmail-authentication, s/qmail, sagredo)

The first blank or '|' after relay[:port] starts them; with '|' the user ends at the next '|',
with blanks at the next blank; the password is the rest of the line (it may hold blanks and '|';
control files lose trailing blanks). A user starting with '-' (John Simpson's mark, removed
before use) allows AUTH without TLS; otherwise credentials are sent only inside TLS.

control/authsenders (Hoffmann's): `sender[:relay[:port]]` then credentials. The sender key is
looked up as the whole envelope sender, then each suffix starting at an '@' or a '.'
(`@example.com`, `.example.com`), then the empty key (every sender, bounces included). An
empty relay keeps the host's usual route (smtproutes or MX).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

from pyqmail.control import lower

PLAIN = b"PLAIN"
LOGIN = b"LOGIN"
CRAM = b"CRAM-MD5"
# CRAM-MD5 first: with opportunistic (unverified) TLS a man in the middle learns the password
# itself from PLAIN or LOGIN, only a challenge's keyed digest from CRAM-MD5. PLAIN before LOGIN:
# one round trip fewer, and the same secrecy.
PREFERENCE = (CRAM, PLAIN, LOGIN)
NO_TLS_MARK = "-"


@dataclass(frozen=True, slots=True)
class Credentials:
    """A route's login: user, password, and whether they may cross without TLS."""

    user: bytes
    password: bytes
    plaintext_ok: bool = False

    def __repr__(self) -> str:  # never a password in a traceback or a log line
        return f"Credentials(user={self.user!r}, plaintext_ok={self.plaintext_ok})"


def split(value: str) -> tuple[str, Credentials | None]:
    """Return (relay[:port], credentials or None) of a route's value; no credentials without both parts."""
    cut = len(value)
    for i, ch in enumerate(value):
        if ch in "| \t":
            cut = i
            break
    route, rest = value[:cut], value[cut:]
    if not rest:
        return route, None
    if rest[0] == "|":
        user, bar, password = rest[1:].partition("|")
        if not bar:
            return route, None
    else:
        parts = rest.strip(" \t").split(None, 1)
        if len(parts) < 2:
            return route, None
        user, password = parts[0], parts[1]
    plaintext_ok = user.startswith(NO_TLS_MARK)
    if plaintext_ok:
        user = user[1:]
    if not user or not password:
        return route, None
    return route, Credentials(user.encode("latin-1"), password.encode("latin-1"), plaintext_ok)


def parse_authsenders(lines: list[str]) -> dict[str, str]:
    """Return the sender key -> value map of authsenders lines (the last line of a key wins)."""
    out: dict[str, str] = {}
    for line in lines:
        cut = len(line)
        for i, ch in enumerate(line):
            if ch in ":| \t":
                cut = i
                break
        value = line[cut:]
        out[lower(line[:cut])] = value[1:] if value.startswith(":") else value
    return out


def lookup_sender(senders: dict[str, str], sender: str) -> str | None:
    """Return the authsenders value for an envelope sender: the whole, each '@'/'.' suffix, then ''."""
    for i in range(len(sender) + 1):
        if i == 0 or i == len(sender) or sender[i] in "@.":
            value = senders.get(lower(sender[i:]))
            if value is not None:
                return value
    return None


def mechanisms(ehlo_text: bytes) -> list[bytes]:
    """Return the SASL mechanisms an EHLO reply's text offers (AUTH lines, and the old AUTH= form)."""
    out: list[bytes] = []
    for line in ehlo_text.split(b"\n")[1:]:
        words = line[4:].replace(b"=", b" ", 1).split()
        if words and words[0].upper() == b"AUTH":
            out += [w.upper() for w in words[1:] if w.upper() not in out]
    return out


def choose(offered: list[bytes]) -> list[bytes]:
    """Return the mechanisms to try, in PREFERENCE order, of those offered."""
    return [m for m in PREFERENCE if m in offered]


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def plain(c: Credentials) -> bytes:
    """Return AUTH PLAIN's initial response (RFC 4616): no authorization identity, user, password."""
    return b64(b"\0" + c.user + b"\0" + c.password)


def cram_md5(c: Credentials, challenge_b64: bytes) -> bytes | None:
    """Return the CRAM-MD5 response (RFC 2195) to a 334 challenge, or None if it is not base64."""
    try:
        challenge = base64.b64decode(challenge_b64.strip(), validate=True)
    except ValueError:
        return None
    digest = hmac.new(c.password, challenge, hashlib.md5).hexdigest().encode("ascii")
    return b64(c.user + b" " + digest)
