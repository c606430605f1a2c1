"""qmail-queued's side of pyqmail.inject.client: run qmail-inject or sendmail for a local caller.

A worker of qmail-queued (as qmailq, in a root-mode home) gets the caller's
request: the program's name, its argv, its environment, and its descriptors
0, 1 and 2. `serve` checks that the program would run here as it runs in the
caller's own process (see `_refusal`), puts the caller's descriptors on 0, 1
and 2 and its environment in place, acknowledges, runs the program's code
unchanged, puts the worker's own back, and answers the exit code.

What differs from the caller's own process, nothing of it seen outside:
- the pid qmail-inject puts in Message-ID is the caller's (SO_PEERCRED);
- descriptor 0 is read only while the caller is there: a caller killed
  while qmail-inject reads stops the work, and nothing is queued;
- the message goes through a spool file (O_TMPFILE in queue/pid/, never
  linked, removed by the kernel at close) that the worker's queue_message
  then commits exactly as it commits a message handed over by QQ: the same
  records with the caller's uid and pid, the same fsyncs, qmail-queued's
  own environment. Streaming into the spool keeps the worker's memory
  bounded by qmail-inject's header, as the caller's process is.
"""

from __future__ import annotations

import os
import sys

from pyqmail import durable, entry
from pyqmail import home as _home
from pyqmail.inject.client import PAYLOAD_MAX
from pyqmail.queue import exits
from pyqmail.queue.exits import QueueExit
from pyqmail.queue.handoff import ACK
from pyqmail.queue.qq import QMAIL_QUEUE_MODULE

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from typing import Any

    from collections.abc import Callable

    from pyqmail.queue.qmail_queue import Watch

PROGRAMS = {"qmail-inject": "pyqmail.inject.qmail_inject", "sendmail": "pyqmail.inject.sendmail"}
QMAIL_INJECT_MODULE = PROGRAMS["qmail-inject"]
ARGS_MAX = 1 << 20
SAVED_FD_MIN = 10  # where the worker's own 0, 1 and 2 wait during a request
DATA_MAX = 512 << 20  # RLIMIT_DATA of a worker that has served a request (see _bound_memory)
STOP_POLL_MS = 50  # how often a worker looks whether its stopped caller runs again
RSS_RETIRE = 96 << 20  # a worker whose peak RSS passed this exits after its answer


class Gone(Exception):
    """The caller hung up (killed, or gave up) while its program ran: nothing more is said to it."""


class Request:
    """One caller's request, parsed: the program's name, argv and environment."""

    __slots__ = ("name", "argv", "env")

    def __init__(self, name: str, argv: list[str], env: dict[bytes, bytes]) -> None:
        self.name = name
        self.argv = argv
        self.env = env


def parse(data: bytes) -> Request | None:
    """Return the request in a payload (client.payload), None if it is not one."""
    fields = data.split(b"\0")
    if len(fields) < 3:
        return None
    try:
        name = fields[0].decode("ascii")
        argc = int(fields[1])
    except (UnicodeDecodeError, ValueError):
        return None
    if name not in PROGRAMS or not 1 <= argc <= ARGS_MAX or len(fields) < 2 + argc + 1:
        return None
    enc, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
    argv = [a.decode(enc, errors) for a in fields[2:2 + argc]]
    env: dict[bytes, bytes] = {}
    rest = fields[2 + argc:]
    if rest[-1] != b"":
        return None  # the environment block ends with a NUL, as /proc/self/environ
    for entry in rest[:-1]:
        # As Python's start builds os.environ: an entry without "=" is left out,
        # and the first of two entries of one name wins.
        key, eq, value = entry.partition(b"=")
        if eq and key and key not in env:
            env[key] = value
    return Request(name, argv, env)


def _own_stub(qmail_home: str, name: str, module: str) -> bool:
    """Whether QMAILHOME/bin/name is this home's executable stub of module (else the caller runs it)."""
    from pyqmail.stubfile import runnable_stub

    stub = runnable_stub(os.path.join(qmail_home, "bin", name), module)
    return stub is not None and stub.home == qmail_home


CONTROLS = ("me", "defaultdomain", "defaulthost", "plusdomain", "idhost")  # what qmail-inject reads of control/


def _controls_public(qmail_home: str) -> bool:
    """Whether everyone may read qmail-inject's control files: then the caller and qmailq read the same."""
    d = os.path.join(qmail_home, "control")
    try:
        if os.stat(d).st_mode & 0o111 != 0o111:
            return False
        for name in CONTROLS:
            try:
                if os.stat(os.path.join(d, name)).st_mode & 0o444 != 0o444:
                    return False
            except FileNotFoundError:
                continue  # missing for the caller too
    except OSError:
        return False
    return True


def _refusal(req: Request, qmail_home: str, inst: _home.Install) -> str:
    """Return why the caller must run req itself ("" if a worker may)."""
    if inst.single:
        return "single-user home"  # no qmail-queued between the user and the queue
    env = req.env
    if b"QMAILQUEUE" in env:
        return "$QMAILQUEUE"  # a program of the caller's choosing, to run as the caller
    if b"PYQMAIL_INJECT_LOCAL" in env:
        return "$PYQMAIL_INJECT_LOCAL"
    if b"QMAILMFTFILE" in env:
        return "$QMAILMFTFILE"  # a file of the caller's naming: read with the caller's rights, not qmailq's
    override = env.get(b"QMAILHOME")
    if override and override != os.fsencode(qmail_home):
        return "$QMAILHOME"
    if not _own_stub(qmail_home, "qmail-queue", QMAIL_QUEUE_MODULE):
        return "bin/qmail-queue is not this home's"  # an administrator's wrapper runs as the caller
    if req.name == "sendmail" and not _own_stub(qmail_home, "qmail-inject", QMAIL_INJECT_MODULE):
        return "bin/qmail-inject is not this home's"
    if not _controls_public(qmail_home):
        return "a control file not everyone may read"  # qmailq's rights are not the caller's
    return ""


# File systems whose files check the rights of the process that reads or writes them, at each
# read or write, not those of the opener: /proc/PID/stat of a qmailq process shows its memory
# layout to qmailq and not to pqtest. A caller's descriptor on one is used by the caller itself.
PER_READER_FS = frozenset({
    0x9FA0,  # proc
    0x62656572,  # sysfs
    0x64626720,  # debugfs
    0x74726163,  # tracefs
    0x73636673,  # securityfs
    0x62656570,  # configfs
})


def _fs_type(fd: int) -> int | None:
    """The f_type of fd's file system (fstatfs(2)), None if it cannot be had."""
    import ctypes

    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux; f_type comes first
    if _libc().fstatfs(fd, buf) != 0:
        return None
    return int.from_bytes(buf.raw[:ctypes.sizeof(ctypes.c_long)], sys.byteorder)


_LIBC: list[object] = []


def _libc() -> Any:
    if not _LIBC:
        import ctypes

        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    return _LIBC[0]


ANON_INODE_FS = 0x09041934  # eventfd, epoll, io_uring (which can hold registered files), ...


def _holds_files(fd: int) -> bool:
    """Whether fd can keep other open files alive: a Unix socket (descriptors in flight) or an anonymous
    inode (an io_uring's registered files). Held by the worker, it could hold the caller's own end of
    the connection, whose hang-up then never comes: the worker would wait for ever."""
    import socket
    import stat

    mode = os.fstat(fd).st_mode
    if stat.S_ISSOCK(mode):
        dup = os.dup(fd)
        try:
            s = socket.socket(fileno=dup)  # not a socket after all (an O_PATH descriptor of one): OSError
        except OSError:
            os.close(dup)
            raise
        try:
            return s.family == socket.AF_UNIX
        finally:
            s.close()
    return stat.S_IFMT(mode) == 0


def _fds_refusal(fds: list[int]) -> str:
    """Return why the caller must use its descriptors itself ("" if a worker may)."""
    for fd in fds:
        kind = _fs_type(fd)
        if kind is None or kind in PER_READER_FS:
            return "a descriptor on a file system that checks its reader's rights"
        try:
            if kind == ANON_INODE_FS or _holds_files(fd):
                return "a descriptor that can hold the caller's end of the connection"
        except OSError:
            return "a descriptor that cannot be looked at"
    return ""


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def read_request(conn: socket.socket) -> Request | None:
    """Read the length and payload that follow the request byte; None for a bad or oversized one."""
    head = _recv_exact(conn, 4)
    if head is None:
        return None
    n = int.from_bytes(head, "big")
    if n > PAYLOAD_MAX:
        return None
    data = _recv_exact(conn, n)
    return None if data is None else parse(data)


class SpoolQQ:
    """QQ's interface for a served qmail-inject: the message into a spool, committed by queue_message at close."""

    def __init__(self, job: Job, utf8: bool) -> None:
        self.job = job
        self.utf8 = utf8
        self.code: int | None = None
        self.custom = b""
        self.fd = job.spool
        self.size = 0
        self.failed = False
        self.buf = bytearray()

    def _put(self, data: bytes | bytearray) -> None:
        if self.failed:
            return
        try:
            durable.write_all(self.fd, data)
        except OSError:
            self.failed = True  # close() answers qmail-queue's write error, 53: the spool is the queue's disk

    def write(self, data: bytes) -> None:
        self.buf += data
        self.size += len(data)
        if len(self.buf) >= 65536:
            self._put(self.buf)
            self.buf.clear()

    def fail(self) -> None:
        self.failed = True

    def close(self, sender: bytes = b"", recipients: list[bytes] | tuple[bytes, ...] = ()) -> bytes:
        """Commit the message with its envelope as qmail-queued commits a handed-over one; return the D/Z report."""
        from pyqmail.queue import qmail_queue

        self.buf += b"F" + sender + b"\0"
        for r in recipients:
            self.buf += b"T" + r + b"\0"
            if len(self.buf) >= 65536:
                self._put(self.buf)
                self.buf.clear()
        self.buf += b"\0"
        self._put(self.buf)
        self.buf.clear()
        if self.failed:
            self.code = QueueExit.WRITE_ERROR
            return exits.report(self.code)
        total = os.lseek(self.fd, 0, os.SEEK_CUR)
        os.lseek(self.fd, 0, os.SEEK_SET)
        job = self.job
        code = job.commit(lambda watch: qmail_queue.queue_message(
            job.qmail_home, self.fd, self.fd, job.uid, job.pid, job.inst, msg_len=self.size,
            env_len=total - self.size, watch=watch, utf8=self.utf8, trigger=False))
        self.code = code
        return exits.report(code)


class Job:
    """One served request: the caller's connection, uid, pid and spool, and the worker's state to put back."""

    def __init__(self, conn: socket.socket, qmail_home: str, inst: _home.Install, uid: int, pid: int,
                 spool: int, base_env: dict[bytes, bytes], client_env: dict[bytes, bytes]) -> None:
        import select

        self.conn = conn
        self.qmail_home = qmail_home
        self.inst = inst
        self.uid = uid
        self.pid = pid
        self.spool = spool
        self.base_env = base_env
        self.client_env = client_env
        self.queued = False
        self.committing = False
        self.uncertain = False  # a commit cut short by the alarm, or a bug of ours
        self._poll = select.poll()
        self._poll.register(conn.fileno(), select.POLLIN)
        self._polled = -1
        self._conn_poll: select.poll | None = None

    def wait(self, fd: int) -> None:
        """Return once fd is readable; raise Gone if the caller hangs up first (it sends nothing more)."""
        import select

        if fd != self._polled:
            if self._polled >= 0:
                self._poll.unregister(self._polled)
            self._poll.register(fd, select.POLLIN)
            self._polled = fd
        while True:
            events = self._poll.poll()
            if any(efd == self.conn.fileno() for efd, _ in events):
                raise Gone()
            if events:
                if not self._stopped():
                    return
                self._while_stopped()

    def _stopped(self) -> bool:
        """Whether the caller is stopped (^Z, SIGSTOP): then its qmail-inject would read nothing."""
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return False  # gone (its socket says so next), or /proc hides it: read as a running caller
        fields = stat.rpartition(b")")[2].split()
        return bool(fields) and fields[0] in (b"T", b"t")

    def _while_stopped(self) -> None:
        """Wait until the caller runs again; raise Gone if it hangs up meanwhile. A stop has no
        event to wait on (a pidfd reports the exit only), so its state is looked at every STOP_POLL_MS."""
        import select

        if self._conn_poll is None:
            self._conn_poll = select.poll()
            self._conn_poll.register(self.conn.fileno(), select.POLLIN)
        while self._stopped():
            if self._conn_poll.poll(STOP_POLL_MS):
                raise Gone()

    def commit(self, queue: Callable[[Watch], int]) -> int:
        """Run queue(watch) under qmail-queued's own environment, as a handed-over message is committed."""
        from pyqmail.queue import qmail_queue
        from pyqmail.spawn import restore_environb
        from pyqmail import sig as signal

        self.committing = True  # no Gone from SIGIO inside the commit: its watch looks at the caller itself
        try:
            restore_environb(self.base_env)
            watch = qmail_queue.Watch(self.conn.fileno(), 86400.0)
            signal.signal(signal.SIGALRM, qmail_queue._on_alarm)
            signal.alarm(qmail_queue.SUICIDE_SECONDS)
            try:
                code = queue(watch)
            finally:
                signal.alarm(0)
                restore_environb(self.client_env)
        finally:
            self.committing = False
        if code == QueueExit.OK:
            self.queued = True
        elif code in (QueueExit.TIMEOUT, QueueExit.BUG):
            self.uncertain = True
        return code


def preload() -> None:
    """Import what a served request runs, in qmail-queued before it forks workers (each has it then)."""
    from pyqmail import control, rfc822, smtputf8  # noqa: F401
    from pyqmail.inject import header, qmail_inject, sendmail  # noqa: F401
    from pyqmail.spawn import restore_environb  # noqa: F401
    from pyqmail.stubfile import read_stub  # noqa: F401

    _libc()


def _bound_memory() -> None:
    """Bound this worker's data (once): a header of gigabytes makes qmail-inject's "out of memory", as
    a limit on its own process would, instead of growing qmailq's worker without end."""
    global _bounded
    if _bounded:
        return
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    soft = DATA_MAX if hard == resource.RLIM_INFINITY else min(DATA_MAX, hard)
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    except (OSError, ValueError):
        pass  # safe: the limit is a bound on a hostile caller, not needed for a message
    _bounded = True


def _grown() -> bool:
    """Whether this worker's peak memory is past RSS_RETIRE: it answers, then exits to give it back."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 > RSS_RETIRE


_bounded = False


def _open_spool(qmail_home: str) -> int:
    """An unnamed file in queue/pid/ (the queue's file system, qmailq's): raise OSError."""
    return os.open(os.path.join(qmail_home, "queue", "pid"), os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)



class Outcome:
    """What serving a request came to: the exit code to answer (-1: none), whether a message was queued,
    and whether the worker may serve again (False after a crash of ours or an uncertain commit)."""

    __slots__ = ("code", "queued", "clean")

    def __init__(self, code: int = -1, queued: bool = False, clean: bool = True) -> None:
        self.code = code
        self.queued = queued
        self.clean = clean


def serve(conn: socket.socket, fds: list[int], uid: int, pid: int, qmail_home: str,
          inst: _home.Install) -> Outcome:
    """Serve one request whose byte was read, up to (not including) the answer; return the Outcome.

    fds are the caller's descriptors 0, 1 and 2; the caller closes them, then
    answers Outcome.code unless it is -1 (refused before the acknowledgement:
    the client runs the program itself; or the client is gone).
    """
    try:
        req = read_request(conn)
        conn.settimeout(None)
    except OSError:
        return Outcome()
    if req is None or _refusal(req, qmail_home, inst) or _fds_refusal(fds):
        return Outcome()  # the connection closes unacknowledged: the caller runs the program itself
    try:
        spool = _open_spool(qmail_home)
    except OSError:
        return Outcome()
    _bound_memory()
    try:
        outcome = _run(conn, fds, req, uid, pid, qmail_home, inst, spool)
    finally:
        os.close(spool)
    if outcome.clean and _grown():
        outcome.clean = False
    return outcome


def _run(conn: socket.socket, fds: list[int], req: Request, uid: int, pid: int, qmail_home: str,
         inst: _home.Install, spool: int) -> Outcome:
    import posix

    from pyqmail.spawn import restore_environb

    base_env = dict(posix.environ)
    job = Job(conn, qmail_home, inst, uid, pid, spool, base_env, req.env)
    entry._flush_std()  # the worker's own buffers, before its descriptors change
    saved = [_dup_high(fd) for fd in (0, 1, 2)]
    try:
        cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        cwd = -1
    code = -1
    try:
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
        restore_environb(req.env)
        argv = req.argv
        got: tuple[str, list[str]] | int | None = None
        if req.name == "sendmail":
            from pyqmail.inject import sendmail

            got = sendmail.prepare(argv)
            if not isinstance(got, int):
                path, argv = got
                if path != sendmail.QMAIL_INJECT:
                    return Outcome()  # -bp, -bs, mailq: not the queue's work; the caller runs them
        try:
            conn.sendall(ACK)
        except OSError:
            return Outcome()
        code = got if isinstance(got, int) else _inject(job, argv)
    finally:
        restore_environb(base_env)
        for i, fd in enumerate(saved):
            os.dup2(fd, i)
            os.close(fd)
        if cwd >= 0:
            try:
                os.fchdir(cwd)
            except OSError:
                pass  # safe: every request chdirs where it works
            os.close(cwd)
    return Outcome(code & 0xFF if code >= 0 else -1, job.queued, not job.uncertain)


def _dup_high(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, SAVED_FD_MIN)


def _inject(job: Job, argv: list[str]) -> int:
    """Run qmail-inject's code on argv for the job; return its exit code, -1 if the caller went."""
    from pyqmail.inject import qmail_inject

    def crashed(reason: str) -> None:
        job.uncertain = True  # said and answered as qmail-inject's crash; then this worker exits

    qmail_inject.serving(job)
    try:
        _arm(job)
        # As its stub would: a crash of ours is qmail-inject's temporary failure (entry.call).
        return entry.call("qmail-inject", qmail_inject.EXIT_TEMP, qmail_inject.main.__wrapped__,  # type: ignore[attr-defined]
                          argv, crashed, let_through=(Gone,))
    except Gone:
        return -1
    finally:
        try:
            _disarm(job)
        except Gone:
            pass  # safe: a SIGIO handled before _disarm let go of the job; the caller is gone, the code unused
        qmail_inject.serving(None)


# The job whose caller's hang-up interrupts the program (SIGIO: O_ASYNC on its connection).
# Job.wait sees a hang-up while qmail-inject waits for its input; this covers the rest: a
# write to descriptor 1 or 2 blocked on a full pipe, a read whose data another process took
# after the poll. The handler raises Gone from inside the blocked system call (PEP 475 gives
# way to a handler that raises), except during the commit, whose own watch looks.
_armed: Job | None = None
_handler_set = False


def _on_sigio(signum: int, frame: object) -> None:
    job = _armed
    if job is not None and not job.committing:
        raise Gone()


def _arm(job: Job) -> None:
    import fcntl
    import select
    import signal

    global _armed, _handler_set
    if not _handler_set:
        signal.signal(signal.SIGIO, _on_sigio)  # for good: a late SIGIO finds no job and does nothing
        _handler_set = True
    fd = job.conn.fileno()
    fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
    _armed = job
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    if poll.poll(0):
        raise Gone()  # hung up before O_ASYNC was set: no signal would come for it


def _disarm(job: Job) -> None:
    import fcntl

    global _armed
    _armed = None
    fd = job.conn.fileno()
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_ASYNC)
    except OSError:
        pass  # safe: the connection is closed right after; a late SIGIO finds no job
