"""qmail-users(5) and qmail-getpw(8): which user controls a local address.

Two lookups, as qmail-lspawn makes them: first QMAILHOME/users/cdb (written
by qmail-newu from users/assign), then, if there is no cdb, the passwd rules
of qmail-getpw. The cdb layout is qmail-newu's, so a cdb made by C qmail-newu
is read here and the reverse:

- a simple assignment ``=local:...`` is the key ``!`` + lowercased local +
  NUL; a wildcard ``+loc:...`` is the key ``!`` + lowercased loc (no NUL);
- the value is the six fields user, uid, gid, homedir, dash, ext/pre joined
  by NUL (no trailing NUL);
- the empty key holds the last characters of every nonempty wildcard, so
  that a lookup tries only the prefixes that can match.

Lowercasing is ASCII A-Z only, as qmail's case_lowerb.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from typing import Callable, Iterator

from pyqmail import cdb, errors
from pyqmail import home as _home

BREAK = b"-"  # qmail 1.03's conf-break
GETPW_USERLEN = 32  # qmail-getpw assumes account names are shorter than this
ALIAS_USER = "alias"

# qlx.h: the exit codes qmail-lspawn's children use beyond 0, 100 and 111.
QLX_USAGE = 112
QLX_BUG = 101
QLX_ROOT = 113
QLX_NFS = 115
QLX_NOALIAS = 116
QLX_CDB = 117
QLX_SYS = 118
QLX_NOMEM = 119
QLX_EXECSOFT = 120
QLX_EXECPW = 121
QLX_EXECHARD = 126

NUM_FIELDS = 6


class AssignError(Exception):
    """users/assign is not in qmail-users(5) format."""


class UsersCdbError(Exception):
    """users/cdb exists but cannot be used; .code is qmail-lspawn's exit for it."""

    def __init__(self, reason: str, code: int = QLX_CDB) -> None:
        super().__init__(reason)
        self.code = code


class GetpwError(Exception):
    """qmail-getpw could not decide; .code is its exit code (QLX_*)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True, slots=True)
class Assignment:
    """Who handles a local address: user, uid, gid, homedir, dash, ext (all as qmail passes them)."""

    user: bytes
    uid: bytes
    gid: bytes
    homedir: bytes
    dash: bytes
    ext: bytes

    def fields(self) -> list[bytes]:
        """Return the six fields in qmail-getpw's order."""
        return [self.user, self.uid, self.gid, self.homedir, self.dash, self.ext]

    def encode(self) -> bytes:
        """Return the fields each terminated by NUL, as qmail-getpw prints them."""
        return b"".join(f + b"\0" for f in self.fields())


def lower(s: bytes) -> bytes:
    """Lowercase A-Z only (qmail's case_lowerb)."""
    return s.lower()  # bytes.lower() touches ASCII letters only


# --- users/assign -> records ------------------------------------------------------

def assign_records(lines: Iterator[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """Yield the cdb records of an assign file's lines; raise AssignError on bad format.

    lines are the file's lines with their newlines (the last may lack one);
    the file must end with a line starting with '.'. The final record is the
    wildcard-character list under the empty key.
    """
    wildchars = bytearray()
    for line in lines:
        if line[:1] == b".":
            break
        if not line.endswith(b"\n"):
            raise AssignError("bad format in users/assign")
        if b"\0" in line:
            raise AssignError("bad format in users/assign")
        colon = line.find(b":")
        if colon <= 0:
            raise AssignError("bad format in users/assign")
        if line[:1] == b"+":
            key = b"!" + lower(line[1:colon])
            if colon >= 2 and line[colon - 1] not in wildchars:
                wildchars.append(line[colon - 1])
        else:
            # qmail-newu reads any first character other than '+' as '='.
            key = b"!" + lower(line[1:colon]) + b"\0"
        fields = line[colon + 1:].split(b":", NUM_FIELDS)
        if len(fields) <= NUM_FIELDS:
            raise AssignError("bad format in users/assign")
        yield key, b"\0".join(fields[:NUM_FIELDS])
    else:
        # End of file without the terminating dot line.
        raise AssignError("bad format in users/assign")
    yield b"", bytes(wildchars)


def parse_assign(data: bytes) -> list[tuple[bytes, bytes]]:
    """Return the cdb records for the text of users/assign; raise AssignError if malformed."""
    return list(assign_records(getlines(data)))


def getlines(data: bytes) -> Iterator[bytes]:
    """Yield the lines of data as qmail's getln loop does: with newlines, then the rest (maybe empty)."""
    start = 0
    while start < len(data):
        nl = data.find(b"\n", start)
        if nl == -1:
            yield data[start:]
            return
        yield data[start:nl + 1]
        start = nl + 1
    yield b""  # getln at end of file: an empty line without a newline


# --- users/cdb lookup ----------------------------------------------------------

def _decode(value: bytes, rest: bytes) -> Assignment:
    fields = (value + rest).split(b"\0")
    # qmail-lspawn takes six NUL-terminated strings from the record and
    # ignores anything after them; a shorter record is its QLX_USAGE.
    if len(fields) < NUM_FIELDS:
        raise UsersCdbError("users/cdb record has fewer than six fields", QLX_USAGE)
    return Assignment(*fields[:NUM_FIELDS])


def lookup_cdb(reader: cdb.Reader, local: bytes) -> Assignment | None:
    """Return the assignment for local from an open users/cdb, or None if none matches.

    Raise UsersCdbError if the cdb lacks the wildcard list or is corrupt.
    """
    key = b"!" + lower(local) + b"\0"
    try:
        wildchars = reader.get(b"")
        if wildchars is None:
            raise UsersCdbError("users/cdb has no wildcard list")
        value = reader.get(key)
        if value is not None:
            return _decode(value, b"")
        # Wildcards: the longest prefix first, down to the empty one ("!"),
        # trying only prefixes that end in a wildcard's last character.
        for i in range(len(key) - 1, 0, -1):
            if i == 1 or key[i - 1] in wildchars:
                value = reader.get(key[:i])
                if value is not None:
                    return _decode(value, local[i - 1:])
    except cdb.CDBError as e:
        raise UsersCdbError(str(e)) from None
    return None


def cdb_path() -> str:
    """Return QMAILHOME/users/cdb."""
    return os.path.join(_home.home(), "users", "cdb")


def lookup(local: bytes, path: str | None = None) -> Assignment | None:
    """Look local up in users/cdb; None if there is no cdb or no match.

    Raise UsersCdbError if the cdb exists but cannot be read.
    """
    path = path or cdb_path()
    try:
        reader = cdb.Reader.open(path)
    except FileNotFoundError:
        return None
    except (OSError, cdb.CDBError) as e:
        raise UsersCdbError(f"unable to read {path}: {e}") from None
    with reader:
        return lookup_cdb(reader, local)


# --- qmail-getpw -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PwEntry:
    """The passwd fields qmail-getpw uses."""

    name: bytes
    uid: int
    gid: int
    dir: bytes


def system_getpwnam(name: bytes) -> PwEntry | None:
    """Return the passwd entry for name, or None."""
    try:
        pw = pwd.getpwnam(os.fsdecode(name))
    except (KeyError, ValueError):
        return None
    return PwEntry(os.fsencode(pw.pw_name), pw.pw_uid, pw.pw_gid, os.fsencode(pw.pw_dir))


def system_home_owner(path: bytes) -> int | None:
    """Return the owner uid of path (following links); None if it does not exist.

    Raise GetpwError(QLX_NFS) on a temporary error, as qmail-getpw does.
    """
    try:
        return os.stat(path).st_uid
    except OSError as e:
        if errors.temporary(e):
            raise GetpwError(QLX_NFS, f"unable to stat {os.fsdecode(path)}: {errors.describe(e)}") from None
        return None


def alias_entry(getpwnam: Callable[[bytes], PwEntry | None] = system_getpwnam) -> PwEntry | None:
    """Return the catch-all user of this installation (qmail's auto_usera)."""
    inst = _home.install()
    acct = inst.users.get("alias")
    if acct is None:
        return getpwnam(ALIAS_USER.encode())
    if inst.single:
        # Single-user mode: the alias role is the installing user, with the
        # alias directory of this home as its home directory.
        return PwEntry(acct.name.encode(), acct.uid, acct.gid, acct.home.encode())
    # Root mode: the ids are passwd's, as qmail's; the home is always this
    # installation's alias/ (conf/install), whatever passwd says, so that
    # `qmail init` decides where postmaster's mail goes and several
    # installations can share one alias user (docs/DESIGN.md).
    pw = getpwnam(acct.name.encode())
    return None if pw is None else _as_alias(pw)


def _as_alias(pw: PwEntry) -> PwEntry:
    """Return pw, with this installation's alias home if pw is root mode's alias user."""
    inst = _home.install()
    acct = inst.users.get("alias")
    if inst.single or acct is None or pw.name != acct.name.encode():
        return pw
    return PwEntry(pw.name, pw.uid, pw.gid, acct.home.encode())


def getpw(local: bytes, getpwnam: Callable[[bytes], PwEntry | None] = system_getpwnam,
          home_owner: Callable[[bytes], int | None] = system_home_owner,
          alias: Callable[[], PwEntry | None] | None = None) -> Assignment:
    """Apply qmail-getpw(8)'s rules to local; raise GetpwError(QLX_NOALIAS) without an alias user.

    The longest prefix of local ending at the end or before a BREAK, shorter
    than 32 bytes, that names (lowercased) an account with a nonzero uid
    owning its existing home directory is the user; otherwise alias is.
    """
    end = len(local)
    while True:
        if end < GETPW_USERLEN and (end == len(local) or local[end:end + 1] == BREAK):
            pw = getpwnam(lower(local[:end])) if end else None
            if pw is not None and pw.uid != 0:
                pw = _as_alias(pw)
            if pw is not None and pw.uid != 0:
                owner = home_owner(pw.dir)
                if owner is not None and owner == pw.uid:
                    if end == len(local):
                        dash, ext = b"", b""
                    else:
                        dash, ext = b"-", local[end + 1:]
                    return Assignment(pw.name, str(pw.uid).encode(), str(pw.gid).encode(), pw.dir, dash, ext)
        if end == 0:
            break
        end -= 1
    pw = (alias or (lambda: alias_entry(getpwnam)))()
    if pw is None:
        raise GetpwError(QLX_NOALIAS, "unable to find alias user")
    return Assignment(pw.name, str(pw.uid).encode(), str(pw.gid).encode(), pw.dir, b"-", local)


def controller(local: bytes, path: str | None = None,
               rules: Callable[[bytes], Assignment] | None = None) -> Assignment:
    """Return who controls local, as qmail-lspawn finds it: users/cdb first, then qmail-getpw's rules.

    rules stands for qmail-getpw (default: `getpw` in this process). Raise
    UsersCdbError if users/cdb exists but cannot be used, GetpwError (or
    whatever rules raises) if the rules cannot decide. qmail-lspawn and
    recipient validation at RCPT (pyqmail.local.rcptcheck) both call this.
    """
    found = lookup(local, path)
    if found is not None:
        return found
    return (rules or getpw)(local)
