"""qmail-header(5): what qmail-inject does to a message's header, without I/O.

`Header` takes the header fields one by one (`field`), rewrites the address
lists of the fields qmail-header(5) names, collects the envelope recipients
and sender they give, drops Bcc, Resent-Bcc, Return-Path and
Content-Length, and `finish` returns the header to queue: the fields
qmail-inject adds (Date, Message-ID, From, "Cc: recipient list not shown: ;",
Mail-Followup-To, or their Resent- forms) followed by the kept fields.
"""

from __future__ import annotations

import time

from pyqmail import rfc822

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Callable

    from pyqmail.rfc822 import Token

LINELEN = 80

# Header field types, in the order of qmail's table of known fields.
(UNKNOWN, SENDER, FROM, REPLYTO, TO, CC, BCC, DATE, MESSAGEID, SUBJECT,
 R_SENDER, R_FROM, R_REPLYTO, R_TO, R_CC, R_BCC, R_DATE, R_MESSAGEID,
 RETURNRECEIPTTO, ERRORSTO, APPARENTLYTO, RECEIVED, RETURNPATH, DELIVEREDTO,
 CONTENTLENGTH, CONTENTTYPE, CONTENTTRANSFERENCODING, NOTICEREQUESTEDUPONDELIVERYTO,
 MAILFOLLOWUPTO) = range(29)

_NAMES = (b"sender", b"from", b"reply-to", b"to", b"cc", b"bcc", b"date", b"message-id",
          b"subject", b"resent-sender", b"resent-from", b"resent-reply-to", b"resent-to",
          b"resent-cc", b"resent-bcc", b"resent-date", b"resent-message-id",
          b"return-receipt-to", b"errors-to", b"apparently-to", b"received", b"return-path",
          b"delivered-to", b"content-length", b"content-type", b"content-transfer-encoding",
          b"notice-requested-upon-delivery-to", b"mail-followup-to")
KNOWN = {name: kind for kind, name in enumerate(_NAMES, 1)}

RESENT = frozenset((R_SENDER, R_FROM, R_REPLYTO, R_TO, R_CC, R_BCC, R_DATE, R_MESSAGEID))
DROPPED = frozenset((BCC, R_BCC, RETURNPATH, CONTENTLENGTH))

CC_NOT_SHOWN = b"Cc: recipient list not shown: ;\n"
RESENT_CC_NOT_SHOWN = b"Resent-Cc: recipient list not shown: ;\n"
MONTHS = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec")


class ParseError(Exception):
    """qmail-inject cannot parse this text; args[0] is the text as it was given."""


class InvalidField(Exception):
    """The field's name is empty or has unprintable bytes; args[0] is the field."""


def field_type(field: bytes) -> int:
    """Return the known type of a header field (case-insensitive name), else UNKNOWN."""
    colon = field.find(b":")
    if colon < 0:
        return UNKNOWN
    # Blanks may stand between the name and the colon, nothing else.
    return KNOWN.get(field[:colon].rstrip(b" \t").lower(), UNKNOWN)


def field_valid(line: bytes) -> bool:
    """Return True if line starts a header field: a non-empty printable name, then ':'."""
    colon = line.find(b":")
    if colon < 0:
        return False
    name = line[:colon].rstrip(b" \t")
    if not name:
        return False
    for b in name:
        if b <= 32 or b >= 127:
            return False
    return True


def c_string(s: bytes) -> bytes:
    """Return s up to its first NUL, as qmail hands addresses on as C strings."""
    nul = s.find(b"\0")
    return s if nul < 0 else s[:nul]


def date_field(when: int) -> bytes:
    """Return qmail's Date field for when (seconds since the epoch), in GMT."""
    tm = time.gmtime(when)
    return b"Date: %d %s %d %02d:%02d:%02d -0000\n" % (
        tm.tm_mday, MONTHS[tm.tm_mon - 1], tm.tm_year, tm.tm_hour, tm.tm_min, tm.tm_sec)


def msgid_field(when: int, pid: int, idhost: bytes) -> bytes:
    """Return qmail's Message-ID field: <YYYYMMDDHHMMSS.pid.qmail@idhost>."""
    tm = time.gmtime(when)
    return b"Message-ID: <%d%02d%02d%02d%02d%02d.%d.qmail@%s>\n" % (
        tm.tm_year, tm.tm_mon, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, pid, idhost)


def parse_fixed(text: bytes) -> list[Token]:
    """Tokenize a control value such as '@defaulthost'; raise ParseError if impossible."""
    toks = rfc822.tokenize(text)
    if toks is None:
        raise ParseError(text)
    return toks


class Rewriter:
    """qmail-inject's rewriting of one address: defaulthost, defaultdomain, plusdomain."""

    __slots__ = ("defaulthost", "defaultdomain", "plusdomain")

    def __init__(self, defaulthost: list[Token], defaultdomain: list[Token], plusdomain: list[Token]) -> None:
        """Take the tokens of '@defaulthost', '.defaultdomain' and '.plusdomain' (see parse_fixed)."""
        self.defaulthost = defaulthost
        self.defaultdomain = defaultdomain
        self.plusdomain = plusdomain

    def generic(self, addr: list[Token]) -> None:
        """Rewrite the tokens of one address in place, as qmail-header(5) says."""
        if not addr:
            return  # <> stays <>
        if len(addr) >= 2 and addr[-2][0] == rfc822.AT and addr[-1] == (rfc822.LITERAL, b""):
            return  # <foo@[]> is left alone
        if addr[0][0] == rfc822.AT:
            # A source route, <@a,@b:box@host>: strip everything up to its colon.
            for i, tok in enumerate(addr):
                if tok[0] == rfc822.COLON:
                    del addr[:i + 1]
                    break
            else:
                addr.clear()
            if not addr:
                return
        if addr[-1][0] == rfc822.DOT:
            del addr[-1]
            if not addr:
                return
        if addr[-1][0] == rfc822.AT:
            del addr[-1]
            if not addr:
                return
        if not any(tok[0] == rfc822.AT for tok in addr):
            addr.extend(self.defaulthost)
        kind, text = addr[-1]
        if kind == rfc822.ATOM and text.endswith(b"+"):
            addr[-1] = (rfc822.ATOM, text[:-1])
            addr.extend(self.plusdomain)
        # A host without dots (and not a literal) gets defaultdomain.
        for kind, _ in reversed(addr):
            if kind == rfc822.AT:
                break
            if kind == rfc822.DOT or kind == rfc822.LITERAL:
                return
        addr.extend(self.defaultdomain)


class Settings:
    """Everything qmail-inject's environment and controls say about the header."""

    __slots__ = ("name_comment", "delete_sender", "delete_from", "delete_messid", "hack_recip",
                 "hack_mess", "mailuser", "mailhost", "mailruser", "mailrhost", "fullname",
                 "idhost", "mft", "starttime", "pid")

    def __init__(self) -> None:
        self.name_comment = False  # QMAILINJECT c
        self.delete_sender = False  # s
        self.delete_from = False  # f
        self.delete_messid = False  # i
        self.hack_recip = False  # r
        self.hack_mess = False  # m
        self.mailuser = b"anonymous"
        self.mailhost: bytes | None = None
        self.mailruser = b"anonymous"
        self.mailrhost: bytes | None = None
        self.fullname: bytes | None = None
        self.idhost = b"idhost"
        self.mft: frozenset[bytes] | None = None  # lowercased QMAILMFTFILE lines
        self.starttime = 0
        self.pid = 0


class Header:
    """The header of one message as qmail-inject rewrites it."""

    def __init__(self, rewriter: Rewriter, settings: Settings, sender: bytes | None = None) -> None:
        self.rw = rewriter
        self.settings = settings
        self.sender = sender  # None until -f, Return-Path or the default sets it
        self.utf8 = False  # SMTPUTF8 (RFC 6532): UTF-8 words are atoms, UTF-8 local parts stay unquoted
        self.seen: set[int] = set()
        self.saved: list[bytes] = []
        self.hr: list[bytes] = []  # To, Cc, Bcc, Apparently-To
        self.tocc: list[bytes] = []  # To, Cc
        self.hrr: list[bytes] = []  # Resent-To, Resent-Cc, Resent-Bcc
        self._rewrites: dict[int, Callable[[list[Token]], None]] = {
            TO: self._rw_tocc, CC: self._rw_tocc,
            BCC: self._rw_hr, APPARENTLYTO: self._rw_hr,
            R_TO: self._rw_hrr, R_CC: self._rw_hrr, R_BCC: self._rw_hrr,
            RETURNPATH: self._rw_return,
            SENDER: self.rw.generic, FROM: self.rw.generic, REPLYTO: self.rw.generic,
            RETURNRECEIPTTO: self.rw.generic, ERRORSTO: self.rw.generic,
            R_SENDER: self.rw.generic, R_FROM: self.rw.generic, R_REPLYTO: self.rw.generic,
        }

    # --- address callbacks -------------------------------------------------------

    def _rw_return(self, addr: list[Token]) -> None:
        self.rw.generic(addr)
        if self.sender is None:
            self.sender = rfc822.unquote(addr) + (b"-@[]" if self.settings.hack_recip else b"")

    def _rw_hr(self, addr: list[Token]) -> None:
        self.rw.generic(addr)
        self.hr.append(rfc822.unquote(addr))

    def _rw_tocc(self, addr: list[Token]) -> None:
        self.rw.generic(addr)
        box = rfc822.unquote(addr)
        self.hr.append(box)
        self.tocc.append(box)

    def _rw_hrr(self, addr: list[Token]) -> None:
        self.rw.generic(addr)
        self.hrr.append(rfc822.unquote(addr))

    def _rewrite(self, text: bytes, rewrite: Callable[[list[Token]], None]) -> bytes:
        toks = rfc822.tokenize(text, self.utf8)
        if toks is None:
            raise ParseError(text)
        new = rfc822.addrlist(toks, rewrite)
        if new is None:
            raise ParseError(text)
        return rfc822.unparse(new, LINELEN)

    # --- the header --------------------------------------------------------------

    def field(self, h: bytes) -> None:
        """Take one header field (with its newline and continuation lines).

        Raise ParseError if its address list cannot be parsed, InvalidField if
        its name is not a valid field name.
        """
        kind = field_type(h)
        s = self.settings
        if kind == FROM and s.delete_from:
            return
        if kind == MESSAGEID and s.delete_messid:
            return
        if kind == RETURNPATH and s.delete_sender:
            return
        if kind:
            self.seen.add(kind)
        elif not field_valid(h):
            raise InvalidField(h)
        rewrite = self._rewrites.get(kind)
        if rewrite is not None:
            h = self._rewrite(h, rewrite)
        if kind not in DROPPED:
            self.saved.append(h)

    @property
    def resent(self) -> bool:
        """True if the message is being resent (it has a Resent- field)."""
        return not self.seen.isdisjoint(RESENT)

    def recipients(self) -> list[bytes]:
        """Return the header recipients: Resent-To/Cc/Bcc if resent, else To/Cc/Bcc/Apparently-To."""
        return self.hrr if self.resent else self.hr

    def default_from(self) -> bytes:
        """Return the From field qmail-inject makes (without its Resent- prefix)."""
        s = self.settings
        named = s.fullname is not None and not s.name_comment
        toks: list[Token] = [(rfc822.ATOM, b"From"), rfc822.punct(rfc822.COLON)]
        if named:
            toks += [(rfc822.QUOTE, s.fullname or b""), rfc822.punct(rfc822.LEFT)]
        toks.append((rfc822.QUOTE if rfc822.quote_need(s.mailuser) else rfc822.ATOM, s.mailuser))
        if s.mailhost is not None:
            toks += [rfc822.punct(rfc822.AT), (rfc822.ATOM, s.mailhost)]
        if named:
            toks.append(rfc822.punct(rfc822.RIGHT))
        if s.fullname is not None and s.name_comment:
            toks.append((rfc822.COMMENT, s.fullname))
        # Printed, then read back and rewritten like any From field.
        return self._rewrite(rfc822.unparse(toks, LINELEN), self.rw.generic)

    def default_sender(self) -> None:
        """Set the envelope sender from the environment, with the VERP letters r and m."""
        s = self.settings
        box = s.mailruser
        if s.hack_mess:
            box += b"-%d.%d" % (s.starttime, s.pid)
        if s.hack_recip:
            box += b"-"
        toks: list[Token] = [(rfc822.ATOM, b"Return-Path"), rfc822.punct(rfc822.COLON), (rfc822.QUOTE, box)]
        if s.mailrhost is not None:
            toks += [rfc822.punct(rfc822.AT), (rfc822.ATOM, s.mailrhost)]
        self._rewrite(rfc822.unparse(toks, LINELEN), self._rw_return)

    def followup(self) -> bytes:
        """Return the Mail-Followup-To field for QMAILMFTFILE, or b"" if none is due."""
        mft = self.settings.mft
        if mft is None or MAILFOLLOWUPTO in self.seen:
            return b""
        if not any(box.lower() in mft for box in self.tocc):
            return b""
        boxes = [rfc822.quote2(c_string(box), self.utf8) for box in reversed(self.tocc)]
        return b"Mail-Followup-To: " + b",\n  ".join(boxes) + b"\n"

    def finish(self, show_return_path: bool) -> bytes:
        """Return the whole new header; raise ParseError if a default field cannot be made.

        show_return_path (qmail-inject -n) puts the envelope sender on top as
        a Return-Path field.
        """
        s = self.settings
        if self.sender is None:
            self.default_sender()
        out = bytearray()
        if show_return_path:
            out += b"Return-Path: <" + rfc822.quote2(c_string(self.sender or b""), self.utf8) + b">\n"
        seen = self.seen
        if self.resent:
            if R_DATE not in seen:
                out += b"Resent-" + date_field(s.starttime)
            if R_MESSAGEID not in seen:
                out += b"Resent-" + msgid_field(s.starttime, s.pid, s.idhost)
            if R_FROM not in seen:
                out += b"Resent-" + self.default_from()
            if R_TO not in seen and R_CC not in seen:
                out += RESENT_CC_NOT_SHOWN
        else:
            if DATE not in seen:
                out += date_field(s.starttime)
            if MESSAGEID not in seen:
                out += msgid_field(s.starttime, s.pid, s.idhost)
            if FROM not in seen:
                out += self.default_from()
            if TO not in seen and CC not in seen:
                out += CC_NOT_SHOWN
            out += self.followup()
        for h in self.saved:
            out += h
        return bytes(out)
