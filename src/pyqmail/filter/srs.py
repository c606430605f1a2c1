"""qmail-srs: the Sender Rewriting Scheme, its forward half (for qmail-local) and its bounce half.

Forward: when control/srsdomain names a domain, qmail-local queues the
messages it forwards (`&address` lines of .qmail files) from
`SRS0=HHHH=TT=domain=local@srsdomain` instead of `local@domain`, so the next
host's SPF check sees this host's domain. HHHH is the first 4 characters of
the base64 HMAC-SHA1, keyed with the first line of control/srssecret, of TT,
domain and local lowercased; TT is the day number modulo 1024 in two base32
characters (the SRS paper's and Mail::SRS's scheme). The empty sender and
#@[] are not rewritten, nor a sender already at srsdomain.

Bounce: mail to an SRS address at srsdomain reaches qmail-srs, a delivery
program: with `srsdomain:alias-srs` in control/virtualdomains and
`|QMAILHOME/bin/qmail-srs` in ~alias/.qmail-srs-default, $DEFAULT holds the
SRS local part. qmail-srs checks the hash (against every line of
control/srssecret, old secrets kept for the change-over; case-insensitive,
as hosts smash case) and the timestamp (at most control/srsmaxage days old,
default 21), then queues the message on descriptor 0 from $SENDER (a bounce
stays a bounce) to the original address and exits 0. A forged, malformed
or expired address exits 100 with a text saying which, so that qmail-local
bounces it; 111 when control/srssecret is missing or the queue refuses for
now.
"""

from __future__ import annotations

import os

from pyqmail.entry import program

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Sequence

FD_MESSAGE = 0
BASE32 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
HASH_LEN = 4
DAY = 86400
SLOTS = 1024  # two base32 characters of days
MAX_AGE_DEFAULT = 21  # days, Mail::SRS's default
ADDR_MAX = 1002  # bytes of an envelope address (qmail-queue's 1003 with its NUL)

EXIT_OK = 0
EXIT_PERMANENT = 100
EXIT_TEMPORARY = 111


class Invalid(Exception):
    """An SRS address that must be refused; the docstring-style text says why."""


class ConfigError(Exception):
    """control/srsdomain is set but control/srssecret is missing or empty."""


def timestamp(now: float) -> bytes:
    """Return the two base32 characters of the day number of now, modulo 1024."""
    days = int(now // DAY) % SLOTS
    return bytes((BASE32[days >> 5], BASE32[days & 31]))


def srs_hash(secret: bytes, *parts: bytes) -> bytes:
    """Return the first 4 base64 characters of HMAC-SHA1(secret, the parts lowercased, joined)."""
    import base64
    import hmac

    mac = hmac.new(secret, b"".join(p.lower() for p in parts), "sha1").digest()
    return base64.b64encode(mac)[:HASH_LEN]


def forward(sender: bytes, srsdomain: bytes, secret: bytes, now: float) -> bytes:
    """Return sender rewritten as SRS0=HASH=TT=domain=local@srsdomain; unchanged when it should not be."""
    if sender in (b"", b"#@[]") or b"@" not in sender:
        return sender
    local, _, domain = sender.rpartition(b"@")
    if not local or not domain or domain.lower() == srsdomain.lower():
        return sender
    ts = timestamp(now)
    new = b"SRS0=" + srs_hash(secret, ts, domain, local) + b"=" + ts + b"=" + domain + b"=" + local + b"@" + srsdomain
    return new if len(new) <= ADDR_MAX else sender  # too long to queue: SPF may fail, the mail still goes


def reverse(address: bytes, secrets: Sequence[bytes], now: float, max_age: int = MAX_AGE_DEFAULT) -> bytes:
    """Return the original sender of an SRS0 local part (or address); raise Invalid if it was not made here."""
    local = address.rpartition(b"@")[0] if b"@" in address else address
    if local[:4].upper() != b"SRS0" or local[4:5] not in (b"=", b"+", b"-"):
        raise Invalid("not an SRS0 address")
    fields = local[5:].split(b"=", 3)
    if len(fields) != 4 or not all(fields):
        raise Invalid("malformed SRS address")
    given, ts, domain, user = fields
    if len(given) != HASH_LEN or len(ts) != 2:
        raise Invalid("malformed SRS address")
    if not any(srs_hash(s, ts, domain, user).lower() == given.lower() for s in secrets):
        raise Invalid("SRS address has a bad hash: it was not made here")
    try:
        then = BASE32.index(ts[:1].upper()) * 32 + BASE32.index(ts[1:].upper())
    except ValueError:
        raise Invalid("malformed SRS timestamp") from None
    if (int(now // DAY) - then) % SLOTS > max_age:
        raise Invalid("SRS address has expired")
    return user + b"@" + domain


def _secrets() -> list[bytes]:
    from pyqmail import control

    lines = control.read_lines("srssecret") or []
    return [line.encode("latin-1") for line in lines if line.strip()]


def forward_sender(sender: bytes, now: float) -> bytes:
    """Return the sender qmail-local forwards from: SRS-rewritten when control/srsdomain is set.

    Raise ConfigError when control/srsdomain is set and control/srssecret has no secret.
    """
    from pyqmail import control

    domain = control.read_line("srsdomain")
    if domain is None or not domain.strip():
        return sender
    secrets = _secrets()
    if not secrets:
        raise ConfigError("control/srsdomain is set but control/srssecret has no secret")
    return forward(sender, domain.strip().encode("latin-1"), secrets[0], now)


def _say(text: str) -> None:
    os.write(1, text.encode("utf-8", "replace") + b"\n")


def bounce_back(env: dict[str, str], now: float) -> int:
    """Queue the message on descriptor 0 to the original sender of $DEFAULT; return qmail-command's exit."""
    from pyqmail import control
    from pyqmail.queue.qq import QQ

    srs = os.fsencode(env.get("DEFAULT") or env.get("LOCAL") or "")
    secrets = _secrets()
    if not secrets:
        _say("control/srssecret has no secret. (#4.3.0)")
        return EXIT_TEMPORARY
    try:
        original = reverse(srs, secrets, now, control.read_int("srsmaxage", MAX_AGE_DEFAULT))
    except Invalid as e:
        _say(f"Sorry, {e} (#5.7.1)")
        return EXIT_PERMANENT
    sender = os.fsencode(env.get("SENDER", ""))
    qq = QQ(env)
    while True:
        chunk = os.read(FD_MESSAGE, 65536)
        if not chunk:
            break
        qq.write(chunk)
    report = qq.close(sender, [original])
    if report:
        _say(report[1:].decode("utf-8", "replace"))
        return EXIT_PERMANENT if report[:1] == b"D" else EXIT_TEMPORARY
    _say(f"qmail-srs: sent back to {original.decode('utf-8', 'replace')} qp {qq.pid}")
    return EXIT_OK


@program("qmail-srs", crash=EXIT_TEMPORARY)
def main(argv: list[str]) -> int:
    """Send a bounce to an SRS address back to the original sender (see the module)."""
    import time

    return bounce_back(dict(os.environ), time.time())
