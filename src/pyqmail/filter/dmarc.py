"""DMARC (RFC 7489) evaluation of inbound mail, and the SPF check it needs.

The decision (`evaluate`) is a function of the From domain, the SPF result,
the domains of the DKIM signatures that passed and a lookup function: no I/O
of its own, so tests give it a table. `lookup_txt` and `spf_check` are the
I/O: DNS through dnspython with $DNSCACHEIP honoured (pyqmail.remote.mx's
resolver), SPF through pyspf. `spf_check` is the one place SPF is asked, so
an SPF check at SMTP time can reuse it.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

OK = 0
SOFT = 1  # temporary DNS failure
HARD = 2  # no such name / no records

POLICIES = ("none", "quarantine", "reject")


class Record:
    """A DMARC policy record: p, sp, adkim, aspf (r or s), pct, and the domain it was found at."""

    __slots__ = ("p", "sp", "adkim", "aspf", "pct", "domain")

    def __init__(self, p: str, sp: str, adkim: str, aspf: str, pct: int, domain: str) -> None:
        self.p = p
        self.sp = sp
        self.adkim = adkim
        self.aspf = aspf
        self.pct = pct
        self.domain = domain


class Result:
    """The DMARC outcome: result (pass/fail/none/temperror/permerror), the record, the disposition."""

    __slots__ = ("result", "record", "policy", "disposition", "from_domain")

    def __init__(self, result: str, from_domain: str, record: Record | None = None,
                 policy: str = "none", disposition: str = "none") -> None:
        self.result = result
        self.from_domain = from_domain
        self.record = record
        self.policy = policy  # the policy that applies to from_domain (p, or sp for a subdomain)
        self.disposition = disposition  # what the policy asks for this message after pct

    def ar(self) -> str:
        """Return the dmarc= part of an Authentication-Results header (RFC 7489 11.2)."""
        if self.record is None:
            return f"dmarc={self.result} header.from={self.from_domain}"
        return f"dmarc={self.result} (p={self.policy} dis={self.disposition}) header.from={self.from_domain}"


def parse_record(text: str, domain: str) -> Record | None:
    """Return the Record of a TXT string, None if it is not a DMARC record (RFC 7489 6.3, 6.6.3)."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip().lower(), value.strip())
    if tags.get("v") != "DMARC1" or not text.lstrip().startswith("v"):
        return None
    p = tags.get("p", "").lower()
    if p not in POLICIES:
        # 6.6.3: a record without a valid p, but with rua, is read as p=none; without, it is none at all.
        if "rua" not in tags:
            return None
        p = "none"
    sp = tags.get("sp", "").lower()
    if sp not in POLICIES:
        sp = p
    adkim = "s" if tags.get("adkim", "r").lower() == "s" else "r"
    aspf = "s" if tags.get("aspf", "r").lower() == "s" else "r"
    pct_text = tags.get("pct", "100")
    pct = int(pct_text) if pct_text.isdigit() else 100
    return Record(p, sp, adkim, aspf, min(pct, 100), domain)


_psl: object | None = None


def org_domain(domain: str) -> str:
    """Return the organizational domain of domain (RFC 7489 3.2): the public suffix plus one label."""
    global _psl
    if _psl is None:
        from publicsuffixlist import PublicSuffixList

        _psl = PublicSuffixList()
    found = _psl.privatesuffix(domain.lower().rstrip("."))  # type: ignore[attr-defined]
    return str(found) if found else domain.lower().rstrip(".")


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    """Return whether a DKIM d= or SPF domain is aligned with the From domain (strict s, relaxed r)."""
    a = identifier.lower().rstrip(".")
    b = from_domain.lower().rstrip(".")
    if a == b:
        return True
    return mode == "r" and org_domain(a) == org_domain(b)


def discover(from_domain: str, lookup: Callable[[str], tuple[int, list[str]]]) -> tuple[int, Record | None]:
    """Return (OK, record or None) or (SOFT, None): the policy for from_domain, at itself or its org domain."""
    names = [from_domain]
    org = org_domain(from_domain)
    if org != from_domain:
        names.append(org)
    for name in names:
        status, texts = lookup("_dmarc." + name)
        if status == SOFT:
            return SOFT, None
        records = [r for r in (parse_record(t, name) for t in texts) if r is not None]
        if len(records) == 1:
            return OK, records[0]
        # none, or more than one (6.6.3: then no policy): try the org domain
    return OK, None


def evaluate(from_domain: str, spf_result: str, spf_domain: str, dkim_domains: Sequence[str],
             lookup: Callable[[str], tuple[int, list[str]]],
             sample: Callable[[], int] | None = None) -> Result:
    """Return the DMARC Result for a message.

    spf_domain is the domain SPF checked (MAIL FROM's, or HELO's for <>);
    dkim_domains the d= of every signature that passed. sample returns a
    number in 0..99 for pct (default: random); a message outside pct gets
    the next milder disposition (RFC 7489 6.6.4).
    """
    from_domain = from_domain.lower().rstrip(".")
    status, record = discover(from_domain, lookup)
    if status == SOFT:
        return Result("temperror", from_domain)
    if record is None:
        return Result("none", from_domain)
    policy = record.p if record.domain == from_domain else record.sp
    passed = any(aligned(d, from_domain, record.adkim) for d in dkim_domains) or (
        spf_result == "pass" and bool(spf_domain) and aligned(spf_domain, from_domain, record.aspf))
    if passed:
        return Result("pass", from_domain, record, policy, "none")
    disposition = policy
    if policy != "none" and record.pct < 100:
        roll = sample() if sample is not None else int.from_bytes(os.urandom(2), "big") % 100
        if roll >= record.pct:
            disposition = "quarantine" if policy == "reject" else "none"
    return Result("fail", from_domain, record, policy, disposition)


def lookup_txt(env: Mapping[str, str]) -> Callable[[str], tuple[int, list[str]]]:
    """Return a function giving (OK|SOFT|HARD, TXT strings) for a name, through $DNSCACHEIP or the system's."""
    from pyqmail.remote import mx

    resolver = mx.Resolver.from_env(dict(env))
    resolver.lifetime = 10.0

    def lookup(name: str) -> tuple[int, list[str]]:
        status, texts = resolver.query(name, "TXT")
        return (SOFT if status == mx.SOFT else OK if status == mx.OK else HARD), texts

    return lookup


def spf_check(ip: str, sender: str, helo: str, env: Mapping[str, str]) -> tuple[str, str]:
    """Return (SPF result, the domain checked) for a client ip, MAIL FROM sender and HELO name (RFC 7208).

    The result is pyspf's: pass, fail, softfail, neutral, none, temperror or
    permerror; $SPFRESULT, set by qmail-smtpd's own check, is taken as it is.
    An empty sender is checked as postmaster@helo (RFC 7208 2.4).
    DNS is $DNSCACHEIP's when set (dnspython's default resolver for pyspf).
    """
    if not ip:
        return "none", ""
    domain = sender.rpartition("@")[2] if sender else helo
    if not domain:
        return "none", ""
    found = env.get("SPFRESULT")
    if found is not None:
        # qmail-smtpd checked SPF at MAIL (pyqmail.smtpd.spf) and says so in the environment it
        # gives qmail-queue ($QMAILQUEUE): that result, not a second round of DNS queries. Its words
        # are the SPF patch's (error, unknown for RFC 7208's temperror, permerror).
        return {"error": "temperror", "unknown": "permerror"}.get(found, found), domain
    import spf

    use_dnscacheip(env)
    try:
        result, _ = spf.check2(i=ip, s=sender or f"postmaster@{helo}", h=helo or domain, timeout=20)
    except Exception:  # noqa: BLE001 - pyspf raises for odd inputs; RFC 7208 2.6.7
        return "permerror", domain
    return str(result).lower(), domain


def use_dnscacheip(env: Mapping[str, str] | None) -> None:
    """Point pyspf's DNS (dnspython's default resolver) at $DNSCACHEIP when env sets it.

    qmail-smtpd's SPF check (pyqmail.smtpd.spf) uses this too.
    """
    value = (env or {}).get("DNSCACHEIP")
    if value:
        import dns.nameserver
        import dns.resolver

        from pyqmail.remote import mx

        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [dns.nameserver.Do53Nameserver(a, p) for a, p in mx.parse_nameservers(value)]
        r.lifetime = 10.0
        dns.resolver.default_resolver = r
