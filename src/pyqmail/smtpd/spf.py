"""SPF (RFC 7208) at SMTP time, with the interface of the qmail SPF patch (Jana Saout's).

control/spfbehavior ($SPFBEHAVIOR overrides it) says what a result does:

    0  no SPF check, no Received-SPF header (the default)
    1  a Received-SPF header only, never a refusal
    2  and a DNS problem (temperror) is `451 SPF lookup failure (#4.3.0)` at MAIL
    3  and fail refuses the recipients
    4  and softfail too
    5  and neutral too
    6  and everything but pass (none and permerror too); more than 6 is 6

The check runs at MAIL FROM (the patch's place); a refusal is answered at each
RCPT with `550 EXPLANATION (#5.7.1)` (one `550-` line per line of it, at most
8, each cut to fit a 512-byte reply line), as badmailfrom is. A client with
RELAYCLIENT, an authenticated client and a client certificate listed in
tlsclients are never checked and get no header;
nor are 127.0.0.1 and this host's own addresses (the patch's "local policy"
pass). control/spfrules is local mechanisms tried before the record's final
`-all`/`~all`/`?all` run (and alone when the domain has no record);
control/spfguess a record to assume for a domain without one;
control/spfexp the explanation (patch macros: %{S} %{I} %{xR} ...), the
record's own exp= taking precedence.

The header is the patch's, below qmail-smtpd's Received line, e.g.

    Received-SPF: pass (mx.example.org: SPF record at example.com designates 192.0.2.1 as permitted sender)

with the patch's result words: `error` for RFC 7208's temperror, `unknown`
for permerror (`RECEIVED_WORDS`). qmail-dkim's DMARC evaluation reads this
header instead of asking SPF again (pyqmail.filter.dkim).

`decide` is the pure part; `check` asks pyspf, with DNS through $DNSCACHEIP
as pyqmail.filter.dmarc sets it up.
"""

from __future__ import annotations

import posix

from pyqmail import control
from pyqmail.smtpd import policy

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

    from pyqmail.smtpd.policy import View

PASS = "pass"
FAIL = "fail"
SOFTFAIL = "softfail"
NEUTRAL = "neutral"
NONE = "none"
TEMPERROR = "temperror"
PERMERROR = "permerror"

# What the patch writes in Received-SPF for each RFC 7208 result.
RECEIVED_WORDS = {PASS: "pass", FAIL: "fail", SOFTFAIL: "softfail", NEUTRAL: "neutral", NONE: "none",
                  TEMPERROR: "error", PERMERROR: "unknown"}
# And back: how a reader of the header (qmail-dkim's DMARC) gets the RFC 7208 result.
FROM_RECEIVED = {v: k for k, v in RECEIVED_WORDS.items()} | {TEMPERROR: TEMPERROR, PERMERROR: PERMERROR}

# The lowest spfbehavior at which each result refuses the message.
REFUSE_AT = {FAIL: 3, SOFTFAIL: 4, NEUTRAL: 5, NONE: 6, PERMERROR: 6}
TEMP_AT = 2

LOOKUP_FAILURE = b"451 SPF lookup failure (#4.3.0)\r\n"
EXP_LINE_MAX = 512 - len(b"550 ") - len(b" (#5.7.1)\r\n")  # bytes of an explanation line in the reply
EXP_LINES = 8  # lines of an explanation sent
DEFAULT_EXP = "See http://spf.pobox.com/why.html?sender=%{S}&ip=%{I}&receiver=%{xR}"
TIMEOUT = 20  # seconds for each DNS lookup (RFC 7208 4.6.4), as pyqmail.filter.dmarc

OK = 0  # go on
TEMP = 1  # 451 at MAIL
REFUSE = 2  # 550 at every RCPT


def decide(result: str, behavior: int) -> int:
    """Return OK, TEMP or REFUSE for an SPF result under spfbehavior (the patch's table)."""
    if behavior <= 0:
        return OK
    if result == TEMPERROR:
        return TEMP if behavior >= TEMP_AT else OK
    at = REFUSE_AT.get(result)
    return REFUSE if at is not None and behavior >= at else OK


class Settings:
    """spfbehavior and the texts it uses: local rules, guess, explanation."""

    __slots__ = ("behavior", "rules", "guess", "exp")

    def __init__(self, behavior: int, rules: str = "", guess: str = "", exp: str = DEFAULT_EXP) -> None:
        self.behavior = behavior
        self.rules = rules
        self.guess = guess
        self.exp = exp

    @classmethod
    def load(cls, env: Mapping[bytes, bytes] | None = None) -> Settings | None:
        """Read $SPFBEHAVIOR or control/spfbehavior and the other controls; None when 0 (off).

        Raise ControlError when a control file exists but cannot be read.
        """
        e = posix.environ if env is None else env
        x = e.get(b"SPFBEHAVIOR")
        if x is not None:
            from pyqmail.smtpd.session import scan_ulong

            behavior = scan_ulong(x)[0]
        else:
            behavior = control.read_int("spfbehavior", 0)
        if behavior <= 0:
            return None
        return cls(min(behavior, 1 << 31), control.read_line("spfrules") or "",
                   control.read_line("spfguess") or "", control.read_line("spfexp") or DEFAULT_EXP)


class Verdict:
    """One SPF check: the result, its Received-SPF field, and the explanation for a refusal."""

    __slots__ = ("result", "field", "_values", "_exp", "_explanation", "domain")

    def __init__(self, result: str, field: bytes, values: dict[str, str], exp: str, domain: str) -> None:
        self.result = result
        self.field = field  # "Received-SPF: ...\n"
        self._values = values
        self._exp = exp
        self._explanation: bytes | None = None
        self.domain = domain  # the domain checked (MAIL FROM's, or HELO's for <>)

    @property
    def explanation(self) -> bytes:
        """The record's exp= text, else control/spfexp expanded (made when first asked: a refusal)."""
        if self._explanation is None:
            text = self._values.get("exp") or expand(self._exp, self._values)
            # The record's exp= is the sender domain's text: RFC 5321 4.5.3.1.5 allows a reply
            # line of 512 bytes, so each line is cut to fit after "550-" and " (#5.7.1)", and a
            # few lines are kept.
            lines = safe_reply(text).split(b"\n")[:EXP_LINES]
            self._explanation = b"\n".join(line[:EXP_LINE_MAX] for line in lines)
        return self._explanation

    @explanation.setter
    def explanation(self, value: bytes) -> None:
        self._explanation = value

    def refusal(self) -> bytes:
        """Return the 550 reply: one line per line of the explanation, the last with (#5.7.1)."""
        lines = self.explanation.split(b"\n") or [b""]
        out = [b"550-" + line + b"\r\n" for line in lines[:-1]]
        out.append(b"550 " + lines[-1] + b" (#5.7.1)\r\n")
        return b"".join(out)


_UNRESERVED = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~")


def _urlencode(text: str) -> str:
    return "".join(c if c in _UNRESERVED else "".join(f"%{b:02x}" for b in c.encode("utf-8")) for c in text)


def expand(spec: str, values: Mapping[str, str]) -> str:
    """Expand the patch's macros in spec: %{X}, %%, %_, %-, with digits, r and delimiters.

    values maps a macro letter (l s o d i t p v h, and the patch's own xR xE xS)
    to its text; an upper-case letter is URL-encoded. An unknown letter is empty.
    """
    out: list[str] = []
    i = 0
    n = len(spec)
    while i < n:
        c = spec[i]
        if c != "%" or i + 1 >= n:
            out.append(c)
            i += 1
            continue
        nxt = spec[i + 1]
        if nxt == "%":
            out.append("%")
            i += 2
        elif nxt == "_":
            out.append(" ")
            i += 2
        elif nxt == "-":
            out.append("%20")
            i += 2
        elif nxt == "{" and "}" in spec[i + 2:]:
            end = spec.index("}", i + 2)
            out.append(_macro(spec[i + 2:end], values))
            i = end + 1
        else:
            out.append("%")
            i += 1
    return "".join(out)


def _macro(body: str, values: Mapping[str, str]) -> str:
    x = body[:1] == "x"
    if x:
        body = body[1:]
    if not body:
        return ""
    letter = body[0]
    encode = letter.isupper()
    key = ("x" + letter.upper()) if x else letter.lower()
    text = values.get(key, "")
    rest = body[1:]
    j = 0
    while j < len(rest) and rest[j].isdigit():
        j += 1
    digits = int(rest[:j]) if j else 0
    rest = rest[j:]
    reverse = rest[:1].lower() == "r"
    if reverse:
        rest = rest[1:]
    delims = rest or "."
    if digits or reverse or rest:
        parts = [text]
        for d in delims:
            parts = [p for part in parts for p in part.split(d)]
        if reverse:
            parts.reverse()
        if digits:
            parts = parts[-digits:]
        text = ".".join(parts)
    return _urlencode(text) if encode else text


def _header_text(result: str, values: Mapping[str, str]) -> str:
    """Return the patch's Received-SPF text for a result (values as for expand)."""
    if result == PASS:
        spec = "pass (%{xr}: %{xs} designates %{i} as permitted sender)"
    elif result == FAIL:
        spec = "fail (%{xr}: %{xs} does not designate %{i} as permitted sender)"
    elif result == SOFTFAIL:
        spec = "softfail (%{xr}: transitioning %{xs} does not designate %{i} as permitted sender)"
    elif result == NEUTRAL:
        spec = "neutral (%{xr}: %{i} is neither permitted nor denied by %{xs})"
    elif result == NONE:
        spec = "none (%{xr}: domain at %{d} does not designate permitted sender hosts)"
    elif result == TEMPERROR:
        spec = "error (%{xr}: error in processing during lookup of %{d}: %{xe})"
    else:
        spec = "unknown (%{xr}: %{xe})"
    return expand(spec, values)


def insert_rules(record: str, rules: str) -> str:
    """Return record with the local rules before its final run of -all/~all/?all (the patch's place).

    The run is the last mechanisms sharing one of the qualifiers - ~ ? that
    ends in `all`; without one the rules are not inserted (nothing falls
    through to them).
    """
    if not rules:
        return record
    terms = record.split()
    start = None
    for k, term in enumerate(terms[1:], 1):
        q = term[:1]
        if start is not None and q != terms[start][:1]:
            start = None
        if start is None and q in ("-", "~", "?"):
            start = k
        if start is not None and term[1:].lower() == "all":
            return " ".join(terms[:start] + rules.split() + terms[start:])
    return record


def _is_local(ip: str, ipme: Callable[[tuple[int, int, int, int]], bool] | None) -> bool:
    if ip in ("127.0.0.1", "::1"):
        return True  # the patch's 127.0.0.1; ::1 is the same host (the patch knew no IPv6)
    parts = ip.split(".")
    if ipme is None or len(parts) != 4 or not all(p.isdigit() for p in parts):
        return False
    return ipme((int(parts[0]) & 255, int(parts[1]) & 255, int(parts[2]) & 255, int(parts[3]) & 255))


def check(settings: Settings, ip: str, sender: str, helo: str, receiver: str,
          env: Mapping[str, str] | None = None,
          ipme: Callable[[tuple[int, int, int, int]], bool] | None = None) -> Verdict:
    """Return the Verdict for a client ip, MAIL FROM sender (may be empty) and HELO name.

    receiver is this host's name for the texts (the patch's TCPLOCALHOST).
    DNS is $DNSCACHEIP's in env when set. Never raises for what DNS or a
    record says: a DNS failure is temperror, a broken record permerror.
    """
    at = sender.rfind("@")
    if at != -1:
        domain = sender[at + 1:]
    else:
        domain = helo[helo.rfind("@") + 1:]  # the patch takes what follows an @ in HELO
    values = {"s": sender, "l": sender[:at] if at != -1 else "postmaster", "o": domain, "d": domain,
              "i": ip, "h": helo, "v": "in-addr" if "." in ip else "ip6", "p": "unknown",
              "xR": receiver, "xE": "", "xS": "SPF record at " + domain}
    result, local = _evaluate(settings, ip, sender, helo, domain, receiver, env, ipme, values)
    if local:
        values["xS"] = "local policy"
    # The texts hold the client's MAIL domain or HELO and pyspf's error texts: a CR there would
    # end the field for many readers (a field injected below qmail's Received line).
    text = _header_text(result, values).encode("utf-8", "replace").translate(_NO_CONTROLS)
    field = b"Received-SPF: " + text + b"\n"
    return Verdict(result, field, values, settings.exp, domain)


_NO_CONTROLS = bytes(c if 32 <= c != 127 else 63 for c in range(256))  # control bytes as '?', 8-bit kept


def safe_reply(text: str) -> bytes:
    """Return text for a reply: lines kept, every other control byte and any non-ASCII made '?'."""
    raw = text.encode("utf-8", "replace")
    return b"\n".join(safe_line(line) for line in raw.split(b"\n"))


def safe_line(line: bytes) -> bytes:
    return bytes(c if 32 <= c < 127 else 63 for c in line)


def _evaluate(settings: Settings, ip: str, sender: str, helo: str, domain: str, receiver: str,
              env: Mapping[str, str] | None, ipme: Callable[[tuple[int, int, int, int]], bool] | None,
              values: dict[str, str]) -> tuple[str, bool]:
    """Return (result, whether local policy decided it); fill values' xE and exp."""
    if not ip or ip == "unknown":
        values["xE"] = "No IP address in conversation"
        return PERMERROR, False
    if _is_local(ip, ipme):
        return PASS, True
    if not domain:
        return NONE, False
    import spf

    if env is not None:
        from pyqmail.filter import dmarc

        dmarc.use_dnscacheip(env)
    from pyqmail.smtpd import spfdns

    if spf.DNSLookup is spfdns.lookup:
        return _ask(spf, settings, ip, sender, helo, domain, receiver, values)  # spfdns quiets its fallback
    import warnings

    with warnings.catch_warnings():
        # pyspf calls dnspython's deprecated dns.resolver.query: a warning, not a failure of the check.
        warnings.simplefilter("ignore", DeprecationWarning)
        return _ask(spf, settings, ip, sender, helo, domain, receiver, values)


def _ask(spf: Any, settings: Settings, ip: str, sender: str, helo: str, domain: str, receiver: str,
         values: dict[str, str]) -> tuple[str, bool]:
    """Run pyspf for domain (the module is passed in: imported on first use)."""
    try:
        q = spf.query(i=ip, s=sender, h=helo or domain, receiver=receiver, timeout=TIMEOUT)
        q.d = domain  # the patch checks HELO's domain for <> (pyspf would: postmaster@HELO's)
        try:
            record = q.dns_spf(domain)
        except spf.TempError:
            values["xE"] = "DNS problem"
            return TEMPERROR, False
        except spf.PermError as e:
            values["xE"] = str(e.msg)
            return PERMERROR, False
        mine = settings.rules.split()
        if record:
            text = insert_rules(record, settings.rules)
        elif settings.guess or mine:
            text = "v=spf1 " + " ".join(settings.guess.split() + mine)
        else:
            return NONE, False
        default_exp = "\0default"
        q.set_default_explanation(default_exp)
        result, _, explanation = q.check(spf=text)
    except Exception as e:  # noqa: BLE001 - pyspf raises for odd inputs (RFC 7208 2.6.7)
        values["xE"] = str(e) or type(e).__name__
        return PERMERROR, False
    result = str(result).lower()
    matched = q.mechanism
    if not record and matched is None:
        return NONE, False  # no record, no local rule matched: the patch's none
    if result == TEMPERROR:
        values["xE"] = "DNS problem"
    elif result == PERMERROR:
        values["xE"] = str(getattr(q, "prob", "") or explanation)
    elif result not in RECEIVED_WORDS:
        values["xE"] = str(explanation)
        result = PERMERROR  # ambiguous and the like: pyspf's non-results
    if explanation and explanation != default_exp and result in (FAIL, SOFTFAIL):
        values["exp"] = str(explanation)  # the record's exp=, expanded by pyspf
    local = not record or (matched is not None and matched in mine)
    return result, local


class SpfCheck(policy.Check):
    """The check qmail-smtpd runs (pyqmail.smtpd.policy): SPF at MAIL, its refusal at RCPT, its header at DATA.

    It sets $SPFRESULT (the header's word) for qmail-queue and a $QMAILQUEUE
    filter, as the patch's later versions do, and unsets it when it does not
    check; qmail-dkim's DMARC takes it from there (pyqmail.filter.dmarc.spf_check).
    """

    name = "spf"

    def __init__(self, settings: Settings) -> None:
        from pyqmail.smtpd.ipme import Ipme

        self.settings = settings
        self.ipme = Ipme()
        self.verdict: Verdict | None = None
        self.refuse = False

    def mail(self, s: View, addr: bytes) -> policy.Verdict | None:
        import os

        self.verdict = None
        self.refuse = False
        if s.relaying:
            os.environb.pop(b"SPFRESULT", None)
            return None
        v = check(self.settings, s.remoteip.decode("latin-1"), addr.decode("utf-8", "surrogateescape"),
                  s.helohost.decode("utf-8", "surrogateescape"), s.localhost.decode("latin-1"), None, self.ipme)
        os.environb[b"SPFRESULT"] = RECEIVED_WORDS[v.result].encode()
        step = decide(v.result, self.settings.behavior)
        if step == TEMP:
            return policy.Verdict(LOOKUP_FAILURE)
        self.verdict = v
        self.refuse = step == REFUSE
        return None

    def rcpt(self, s: View, addr: bytes) -> policy.Verdict | None:
        if self.refuse and self.verdict is not None and not s.relaying:
            return policy.Verdict(self.verdict.refusal())
        return None

    def data(self, s: View) -> policy.Verdict | None:
        if self.verdict is not None and not s.relaying:
            return policy.Verdict(header=self.verdict.field)
        return None


def load(env: Mapping[bytes, bytes]) -> SpfCheck | None:
    """Return the SPF check when spfbehavior is above 0; pyspf is imported here (tcpserver's parent)."""
    settings = Settings.load(env)
    if settings is None:
        return None
    _point_dns(env.get(b"DNSCACHEIP"))
    from pyqmail import wait

    if _repoint not in wait.resumed:
        wait.resumed.append(_repoint)
    if b"TCPREMOTEIP" not in env:
        _warm()  # no client: tcpserver's parent preloading (a child always has TCPREMOTEIP)
    return SpfCheck(settings)


_pointed: tuple[bytes | None, object, list[tuple[str, int]]] | None = None  # what _point_dns last set up


def _point_dns(value: bytes | None) -> None:
    """Point pyspf (spfdns; dnspython's default resolver as fallback) at $DNSCACHEIP, else resolv.conf.

    pyspf is imported here, without dnspython's resolver (spfdns.import_spf:
    the fallback loads it, and points it at $DNSCACHEIP, in the child that
    needs it). resolv.conf's nameservers are read as rblsmtpd reads them
    (pyqmail.ucspi.dnsq: none listed is 127.0.0.1). The same value as last
    time, with the lookup and servers it set still in place, is left alone:
    a child forked from tcpserver's parent (preload) has them already.
    """
    global _pointed
    from pyqmail.smtpd import spfdns

    spf = spfdns.import_spf()  # once in tcpserver's parent (preload), not in every child
    if (_pointed is not None and _pointed[0] == value and _pointed[1] is spf.DNSLookup
            and _pointed[2] == spfdns._servers):
        return
    if value:
        from pyqmail.remote import mx

        text = value.decode("latin-1")
        spfdns.install(mx.parse_nameservers(text), text)
    else:
        from pyqmail.ucspi import dnsq

        spfdns.install(dnsq.servers({}))  # /etc/resolv.conf
    _pointed = (value, spf.DNSLookup, list(spfdns._servers))


def _repoint() -> None:
    """A session resumes in a tcpserver worker serving several: its $DNSCACHEIP's servers back in place.

    spfdns keeps the servers in module state, which the session that started last
    (or asked last) set; each session's environment keeps its own $DNSCACHEIP. The
    hub runs this each time it puts a session back (pyqmail.wait.resumed), also in
    the middle of a lookup: spfdns's loop over its servers' list, changed in place,
    goes on over this session's again.
    """
    _point_dns(posix.environ.get(b"DNSCACHEIP"))


_warmed = False
WARM_ROUNDS = 12  # CPython specialises a function's code after 8 calls


def _warm() -> None:
    """Run whole SPF checks once, in tcpserver's parent, against a DNS responder of its own on 127.0.0.1.

    (Called by load after spfdns.install: the checks go to the responder, then the servers come back.)

    Code run for the first time is rewritten (so copied) in each child:
    measured, a forked session's SPF check cost 2.5 ms of CPU and 240 page
    faults more without a warm-up. This runs the whole path (pyspf, spfdns's
    UDP query and its answer) WARM_ROUNDS times, then puts the servers back.
    The responder is a bare thread (_thread: the threading module, and its
    at-fork hook in every child, stay out of the parent) answering each
    query with one TXT record made by hand (dnspython stays unloaded too).
    Best effort: a failure only leaves the children colder.
    """
    global _warmed
    if _warmed:
        return
    _warmed = True
    import _thread
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
    except OSError:
        sock.close()
        return
    record = b"v=spf1 ip4:192.0.2.1 -all"
    rr = b"\xc0\x0c\x00\x10\x00\x01\x00\x00\x00\x3c" + (len(record) + 1).to_bytes(2, "big") \
        + bytes([len(record)]) + record  # the question's name, TXT, IN, TTL 60
    done = _thread.allocate_lock()
    done.acquire()

    def answer() -> None:
        try:
            for _ in range(WARM_ROUNDS):
                data, peer = sock.recvfrom(4096)
                end = data.index(b"\0", 12) + 5  # after the question's (uncompressed) name, type and class
                flags = bytes([0x80 | (data[2] & 0x01), 0x80])  # QR, the query's RD; RA
                sock.sendto(data[:2] + flags + b"\x00\x01\x00\x01\x00\x00\x00\x00" + data[12:end] + rr, peer)
        except (OSError, ValueError):
            pass  # the warm-up stops; the checks below time out quickly
        finally:
            done.release()

    from pyqmail.smtpd import spfdns

    saved_servers = list(spfdns._servers)
    saved_dnscacheip = spfdns._dnscacheip
    _thread.start_new_thread(answer, ())
    spfdns._servers[:] = [("127.0.0.1", sock.getsockname()[1])]
    spfdns._dnscacheip = None
    try:
        settings = Settings(1)
        for _ in range(WARM_ROUNDS):
            v = check(settings, "192.0.2.1", "a@warm.invalid", "warm.invalid", "warm")
            v.refusal()
    finally:
        spfdns._servers[:] = saved_servers
        spfdns._dnscacheip = saved_dnscacheip
        done.acquire(timeout=5)
        sock.close()


policy.register("spf", load)
