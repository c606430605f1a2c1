"""MTA-STS (RFC 8461): the _mta-sts TXT record, the HTTPS policy, its cache, MX patterns.

The policy is fetched from https://mta-sts.DOMAIN/.well-known/mta-sts.txt with the standard
library (http.client over an ssl context with the system's CAs, which $SSL_CERT_FILE can
replace): the name mta-sts.DOMAIN is resolved with qmail-remote's own resolver ($DNSCACHEIP),
the port is 443 unless $PYQMAIL_MTASTS_PORT says otherwise (a test seam). Redirects are not followed
(section 3.3), the body is at most 64 KiB, the media type must be text/plain.

Policies are cached in queue/mtasts/DOMAIN (a directory qmailr alone reads and writes), one
file per domain: the TXT id, the time fetched, then the policy text. A cached policy is used
while its max_age lasts when the TXT record is missing or the fetch fails (section 5.1), and
refetched when the TXT id changes.
"""

from __future__ import annotations

import os
import re
import ssl
import time
from dataclasses import dataclass

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pyqmail.remote.mx import Lookup

CACHE_DIR = "queue/mtasts"
WELL_KNOWN = "/.well-known/mta-sts.txt"
MAX_BODY = 65536
MAX_AGE_LIMIT = 31557600  # RFC 8461 section 3.2
FETCH_TIMEOUT = 30
DEFAULT_PORT = 443

_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\Z")
_ID = re.compile(r"[A-Za-z0-9]{1,32}\Z")


@dataclass(frozen=True, slots=True)
class Policy:
    """A valid policy: mode (enforce, testing, none), MX patterns, max_age, and the TXT id it came with."""

    mode: str
    mx: tuple[str, ...]
    max_age: int
    id: str = ""
    fetched: int = 0

    def expired(self, now: int) -> bool:
        return now >= self.fetched + self.max_age

    def allows(self, mx: str) -> bool:
        """Return whether the MX host name mx matches one of the policy's patterns (section 4.1)."""
        name = mx.rstrip(".").lower()
        for pat in self.mx:
            p = pat.rstrip(".").lower()
            if p.startswith("*."):
                head, dot, tail = name.partition(".")
                if dot and head and tail == p[2:]:
                    return True
            elif p == name:
                return True
        return False


def txt_id(records: list[str]) -> str | None:
    """Return the id of the one STSv1 record among TXT records, None if there is not exactly one valid."""
    found = [r for r in records if r.startswith("v=STSv1")]
    if len(found) != 1:
        return None
    fields: dict[str, str] = {}
    for item in found[0].split(";"):
        k, eq, v = item.strip().partition("=")
        if eq:
            fields.setdefault(k.strip(), v.strip())
    ident = fields.get("id", "")
    if fields.get("v") != "STSv1" or not _ID.match(ident):
        return None
    return str(ident)


def parse(text: str, ident: str = "", fetched: int = 0) -> Policy | None:
    """Return the policy in text (section 3.2), None if it is not a valid one."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.splitlines():
        k, colon, v = line.partition(":")
        if not colon:
            continue
        k, v = k.strip(), v.strip()
        if k == "mx":
            mx.append(v)
        else:
            fields.setdefault(k, v)
    mode = fields.get("mode")
    age = fields.get("max_age", "")
    if fields.get("version") != "STSv1" or mode not in ("enforce", "testing", "none"):
        return None
    if not age.isdigit() or len(age) > 10:
        return None
    if mode != "none" and not mx:
        return None
    return Policy(mode, tuple(mx), min(int(age), MAX_AGE_LIMIT), ident, fetched)


def _cache_path(domain: str) -> str | None:
    d = domain.rstrip(".").lower()
    return os.path.join(CACHE_DIR, d) if _DOMAIN.match(d) and len(d) <= 253 else None


def load(domain: str) -> Policy | None:
    """Return the cached policy for domain (expired or not), None if there is none usable."""
    path = _cache_path(domain)
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BODY + 200)
    except FileNotFoundError:
        return None
    except OSError:
        return None  # an unreadable cache is as good as none: the policy is fetched again
    head, _, text = raw.decode("utf-8", "replace").partition("\n\n")
    lines = head.split("\n")
    if len(lines) != 2 or not lines[1].isdigit():
        return None
    return parse(text, lines[0], int(lines[1]))


def store(domain: str, policy_text: str, ident: str, fetched: int) -> None:
    """Write domain's policy into the cache (a temporary file, fsync, rename); errors are ignored."""
    path = _cache_path(domain)
    if path is None:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(CACHE_DIR, mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            data = f"{ident}\n{fetched}\n\n{policy_text}".encode()
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError:
        # The cache only saves fetches and guards against a later downgrade; a delivery
        # must not fail because it cannot be written.
        try:
            os.unlink(tmp)
        except OSError:
            pass  # never created


def fetch(domain: str, dns: Lookup, port: int = DEFAULT_PORT, timeout: int = FETCH_TIMEOUT) -> str | None:
    """Return the policy text served at https://mta-sts.DOMAIN/.well-known/mta-sts.txt, None on any failure."""
    import http.client
    import socket

    from pyqmail.remote import mx

    host = "mta-sts." + domain.rstrip(".")
    status, addrs = mx.ip(dns, host)
    if status != mx.OK or not addrs:
        return None
    ctx = ssl.create_default_context()  # WebPKI: system CAs, names checked (section 3.3)
    for a in addrs:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
        try:
            sock = socket.create_connection((a.ip, port), timeout=timeout)
            conn.sock = ctx.wrap_socket(sock, server_hostname=host)
            conn.request("GET", WELL_KNOWN, headers={"Host": host, "User-Agent": "pyqmail qmail-remote"})
            resp = conn.getresponse()
            ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
            if resp.status != 200 or ctype != "text/plain":
                return None
            body = resp.read(MAX_BODY + 1)
            if len(body) > MAX_BODY:
                return None
            return body.decode("utf-8", "replace")
        except (OSError, http.client.HTTPException, ssl.SSLError, UnicodeError):
            continue
        finally:
            conn.close()
    return None


def policy(domain: str, dns: Lookup, port: int = DEFAULT_PORT, now: int | None = None) -> Policy | None:
    """Return domain's policy in force (section 5.1), fetched or from the cache; None for no policy."""
    from pyqmail.remote import mx

    t = int(time.time()) if now is None else now
    cached = load(domain)
    status, records = dns.query("_mta-sts." + domain.rstrip("."), "TXT")
    ident = txt_id(records) if status == mx.OK else None
    if ident is None:
        return cached if cached is not None and not cached.expired(t) else None
    if cached is not None and cached.id == ident and not cached.expired(t):
        return cached
    text = fetch(domain, dns, port)
    fresh = parse(text, ident, t) if text is not None else None
    if fresh is None:
        return cached if cached is not None and not cached.expired(t) else None
    assert text is not None
    store(domain, text, ident, t)
    return fresh
