"""control/rcpthosts and control/morercpthosts.cdb: which recipient domains are accepted.

As qmail's rcpthosts(): without control/rcpthosts every address is
accepted; an address without '@' always is; otherwise its domain, or a
'.suffix' of it, must be listed in rcpthosts or, failing that, be a key of
morercpthosts.cdb (consulted only when rcpthosts exists). A malformed cdb is
an unreadable control file at the first lookup that reaches it.

Internationalised domains (SMTPUTF8, RFC 6531): an entry may be written as
U-labels (UTF-8) or as A-labels (xn--...). A domain that matches no entry byte
for byte is tried again in its other form (idna, IDNA 2008 with UTS #46
mapping) when the transaction said SMTPUTF8 or the domain holds an A-label;
without SMTPUTF8 a non-ASCII domain is compared byte for byte only, as qmail.
"""

from __future__ import annotations

from pyqmail import control
from pyqmail.cdb import CDBError
from pyqmail.control import ControlError, DomainSet


class _Unreadable(DomainSet):
    """A morercpthosts.cdb that could be opened but is not a cdb."""

    def __init__(self, reason: str) -> None:
        super().__init__([])
        self.reason = reason

    def match(self, domain: str) -> bool:
        raise ControlError(f"unable to read controls: morercpthosts.cdb: {self.reason}")


class RcptHosts:
    """The allowed recipient domains; None parts are missing files."""

    __slots__ = ("rcpthosts", "morercpthosts")

    def __init__(self, rcpthosts: DomainSet | None, morercpthosts: DomainSet | None = None) -> None:
        self.rcpthosts = rcpthosts
        self.morercpthosts = morercpthosts

    @classmethod
    def load(cls) -> RcptHosts:
        """Read control/rcpthosts and open control/morercpthosts.cdb; raise ControlError if unreadable."""
        lines = control.read_lines("rcpthosts")
        if lines is None:
            return cls(None)
        try:
            more: DomainSet | None = DomainSet([], cdb_path=control.path("morercpthosts.cdb"))
        except CDBError as e:
            more = _Unreadable(str(e))
        return cls(DomainSet(lines), more)

    def allowed(self, addr: bytes, utf8: bool = False) -> bool:
        """Return True if mail to addr is accepted; raise ControlError if the cdb cannot be read.

        utf8: the transaction said SMTPUTF8 (the domain is compared in both IDN forms).
        """
        if self.rcpthosts is None:
            return True
        at = addr.rfind(b"@")
        if at == -1:
            return True  # qmail-send adds envnoathost
        dom = addr[at + 1:]
        if self._match(dom.lower().decode("latin-1")):
            return True
        if not (utf8 and not dom.isascii()) and b"xn--" not in dom.lower():
            return False
        from pyqmail.smtputf8 import alabel, ulabel

        for form in (alabel(dom), ulabel(dom)):
            if form is not None and form != dom and self._match(form.lower().decode("latin-1")):
                return True
        return False

    def _match(self, host: str) -> bool:
        assert self.rcpthosts is not None
        if self.rcpthosts.match(host):
            return True
        if self.morercpthosts is None:
            return False
        try:
            return self.morercpthosts.match(host)
        except CDBError as e:  # a corrupt table: qmail's cdb_seek fails
            raise ControlError(f"unable to read controls: morercpthosts.cdb: {e}") from e
