"""saveip: record a POP3 login's address for POP-before-SMTP, then run the rest of argv.

Usage: saveip prog [args...], between checkpassword and qmail-pop3d (the
book's saveip.sh). Touches QMAILHOME/authenticated/$TCPREMOTEIP (see
pop3.relay) and runs prog in this process's place with the same environment
and descriptors. A failure to record is warned about and does not refuse the
login. Exit 100 without prog, 111 if prog cannot be run.
"""

from __future__ import annotations

import os

from pyqmail.entry import program

EXIT_USAGE = 100
EXIT_TEMP = 111
PROG = "saveip"


def record(ip: str) -> None:
    """Create or refresh the stamp for ip, now; raise OSError."""
    from pyqmail.pop3 import relay

    name = relay.stamp_name(ip)
    if name is None:
        raise ValueError(f"TCPREMOTEIP is not an IP address: {ip[:64]!r}")
    path = os.path.join(relay.directory(), name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, relay.FILE_MODE)
    try:
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and (st.st_mode & 0o7777) != relay.FILE_MODE:
            os.fchmod(fd, relay.FILE_MODE)  # whatever the umask, later logins as others must refresh it
        os.utime(fd)
    finally:
        os.close(fd)


@program(PROG, crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Record $TCPREMOTEIP, then become argv[1:]."""
    from pyqmail import spawn
    from pyqmail.pop3 import relay

    if len(argv) < 2:
        os.write(2, b"saveip: usage: saveip prog [args...]\n")
        return EXIT_USAGE
    ip = os.environ.get("TCPREMOTEIP")
    if ip is not None:
        try:
            record(ip)
        except ValueError as e:
            relay.warn(PROG, str(e))
        except OSError as e:
            relay.warn(PROG, f"unable to record {ip} in {relay.directory()}: {e.strerror}")
    try:
        spawn.become(argv[1], argv[1:], fds=relay.inherited_fds())
    except OSError as e:
        os.write(2, f"saveip: fatal: unable to run {argv[1]}: {e.strerror}\n".encode("utf-8", "backslashreplace"))
        return EXIT_TEMP
