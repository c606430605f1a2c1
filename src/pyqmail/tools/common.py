"""What the small qmail tools share: strerr-style messages, children, the environment.

qmail's tools report with strerr: ``prog: fatal: what: error text`` on
stderr, then exit with a qmail-command(8) code (0, 99, 100, 111). `Die`
carries such an exit through `main`; `fail` builds one from an OSError with
qmail's error words.
"""

from __future__ import annotations

import os

from pyqmail import errors, spawn
from pyqmail.durable import write_all as write_all  # the tools' name for it
from pyqmail.strerr import Die as Die, warn as warn  # one strerr for every program

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

EXIT_OK = 0
EXIT_IGNORE = 99  # qmail-command: success, ignore the rest of .qmail
EXIT_PERM = 100
EXIT_TEMP = 111
MAX_MESSAGE = 1 << 40  # bounded only by the disk: tools copy, they do not hold
CHUNK = 65536


def run_tool(body: Callable[[list[str]], Die | int], argv: list[str]) -> int:
    """Return the exit code of body(argv), writing the message of the Die it returns or raises."""
    try:
        end = body(argv)
    except Die as e:
        end = e
    return end if isinstance(end, int) else end.report()


def b(s: str) -> bytes:
    """Return the bytes of an argv or environment string."""
    return os.fsencode(s)


def fail(code: int, prefix: bytes, what: bytes, e: OSError | int) -> Die:
    """Return Die(code, prefix + what + qmail's words for e)."""
    return Die(code, prefix + what + errors.describe(e).encode())


def env(name: str, environ: Mapping[str, str] | None = None) -> bytes | None:
    """Return environment variable name as bytes, or None if unset."""
    value = (os.environ if environ is None else environ).get(name)
    return None if value is None else os.fsencode(value)


def need_env(name: str, code: int, fatal: bytes, environ: Mapping[str, str] | None = None) -> bytes:
    """Return environment variable name as bytes; raise Die(code, fatal + 'NAME not set') if it is unset."""
    value = env(name, environ)
    if value is None:
        raise Die(code, fatal + name.encode() + b" not set")
    return value


def start(argv: Sequence[str], fds: Mapping[int, int] | None = None,
          environ: Mapping[str, str] | None = None) -> int:
    """Start argv[0] as execvp would (PATH search) with the current environment; return the pid.

    Raise OSError if it cannot be run.
    """
    return spawn.spawn(argv[0], list(argv), env=dict(os.environ if environ is None else environ),
                       fds=fds or {0: 0, 1: 1, 2: 2}, fast=True)


def run_condition(argv: Sequence[str], fatal: bytes) -> int:
    """Run argv as condredirect, bouncesaying and except do; return its exit code.

    Raise Die(111) if it crashed or exited 111. A program that cannot be run
    counts as exit 111 if the reason is temporary, else as exit 100.
    """
    try:
        pid = start(argv)
    except OSError as e:
        code = EXIT_TEMP if errors.temporary(e) else EXIT_PERM
    else:
        code = spawn.wait(pid)
    if code < 0:
        raise Die(EXIT_TEMP, fatal + b"child crashed")
    if code == EXIT_TEMP:
        raise Die(EXIT_TEMP, fatal + b"temporary child error")
    return code


def copy_stdin(fatal: bytes, write: Callable[[bytes], object]) -> None:
    """Pass standard input to write, chunk by chunk, to its end; raise Die(111) if reading fails."""
    while True:
        try:
            chunk = os.read(0, CHUNK)
        except OSError as e:
            raise fail(EXIT_TEMP, fatal, b"unable to read message: ", e) from None
        if not chunk:
            return
        write(chunk)


def queue_stdin(fatal: bytes, sender: bytes, dtline: bytes, recipients: list[bytes],
                failed: bytes = b"") -> bytes:
    """Queue dtline and standard input from sender to recipients; return qmail-queue's pid as text.

    Raise Die(100 or 111, fatal + failed + qmail-queue's report) if the message is not queued.
    """
    from pyqmail.queue.qq import QQ  # only on this path: not every tool queues

    q = QQ()
    qp = str(q.pid).encode()
    q.write(dtline)
    copy_stdin(fatal, q.write)
    report = q.close(sender, recipients)
    if report:
        raise Die(EXIT_PERM if report[:1] == b"D" else EXIT_TEMP, fatal + failed + report[1:])
    return qp
