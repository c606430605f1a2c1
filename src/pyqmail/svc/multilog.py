"""multilog: select lines and append them to automatically rotated logs (daemontools multilog(8)).

usage: multilog script

Each argument of script is one action, carried out in order for every line:
t (stamp lines; only as the first action), +pattern / -pattern (select /
deselect), e (first 200 bytes to stderr), =file (status file), sSIZE,
nNUM, !processor (settings for later log directories), and ./dir or /dir
(append to a rotated log). Exit 0 at end of input; 111 with a message if a
log directory is locked by another multilog or cannot be set up.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import time
from typing import TypeVar

from pyqmail.entry import program
from pyqmail.errors import describe
from pyqmail.spawn import spawn, wait
from pyqmail.svc.tai64 import LABEL_LEN, label

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

EXIT_TROUBLE = 111
FATAL = b"multilog: fatal: "
WARNING = b"multilog: warning: "
FD_IN = 0
FD_ERR = 2
IN_CHUNK = 1024      # multilog's input buffer: output is flushed before each read
OUT_BUF = 512        # each log's output buffer
OUT_DIRECT = 8192    # a put bigger than the buffer goes out in pieces this big
LINE_MAX = 1000      # patterns, e and = see only this much of a line
ALERT_MAX = 200
STATUS_LEN = 1001
SLACK = 2000         # a newline this close to the size limit ends the file
SIZE_MIN, SIZE_MAX, SIZE_DEFAULT = 4096, 16777215, 99999
NUM_MIN, NUM_DEFAULT = 2, 10
PAUSE = 5.0
MODE_CREATE = 0o600  # daemontools' open_append
MODE_TRUNC = 0o644   # daemontools' open_trunc
MODE_DONE = 0o744
MODE_WRITING = 0o644


class Fatal(Exception):
    """multilog cannot start: the message, then exit 111."""


def match(pattern: bytes, line: bytes) -> bool:
    """Return True if pattern matches all of line, as multilog(8) matches.

    A star before the end matches up to the first occurrence of the byte
    after it (no backtracking); a star at the end matches anything.
    """
    i = 0
    pos = 0
    n = len(line)
    while True:
        if i == len(pattern):
            return pos == n
        ch = pattern[i]
        i += 1
        if ch == 0x2A:  # '*'
            if i == len(pattern):
                return True
            stop = line.find(pattern[i:i + 1], pos)
            if stop == -1:
                return False
            pos = stop
            continue
        if pos == n or line[pos] != ch:
            return False
        pos += 1


def scan_ulong(text: bytes) -> int:
    """Return the number the leading digits of text spell (0 if none), wrapping as C's unsigned long."""
    # int() of the digits raised ValueError past 4300 of them (s777...7 in a script).
    n = 0
    for b in text:
        if not 0x30 <= b <= 0x39:
            break
        n = (n * 10 + b - 0x30) & 0xFFFFFFFFFFFFFFFF
    return n


def _warn(*parts: bytes) -> None:
    """Write a warning line to stderr, ignoring trouble."""
    try:
        os.write(FD_ERR, WARNING + b"".join(parts) + b"\n")
    except OSError:
        pass  # safe: only the warning is lost; logging goes on


_T = TypeVar("_T")


def _retry(what: Callable[[], _T], *words: bytes) -> _T:
    """Run what() until it succeeds, warning and pausing after each OSError (never lose data)."""
    while True:
        try:
            return what()
        except OSError as e:
            _warn(*words, b", pausing: ", describe(e).encode())
            time.sleep(PAUSE)


class Log:
    """One automatically rotated log directory."""

    def __init__(self, dirname: bytes, size: int, num: int, processor: bytes | None,
                 now: Callable[[], int]) -> None:
        self.dir = dirname
        self.size = size
        self.num = num
        self.processor = processor
        self.now = now
        self.selected = False
        self.buf = bytearray()
        self.bytes = 0
        self.fddir = -1
        self.fdlock = -1
        self.fdcurrent = -1

    # --- file helpers relative to the directory ---
    def _open(self, name: str, flags: int, mode: int = MODE_CREATE) -> int:
        return os.open(name, flags | os.O_CLOEXEC, mode, dir_fd=self.fddir)

    def _append(self, name: str) -> int:
        return self._open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK)

    def _trunc(self, name: str) -> int:
        return self._open(name, os.O_WRONLY | os.O_TRUNC | os.O_CREAT | os.O_NONBLOCK, MODE_TRUNC)

    def _unlink_quiet(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self.fddir)
        except FileNotFoundError:
            pass

    def _stat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.fddir)
        except FileNotFoundError:
            return None

    def _w(self, name: str) -> bytes:
        return self.dir + b"/" + name.encode()

    def start(self) -> None:
        """Create, lock and recover the directory; raise Fatal on trouble."""
        try:
            os.mkdir(self.dir, 0o700)
        except OSError:
            pass  # opening it below says what is wrong
        try:
            self.fddir = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise Fatal(b"unable to open directory " + self.dir + b": " + describe(e).encode()) from e
        try:
            self.fdlock = self._append("lock")
            fcntl.flock(self.fdlock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise Fatal(b"unable to lock directory " + self.dir + b": " + describe(e).encode()) from e
        try:
            st = self._stat("current")
        except OSError as e:
            raise Fatal(b"unable to stat " + self._w("current") + b": " + describe(e).encode()) from e
        if st is not None and st.st_mode & 0o100:
            # A cleanly finished current: carry on writing it.
            try:
                self.fdcurrent = self._append("current")
                os.fchmod(self.fdcurrent, MODE_WRITING)
            except OSError as e:
                raise Fatal(b"unable to append to " + self._w("current") + b": " + describe(e).encode()) from e
            self.bytes = st.st_size
            return
        self._unlink_quiet("state")
        self._unlink_quiet("newstate")
        try:
            processed = self._stat("processed")
        except OSError as e:
            raise Fatal(b"unable to stat " + self._w("processed") + b": " + describe(e).encode()) from e
        if processed is not None and processed.st_mode & 0o100:
            self._unlink_quiet("previous")
            self.finish("processed", b"s")
        else:
            self._unlink_quiet("processed")
            self.finish("previous", b"u")
        self.finish("current", b"u")
        try:
            os.close(self._trunc("state"))
        except OSError as e:
            raise Fatal(b"unable to write to " + self._w("state") + b": " + describe(e).encode()) from e
        try:
            self.fdcurrent = self._append("current")
            os.fchmod(self.fdcurrent, MODE_WRITING)
        except OSError as e:
            raise Fatal(b"unable to write to " + self._w("current") + b": " + describe(e).encode()) from e
        self.bytes = 0

    def finish(self, name: str, code: bytes) -> None:
        """Publish name as an old log file @LABEL.code, then trim to fewer than num old files."""
        st = _retry(lambda: self._stat(name), b"unable to stat ", self._w(name))
        if st is None:
            return
        if st.st_nlink == 1:  # more links: a crash came after the link, before the unlink
            while True:
                new = label(self.now()) + b"." + code
                try:
                    os.link(name, new, src_dir_fd=self.fddir, dst_dir_fd=self.fddir)
                    break
                except OSError as e:
                    _warn(b"unable to link to ", self.dir, b"/", new, b", pausing: ", describe(e).encode())
                    time.sleep(PAUSE)
        _retry(lambda: os.unlink(name, dir_fd=self.fddir), b"unable to remove ", self._w(name))
        while True:
            # Bytes, so that the oldest is chosen in the C program's byte order.
            names = [os.fsencode(n) for n in _retry(lambda: os.listdir(self.fddir), b"unable to read ", self.dir)]
            old = sorted(n for n in names if n.startswith(b"@") and len(n) >= LABEL_LEN)
            if len(old) < self.num:
                return
            oldest = old[0][:LABEL_LEN]
            victim = next(n for n in names if n.startswith(oldest))
            _retry(lambda: os.unlink(victim, dir_fd=self.fddir), b"unable to remove ", self.dir, b"/", victim)

    def full(self) -> None:
        """Rotate: make current safe, move it aside, and turn it into an old log file."""
        _retry(lambda: os.fsync(self.fdcurrent), b"unable to write ", self._w("current"), b" to disk")
        os.close(self.fdcurrent)
        _retry(lambda: os.rename("current", "previous", src_dir_fd=self.fddir, dst_dir_fd=self.fddir),
               b"unable to rename current to previous in directory ", self.dir)
        self.fdcurrent = _retry(lambda: self._append("current"), b"unable to create ", self._w("current"))
        self.bytes = 0
        _retry(lambda: os.fchmod(self.fdcurrent, MODE_WRITING), b"unable to set mode of ", self._w("current"))
        _retry(lambda: os.chmod("previous", MODE_DONE, dir_fd=self.fddir),
               b"unable to set mode of ", self._w("previous"))
        if self.processor is None:
            self.finish("previous", b"s")
            return
        self._process()
        def seal(name: str, mode: int | None) -> None:
            fd = self._append(name)
            try:
                os.fsync(fd)
                if mode is not None:
                    os.fchmod(fd, mode)
            finally:
                os.close(fd)
        _retry(lambda: seal("processed", MODE_DONE), b"unable to write ", self._w("processed"), b" to disk")
        _retry(lambda: seal("newstate", None), b"unable to write ", self._w("newstate"), b" to disk")
        _retry(lambda: os.unlink("previous", dir_fd=self.fddir), b"unable to remove ", self._w("previous"))
        _retry(lambda: os.rename("newstate", "state", src_dir_fd=self.fddir, dst_dir_fd=self.fddir),
               b"unable to rename newstate to state in directory ", self.dir)
        self.finish("processed", b"s")

    def _process(self) -> None:
        """Run the processor on previous until it exits 0 (processed, newstate written)."""
        assert self.processor is not None
        while True:
            fds: list[int] = []
            try:
                fds.append(self._open("previous", os.O_RDONLY | os.O_NONBLOCK))
                fds.append(self._trunc("processed"))
                fds.append(self._open("state", os.O_RDONLY | os.O_NONBLOCK))
                fds.append(self._trunc("newstate"))
                for fd in fds:
                    os.set_blocking(fd, True)
                pid = spawn("/bin/sh", ["sh", "-c", os.fsdecode(self.processor)],
                            fds={0: fds[0], 1: fds[1], 2: FD_ERR, 4: fds[2], 5: fds[3]},
                            cwd=os.fsdecode(self.dir))
            except OSError as e:
                _warn(b"unable to run ", self.processor, b": ", describe(e).encode())
                time.sleep(PAUSE)
                continue
            finally:
                for fd in fds:
                    os.close(fd)
            code = wait(pid)
            if code == 0:
                return
            if code < 0:
                _warn(b"processor crashed in ", self.dir, b", pausing: ")
            else:
                _warn(b"processor failed in ", self.dir, b", pausing")
            time.sleep(PAUSE)

    # --- output through a 512-byte buffer, as daemontools' buffer_put does ---
    def put(self, data: bytes) -> None:
        """Append data to current through the log's buffer."""
        if len(data) > OUT_BUF - len(self.buf):
            self.flush()
            while len(data) > OUT_BUF:
                piece = data[:OUT_DIRECT]
                self._write_all(piece)
                data = data[len(piece):]
        self.buf += data

    def put_bytewise(self, data: bytes) -> None:
        """Append data as a series of one-byte puts would: the buffer goes out each time it is full."""
        while data:
            if len(self.buf) == OUT_BUF:
                self.flush()
            take = OUT_BUF - len(self.buf)
            self.buf += data[:take]
            data = data[take:]

    def flush(self) -> None:
        """Write out the buffer."""
        if self.buf:
            data = bytes(self.buf)
            self.buf.clear()
            self._write_all(data)

    def _write_all(self, data: bytes) -> None:
        while data:
            data = data[self._write(data):]

    def _write(self, data: bytes) -> int:
        """Write a prefix of data to current, rotating at the size limit or a late newline."""
        if self.bytes >= self.size:
            self.full()
        n = len(data)
        if self.bytes + n >= self.size:
            n = self.size - self.bytes
        if self.bytes + n >= self.size - SLACK:
            nl = data.rfind(b"\n", 0, n)
            if nl != -1:
                n = nl + 1
        w = _retry(lambda: os.write(self.fdcurrent, data[:n]) or _zero(), b"unable to write to ",
                   self._w("current"))
        self.bytes += w
        if self.bytes >= self.size - SLACK and data[w - 1:w] == b"\n":
            self.full()
        return w

    def quit(self) -> None:
        """At end of input: flush, make current safe and mark it complete (mode 744)."""
        self.flush()
        _retry(lambda: os.fsync(self.fdcurrent), b"unable to write ", self._w("current"), b" to disk")
        _retry(lambda: os.fchmod(self.fdcurrent, MODE_DONE), b"unable to set mode of ", self._w("current"))


def _zero() -> int:
    """Treat a zero-length write as trouble worth a pause."""
    raise OSError(errno.EIO, "wrote nothing")


class Multilog:
    """The script and its state: status files, logs, the line loop."""

    def __init__(self, script: list[bytes], now: Callable[[], int]) -> None:
        self.script = script
        self.now = now
        self.status: dict[int, int] = {}
        self.logs: list[Log] = []
        self.stamp = bool(script) and script[0][:1] == b"t"
        self.exit_asap = False
        self.rotate_asap = False
        self.saw_newline = True
        self.wake_fd = -1
        self.inbuf = b""
        self.inpos = 0

    def start(self) -> None:
        """Open status files and log directories; raise Fatal on trouble."""
        for i, action in enumerate(self.script):
            if action[:1] != b"=":
                continue
            name = action[1:]
            try:
                os.close(os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, MODE_CREATE))
            except OSError as e:
                raise Fatal(b"unable to create " + name + b": " + describe(e).encode()) from e
            try:
                self.status[i] = os.open(name, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                raise Fatal(b"unable to write " + name + b": " + describe(e).encode()) from e
        size, num, processor = SIZE_DEFAULT, NUM_DEFAULT, None
        for action in self.script:
            kind = action[:1]
            if kind == b"s":
                size = min(max(scan_ulong(action[1:]), SIZE_MIN), SIZE_MAX)
            elif kind == b"n":
                num = max(scan_ulong(action[1:]), NUM_MIN)
            elif kind == b"!":
                processor = action[1:]
            elif kind in (b".", b"/"):
                log = Log(action, size, num, processor, self.now)
                log.start()
                self.logs.append(log)

    def _fill(self) -> bool:
        """Make unread input available; return False at end of input.

        As in the C program, the logs are flushed before every read, a
        pending ALRM rotates them, and after TERM input is read a byte at a
        time until the end of a line. A read error counts as end of input.
        """
        if self.inpos < len(self.inbuf):
            return True
        while True:
            for log in self.logs:
                log.flush()
            if self.rotate_asap:
                self.rotate_asap = False
                for log in self.logs:
                    if log.bytes > 0:
                        log.full()
            if self.exit_asap and self.saw_newline:
                return False
            if self.wake_fd == -1:
                break
            # TERM and ALRM must interrupt a wait for input, as EINTR does
            # for the C program; the wakeup descriptor closes the race
            # between checking the flags and starting to wait.
            ready, _, _ = select.select([FD_IN, self.wake_fd], [], [])
            if self.wake_fd in ready:
                _drain(self.wake_fd)
                continue
            break
        try:
            data = os.read(FD_IN, 1 if self.exit_asap else IN_CHUNK)
        except OSError:
            return False
        if not data:
            return False
        self.saw_newline = data.endswith(b"\n")
        self.inbuf = data
        self.inpos = 0
        return True

    def _take(self, limit: int) -> tuple[bytes, bool]:
        """Return up to limit unread bytes, stopping before a newline; and whether a newline was consumed."""
        start = self.inpos
        end = min(len(self.inbuf), start + limit)
        nl = self.inbuf.find(b"\n", start, end)
        if nl != -1:
            self.inpos = nl + 1
            return self.inbuf[start:nl], True
        self.inpos = end
        return self.inbuf[start:end], False

    def run(self) -> None:
        """Carry out the script for every line of input."""
        while True:
            line = bytearray()
            eof = False
            ended = False
            while len(line) < LINE_MAX:
                if not self._fill():
                    if not line:
                        return
                    eof = True
                    break
                if not line and self.stamp:
                    # Stamped when its first byte is in hand, as daemontools does.
                    line += label(self.now()) + b" "
                piece, ended = self._take(LINE_MAX - len(line))
                line += piece
                if ended:
                    break
            self.act(bytes(line))
            chosen = [log for log in self.logs if log.selected]
            for log in chosen:
                log.put(bytes(line))
            if not ended and not eof:
                # The rest of a long line: C puts it a byte at a time.
                while True:
                    if not self._fill():
                        eof = True
                        break
                    piece, ended = self._take(len(self.inbuf))
                    for log in chosen:
                        log.put_bytewise(piece)
                    if ended:
                        break
            for log in chosen:
                log.put(b"\n")
            if eof:
                return

    def act(self, line: bytes) -> None:
        """Run the actions on one line's first 1000 bytes: selection, alerts, status, log choice."""
        selected = True
        j = 0
        for i, action in enumerate(self.script):
            kind = action[:1]
            if kind == b"+":
                if not selected and match(action[1:], line):
                    selected = True
            elif kind == b"-":
                if selected and match(action[1:], line):
                    selected = False
            elif kind == b"e":
                if selected:
                    alert = line[:ALERT_MAX] + b"...\n" if len(line) > ALERT_MAX else line + b"\n"
                    try:
                        os.write(FD_ERR, alert)
                    except OSError:
                        pass  # safe: the alert copy on stderr is lost; the log itself is written on
            elif kind == b"=":
                if selected:
                    record = line + b"\n" * (STATUS_LEN - len(line))
                    fd = self.status[i]
                    _retry(lambda: _pwrite_all(fd, record), b"unable to write ", action[1:])
            elif kind in (b".", b"/"):
                self.logs[j].selected = selected
                j += 1

    def quit(self) -> None:
        """Finish every log at end of input."""
        for log in self.logs:
            log.quit()


def _drain(fd: int) -> None:
    """Empty a non-blocking pipe."""
    try:
        while os.read(fd, 64):
            pass
    except BlockingIOError:
        pass


def _pwrite_all(fd: int, record: bytes) -> None:
    """Write record at the start of fd in one write."""
    if os.pwrite(fd, record, 0) != len(record):
        raise OSError(errno.EIO, "short write")


@program("multilog", crash=EXIT_TROUBLE)
def main(argv: list[str]) -> int:
    """Run the script given as arguments over stdin."""
    os.umask(0o022)
    ml = Multilog([os.fsencode(a) for a in argv[1:]], time.time_ns)

    def term(signum: int, frame: object) -> None:
        ml.exit_asap = True

    def alarm(signum: int, frame: object) -> None:
        ml.rotate_asap = True

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    ml.wake_fd = wake_r
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, term)
    signal.signal(signal.SIGALRM, alarm)
    try:
        ml.start()
    except Fatal as e:
        os.write(FD_ERR, FATAL + e.args[0] + b"\n")
        return EXIT_TROUBLE
    ml.run()
    ml.quit()
    return 0
