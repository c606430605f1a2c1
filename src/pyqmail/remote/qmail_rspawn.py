"""qmail-rspawn: schedule remote deliveries (qmail-rspawn(8)).

    qmail-rspawn

Reads delivery commands from qmail-send on descriptor 0 and reports on
descriptor 1 (pyqmail.send.spawnproto). For each recipient it runs
$QMAILREMOTE, or else QMAILHOME/bin/qmail-remote, as
``qmail-remote host sender recip`` with the message on descriptor 0 and
turns its output (qmail-remote(8): per recipient an r/h/s record, then a
K/Z/D record, each NUL-terminated; exit 0) into the report. Until this
installation has a qmail-remote, every remote delivery is deferred.
At start it clears the TCP timeout table, lock/tcpto.

Deliveries run in workers (issue 17): qmail-remote runs as qmailr, as
qmail-rspawn does, so there is no uid to change between deliveries, and a
process forked once from qmail-rspawn serves one delivery after another, the
way Postfix's smtp(8) processes do. A worker gets each delivery over a
SOCK_SEQPACKET pair (its argv, the message and the report pipe by
SCM_RIGHTS), runs qmail-remote's main with them as descriptors 0, 1 and 2,
the environment and signals a forked child would have, and says DONE and
the exit code before it closes its last copy of the report pipe. It exits
after WORKER_DELIVERIES deliveries, after WORKER_IDLE seconds idle, after a
crash or an exception, and when a delivery leaves anything of the process
changed (descriptors, cwd, umask, signal handlers or mask, an alarm, the
environment, ids, threads, or the module's own state: worker_reset). A
killed worker is a killed child: "qmail-remote crashed.", deferred. Only a
stub whose module has worker_reset is served by workers; $QMAILREMOTE
naming any other program (a wrapper), an argv longer than JOB_MAX, and
$PYQMAIL_RSPAWN_WORKERS=0 fork a child per delivery, as before.
"""

from __future__ import annotations

import os
import select
import _socket
import sys
from array import array

from pyqmail import errors, spawn
from pyqmail import home as _home
from pyqmail import sig as signal
from pyqmail.entry import program
from pyqmail.proctitle import set_title
from pyqmail.queue import layout
from pyqmail.send import spawnproto
from pyqmail import workers

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType

REMOTE_PROGRAM = "bin/qmail-remote"
NOT_AVAILABLE = b"ZSorry, remote delivery is not available yet. (#4.3.0)\n"
CRASHED = b"Zqmail-remote crashed.\n"
RUN_TEMPORARY = b"ZUnable to run qmail-remote.\n"
RUN_PERMANENT = b"DUnable to run qmail-remote.\n"
NO_OUTPUT = b"Zqmail-remote produced no output.\n"
EXIT_TEMPORARY = 111
EXIT_PERMANENT = 100
WORKER_DELIVERIES = 200  # a worker retires after this many deliveries ($PYQMAIL_RSPAWN_DELIVERIES)
WORKER_IDLE = 60.0  # seconds an idle worker waits for its next delivery ($PYQMAIL_RSPAWN_IDLE)
JOB_MAX = 60000  # bytes of one job's argv; a longer one (addresses near FIELD_MAX) gets a child of its own
JOB = b"j"  # qmail-rspawn to a worker: argv NUL-separated; the message and the report pipe by SCM_RIGHTS
DONE = b"d"  # a worker to qmail-rspawn: DONE, the exit code, AGAIN or LAST
AGAIN = b"+"  # the worker serves another delivery
LAST = b"x"  # the worker exits now (and reads no more jobs: a job sent to it fails with EPIPE)
_OPEN_MAX = os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 65536


def _cstr(data: bytes, start: int) -> bytes:
    end = data.find(b"\0", start)
    return data[start:] if end == -1 else data[start:end]


def report(status: int, output: bytes) -> bytes:
    """Return the report for qmail-remote's wait status and output, as qmail-rspawn makes it.

    The verdict is the first K/Z/D record (none: D), overridden by the
    recipient record: 's' makes it Z, 'h' makes it D. The text is the
    recipient record's, followed by the K/Z/D record's when that one decided.
    """
    if os.WIFSIGNALED(status):
        return CRASHED
    code = os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else EXIT_TEMPORARY
    if code == EXIT_TEMPORARY:
        return RUN_TEMPORARY
    if code != 0:
        return RUN_PERMANENT
    if not output:
        return NO_OUTPUT
    result = -1
    j = 0
    for k, c in enumerate(output):
        if c == 0:
            first = output[j:j + 1]
            if first == b"K":
                result = 1
                break
            if first == b"Z":
                result = 0
                break
            if first == b"D":
                break
            j = k + 1
    verdict = result
    if output[:1] == b"s":
        verdict = 0
    elif output[:1] == b"h":
        verdict = -1
    out = bytearray({1: b"K", 0: b"Z", -1: b"D"}[verdict])
    nul = output.find(b"\0", 1)
    if nul != -1:
        out += _cstr(output, 1)
        k = nul + 1
        if result <= verdict and k < len(output) and output[k:k + 1] in (b"Z", b"D", b"K"):
            out += _cstr(output, k + 1)
    return bytes(out)


def clean_tcpto() -> None:
    """Forget every remembered TCP timeout (qmail's tcpto_clean, and lock/tcpto6); running in queue/mess."""
    for name, size in ((layout.TCPTO, layout.TCPTO_SIZE), (layout.TCPTO6, layout.TCPTO6_SIZE)):
        try:
            fd = os.open(os.path.join("..", name), os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            os.write(fd, b"\0" * size)
        except OSError:
            pass  # as in qmail: if it fails, bummer
        finally:
            os.close(fd)


def _env_number(env: dict[str, str], name: str, default: float) -> float:
    try:
        return float(env[name])
    except (KeyError, ValueError):
        return default


def _process_state() -> tuple[object, ...]:
    """Return what a delivery could change in this process and the next one would inherit."""
    mask = os.umask(0o077)
    os.umask(mask)
    handlers: list[object] = []
    for signum in range(1, signal.NSIG):
        try:
            handlers.append(signal.getsignal(signum))
        except (ValueError, OSError):
            handlers.append(None)
    threads = sys.modules.get("threading")
    return (os.getcwd(), mask, tuple(handlers), frozenset(signal.pthread_sigmask(signal.SIG_BLOCK, [])),
            os.getuid(), os.geteuid(), os.getgid(), os.getegid(), tuple(os.getgroups()), _home.home(),
            threads.active_count() if threads is not None else 1)  # type: ignore[attr-defined]


def _keep_only(keep: set[int]) -> None:
    """Close every descriptor but those in keep."""
    low = 0
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, _OPEN_MAX)


def _recv_fds(end: _socket.socket, size: int, flags: int) -> tuple[bytes, list[int]]:
    """Receive one job and the descriptors it carries (close-on-exec); socket.recv_fds without socket.py.

    socket.py imports enum and selectors (issue 17: this daemon's forks stay lean).
    """
    msg, ancillary, _, _ = end.recvmsg(size, _socket.CMSG_SPACE(2 * 4), flags | _socket.MSG_CMSG_CLOEXEC)
    return msg, workers.received_fds(ancillary)


def serve(end: _socket.socket, target: str, stub: spawn.Stub, mod: ModuleType, env: dict[str, str],
          deliveries: int, idle: float) -> int:
    """Run the deliveries qmail-rspawn hands over end, one after another; return the worker's exit code.

    Each runs as spawn.become would run it in a child: descriptors 0, 1 and 2
    (the message, the report pipe twice) and no others of the delivery, the
    environment env, signals as a new process has them, the stub's home.
    """
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    _keep_only({0, 1, 2, null, end.fileno()})
    spawn._reset_signals(True)
    spawn._set_environ(env)
    _home.set_default(stub.home)
    name = os.path.basename(target)
    here = os.getcwd()  # qmail-rspawn's queue/mess, where each delivery starts (qmail-remote moves to the home)
    base_fds = workers.open_fds()
    base = _process_state()
    poller = select.poll()
    poller.register(end.fileno(), select.POLLIN)
    served = 0
    last = False
    while True:
        if not poller.poll(int(idle * 1000)):
            # Idle too long. Reading is shut first, so that a job sent from now on fails
            # (EPIPE) in qmail-rspawn, which forks another; one sent before is served.
            end.shutdown(_socket.SHUT_RD)
            last = True
        try:
            msg, fds = _recv_fds(end, JOB_MAX + 16, _socket.MSG_DONTWAIT if last else 0)
        except OSError:
            return 0  # nothing came (idle), or qmail-rspawn is gone
        if msg[:1] != JOB or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            return 0 if not msg else EXIT_TEMPORARY  # retired (end closed), or nonsense
        served += 1
        argv = [os.fsdecode(a) for a in msg[1:].split(b"\0")]
        messfd, outfd = fds
        # outfd stays open here until DONE is said: qmail-rspawn reading the report pipe's
        # end knows that the worker has said DONE, or has died.
        os.dup2(messfd, 0)
        os.dup2(outfd, 1)
        os.dup2(outfd, 2)
        os.close(messfd)
        sys.argv = [target, *argv[1:]]
        set_title(target, argv)
        spawn._fresh_std_streams()
        rc = EXIT_TEMPORARY
        clean = True
        try:
            got = mod.main([target, *argv[1:]])
            rc = got if isinstance(got, int) else EXIT_TEMPORARY
        except BaseException:  # noqa: BLE001 - as a child's _run_main: the delivery ends with 111, the worker exits
            clean = False
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except BaseException:  # noqa: BLE001 - as _run_main; the worker exits
                clean = False
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        try:
            os.chdir(here)
            clean = (clean and not last and served < deliveries and signal.alarm(0) == 0
                     and workers.open_fds(skip=outfd) == base_fds and dict(os.environ) == env
                     and _process_state() == base and bool(mod.worker_reset()))
        except Exception:  # noqa: BLE001 - a check that fails is a state not to be trusted
            clean = False
        if not clean:
            end.shutdown(_socket.SHUT_RD)
        try:
            end.send(DONE + bytes((rc & 0xFF,)) + (AGAIN if clean else LAST))
        except OSError:
            return 0  # qmail-rspawn is gone
        os.close(outfd)
        if not clean:
            return 0
        set_title(target, [name, "idle"])


class _Worker:
    """One worker as qmail-rspawn sees it."""

    __slots__ = ("pid", "end", "busy", "served", "retire")

    def __init__(self, pid: int, end: _socket.socket) -> None:
        self.pid = pid
        self.end: _socket.socket | None = end  # qmail-rspawn's end of the pair; None once closed
        self.busy = False
        self.served = 0
        self.retire = False  # the stub changed: no delivery after the one it runs


class RemoteSpawner(spawnproto.Spawner):
    """qmail-rspawn's half of qmail's spawn.c."""

    truncreport = 0

    def __init__(self, qmail_home: str, inst: _home.Install, env: dict[str, str]) -> None:
        uid_q = inst.uid("qmailq")
        super().__init__(uid_q if uid_q != -1 else os.getuid())
        self.env = env
        self.program = env.get("QMAILREMOTE") or os.path.join(qmail_home, REMOTE_PROGRAM)
        self.fixed = bool(env.get("QMAILREMOTE"))
        self.use_workers = env.get("PYQMAIL_RSPAWN_WORKERS", "1") != "0"
        self.worker_deliveries = int(_env_number(env, "PYQMAIL_RSPAWN_DELIVERIES", WORKER_DELIVERIES))
        self.worker_idle = _env_number(env, "PYQMAIL_RSPAWN_IDLE", WORKER_IDLE)
        self.workers: dict[int, _Worker] = {}  # pid -> worker, until reaped
        self.idle: list[_Worker] = []  # the newest last: reused first, so the pool shrinks with the load
        self._stub_key: tuple[str, str] | None = None
        # Import qmail-remote's module here, once (as qmail-lspawn does for
        # qmail-local): every delivery child is a fork and starts without importing.
        stub = spawn.read_stub(self.program)
        if stub is not None:
            try:
                mod = __import__(stub.module, fromlist=["main"])
                hook = getattr(mod, "preload", None)
                if hook is not None:
                    hook()
            except ImportError:
                pass

    def immediate(self, sender: bytes, recip: bytes, at: int) -> bytes | None:
        if not self.fixed and not os.path.exists(self.program):
            return NOT_AVAILABLE
        return None

    def report(self, status: int, output: bytes) -> bytes:
        return report(status, output)

    def start(self, messfd: int, outfd: int, sender: bytes, recip: bytes, at: int) -> int:
        argv = [self.program if self.fixed else "qmail-remote"] + [
            os.fsdecode(a) for a in (recip[at + 1:], sender, recip)]
        found = self._worker_stub()
        job = JOB + b"\0".join(os.fsencode(a) for a in argv)
        if found is None or len(job) > JOB_MAX:
            return self._child(messfd, outfd, argv)
        stub, mod = found
        key = (stub.module, stub.home)
        if key != self._stub_key:
            self._retire_all()  # an administrator replaced the stub: its workers serve no more
            self._stub_key = key
        while True:
            w = self.idle.pop() if self.idle else None
            fresh = w is None
            if w is None:
                w = self._fork_worker(stub, mod)
            assert w.end is not None
            try:
                w.end.sendmsg([job], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array("i", [messfd, outfd]))],
                              _socket.MSG_NOSIGNAL)
            except OSError:
                self._close(w)  # it died or retired itself while idle: the next one
                if fresh:
                    raise
                continue
            w.busy = True
            w.served += 1
            return w.pid

    def _worker_stub(self) -> tuple[spawn.Stub, ModuleType] | None:
        """Return the stub and module workers run, or None if this delivery gets a child of its own."""
        if not self.use_workers:
            return None
        stub = spawn.read_stub(self.program)
        if stub is None or not os.access(self.program, os.X_OK):
            return None  # a wrapper is exec'd, an unrunnable file fails as exec fails: in a child
        mod = sys.modules.get(stub.module)
        if mod is None:
            try:
                mod = __import__(stub.module, fromlist=["main"])
            except ImportError:
                return None
        if getattr(mod, "worker_reset", None) is None:
            return None  # a program that has not said what a delivery leaves behind: a child each time
        return stub, mod

    def _fork_worker(self, stub: spawn.Stub, mod: ModuleType) -> _Worker:
        """Fork a worker; raise OSError."""
        pid, mine, theirs = workers.fork_pair(
            lambda: _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC))
        if pid == 0:
            code = EXIT_TEMPORARY
            try:
                # Named at once: until then ps (and the crash harness's census) sees a second qmail-rspawn.
                set_title(self.program, [os.path.basename(self.program), "idle"])
                # The other workers' ends are closed by number below: their objects must
                # never close those numbers again.
                for other in self.workers.values():
                    if other.end is not None:
                        other.end.detach()
                mine.detach()
                code = serve(theirs, self.program, stub, mod, self.env, self.worker_deliveries, self.worker_idle)
            except BaseException:  # noqa: BLE001 - the worker must end in _exit, temporarily
                code = EXIT_TEMPORARY
            finally:
                os._exit(code)
        theirs.close()
        w = _Worker(pid, mine)
        self.workers[pid] = w
        return w

    def _close(self, w: _Worker) -> None:
        """Give w no more deliveries: it reads the end of its pair and exits (after its delivery, if busy)."""
        if w in self.idle:
            self.idle.remove(w)
        if w.end is not None:
            w.end.close()
            w.end = None

    def _retire_all(self) -> None:
        for w in list(self.workers.values()):
            if w.busy:
                w.retire = True
            else:
                self._close(w)

    def _read_delivery(self, d: spawnproto.Delivery) -> None:
        w = self.workers.get(d.pid)
        if w is None or not w.busy:
            return super()._read_delivery(d)
        super()._read_delivery(d)
        if not d.eof:
            return
        if d.status is not None:
            # Reaped on the report pipe's end: the worker died with this delivery.
            self.workers.pop(w.pid, None)
            self._close(w)
            return
        said = b""
        if w.end is not None:
            try:
                said = w.end.recv(16, _socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return  # not said, yet the pipe's last copy is closed: it is dying; SIGCHLD brings its status
            except OSError:
                said = b""
        if not said:
            self._close(w)  # it died: its wait status, reaped on SIGCHLD, makes the report
            return
        if len(said) != 3 or said[:1] != DONE or said[2:] not in (AGAIN, LAST):
            self._close(w)
            os.kill(w.pid, signal.SIGKILL)  # nonsense: its death makes the report ("crashed", deferred)
            return
        self._by_pid.pop(w.pid, None)
        w.busy = False
        d.status = said[1] << 8
        if said[2:] == AGAIN and not w.retire and w.served < self.worker_deliveries and w.end is not None:
            self.idle.append(w)
        else:
            self._close(w)
        self._finish(d)

    def _reap(self) -> None:
        for pid, status in workers.reaped():
            w = self.workers.pop(pid, None)
            if w is not None:
                self._close(w)
            d = self._by_pid.pop(pid, None)
            if d is not None:
                d.status = status
                self._finish(d)

    def _child(self, messfd: int, outfd: int, argv: list[str]) -> int:
        """Fork a child for one delivery (qmail 1.03's way); return its pid."""
        pid = os.fork()
        if pid == 0:
            code = EXIT_TEMPORARY
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                spawn.become(self.program, argv, env=self.env, fds={0: messfd, 1: outfd, 2: outfd})
            except OSError as e:
                code = EXIT_TEMPORARY if errors.temporary(e) else EXIT_PERMANENT
            except BaseException:  # noqa: BLE001 - the child must end in _exit, temporarily
                code = EXIT_TEMPORARY
            finally:
                os._exit(code)
        return pid


@program("qmail-rspawn", crash=111)
def main(argv: list[str]) -> int:
    """Run remote deliveries as qmail-send commands them."""
    qmail_home = _home.home()
    try:
        os.chdir(qmail_home)
        os.chdir("queue/mess")
    except OSError:
        return 111
    spawner = RemoteSpawner(qmail_home, _home.install(), dict(os.environ))
    clean_tcpto()
    return spawner.run()
