"""qmail-log(5): every line qmail-send writes to its activity record, as bytes.

Each function returns one whole line, newline included, so that the daemon
writes it with one write(2): a line reaches the logger in one piece, never
interleaved with another. Texts are qmail 1.03's, byte for byte.
"""

from __future__ import annotations

CHANNEL_NAMES = (b"local", b"remote")

# Fatal problems: qmail-send exits 111 after one of these.
CANNOT_START_HOME = b"alert: cannot start: unable to switch to home directory\n"
CANNOT_START_CONTROLS = b"alert: cannot start: unable to read controls\n"
CANNOT_START_QUEUE = b"alert: cannot start: unable to switch to queue directory\n"
CANNOT_START_MUTEX = b"alert: cannot start: unable to open mutex\n"
CANNOT_START_RUNNING = b"alert: cannot start: qmail-send is already running\n"
CANNOT_START_SPAWN = b"alert: cannot start: hath the daemon spawn no fire?\n"
LOST_SPAWN = b"alert: oh no! lost spawn connection! dying...\n"
LOST_CLEAN = b"alert: oh no! lost qmail-clean connection! dying...\n"
LOST_TODO = b"alert: oh no! lost qmail-todo connection! dying...\n"  # ext-todo's qmail-send
TODO_DIALECT = b"warning: qmail-todo speaks an obscure dialect\n"
SEND_DIALECT = b"warning: qmail-send speaks an obscure dialect\n"  # ext-todo's qmail-todo

# Serious problems: qmail-send sleeps ten seconds and tries again.
BOUNCE_APPEND = b"alert: unable to append to bounce message; HELP! sleeping...\n"
SWITCH_BACK = b"alert: unable to switch back to queue directory; HELP! sleeping...\n"
REREAD_HOME = b"alert: unable to reread controls: unable to switch to home directory\n"
REREAD_LOCALS = b"alert: unable to reread control/locals\n"
REREAD_VDOMS = b"alert: unable to reread control/virtualdomains\n"

STATUS_EXITING = b"status: exiting\n"
SELECT_TROUBLE = b"warning: trouble in select\n"
REPORT_OUT_OF_RANGE = b"warning: internal error: delivery report out of range\n"
QQ_START = b"warning: unable to start qmail-queue, will try later\n"
QQ_TROUBLE = b"warning: trouble injecting bounce message, will try later\n"

_SAFE = bytes(
    (c if 33 <= c <= 126 and c != ord("%") else ord("_")) if c != ord("\n") else ord("/")
    for c in range(256))


def safe(text: bytes) -> bytes:
    """Return text as qmail logs it: cut at NUL, newline as '/', other unsafe bytes (and '%') as '_'."""
    nul = text.find(b"\0")
    if nul != -1:
        text = text[:nul]
    return text.translate(_SAFE)


def _num(n: int) -> bytes:
    return str(n).encode()


def opendir(name: bytes) -> bytes:
    """alert: a directory of the queue could not be listed."""
    return b"alert: unable to opendir " + name + b", sleeping...\n"


def status(used: tuple[int, int] | list[int], limit: tuple[int, int] | list[int], exiting: bool = False) -> bytes:
    """status: local l/L remote r/R (and ' exitasap' once TERM has come)."""
    line = b"status: local %d/%d remote %d/%d" % (used[0], limit[0], used[1], limit[1])
    if exiting:
        line += b" exitasap"
    return line + b"\n"


def new_msg(messid: int) -> bytes:
    """new msg N: preprocessing of todo/N starts."""
    return b"new msg " + _num(messid) + b"\n"


def info_msg(messid: int, size: int, sender: bytes, qp: int, uid: int) -> bytes:
    """info msg N: bytes B from <S> qp P uid U."""
    return b"info msg %d: bytes %d from <%s> qp %d uid %d\n" % (messid, size, safe(sender), qp, uid)


def starting(delid: int, messid: int, channel: int, recip: bytes) -> bytes:
    """starting delivery D: msg N to local|remote ADDR."""
    return b"starting delivery %d: msg %d to %s %s\n" % (delid, messid, CHANNEL_NAMES[channel], safe(recip))


def success(delid: int, report: bytes) -> bytes:
    """delivery D: success: TEXT."""
    return b"delivery %d: success: %s\n" % (delid, safe(report))


def failure(delid: int, report: bytes) -> bytes:
    """delivery D: failure: TEXT."""
    return b"delivery %d: failure: %s\n" % (delid, safe(report))


def deferral(delid: int, report: bytes) -> bytes:
    """delivery D: deferral: TEXT."""
    return b"delivery %d: deferral: %s\n" % (delid, safe(report))


def mangled(delid: int) -> bytes:
    """delivery D: report mangled, will defer."""
    return b"delivery %d: report mangled, will defer\n" % delid


def end_msg(messid: int) -> bytes:
    """end msg N: the message is about to leave the queue."""
    return b"end msg " + _num(messid) + b"\n"


def bounce_msg(messid: int, qp: int) -> bytes:
    """bounce msg N qp Q: the bounce of message N was queued by qmail-queue pid Q."""
    return b"bounce msg %d qp %d\n" % (messid, qp)


def triple_bounce(fn: bytes) -> bytes:
    """triple bounce: discarding bounce/N."""
    return b"triple bounce: discarding " + fn + b"\n"


def clean_trouble(fn: bytes) -> bytes:
    """qmail-clean answered that it could not remove fn."""
    return b"warning: qmail-clean unable to clean up " + fn + b"\n"


def unable(what: bytes, fn: bytes, later: bool = False) -> bytes:
    """warning: unable to WHAT FN (stat, unlink, open, create), optionally '; will try again later'."""
    return b"warning: unable to " + what + b" " + fn + (b"; will try again later\n" if later else b"\n")


def trouble(what: bytes, fn: bytes, later: bool = False) -> bytes:
    """warning: trouble WHAT FN (reading, opening, writing to, fsyncing)."""
    return b"warning: trouble " + what + b" " + fn + (b"; will try again later\n" if later else b"\n")


def torn_envelope(fn: bytes) -> bytes:
    """A todo/N a power failure left torn (a message never acknowledged): the message is removed."""
    return b"warning: trouble with " + fn + b": torn envelope, removing message\n"


def trouble_marking(fn: bytes) -> bytes:
    """A success or permanent failure could not be recorded."""
    return b"warning: trouble marking " + fn + b"; message will be delivered twice!\n"


def unknown_record(fn: bytes, bang: bool) -> bytes:
    """A recipient list or envelope holds a record of unknown type."""
    return b"warning: unknown record type in " + fn + (b"!\n" if bang else b"\n")


def utime_trouble(fn: bytes) -> bytes:
    """The next retry time of a recipient list could not be saved at exit."""
    return b"warning: unable to utime " + fn + b"; message will be retried too soon\n"
