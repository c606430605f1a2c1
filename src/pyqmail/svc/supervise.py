"""supervise: start a service and keep it running (daemontools 0.76 supervise(8)).

usage: supervise s

Runs ./run in directory s, and runs it again whenever it exits, pausing a
second after every start. A file s/down means: start with the service down.
State lives in s/supervise/: `lock` (one supervise per service), the
`control` FIFO (svc's commands u d o p c h a i t k x), the `ok` FIFO (held
open so svok and svstat can tell supervise runs) and the 18-byte `status`
file (see pyqmail.svc.status), replaced atomically at every change.
Beyond daemontools: a supervise starting where a killed one left its service
running (the status file's pid, started when the file says) first sends
that process TERM and CONT, as `svc -d` would, so that a service never runs
twice nor outlives its supervision (see orphan()).
Exit 100 for usage, 111 if s cannot be set up (or is locked), 0 after `x`
once the service is down.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import time

from pyqmail.entry import program
from pyqmail.errors import describe
from pyqmail.spawn import become
from pyqmail.strerr import Die, warn
from pyqmail.svc import status

FATAL = b"supervise: fatal: "
WARNING = b"supervise: warning: "
USAGE = b"supervise: usage: supervise dir"
EXIT_USAGE = 100
EXIT_TROUBLE = 111
RUN = "./run"
LOCK = "supervise/lock"
CONTROL = "supervise/control"
# Test knobs, read from the environment and kept out of the service's: the
# pause after each start (daemontools: 1 second) and svscan's rescan interval.
PAUSE_ENV = "PYQMAIL_SUPERVISE_PAUSE"
RESCAN_ENV = "PYQMAIL_SVSCAN_RESCAN"
KNOBS = (PAUSE_ENV, RESCAN_ENV)
PAUSE = 1.0
FORK_PAUSE = 60.0
IDLE = 3600.0
# How far a process's start (/proc, to the clock tick, from a boot time in
# whole seconds) may be from the status file's stamp for it to be the process
# the file names; a pid reused since started later than that.
ORPHAN_SLACK = 2.0

# Control commands that only signal the child, when there is one.
SIGNALS = {"a": signal.SIGALRM, "h": signal.SIGHUP, "k": signal.SIGKILL,
           "t": signal.SIGTERM, "i": signal.SIGINT}


def knob(name: str, default: float) -> float:
    """Return the test knob name from the environment as seconds (default if unset or bad)."""
    try:
        value = float(os.environ[name])
    except (KeyError, ValueError):
        return default
    return value if 0 <= value < 1e6 else default


def inherited_fds() -> dict[int, int]:
    """Return {fd: fd} for every descriptor exec would pass on (open, not close-on-exec)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        names = ["0", "1", "2"]
    fds = {}
    for name in names:
        fd = int(name)
        try:
            if os.get_inheritable(fd):
                fds[fd] = fd
        except OSError:
            pass  # the listing's own descriptor, closed by now
    return fds


def _sleep(seconds: float) -> None:
    """Sleep the whole time (signals are queued on the wakeup pipe meanwhile)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(left)


class Supervisor:
    """One service's supervise, once set up in the service directory."""

    def __init__(self, dirname: bytes, pause: float) -> None:
        self.dir = dirname
        self.pause = pause
        self.pid = 0
        self.want = True       # False after svc -o: no wish either way
        self.wantup = True
        self.paused = False
        self.exiting = False
        self.stamp_ns = 0
        self.wake_r = -1
        self.wake_w = -1
        self.control = -1
        self.control_w = -1
        self.lock = -1
        self.ok = -1
        self.env = {k: v for k, v in os.environ.items() if k not in KNOBS}

    def _fatal(self, what: bytes, e: OSError) -> Die:
        return Die(EXIT_TROUBLE, FATAL + what + describe(e).encode())

    def setup(self) -> None:
        """Take the lock and make the FIFOs in the current directory; raise Die as daemontools does."""
        d = self.dir
        try:
            os.stat(status.DOWN)
            self.wantup = False
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self._fatal(b"unable to stat " + d + b"/down: ", e) from None
        try:
            os.mkdir("supervise", 0o700)
        except OSError:
            pass  # the lock's open tells what went wrong
        try:
            lock = os.open(LOCK, os.O_WRONLY | os.O_NONBLOCK | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(lock)
                raise
        except OSError as e:
            raise self._fatal(b"unable to acquire " + d + b"/supervise/lock: ", e) from None
        self.lock = lock  # held open for our lifetime
        self.stop_orphan()
        self.control = self._fifo(CONTROL, os.O_RDONLY, b"unable to read ")
        # Our own writer: the FIFO never reads as end-of-file when svc closes.
        self.control_w = self._fifo(CONTROL, os.O_WRONLY, b"unable to write ", make=False)
        self.pidchange()
        self.announce()
        self.ok = self._fifo(status.OK, os.O_RDONLY, b"unable to read ")

    def stop_orphan(self) -> None:
        """Send TERM and CONT to the service a killed supervise left running here, if any."""
        pid = orphan()
        if pid:
            warn(WARNING + self.dir + b": pid " + str(pid).encode()
                 + b" of a killed supervise still runs: stopping it")
            for signum in (signal.SIGTERM, signal.SIGCONT):
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass  # gone meanwhile: nothing to stop

    def _fifo(self, name: str, mode: int, what: bytes, make: bool = True) -> int:
        if make:
            try:
                os.mkfifo(name, 0o600)
            except OSError:
                pass  # an existing FIFO is fine; anything else fails at the open
        try:
            return os.open(name, mode | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise self._fatal(what + self.dir + b"/" + name.encode() + b": ", e) from None

    def pidchange(self) -> None:
        """Note the time of a change of pid (the status file's stamp)."""
        self.stamp_ns = time.time_ns()

    def announce(self) -> None:
        """Replace supervise/status with the current state; warn if it cannot be written."""
        want = ("u" if self.wantup else "d") if self.want else ""
        data = status.pack(self.stamp_ns, self.pid, self.paused, want)
        new = self.dir + b"/" + status.NEW.encode()
        try:
            fd = os.open(status.NEW, os.O_WRONLY | os.O_NONBLOCK | os.O_TRUNC | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            warn(WARNING + b"unable to open " + new + b": " + describe(e).encode())
            return
        try:
            written = os.write(fd, data)
        except OSError as e:
            warn(WARNING + b"unable to write " + new + b": " + describe(e).encode())
            return
        finally:
            os.close(fd)
        if written < len(data):
            warn(WARNING + b"unable to write " + new + b": partial write")
            return
        try:
            os.rename(status.NEW, status.NAME)
        except OSError as e:
            warn(WARNING + b"unable to rename " + new + b" to status: " + describe(e).encode())

    def trystart(self) -> None:
        """Start ./run, then pause; after a failed fork, pause a minute and leave it down."""
        try:
            pid = os.fork()
        except OSError as e:
            warn(WARNING + b"unable to fork for " + self.dir + b", sleeping 60 seconds: " + describe(e).encode())
            _sleep(FORK_PAUSE)
            return
        if pid == 0:
            self._child()
        self.paused = False
        self.pid = pid
        self.pidchange()
        self.announce()
        # Every start is followed by a pause, so a run that dies at once restarts at most once a pause.
        _sleep(self.pause)

    def _child(self) -> None:
        """In the forked child: become ./run; on failure say so and exit 111 (never return)."""
        code = EXIT_TROUBLE
        try:
            # Exec even a pyqmail stub: the service must not go by supervise's name.
            become(RUN, [RUN], env=self.env, fds=inherited_fds(), fast=False)
        except OSError as e:
            warn(FATAL + b"unable to start " + self.dir + b"/run: " + describe(e).encode())
        finally:
            os._exit(code)

    def _kill(self, signum: int) -> None:
        try:
            os.kill(self.pid, signum)
        except OSError:
            pass  # as daemontools: a child already gone is reaped on the next turn

    def command(self, ch: str) -> None:
        """Carry out one control command (svc(8)'s letters); ignore unknown ones."""
        if ch == "d":
            self.want, self.wantup = True, False
            if self.pid:
                self._kill(signal.SIGTERM)
                self._kill(signal.SIGCONT)
                self.paused = False
            self.announce()
        elif ch == "u":
            self.want, self.wantup = True, True
            self.announce()
            if not self.pid:
                self.trystart()
        elif ch == "o":
            self.want = False
            self.announce()
            if not self.pid:
                self.trystart()
        elif ch == "p":
            self.paused = True
            self.announce()
            if self.pid:
                self._kill(signal.SIGSTOP)
        elif ch == "c":
            self.paused = False
            self.announce()
            if self.pid:
                self._kill(signal.SIGCONT)
        elif ch == "x":
            self.exiting = True
            self.announce()
        elif ch in SIGNALS and self.pid:
            self._kill(SIGNALS[ch])

    def reap(self) -> bool:
        """Collect exited children; on the service's exit, restart it if wanted. Return True to exit."""
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return False
            if pid == self.pid:
                self.pid = 0
                self.pidchange()
                self.announce()
                if self.exiting:
                    return True
                if self.want and self.wantup:
                    self.trystart()
                return False

    def loop(self) -> None:
        """Serve the control FIFO and the child's exits until told to exit with the service down."""
        self.announce()
        while not (self.exiting and not self.pid):
            select.select([self.wake_r, self.control], [], [], IDLE)
            _drain(self.wake_r)
            if self.reap():
                return
            try:
                ch = os.read(self.control, 1)
            except BlockingIOError:
                ch = b""
            if ch:
                self.command(ch.decode("latin-1"))


def orphan() -> int:
    """Return the pid of a service a previous supervise left running here, else 0.

    Called with the lock held, so no supervise runs here: a status file naming
    a running pid was left by one that died without seeing its child exit.
    The process counts only if it started when the file was stamped.
    """
    try:
        with open(status.NAME, "rb") as f:
            st = status.unpack(f.read(status.SIZE), True)
    except FileNotFoundError:
        return 0  # a first start
    except (OSError, ValueError):
        return 0  # unreadable or short: nothing named can be trusted, so nothing is stopped
    if not st.pid or st.pid == os.getpid():
        return 0
    started = process_start(st.pid)
    if started is None or abs(started - (st.stamp + st.nano / 1e9)) > ORPHAN_SLACK:
        return 0
    return st.pid


def process_start(pid: int) -> float | None:
    """Return the unix time pid started at (from /proc), or None if it runs no more or /proc cannot say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read(4096)
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
    except (OSError, StopIteration, ValueError, IndexError):
        return None  # no such process, or no /proc: nothing to stop
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        if fields[0] == b"Z":
            return None  # dead already
        # Field 22 of proc(5), the start in clock ticks after boot; fields[0] is field 3.
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError):
        return None


def _drain(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 64):
                return
        except BlockingIOError:
            return


def _main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise Die(EXIT_USAGE, USAGE)
    dirname = os.fsencode(argv[1])
    sup = Supervisor(dirname, knob(PAUSE_ENV, PAUSE))
    # The child's exit must wake the select: the signal writes to this pipe.
    sup.wake_r, sup.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(sup.wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, _noop)
    # As a C program: an interrupt ends supervise (Python would raise KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        os.chdir(dirname)
    except OSError as e:
        raise Die(EXIT_TROUBLE, FATAL + b"unable to chdir to " + dirname + b": " + describe(e).encode()) from None
    sup.setup()
    if not sup.want or sup.wantup:
        sup.trystart()
    sup.loop()
    sup.announce()
    return 0


def _noop(signum: int, frame: object) -> None:
    """SIGCHLD's handler: the wakeup pipe does the work."""


@program("supervise", crash=EXIT_TROUBLE)
def main(argv: list[str]) -> int:
    """Supervise the service in argv[1]; return 0 after svc -x, 100 or 111 if it cannot start."""
    try:
        return _main(argv)
    except Die as d:
        return d.report()
