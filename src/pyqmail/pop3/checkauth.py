"""checkauth: let an address that logged in to POP3 recently relay, then run the rest of argv.

Usage: checkauth [-m minutes] prog [args...], between tcpserver and
qmail-smtpd (the book's checkauth.sh). If QMAILHOME/authenticated/$TCPREMOTEIP
was touched by checkpassword or saveip within the last minutes (default 10)
and is owned by the POP3 service's user (root; in a single-user installation
its user: see pop3.relay), RELAYCLIENT is set to the empty string; a stale stamp is removed if this user may. prog then
runs in this process's place. Exit 100 for bad usage, 111 if prog cannot be run.
"""

from __future__ import annotations

import os
import time

from pyqmail.entry import program

EXIT_USAGE = 100
EXIT_TEMP = 111
PROG = "checkauth"
USAGE = b"checkauth: usage: checkauth [-m minutes] prog [args...]\n"
MAX_MINUTES = 1 << 20


def recent(ip: str, minutes: int, now: float) -> bool:
    """Return True if ip has a stamp newer than minutes before now; remove a stale one."""
    from pyqmail.pop3 import relay

    name = relay.stamp_name(ip)
    if name is None:
        return False
    path = os.path.join(relay.directory(), name)
    try:
        st = os.lstat(path)
    except OSError:
        return False
    import stat

    if not stat.S_ISREG(st.st_mode) or not relay.trusted(st.st_uid):
        return False  # only the POP3 service's user writes stamps (pop3.relay)
    if now - minutes * 60 < st.st_mtime <= now + relay.SKEW:
        return True
    try:
        os.unlink(path)  # as the book's script does
    except OSError:
        pass  # safe: checkauth (qmaild) may not write authenticated/; a stale stamp is ignored anyway
    return False


@program(PROG, crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Set RELAYCLIENT if $TCPREMOTEIP logged in recently, then become the program in argv."""
    from pyqmail import spawn
    from pyqmail.pop3 import relay

    args = argv[1:]
    minutes = relay.DEFAULT_MINUTES
    if args and args[0].startswith("-m"):
        value = args[0][2:] or (args[1] if len(args) > 1 else "")
        args = args[1:] if args[0][2:] else args[2:]
        if not value.isdigit() or not 0 < int(value) <= MAX_MINUTES:
            os.write(2, USAGE)
            return EXIT_USAGE
        minutes = int(value)
    if not args:
        os.write(2, USAGE)
        return EXIT_USAGE
    ip = os.environ.get("TCPREMOTEIP", "")
    if "RELAYCLIENT" not in os.environ and recent(ip, minutes, time.time()):
        os.environ["RELAYCLIENT"] = ""
    try:
        spawn.become(args[0], args, fds=relay.inherited_fds())
    except OSError as e:
        os.write(2, f"checkauth: fatal: unable to run {args[0]}: {e.strerror}\n".encode("utf-8", "backslashreplace"))
        return EXIT_TEMP
