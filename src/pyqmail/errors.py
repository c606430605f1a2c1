"""Temporary or permanent: qmail's one classification of system errors (error_temp).

STYLE principle 5: absence is not couldn't-check. A program that must decide
whether a failed system call means "try again later" or "give up" asks
`temporary(e)`; every errno not listed here is permanent.
"""

from __future__ import annotations

import errno

TEMPORARY = frozenset(
    getattr(errno, name)
    for name in (
        "EINTR", "ENOMEM", "ETXTBSY", "EIO", "ETIMEDOUT", "EWOULDBLOCK", "EAGAIN",
        "EDEADLK", "ENFILE", "EMFILE", "EFBIG", "ENOSPC", "ENETDOWN", "ENETUNREACH",
        "ENETRESET", "ECONNABORTED", "ECONNRESET", "ENOBUFS", "ETOOMANYREFS",
        "ECONNREFUSED", "EHOSTDOWN", "EHOSTUNREACH", "EPROCLIM", "EUSERS", "EDQUOT",
        "ESTALE", "ENOLCK", "EINPROGRESS",
    )
    if hasattr(errno, name)
)


def temporary(e: OSError | int) -> bool:
    """Return True if the error (an OSError or an errno) is worth retrying."""
    code = e if isinstance(e, int) else e.errno
    return code in TEMPORARY


def describe(e: OSError) -> str:
    """Return qmail-style text for an error: 'disk full', 'file does not exist', ..."""
    return _TEXT.get(e.errno or 0) or (e.strerror or "unknown error").lower()


_TEXT = {
    errno.ENOENT: "file does not exist",
    errno.EACCES: "access denied",
    errno.ENOSPC: "out of disk space",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOMEM: "out of memory",
    errno.EIO: "input/output error",
    errno.EEXIST: "file already exists",
    errno.ENOTDIR: "not a directory",
    errno.EISDIR: "is a directory",
    errno.EROFS: "read-only file system",
    errno.ETIMEDOUT: "timed out",
    errno.ECONNREFUSED: "connection refused",
    errno.EPERM: "permission denied",
}
