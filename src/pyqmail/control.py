"""qmail-control(5): reading QMAILHOME/control.

Control files are read as latin-1 so that every byte round-trips. Trailing
spaces and tabs are allowed in any control file; empty lines and lines
starting with '#' are skipped in the list files (badmailfrom, locals,
percenthack, qmqpservers, rcpthosts, smtproutes, virtualdomains, ...), never
in the one-line files. A missing file means "use the default"; any other
error is a ControlError, which programs treat as a temporary failure.
"""

from __future__ import annotations

import os

from pyqmail import home as _home

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Iterable

ENCODING = "latin-1"


class ControlError(Exception):
    """A control file exists but could not be read."""


def path(name: str) -> str:
    """Return the path of control file name in this home."""
    return f"{_home.home()}/control/{name}"


def _read(name: str) -> bytes | None:
    # Descriptors, not file objects: every qmail-smtpd connection reads
    # several control files, and a forked child pays for each page it touches.
    try:
        fd = os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ControlError(f"unable to read controls: {name}: {e.strerror}") from e
    try:
        # Small reads first: control files are short, and a 64 KiB buffer
        # shrunk to a few bytes leaves its mark on heap pages.
        data = b""
        want = 4096
        while chunk := os.read(fd, want):
            data += chunk
            want = 65536
        return data
    except OSError as e:
        raise ControlError(f"unable to read controls: {name}: {e.strerror}") from e
    finally:
        os.close(fd)


def _strip(line: str) -> str:
    return line.rstrip(" \t")


def read_line(name: str) -> str | None:
    """Return the first line of name without trailing blanks, or None if missing."""
    data = _read(name)
    if data is None:
        return None
    return _strip(data.split(b"\n", 1)[0].decode(ENCODING))


def me() -> str | None:
    """Return control/me, or None if it is missing."""
    return read_line("me")


def read_default(name: str, default: str | None, flag_me: bool = True) -> str | None:
    """Return the first line of name; if missing, control/me (if flag_me and set), else default."""
    value = read_line(name)
    if value is not None:
        return value
    if flag_me:
        mine = me()
        if mine is not None:
            return mine
    return default


def read_int(name: str, default: int) -> int:
    """Return the leading decimal number of name's first line; default if missing or not a number."""
    value = read_line(name)
    if value is None:
        return default
    digits = 0
    while digits < len(value) and value[digits].isdigit() and value[digits].isascii():
        digits += 1
    return int(value[:digits]) if digits else default


def read_lines(name: str, flag_me: bool = False) -> list[str] | None:
    """Return the non-empty, non-comment lines of name, trailing blanks removed.

    If the file is missing: [me] when flag_me and control/me exists, else None.
    """
    data = _read(name)
    if data is None:
        if flag_me:
            mine = me()
            if mine is not None:
                return [mine]
        return None
    out = []
    for raw in data.decode(ENCODING).split("\n"):
        line = _strip(raw)
        if line and not line.startswith("#"):
            out.append(line)
    return out


def lower(text: str) -> str:
    """Lowercase ASCII letters only, as qmail's case_lowerb (latin-1 text keeps its other bytes)."""
    return text.encode(ENCODING).lower().decode(ENCODING)


class DomainSet:
    """A list of domains where an entry '.example.com' matches every subdomain.

    Lookups are case-insensitive. An optional cdb (morercpthosts.cdb) holds
    more entries in the same form, keyed by the lowercased entry.
    """

    def __init__(self, entries: Iterable[str], cdb_path: str | None = None) -> None:
        self._set = {lower(e) for e in entries}
        self._cdb = None
        if cdb_path is not None:
            from pyqmail import cdb

            try:
                self._cdb = cdb.Reader.open(cdb_path)
            except FileNotFoundError:
                self._cdb = None
            except OSError as e:
                raise ControlError(f"unable to read controls: {cdb_path}: {e.strerror}") from e

    def _has(self, key: str) -> bool:
        if key in self._set:
            return True
        return self._cdb is not None and self._cdb.get(key.encode(ENCODING)) is not None

    def match(self, domain: str) -> bool:
        """Return True if domain, or a '.suffix' of it, is listed."""
        d = lower(domain)
        if self._has(d):
            return True
        i = d.find(".")
        while i != -1:
            if self._has(d[i:]):
                return True
            i = d.find(".", i + 1)
        return False

    def __contains__(self, domain: str) -> bool:
        return self.match(domain)
