"""dot-qmail(5): which .qmail file controls an address, and what its lines say.

qmail-local asks `candidates` for the names to try, in order, and `parse`
for the delivery instructions of the file it found (or of its
defaultdelivery argument); both are pure. `search` is the one I/O step,
shared by qmail-local and by recipient validation at RCPT
(pyqmail.local.rcptcheck): it opens the candidates in a home directory and
returns the one qmail-local uses, so "accepted at RCPT" and "deliverable"
are decided by the same function. Names, extensions and lines are bytes, as
qmail takes them.
"""

from __future__ import annotations

import errno
import os
import stat

from pyqmail import errors

QMAIL = b".qmail"
DEFAULT = b"default"
OWNER = b"-owner"
OWNER_DEFAULT = b"-owner-default"

# Instruction kinds: the first byte of a line decides (dot-qmail(5)).
BLANK = "blank"  # empty after trailing blanks are cut; refused as the first line
COMMENT = "comment"  # '#'
MBOX = "mbox"  # '.' or '/', not ending in '/'
MAILDIR = "maildir"  # '.' or '/', ending in '/'
PROGRAM = "program"  # '|'
LIST = "list"  # '+list': the rest of the file may only forward, as if the x bit were set
IGNORED = "ignored"  # any other '+' line
FORWARD = "forward"  # '&', or anything else

# C qmail's conf-patrn as shipped (002): the mode bits refused on the home
# directory and on .qmail files, so only a world-writable one defers; a
# group-writable home is delivered to (dot-qmail(5) says group-writable too,
# but what qmail does is the spec).
PATRN = 0o002
CUTABLE = 0o100  # the owner's x bit on .qmail: forwarding only

# qmail-command(8): what the exit code of a program run for a '|' line means
# (dot-forward reads its |commands' codes the same way).
PROGRAM_STOP = 99  # delivered; ignore the rest of the .qmail file
PROGRAM_HARD = frozenset({64, 65, 70, 76, 77, 78, 100, 112})  # permanent; any other nonzero is temporary


class Candidate:
    """A .qmail file to try, and the DEFAULT it sets if it is the one used (None: none)."""

    __slots__ = ("name", "default")

    def __init__(self, name: bytes, default: bytes | None) -> None:
        self.name = name
        self.default = default

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Candidate) and (self.name, self.default) == (other.name, other.default)

    def __repr__(self) -> str:
        return f"Candidate({self.name!r}, {self.default!r})"


class Instruction:
    """One line of a .qmail file.

    `target` is what the instruction acts on (the path, the command after
    '|', the address after an optional '&'), cut at a NUL byte as qmail's C
    strings are; `shown` is the same text uncut, as `qmail-local -n` prints it.
    """

    __slots__ = ("kind", "target", "shown")

    def __init__(self, kind: str, target: bytes, shown: bytes) -> None:
        self.kind = kind
        self.target = target
        self.shown = shown

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Instruction) and (
            (self.kind, self.target, self.shown) == (other.kind, other.target, other.shown))

    def __repr__(self) -> str:
        return f"Instruction({self.kind!r}, {self.target!r}, {self.shown!r})"


_UPPER = bytes(range(ord("A"), ord("Z") + 1))
_LOWER = bytes(range(ord("a"), ord("z") + 1))
_SAFE = bytes.maketrans(_UPPER + b".", _LOWER + b":")


def safe_ext(ext: bytes) -> bytes:
    """Return ext as it appears in .qmail names: ASCII lowercased, dots made colons."""
    # Colons, not dots: an extension must never reach ".qmail-..", or any
    # other name outside the .qmail family, whatever a sender writes.
    return ext.translate(_SAFE)


def candidates(dash: bytes, ext: bytes) -> list[Candidate]:
    """Return the .qmail files qmail-local tries for dash and ext, in order.

    First .qmail<dash><ext>, then for each cut of ext after a '-' (longest
    first) .qmail<dash><prefix>default, ending with .qmail<dash>default.
    DEFAULT is the part of ext (case kept) that the 'default' stood for.
    """
    safe = safe_ext(ext)
    first_default = None
    if len(safe) >= len(DEFAULT) and safe.endswith(DEFAULT):
        # An address that itself ends in "default" names a default file: it
        # sets DEFAULT to the "default" it spelled.
        first_default = ext[len(safe) - len(DEFAULT):]
    out = [Candidate(QMAIL + dash + safe, first_default)]
    for i in range(len(safe), -1, -1):
        if i == 0 or safe[i - 1:i] == b"-":
            out.append(Candidate(QMAIL + dash + safe[:i] + DEFAULT, ext[i:]))
    return out


def owner_names(dash: bytes, ext: bytes) -> tuple[bytes, bytes]:
    """Return the names of .qmail<dash><ext>-owner and .qmail<dash><ext>-owner-default."""
    base = QMAIL + dash + safe_ext(ext)
    return base + OWNER, base + OWNER_DEFAULT


def new_sender(sender: bytes, local: bytes, host: bytes, owner: bool, owner_default: bool) -> bytes:
    """Return the envelope sender for forwarding (NEWSENDER), per dot-qmail(5)."""
    if sender in (b"", b"#@[]") or not owner:
        return sender
    if owner_default:
        return local + b"-owner-@" + host + b"-@[]"
    return local + b"-owner@" + host


def ext_parts(ext: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """Return EXT, EXT2, EXT3, EXT4: ext and what follows its first, second, third dash ('' past the end)."""
    parts = [ext]
    rest = ext
    for _ in range(3):
        cut = rest.find(b"-")
        rest = b"" if cut < 0 else rest[cut + 1:]
        parts.append(rest)
    return parts[0], parts[1], parts[2], parts[3]


def host_parts(host: bytes) -> tuple[bytes, bytes, bytes]:
    """Return HOST2, HOST3, HOST4: host cut before its last, second-last, third-last dot.

    Where no dot is left, the value stays what it was (qmail's byte_rchr).
    """
    parts = []
    end = len(host)
    for _ in range(3):
        cut = host.rfind(b".", 0, end)
        end = end if cut < 0 else cut
        parts.append(host[:end])
    return parts[0], parts[1], parts[2]


def _cstring(s: bytes) -> bytes:
    cut = s.find(b"\0")
    return s if cut < 0 else s[:cut]


def parse(text: bytes) -> list[Instruction]:
    """Split the contents of a .qmail file (or defaultdelivery) into instructions.

    Trailing spaces and tabs are cut from every line; an empty text is one
    blank line. Nothing is refused here: whether a blank line or a program
    line is allowed is up to the caller, which acts on the lines in order.
    """
    if not text.endswith(b"\n"):
        text += b"\n"
    out = []
    for raw in text[:-1].split(b"\n"):
        line = raw.rstrip(b" \t")
        first = line[:1]
        if first in (b"", b"\0"):
            out.append(Instruction(BLANK, b"", line))
        elif first == b"#":
            out.append(Instruction(COMMENT, b"", line))
        elif first in (b".", b"/"):
            # The last byte decides, even past a NUL that ends the name.
            kind = MAILDIR if line.endswith(b"/") else MBOX
            out.append(Instruction(kind, _cstring(line), line))
        elif first == b"|":
            out.append(Instruction(PROGRAM, _cstring(line[1:]), line[1:]))
        elif first == b"+":
            rest = _cstring(line[1:])
            out.append(Instruction(LIST if rest == b"list" else IGNORED, rest, line[1:]))
        else:
            if first == b"&":
                line = line[1:]
            out.append(Instruction(FORWARD, _cstring(line), line))
    return out


class Unreadable(Exception):
    """A .qmail file exists but cannot be opened or checked (.name, .error): qmail-local defers."""

    def __init__(self, name: bytes, error: OSError) -> None:
        super().__init__(name, error)
        self.name = name
        self.error = error


class Writable(Exception):
    """The .qmail file found is writable by others (conf-patrn): qmail-local defers."""


def open_qmail(name: bytes, dir_fd: int | None = None) -> tuple[int, bool] | None:
    """Open .qmail file name (relative to dir_fd, else the current directory).

    Return (fd, x bit set), or None if it is absent or not a regular file;
    raise Unreadable if it exists but cannot be opened, Writable if others may
    write it.
    """
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        # A .qmail that exists but cannot be read must not be taken for an
        # absent one: that would bounce, or deliver by the wrong file.
        if errors.temporary(e) or e.errno in (errno.EPERM, errno.EACCES):
            raise Unreadable(name, e) from None
        return None
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise Unreadable(name, e) from None
    if stat.S_ISREG(st.st_mode):
        if st.st_mode & PATRN:
            os.close(fd)
            raise Writable(name)
        return fd, bool(st.st_mode & CUTABLE)
    os.close(fd)
    return None


def search(dash: bytes, ext: bytes, dir_fd: int | None = None) -> tuple[int, bool, bytes | None] | None:
    """Find the .qmail file for dash+ext: (fd, x bit, DEFAULT or None), or None if there is none.

    The first of `candidates` that open_qmail finds is used; Unreadable and
    Writable propagate. With no file, qmail-local bounces an address with a
    dash ("no mailbox here by that name") and uses its default delivery for one
    without.
    """
    for cand in candidates(dash, ext):
        found = open_qmail(cand.name, dir_fd)
        if found is not None:
            return found[0], found[1], cand.default
    return None
