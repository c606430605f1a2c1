"""qmail-newmrh: prepare control/morercpthosts for qmail-smtpd (qmail-newmrh(8)).

Each line of control/morercpthosts, lowercased, with trailing spaces, tabs
and newlines removed, becomes a key of control/morercpthosts.cdb unless it is
empty or starts with '#'. The cdb is written to control/morercpthosts.tmp,
fsync'd and renamed over the old one, so qmail-smtpd never sees half a file.
Any failure leaves the old cdb alone and exits 111 with qmail's message.
"""

from __future__ import annotations

import os

from pyqmail import home as _home
from pyqmail.entry import program
from pyqmail.errors import describe

EXIT_OK = 0
EXIT_TEMP = 111
UMASK = 0o033
FATAL = b"qmail-newmrh: fatal: "
SOURCE = "control/morercpthosts"
TMP = "control/morercpthosts.tmp"
CDB = "control/morercpthosts.cdb"
DIE_READ = b"unable to read control/morercpthosts: "
DIE_WRITE = b"unable to write to control/morercpthosts.tmp: "
# qmail prints the error straight after ".cdb", without ': ' (strerr_die2sys).
DIE_MOVE = b"unable to move control/morercpthosts.tmp to control/morercpthosts.cdb"


class Fatal(Exception):
    """qmail-newmrh gives up with this message."""


def _fatal(text: bytes, e: OSError) -> Fatal:
    return Fatal(FATAL + text + describe(e).encode())


def keys(data: bytes) -> list[bytes]:
    """Return the cdb keys for the text of control/morercpthosts."""
    out = []
    for line in data.split(b"\n"):
        line = line.lower().rstrip(b" \t\n")
        if line and not line.startswith(b"#"):
            out.append(line)
    return out


def newmrh() -> None:
    """Rebuild control/morercpthosts.cdb in the current directory (QMAILHOME); raise Fatal."""
    from pyqmail.cdb import CDBError, Writer

    try:
        fd = os.open(SOURCE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise _fatal(DIE_READ, e) from None
    try:
        try:
            tmp = os.open(TMP, os.O_WRONLY | os.O_NONBLOCK | os.O_TRUNC | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise _fatal(DIE_WRITE, e) from None
        with os.fdopen(tmp, "wb") as f:
            try:
                w = Writer(f)
            except OSError as e:
                raise _fatal(DIE_WRITE, e) from None
            # The source is read in bounded chunks; only complete lines are kept in memory.
            part = b""
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except OSError as e:
                    raise _fatal(DIE_READ, e) from None
                if not chunk:
                    break
                lines = (part + chunk).split(b"\n")
                part = lines.pop()
                try:
                    for k in keys(b"\n".join(lines)):
                        w.add(k, b"")
                except OSError as e:
                    raise _fatal(DIE_WRITE, e) from None
                except CDBError:
                    raise Fatal(FATAL + DIE_WRITE + b"out of memory") from None
            try:
                for k in keys(part):
                    w.add(k, b"")
                w.finish()
                os.fsync(f.fileno())
            except OSError as e:
                raise _fatal(DIE_WRITE, e) from None
            except CDBError:
                raise Fatal(FATAL + DIE_WRITE + b"out of memory") from None
            try:
                f.close()
            except OSError as e:
                raise _fatal(DIE_WRITE, e) from None  # NFS reports write errors at close
    finally:
        os.close(fd)
    try:
        os.rename(TMP, CDB)
    except OSError as e:
        raise _fatal(DIE_MOVE, e) from None


@program("qmail-newmrh", crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Rebuild control/morercpthosts.cdb; exit 0, or 111 with a message."""
    os.umask(UMASK)
    home = _home.home()
    try:
        try:
            os.chdir(home)
        except OSError as e:
            raise Fatal(FATAL + b"unable to chdir to " + os.fsencode(home) + b": " + describe(e).encode()) from None
        newmrh()
    except Fatal as e:
        os.write(2, e.args[0] + b"\n")
        return EXIT_TEMP
    return EXIT_OK
