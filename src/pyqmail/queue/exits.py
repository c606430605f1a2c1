"""qmail-queue(8) exit codes, and what programs that queue report for each."""

from __future__ import annotations

import os


class QueueExit:
    """qmail-queue(8) exit codes (plain ints: enum costs milliseconds per process start)."""

    OK = 0
    ADDR_TOO_LONG = 11
    PERM_REFUSED = 31
    NOMEM = 51
    TIMEOUT = 52
    WRITE_ERROR = 53
    READ_ERROR = 54
    CONFIG_ERROR = 55
    NETWORK_ERROR = 56
    HOME_ERROR = 61
    QUEUE_ERROR = 62
    PID_ERROR = 63
    MESS_ERROR = 64
    INTD_ERROR = 65
    TODO_ERROR = 66
    TEMP_REFUSED = 71
    CONN_TIMEOUT = 72
    CONN_REJECTED = 73
    COMM_FAILED = 74
    BUG = 81
    CUSTOM = 82
    ENVELOPE_FORMAT = 91



def permanent(code: int) -> bool:
    """Return True if a qmail-queue exit code is a permanent failure (11 to 40)."""
    return 11 <= code <= 40


CUSTOM_MAX = 255  # bytes of descriptor 6 that qmail's qmail_close keeps


def custom_report(custom: bytes) -> bytes | None:
    """Return the report an exit 82 gives with custom (what descriptor 6 held), None if not used.

    As notqmail 1.09's qmail_close: the first 255 bytes, used only when there
    are more than 2, up to a NUL; every byte else is kept (a newline too).
    The report is permanent when it starts with D and temporary otherwise,
    whatever its first byte; callers drop that byte (qmail-smtpd answers 554
    or 451 with the rest). A text starting with NUL is not used: C would
    return it as "" and qmail-smtpd would answer 250 for a message that was
    not queued.
    """
    text = custom[:CUSTOM_MAX]
    if len(text) <= 2:
        return None
    return text.split(b"\0", 1)[0] or None


def report(code: int, custom: bytes = b"") -> bytes:
    """Return the D/Z report a queueing program gives for qmail-queue exit code.

    The text is what qmail's programs say (qmail-smtpd answers it, qmail-inject
    prints it, qmail-local bounces or defers with it). Code 82 takes its text
    from descriptor 6 (custom_report); a report starting with D is permanent,
    any other temporary. Every program that queues reads descriptor 6 through
    pyqmail.queue.qq and decides here.
    """
    if code == 0:
        return b""
    if code in (11, 115):
        return b"Denvelope address too long for qq (#5.1.3)"
    if code == 31:
        return b"Dmail server permanently rejected message (#5.3.0)"
    if code == 82:
        text = custom_report(custom)
        if text is not None:
            return text
    table = {
        51: b"Zqq out of memory (#4.3.0)",
        52: b"Zqq timeout (#4.3.0)",
        53: b"Zqq write error or disk full (#4.3.0)",
        54: b"Zqq read error (#4.3.0)",
        55: b"Zqq unable to read configuration (#4.3.0)",
        56: b"Zqq trouble making network connection (#4.3.0)",
        61: b"Zqq trouble in home directory (#4.3.0)",
        62: b"Zqq trouble creating files in queue (#4.3.0)",
        63: b"Zqq trouble creating files in queue (#4.3.0)",
        64: b"Zqq trouble creating files in queue (#4.3.0)",
        65: b"Zqq trouble creating files in queue (#4.3.0)",
        66: b"Zqq trouble creating files in queue (#4.3.0)",
        71: b"Zmail server temporarily rejected message (#4.3.0)",
        72: b"Zconnection to mail server timed out (#4.4.1)",
        73: b"Zconnection to mail server rejected (#4.4.1)",
        74: b"Zcommunication with mail server failed (#4.4.2)",
        81: b"Zqq internal bug (#4.3.0)",
        91: b"Zqq internal bug (#4.3.0)",
        120: b"Zunable to exec qq (#4.3.0)",
    }
    if code in table:
        return table[code]
    if 11 <= code <= 40:
        return b"Dqq permanent problem (#5.3.0)"
    return b"Zqq temporary problem (#4.3.0)"


CRASHED = b"Zqq crashed (#4.3.0)"
WAIT_FAILED = b"Zqq waitpid surprise (#4.3.0)"


def relay(code: int | None, custom: bytes, fd: int = 6) -> int:
    """Return the exit code a filter ends with for its own qmail-queue's (QQ.code, QQ.custom).

    The code passes through untouched and so does the descriptor-6 text,
    written on fd (the filter's own descriptor 6, its caller's pipe) when
    there is one, so that 31, 71 and 82 with its D/Z text reach qmail-smtpd
    exactly as qmail-queue gave them. A qmail-queue killed by a signal (or
    none at all) is 81, qq internal bug.
    """
    if code is None or code < 0:
        return QueueExit.BUG
    if custom:
        try:
            view = memoryview(custom)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            pass  # safe: no descriptor 6 (a caller that reads none); the exit code still says it
    return code
