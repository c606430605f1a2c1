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
        "ESTALE", "ENOLCK",
    )
    if hasattr(errno, name)
)


def temporary(e: OSError | int) -> bool:
    """Return True if the error (an OSError or an errno) is worth retrying."""
    code = e if isinstance(e, int) else e.errno
    return code in TEMPORARY


def describe(e: OSError | int) -> str:
    """Return qmail's words for an error ('out of disk space', 'file does not exist', ...)."""
    code = e if isinstance(e, int) else (e.errno or 0)
    text = _TEXT.get(code)
    if text is not None:
        return text
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return f"error {code}"


_NAMES = {
    "EPERM": "permission denied", "ENOENT": "file does not exist", "ESRCH": "no such process",
    "EINTR": "interrupted system call", "EIO": "input/output error", "ENXIO": "device not configured",
    "E2BIG": "argument list too long", "ENOEXEC": "exec format error", "EBADF": "file descriptor not open",
    "ECHILD": "no child processes", "EAGAIN": "temporary failure", "ENOMEM": "out of memory",
    "EACCES": "access denied", "EFAULT": "bad address", "ENOTBLK": "not a block device",
    "EBUSY": "device busy", "EEXIST": "file already exists", "EXDEV": "cross-device link",
    "ENODEV": "device does not support operation", "ENOTDIR": "not a directory",
    "EISDIR": "is a directory", "EINVAL": "invalid argument", "ENFILE": "system cannot open more files",
    "EMFILE": "process cannot open more files", "ENOTTY": "not a tty", "ETXTBSY": "text busy",
    "EFBIG": "file too big", "ENOSPC": "out of disk space", "ESPIPE": "unseekable descriptor",
    "EROFS": "read-only file system", "EMLINK": "too many links", "EPIPE": "broken pipe",
    "EDOM": "input out of range", "ERANGE": "output out of range",
    "EINPROGRESS": "operation in progress", "EALREADY": "operation already in progress",
    "ENOTSOCK": "not a socket", "EDESTADDRREQ": "destination address required",
    "EMSGSIZE": "message too long", "EPROTOTYPE": "incorrect protocol type",
    "ENOPROTOOPT": "protocol not available", "EPROTONOSUPPORT": "protocol not supported",
    "ESOCKTNOSUPPORT": "socket type not supported", "EOPNOTSUPP": "operation not supported",
    "EPFNOSUPPORT": "protocol family not supported", "EAFNOSUPPORT": "address family not supported",
    "EADDRINUSE": "address already used", "EADDRNOTAVAIL": "address not available",
    "ENETDOWN": "network down", "ENETUNREACH": "network unreachable", "ENETRESET": "network reset",
    "ECONNABORTED": "connection aborted", "ECONNRESET": "connection reset",
    "ENOBUFS": "out of buffer space", "EISCONN": "already connected", "ENOTCONN": "not connected",
    "ESHUTDOWN": "socket shut down", "ETOOMANYREFS": "too many references", "ETIMEDOUT": "timed out",
    "ECONNREFUSED": "connection refused", "ELOOP": "symbolic link loop",
    "ENAMETOOLONG": "file name too long", "EHOSTDOWN": "host down", "EHOSTUNREACH": "host unreachable",
    "ENOTEMPTY": "directory not empty", "EUSERS": "too many users", "EDQUOT": "disk quota exceeded",
    "ESTALE": "stale NFS file handle", "EREMOTE": "too many levels of remote in path",
    "ENOLCK": "no locks available", "ENOSYS": "system call not available",
}
_TEXT = {getattr(errno, name): text for name, text in reversed(list(_NAMES.items())) if hasattr(errno, name)}
