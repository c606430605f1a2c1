"""qmail-queued: let local users queue mail in a root-mode installation.

C qmail makes qmail-queue setuid qmailq. Python programs cannot be setuid, so
(ARCHITECTURE decision 6) this server, running as qmailq, listens on
QMAILHOME/run/qmail-queue.sock. qmail-queue, run by any other user, connects
and passes its descriptors 0 and 1; the server learns the caller's uid from
the kernel (SO_PEERCRED), queues the message exactly as qmail-queue does with
that uid in the Received line, and answers qmail-queue's exit code as one byte
(after an acknowledgement, see qmail_queue.ACK).

When no qmail-queued runs, qmail-queue writes the message into
QMAILHOME/maildrop/ instead. qmail-queued scans that directory at start,
every SCAN_INTERVAL seconds and on SIGALRM, queues each `m` file with the uid
of the file's owner (the kernel's word, never the file's) and removes it.

usage: qmail-queued [-p] [-c N] [-m N] [-t SECONDS] [-n N] [-w SECONDS]
(started as root or as qmailq; as root it becomes qmailq)

Limits, so that local users stay in their lane (C's setuid qmail-queue is
the caller's own process; here the work is the server's, so it is bounded
and accounted to the caller):

  -c N        at most N messages of one uid are served at a time (default 20). A
              connection past the limit is closed before its descriptors
              are taken, so that client writes the message into the
              maildrop itself: its own process, its own time, bounded by
              the disk only, as with C's qmail-queue.
  -m N        at most N messages are served at a time in all (default 100),
              so at most N workers serve: -c bounds one uid, -m every uid
              together (20 x the users connecting at once had no bound). A
              connection past it is closed unread as past -c: its client
              writes the maildrop.
  -t SECONDS  a worker whose client's descriptors give nothing for SECONDS
              (default 1200, qmail-smtpd's timeout) gives up: qmail-queue's
              read error, 54, nothing queued.

The messages are queued by workers: processes forked by qmail-queued (as
qmailq) that each serve one connection after another, handed to them over
a socket pair, so that a message costs no fork (Postfix's reuse of its
processes). A worker is forked when a connection comes and none is idle;
each message gets fresh state, and a worker that meets anything unexpected
answers and exits (another is forked when needed). The options:

  -n N        a worker retires after N messages (default 500).
  -w SECONDS  an idle worker retires after SECONDS (default 60).

A worker also gives up a message, queueing nothing, as soon as its client
hangs up (the client was killed, or gave up): the caller can kill what it started, as it
can kill C's qmail-queue. The Received line, the `p` record and so qmail-
send's log lines name the client's pid (SO_PEERCRED), as they name C's
qmail-queue; a maildrop message names the pid its client wrote into the
drop file's name (a note only: the uid is the file owner's).

Only the holder of the lock QMAILHOME/queue/lock/queued (an exclusive flock;
the file says "PID\\n", or "PID p\\n" for -p) touches the socket. A second
qmail-queued finding the lock held exits 111 ("already running") without
touching anything, unless the holder is a -p instance: that one is asked
over the socket to give way, and the new one takes its place. With -p (as
qmail-start starts it) it exits when the process that started it has gone,
so that it lives no longer than qmail-send; while another qmail-queued holds
the lock it only waits (touching nothing) and serves once that one stops;
asked to give way, it removes its socket, unlocks and waits again.
SIGTERM: stop accepting, remove the socket, exit 0. SIGALRM: scan the
maildrop now.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import socket
import stat
import struct
import time

from pyqmail import home as _home
from pyqmail.entry import program
from pyqmail.privs import Credentials, drop
from pyqmail.queue import handoff as _handoff
from pyqmail.queue import maildrop, qmail_queue
from pyqmail.queue.exits import QueueExit
from pyqmail.sgetopt import Getopt
from pyqmail import workers

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

_UCRED = struct.Struct("iII")
ANSWER_TIMEOUT = 60  # seconds a client has to send its descriptors
PER_UID = 20  # -c: messages of one uid served at a time
SERVING_MAX = 100  # -m: messages served at a time, every uid together
WORKER_MESSAGES = 500  # -n: messages a worker serves before it retires
WORKER_IDLE = 60.0  # -w: seconds an idle worker waits for its next message before it retires
WORKER_COMM = "qmail-queued-w"  # a worker's name in ps (the kernel's comm): the killers and census tell it apart
IDLE_SECONDS = 1200.0  # -t: a client's descriptors silent this long is a read error (qmail-smtpd's timeout)
SCAN_INTERVAL = 1.0  # seconds between maildrop scans; also between checks that the starting process lives (-p)
LOCK = "queue/lock/queued"
TAKEOVER_SECONDS = 30.0  # how long a standalone qmail-queued waits for a -p holder to give way
BACKOFF_SECONDS = 300  # a drop file the queue could not take waits this long; the others go on
SPARSE_SLACK = 1 << 16  # bytes a drop file may claim beyond its blocks on disk (filesystem rounding)
WARNED_MAX = 10000  # names remembered as said: past this, nothing more is said about new ones
EXIT_FAIL = 111
JOB = b"j"  # server to worker, with the client's connection (SCM_RIGHTS): serve it
DONE = b"d"  # worker to server: the message is answered and every descriptor of it closed
# Exit codes after which a worker does not serve again: the alarm (52) may have cut
# anything short, and 81 is a bug of ours. Its next message gets a fresh process.
_UNCERTAIN = (QueueExit.TIMEOUT, QueueExit.BUG)
# Exit codes of queue_message that mean the drop file itself is bad: it is
# removed. Every other failure is the queue's: the file stays for the next scan.
_MALFORMED = (QueueExit.ADDR_TOO_LONG, QueueExit.READ_ERROR, QueueExit.ENVELOPE_FORMAT)


def _say(text: str) -> None:
    try:
        os.write(2, f"qmail-queued: {text}\n".encode("utf-8", "backslashreplace"))
    except OSError:
        pass  # stderr gone: nowhere left to say it


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """Return the (pid, uid, gid) the kernel gives for the process that connected conn."""
    pid, uid, gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid, gid


def serve_one(conn: socket.socket, qmail_home: str, inst: _home.Install, server_pid: int = 0,
              stoppable: bool = False, idle: float = IDLE_SECONDS,
              before_answer: Callable[[int], None] | None = None) -> int:
    """Answer one client connection (queue its message, or a stop request); return the exit code sent.

    before_answer(code) is called once the message's descriptors are closed,
    just before its exit code is sent (a worker tells its server it is free).
    """
    client_pid, uid, _ = peer_credentials(conn)
    if client_pid <= 0:
        client_pid = os.getpid()  # the client is in another pid namespace: the kernel says 0
    conn.settimeout(min(ANSWER_TIMEOUT, idle))
    try:
        msg, fds, _, _ = socket.recv_fds(conn, 1, 4)
    except (OSError, socket.timeout):
        return QueueExit.READ_ERROR
    code: int = QueueExit.READ_ERROR
    try:
        if msg == qmail_queue.REQUEST_STOP and not fds:
            return _stop_request(conn, uid, inst, server_pid, stoppable)
        if msg == _handoff.REQUEST_INJECT and len(fds) == 3:
            from pyqmail.inject import served

            outcome = served.serve(conn, fds, uid, client_pid, qmail_home, inst)
            for fd in fds:
                os.close(fd)
            fds = []
            code = outcome.code if outcome.clean else QueueExit.BUG
            if outcome.code < 0:
                return code  # refused before anything was read (the client runs the program), or the client went
            if before_answer is not None:
                before_answer(code)
            try:
                conn.sendall(bytes([outcome.code]))
            except OSError:
                pass  # safe: the client is gone; the exit code was for it alone
            if outcome.queued:
                from pyqmail.queue import layout

                layout.pull_trigger(os.path.join(qmail_home, "queue"))
            return code
        if msg in (qmail_queue.REQUEST_QUEUE, qmail_queue.REQUEST_QUEUE_UTF8) and len(fds) == 2:
            try:
                conn.sendall(qmail_queue.ACK)
            except OSError:
                return code  # the client is gone; its message was never read
            conn.settimeout(None)
            watch = qmail_queue.Watch(conn.fileno(), idle)
            signal.signal(signal.SIGALRM, qmail_queue._on_alarm)
            signal.alarm(qmail_queue.SUICIDE_SECONDS)
            try:
                code = qmail_queue.queue_message(qmail_home, fds[0], fds[1], uid, client_pid, inst, watch=watch,
                                                 utf8=msg == qmail_queue.REQUEST_QUEUE_UTF8,
                                                 trigger=False)
            finally:
                signal.alarm(0)  # a worker's next message starts without this one's alarm
    finally:
        for fd in fds:
            os.close(fd)
    if before_answer is not None:
        before_answer(code)
    try:
        conn.sendall(bytes([code]))
    except OSError:
        pass  # safe: the client is gone; the exit code was for it alone
    if code == QueueExit.OK:
        # The trigger after the answer: writing it wakes qmail-send, which can take
        # this CPU for milliseconds before the answer would go (issue 17). The
        # message is durable already; a worker killed here leaves it in todo/ for
        # qmail-send's own scan, as a qmail-queue killed after its link would.
        # (A 0 from _take_back, todo/N already taken, pulls a spare one: harmless.)
        from pyqmail.queue import layout

        layout.pull_trigger(os.path.join(qmail_home, "queue"))
    return code


def _stop_request(conn: socket.socket, uid: int, inst: _home.Install, server_pid: int, stoppable: bool) -> int:
    """A standalone qmail-queued asks this -p server to give way (USR1 to it): only root or qmailq may."""
    ok = stoppable and uid in (0, inst.uid("qmailq")) and server_pid > 1 and os.getppid() == server_pid
    try:
        conn.sendall(qmail_queue.STOP_YES if ok else qmail_queue.STOP_NO)
    except OSError:
        ok = False
    if ok:
        os.kill(server_pid, signal.SIGUSR1)
    return 0 if ok else 1


# --- the workers ------------------------------------------------------------------

def work(end: socket.socket, qmail_home: str, inst: _home.Install, server_pid: int = 0,
         stoppable: bool = False, idle: float = IDLE_SECONDS) -> int:
    """Serve the connections the server hands over end, one after another, until it closes end; return the exit code.

    Each message starts from nothing of the one before: serve_one makes a
    new watch and queue_message a new Queuer, and every descriptor of the
    message is closed before the worker says DONE. It says DONE before it
    sends the client its exit code, so that a client's next message, sent
    once it has its answer, finds this worker idle rather than making the
    server fork another. The worker exits instead (the server forks another
    when needed) after an exception, an exit code in _UNCERTAIN, or when it
    holds other descriptors than before its first message.
    """
    base = workers.open_fds()
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(end, 16, 1)
        except OSError:
            return 0  # the server is gone
        if msg != JOB or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return 0 if not msg else EXIT_FAIL  # closed by the server (retired, or it stopped), or nonsense
        conn = socket.socket(fileno=fds[0])
        said = [False]  # DONE said for this message

        def ready_for_next(code: int) -> None:
            if code in _UNCERTAIN or workers.open_fds(skip=conn.fileno()) != base:
                return  # not to be trusted with another message: the checks below say why and exit
            try:
                end.sendall(DONE)
                said[0] = True
            except OSError:
                pass  # safe: the server is gone; recv_fds says so next

        try:
            code = serve_one(conn, qmail_home, inst, server_pid, stoppable=stoppable, idle=idle,
                             before_answer=ready_for_next)
        except Exception as e:  # noqa: BLE001 - a bug of ours: answer as qmail-queue's crash would, then go
            _say(f"warning: worker {os.getpid()}: internal error: {type(e).__name__}: {e}")
            try:
                conn.sendall(bytes([QueueExit.BUG]))
            except OSError:
                pass  # safe: the client is gone; the exit code was for it alone
            return QueueExit.BUG
        finally:
            conn.close()
        if said[0]:
            continue
        if code in _UNCERTAIN:
            return code
        if workers.open_fds() != base:
            _say(f"warning: worker {os.getpid()}: descriptors left open after a message: exiting")
            return EXIT_FAIL
        try:
            end.sendall(DONE)  # a connection that never came to an answer (a stop request, a client gone)
        except OSError:
            return 0  # the server is gone


# --- the maildrop -----------------------------------------------------------------

class Pickup:
    """Queue the maildrop's `m` files, one scan at a time."""

    def __init__(self, qmail_home: str, inst: _home.Install, qmailq: int) -> None:
        self.top = os.path.join(qmail_home, maildrop.DIR)
        self.qmail_home = qmail_home
        self.inst = inst
        self.qmailq = qmailq
        self.warned: set[str] = set()  # names whose removal failed: said once, not every scan
        self.gid = inst.groups.get("qmail", -1)  # the maildrop's group, given to drop files by setgid
        self.backoff: dict[str, float] = {}  # name -> when to try again after queue trouble

    def scan(self, now: float | None = None) -> int:
        """Queue every good `m` file, refuse the bad ones; return how many were queued."""
        if now is None:
            now = time.time()
        queued = 0
        try:
            it = os.scandir(self.top)
        except OSError as e:
            if self.top not in self.warned:
                self.warned.add(self.top)
                _say(f"warning: unable to read {self.top}: {e.strerror}")
            return 0
        self.warned.discard(self.top)
        with it:
            for entry in it:
                name = entry.name
                if name.startswith("m"):
                    if self.backoff.get(name, 0.0) > now:
                        continue  # queue trouble with this one file: the others go on
                    try:
                        result = self.pick_up(name)
                    except Exception as e:  # noqa: BLE001 - one file must not stop intake
                        # A bug of ours, not the file's fault: keep the file, say so once.
                        if name not in self.warned and len(self.warned) < WARNED_MAX:
                            self.warned.add(name)
                            _say(f"warning: internal error on {maildrop.DIR}/{name}: {type(e).__name__}: {e}")
                        continue
                    if result is None:
                        # Trouble queueing this file (a full disk, perhaps made by this very
                        # file): it waits; the files after it are not held behind it.
                        self.backoff[name] = now + BACKOFF_SECONDS
                        continue
                    self.backoff.pop(name, None)
                    queued += result
                else:
                    self._expire(name, now)
        return queued

    def pick_up(self, name: str) -> int | None:
        """Queue maildrop/name if it is a good drop file; return 1 if queued, 0 if not, None on queue trouble."""
        path = os.path.join(self.top, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return 0
        except OSError as e:
            self._refuse(name, f"unable to stat: {e.strerror}")
            return 0
        why = self._bad(st)
        if why:
            self._refuse(name, why, st)
            return 0
        try:
            # O_NOFOLLOW: a symlink swapped in since lstat is refused (ELOOP);
            # O_NONBLOCK: a FIFO swapped in does not hang the scan.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        except OSError as e:
            self._refuse(name, f"unable to open: {e.strerror}")
            return 0
        try:
            fst = os.fstat(fd)
            why = self._bad(fst)
            if not why and (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                why = "replaced while being read"
            if why:
                self._refuse(name, why, fst)
                return 0
            try:
                head = os.pread(fd, maildrop.HEADER_SIZE, 0)
                offset = maildrop.envelope_offset(head, fst.st_size)
                if offset is not None:
                    os.lseek(fd, maildrop.HEADER_SIZE, os.SEEK_SET)
            except OSError as e:
                self._refuse(name, f"unable to read: {e.strerror}")
                return 0
            if offset is None:
                self._refuse(name, "not a drop file")
                return 0
            # The uid is the file's owner: set by the kernel when its creator
            # made it, and a user can give a file away to nobody.
            # Both parts end where the file ended when it was opened: its owner may
            # keep it open and grow it, which must not hold the scan (or fill the queue).
            code = qmail_queue.queue_message(self.qmail_home, fd, fd, fst.st_uid, maildrop.writer_pid(name),
                                             self.inst, msg_len=offset - maildrop.HEADER_SIZE,
                                             env_len=fst.st_size - offset)
        finally:
            os.close(fd)
        if code in _MALFORMED:
            self._refuse(name, f"malformed (qmail-queue exit {code})")
            return 0
        if code != QueueExit.OK:
            _say(f"warning: trouble queueing {maildrop.DIR}/{name} (qmail-queue exit {code}); "
                 f"will try again in {BACKOFF_SECONDS} seconds")
            return None
        self._remove(name)
        return 1

    def _bad(self, st: os.stat_result) -> str:
        """Return why a drop file with this status is refused, or "" if it is not."""
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if st.st_nlink != 1:
            # A hard link to another user's file would be queued as that user.
            return f"has {st.st_nlink} links"
        if st.st_uid in (0, self.qmailq):
            # root's and qmailq's qmail-queue write the queue themselves, never here.
            return f"owned by uid {st.st_uid}"
        if st.st_gid != self.gid or stat.S_IMODE(st.st_mode) != maildrop.FILE_MODE:
            # qmail-queue's drop files get the directory's group (setgid) and mode 0640.
            # Another user's file, hard-linked here after its own link was removed,
            # keeps its group and mode, which only its owner can change.
            return f"group {st.st_gid} mode {stat.S_IMODE(st.st_mode):o}, not a drop file's"
        if st.st_blocks * 512 + SPARSE_SLACK < st.st_size:
            # Written by qmail-queue, a drop file holds every byte it claims; a sparse
            # one would make the queue write gigabytes its owner never paid for.
            return f"sparse ({st.st_size} bytes, {st.st_blocks * 512} on disk)"
        return ""

    def _refuse(self, name: str, why: str, st: os.stat_result | None = None) -> None:
        if name not in self.warned and len(self.warned) < WARNED_MAX:
            owner = "" if st is None else f" (uid {st.st_uid})"
            _say(f"warning: refused {maildrop.DIR}/{name}{owner}: {why}")
        self._remove(name, isdir=st is not None and stat.S_ISDIR(st.st_mode))

    def _remove(self, name: str, isdir: bool = False) -> None:
        path = os.path.join(self.top, name)
        try:
            if isdir:
                os.rmdir(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass  # gone already
        except OSError as e:
            if name not in self.warned:
                if len(self.warned) < WARNED_MAX:
                    self.warned.add(name)
                _say(f"warning: unable to remove {maildrop.DIR}/{name}: {e.strerror}")
            return
        self.warned.discard(name)

    def _expire(self, name: str, now: float) -> None:
        """Remove a `t` file (or anything else not `m`) left for STALE_SECONDS: its writer is dead."""
        path = os.path.join(self.top, name)
        try:
            st = os.lstat(path)
        except OSError:
            return  # gone, or not ours to judge: the next scan looks again
        if now - st.st_mtime > maildrop.STALE_SECONDS:
            self._remove(name, isdir=stat.S_ISDIR(st.st_mode))


def _make_maildrop(qmail_home: str, q: _home.Account, gid: int) -> None:
    """Create QMAILHOME/maildrop if missing and give it its owner and mode; say so if that fails."""
    path = os.path.join(qmail_home, maildrop.DIR)
    try:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            _say(f"warning: {path} is not a directory: local users cannot queue while qmail-queued is down")
            return
        if (st.st_uid, st.st_gid) != (q.uid, gid) and os.geteuid() == 0:
            os.lchown(path, q.uid, gid)
        if stat.S_IMODE(st.st_mode) != maildrop.MODE:
            os.chmod(path, maildrop.MODE)
    except OSError as e:
        _say(f"warning: unable to create {path}: {e.strerror}: local users cannot queue while qmail-queued is down")


# --- the lock ---------------------------------------------------------------------

def _open_lock(path: str, q: _home.Account, gid: int) -> int:
    """Open (as root: create for qmailq) the lock file; raise OSError."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        pass
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return os.open(path, flags)
    if os.geteuid() == 0:
        os.fchown(fd, q.uid, gid)
    return fd


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _ask_to_stop(sock_path: str) -> bytes:
    """Ask the server on sock_path to give way; return its answer, b"" if none."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(ANSWER_TIMEOUT)
            s.connect(sock_path)
            s.sendall(qmail_queue.REQUEST_STOP)
            return s.recv(1)
    except OSError:
        return b""


def _take_over(lock: int, sock_path: str, deadline: float) -> bool:
    """Take the lock from a -p holder; return False if the holder is standalone or will not go."""
    next_ask = 0.0
    while time.monotonic() < deadline:
        if _try_lock(lock):
            return True
        if time.monotonic() >= next_ask:
            # Asked again every half second: a -p holder that gave way
            # waits before it looks at the lock again, but a slow start
            # here must not lose the lock to it for good.
            answer = _ask_to_stop(sock_path)
            if answer == qmail_queue.STOP_NO:
                return False
            next_ask = time.monotonic() + 0.5
        # No answer: the holder has the lock but not yet its socket (it is
        # starting), or it is stopping. Either way, look again shortly.
        time.sleep(0.05)
    return _try_lock(lock)


# --- the server -------------------------------------------------------------------

def _on_child(signum: int, frame: object) -> None:
    """SIGCHLD: nothing here; the signal's byte on the wake-up pipe makes the loop reap."""


class Worker:
    """One worker as the server sees it."""

    __slots__ = ("pid", "end", "uid", "served", "since")

    def __init__(self, pid: int, end: socket.socket, now: float) -> None:
        self.pid = pid
        self.end = end  # the server's end of the socket pair; closed when the worker is retired
        self.uid: int | None = None  # the uid of the message it serves; None when idle
        self.served = 0
        self.since = now  # when it became idle


class Workers:
    """The workers: which are idle, which serve, and the -c limit's count of messages in progress by uid."""

    def __init__(self, per_uid: int, messages: int = WORKER_MESSAGES, idle: float = WORKER_IDLE,
                 serving_max: int = SERVING_MAX) -> None:
        self.per_uid = per_uid
        self.serving_max = serving_max
        self.serving = 0  # messages being served, every uid together (the sum of count)
        self.said_all = False  # the global refusal was said, until the count drops below it
        self.messages = messages
        self.idle_seconds = idle
        self.by_pid: dict[int, Worker] = {}  # every worker not yet reaped
        self.by_fd: dict[int, Worker] = {}  # the server's end -> worker, for those not retired
        self.idle: list[Worker] = []  # oldest first; the newest is reused first, so the pool shrinks with the load
        self.count: dict[int, int] = {}  # uid -> messages being served
        self.said: set[int] = set()  # uids whose refusal was said, until they drop below the limit

    def full(self, uid: int) -> bool:
        """Return True if uid, or every uid together, has its limit of messages in progress (said once each time)."""
        if self.serving >= self.serving_max:
            if not self.said_all:
                self.said_all = True
                _say(f"warning: {self.serving_max} connections being served: "
                     "further ones are refused (their qmail-queue uses the maildrop)")
            return True
        if self.count.get(uid, 0) < self.per_uid:
            return False
        if uid not in self.said:
            self.said.add(uid)
            _say(f"warning: uid {uid} has {self.per_uid} connections being served: "
                 "further ones are refused (their qmail-queue uses the maildrop)")
        return True

    def add(self, pid: int, end: socket.socket, now: float) -> Worker:
        """Record a worker just forked (not yet idle: it is given a message at once)."""
        w = Worker(pid, end, now)
        self.by_pid[pid] = w
        self.by_fd[end.fileno()] = w
        return w

    def take(self) -> Worker | None:
        """Return the newest idle worker (no longer idle), or None."""
        return self.idle.pop() if self.idle else None

    def busy(self, w: Worker, uid: int) -> None:
        """w serves a message of uid from now on."""
        w.uid = uid
        w.served += 1
        self.count[uid] = self.count.get(uid, 0) + 1
        self.serving += 1

    def _uncount(self, w: Worker) -> None:
        uid = w.uid
        if uid is None:
            return
        w.uid = None
        self.serving -= 1
        if self.serving < self.serving_max:
            self.said_all = False
        n = self.count[uid] - 1
        if n:
            self.count[uid] = n
        else:
            del self.count[uid]
        if n < self.per_uid:
            self.said.discard(uid)

    def done(self, w: Worker, now: float) -> None:
        """w has answered its message: idle again, or retired after its last one."""
        self._uncount(w)
        if w.served >= self.messages:
            self.retire(w)
        else:
            w.since = now
            self.idle.append(w)

    def retire(self, w: Worker) -> None:
        """Close the server's end of w: it reads the end of its socket and exits (after its message, if busy)."""
        if self.by_fd.pop(w.end.fileno(), None) is None:
            return
        if w in self.idle:
            self.idle.remove(w)
        w.end.close()

    def gone(self, w: Worker) -> None:
        """w has died or broken its socket: its message, if any, is over."""
        self.retire(w)
        self._uncount(w)

    def expire(self, now: float) -> None:
        """Retire the workers idle for the idle time."""
        while self.idle and now - self.idle[0].since >= self.idle_seconds:
            self.retire(self.idle[0])

    def read(self, ready: list[int], now: float) -> None:
        """Read the ends in ready: DONE or a worker gone."""
        for fd in ready:
            w = self.by_fd.get(fd)
            if w is None:
                continue
            try:
                data = w.end.recv(16)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data == DONE and w.uid is not None:
                self.done(w, now)
            else:
                self.gone(w)  # died (b""), or said what it must not: not to be trusted with another message

    def reap(self) -> None:
        """Collect every worker that has ended."""
        for pid, _ in workers.reaped():
            w = self.by_pid.pop(pid, None)
            if w is not None:
                self.gone(w)

    def close_all(self) -> None:
        """Retire every worker (the server stops serving); those busy finish their message first."""
        for w in list(self.by_fd.values()):
            self.retire(w)

    def close_inherited(self) -> None:
        """In a new worker: close the server's ends of the other workers, which are not its own."""
        for w in self.by_fd.values():
            w.end.close()


class _Flags:
    stop = False  # TERM: stop for good
    give_way = False  # USR1 (from a child answering a stop request): a -p server waits again
    scan = True


class _Server:
    """What one qmail-queued needs while it holds the lock."""

    def __init__(self, qmail_home: str, inst: _home.Install, q: _home.Account, gid: int, lock: int,
                 with_parent: bool, parent: int, flags: _Flags, workers: Workers, idle: float) -> None:
        self.workers = workers
        self.idle = idle
        self.qmail_home = qmail_home
        self.inst = inst
        self.q = q
        self.gid = gid
        self.lock = lock
        self.with_parent = with_parent
        self.parent = parent
        self.flags = flags
        self.sock_path = os.path.join(qmail_home, qmail_queue.SOCKET)

    def orphaned(self) -> bool:
        return self.with_parent and os.getppid() != self.parent

    def wait(self, first: bool) -> bool:
        """Wait (-p) or ask (standalone) for the lock; return False if this process is not to serve."""
        if first and _try_lock(self.lock):
            return True
        if not self.with_parent:
            return first and _take_over(self.lock, self.sock_path, time.monotonic() + TAKEOVER_SECONDS)
        # Another qmail-queued serves. Wait for it to go (a standalone one
        # stopped, or the -p one of a qmail-send that has just ended),
        # touching nothing meanwhile.
        while True:
            if self.flags.stop or self.orphaned():
                return False
            if not first:
                time.sleep(SCAN_INTERVAL)  # having given way: let the standalone one take the lock
            first = False
            self.workers.reap()  # workers of an earlier turn as holder
            if _try_lock(self.lock):
                return not self.orphaned()

    def serve(self) -> None:
        """Hold the socket and scan the maildrop until TERM, give-way or (-p) qmail-send's end."""
        # From here on this process alone touches the socket and the maildrop.
        _make_maildrop(self.qmail_home, self.q, self.gid)
        if os.geteuid() == 0:
            drop(Credentials(self.q.uid, self.gid))
        try:
            os.ftruncate(self.lock, 0)
            os.pwrite(self.lock, f"{os.getpid()}{' p' if self.with_parent else ''}\n".encode(), 0)
        except OSError as e:
            _say(f"warning: unable to write {LOCK}: {e.strerror}")
        try:
            os.unlink(self.sock_path)
        except FileNotFoundError:
            pass
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            old = os.umask(0)
            try:
                srv.bind(self.sock_path)
            finally:
                os.umask(old)
            os.chmod(self.sock_path, 0o666)
            srv.listen(64)
            srv.setblocking(False)
            self._loop(srv)
        finally:
            # Remove the socket while still holding the lock, so that clients
            # find no server (and use the maildrop) instead of a dead one.
            srv.close()
            try:
                os.unlink(self.sock_path)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    _say(f"warning: unable to remove {self.sock_path}: {e.strerror}")
            try:
                os.ftruncate(self.lock, 0)
            except OSError:
                pass  # the content is only a note for people; the lock itself is what counts
            fcntl.flock(self.lock, fcntl.LOCK_UN)

    def _loop(self, srv: socket.socket) -> None:
        flags = self.flags
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        old_wake = signal.set_wakeup_fd(wake_w)
        pickup = Pickup(self.qmail_home, self.inst, self.q.uid)
        workers = self.workers
        server_pid = os.getpid()
        next_scan = 0.0
        try:
            while not (flags.stop or flags.give_way or self.orphaned()):
                now = time.monotonic()
                if flags.scan or now >= next_scan:
                    flags.scan = False
                    pickup.scan()
                    now = time.monotonic()
                    next_scan = now + SCAN_INTERVAL
                workers.expire(now)
                try:
                    ready, _, _ = select.select([srv.fileno(), wake_r, *workers.by_fd], [], [],
                                                max(0.0, next_scan - now))
                except InterruptedError:
                    continue
                if workers.by_fd:
                    workers.read(ready, time.monotonic())
                if wake_r in ready:
                    try:
                        os.read(wake_r, 512)
                    except BlockingIOError:
                        pass  # safe: another signal's byte was read already
                    workers.reap()
                if srv.fileno() not in ready:
                    continue
                try:
                    conn, _ = srv.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
                try:
                    _, uid, _ = peer_credentials(conn)
                except OSError:
                    conn.close()
                    continue
                if workers.full(uid):
                    # Closed before the descriptors are taken: the kernel drops
                    # them unread, and the client writes the maildrop itself.
                    conn.close()
                    continue
                conn.setblocking(True)
                try:
                    self._hand_over(conn, uid, srv, wake_r, wake_w, server_pid)
                finally:
                    conn.close()
        finally:
            workers.close_all()
            signal.set_wakeup_fd(old_wake)
            os.close(wake_r)
            os.close(wake_w)

    def _hand_over(self, conn: socket.socket, uid: int, srv: socket.socket, wake_r: int, wake_w: int,
                   server_pid: int) -> None:
        """Give conn to an idle worker, or to a new one; if none takes it, the client finds it closed (maildrop)."""
        workers = self.workers
        while True:
            w = workers.take()
            fresh = w is None
            if w is None:
                try:
                    w = self._fork(conn, srv, wake_r, wake_w, server_pid)
                except OSError as e:
                    _say(f"warning: unable to fork a worker: {e.strerror}")
                    return  # unacknowledged: the client writes the maildrop
            try:
                socket.send_fds(w.end, [JOB], [conn.fileno()])
            except OSError:
                workers.gone(w)  # it died idle, its end not read yet: the next one
                if fresh:
                    return
                continue
            workers.busy(w, uid)
            return

    def _fork(self, conn: socket.socket, srv: socket.socket, wake_r: int, wake_w: int, server_pid: int) -> Worker:
        """Fork a worker; return it as the server sees it. Raise OSError."""
        pid, mine, theirs = workers.fork_pair(
            lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC))
        if pid == 0:
            code = EXIT_FAIL
            try:
                # Nothing of the server's stays open here: its socket, the connection
                # (it comes again over theirs, as every later one does), the other
                # workers' ends, the lock (the server's alone) and the wake-up pipe.
                srv.close()
                conn.close()
                mine.close()
                self.workers.close_inherited()
                os.close(self.lock)
                signal.set_wakeup_fd(-1)
                os.close(wake_r)
                os.close(wake_w)
                for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGUSR1):
                    signal.signal(signum, signal.SIG_DFL)
                from pyqmail.proctitle import set_title

                set_title(WORKER_COMM, ["qmail-queued", "worker"])
                code = work(theirs, self.qmail_home, self.inst, server_pid, stoppable=self.with_parent,
                            idle=self.idle)
            finally:
                os._exit(code)
        theirs.close()
        return self.workers.add(pid, mine, time.monotonic())


@program("qmail-queued", crash=EXIT_FAIL)
def main(argv: list[str]) -> int:
    """Serve queue requests of local users and the maildrop until TERM (or, with -p, qmail-send's end)."""
    qmail_home = _home.home()
    inst = _home.install()
    q = inst.users.get("qmailq")
    if inst.single or q is None:
        _say("fatal: this installation is single-user; qmail-queue writes the queue itself")
        return EXIT_FAIL
    gid = inst.groups.get("qmail", q.gid)
    with_parent = False
    per_uid = PER_UID
    serving_max = SERVING_MAX
    idle = IDLE_SECONDS
    messages = WORKER_MESSAGES
    worker_idle = WORKER_IDLE
    opts = Getopt(argv, "pc:m:t:n:w:")
    while (opt := opts.next()) is not None:
        try:
            if opt == "p":
                with_parent = True
            elif opt == "c":
                per_uid = int(opts.optarg or "")
            elif opt == "m":
                serving_max = int(opts.optarg or "")
            elif opt == "t":
                idle = float(opts.optarg or "")
            elif opt == "n":
                messages = int(opts.optarg or "")
            elif opt == "w":
                worker_idle = float(opts.optarg or "")
            else:
                raise ValueError
        except ValueError:
            opt = "?"
        if opt == "?" or per_uid < 1 or serving_max < 1 or not 0 < idle < 10**9 or messages < 1 or not 0 <= worker_idle < 10**9:
            _say("usage: qmail-queued [-p] [-c N] [-m N] [-t SECONDS] [-n N] [-w SECONDS]")
            return EXIT_FAIL
    parent = os.getppid()
    if os.geteuid() != 0 and os.getuid() != q.uid:
        _say("fatal: must run as root or qmailq")
        return EXIT_FAIL
    os.umask(0o033)
    from pyqmail.inject import served

    served.preload()  # the workers, forked later, have qmail-inject's code loaded (issue 17.3)
    flags = _Flags()

    def on_term(signum: int, frame: object) -> None:
        flags.stop = True

    def on_usr1(signum: int, frame: object) -> None:
        flags.give_way = with_parent

    def on_alrm(signum: int, frame: object) -> None:
        flags.scan = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGALRM, on_alrm)
    signal.signal(signal.SIGCHLD, _on_child)
    try:
        lock = _open_lock(os.path.join(qmail_home, LOCK), q, gid)
    except OSError as e:
        _say(f"fatal: unable to open {LOCK}: {e.strerror}")
        return EXIT_FAIL
    server = _Server(qmail_home, inst, q, gid, lock, with_parent, parent, flags, Workers(per_uid, messages, worker_idle, serving_max), idle)
    try:
        first = True
        while server.wait(first):
            first = False
            server.serve()
            if not flags.give_way:
                return 0
            flags.give_way = False  # a standalone qmail-queued took over: wait for it to stop
        if first and not with_parent:
            _say("fatal: qmail-queued is already running")
            return EXIT_FAIL
        return 0
    finally:
        os.close(lock)
