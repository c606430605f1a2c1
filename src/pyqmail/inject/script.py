"""What qmail's shell-script programs (datemail, mailsubj) do through /bin/sh.

qmail installs datemail and mailsubj as /bin/sh scripts; their observable
behaviour includes the shell's: echo's backslash escapes, the messages and
exit codes for a program that cannot be run, descriptors passed on as exec
passes them. The shell is dash, /bin/sh on Debian-family systems, and the
scripts have qmail's two header lines (#!/bin/sh and a warning) on top,
which is why the line numbers in messages start at 3.
"""

from __future__ import annotations

import errno
import os

from pyqmail import spawn

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Sequence

EXIT_NOEXEC = 126  # dash: found but cannot be run (EACCES)
EXIT_NOTFOUND = 127  # dash: ENOENT
EXIT_SHELL = 2  # dash: any other exec failure, or a failed special builtin
_COPY = 65536

_SIMPLE = {ord("a"): 7, ord("b"): 8, ord("e"): 27, ord("f"): 12, ord("n"): 10,
           ord("r"): 13, ord("t"): 9, ord("v"): 11, ord("\\"): ord("\\")}
_OCTAL = b"01234567"


def echo(args: Sequence[bytes]) -> bytes:
    """Return what dash's echo builtin writes for args (first arg not -n).

    Backslash escapes are interpreted as XSI echo does: \\a \\b \\e \\f \\n
    \\r \\t \\v \\\\, \\0nnn and \\nnn octal; \\c ends all output, newline
    included; any other backslash stays.
    """
    out = bytearray()
    for index, arg in enumerate(args):
        i = 0
        while i < len(arg):
            c = arg[i]
            i += 1
            if c != ord("\\") or i == len(arg):
                out.append(c)
                continue
            e = arg[i]
            if e == ord("c"):
                return bytes(out)
            if e in _SIMPLE:
                out.append(_SIMPLE[e])
                i += 1
            elif e in _OCTAL:
                if e == ord("0") and i + 1 < len(arg) and arg[i + 1] in _OCTAL:
                    i += 1  # \0nnn: the 0 only announces the octal digits
                value = 0
                for _ in range(3):
                    if i < len(arg) and arg[i] in _OCTAL:
                        value = value * 8 + arg[i] - ord("0")
                        i += 1
                    else:
                        break
                out.append(value & 0xFF)
            else:
                out.append(c)  # unknown escape: the backslash stays, the next byte follows
        out += b" " if index < len(args) - 1 else b"\n"
    if not args:
        out += b"\n"
    return bytes(out)


def exec_failure(prog: bytes, line: int, path: str, e: OSError, via_exec: bool) -> tuple[bytes, int]:
    """Return dash's complaint and exit code when path cannot be run at script line `line`."""
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        reason = b"not found"
    else:
        reason = os.strerror(e.errno or errno.ENOEXEC).encode()
    code = {errno.EACCES: EXIT_NOEXEC, errno.ENOENT: EXIT_NOTFOUND}.get(e.errno or 0, EXIT_SHELL)
    what = b"exec: " if via_exec else b""
    return prog + b": %d: " % line + what + os.fsencode(path) + b": " + reason + b"\n", code


def inherited_fds() -> dict[int, int]:
    """Return {fd: fd} for every descriptor that exec would pass on (open, not close-on-exec)."""
    try:
        names = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        names = list(range(1024))
    fds = {}
    for fd in names:
        try:
            if os.get_inheritable(fd):
                fds[fd] = fd
        except OSError:
            pass  # closed (the listing's own descriptor, or never open)
    return fds


def start(path: str, argv: Sequence[str], fds: dict[int, int]) -> int:
    """Start path with argv, the environment and fds, as the shell would; return the pid.

    Raise OSError if it cannot be run.
    """
    return spawn.spawn(path, list(argv), env=dict(os.environ), fds=fds)


def feed(fd: int, head: bytes) -> OSError | None:
    """Write head, then standard input (as cat), to fd until either ends; return a read error of the input.

    A failed write ends the copy quietly: the reader went away, and a shell
    pipeline's writer would die of SIGPIPE.
    """
    data = head
    while True:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view):]
            except OSError:
                return None
        try:
            data = os.read(0, _COPY)
        except OSError as e:
            return e
        if not data:
            return None


def pipeline_status(pid: int) -> int:
    """Wait for the last program of a pipeline; return the status dash gives the script.

    A program killed by signal N gives 128+N, and dash names the signal on
    standard error (not SIGINT or SIGPIPE), with " (core dumped)" if it did.
    """
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if not os.WIFSIGNALED(status):
        return os.waitstatus_to_exitcode(status)
    signum = os.WTERMSIG(status)
    import signal  # only here: its import is slow, and this path is rare

    if signum not in (signal.SIGINT, signal.SIGPIPE):
        name = signal.strsignal(signum) or f"Signal {signum}"
        complain(name.encode() + (b" (core dumped)" if os.WCOREDUMP(status) else b"") + b"\n")
    return 128 + signum


def complain(text: bytes) -> None:
    """Write text to standard error, ignoring failure."""
    try:
        os.write(2, text)
    except OSError:
        pass  # safe: stderr gone; the exit code carries the failure
