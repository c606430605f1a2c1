"""Crash-proof steps (STYLE principle 9), named after INTERNALS.md's states.

Create exclusively, write, fsync, link or rename, fsync the directory, and
never touch a file after publishing it. Every commit point is made durable on
modern Linux filesystems (ext4, xfs), where a rename or link is not on disk
until its directory is fsync'd. A failed fsync is a failure (ARCHITECTURE,
"Durability"): callers report it as temporary and take back what they made.

Every fsync of a commit point goes through `fsync` here, which has one test
seam: when the environment variable PYQMAIL_TEST_FSYNC_FAIL names a file that
exists, each line of that file is an fnmatch pattern, and an fsync of a
descriptor whose path (/proc/self/fd) matches one fails with EIO instead of
syncing. Tests use it to make a real program's fsync fail; removing the file
lifts the failure for running daemons. Unset (always, outside tests), it
costs one dictionary lookup per fsync.
"""

from __future__ import annotations

import errno
import os

FSYNC_FAIL_ENV = "PYQMAIL_TEST_FSYNC_FAIL"


def create_excl(path: str, mode: int = 0o644) -> int:
    """Create path exclusively for writing; return the descriptor (O_CLOEXEC)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of data to fd, retrying short writes."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _injected_failure(fd: int, control: str) -> bool:
    """Return True if the test seam's file `control` names fd's path."""
    import fnmatch

    try:
        with open(control, "rb") as f:
            patterns = f.read().split(b"\n")
    except OSError:
        return False  # no control file (or an unreadable one): no failure is asked for
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False  # no /proc: the seam cannot tell, so it leaves the fsync alone
    name = os.fsencode(target)
    return any(p and fnmatch.fnmatchcase(name, p) for p in patterns)


def fsync(fd: int) -> None:
    """Flush fd's data and metadata to the disk; raise OSError (EIO included) if that fails."""
    control = os.environ.get(FSYNC_FAIL_ENV)
    if control and _injected_failure(fd, control):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    os.fsync(fd)


def fsync_dir(path: str) -> None:
    """Make the entries of directory path durable; raise OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def trunc_unlink(fd: int, path: str) -> None:
    """Empty the file open on fd and remove path (qmail-queue's cleanup); raise OSError if the unlink fails."""
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass  # safe: emptying only frees the space before the last close; the unlink below is what counts
    os.unlink(path)
