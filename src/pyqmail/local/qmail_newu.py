"""qmail-newu(8): compile QMAILHOME/users/assign into users/cdb, atomically.

Every failure exits 111 with qmail-newu's message and leaves users/cdb
alone: the new database is written to users/cdb.tmp, fsync'd, and renamed.
"""

from __future__ import annotations

import os

from pyqmail import cdb, durable, slurp
from pyqmail import home as _home
from pyqmail.entry import program
from pyqmail.local import users

EXIT_TEMP = 111
UMASK = 0o033
MAX_ASSIGN = 1 << 30  # bounded reader: far above any real users/assign

DIE_CHDIR = b"qmail-newu: fatal: unable to chdir\n"
DIE_NOMEM = b"qmail-newu: fatal: out of memory\n"
DIE_OPENA = b"qmail-newu: fatal: unable to open users/assign\n"
DIE_READA = b"qmail-newu: fatal: unable to read users/assign\n"
DIE_FORMAT = b"qmail-newu: fatal: bad format in users/assign\n"
DIE_OPENT = b"qmail-newu: fatal: unable to open users/cdb.tmp\n"
DIE_WRITET = b"qmail-newu: fatal: unable to write users/cdb.tmp\n"
DIE_RENAME = b"qmail-newu: fatal: unable to move users/cdb.tmp to users/cdb\n"


class _Die(Exception):
    def __init__(self, text: bytes) -> None:
        super().__init__(text)
        self.text = text


def _read_assign(fd: int) -> bytes:
    try:
        data = slurp.read_all(fd, MAX_ASSIGN)
    except OSError:
        raise _Die(DIE_READA) from None
    if data is None:
        raise _Die(DIE_NOMEM)
    return data


def newu() -> None:
    """Rebuild users/cdb from users/assign in the current directory; raise _Die on failure."""
    try:
        fd = os.open("users/assign", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        raise _Die(DIE_OPENA) from None
    try:
        try:
            tmp = os.open("users/cdb.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError:
            raise _Die(DIE_OPENT) from None
        with os.fdopen(tmp, "wb") as f:
            try:
                writer = cdb.Writer(f)
            except OSError:
                raise _Die(DIE_WRITET) from None
            data = _read_assign(fd)
            try:
                records = users.parse_assign(data)
            except users.AssignError:
                raise _Die(DIE_FORMAT) from None
            try:
                for key, value in records:
                    writer.add(key, value)
                writer.finish()
                os.fsync(f.fileno())
            except (OSError, cdb.CDBError):
                raise _Die(DIE_WRITET) from None
    except OSError:
        # close() of users/cdb.tmp failed (NFS): qmail-newu calls it a write error.
        raise _Die(DIE_WRITET) from None
    finally:
        os.close(fd)
    try:
        os.rename("users/cdb.tmp", "users/cdb")
    except OSError:
        raise _Die(DIE_RENAME) from None
    try:
        durable.fsync_dir("users")
    except OSError:
        raise _Die(DIE_RENAME) from None


@program("qmail-newu", crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Compile users/assign into users/cdb; 0 on success, 111 with a message otherwise."""
    os.umask(UMASK)
    try:
        os.chdir(_home.home())
    except OSError:
        os.write(2, DIE_CHDIR)
        return EXIT_TEMP
    try:
        newu()
    except _Die as e:
        os.write(2, e.text)
        return EXIT_TEMP
    except MemoryError:
        os.write(2, DIE_NOMEM)
        return EXIT_TEMP
    return 0
