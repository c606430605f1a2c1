"""The pipes between qmail-send and qmail-lspawn, qmail-rspawn and qmail-clean.

These are qmail 1.03's own protocols, kept byte for byte so that any one of
the four daemons can be swapped for C qmail's.

qmail-send -> spawner (its descriptor 0), one command per delivery:
    one byte, the delivery slot; the message's name relative to queue/mess
    ("3/12345": split directory and number), NUL; the envelope sender, NUL;
    the recipient, NUL.
spawner -> qmail-send (its descriptor 1): once at start one byte, the most
    deliveries it runs at once; then per finished delivery one byte, the
    slot; the report: 'K' (delivered), 'Z' (temporary failure) or 'D'
    (permanent failure) and the text; NUL.
qmail-send -> qmail-clean: "todo/N" NUL (remove intd/N and todo/N after
    preprocessing) or "foop/N" NUL (remove intd/N and mess/N); qmail-clean
    answers one byte: '+' done, '!' could not, 'x' command not understood.

The spawner's loop (qmail's spawn.c) is here too: qmail-lspawn and
qmail-rspawn differ only in how they start a delivery and read its result.
"""

from __future__ import annotations

import errno
import gc
import os
import select
import stat

from pyqmail import sig as signal
from pyqmail import workers

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Iterator

REPORTMAX = 10000  # qmail-send keeps at most this much of one report
FIELD_MAX = 65536  # bytes of one command field a spawner accepts (qmail: as much as memory allows)
MESSID_MAX = 100
SPAWN_MAX = 120  # conf-spawn: deliveries a spawner runs at once; told to qmail-send as one byte

CLEAN_DONE = b"+"
CLEAN_FAILED = b"!"
CLEAN_BAD = b"x"

# What a spawner answers when it cannot start a delivery (qmail's spawn.c words).
ERR_NOMEM = b"Zqmail-spawn out of memory. (#4.3.0)\n"
ERR_DELNUM_BIG = b"ZInternal error: delnum too big. (#4.3.5)\n"
ERR_DELNUM_USED = b"ZInternal error: delnum in use. (#4.3.5)\n"
ERR_MESSID_DIGITS = b"DInternal error: messid has nonnumerics. (#5.3.5)\n"
ERR_MESSID_LONG = b"DInternal error: messid too long. (#5.3.5)\n"
ERR_MESSID_SHORT = b"DInternal error: messid too short. (#5.3.5)\n"
ERR_NO_HOST = b"DSorry, address must include host name. (#5.1.3)\n"
ERR_OPEN = b"Zqmail-spawn unable to open message. (#4.3.0)\n"
ERR_FSTAT = b"Zqmail-spawn unable to fstat message. (#4.3.0)\n"
ERR_TYPE = b"ZSorry, message has wrong type. (#4.3.5)\n"
ERR_OWNER = b"ZSorry, message has wrong owner. (#4.3.5)\n"
ERR_PIPE = b"Zqmail-spawn unable to create pipe. (#4.3.0)\n"
ERR_FORK = b"Zqmail-spawn unable to fork. (#4.3.0)\n"
TRUNCMESS = b"\nError report too long, sorry.\n"


def command(slot: int, messid: bytes, sender: bytes, recip: bytes) -> bytes:
    """Return qmail-send's command for one delivery."""
    return bytes((slot,)) + messid + b"\0" + sender + b"\0" + recip + b"\0"


def clean_command(kind: str, messnum: int) -> bytes:
    """Return a qmail-clean command: kind 'todo' (after preprocessing) or 'foop' (remove the message)."""
    return f"{kind}/{messnum}".encode() + b"\0"


class CommandReader:
    """Split a spawner's input into commands: (slot, messid, sender, recip, ok).

    ok is False when a field was longer than FIELD_MAX (qmail's "out of
    memory" case); the slot is still right, so the delivery can be refused.
    """

    def __init__(self) -> None:
        self._stage = 0
        self._slot = 0
        self._fields: list[bytearray] = [bytearray(), bytearray(), bytearray()]
        self._abort = False

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes, bytes, bytes, bool]]:
        """Yield every command data completes."""
        pos = 0
        n = len(data)
        while pos < n:
            if self._stage == 0:
                self._slot = data[pos]
                pos += 1
                self._stage = 1
                for f in self._fields:
                    f.clear()
                self._abort = False
                continue
            field = self._fields[self._stage - 1]
            end = data.find(b"\0", pos)
            chunk_end = n if end == -1 else end
            if len(field) + chunk_end - pos > FIELD_MAX:
                self._abort = True
            else:
                field += data[pos:chunk_end]
            if end == -1:
                return
            pos = end + 1
            if self._stage < 3:
                self._stage += 1
                continue
            self._stage = 0
            m, s, r = (bytes(f) for f in self._fields)
            yield self._slot, m, s, r, not self._abort


class ReportReader:
    """Split a spawner's output into (slot, report) pairs; report is the status letter and text."""

    def __init__(self) -> None:
        self._line = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        """Yield every report data completes; a report longer than REPORTMAX is cut there."""
        pos = 0
        n = len(data)
        while pos < n:
            end = data.find(b"\0", pos)
            if end == -1:
                self._add(data[pos:])
                return
            if end == pos and not self._line:
                # A NUL as the first byte is slot 0, not the end of a report.
                self._line.append(0)
                pos += 1
                continue
            self._add(data[pos:end])
            pos = end + 1
            line = bytes(self._line)
            self._line.clear()
            yield line[0], line[1:]

    def _add(self, chunk: bytes) -> None:
        room = REPORTMAX - len(self._line)
        if room > 0:
            self._line += chunk[:room]


def valid_messid(messid: bytes) -> bytes | None:
    """Return the spawner's refusal for a malformed message name, or None if it is fine."""
    for i, c in enumerate(messid):
        if not (48 <= c <= 57) and (i == 0 or c != ord("/")):
            return ERR_MESSID_DIGITS
    if len(messid) + 1 > MESSID_MAX:
        return ERR_MESSID_LONG
    if not messid:
        return ERR_MESSID_SHORT
    return None


def truncate(output: bytearray, limit: int) -> None:
    """Cut a delivery's output that grew past limit (when limit > 100), ending it with TRUNCMESS."""
    if limit > 100 and len(output) > limit:
        del output[limit - len(TRUNCMESS) - 3:]
        output += TRUNCMESS


class Delivery:
    """One delivery a spawner is running: its child, the pipe it reports on, what it said."""

    __slots__ = ("slot", "pid", "fd", "output", "status", "eof")

    def __init__(self, slot: int, pid: int, fd: int) -> None:
        self.slot = slot
        self.pid = pid
        self.fd = fd
        self.output = bytearray()
        self.status: int | None = None  # wait status once the child is reaped
        self.eof = False


class Spawner:
    """qmail's spawn.c: run deliveries as qmail-send commands them, report each as it ends.

    Subclasses give start() (start one delivery, its output going to the
    given descriptor) and report() (the status letter and text for a wait
    status and output). Descriptor 0 is qmail-send's commands, 1 the reports.
    """

    truncreport = 0  # bytes of output kept; 0: all (up to OUTPUT_MAX)
    OUTPUT_MAX = 1 << 20
    FD_COMMANDS = 0
    FD_REPORTS = 1

    def __init__(self, uid_q: int) -> None:
        self.uid_q = uid_q  # the owner every message file must have
        self.deliveries: dict[int, Delivery] = {}
        self._by_pid: dict[int, Delivery] = {}
        self._reader = CommandReader()
        self._reading = True
        self._writing = True
        self._out = bytearray()
        self._wake_r = -1

    # Hooks ---------------------------------------------------------------

    def start(self, messfd: int, outfd: int, sender: bytes, recip: bytes, at: int) -> int:
        """Start one delivery of the message on messfd; return the child's pid; raise OSError if it cannot."""
        raise NotImplementedError

    def report(self, status: int, output: bytes) -> bytes:
        """Return the report ('K'/'Z'/'D' and text) for a delivery's wait status and output."""
        raise NotImplementedError

    def immediate(self, sender: bytes, recip: bytes, at: int) -> bytes | None:
        """Return a report to give at once without starting anything, or None to start a delivery."""
        return None

    def extra_fds(self) -> list[int]:
        """Return descriptors of the subclass's own that the loop also waits on (none here)."""
        return []

    def extra_ready(self, fd: int) -> None:
        """One of extra_fds() is readable."""

    # The loop -------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        """Queue data for qmail-send; a dead qmail-send is noticed on the command pipe."""
        self._out += data

    def _flush(self) -> None:
        view = memoryview(self._out)
        while view and self._writing:
            try:
                n = os.write(self.FD_REPORTS, view)
            except InterruptedError:
                continue
            except OSError:
                # qmail-send is gone: keep running the deliveries, drop the reports.
                self._writing = False
                break
            view = view[n:]
        del view
        self._out.clear()

    def _refuse(self, slot: int, text: bytes) -> None:
        self._send(bytes((slot,)) + text + b"\0")

    def docmd(self, slot: int, messid: bytes, sender: bytes, recip: bytes, ok: bool) -> None:
        """Start the delivery one command asks for, or report at once why not."""
        if not ok:
            return self._refuse(slot, ERR_NOMEM)
        if slot >= SPAWN_MAX:
            return self._refuse(slot, ERR_DELNUM_BIG)
        if slot in self.deliveries:
            return self._refuse(slot, ERR_DELNUM_USED)
        bad = valid_messid(messid)
        if bad is not None:
            return self._refuse(slot, bad)
        at = recip.rfind(b"@")
        if at == -1:
            return self._refuse(slot, ERR_NO_HOST)
        try:
            messfd = os.open(messid, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return self._refuse(slot, ERR_OPEN)
        try:
            try:
                st = os.fstat(messfd)
            except OSError:
                return self._refuse(slot, ERR_FSTAT)
            if not stat.S_ISREG(st.st_mode):
                return self._refuse(slot, ERR_TYPE)
            if st.st_uid != self.uid_q:
                # Only qmailq writes the queue: anything else here is an intrusion.
                return self._refuse(slot, ERR_OWNER)
            now = self.immediate(sender, recip, at)
            if now is not None:
                return self._refuse(slot, now)
            try:
                rfd, wfd = os.pipe2(os.O_CLOEXEC)
            except OSError:
                return self._refuse(slot, ERR_PIPE)
            try:
                pid = self.start(messfd, wfd, sender, recip, at)
            except OSError:
                os.close(rfd)
                return self._refuse(slot, ERR_FORK)
            finally:
                os.close(wfd)
        finally:
            os.close(messfd)
        d = Delivery(slot, pid, rfd)
        self.deliveries[slot] = d
        self._by_pid[pid] = d

    def _reap(self) -> None:
        for pid, status in workers.reaped():
            d = self._by_pid.pop(pid, None)
            if d is not None:
                d.status = status
                self._finish(d)

    def _finish(self, d: Delivery) -> None:
        """Report d if it has both closed its output and been reaped."""
        if d.status is None or not d.eof:
            return
        text = self.report(d.status, bytes(d.output))
        nul = text.find(b"\0")
        if nul != -1:
            text = text[:nul]
        self._send(bytes((d.slot,)) + text + b"\0")
        del self.deliveries[d.slot]

    def _read_delivery(self, d: Delivery) -> None:
        try:
            data = os.read(d.fd, 65536)
        except InterruptedError:
            return
        except OSError:
            data = b""
        if not data:
            os.close(d.fd)
            d.fd = -1
            d.eof = True
            if d.status is None:
                # Usually the child has exited by now; if not, SIGCHLD tells.
                try:
                    pid, status = os.waitpid(d.pid, os.WNOHANG)
                except ChildProcessError:
                    pid, status = d.pid, 111 << 8
                if pid == d.pid:
                    self._by_pid.pop(d.pid, None)
                    d.status = status
            self._finish(d)
            return
        if len(d.output) < self.OUTPUT_MAX:
            d.output += data[:self.OUTPUT_MAX - len(d.output)]
        truncate(d.output, self.truncreport)

    def _read_commands(self) -> None:
        try:
            data = os.read(self.FD_COMMANDS, 65536)
        except InterruptedError:
            return
        except OSError:
            data = b""
        if not data:
            self._reading = False
            return
        for cmd in self._reader.feed(data):
            self.docmd(*cmd)

    def run(self) -> int:
        """Serve qmail-send until it closes the command pipe and every delivery has ended; return 0."""
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._wake_r = wake_r
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, _no_op)
        # Every delivery is a fork of this process: objects alive now are
        # never collected, so a collection in a child copies none of them.
        gc.freeze()
        self._send(bytes((SPAWN_MAX,)))
        self._flush()
        while self._reading or self.deliveries:
            rfds = [wake_r]
            if self._reading:
                rfds.append(self.FD_COMMANDS)
            by_fd = {}
            for d in self.deliveries.values():
                if d.fd != -1:
                    rfds.append(d.fd)
                    by_fd[d.fd] = d
            extras = self.extra_fds()
            rfds += extras
            try:
                ready, _, _ = select.select(rfds, [], [])
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            if wake_r in ready:
                _drain(wake_r)
                self._reap()
            for fd in ready:
                hit = by_fd.get(fd)
                if hit is not None and hit.fd == fd:
                    self._read_delivery(hit)
            for fd in extras:
                if fd in ready:
                    self.extra_ready(fd)
            if self.FD_COMMANDS in ready and self._reading:
                self._read_commands()
            self._reap()
            self._flush()
        return 0


def _no_op(signum: int, frame: object) -> None:
    """SIGCHLD handler: its only job is to write to the wakeup descriptor."""


def _drain(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 4096):
                return
        except (BlockingIOError, InterruptedError):
            return
