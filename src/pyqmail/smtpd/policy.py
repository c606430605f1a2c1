"""qmail-smtpd's checks: an ordered list of Check objects with hooks at each SMTP step.

A check (recipient validation, SPF, greylisting, DNSBL, qmail-spp...) is a
subclass of `Check` overriding the hooks it needs; each hook gets a read-only
`View` of the session and returns None (go on) or a `Verdict`. `load` builds
the checks of one qmail-smtpd from the environment and control files, in the
fixed order of `ORDER`. The session (pyqmail.smtpd.session) calls the hooks;
with no checks configured it pays one truth test per command. See
docs/DESIGN.md "qmail-smtpd: where a new check goes".

Hooks, and where the session calls them:

- connect(view): before the greeting; a refusal is sent instead of the 220
  line and the session goes on (as qmail-spp), unless the verdict drops.
- helo(view, name): HELO/EHLO, before the reply; a refusal changes nothing.
- mail(view, addr): MAIL after the syntax, $SMTPAUTH and $SENDERCHECK checks,
  before badmailfrom; an accept (2xx) skips badmailfrom.
- rcpt(view, addr): RCPT after MAIL first, syntax and badmailfrom, with the
  relay decision made (view.rcpt_allowed) but not yet applied; an accept skips
  the rcpthosts refusal.
- data(view): DATA, after MAIL and RCPT first, before qmail-queue and 354.
- auth(view, user): after the checkprogram accepted user; a refusal undoes the
  login (no relaying) and is sent instead of 235.
- reset(view): RSET, and the end of each message; nothing to return.
"""

from __future__ import annotations

import os
import sys

from pyqmail import control

TYPE_CHECKING = False  # typing costs milliseconds per connection; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping
    from typing import Protocol

    class View(Protocol):
        """What a hook may read of the session (Session provides it)."""

        @property
        def remoteip(self) -> bytes: ...
        @property
        def remotehost(self) -> bytes: ...
        @property
        def remoteinfo(self) -> bytes | None: ...
        @property
        def localhost(self) -> bytes: ...
        @property
        def helohost(self) -> bytes: ...
        @property
        def mailfrom(self) -> bytes: ...
        @property
        def seenmail(self) -> bool: ...
        @property
        def rcptcount(self) -> int: ...
        @property
        def rcptcountall(self) -> int: ...
        @property
        def rcpt_allowed(self) -> bool: ...
        @property
        def relaying(self) -> bool: ...
        @property
        def authuser(self) -> bytes | None: ...
        @property
        def tls(self) -> bool: ...
        @property
        def badrcpts(self) -> int: ...
        def recipients(self) -> Iterator[bytes]: ...


class Verdict:
    """What a hook decided. Every field is optional:

    reply: the whole reply, CRLF-terminated, several lines allowed. 4xx/5xx:
      the command is refused with it. 2xx: the command is accepted now: no
      further check runs for it and the core's own refusals (badmailfrom at
      MAIL, rcpthosts at RCPT) are skipped; the core's usual success reply is
      sent (250 ok, the EHLO list, 354), not this text.
    stop: no further check runs for this command; the core still checks (qmail-spp's N).
    before: text sent before the command's reply (qmail-spp's P lines).
    header: header lines (each ending in LF) put in the next message, after
      qmail-smtpd's Received line (Received-SPF:, X-...).
    address: replaces the MAIL or RCPT address (qmail-spp's C).
    drop: the connection ends after the reply (exit 0).
    badrcpt: (RCPT) this refusal counts toward the session's bad-recipient
      limit (control/brtlimit, $BRTLIMIT); at the limit the reply is 421 and the
      connection is dropped.
    relay: relaying is granted for the rest of the session (as RELAYCLIENT="").
    """

    __slots__ = ("reply", "stop", "before", "header", "address", "drop", "badrcpt", "relay")

    def __init__(self, reply: bytes = b"", *, stop: bool = False, before: bytes = b"", header: bytes = b"",
                 address: bytes | None = None, drop: bool = False, badrcpt: bool = False,
                 relay: bool = False) -> None:
        self.reply = reply
        self.stop = stop
        self.before = before
        self.header = header
        self.address = address
        self.drop = drop
        self.badrcpt = badrcpt
        self.relay = relay

    @property
    def accept(self) -> bool:
        """Whether the verdict accepts the command now (a 2xx reply)."""
        return self.reply[:1] == b"2"

    @property
    def refuse(self) -> bool:
        """Whether the verdict refuses the command (a reply that is not 2xx)."""
        return bool(self.reply) and self.reply[:1] != b"2"


ACCEPT = Verdict(b"250 ok\r\n")  # accept now; skip later checks and the core's refusals


class Check:
    """A check: override the hooks it needs; each returns None (go on) or a Verdict."""

    name = "check"

    def connect(self, s: View) -> Verdict | None:
        return None

    def helo(self, s: View, name: bytes) -> Verdict | None:
        return None

    def mail(self, s: View, addr: bytes) -> Verdict | None:
        return None

    def rcpt(self, s: View, addr: bytes) -> Verdict | None:
        return None

    def data(self, s: View) -> Verdict | None:
        return None

    def auth(self, s: View, user: bytes) -> Verdict | None:
        return None

    def reset(self, s: View) -> None:
        return None


HOOKS = ("connect", "helo", "mail", "rcpt", "data", "auth", "reset")


class Hooks:
    """The checks' hooks, one tuple of bound methods per step, only those a check overrides."""

    __slots__ = ("checks",) + HOOKS

    def __init__(self, checks: list[Check]) -> None:
        self.checks = tuple(checks)
        for hook in HOOKS:
            base = getattr(Check, hook)
            setattr(self, hook, tuple(getattr(c, hook) for c in checks if getattr(type(c), hook) is not base))

    if TYPE_CHECKING:
        connect: tuple[Callable[..., Verdict | None], ...]
        helo: tuple[Callable[..., Verdict | None], ...]
        mail: tuple[Callable[..., Verdict | None], ...]
        rcpt: tuple[Callable[..., Verdict | None], ...]
        data: tuple[Callable[..., Verdict | None], ...]
        auth: tuple[Callable[..., Verdict | None], ...]
        reset: tuple[Callable[..., None], ...]


NO_HOOKS = Hooks([])

# The fixed order in which checks run, by name: each check module registers its
# loader, (environment) -> the check or None when it is off, under its name in
# LOADERS (see register); names not registered are skipped. Loaders read control
# files with pyqmail.control (the cwd is the home).
# Cheap, local refusals first; DNS and programs later; greylisting last, so that a
# message refused anyway leaves no greylist entry.
ORDER = ("earlytalker", "dnsbl", "helo", "mfcheck", "badrcptto", "rcptcheck", "spp", "spf", "greylist")
LOADERS: dict[str, Callable[[Mapping[bytes, bytes]], Check | None]] = {}


def register(name: str, loader: Callable[[Mapping[bytes, bytes]], Check | None]) -> None:
    """Register a check's loader under its name in ORDER; raise ValueError for a name not in ORDER."""
    if name not in ORDER:
        raise ValueError(f"check {name!r} has no place in pyqmail.smtpd.policy.ORDER")
    LOADERS[name] = loader


def _import_loaders(env: Mapping[bytes, bytes]) -> None:
    """Import the check modules that may be on, which register themselves (a module not there yet is skipped)."""
    for module in MODULES:
        if module in sys.modules:
            continue
        trigger = TRIGGERS.get(module)
        if trigger is not None and not _triggered(env, *trigger):
            continue  # none of its variables or control files: not imported (a connection's milliseconds)
        try:
            __import__(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


# The modules holding checks; each calls register() at import.
MODULES = ("pyqmail.smtpd.spp", "pyqmail.smtpd.spf", "pyqmail.smtpd.greylist", "pyqmail.smtpd.rcptcheck",
           "pyqmail.smtpd.dnsbl", "pyqmail.smtpd.helo", "pyqmail.smtpd.mfcheck", "pyqmail.smtpd.badrcptto")


# What turns a module's checks on: (environment variables, control files), any one present.
# A module listed here is imported only then, so that a qmail-smtpd without the check does
# not pay for importing it (under a tcpserver without preload, at every connection); its
# loader still decides. A module not listed is always imported.
TRIGGERS: dict[str, tuple[tuple[bytes, ...], tuple[str, ...]]] = {
    "pyqmail.smtpd.spp": ((b"SPPCONFFILE",), ("smtpplugins",)),
    "pyqmail.smtpd.rcptcheck": ((b"RCPTCHECK_LOCAL", b"RCPTCHECK"), ("rcptcheck", "validrcptto.cdb")),
    "pyqmail.smtpd.spf": ((b"SPFBEHAVIOR",), ("spfbehavior",)),
    "pyqmail.smtpd.greylist": ((), ("greylist",)),
    "pyqmail.smtpd.dnsbl": ((b"DNSBLLIST", b"RBLSMTPD"), ("dnsbllist",)),
    "pyqmail.smtpd.helo": ((b"REJECTFORGEDHELO",), ("badhelo", "badhelonorelay", "rejectforgedhelo")),
    "pyqmail.smtpd.mfcheck": ((b"MFCHECK",), ("mfcheck",)),
    "pyqmail.smtpd.badrcptto": ((), ("badrcptto",)),
}


def _triggered(env: Mapping[bytes, bytes], names: tuple[bytes, ...], files: tuple[str, ...]) -> bool:
    for name in names:
        if name in env:
            return True
    for f in files:
        try:
            os.stat(control.path(f))
            return True
        except FileNotFoundError:
            pass  # absent: this trigger is not there
        except OSError:
            return True  # there but not stat-able: the loader reports the unreadable control file
    return False


def load(env: Mapping[bytes, bytes]) -> Hooks:
    """Return the hooks of the checks env and the control files turn on, in ORDER.

    Raises ControlError (or OSError) when a check's control file cannot be read:
    qmail-smtpd answers 421 unable to read controls.
    """
    _import_loaders(env)
    checks = []
    for name in ORDER:
        loader = LOADERS.get(name)
        if loader is None:
            continue
        check = loader(env)
        if check is not None:
            checks.append(check)
    return Hooks(checks) if checks else NO_HOOKS
