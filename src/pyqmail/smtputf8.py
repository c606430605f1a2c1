"""SMTPUTF8 (RFC 6531-6533): the flag a message carries from qmail-smtpd to qmail-remote, and IDNs.

Where the flag lives (docs/DESIGN.md "SMTPUTF8 through the queue"):

- qmail-smtpd (or qmail-inject, qmail-send for a bounce) -> qmail-queue:
  the environment variable $SMTPUTF8MAIL (set and not "0"), which
  $QMAILQUEUE filters pass on as they pass $RELAYCLIENT; the envelope on
  descriptor 1 keeps qmail-queue(8)'s form, so C's qmail-queue still reads it.
- todo/N (qmail-queue -> qmail-send): the first record, `u` and the uid,
  gets the flag as words after a space: `u1000 SMTPUTF8`. C qmail-send reads
  that record with scan_ulong, which stops at the space: it ignores the flag.
- info/N (qmail-send): a record `ESMTPUTF8` after the `F` record. C
  qmail-send and qmail-qread read only the first record of info/N.

Domains: `alabel` and `ulabel` convert with the `idna` library (IDNA 2008 with
UTS #46 mapping), imported on first use: an ASCII-only session never pays for it.
"""

from __future__ import annotations

FLAG = b"SMTPUTF8"
ENV = "SMTPUTF8MAIL"  # qmail-queue's input: this message was received (or made) with SMTPUTF8
ENV_B = ENV.encode()
INFO_RECORD = b"E" + FLAG  # info/N's record after F: the MAIL parameters kept with the message
HEADER_MAX = 65536  # bytes of a message read to decide whether its header is UTF-8


def flagged(value: bytes | str | None) -> bool:
    """Return whether a value of $SMTPUTF8MAIL (None: unset) flags the message."""
    return value is not None and value not in (b"", b"0", "", "0")


def mail_parameters(arg: bytes) -> list[bytes]:
    """Return the upper-cased ESMTP parameters of a MAIL argument: the words after the '<...>' address.

    The address ends at the first '>' outside quotes and not escaped, as qmail's
    addrparse reads it; without '<' there are no parameters (qmail's old form).
    """
    lt = arg.find(b"<")
    if lt == -1:
        return []
    quoted = escaped = False
    for i in range(lt + 1, len(arg)):
        ch = arg[i]
        if escaped:
            escaped = False
        elif ch == 92:
            escaped = True
        elif ch == 34:
            quoted = not quoted
        elif ch == 62 and not quoted:
            return [w.upper() for w in arg[i + 1:].split()]
    return []


def has_smtputf8(arg: bytes) -> bool:
    """Return whether a MAIL argument asks for SMTPUTF8 (RFC 6531 3.4)."""
    return FLAG in mail_parameters(arg)


def ascii(b: bytes) -> bool:
    """Return whether b is ASCII only."""
    return b.isascii()


def alabel(domain: bytes) -> bytes | None:
    """Return domain with every label in its ASCII form (A-labels); None if it is not a valid IDN.

    An ASCII domain is returned as it is (lowercased if it holds A-labels, checked by idna).
    """
    if domain.isascii() and b"xn--" not in domain.lower():
        return domain
    if domain.startswith(b"[") or not domain:
        return domain
    import idna

    try:
        text = domain.decode("utf-8")
        trail = text.endswith(".")
        out = idna.encode(text.rstrip("."), uts46=True)
        return out + (b"." if trail else b"")
    except (UnicodeError, idna.IDNAError, ValueError):
        return None


def ulabel(domain: bytes) -> bytes | None:
    """Return domain in UTF-8 with every A-label decoded (U-labels); None if it is not a valid IDN."""
    if domain.isascii() and b"xn--" not in domain.lower():
        return domain
    import idna

    try:
        text = domain.decode("utf-8")
        trail = text.endswith(".")
        out = idna.decode(text.rstrip("."), uts46=True).encode("utf-8")
        return out + (b"." if trail else b"")
    except (UnicodeError, idna.IDNAError, ValueError):
        return None


def split(addr: bytes) -> tuple[bytes, bytes | None]:
    """Return (local part, domain or None) of an address, at its last '@'."""
    at = addr.rfind(b"@")
    if at == -1:
        return addr, None
    return addr[:at], addr[at + 1:]


def address_alabel(addr: bytes) -> bytes | None:
    """Return addr with its domain as A-labels; None if its domain is not a valid IDN."""
    box, dom = split(addr)
    if dom is None:
        return addr
    a = alabel(dom)
    return None if a is None else box + b"@" + a


def header_utf8(fd: int) -> bool:
    """Return whether the header of the message on fd (read with pread, fd's offset unchanged) holds UTF-8.

    Only the first HEADER_MAX bytes are read; bytes that are not ASCII but not
    UTF-8 either (a legacy 8-bit header) do not count. A descriptor that cannot
    be read at an offset (a pipe) tells nothing: False.
    """
    import os

    try:
        head = os.pread(fd, HEADER_MAX, 0)
    except OSError:
        return False
    end = head.find(b"\n\n")
    if end != -1:
        head = head[:end]
    if head.isascii():
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        # A read of HEADER_MAX bytes may cut the last character in two: that is not an error.
        return end == -1 and len(head) == HEADER_MAX and e.end == len(head)
    return True


def todo_u(uid: int, utf8: bool) -> bytes:
    """Return todo/N's first record, NUL included: `u` uid, then ` SMTPUTF8` for a flagged message."""
    return b"u%d%s\0" % (uid, b" " + FLAG if utf8 else b"")


def u_flags(record_value: bytes) -> list[bytes]:
    """Return the words after the uid of a todo/N `u` record's value (without the letter)."""
    return record_value.split(b" ")[1:]
