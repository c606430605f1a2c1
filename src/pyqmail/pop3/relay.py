"""POP-before-SMTP bookkeeping shared by checkpassword, saveip and checkauth: one file per authenticated IP.

QMAILHOME/authenticated/IP is touched after each successful POP3 login;
its mtime is when. Only stamps written by the POP3 service's user count:
root in a root-mode installation (the pop3d tcpserver, qmail-popup and
checkpassword run as root; checkpassword writes the stamp before it becomes
the user), the installation's one user in single-user mode. The directory
is that user's, mode 755, so nobody else can create a stamp, and checkauth
ignores a stamp owned by anyone else (an old 1733 directory stays safe).
"""

from __future__ import annotations

import os

DIR = "authenticated"
DIR_MODE = 0o755
FILE_MODE = 0o644
DEFAULT_MINUTES = 10  # the book's checkauth.sh: "created in the last ten minutes"
SKEW = 60  # seconds an mtime may lie in the future (clock steps); beyond, it is forged
FRESH = 60  # seconds: a trusted stamp this new was written for this very login


def trusted(uid: int) -> bool:
    """Return whether a stamp owned by uid counts: root's, or in a single-user installation its user's."""
    if uid == 0:
        return True
    from pyqmail import home

    inst = home.install()
    return inst.single and uid == inst.uid("qmailq")


def record(ip: str) -> None:
    """Create or refresh the stamp for ip, now; raise ValueError for a bad ip, OSError if it cannot be written."""
    name = stamp_name(ip)
    if name is None:
        raise ValueError(f"TCPREMOTEIP is not an IP address: {ip[:64]!r}")
    path = os.path.join(directory(), name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, FILE_MODE)
    try:
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and (st.st_mode & 0o7777) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
        os.utime(fd)
    finally:
        os.close(fd)


def fresh(ip: str, now: float) -> bool:
    """Return whether ip has a trusted stamp written in the last FRESH seconds."""
    import stat

    name = stamp_name(ip)
    if name is None:
        return False
    try:
        st = os.lstat(os.path.join(directory(), name))
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and trusted(st.st_uid) and now - FRESH <= st.st_mtime <= now + SKEW


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
        pass  # safe: only the warning is lost
