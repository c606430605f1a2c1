"""Crash-proof steps (STYLE principle 9), named after INTERNALS.md's states.

Create exclusively, write, fsync, link or rename, fsync the directory, and
never touch a file after publishing it. Every commit point is made durable on
modern Linux filesystems (ext4, xfs), where a rename or link is not on disk
until its directory is fsync'd.
"""

from __future__ import annotations

import os


def create_excl(path: str, mode: int = 0o644) -> int:
    """Create path exclusively for writing; return the descriptor (O_CLOEXEC)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of data to fd, retrying short writes."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def fsync_dir(path: str) -> None:
    """Make the entries of directory path durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def trunc_unlink(fd: int, path: str) -> None:
    """Empty the file open on fd and remove path (qmail-queue's cleanup)."""
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass
    os.unlink(path)
