"""tcprules(1): compile rules read on stdin into a cdb for tcpserver -x, atomically.

``tcprules rules.cdb rules.tmp``: the rules are written to rules.tmp (created
or truncated), fsync'd, then renamed over rules.cdb, so a running tcpserver
sees the old rules or the new ones, never a mixture. On a bad line or a
write error, rules.cdb is left alone.

IPv6 (pyqmail.ucspi.rules): ucspi-tcp-ipv6's lines (``::1:allow``,
``2001:db8:1::allow`` for the textual prefix ``2001:db8:1:``) and, beyond it,
CIDR prefixes (``2001:db8::/32:allow,RELAYCLIENT=""``), which tcpserver and
tcprulescheck match longest first after the textual prefixes.
"""

from __future__ import annotations

import os

from pyqmail import cdb, durable
from pyqmail.entry import program
from pyqmail.ucspi import rules
from pyqmail.ucspi.strerr import EXIT_TEMP, EXIT_USAGE, Die, arg, describe

FATAL = b"tcprules: fatal: "
USAGE = b"tcprules: usage: tcprules rules.cdb rules.tmp"
BAD_LINE = b"unable to parse this line: "
MAX_LINE = 16 << 20  # C's getln grows until memory runs out; we stop here with its words
_CHUNK = 1 << 16

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import BinaryIO


def lines(fd: int) -> Iterator[bytes]:
    """Yield the lines of fd with their newlines (the last may lack one); raise OSError, Die."""
    pending = b""
    while True:
        chunk = os.read(fd, _CHUNK)
        if not chunk:
            break
        pending += chunk
        start = 0
        while True:
            nl = pending.find(b"\n", start)
            if nl < 0:
                break
            yield pending[start:nl + 1]
            start = nl + 1
        pending = pending[start:]
        if len(pending) > MAX_LINE:
            raise Die(EXIT_TEMP, FATAL + b"unable to read input: out of memory")
    if pending:
        yield pending


def _write(fd_in: int, f: BinaryIO, tmp_path: bytes) -> None:
    """Write the cdb of the rules on fd_in to f; raise Die on a bad line or a failure."""
    def die_write(e: OSError | cdb.CDBError) -> Die:
        why = describe(e) if isinstance(e, OSError) else b"out of memory"  # cdb_make's 4 GB limit
        return Die(EXIT_TEMP, FATAL + b"unable to write to " + tmp_path + b": " + why)

    try:
        writer = cdb.Writer(f)
    except OSError as e:
        raise die_write(e) from e
    source = lines(fd_in)
    while True:
        try:
            line = next(source)
        except StopIteration:
            break
        except OSError as e:
            raise Die(EXIT_TEMP, FATAL + b"unable to read input: " + describe(e)) from e
        try:
            records = rules.compile_line(line)
        except rules.RuleError as e:
            raise Die(EXIT_USAGE, FATAL + BAD_LINE + e.shown) from e
        try:
            for key, data in records:
                writer.add(key, data)
        except (OSError, cdb.CDBError) as e:
            raise die_write(e) from e
    try:
        writer.finish()
        os.fsync(f.fileno())
    except (OSError, cdb.CDBError) as e:
        raise die_write(e) from e


def compile_rules(fd_in: int, cdb_path: bytes, tmp_path: bytes) -> None:
    """Compile the rules on fd_in into cdb_path through tmp_path; raise Die on any failure."""
    try:
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise Die(EXIT_TEMP, FATAL + b"unable to create " + tmp_path + b": " + describe(e)) from e
    f = os.fdopen(fd, "wb")
    try:
        _write(fd_in, f, tmp_path)
    except BaseException:
        try:
            f.close()
        except OSError:
            pass  # already failing; the first error is the one reported
        raise
    try:
        f.close()  # NFS reports write errors here
    except OSError as e:
        raise Die(EXIT_TEMP, FATAL + b"unable to write to " + tmp_path + b": " + describe(e)) from e
    try:
        os.rename(tmp_path, cdb_path)
    except OSError as e:
        raise Die(EXIT_TEMP, FATAL + b"unable to move " + tmp_path + b" to " + cdb_path + b": "
                  + describe(e)) from e
    # Beyond tcprules: the rename itself is made durable.
    durable.fsync_dir(os.path.dirname(os.fsdecode(cdb_path)) or ".")


@program("tcprules", crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Compile the rules on stdin into argv[1] through argv[2]."""
    if len(argv) < 3:
        return Die(EXIT_USAGE, USAGE).report()
    try:
        compile_rules(0, arg(argv[1]), arg(argv[2]))
    except Die as d:
        return d.report()
    return 0
