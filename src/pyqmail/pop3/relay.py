"""POP-before-SMTP bookkeeping shared by saveip and checkauth: one file per authenticated IP address.

QMAILHOME/authenticated/IP is touched by saveip after each successful POP3
login; its mtime is when. The directory is mode 1733 (anyone may create, only
owners delete, nobody lists) because saveip runs as whichever user logged in;
the files are mode 622 so that any later login from the same address can
refresh them.
"""

from __future__ import annotations

import os

DIR = "authenticated"
DIR_MODE = 0o1733
FILE_MODE = 0o622
DEFAULT_MINUTES = 10  # the book's checkauth.sh: "created in the last ten minutes"
SKEW = 60  # seconds an mtime may lie in the future (clock steps); beyond, it is forged


def directory() -> str:
    """Return the directory of IP stamps in this installation."""
    from pyqmail import home

    return os.path.join(home.home(), DIR)


def stamp_name(ip: str) -> str | None:
    """Return the file name for TCPREMOTEIP ip (canonical form); None if ip is no IP address."""
    import ipaddress

    if not ip or len(ip) > 64:
        return None
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return None


def inherited_fds() -> dict[int, int]:
    """Return every descriptor exec would pass on (those without close-on-exec), mapped to itself."""
    import fcntl

    out: dict[int, int] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        names = ["0", "1", "2"]
    for n in names:
        fd = int(n)
        try:
            if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                out[fd] = fd
        except OSError:
            continue  # the descriptor listdir itself used, now closed
    return out


def warn(prog: str, text: str) -> None:
    """Write prog: warning: text to stderr, ignoring failure."""
    try:
        os.write(2, f"{prog}: warning: {text}\n".encode("utf-8", "backslashreplace"))
    except OSError:
        pass
