"""maildir(5) delivery: write tmp/time.pid.host, fsync, link to new/, fsync new/.

The six steps of maildir(5), with everything a caller might want to vary
injected: the clock, the sleep between name collisions, the pid and the host
in the unique name. On top of maildir(5), the new/ directory is fsync'd
after the link, so that an acknowledged delivery survives a crash on
filesystems where a link is not durable until its directory is
(ARCHITECTURE decision 7); if that fsync fails, the link is taken back and
the delivery is a temporary failure.

`deliver` answers with one of qmail-local's maildir outcomes; the words for
them are qmail-local's.
"""

from __future__ import annotations

import os

from pyqmail import durable, errors
from pyqmail import sig as signal
from pyqmail.durable import write_all

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Callable

# Outcomes of a delivery (the exit codes of qmail-local's maildir child).
OK = 0
TEMPORARY = 1  # any other trouble: "Temporary error on maildir delivery"
NO_CHDIR = 2  # the maildir itself cannot be entered: "Unable to chdir to maildir"
TIMEOUT = 3  # the 24-hour timer of maildir(5) ran out
READ_ERROR = 4  # the message could not be read

TIMER_SECONDS = 86400  # maildir(5): abort a delivery that takes 24 hours
RETRY_SLEEP = 2  # maildir(5): sleep two seconds when tmp/name is taken ...
RETRIES = 2  # ... and try again, a limited number of times
HOST_MAX = 64  # qmail takes the host name through a 64-byte buffer
_CHUNK = 65536
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class _Timeout(Exception):
    """The delivery timer ran out."""


def _alarm(signum: int, frame: object) -> None:
    raise _Timeout


def hostname() -> bytes:
    """Return this host's name as qmail's Maildir names use it (at most 64 bytes)."""
    return os.fsencode(os.uname().nodename)[:HOST_MAX]


def unique_name(when: float, pid: int, host: bytes, seq: int = 0) -> bytes:
    """Return the time.pid.host name of a message delivered at `when` by process pid.

    seq > 0 (delivery number seq of a long-lived process, a qmail-lspawn
    worker) gives time.PpidQseq.host, the maildir spec's P and Q parts.
    """
    if seq:
        return b"%d.P%dQ%d.%s" % (int(when), pid, seq, host)
    return b"%d.%d.%s" % (int(when), pid, host)


def deliver(maildir: bytes, message_fd: int, head: bytes, *, pid: int, host: bytes,
            clock: Callable[[], float], sleep: Callable[[float], None],
            timer: int = TIMER_SECONDS, seq: int = 0) -> int:
    """Deliver head + the rest of message_fd into maildir; return OK or the failure's outcome.

    The message is read from message_fd's current offset to its end. `timer`
    seconds after the unique name is chosen, the delivery is abandoned
    (SIGALRM; the caller's handler is restored on return).
    """
    try:
        # Entered as chdir() would: a stat through the directory needs the
        # same search permission on it that chdir needs.
        dirfd = os.open(maildir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        return TEMPORARY if errors.temporary(e) else NO_CHDIR
    try:
        try:
            os.stat(b".", dir_fd=dirfd)
        except OSError as e:
            return TEMPORARY if errors.temporary(e) else NO_CHDIR
        return _deliver_in(dirfd, message_fd, head, pid, host, clock, sleep, timer, seq)
    finally:
        os.close(dirfd)


def _free_name(dirfd: int, pid: int, host: bytes, clock: Callable[[], float],
               sleep: Callable[[float], None], seq: int = 0) -> bytes | None:
    """Return a unique name not yet in tmp/, or None after RETRIES collisions."""
    for attempt in range(RETRIES + 1):
        name = unique_name(clock(), pid, host, seq)
        try:
            os.stat(b"tmp/" + name, dir_fd=dirfd)
        except FileNotFoundError:
            return name
        except OSError:
            pass  # maildir(5): anything but ENOENT counts as "taken"; sleep and retry
        if attempt == RETRIES:
            return None
        sleep(RETRY_SLEEP)
    return None


def _deliver_in(dirfd: int, message_fd: int, head: bytes, pid: int, host: bytes,
                clock: Callable[[], float], sleep: Callable[[float], None], timer: int,
                seq: int = 0) -> int:
    name = _free_name(dirfd, pid, host, clock, sleep, seq)
    if name is None:
        return TEMPORARY
    tmp = b"tmp/" + name
    new = b"new/" + name
    old_handler = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timer)
    created = False
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=dirfd)
        except OSError:
            return TEMPORARY
        created = True
        try:
            outcome = _write_message(fd, message_fd, head)
        except BaseException:
            os.close(fd)
            raise
        try:
            os.close(fd)
        except OSError:
            return TEMPORARY  # maildir(5) "NFS-writing": a failed close is a failed write
        if outcome != OK:
            return outcome
        try:
            os.link(tmp, new, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        except OSError:
            return TEMPORARY
        try:
            newfd = os.open(b"new", _DIR, dir_fd=dirfd)
            try:
                durable.fsync(newfd)
            finally:
                os.close(newfd)
        except OSError:
            # The link may not survive a crash, so the delivery is not
            # done: take it back, and qmail-send tries again later. A reader
            # that already moved it to cur/ gets it twice, never lost.
            try:
                os.unlink(new, dir_fd=dirfd)
            except OSError:
                pass  # safe: a reader has it already, or it stays in new/: a duplicate at worst
            return TEMPORARY
        return OK
    except _Timeout:
        return TIMEOUT
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_handler)
        if created:
            try:
                os.unlink(tmp, dir_fd=dirfd)
            except OSError:
                pass  # maildir(5): the delivery "may attempt" to unlink; readers clean tmp/


def _write_message(fd: int, message_fd: int, head: bytes) -> int:
    """Write head and the message to fd and fsync it; return OK, READ_ERROR or TEMPORARY."""
    try:
        write_all(fd, head)
    except OSError:
        return TEMPORARY
    while True:
        try:
            chunk = os.read(message_fd, _CHUNK)
        except OSError:
            return READ_ERROR
        if not chunk:
            break
        try:
            write_all(fd, chunk)
        except OSError:
            return TEMPORARY
    try:
        durable.fsync(fd)
    except OSError:
        return TEMPORARY
    return OK


TMP_MAX_AGE = 129600  # 36 hours: maildir(5)'s rule for abandoned tmp/ files


def clean_tmp(now: int) -> None:
    """Remove files in the current Maildir's tmp/ not accessed for 36 hours (qmail's maildir_clean)."""
    try:
        names = os.listdir("tmp")
    except OSError:
        return
    for name in names:
        if name.startswith("."):
            continue
        path = "tmp/" + name
        try:
            if now > os.stat(path).st_atime + TMP_MAX_AGE:
                os.unlink(path)
        except OSError:
            continue
