"""qmail-newvrt: prepare control/validrcptto for qmail-smtpd (the validrcptto.cdb patch's cdb).

Each line of control/validrcptto, lowercased, with trailing spaces and tabs
removed, becomes a key of control/validrcptto.cdb unless it is empty or starts
with '#': ``user@domain`` (a valid recipient), ``@domain`` (every recipient in
domain), ``-user@domain`` and ``-@domain`` (refused even where the domain is
valid). qmail-smtpd looks them up at RCPT (pyqmail.smtpd.rcptcheck). The cdb
is written to control/validrcptto.tmp, fsync'd and renamed over the old one,
so qmail-smtpd never sees half a file. Any failure leaves the old cdb alone
and exits 111 with a message, as qmail-newmrh.
"""

from __future__ import annotations

import os

from pyqmail import home as _home
from pyqmail.entry import program
from pyqmail.errors import describe

EXIT_OK = 0
EXIT_TEMP = 111
UMASK = 0o033
FATAL = "qmail-newvrt: fatal: "
SOURCE = "control/validrcptto"
TMP = "control/validrcptto.tmp"
CDB = "control/validrcptto.cdb"


class Fatal(Exception):
    """qmail-newvrt gives up with this message."""


def keys(data: bytes) -> list[bytes]:
    """Return the cdb keys for the text of control/validrcptto."""
    out = []
    for line in data.split(b"\n"):
        line = line.lower().rstrip(b" \t\r")
        if line and not line.startswith(b"#"):
            out.append(line)
    return out


def newvrt() -> None:
    """Rebuild control/validrcptto.cdb in the current directory (QMAILHOME); raise Fatal."""
    from pyqmail.cdb import CDBError, Writer

    try:
        with open(SOURCE, "rb") as src:
            data = src.read()
    except OSError as e:
        raise Fatal(f"{FATAL}unable to read {SOURCE}: {describe(e)}") from None
    try:
        fd = os.open(TMP, os.O_WRONLY | os.O_TRUNC | os.O_CREAT | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as f:
            w = Writer(f)
            for k in keys(data):
                w.add(k, b"")
            w.finish()
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise Fatal(f"{FATAL}unable to write to {TMP}: {describe(e)}") from None
    except CDBError:
        raise Fatal(f"{FATAL}unable to write to {TMP}: out of memory") from None
    try:
        os.rename(TMP, CDB)
    except OSError as e:
        raise Fatal(f"{FATAL}unable to move {TMP} to {CDB}: {describe(e)}") from None


@program("qmail-newvrt", crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Rebuild control/validrcptto.cdb; exit 0, or 111 with a message."""
    os.umask(UMASK)
    home = _home.home()
    try:
        try:
            os.chdir(home)
        except OSError as e:
            raise Fatal(f"{FATAL}unable to chdir to {home}: {describe(e)}") from None
        newvrt()
    except Fatal as e:
        os.write(2, str(e).encode("utf-8", "backslashreplace") + b"\n")
        return EXIT_TEMP
    return EXIT_OK
