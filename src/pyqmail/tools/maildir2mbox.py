"""maildir2mbox(1): move the messages of $MAILDIR (new and cur) to the end of the mbox $MAIL.

$MAIL is locked, copied with the new messages appended (oldest first) into
$MAILTMP, which is fsync'd and renamed over $MAIL; only then are the
messages removed from the maildir. Errors exit 111 with qmail's words.
"""

from __future__ import annotations

import fcntl
import os
import time

from pyqmail import errors
from pyqmail.entry import program
from pyqmail.local.mbox import ctime
from pyqmail.tools import common
from pyqmail.tools.common import EXIT_TEMP, Die
from pyqmail.local.maildir import clean_tmp as clean_tmp  # qmail's maildir_clean

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Callable

FATAL = b"maildir2mbox: fatal: "
WARNING = b"maildir2mbox: warning: "
BUFSIZE = 8192

def gfrom(line: bytes) -> bool:
    """Return True if line, after any '>'s, starts with 'From ' (it needs one more '>')."""
    return line.lstrip(b">").startswith(b"From ")


class _Elt:
    """A message of the maildir: its mtime and its name."""

    __slots__ = ("dt", "name")

    def __init__(self, dt: int, name: str) -> None:
        self.dt = dt
        self.name = name


class PrioQ:
    """qmail's prioq: a binary heap on dt, with qmail's exact order among equal times."""

    def __init__(self) -> None:
        self.p: list[_Elt] = []

    def insert(self, e: _Elt) -> None:
        p = self.p
        p.append(e)
        j = len(p) - 1
        while j:
            i = (j - 1) // 2
            if p[i].dt <= e.dt:
                break
            p[j] = p[i]
            j = i
        p[j] = e

    def min(self) -> _Elt | None:
        return self.p[0] if self.p else None

    def delmin(self) -> None:
        p = self.p
        n = len(p)
        if not n:
            return
        i = 0
        n -= 1
        while True:
            j = i + i + 2
            if j > n:
                break
            if p[j - 1].dt <= p[j].dt:
                j -= 1
            if p[n].dt <= p[j].dt:
                break
            p[i] = p[j]
            i = j
        p[i] = p[n]
        p.pop()


def ufline_for(first: bytes, complete: bool, dt: int) -> bytes:
    """Return the From_ line for a message whose first line is first (complete: ends in newline)."""
    ufline = b"From XXX "
    if complete and first.startswith(b"Return-Path: <"):
        if first[14:15] == b">":
            ufline = b"From MAILER-DAEMON "
        else:
            addr = first[14:len(first) - 2]
            ufline = b"From " + addr.replace(b" ", b"-").replace(b"\t", b"-") + b" "
    return ufline + ctime(dt)


def mbox_entry(message: bytes, dt: int) -> bytes:
    """Return message as maildir2mbox appends it: From_ line, '>From ' quoting, blank line after.

    As qmail's maildir2mbox, only newline-terminated lines are copied: a
    final line without a newline is left out.
    """
    lines = message.split(b"\n")[:-1]
    if not lines:
        return ufline_for(message, False, dt) + b"\n"
    out = [ufline_for(lines[0] + b"\n", True, dt)]
    for line in lines:
        out.append((b">" if gfrom(line) else b"") + line + b"\n")
    out.append(b"\n")
    return b"".join(out)


def scan(now: int) -> tuple[PrioQ, list[str]]:
    """Queue new/ and cur/ messages older than now, by mtime; raise Die if a directory cannot be read."""
    pq = PrioQ()
    names: list[str] = []
    for sub in ("new", "cur"):
        try:
            entries = os.listdir(sub)
        except OSError as e:
            raise common.fail(EXIT_TEMP, FATAL, b"unable to scan $MAILDIR/" + sub.encode() + b": ", e) from None
        for name in entries:
            if name.startswith("."):
                continue
            path = sub + "/" + name
            try:
                st = os.stat(path)
            except OSError:
                continue
            # A message from this very second could be followed by an older-looking one.
            if int(st.st_mtime) < now:
                pq.insert(_Elt(int(st.st_mtime), path))
                names.append(path)
    return pq, names


def _read_message(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise common.fail(EXIT_TEMP, FATAL, b"unable to read $MAILDIR/" + common.b(path) + b": ", e) from None


def maildir2mbox(environ: dict[str, str], clock: Callable[[], float] = time.time) -> None:
    """Move the maildir's messages into the mbox; raise Die on failure."""
    mbox = common.need_env("MAIL", EXIT_TEMP, FATAL, environ)
    mboxtmp = common.need_env("MAILTMP", EXIT_TEMP, FATAL, environ)
    maildir = common.need_env("MAILDIR", EXIT_TEMP, FATAL, environ)
    try:
        os.chdir(maildir)
    except OSError as e:
        raise common.fail(EXIT_TEMP, FATAL, b"unable to chdir to " + maildir + b": ", e) from None
    now = int(clock())
    clean_tmp(now)
    pq, _ = scan(int(clock()))
    if pq.min() is None:
        return
    try:
        fdlock = os.open(mbox, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fdlock, fcntl.LOCK_EX)
    except OSError as e:
        raise common.fail(EXIT_TEMP, FATAL, b"unable to lock " + mbox + b": ", e) from None
    try:
        _copy(mbox, mboxtmp, pq)
    finally:
        os.close(fdlock)


def _copy(mbox: bytes, mboxtmp: bytes, pq: PrioQ) -> None:
    def write_error(e: OSError) -> Die:
        return common.fail(EXIT_TEMP, FATAL, b"unable to write to " + mboxtmp + b": ", e)

    try:
        fdold = os.open(mbox, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise common.fail(EXIT_TEMP, FATAL, b"unable to read " + mbox + b": ", e) from None
    try:
        try:
            fdnew = os.open(mboxtmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise common.fail(EXIT_TEMP, FATAL, b"unable to create " + mboxtmp + b": ", e) from None
        try:
            while True:
                try:
                    chunk = os.read(fdold, 65536)
                except OSError as e:
                    raise common.fail(EXIT_TEMP, FATAL, b"unable to read " + mbox + b": ", e) from None
                if not chunk:
                    break
                try:
                    common.write_all(fdnew, chunk)
                except OSError as e:
                    raise write_error(e) from None
            done: list[str] = []
            while (elt := pq.min()) is not None:
                pq.delmin()
                done.append(elt.name)
                entry = mbox_entry(_read_message(elt.name), elt.dt)
                try:
                    common.write_all(fdnew, entry)
                except OSError as e:
                    raise write_error(e) from None
            try:
                os.fsync(fdnew)
            except OSError as e:
                raise write_error(e) from None
        finally:
            try:
                os.close(fdnew)
            except OSError:
                pass  # safe: the data was fsync'd above; a failed close loses nothing
    finally:
        os.close(fdold)
    try:
        os.rename(mboxtmp, mbox)
    except OSError as e:
        raise common.fail(EXIT_TEMP, FATAL, b"unable to move " + mboxtmp + b" to " + mbox + b": ", e) from None
    for name in done:
        try:
            os.unlink(name)
        except OSError as e:
            common.warn(WARNING + b"$MAILDIR/" + common.b(name) + b" will be delivered twice; unable to unlink: "
                        + errors.describe(e).encode())


@program("maildir2mbox", crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Move $MAILDIR's messages to $MAIL through $MAILTMP."""
    os.umask(0o077)
    try:
        maildir2mbox(dict(os.environ))
    except Die as e:
        return e.report()
    return 0
