"""qmail-qfilter: a front end for qmail-queue that runs the message through filters.

usage: qmail-qfilter filter [ arg ... ] [ -- filter [ arg ... ] ... ]

The interface of Bruce Guenter's qmail-qfilter 2.x. qmail-qfilter is a
qmail-queue (message on descriptor 0, envelope on 1). It copies both into
unnamed temporary files, then runs each filter in turn with the message on
descriptor 0 and a new temporary file on descriptor 1: what the filter
writes there becomes the message for the next filter, or for qmail-queue;
if it writes nothing, the message passes on unchanged. The envelope is on
descriptor 3, and a new temporary file on descriptor 4 takes a changed
envelope in the same way (F sender NUL, T recipient NUL ..., NUL). Anything
a filter writes on descriptor 5 (up to a NUL) names the program to run
instead of qmail-queue; the same file serves every filter. Descriptors 2 and
6 are qmail-qfilter's own: a filter may write a D or Z text on 6 and exit 82.

A filter's exit code decides: 0 goes on; 99 ends qmail-qfilter with 0 at
once, the message dropped silently; any other code ends it with that code
(31: the message is rejected for good, qmail-smtpd answers 554; 71: try
again later, 451). After the last filter the message goes to
$QQF_QMAILQUEUE, else QMAILHOME/bin/qmail-queue, whose exit code (and
descriptor-6 text) is qmail-qfilter's. $QMAILQUEUE is not used, so that it
may name qmail-qfilter itself.

Each filter sees in its environment QMAILPPID (qmail-qfilter's parent,
e.g. qmail-smtpd), QMAILUSER and QMAILHOST (the sender's parts before and
after its last @; no @: all of it is QMAILUSER), QMAILRCPTS (each recipient
followed by a newline), NUMRCPTS, ENVSIZE and MSGSIZE (bytes of the
envelope and the message as this filter gets them); QMAILNAME is removed.
Filters named by a QMAILHOME/bin stub run by fork without a new
interpreter; others are exec'd, found in $PATH.

Exits beside the filters' and qmail-queue's: 51, 53 when the temporary files
cannot be made or written, 54 when the message cannot be read, 11 or 91 for
a bad envelope (qmail-queue's readings), 81 when a filter cannot be started
or dies by a signal, or qmail-queue cannot be started.
"""

from __future__ import annotations

import os

from pyqmail import spawn
from pyqmail import home as _home
from pyqmail.entry import program
from pyqmail.queue.envelope import ENVELOPE_FORMAT, FD_ENVELOPE, FD_ERRSTR, FD_MESSAGE, Exit, Reader, Spool

FD_ENVIN = 3
FD_ENVOUT = 4
FD_QQ = 5
EXIT_DROP = 99
EXIT_INTERNAL = 81
QQ_NAME_MAX = 4096  # bytes of descriptor 5 read for a program name


def parse_args(args: list[str]) -> list[list[str]]:
    """Split the arguments at each `--` into filter commands; Exit(81) for an empty one (a trailing -- ends the last)."""
    cmds: list[list[str]] = []
    cur: list[str] = []
    for a in args:
        if a == "--":
            if not cur:
                raise Exit(EXIT_INTERNAL)
            cmds.append(cur)
            cur = []
        else:
            cur.append(a)
    if cur:
        cmds.append(cur)
    return cmds


def _tmpfile() -> int:
    s = Spool()
    s.write(b"")
    return s.rewound()


def _size(fd: int) -> int:
    try:
        return os.fstat(fd).st_size
    except OSError:
        raise Exit(EXIT_INTERNAL) from None


def _rewind(fd: int) -> None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        raise Exit(53) from None


def read_envelope(fd: int) -> tuple[bytes, list[bytes]]:
    """Read the envelope on fd from its start; return the sender and recipients (Exit 11, 54 or 91)."""
    _rewind(fd)
    it = Reader(fd, early=ENVELOPE_FORMAT).fields()
    sender = next(it)[1][:-1]
    return sender, [a[:-1] for _, a in it]


def envelope_env(env: dict[str, str], sender: bytes, recips: list[bytes]) -> None:
    """Set QMAILUSER, QMAILHOST, QMAILRCPTS and NUMRCPTS in env for this envelope; remove QMAILNAME."""
    env.pop("QMAILNAME", None)
    user, at, host = sender.rpartition(b"@")
    if not at:
        user, host = sender, b""
    env["QMAILUSER"] = os.fsdecode(user)
    env["QMAILHOST"] = os.fsdecode(host)
    env["QMAILRCPTS"] = os.fsdecode(b"".join(r + b"\n" for r in recips))
    env["NUMRCPTS"] = str(len(recips))


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def run(cmds: list[list[str]], env: dict[str, str], errstr: bool) -> int:
    """Run the filters and then qmail-queue on descriptors 0 and 1; return the exit code."""
    msg = Spool()
    msg.slurp(FD_MESSAGE)
    msg_fd = msg.rewound()
    msg_len = msg.size
    env_spool = Spool()
    env_spool.write(b"")
    sender, recips = read_envelope_stream(FD_ENVELOPE, env_spool)
    env_fd = env_spool.rewound()
    env_len = env_spool.size
    envelope_env(env, sender, recips)
    qq_fd = _tmpfile()
    extra = {2: 2}
    if errstr:
        extra[FD_ERRSTR] = FD_ERRSTR
    for cmd in cmds:
        out, env_out = _tmpfile(), _tmpfile()
        for fd in (msg_fd, env_fd, qq_fd):
            _rewind(fd)
        env["ENVSIZE"] = str(env_len)
        env["MSGSIZE"] = str(msg_len)
        try:
            pid = spawn.spawn(cmd[0], cmd, env=env,
                              fds={0: msg_fd, 1: out, FD_ENVIN: env_fd, FD_ENVOUT: env_out, FD_QQ: qq_fd, **extra})
        except OSError as e:
            os.write(2, f"qmail-qfilter: unable to run {cmd[0]}: {e.strerror}\n".encode("utf-8", "replace"))
            return EXIT_INTERNAL
        code = spawn.wait(pid)
        if code < 0:
            return EXIT_INTERNAL
        if code:
            return 0 if code == EXIT_DROP else code
        size = _size(out)
        if size:
            os.close(msg_fd)
            msg_fd, msg_len = out, size
        else:
            os.close(out)
        size = _size(env_out)
        if size:
            os.close(env_fd)
            env_fd, env_len = env_out, size
            envelope_env(env, *read_envelope(env_fd))
        else:
            os.close(env_out)
    qq = env.get("QQF_QMAILQUEUE") or os.path.join(_home.home(), "bin", "qmail-queue")
    if _size(qq_fd):
        _rewind(qq_fd)
        name = os.read(qq_fd, QQ_NAME_MAX).split(b"\0", 1)[0]
        if name:
            qq = os.fsdecode(name)
    os.close(qq_fd)
    _rewind(msg_fd)
    _rewind(env_fd)
    try:
        spawn.become(qq, [qq], env=env, fds={FD_MESSAGE: msg_fd, FD_ENVELOPE: env_fd, **extra})
    except OSError as e:
        os.write(2, f"qmail-qfilter: unable to run {qq}: {e.strerror}\n".encode("utf-8", "replace"))
    return EXIT_INTERNAL


def read_envelope_stream(fd: int, out: Spool) -> tuple[bytes, list[bytes]]:
    """Read the envelope on fd into out as qmail-queue reads it; return the sender and recipients.

    The recipients' list is what QMAILRCPTS holds anyway; the bytes go to out
    as they come.
    """
    sender = b""
    recips: list[bytes] = []
    for letter, addr in Reader(fd, early=ENVELOPE_FORMAT).fields():
        out.write(letter + addr)
        if letter == b"F":
            sender = addr[:-1]
        else:
            recips.append(addr[:-1])
    out.write(b"\0")
    return sender, recips


@program("qmail-qfilter", crash=EXIT_INTERNAL)
def main(argv: list[str]) -> int:
    """Run the message on fd 0 with the envelope on fd 1 through the filters, then qmail-queue."""
    errstr = _is_open(FD_ERRSTR)  # before any file of ours can take descriptor 6
    env = dict(os.environ)
    env["QMAILPPID"] = str(os.getppid())
    try:
        cmds = parse_args(argv[1:])
        return run(cmds, env, errstr)
    except Exit as e:
        return e.code
    except MemoryError:
        return 51
