"""qmail-smtpd's DNSBL check: control/dnsbllist, as sagredo's qmail (its rbl patch, after Fabio
Busatto's qmail-dnsbl), with rblsmtpd's answers (pyqmail.ucspi.rbl decides, pyqmail.ucspi.dnsq asks).

control/dnsbllist ($DNSBLLIST names another file), one source a line, asked in order
at the first RCPT of a client that may not relay, until one decides:

- ``zone``: listed when reversed-IP.zone has a TXT record; ``451 TEXT``.
- ``-zone``: the same, ``553 TEXT`` (rblsmtpd -b).
- ``zone:text``, ``-zone:text`` or ``zone:-text``: listed when reversed-IP.zone has an A
  record; the reply is text (``%IP%`` replaced by the client's address), 553 with a '-'.
- ``+zone``: a whitelist: an A record accepts the client (rblsmtpd -a); ``+zone:text`` alike.
- ``=zone``: asked and logged only.

$RBLSMTPD decides before any source, as for rblsmtpd ("" accepts, ``-text`` is 553,
else 451). A lookup that fails (no cache answers) makes any later listing 451, never
553; control/dnsblfailclosed or $DNSBLFAILCLOSED (a number, not 0) refuses the client on
such a failure with ``451 temporary RBL lookup error`` (rblsmtpd -c). The text is cut at
200 bytes, bytes outside printable ASCII as '?'. A 451 ends the connection after the
reply (the patch's die_rbldelay); a 553 refuses this and every later RCPT. Never asked
for a client that may relay (RELAYCLIENT, AUTH, a tlsclients certificate), when
$DNSBLSKIP is set, or without $TCPREMOTEIP. Each source asked is logged with the IP.
IPv6 clients are looked up by their reversed nibbles (RFC 5782).
"""

from __future__ import annotations

import os

from pyqmail import control
from pyqmail import home as _home
from pyqmail.control import ControlError
from pyqmail.smtpd import policy
from pyqmail.smtpd.log import field, warn
from pyqmail.ucspi import dnsq
from pyqmail.ucspi.rbl import ACCEPTED_CLIENT, Decision
from pyqmail.ucspi.rules import scan_ulong

UNKNOWN = b"unknown"  # qmail-smtpd's remote IP when $TCPREMOTEIP is not set

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from pyqmail.smtpd.policy import View

CONTROL = "dnsbllist"
FAILCLOSED = "dnsblfailclosed"
TXT, A, WHITE, LOG = "txt", "a", "white", "log"


class Source:
    """One line of control/dnsbllist."""

    __slots__ = ("kind", "zone", "bounce", "text")

    def __init__(self, kind: str, zone: bytes, bounce: bool = False, text: bytes | None = None) -> None:
        self.kind = kind
        self.zone = zone
        self.bounce = bounce
        self.text = text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Source) and (self.kind, self.zone, self.bounce, self.text) == (
            other.kind, other.zone, other.bounce, other.text)

    def __repr__(self) -> str:
        return f"Source({self.kind!r}, {self.zone!r}, {self.bounce!r}, {self.text!r})"


def parse(line: bytes) -> Source | None:
    """Return the source a dnsbllist line names, or None for a line the patch does not allow."""
    line = line.strip()
    kind, bounce = TXT, False
    if line[:1] == b"+":
        kind, line = WHITE, line[1:]
    elif line[:1] == b"-":
        bounce, line = True, line[1:]
    elif line[:1] == b"=":
        kind, line = LOG, line[1:]
    zone, colon, text = line.partition(b":")
    zone = zone.strip()
    if not zone:
        return None
    if not colon:
        return Source(kind, zone, bounce)
    if text[:1] == b"-":
        bounce, text = True, text[1:]
    if not text:
        return None  # "zone:" and "zone:-" are not allowed
    return Source(A if kind == TXT else kind, zone, bounce, text)


def _a_text(text: bytes, ip: bytes, ip4: Callable[[bytes], list[str]]) -> Callable[[bytes], bytes]:
    """Return a TXT-like lookup that answers text (with %IP%) when the name has an A record."""
    reply = text.replace(b"%IP%", ip)

    def lookup(name: bytes) -> bytes:
        return reply if ip4(name) else b""

    return lookup


def decide(ip: bytes, sources: list[Source], rblsmtpd: bytes | None, fail_closed: bool,
           txt: Callable[[bytes], bytes], ip4: Callable[[bytes], list[str]],
           log: Callable[[bytes], None] = warn) -> Decision:
    """Ask the sources in order until one decides; return rblsmtpd's Decision (lookups given)."""
    d = Decision(ip, rblsmtpd)
    d.fail_closed = fail_closed
    for src in sources:
        if d.decision:
            break
        name = d.prefix + src.zone
        if src.kind == LOG:
            try:
                found = txt(name)
                result = b"listed (ignored)" if found else b"pass"
            except dnsq.Temporary:
                found, result = b"", b"dnserr"
            log(b"dnsbl: ip " + field(ip) + b" query " + field(name) + b" result " + result
                + (b": " + field(found) if found else b""))
            continue
        failed = d.must_not_bounce
        if src.kind == WHITE:
            d.antirbl(src.zone, ip4)
        else:
            d.bounce_listed = src.bounce
            d.rbl(src.zone, _a_text(src.text or b"", ip, ip4) if src.kind == A else txt)
        if d.must_not_bounce and not failed:
            result = b"dnserr"  # the first failure; a later one is logged alike
        elif d.decision == ACCEPTED_CLIENT:
            result = b"whitelisted" if src.kind == WHITE else b"accepted"
        elif d.blocked:
            result = b"listed"
        else:
            result = b"pass"
        log(b"dnsbl: ip " + field(ip) + b" query " + field(name) + b" result " + result
            + (b": " + field(d.text) if d.blocked else b""))
    return d


class Dnsbl(policy.Check):
    """control/dnsbllist at the first RCPT of a client that may not relay."""

    name = "dnsbl"

    def __init__(self, sources: list[Source], rblsmtpd: bytes | None, fail_closed: bool,
                 txt: Callable[[bytes], bytes] = dnsq.txt,
                 ip4: Callable[[bytes], list[str]] = dnsq.ip4) -> None:
        self.sources = sources
        self.rblsmtpd = rblsmtpd
        self.fail_closed = fail_closed
        self.txt = txt
        self.ip4 = ip4
        self.verdict: policy.Verdict | None = None
        self.asked = False

    def rcpt(self, s: View, addr: bytes) -> policy.Verdict | None:
        if s.relaying or s.authuser is not None or s.remoteip in (b"", UNKNOWN):
            return None  # without $TCPREMOTEIP (qmail-smtpd's "unknown"): nothing to look up
        if not self.asked:  # once a session, as the patch (flagrbldns)
            self.asked = True
            d = decide(s.remoteip, self.sources, self.rblsmtpd, self.fail_closed, self.txt, self.ip4)
            if d.blocked:
                message = d.message()
                warn(b"dnsbl: refused ip " + field(s.remoteip) + b": " + message)
                self.verdict = policy.Verdict(message + b"\r\n", drop=message[:1] == b"4")
        return self.verdict


def _read_lines(name: bytes) -> list[str] | None:
    """Return the lines of the file $DNSBLLIST names (relative to the home, the cwd), as control.read_lines."""
    try:
        with open(os.path.join(_home.home().encode(), name), "rb") as f:
            data = f.read(1 << 20)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ControlError(f"unable to read controls: {name!r}: {e.strerror}") from e
    lines = (raw.decode("latin-1").rstrip(" \t") for raw in data.split(b"\n"))
    return [line for line in lines if line and not line.startswith("#")]


def load(env: Mapping[bytes, bytes]) -> Dnsbl | None:
    """Return the check when control/dnsbllist ($DNSBLLIST) or $RBLSMTPD asks for one, else None.

    Raises ControlError when a file cannot be read.
    """
    if b"DNSBLSKIP" in env:
        return None
    name = env.get(b"DNSBLLIST")
    lines = control.read_lines(CONTROL) if name is None else _read_lines(name)
    rblsmtpd = env.get(b"RBLSMTPD")
    if lines is None and rblsmtpd is None:
        return None
    sources = [src for src in (parse(line.encode("latin-1")) for line in lines or []) if src is not None]
    x = env.get(b"DNSBLFAILCLOSED")
    fail_closed = scan_ulong(x)[0] != 0 if x is not None else control.read_int(FAILCLOSED, 0) != 0
    if not sources and rblsmtpd is None:
        return None
    if sources:
        dnsq.preload()  # in tcpserver's parent (qmail_smtpd.preload), once for every child
    return Dnsbl(sources, rblsmtpd, fail_closed)


policy.register("dnsbl", load)
