"""tcprulescheck(1): say what tcpserver -x would do with a connection.

``tcprulescheck rules.cdb`` follows the rules for the connection described
by $TCPREMOTEIP (default 0.0.0.0), $TCPREMOTEHOST and $TCPREMOTEINFO and
prints the rule found and its instructions, or ``default:`` when none applies.
"""

from __future__ import annotations

import os

from pyqmail import cdb
from pyqmail.entry import program
from pyqmail.ucspi import rules
from pyqmail.ucspi.strerr import EXIT_TEMP, EXIT_USAGE, Die, arg, describe

FATAL = b"tcprulescheck: fatal: "
USAGE = b"tcprulescheck: usage: tcprulescheck rules.cdb"
DEFAULT = b"default:\nallow connection\n"


def report(key: bytes, data: bytes) -> bytes:
    """Return what tcprulescheck prints for the rule key with this data."""
    out = [b"rule ", key, b":\n"]
    for entry in rules.entries(data):
        if entry[:1] == b"D":
            out.append(b"deny connection\n")
            return b"".join(out)
        if entry[:1] == b"+":
            out += [b"set environment variable ", entry[1:], b"\n"]
    out.append(b"allow connection\n")
    return b"".join(out)


def check(path: bytes, environ: dict[str, str] | os._Environ[str]) -> bytes:
    """Return the report for the connection environ describes; raise Die if path is unreadable."""
    def get(name: str) -> bytes | None:
        value = environ.get(name)
        return None if value is None else os.fsencode(value)

    ip = get("TCPREMOTEIP")
    try:
        reader = rules.open_cdb(path)
        try:
            found = rules.find(reader, b"0.0.0.0" if ip is None else ip,
                               get("TCPREMOTEHOST"), get("TCPREMOTEINFO"))
        finally:
            reader.close()
    except (OSError, cdb.CDBError) as e:
        raise Die(EXIT_TEMP, FATAL + b"unable to read " + path + b": " + describe(e)) from e
    return DEFAULT if found is None else report(*found)


@program("tcprulescheck", crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Print the decision of the rules in argv[1] for the connection in the environment."""
    if len(argv) < 2:
        return Die(EXIT_USAGE, USAGE).report()
    try:
        out = check(arg(argv[1]), os.environ)
    except Die as d:
        return d.report()
    view = memoryview(out)
    while view:
        view = view[os.write(1, view):]
    return 0
