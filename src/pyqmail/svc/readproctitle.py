"""readproctitle: keep the latest bytes of its input in its own argv, for ps (daemontools readproctitle(8)).

usage: readproctitle L D

L is any number of arguments; D, the last, is at least five bytes (by
convention dots). Each byte read on stdin enters at the right end of D, D
shifting left, so that the most recent input shows in ps and
/proc/PID/cmdline; the first three bytes of D stay dots. Exits 0 at end of
input, 100 (silently, as daemontools does) when D is shorter than five bytes.

The bytes shown are the argument area the kernel set up at exec (from
/proc/self/stat's arg_start/arg_end), written through /proc/self/mem: the
program's argv, NUL-separated, D taking all the room that is left (an exec
of the stub leaves more than D's length: the interpreter's own arguments),
so that ps shows at least as much recent input as daemontools' would. Where
the area is too small it only reads its input.
"""

from __future__ import annotations

import os

from pyqmail.entry import program

EXIT_USAGE = 100
MIN_ROOM = 5
KEEP_DOTS = 3


def arg_area() -> tuple[int, int]:
    """Return (arg_start, arg_end) of this process from /proc/self/stat; raise OSError/ValueError."""
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    # Fields after the command name in parentheses start at field 3; arg_start is 48, arg_end 49.
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[48 - 3]), int(fields[49 - 3])


class Title:
    """This process's exec'd argument area, rewritten to show argv with input shifted into D."""

    def __init__(self, argv: list[bytes]) -> None:
        room = argv[-1]
        self.fd = -1
        self.addr = 0
        self.shown = bytearray(room)
        try:
            start, end = arg_area()
            fd = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)
        except (OSError, ValueError, IndexError):
            return
        head = b"\0".join(argv[:-1]) + b"\0"
        width = end - start - len(head) - 1
        if width < MIN_ROOM:
            os.close(fd)
            return
        # D gets all the room after the arguments before it (the interpreter's
        # own arguments included), dots in front, so the area ends with one NUL.
        self.shown = bytearray((b"." * width + room)[-width:])
        try:
            os.pwrite(fd, head + bytes(self.shown) + b"\0", start)
        except OSError:
            os.close(fd)
            return
        self.fd, self.addr = fd, start + len(head)

    def add(self, data: bytes) -> None:
        """Shift data in at the right, keep three dots at the left, show the result."""
        keep = len(self.shown) - KEEP_DOTS
        tail = (bytes(self.shown[KEEP_DOTS:]) + data)[-keep:]
        self.shown[:] = b"." * KEEP_DOTS + tail
        if self.fd >= 0:
            try:
                os.pwrite(self.fd, bytes(self.shown), self.addr)
            except OSError:
                pass  # only the display is lost; reading on keeps the writer unblocked


def _main(argv: list[str]) -> int:
    if len(argv) < 2:
        return EXIT_USAGE
    args = [os.fsencode(a) for a in argv]
    if len(args[-1]) < MIN_ROOM:
        return EXIT_USAGE
    title = Title(args)
    title.add(b"")
    while True:
        try:
            data = os.read(0, 1024)
        except InterruptedError:
            continue
        except OSError:
            return 0
        if not data:
            return 0
        title.add(data)


@program("readproctitle", crash=111)
def main(argv: list[str]) -> int:
    """Show stdin's latest bytes in the last argument until end of input; return 0, or 100 for usage."""
    return _main(argv)
