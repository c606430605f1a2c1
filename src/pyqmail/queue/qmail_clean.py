"""qmail-clean: clean up the queue directory (qmail-clean(8)).

Reads NUL-terminated commands from descriptor 0 and answers each with one
byte on descriptor 1 (the protocol is in pyqmail.send.spawnproto):
"todo/N" removes intd/N and todo/N (qmail-send has preprocessed message N),
"foop/N" removes intd/N and mess/N (qmail-send is done with it, or found it
abandoned); '+' means done, '!' that a file could not be removed, 'x' that
the command was not understood. A file already gone counts as removed.
In a big-todo queue intd/N and todo/N are intd/D/N and todo/D/N; both
places are cleaned, so that messages of a converted flat queue go too.
Every 30 commands, and at start, pid/ files left for 36 hours by a dead
qmail-queue are removed. qmail-clean runs in QMAILHOME/queue, as qmailq:
only qmailq can write mess/, intd/ and todo/.
"""

from __future__ import annotations

import os
import time

from pyqmail import home as _home
from pyqmail import sig as signal
from pyqmail.entry import program
from pyqmail.queue import layout

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Callable

FD_COMMANDS = 0
FD_ANSWERS = 1
OSSIFIED = 129600  # 36 hours: must stay above qmail-queue's 24-hour suicide timer
PID_SWEEP_EVERY = 30  # commands between two sweeps of pid/
LINE_MIN = 7  # "todo/1" and its NUL
LINE_MAX = 100

DONE = b"+"
FAILED = b"!"
BAD = b"x"


def sweep_pid(now: float) -> None:
    """Remove the files in pid/ whose access time is 36 hours before now or older."""
    try:
        names = os.listdir("pid")
    except OSError:
        return
    for name in names:
        path = "pid/" + name
        try:
            st = os.stat(path)
        except OSError:
            continue
        if now < st.st_atime + OSSIFIED:
            continue
        try:
            os.unlink(path)
        except OSError:
            pass  # tried again at the next sweep


def _remove(path: str) -> bool:
    try:
        os.unlink(path)
    except (FileNotFoundError, NotADirectoryError):
        pass  # absent (NotADirectory: flat intd/ or todo/ holding a message numbered as the subdirectory)
    except OSError:
        return False
    return True


def clean(line: bytes, split: int) -> bytes:
    """Carry out one command (without its NUL); return the answer byte."""
    if len(line) + 1 < LINE_MIN or len(line) + 1 > LINE_MAX:
        return BAD
    kind, num = line[:5], line[5:]
    if not num.isdigit():
        return BAD
    messnum = int(num)
    # intd/N and todo/N are taken from both places: a big-todo queue's
    # subdirectory and the flat one (pyqmail.queue.layout).
    targets: tuple[str, ...]
    if kind == b"foop/":
        targets = (*layout.todo_names("intd", messnum, split), layout.split_name("mess", messnum, split))
    elif kind == b"todo/":
        targets = (*layout.todo_names("intd", messnum, split), *layout.todo_names("todo", messnum, split))
    else:
        return BAD
    for path in targets:
        if not _remove(path):
            return FAILED
    return DONE


def serve(fd_in: int, fd_out: int, split: int, clock: Callable[[], float] = time.time) -> int:
    """Answer commands from fd_in on fd_out until end of input; return the exit code."""
    buf = bytearray()
    countdown = 0
    while True:
        if countdown:
            countdown -= 1
        else:
            sweep_pid(clock())
            countdown = PID_SWEEP_EVERY
        while True:
            nul = buf.find(b"\0")
            if nul != -1:
                break
            if len(buf) > LINE_MAX:
                # An overlong command: answer it once, skip to its end.
                del buf[:]
                if not _skip_to_nul(fd_in):
                    return 0
                nul = -2
                break
            try:
                data = os.read(fd_in, 1024)
            except InterruptedError:
                continue
            except OSError:
                return 0
            if not data:
                return 0
            buf += data
        if nul == -2:
            answer = BAD
        else:
            line = bytes(buf[:nul])
            del buf[:nul + 1]
            answer = clean(line, split)
        try:
            os.write(fd_out, answer)
        except OSError:
            return 100  # qmail-send is gone


def _skip_to_nul(fd: int) -> bool:
    """Read fd up to and including the next NUL; return False at end of input."""
    while True:
        try:
            data = os.read(fd, 1)
        except InterruptedError:
            continue
        except OSError:
            return False
        if not data:
            return False
        if data == b"\0":
            return True


@program("qmail-clean", crash=111)
def main(argv: list[str]) -> int:
    """Clean up the queue as qmail-send asks."""
    try:
        os.chdir(_home.home())
        os.chdir("queue")
    except OSError:
        return 111
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    return serve(FD_COMMANDS, FD_ANSWERS, _home.install().split)
