"""qmail-getpw(8): print the user, uid, gid, homedir, dash and ext controlling a local address.

Each of the six is terminated by NUL on standard output. In case of trouble
nothing is printed and the exit code is nonzero: 100 without an argument,
qmail-lspawn's QLX_NOALIAS (116) without an alias user, QLX_NFS (115) when
a home directory cannot be checked for a temporary reason.
"""

from __future__ import annotations

import os

from pyqmail import durable
from pyqmail.entry import program
from pyqmail.local import users

EXIT_USAGE = 100


@program("qmail-getpw", crash=users.QLX_SYS)
def main(argv: list[str]) -> int:
    """Print the assignment qmail-getpw's rules give argv[1]."""
    if len(argv) < 2:
        return EXIT_USAGE
    local = os.fsencode(argv[1])
    try:
        found = users.getpw(local)
    except users.GetpwError as e:
        return e.code
    try:
        durable.write_all(1, found.encode())
    except OSError:
        pass  # qmail-getpw does not check its one flush either
    return 0
