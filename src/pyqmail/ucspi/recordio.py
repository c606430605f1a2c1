"""recordio(1): run a program and record its input and output on descriptor 2.

``recordio program [ arg ... ]``: the program runs in this process, reading
and writing pipes; a child copies descriptor 0 to the program and the
program's output to descriptor 1, printing each packet as it passes:
``PID < text`` for input, ``PID > text`` for output, ending with a space where
the packet had a newline, ``+`` where it did not, and ``PID < [EOF]`` at the
end. PID is the program's. Packets are read 256 bytes at a time, so every
record line is written atomically.
"""

from __future__ import annotations

import os
import select

from pyqmail import sig, spawn
from pyqmail.entry import program
from pyqmail.ucspi import pathexec
from pyqmail.ucspi.strerr import EXIT_TEMP, EXIT_USAGE, Die, arg, describe

FATAL = b"recordio: fatal: "
USAGE = b"recordio: usage: recordio program [ arg ... ]"
PACKET = 256
IN, OUT = b" < ", b" > "
_EVENTS = select.POLLIN | select.POLLOUT | select.POLLHUP | select.POLLERR | select.POLLNVAL


def record_lines(pid: bytes, direction: bytes, packet: bytes) -> list[bytes]:
    """Return the record lines of one packet (1 to 256 bytes)."""
    out = []
    while packet:
        nl = packet.find(b"\n")
        if nl < 0:
            out.append(pid + direction + packet + b"+\n")
            break
        out.append(pid + direction + packet[:nl] + b" \n")
        packet = packet[nl + 1:]
    return out


def _record(lines: list[bytes]) -> None:
    for line in lines:
        try:
            os.write(2, line)
        except OSError:
            pass  # as buffer_flush's result: the record is lost, the copy goes on


def copy(pid: bytes, to_program: int, from_program: int) -> None:
    """Copy 0 to to_program and from_program to 1, recording both, until the program's output ends."""
    left_state = right_state = 0  # 0: reading, 1: writing what was read, -1: ended
    left = right = b""
    while True:
        wanted: dict[int, int] = {}
        if left_state == 0:
            wanted[0] = select.POLLIN
        elif left_state == 1:
            wanted[to_program] = select.POLLOUT
        if right_state == 0:
            wanted[from_program] = wanted.get(from_program, 0) | select.POLLIN
        elif right_state == 1:
            wanted[1] = wanted.get(1, 0) | select.POLLOUT
        poller = select.poll()
        for fd, ev in wanted.items():
            poller.register(fd, ev)
        try:
            ready = dict(poller.poll(3600 * 1000))
        except InterruptedError:
            continue
        if left_state == 0 and ready.get(0, 0) & _EVENTS:
            try:
                left = os.read(0, PACKET)
            except OSError:
                left = b""
            if not left:
                left_state = -1
                os.close(to_program)
                _record([pid + b" < [EOF]\n"])
            else:
                left_state = 1
                _record(record_lines(pid, IN, left))
        elif left_state == 1 and ready.get(to_program, 0) & _EVENTS:
            try:
                n = os.write(to_program, left)
            except OSError:
                return
            left = left[n:]
            if not left:
                left_state = 0
        if right_state == 0 and ready.get(from_program, 0) & _EVENTS:
            try:
                right = os.read(from_program, PACKET)
            except OSError:
                right = b""
            if not right:
                _record([pid + b" > [EOF]\n"])
                return
            right_state = 1
            _record(record_lines(pid, OUT, right))
        elif right_state == 1 and ready.get(1, 0) & _EVENTS:
            try:
                n = os.write(1, right)
            except OSError:
                return
            right = right[n:]
            if not right:
                right_state = 0


@program("recordio", crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Run argv[1:] with its input and output recorded on descriptor 2."""
    pid = b"%d" % os.getpid()
    if len(argv) < 2:
        return Die(EXIT_USAGE, USAGE).report()
    try:
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
    except OSError as e:
        return Die(EXIT_TEMP, FATAL + b"unable to create pipe: " + describe(e)).report()
    try:
        child = os.fork()
    except OSError as e:
        return Die(EXIT_TEMP, FATAL + b"unable to fork: " + describe(e)).report()
    if child == 0:
        code = 0
        try:
            sig.signal(sig.SIGPIPE, sig.SIG_IGN)
            os.close(in_r)
            os.close(out_w)
            copy(pid, in_w, out_r)
        except BaseException:  # noqa: BLE001 - the copier must not run the program too
            code = EXIT_TEMP
        os._exit(code)
    os.close(in_w)
    os.close(out_r)
    fds = {**pathexec.inherited_fds(), 0: in_r, 1: out_w, 2: 2}
    try:
        spawn.become(pathexec.target(argv[1], os.environ.get("PATH")), argv[1:], fds=fds)
    except OSError as e:
        return Die(EXIT_TEMP, FATAL + b"unable to run " + arg(argv[1]) + b": " + describe(e)).report()
