"""qmail-pw2u(8): turn a V7 passwd file on stdin into a qmail-users(5) assign file on stdout.

Options: -o (default) skip users whose home is missing or not theirs; -h
stop if a home is missing; -H do not check homes; -U (default) skip names
with uppercase letters; -u allow them; -cCHAR use CHAR as the extension
break; -C no extensions; -/ use .qmail-/ instead of .qmail-. The files
include, exclude, mailnames, subusers and append in QMAILHOME/users change
the rules as the man page says. Errors exit 111 (usage: 100); output is
buffered as qmail's, so what a fatal error leaves written is what qmail's
leaves (every line of the passwd file's but a last unterminated one, once its
end has been read).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from pyqmail import home as _home
from pyqmail.entry import program
from pyqmail.local import users
from pyqmail.outbuf import Substdio
from pyqmail.sgetopt import Getopt

EXIT_USAGE = 100
EXIT_TEMP = 111
OUTSIZE = 8192  # qmail's SUBSTDIO_OUTSIZE: what is written before a fatal error depends on it
INSIZE = 8192  # qmail's SUBSTDIO_INSIZE: standard input is read this much at a time
MAX_INPUT = 1 << 30

HOME_SKIP = 2  # -o: skip if home does not exist; skip if not owned
HOME_STOP = 1  # -h: stop if home does not exist; skip if not owned
HOME_IGNORE = 0  # -H

FATAL = b"qmail-pw2u: fatal: "


class Fatal(Exception):
    """qmail-pw2u must stop; the message follows 'qmail-pw2u: fatal: '."""

    def __init__(self, text: bytes) -> None:
        super().__init__(text)
        self.text = text


class ConstMap:
    """qmail's constmap: case-insensitive (A-Z) keys; the last entry of a key wins."""

    def __init__(self, entries: list[bytes], flagcolon: bool) -> None:
        self._map: dict[bytes, bytes] = {}
        for e in entries:
            if flagcolon:
                colon = e.find(b":")
                if colon == -1:
                    continue
                key, value = e[:colon], e[colon + 1:]
            else:
                key, value = e, b""
            self._map[users.lower(key)] = value

    def get(self, key: bytes) -> bytes | None:
        return self._map.get(users.lower(key))

    def __contains__(self, key: bytes) -> bool:
        return users.lower(key) in self._map


class Out(Substdio):
    """Standard output buffered as qmail's substdio, so a fatal error leaves the same prefix written."""

    def __init__(self, fd: int = 1, size: int = OUTSIZE) -> None:
        super().__init__(fd, size)

    def _write(self, data: bytes) -> None:
        try:
            super()._write(data)
        except OSError:
            raise Fatal(b"unable to write output") from None


def read_control_file(path: str) -> list[bytes] | None:
    """Read a qmail control list as control_readfile does: None if missing; raise Fatal if unreadable."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_INPUT)
    except FileNotFoundError:
        return None
    except OSError:
        raise Fatal(b"unable to read controls") from None
    buf = bytearray()
    for line in users.getlines(data):
        line = line.rstrip(b"\n \t")
        if line[:1] not in (b"", b"\0", b"#"):
            buf += line + b"\0"
    # constmap splits its input at every NUL, including one inside a line.
    return bytes(buf).split(b"\0")[:-1]


def scan_ulong(s: bytes) -> int:
    """Return the leading decimal number of s (0 if none), wrapping as a 64-bit unsigned long."""
    n = 0
    for c in s:
        if not 48 <= c <= 57:
            break
        n = (n * 10 + c - 48) & 0xFFFFFFFFFFFFFFFF
    return n


@dataclass
class Options:
    """qmail-pw2u's settings."""

    dashcolon: bytes = b"-:"
    noupper: bool = True
    homestrategy: int = HOME_SKIP
    brk: bytes = users.BREAK


@dataclass
class State:
    """What the passwd pass leaves for the subusers pass."""

    flagalias: bool = False
    allusers: dict[bytes, bytes] = field(default_factory=dict)


def home_owner(path: bytes) -> int | None:
    """Return the owner of path; None if it does not exist; raise OSError otherwise."""
    try:
        return os.stat(path).st_uid
    except FileNotFoundError:
        return None


def do_account(line: bytes, opts: Options, incl: ConstMap | None, excl: ConstMap | None,
               mana: ConstMap | None, state: State, out: Out, alias_name: bytes) -> None:
    """Print the assignments for one passwd line, or nothing if the rules skip it."""
    if b"\0" in line:
        return
    fields = line.split(b":", 6)
    if len(fields) < 7:
        return
    user, _pw, uidstr, gidstr, _gecos, home = fields[:6]
    uid = scan_ulong(uidstr)
    if not uid:
        return
    if opts.noupper and any(65 <= c <= 90 for c in user):
        return
    if incl is not None and user not in incl:
        return
    if excl is not None and user in excl:
        return
    if opts.homestrategy != HOME_IGNORE:
        try:
            owner = home_owner(home)
        except OSError:
            raise Fatal(b"unable to stat " + home) from None
        if owner is None:
            if opts.homestrategy == HOME_STOP:
                raise Fatal(b"unable to stat " + home)
            return
        if owner != uid:
            return

    uugh = b":" + user + b":" + uidstr + b":" + gidstr + b":" + home + b":"
    # The subusers pass looks users up case-insensitively; the last one wins.
    state.allusers[users.lower(user)] = uugh

    # One put per substdio call of qmail's: where a buffer fills decides what a later fatal
    # error leaves written.
    if user == alias_name:
        out.put(b"+")
        out.put(uugh)
        out.put(opts.dashcolon)
        out.put(b":\n")
        state.flagalias = True

    names = mana.get(user) if mana is not None else None
    if names is None:
        names = user
    for name in names.split(b":"):
        if not name:
            continue
        out.put(b"=")
        out.put(name)
        out.put(uugh)
        out.put(b"::\n")
        if opts.brk:
            out.put(b"+")
            out.put(name)
            out.put(opts.brk)
            out.put(uugh)
            out.put(opts.dashcolon)
            out.put(b":\n")


def do_subuser(line: bytes, opts: Options, state: State, out: Out) -> None:
    """Print the assignments for one users/subusers line."""
    first = line.find(b":")
    if first == -1:
        return
    sub = line[:first]
    second = line.find(b":", first + 1)
    if second == -1:
        return
    owner = line[first + 1:second]
    uugh = state.allusers.get(users.lower(owner))
    if uugh is None:
        raise Fatal(b"unable to find " + owner + b" user for subuser")
    third = line.find(b":", second + 1)
    if third == -1:
        return
    pre = line[second + 1:third]
    # constmap hands back a C string: a NUL inside the stored entry cuts it.
    uugh = uugh.split(b"\0", 1)[0]
    out.put(b"=")
    out.put(sub)
    out.put(uugh)
    out.put(opts.dashcolon)
    out.put(pre)
    out.put(b":\n")
    if opts.brk:
        out.put(b"+")
        out.put(sub)
        out.put(opts.brk)
        out.put(uugh)
        out.put(opts.dashcolon)
        out.put(pre)
        out.put(b"-:\n")


def stdin_lines(out: Out) -> Iterator[bytes]:
    """Yield standard input's lines as qmail's getln on subfdin does (with newlines, then the rest).

    Like qmail's subfd_read, standard output is flushed before every read of
    8192 bytes: all the lines of the passwd file but a last one without a
    newline are written by the time its end is read, whatever follows. A
    failed flush is a failed read, as there.
    """
    buf = bytearray()
    total = 0
    start = 0  # where the next line starts in buf
    seen = 0  # buf[start:seen] holds no newline
    while True:
        nl = buf.find(b"\n", seen)
        if nl != -1:
            yield bytes(buf[start:nl + 1])
            start = seen = nl + 1
            continue
        del buf[:start]
        start, seen = 0, len(buf)
        try:
            out.flush()
            chunk = os.read(0, INSIZE)
        except (Fatal, OSError):
            raise Fatal(b"unable to read input") from None
        if not chunk:
            yield bytes(buf)
            return
        total += len(chunk)
        if total > MAX_INPUT:
            raise Fatal(b"out of memory")
        buf += chunk


def _read_users_file(name: str) -> bytes | None:
    try:
        with open(os.path.join("users", name), "rb") as f:
            return f.read(MAX_INPUT)
    except FileNotFoundError:
        return None
    except OSError:
        raise Fatal(b"unable to read controls") from None


def alias_user_name() -> bytes:
    """Return the account name of the catch-all user in a passwd file (qmail's auto_usera).

    A root-mode installation records its alias account; a single-user one
    has no alias account, and a passwd file names the catch-all "alias".
    """
    inst = _home.install()
    acct = inst.users.get("alias")
    if acct is None or inst.single:
        return users.ALIAS_USER.encode()
    return acct.name.encode()


def pw2u(opts: Options, out: Out) -> None:
    """Run the three passes (passwd on stdin, subusers, append) in the current directory."""
    incl_l = read_control_file("users/include")
    excl_l = read_control_file("users/exclude")
    mana_l = read_control_file("users/mailnames")
    incl = ConstMap(incl_l, False) if incl_l is not None else None
    excl = ConstMap(excl_l, False) if excl_l is not None else None
    mana = ConstMap(mana_l, True) if mana_l is not None else None
    alias_name = alias_user_name()
    state = State()
    for line in stdin_lines(out):
        do_account(line, opts, incl, excl, mana, state, out, alias_name)
    if not state.flagalias:
        raise Fatal(b"unable to find " + alias_name + b" user")
    subusers = _read_users_file("subusers")
    if subusers is not None:
        for line in users.getlines(subusers):
            do_subuser(line, opts, state, out)
    append = _read_users_file("append")
    if append is not None:
        for line in users.getlines(append):
            out.put(line)
    out.put(b".\n")
    out.flush()


def parse_options(argv: list[str]) -> Options | None:
    """Return the options of argv, or None after a usage complaint."""
    opts = Options()
    g = Getopt(argv, "/ohHuUc:C")
    for c, arg in g:
        if c == "/":
            opts.dashcolon = b"-/:"
        elif c == "o":
            opts.homestrategy = HOME_SKIP
        elif c == "h":
            opts.homestrategy = HOME_STOP
        elif c == "H":
            opts.homestrategy = HOME_IGNORE
        elif c == "u":
            opts.noupper = False
        elif c == "U":
            opts.noupper = True
        elif c == "c":
            opts.brk = os.fsencode(arg or "")[:1]
        elif c == "C":
            opts.brk = b""
        else:
            return None
    return opts


@program("qmail-pw2u", crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Print the assign file for the passwd file on stdin."""
    opts = parse_options(argv)
    if opts is None:
        return EXIT_USAGE
    try:
        os.chdir(_home.home())
    except OSError:
        os.write(2, FATAL + b"unable to chdir\n")
        return EXIT_TEMP
    out = Out()
    try:
        pw2u(opts, out)
    except Fatal as e:
        os.write(2, FATAL + e.text + b"\n")
        return EXIT_TEMP
    return 0
