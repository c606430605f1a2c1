"""Which file ucspi-tcp's pathexec_run would execute for a program name."""

from __future__ import annotations

import errno
import os

DEFAULT_PATH = "/bin:/usr/bin"  # pathexec's PATH when $PATH is unset


def target(name: str, path: str | None) -> str:
    """Return the file pathexec_run would execute for name; raise OSError as its execve would.

    A name with a slash is itself; otherwise each $PATH directory is tried in
    turn (an empty entry is the current directory). A file that exists but
    cannot be executed is passed over, and its error reported if nothing
    else is found.
    """
    if "/" in name:
        return name
    saved = 0
    for d in (DEFAULT_PATH if path is None else path).split(":"):
        cand = (d or ".") + "/" + name
        try:
            st = os.stat(cand)
        except OSError as e:
            if e.errno != errno.ENOENT:
                saved = e.errno or 0
                if saved not in (errno.EACCES, errno.EPERM, errno.EISDIR):
                    break
            continue
        if os.path.isdir(cand):
            saved = errno.EACCES
            continue
        if not (st.st_mode & 0o111) or not os.access(cand, os.X_OK):
            saved = errno.EACCES
            continue
        return cand
    code = saved or errno.ENOENT
    raise OSError(code, os.strerror(code), name)


def inherited_fds() -> dict[int, int]:
    """Return {fd: fd} for this process's descriptors above 2 that exec would pass on."""
    out: dict[int, int] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for name in names:
        fd = int(name)
        if fd > 2:
            try:
                if os.get_inheritable(fd):
                    out[fd] = fd
            except OSError:
                continue  # the listing's own descriptor, closed by now
    return out
