"""saveip: record a POP3 login's address for POP-before-SMTP, then run the rest of argv.

Usage: saveip prog [args...], between checkpassword and qmail-pop3d (the
book's saveip.sh). Touches QMAILHOME/authenticated/$TCPREMOTEIP (see
pop3.relay) and runs prog in this process's place with the same environment
and descriptors. In a root-mode installation saveip runs as the user who
logged in, who may not write there: checkpassword has already written the
stamp as root, and saveip says nothing when it finds that fresh stamp. Any
other failure to record is warned about and does not refuse the login.
Exit 100 without prog, 111 if prog cannot be run.
"""

from __future__ import annotations

import os

from pyqmail.entry import program

EXIT_USAGE = 100
EXIT_TEMP = 111
PROG = "saveip"


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
            relay.record(ip)
        except PermissionError as e:
            import time

            if not relay.fresh(ip, time.time()):
                relay.warn(PROG, f"unable to record {ip} in {relay.directory()}: {e.strerror}")
        except ValueError as e:
            relay.warn(PROG, str(e))
        except OSError as e:
            relay.warn(PROG, f"unable to record {ip} in {relay.directory()}: {e.strerror}")
    try:
        spawn.become(argv[1], argv[1:], fds=relay.inherited_fds())
    except OSError as e:
        os.write(2, f"saveip: fatal: unable to run {argv[1]}: {e.strerror}\n".encode("utf-8", "backslashreplace"))
        return EXIT_TEMP
