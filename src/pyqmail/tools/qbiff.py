"""qbiff(1): announce new mail on the recipient's terminals that have biff y.

For every utmp login of $USER on a /dev terminal owned by us with the owner
execute bit set (biff y), qbiff writes ``*** TO <$LOCAL> FROM <$SENDER>``
and the start of the Subject and body (78 characters at most). It always
exits 0: a notice is never worth failing a delivery for.
"""

from __future__ import annotations

import os
import stat
import struct

from pyqmail.entry import program
from pyqmail.tools import common, headerbody

UTMP_FILE = "/var/run/utmp"
USER_PROCESS = 7
UT_LINESIZE = 32
UT_NAMESIZE = 32
# glibc's struct utmp on Linux: type, pid, line[32], id[4], user[32], host[256], exit, session, tv, addr, unused.
_UTMP = struct.Struct("<hxxi32s4s32s256shhi2i4i20s")
TEXT_MAX = 78


def tofrom(local: bytes, sender: bytes) -> bytes:
    """Return the first line of the notice, unprintable bytes shown as '_'."""
    s = b"*** TO <" + local + b"> FROM <" + sender + b">"
    return bytes(c if 32 <= c <= 126 else ord("_") for c in s)


def summary(lines: list[bytes] | None = None, fd: int = 0) -> bytes:
    """Return four spaces, the Subject value and the body, cut at 78 bytes, unprintables as '/'."""
    text = bytearray(b"    ")

    def add(s: bytes) -> None:
        text.extend(s)
        del text[TEXT_MAX:]

    def field(h: bytes) -> None:
        if headerbody.hfield_is(h, b"subject"):
            add(h[headerbody.hfield_skipname(h):])

    src = iter(lines) if lines is not None else headerbody.lines_of_fd(fd)
    headerbody.headerbody(src, field, lambda: None, add)
    return bytes(c if 32 <= c <= 126 else ord("/") for c in text)


def notice(local: bytes, sender: bytes, text: bytes) -> bytes:
    """Return what qbiff writes to a terminal."""
    return b"\r\n\a" + tofrom(local, sender) + b"\r\n" + text + b"\r\n"


def terminals(user: bytes, utmp: str = UTMP_FILE) -> list[bytes]:
    """Return the tty names (relative to /dev) where user is logged in, as utmp lists them."""
    try:
        with open(utmp, "rb") as f:
            data = f.read(_UTMP.size * 100000)
    except OSError:
        return []
    ttys = []
    for off in range(0, len(data) - _UTMP.size + 1, _UTMP.size):
        rec = _UTMP.unpack_from(data, off)
        ut_type, ut_line, ut_user = rec[0], rec[2], rec[4]
        if ut_type != USER_PROCESS:
            continue
        if ut_user.split(b"\0", 1)[0] != user[:UT_NAMESIZE]:
            continue
        line = ut_line.split(b"\0", 1)[0]
        # Only a plain name under /dev: no absolute path, nothing with a dot.
        if not line or line[:1] == b"/" or b"." in line:
            continue
        ttys.append(line)
    return ttys


def announce(tty: bytes, woof: bytes) -> None:
    """Write woof to /dev/tty if it is ours and biff is on; ignore any trouble."""
    try:
        fd = os.open(b"/dev/" + tty, os.O_WRONLY | os.O_APPEND | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if st.st_mode & stat.S_IXUSR and st.st_uid == os.getuid():
            common.write_all(fd, woof)
    except OSError:
        pass  # safe: a biff note to a terminal is advice; delivery does not depend on it
    finally:
        os.close(fd)


@program("qbiff", crash=0)
def main(argv: list[str]) -> int:
    """Announce the message on stdin to $USER's terminals."""
    user = common.env("USER")
    sender = common.env("SENDER")
    local = common.env("LOCAL")
    if user is None or sender is None or local is None or len(user) > UT_NAMESIZE:
        return 0
    try:
        text = summary()
    except OSError:
        return 0
    woof = notice(local, sender, text)
    for tty in terminals(user):
        announce(tty, woof)
    return 0
