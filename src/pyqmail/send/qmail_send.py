"""qmail-send: deliver mail messages from the queue (qmail-send(8), INTERNALS.md).

One single-threaded select loop, as qmail's. Each turn it writes pending
commands to qmail-lspawn (descriptor 1) and qmail-rspawn (3), reads their
reports (2, 4) and qmail-clean's answers (6), starts the deliveries that are
due, preprocesses messages of todo/ (rewriting recipients into info/N,
local/N, remote/N, then asking qmail-clean, on 5, to remove todo/N), finishes
messages whose recipients are all done (bounce, then info/N, then mess/N) and
cleans up what a crash left behind. The activity record of qmail-log(5) goes
to descriptor 0, a whole line per write.

Where qmail does one thing per turn and waits, this loop does a few: up to
TODO_BATCH messages of todo/ are preprocessed per turn; requests to
qmail-clean are pipelined instead of waited for one by one; the marks of the
reports read in one turn are fsync'd together.

Kept messages (issue 17): a preprocessed message is delivered at once while
todo/N stays, the durable record of the message, and info/N, local/N and
remote/N are not fsync'd. If it is finished within KEEP_SECONDS, todo/N is
removed first and then the rest, as qmail removes a finished message: no
fsync at all on this side. Otherwise (a deferral, KEEP_SECONDS passed, more
than KEEP_MAX kept, or exit) it is committed as qmail commits preprocessing:
its files are fsync'd, then todo/N removed. A crash while it is kept leaves
todo/N, and the next qmail-send preprocesses it again, as after a crash in
qmail's preprocessing (INTERNALS.md): its recipients may be delivered twice,
never lost, and a qmail-send of C taking the queue over does the same.

With qmail-todo (ext-todo: qmail-start runs it and hands qmail-send its
pipes on descriptors 7 and 8), todo/ is qmail-todo's: it preprocesses, and
qmail-send writes its log lines, schedules what it reports (D: committed, K:
kept, then committed or finished here as above, and G said back once todo/N
is gone), tells it H and X, and exits once it has gone; a qmail-todo lost is
qmail-send's end, as a spawner lost. Without descriptors 7 and 8 qmail-send
scans todo/ itself, as qmail 1.03's.

Signals are handled in one place, the top of the loop: TERM stops new work
and exits once running deliveries have reported; ALRM makes every recipient
due now; HUP rereads locals and virtualdomains. Time comes from a clock
object, so tests replace it; schedule.py, bounce.py and log.py hold the
decisions and texts.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import heapq
import os
import select
import stat
import time

from pyqmail import control, durable, smtputf8
from pyqmail import home as _home
from pyqmail import sig as signal
from pyqmail.entry import program
from pyqmail.queue import layout
from pyqmail.queue.qmail_queue import date822
from pyqmail.queue.qq import QQ
from pyqmail.send import bounce, log, schedule, spawnproto, todoproto
from pyqmail.send.schedule import CHANNELS, LOCAL, REMOTE

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Iterator

FD_LOG = 0
CHANFDOUT = (1, 3)
CHANFDIN = (2, 4)
FD_TOCLEAN = 5
FD_FROMCLEAN = 6
FD_FROMTODO = 7  # qmail-todo's records, when qmail-start runs one (ext-todo)
FD_TOTODO = 8  # commands to qmail-todo
CHANDIR = ("local", "remote")

SLEEP_TODO = 1500  # scan todo/ at least this often, trigger or not
SLEEP_FUZZ = 1  # slop on sleeps, against the Zeno effect
SLEEP_FOREVER = 86400  # the longest select()
SLEEP_CLEANUP = 76431  # between two cleanup passes over mess/
SLEEP_SYSFAIL = 123  # before retrying after a failed system call
SLEEP_ALERT = 10  # after an alert: a full disk, an unreadable directory
OSSIFIED = 129600  # 36 hours: must exceed qmail-queue's 24-hour suicide timer
CLEAN_INFLIGHT = 256  # qmail-clean requests sent and not yet answered, at most
TODO_BATCH = 16  # messages of todo/ preprocessed per turn: their fsyncs share a journal commit
KEEP_SECONDS = 5  # a kept message not finished by then is committed (its files fsync'd, todo/N removed)
KEEP_MAX = 2048  # messages kept at once, at most; more are committed at once, as before (docs/DESIGN.md: KEEP_MAX)
KEPT_FOREVER = 1 << 62  # a kept message whose todo/N removal is under way: no commit due
DONE_BATCH = 16  # finished messages eliminated per turn
RECORD_MAX = 1 << 20  # bytes of one envelope record read (qmail-queue writes at most 1004)
EXIT_TEMPORARY = 111


class Controls:
    """What qmail-send reads from QMAILHOME/control at start."""

    __slots__ = ("lifetime", "concurrency", "bouncefrom", "bouncehost", "doublebounceto", "rewriter")

    def __init__(self, lifetime: int, concurrency: list[int], bouncefrom: bytes, bouncehost: bytes,
                 doublebounceto: bytes, rewriter: schedule.Rewriter) -> None:
        self.lifetime = lifetime
        self.concurrency = concurrency
        self.bouncefrom = bouncefrom
        self.bouncehost = bouncehost
        self.doublebounceto = doublebounceto
        self.rewriter = rewriter


def _b(s: str) -> bytes:
    return s.encode(control.ENCODING)


def _lines(name: str, flag_me: bool = False) -> list[bytes] | None:
    found = control.read_lines(name, flag_me=flag_me)
    return None if found is None else [_b(x) for x in found]


def read_controls() -> Controls | None:
    """Read the control files in the current home; None if they cannot be read or locals has no default."""
    try:
        lifetime = control.read_int("queuelifetime", schedule.DEFAULT_LIFETIME)
        concurrency = [control.read_int("concurrencylocal", schedule.DEFAULT_CONCURRENCY[LOCAL]),
                       control.read_int("concurrencyremote", schedule.DEFAULT_CONCURRENCY[REMOTE])]
        envnoathost = control.read_default("envnoathost", "envnoathost") or ""
        bouncefrom = control.read_default("bouncefrom", "MAILER-DAEMON", flag_me=False) or ""
        bouncehost = control.read_default("bouncehost", "bouncehost") or ""
        dbhost = control.read_default("doublebouncehost", "doublebouncehost") or ""
        dbto = control.read_default("doublebounceto", "postmaster", flag_me=False) or ""
        locals_ = _lines("locals", flag_me=True)
        if locals_ is None:
            return None
        rewriter = schedule.Rewriter(_b(envnoathost), locals_, _lines("percenthack") or [],
                                     _lines("virtualdomains") or [], _lines("recipientmap") or [])
    except control.ControlError:
        return None
    return Controls(lifetime, concurrency, _b(bouncefrom), _b(bouncehost), _b(dbto) + b"@" + _b(dbhost), rewriter)


def _stat(path: str) -> os.stat_result | None:
    """Return the stat of path, None if it does not exist; raise OSError on any other error."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _records(fd: int) -> Iterator[tuple[int, bytes]]:
    """Yield (offset, record) for every NUL-terminated record on fd; a last unterminated one is dropped.

    Raise OSError on a read error or a record longer than RECORD_MAX.
    """
    buf = b""
    base = 0  # file offset of buf[0]
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        buf += chunk
        start = 0
        while True:
            end = buf.find(b"\0", start)
            if end == -1:
                break
            yield base + start, buf[start:end]
            start = end + 1
        base += start
        buf = buf[start:]
        if len(buf) > RECORD_MAX:
            raise OSError(errno.E2BIG, "envelope record too long")


def _envelope(fd: int) -> list[bytes] | None:
    """Return the records of the envelope todo/N on fd; None if it is torn.

    Torn: empty, its last record without its NUL, ending in an empty record
    (zeros where the data never reached the disk), or without an F record.
    qmail-queue never writes such a file; a power failure can leave one in
    todo/ for a message whose qmail-queue had not yet made its one envelope
    fsync, after the todo link, so never acknowledged (pyqmail.queue.qmail_queue).
    Raise OSError on a read error or a record longer than RECORD_MAX.
    """
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    recs = b"".join(chunks).split(b"\0")
    if recs.pop() or not recs or not recs[-1]:
        return None
    if max(map(len, recs)) > RECORD_MAX:
        raise OSError(errno.E2BIG, "envelope record too long")
    if not any(r[:1] == b"F" for r in recs):
        return None
    return recs


class Job:
    """One pass over one message's recipient list in one channel, and its deliveries."""

    __slots__ = ("refs", "id", "channel", "retry", "sender", "numtodo", "hiteof", "dying", "fd")

    def __init__(self) -> None:
        self.fd = -1  # the recipient list, open for reading and marking while the job lives
        self.refs = 0  # 0: this slot is free
        self.id = 0
        self.channel = 0
        self.retry = 0
        self.sender = b""
        self.numtodo = 0
        self.hiteof = False
        self.dying = False


class Delivery:
    """A delivery slot of one channel: the job, the delivery number, where to mark it done, the recipient."""

    __slots__ = ("job", "delid", "mpos", "recip")

    def __init__(self, job: Job, delid: int, mpos: int, recip: bytes) -> None:
        self.job = job
        self.delid = delid
        self.mpos = mpos
        self.recip = recip


class Pass:
    """The recipient list being read in one channel."""

    __slots__ = ("id", "job", "fd", "records", "fn")

    def __init__(self) -> None:
        self.id = 0  # 0: no pass under way
        self.job: Job | None = None
        self.fd = -1
        self.records: Iterator[tuple[int, bytes]] | None = None
        self.fn = ""


class Prepared:
    """A message of todo/ whose info/N and recipient lists are written but not yet committed."""

    __slots__ = ("messid", "files", "channels")

    def __init__(self, messid: int) -> None:
        self.messid = messid
        self.files: list[tuple[int, str]] = []  # (descriptor, name): info/N first
        self.channels: tuple[int, ...] = ()

    def add(self, fd: int, fn: str) -> None:
        self.files.append((fd, fn))

    def close(self) -> None:
        for fd, _ in self.files:
            if fd >= 0:
                os.close(fd)
        self.files = [(-1, fn) for _, fn in self.files]


class Send:
    """qmail-send's state and loop. Runs in QMAILHOME/queue; time comes from clock()."""

    def __init__(self, controls: Controls, split: int, clock: Callable[[], int],
                 sleep: Callable[[float], None] = time.sleep, spawn_max: tuple[int, int] = (255, 255),
                 fds: tuple[int, tuple[int, int], tuple[int, int], int, int] | None = None) -> None:
        # Descriptors: log, commands to the spawners, their reports, to and from qmail-clean.
        self.fd_log, self.chanout, self.chanin, self.fd_toclean, self.fd_fromclean = (
            fds or (FD_LOG, CHANFDOUT, CHANFDIN, FD_TOCLEAN, FD_FROMCLEAN))
        self.c = controls
        self.split = split
        self.clock = clock
        self.sleep = sleep
        self.concurrency = [min(controls.concurrency[ch], spawn_max[ch]) for ch in CHANNELS]
        self.used = [0, 0]
        self.alive = [True, True]
        self.exitasap = False
        self.runasap = False
        self.readasap = False
        self.recent = clock()
        self.masterdelid = 1
        self.dels: list[list[Delivery | None]] = [[None] * n for n in self.concurrency]
        self.jobs = [Job() for _ in range(sum(self.concurrency))]
        self.free_jobs = len(self.jobs)
        self.passes = [Pass(), Pass()]
        self.pqchan: list[list[tuple[int, int, int]]] = [[], []]
        self.pqdone: list[tuple[int, int, int]] = []
        self.pqfail: list[tuple[int, int, int]] = []
        self._seq = 0
        self.comm = [bytearray(), bytearray()]
        self.reports = [spawnproto.ReportReader(), spawnproto.ReportReader()]
        self.trigger = -1
        self.tododir: Generator[int, None, None] | None = None
        self.nexttodorun = 0
        self.cleanupdir: Iterator[int] | None = None
        self.cleanuptime = 0
        self.wake = -1
        self.clean_alive = True
        # (kind, N, channels): channels None for the todo/N of a kept message (already scheduled).
        self.clean_pending: collections.deque[tuple[str, int, tuple[int, ...] | None]] = collections.deque()
        self.cleaning_todo: set[int] = set()  # preprocessed, todo/N not yet removed
        self.torn: set[int] = set()  # torn envelopes whose todo/N is being removed (then the rest: foop)
        self.kept: dict[int, int] = {}  # kept messages (todo/N is their record): N -> when to commit
        self.unsynced: dict[int, str] = {}  # recipient lists marked, to fsync before going on
        self.closing: list[int] = []  # recipient lists of ended jobs, to close once synced
        # qmail-todo (ext-todo), when qmail-start runs one: todo/ is its business then.
        self.todo_in = -1  # its records (todoproto)
        self.todo_out = -1  # commands to it
        self.todo_buf = bytearray()
        self.todo_records = todoproto.Records()
        self.todo_alive = False
        self.todo_stopping = False

    def attach_todo(self, fd_in: int, fd_out: int) -> None:
        """Leave todo/ to the qmail-todo at the other end of fd_in (its records) and fd_out (commands)."""
        self.todo_in, self.todo_out = fd_in, fd_out
        try:
            fl = fcntl.fcntl(fd_out, fcntl.F_GETFL)
            fcntl.fcntl(fd_out, fcntl.F_SETFL, fl | os.O_NONBLOCK)
        except OSError:
            self.tododied()
            return
        self.todo_alive = True

    @property
    def external_todo(self) -> bool:
        return self.todo_in != -1

    # Names in the queue ------------------------------------------------------------

    def fn_split(self, kind: str, messid: int) -> str:
        return f"{kind}/{messid % self.split}/{messid}"

    # The log -----------------------------------------------------------------------

    def log(self, line: bytes) -> None:
        """Write one line of the activity record; a dead logger is not qmail-send's problem."""
        view = memoryview(line)
        while view:
            try:
                n = os.write(self.fd_log, view)
            except InterruptedError:
                continue
            except OSError:
                return
            view = view[n:]

    def status(self) -> None:
        self.log(log.status(self.used, self.concurrency, self.exitasap))

    def pause(self, line: bytes) -> None:
        """Log an alert and sleep before trying again."""
        self.log(line)
        self.sleep(SLEEP_ALERT)

    # Priority queues ---------------------------------------------------------------

    def _push(self, pq: list[tuple[int, int, int]], dt: int, messid: int) -> None:
        self._seq += 1
        heapq.heappush(pq, (dt, self._seq, messid))

    def pqadd(self, messid: int) -> None:
        """Schedule a preprocessed message found at start (or after a stat failure)."""
        fn = self.fn_split("info", messid)
        try:
            if _stat(fn) is None:
                return  # someone yanking our chain
            fn = f"todo/{messid}"
            if self.todo_exists(messid):
                return  # preprocessing was interrupted: the todo scan redoes it
            found = []
            for c in CHANNELS:
                fn = self.fn_split(CHANDIR[c], messid)
                st = _stat(fn)
                if st is not None:
                    found.append((c, int(st.st_mtime)))
        except OSError:
            self.log(log.unable(b"stat", fn.encode(), later=True))
            self._push(self.pqfail, self.clock() + SLEEP_SYSFAIL, messid)
            return
        for c, dt in found:
            self._push(self.pqchan[c], dt, messid)
        if not found:
            self._push(self.pqdone, self.clock(), messid)

    def pqstart(self) -> None:
        """Schedule every preprocessed message in the queue."""
        for messid in self._subdir_ids("info"):
            self.pqadd(messid)

    def pqfinish(self) -> None:
        """Record each waiting recipient list's next retry time as its mtime."""
        for c in CHANNELS:
            while self.pqchan[c]:
                dt, _, messid = heapq.heappop(self.pqchan[c])
                fn = self.fn_split(CHANDIR[c], messid)
                try:
                    os.utime(fn, (dt, dt))
                except OSError:
                    self.log(log.utime_trouble(fn.encode()))

    def pqrun(self) -> None:
        """Make every waiting recipient list due now (SIGALRM)."""
        for c in CHANNELS:
            self.pqchan[c] = [(self.recent, seq, messid) for _, seq, messid in self.pqchan[c]]
            heapq.heapify(self.pqchan[c])

    def _subdir_ids(self, kind: str) -> Iterator[int]:
        """Yield the message numbers in every split subdirectory of kind, pausing while one cannot be read."""
        for i in range(self.split):
            name = f"{kind}/{i}"
            while True:
                try:
                    names = os.listdir(name)
                    break
                except OSError:
                    self.pause(log.opendir(name.encode()))
            for n in names:
                if n.isdigit() and n.isascii():
                    yield int(n)

    # Talking to qmail-clean -----------------------------------------------------------

    def clean(self, kind: str, messid: int, channels: tuple[int, ...] | None = ()) -> None:
        """Ask qmail-clean to remove kind/N; its answer is handled by clean_answer() when it comes.

        qmail-clean answers in order, so requests are pipelined rather than
        waited for one by one (qmail waits): qmail-clean unlinks while
        qmail-send goes on. channels: for 'todo', where message N goes next
        (None: nowhere, a kept message is scheduled already).
        """
        if not self.clean_alive:
            self.cleandied()
            return
        if kind == "foop" and self.todo_buf:
            # qmail-todo must have every G before a mess/N goes: once it has, a
            # todo/N of a kept message's number is a new message (qmail-todo's is_kept).
            self.todo_flush_all()
        try:
            durable.write_all(self.fd_toclean, spawnproto.clean_command(kind, messid))
        except OSError:
            self.cleandied()
            return
        self.clean_pending.append((kind, messid, channels))
        if kind == "todo":
            self.cleaning_todo.add(messid)
        while len(self.clean_pending) > CLEAN_INFLIGHT and self.clean_alive:
            self.clean_answers(block=True)

    def cleandied(self) -> None:
        self.log(log.LOST_CLEAN)
        self.clean_alive = False
        self.exitasap = True

    def clean_answers(self, block: bool = False) -> None:
        """Read and act on qmail-clean's answers that have come (with block, wait for one at least)."""
        if not self.clean_pending:
            return
        while True:
            try:
                data = os.read(self.fd_fromclean, len(self.clean_pending)) if block else \
                    _read_ready(self.fd_fromclean, len(self.clean_pending))
                break
            except InterruptedError:
                continue
            except OSError:
                data = b""
                break
        if data is None:
            return
        if not data:
            self.clean_pending.clear()
            self.cleaning_todo.clear()
            self.cleandied()
            return
        torn = []
        for answer in data:
            kind, messid, channels = self.clean_pending.popleft()
            if kind == "todo":
                self.cleaning_todo.discard(messid)
                if messid in self.torn:
                    self.torn.discard(messid)
                    if answer == spawnproto.CLEAN_DONE[0]:
                        torn.append(messid)
                    else:
                        self.log(log.clean_trouble(f"{kind}/{messid}".encode()))  # todo/N stays: found again
                    continue
            if answer != spawnproto.CLEAN_DONE[0]:
                self.log(log.clean_trouble(f"{kind}/{messid}".encode()))
                if kind == "todo" and channels is None and messid in self.kept:
                    # Still kept: committed again later, or finished when messdone tries again.
                    self.kept[messid] = self.clock() + SLEEP_SYSFAIL
                continue
            if kind == "todo" and channels is None:
                # A kept message's todo/N is gone: committed, or finished (messdone goes on).
                self.kept.pop(messid, None)
                if self.external_todo:
                    self.todo_say(todoproto.gone(messid))  # a todo/N of this number is a new message now
            elif kind == "todo" and channels is not None:
                self.preprocessed(messid, channels)
        for messid in torn:
            self.clean("foop", messid)  # intd/N and mess/N: nothing is left of the torn message

    def preprocessed(self, messid: int, channels: tuple[int, ...]) -> None:
        """S5: message N is preprocessed and committed. Deliver at once."""
        now = self.clock()
        for c in channels:
            self._push(self.pqchan[c], now, messid)
        if not channels:
            self._push(self.pqdone, now, messid)

    # Talking to qmail-todo -----------------------------------------------------------

    def tododied(self) -> None:
        if not self.todo_stopping:
            self.log(log.LOST_TODO)
        self.todo_alive = False
        self.exitasap = True

    def todo_say(self, data: bytes) -> None:
        if self.todo_alive:
            self.todo_buf += data
            self.todo_flush()

    def todo_flush(self) -> None:
        while self.todo_buf and self.todo_alive:
            try:
                n = os.write(self.todo_out, self.todo_buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.tododied()
                return
            del self.todo_buf[:n]

    def todo_flush_all(self) -> None:
        """Write everything qmail-todo has yet to hear, waiting for it (it reads its commands every turn)."""
        while self.todo_buf and self.todo_alive:
            try:
                select.select([], [self.todo_out], [], 1)
            except InterruptedError:
                continue
            self.todo_flush()

    def todo_answers(self) -> None:
        """Read and act on qmail-todo's records: log lines, preprocessed messages, its exit."""
        try:
            data = os.read(self.todo_in, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.tododied()
            return
        try:
            for rec in self.todo_records.feed(data):
                kind = rec[:1]
                if kind == b"L":
                    self.log(rec[1:])
                elif kind in (b"D", b"K") and len(rec) > 2 and rec[2:].isdigit():
                    channels = todoproto.channels_of(rec[1])
                    if channels is None:
                        self.log(log.TODO_DIALECT)
                    elif kind == b"D":
                        self.preprocessed(int(rec[2:]), channels)
                    else:
                        self.keep_scheduled(int(rec[2:]), channels)
                elif rec == b"X":
                    self.todo_stopping = True
                else:
                    self.log(log.TODO_DIALECT)
        except ValueError:
            self.log(log.TODO_DIALECT)
            self.tododied()

    # Talking to the spawners ---------------------------------------------------------

    def spawndied(self, c: int) -> None:
        self.log(log.LOST_SPAWN)
        self.alive[c] = False
        self.exitasap = True

    def comm_canwrite(self, c: int) -> bool:
        return not self.comm[c]

    def comm_flush(self, c: int) -> None:
        """Write what the spawner of channel c can take now."""
        buf = self.comm[c]
        while buf and self.alive[c]:
            try:
                n = os.write(self.chanout[c], buf)
            except (BlockingIOError, InterruptedError):
                return
            except BrokenPipeError:
                self.spawndied(c)
                return
            except OSError:
                return  # as qmail: an odd error is retried when select says writable
            del buf[:n]

    def del_avail(self, c: int) -> bool:
        return self.alive[c] and self.comm_canwrite(c) and self.used[c] < self.concurrency[c]

    def del_canexit(self) -> bool:
        return all(not self.alive[c] or not self.used[c] for c in CHANNELS)

    def del_start(self, job: Job, mpos: int, recip: bytes) -> None:
        """Start delivering job's message to recip, whose record is at mpos."""
        c = job.channel
        if not self.alive[c] or not self.comm_canwrite(c):
            return
        slots = self.dels[c]
        try:
            i = slots.index(None)
        except ValueError:
            return
        delid = self.masterdelid
        self.masterdelid += 1
        slots[i] = Delivery(job, delid, mpos, recip)
        job.refs += 1
        self.used[c] += 1
        messid = f"{job.id % self.split}/{job.id}".encode()
        self.comm[c] += spawnproto.command(i, messid, schedule.verp_sender(job.sender, recip), recip)
        self.comm_flush(c)
        self.log(log.starting(delid, job.id, c, recip))
        self.status()

    def markdone(self, job: Job, pos: int) -> None:
        """Mark job's recipient record at pos done ('T' becomes 'D'); sync_marks() makes it durable.

        A kept message's marks are not synced: until its todo/N goes, a crash
        delivers all of it again whatever they say (its commit syncs them).
        """
        try:
            os.pwrite(job.fd, b"D", pos)
        except OSError:
            self.log(log.trouble_marking(self.fn_split(CHANDIR[job.channel], job.id).encode()))
            return
        if job.id in self.kept and job.id not in self.cleaning_todo:
            return
        if job.fd not in self.unsynced:
            self.unsynced[job.fd] = self.fn_split(CHANDIR[job.channel], job.id)

    def sync_marks(self) -> None:
        """fsync the marks of the reports just read, together (beyond qmail: against delivering twice)."""
        for fd, fn in self.unsynced.items():
            try:
                durable.fsync(fd)
            except OSError:
                self.log(log.trouble_marking(fn.encode()))
        self.unsynced.clear()
        for fd in self.closing:
            os.close(fd)
        self.closing.clear()

    def addbounce(self, messid: int, recip: bytes, report: bytes) -> None:
        """Append a permanent failure to bounce/N; a full disk is waited out, never ignored."""
        text = bounce.paragraph(self.c.rewriter.strip_prepend(recip), report)
        fn = f"bounce/{messid}"
        while True:
            try:
                fd = os.open(fn, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                break
            except OSError:
                self.pause(log.BOUNCE_APPEND)
        try:
            view = memoryview(text)
            while view:
                try:
                    view = view[os.write(fd, view):]
                except OSError:
                    self.pause(log.BOUNCE_APPEND)
            # Beyond qmail: the note must be on disk before the recipient is marked done.
            while True:
                try:
                    durable.fsync(fd)
                    break
                except OSError:
                    self.pause(log.BOUNCE_APPEND)
        finally:
            os.close(fd)

    def del_dochan(self, c: int) -> None:
        """Read and act on the reports of channel c."""
        try:
            data = os.read(self.chanin[c], 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        if not data:
            self.spawndied(c)
            return
        for slot, report in self.reports[c].feed(data):
            d = self.dels[c][slot] if slot < self.concurrency[c] else None
            if d is None:
                self.log(log.REPORT_OUT_OF_RANGE)
                continue
            job = d.job
            if report[:1] == b"Z" and job.dying:
                report = b"D" + report[1:] + schedule.TOO_LONG
            letter, text = report[:1], report[1:]
            if letter == b"K":
                self.log(log.success(d.delid, text))
                self.markdone(job, d.mpos)
                job.numtodo -= 1
            elif letter == b"Z":
                self.log(log.deferral(d.delid, text))
                if job.id in self.kept and job.id not in self.cleaning_todo:
                    self.kept[job.id] = 0  # it will wait: commit it now
            elif letter == b"D":
                self.log(log.failure(d.delid, text))
                self.addbounce(job.id, d.recip, text)
                self.markdone(job, d.mpos)
                job.numtodo -= 1
            else:
                self.log(log.mangled(d.delid))
            self.job_close(job)
            self.dels[c][slot] = None
            self.used[c] -= 1
            self.status()
        self.sync_marks()

    # Jobs --------------------------------------------------------------------------

    def job_open(self, messid: int, c: int) -> Job:
        for job in self.jobs:
            if not job.refs:
                break
        else:
            raise RuntimeError("no free job")  # callers check job_avail first
        job.refs = 1
        job.id = messid
        job.channel = c
        job.numtodo = 0
        job.hiteof = False
        self.free_jobs -= 1
        return job

    def job_close(self, job: Job) -> None:
        job.refs -= 1
        if job.refs > 0:
            return
        self.free_jobs += 1
        if job.fd != -1:
            if job.fd in self.unsynced:
                self.closing.append(job.fd)
            else:
                os.close(job.fd)
            job.fd = -1
        dt = job.retry
        if job.hiteof and not job.numtodo:
            fn = self.fn_split(CHANDIR[job.channel], job.id)
            try:
                os.unlink(fn)
            except OSError:
                self.log(log.unable(b"unlink", fn.encode(), later=True))
                dt = self.clock() + SLEEP_SYSFAIL
            else:
                for other in CHANNELS:
                    if other == job.channel:
                        continue
                    fn = self.fn_split(CHANDIR[other], job.id)
                    try:
                        if _stat(fn) is not None:
                            return  # more channels going
                    except OSError:
                        self.log(log.unable(b"stat", fn.encode()))
                        break
                self._push(self.pqdone, self.clock(), job.id)
                return
        self._push(self.pqchan[job.channel], dt, job.id)

    # Passes over recipient lists ------------------------------------------------------

    def getinfo(self, messid: int) -> tuple[bytes, int] | None:
        """Return (sender, birth) from info/N, None if it cannot be read."""
        try:
            fd = os.open(self.fn_split("info", messid), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            for _, rec in _records(fd):
                if rec[:1] != b"F":
                    return None
                return rec[1:], int(st.st_mtime)
        except OSError:
            return None
        finally:
            os.close(fd)
        return None

    def pass_dochan(self, c: int) -> None:
        """Start the due deliveries of channel c, as many as it has room for."""
        if self.exitasap:
            return
        p = self.passes[c]
        if not p.id:
            if not self.free_jobs or not self.pqchan[c]:
                return
            dt, _, messid = self.pqchan[c][0]
            if dt > self.recent:
                return
            heapq.heappop(self.pqchan[c])
            fn = self.fn_split(CHANDIR[c], messid)
            try:
                # Open for marking too: one open per pass, not one per delivery.
                fd = os.open(fn, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                fd = -1
            info = self.getinfo(messid) if fd != -1 else None
            if info is None:
                if fd != -1:
                    os.close(fd)
                self.log(log.trouble(b"opening", fn.encode(), later=True))
                self._push(self.pqchan[c], self.recent + SLEEP_SYSFAIL, messid)
                return
            sender, birth = info
            opened = self.job_open(messid, c)
            opened.retry = schedule.next_retry(birth, self.recent, c)
            opened.dying = schedule.dying(birth, self.recent, self.c.lifetime)
            opened.sender = sender
            opened.fd = fd
            p.id, p.job, p.fd, p.fn, p.records = messid, opened, fd, fn, _records(fd)
        job = p.job
        assert job is not None and p.records is not None
        while self.del_avail(c):
            try:
                pos, rec = next(p.records)
            except StopIteration:
                job.hiteof = True
                self._end_pass(p)
                return
            except OSError:
                self.log(log.trouble(b"reading", p.fn.encode(), later=True))
                self._end_pass(p)
                return
            kind = rec[:1]
            if kind == b"T":
                job.numtodo += 1
                self.del_start(job, pos, rec[1:])
            elif kind != b"D":
                self.log(log.unknown_record(p.fn.encode(), bang=True))
                self._end_pass(p)
                return

    def _end_pass(self, p: Pass) -> None:
        job = p.job  # which owns the descriptor
        p.id, p.job, p.fd, p.records = 0, None, -1, None
        if job is not None:
            self.job_close(job)

    def messdone(self, messid: int) -> None:
        """Finish a message whose recipient lists are gone: bounce, info/N, mess/N."""
        try:
            for c in CHANNELS:
                fn = self.fn_split(CHANDIR[c], messid)
                if _stat(fn) is not None:
                    return  # false alarm
            if messid in self.kept:
                # Finished while kept: todo/N goes first, then the rest as for any
                # message. qmail-clean's answer is waited for, as qmail waits for
                # each of its requests, so that this turn finishes the message.
                if messid not in self.cleaning_todo:
                    self.kept[messid] = KEPT_FOREVER
                    self.clean("todo", messid, None)
                while messid in self.cleaning_todo and self.clean_alive:
                    self.clean_answers(block=True)
                if messid in self.kept:
                    self._push(self.pqdone, self.clock() + SLEEP_SYSFAIL, messid)
                    return
            fn = f"todo/{messid}"
            if self.todo_exists(messid):
                return
            fn = self.fn_split("info", messid)
            if _stat(fn) is None:
                return
        except OSError:
            self.log(log.unable(b"stat", fn.encode(), later=True))
            self._push(self.pqdone, self.clock() + SLEEP_SYSFAIL, messid)
            return
        if not self.injectbounce(messid):
            self._push(self.pqdone, self.clock() + SLEEP_SYSFAIL, messid)
            return
        self.log(log.end_msg(messid))
        fn = self.fn_split("info", messid)
        try:
            os.unlink(fn)
        except OSError:
            self.log(log.unable(b"unlink", fn.encode(), later=True))
            self._push(self.pqdone, self.clock() + SLEEP_SYSFAIL, messid)
            return
        self.clean("foop", messid)

    def injectbounce(self, messid: int) -> bool:
        """Queue the bounce of message N if bounce/N exists and remove it; return False to try later."""
        bfn = f"bounce/{messid}"
        try:
            # qmail reads info/N first; without a bounce there is no need to.
            if _stat(bfn) is None:
                return True
        except OSError:
            self.log(log.unable(b"stat", bfn.encode()))
            return False
        info = self.getinfo(messid)
        if info is None:
            return False
        sender = bounce.vanilla_sender(info[0])
        if bounce.is_triple(sender):
            self.log(log.triple_bounce(bfn.encode()))
        else:
            bsender, brecip = bounce.envelope(sender, self.c.doublebounceto)
            # A bounce of an SMTPUTF8 message, or to a UTF-8 address, is itself SMTPUTF8 (RFC 6531).
            utf8 = not brecip.isascii() or self._info_utf8(messid)
            qq = QQ(env={**os.environ, smtputf8.ENV: "1"}) if utf8 else QQ()
            if qq.pid == -1:
                self.log(log.QQ_START)
                return False
            double = not sender
            qq.write(bounce.head(date822(self.clock()).encode(), self.c.bouncefrom, self.c.bouncehost,
                                 brecip, double, utf8))
            if not self._copy(bfn, qq):
                qq.fail()
            qq.write(bounce.middle(sender, double, utf8))
            if not self._copy(self.fn_split("mess", messid), qq):
                qq.fail()
            if qq.close(bsender, [brecip]):
                self.log(log.QQ_TROUBLE)
                return False
            self.log(log.bounce_msg(messid, qq.pid))
        try:
            os.unlink(bfn)
        except OSError:
            self.log(log.unable(b"unlink", bfn.encode()))
            return False
        return True

    def _info_utf8(self, messid: int) -> bool:
        """Return whether info/N flags message N SMTPUTF8 (its record after F; pyqmail.smtputf8)."""
        try:
            fd = os.open(self.fn_split("info", messid), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False  # getinfo() has just read it: gone now, the bounce goes as before
        try:
            return any(rec == smtputf8.INFO_RECORD for _, rec in _records(fd))
        except OSError:
            return False  # safe: the flag only chooses the bounce's headers and MAIL parameter
        finally:
            os.close(fd)

    @staticmethod
    def _copy(fn: str, qq: QQ) -> bool:
        """Write the file fn into qq; return False if it could not be read."""
        try:
            fd = os.open(fn, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return True
                qq.write(chunk)
        except OSError:
            return False
        finally:
            os.close(fd)

    def pass_do(self) -> None:
        for c in CHANNELS:
            self.pass_dochan(c)
        if self.pqfail and self.pqfail[0][0] <= self.recent:
            _, _, messid = heapq.heappop(self.pqfail)
            self.pqadd(messid)
        for _ in range(DONE_BATCH):
            if not self.pqdone or self.pqdone[0][0] > self.recent:
                break
            _, _, messid = heapq.heappop(self.pqdone)
            self.messdone(messid)

    def pass_wakeup(self, wakeup: int) -> int:
        if self.exitasap:
            return wakeup
        for c in CHANNELS:
            if self.passes[c].id and self.del_avail(c):
                return 0
        if self.free_jobs:
            for c in CHANNELS:
                if not self.passes[c].id and self.pqchan[c]:
                    wakeup = min(wakeup, self.pqchan[c][0][0])
        if self.pqfail:
            wakeup = min(wakeup, self.pqfail[0][0])
        if self.pqdone:
            wakeup = min(wakeup, self.pqdone[0][0])
        return wakeup

    # todo/: preprocessing ------------------------------------------------------------

    def trigger_set(self) -> None:
        """(Re)open lock/trigger, so that the next pull wakes the loop."""
        if self.trigger != -1:
            os.close(self.trigger)
        try:
            self.trigger = os.open(layout.TRIGGER, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self.trigger = -1

    def todo_do(self, pulled: bool) -> None:
        """Preprocess the next message of todo/, starting a scan when triggered or due."""
        if self.exitasap:
            return
        if self.tododir is None:
            if not pulled and self.recent < self.nexttodorun:
                return
            self.trigger_set()
            try:
                dirs = layout.todo_dirs(self.split)
            except OSError:
                self.pause(log.opendir(b"todo"))
                return
            self.tododir = self._todo_scan(dirs)
            self.nexttodorun = self.recent + SLEEP_TODO
        batch: list[Prepared] = []
        done = 0
        for messid in self.tododir:
            if messid not in self.cleaning_todo and not self.is_kept(messid):
                prepared = self.prepare(messid)
                if prepared is not None:
                    if len(self.kept) < KEEP_MAX:
                        self.keep(prepared)
                    else:
                        batch.append(prepared)
                done += 1
                if done >= TODO_BATCH:
                    break
        else:
            self.tododir = None
        self.commit(batch)

    def _todo_scan(self, dirs: list[str]) -> Generator[int, None, None]:
        """Yield the message numbers in todo/ and, in a big-todo queue, its subdirectories.

        An unreadable directory is logged and waited for, as qmail-send does
        for todo/; a subdirectory not there (a flat queue's) is skipped.
        """
        for d in dirs:
            while True:
                try:
                    it = os.scandir(d)
                    break
                except FileNotFoundError:
                    it = None
                    break
                except OSError:
                    self.pause(log.opendir(d.encode()))
            if it is None:
                continue
            with it:
                for entry in it:
                    name = entry.name
                    if not (name.isdigit() and name.isascii()):
                        continue
                    if d == "todo" and entry.is_dir(follow_symlinks=False):
                        continue  # a big-todo subdirectory, scanned in its turn
                    yield int(name)

    def todo_exists(self, messid: int) -> bool:
        """Return True if todo/N is in the queue (either place); raise OSError if that cannot be told."""
        return layout.find_todo(messid, self.split) is not None

    def is_kept(self, messid: int) -> bool:
        """Return True if message N is preprocessed and kept, its todo/N still its record."""
        return messid in self.kept

    def keep(self, p: Prepared) -> None:
        """Schedule a preprocessed message at once, todo/N kept as its durable record."""
        p.close()
        self.keep_scheduled(p.messid, p.channels)

    def keep_scheduled(self, messid: int, channels: tuple[int, ...]) -> None:
        """Keep message N (todo/N its record, committed later) and deliver it at once."""
        self.kept[messid] = self.recent + KEEP_SECONDS
        now = self.clock()
        for c in channels:
            self._push(self.pqchan[c], now, messid)
        if not channels:
            self._push(self.pqdone, now, messid)

    def kept_do(self, everything: bool = False) -> None:
        """Commit the kept messages that are due (with everything: all, at exit)."""
        due = [m for m, t in self.kept.items()
               if (everything or t <= self.recent) and m not in self.cleaning_todo]
        for messid in due:
            if self.commit_kept(messid):
                self.kept[messid] = KEPT_FOREVER
                self.clean("todo", messid, None)
                if not self.clean_alive:
                    return
            else:
                self.kept[messid] = self.recent + SLEEP_SYSFAIL

    def commit_kept(self, messid: int) -> bool:
        """fsync a kept message's info/N and recipient lists; return False (logged) on trouble.

        Their directory entries need no fsync of their own: the files are
        new, and on ext4 and xfs the fsync of a new file commits the journal
        transaction that created its name (as for qmail-queue's mess/ and intd/).
        """
        for kind in ("info", *CHANDIR):
            fn = self.fn_split(kind, messid)
            try:
                fd = os.open(fn, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                if kind == "info":
                    self.log(log.trouble(b"opening", fn.encode()))
                    return False
                continue  # no such recipients, or all of them done
            except OSError:
                self.log(log.trouble(b"opening", fn.encode()))
                return False
            try:
                durable.fsync(fd)
            except OSError:
                self.log(log.trouble(b"fsyncing", fn.encode()))
                return False
            finally:
                os.close(fd)
        return True

    def prepare(self, messid: int) -> Prepared | None:
        """Write info/N, local/N and remote/N from todo/N (not yet fsync'd); None on trouble, logged."""
        fd = -1
        for todo in layout.todo_names("todo", messid, self.split):
            try:
                fd = os.open(todo, os.O_RDONLY | os.O_CLOEXEC)
                if messid < self.split and stat.S_ISDIR(os.fstat(fd).st_mode):
                    os.close(fd)  # todo/D, a big-todo subdirectory, is not message D
                    fd = -1
                    continue
                break
            except (FileNotFoundError, NotADirectoryError):
                continue  # in the other place, or removed by qmail-clean since this scan listed it
            except OSError:
                self.log(log.unable(b"open", todo.encode()))
                return None
        if fd == -1:
            return None  # listed by this scan, removed by qmail-clean since: preprocessed already
        prepared = Prepared(messid)
        try:
            ok = self._prepare(prepared, fd)
        finally:
            os.close(fd)
        if ok is None:
            self.remove_torn(messid)
            return None
        if not ok:
            prepared.close()
            return None
        return prepared

    def remove_torn(self, messid: int) -> None:
        """Remove message N, whose todo/N holds a torn envelope: todo/N first, then intd/N and mess/N.

        Only a power failure leaves one (a message never acknowledged: _envelope).
        qmail-clean removes intd/N and todo/N, and once that is answered intd/N
        and mess/N (clean_answers), as qmail-queue's own failure leaves nothing;
        a crash between the two leaves mess/N for the 36-hour cleanup.
        """
        self.log(log.torn_envelope(f"todo/{messid}".encode()))
        self.torn.add(messid)
        self.clean("todo", messid, ())

    def _prepare(self, p: Prepared, fd: int) -> bool | None:
        """Write p's files from the envelope on fd; False on trouble (logged), None if the envelope is torn."""
        messid = p.messid
        mess = self.fn_split("mess", messid)
        try:
            size = os.stat(mess).st_size  # just for the statistics
        except OSError:
            self.log(log.unable(b"stat", mess.encode()))
            return False
        for fn in (self.fn_split("local", messid), self.fn_split("remote", messid), self.fn_split("info", messid)):
            try:
                os.unlink(fn)
            except FileNotFoundError:
                pass
            except OSError:
                self.log(log.unable(b"unlink", fn.encode()))
                return False
        try:
            records = _envelope(fd)
        except OSError:
            self.log(log.trouble(b"reading", f"todo/{messid}".encode()))
            return False
        if records is None:
            return None
        info_fn = self.fn_split("info", messid)
        try:
            p.add(durable.create_excl(info_fn), info_fn)
        except OSError:
            self.log(log.unable(b"create", info_fn.encode()))
            return False
        self.log(log.new_msg(messid))
        chan_fn = [self.fn_split(CHANDIR[c], messid) for c in CHANNELS]
        chan_at = [-1, -1]  # index of the channel's file in p.files
        bufs = [bytearray()]
        uid = pid = 0
        utf8 = False
        for rec in records:
            kind = rec[:1]
            if kind == b"u":
                uid = _scan_ulong(rec[1:])
                utf8 = smtputf8.FLAG in smtputf8.u_flags(rec[1:])
            elif kind == b"p":
                pid = _scan_ulong(rec[1:])
            elif kind == b"F":
                bufs[0] += rec + b"\0"
                if utf8:  # after F, where C's qmail-send and qmail-qread do not read
                    bufs[0] += smtputf8.INFO_RECORD + b"\0"
                self.log(log.info_msg(messid, size, rec[1:], pid, uid))
            elif kind == b"T":
                c, addr = self.c.rewriter.rewrite(rec[1:])
                if chan_at[c] == -1:
                    try:
                        p.add(durable.create_excl(chan_fn[c]), chan_fn[c])
                    except OSError:
                        self.log(log.unable(b"create", chan_fn[c].encode()))
                        return False
                    chan_at[c] = len(bufs)
                    bufs.append(bytearray())
                    p.channels += (c,)
                bufs[chan_at[c]] += b"T" + addr + b"\0"
            else:
                self.log(log.unknown_record(f"todo/{messid}".encode(), bang=False))
                return False
        for (out, fn), buf in zip(p.files, bufs):
            try:
                durable.write_all(out, buf)
            except OSError:
                self.log(log.trouble(b"writing to", fn.encode()))
                return False
        p.channels = tuple(sorted(p.channels))
        return True

    def commit(self, batch: list[Prepared]) -> None:
        """Make a batch of preprocessed messages durable, then have qmail-clean remove their todo/N.

        The files are fsync'd one after the other, so that they share the
        filesystem's journal commits. Their directories are not: the files are
        new, and on ext4 and xfs the fsync of a new file commits the journal
        transaction that created its name (beyond qmail: the new names are on
        disk before todo/N goes).
        """
        failed = False
        for p in batch:
            try:
                for out, fn in p.files:
                    try:
                        durable.fsync(out)
                    except OSError:
                        self.log(log.trouble(b"fsyncing", fn.encode()))
                        failed = True
                        break
                else:
                    self.clean("todo", p.messid, p.channels)
            finally:
                p.close()
        if failed:
            # todo/N stays (nothing was scheduled), so the next scan of todo/
            # preprocesses it again; make that scan come soon (qmail: at the
            # next trigger, or SLEEP_TODO later).
            self.nexttodorun = min(self.nexttodorun, self.recent + SLEEP_SYSFAIL)

    # Cleanups ------------------------------------------------------------------------

    def cleanup_do(self, budget: int = 50) -> None:
        """Remove messages a crash left in S2 or S3 for 36 hours, a few per turn."""
        if self.cleanupdir is None:
            if self.recent < self.cleanuptime:
                return
            self.cleanupdir = self._subdir_ids("mess")
        for _ in range(budget):
            try:
                messid = next(self.cleanupdir)
            except StopIteration:
                self.cleanupdir = None
                self.cleanuptime = self.recent + SLEEP_CLEANUP
                return
            try:
                st = _stat(self.fn_split("mess", messid))
                if st is None or self.recent <= st.st_atime + OSSIFIED:
                    continue
                if _stat(self.fn_split("info", messid)) is not None:
                    continue
                if self.todo_exists(messid):
                    continue
            except OSError:
                continue
            self.clean("foop", messid)
            if not self.clean_alive:
                return

    # Controls ------------------------------------------------------------------------

    def reread(self, qmail_home: str) -> None:
        """Reread locals and virtualdomains (SIGHUP); keep the old ones if they cannot be read."""
        try:
            os.chdir(qmail_home)
        except OSError:
            self.log(log.REREAD_HOME)
            return
        try:
            try:
                locals_ = _lines("locals", flag_me=True)
            except control.ControlError:
                locals_ = None
            if locals_ is None:
                self.log(log.REREAD_LOCALS)
                return
            try:
                vdoms = _lines("virtualdomains") or []
            except control.ControlError:
                self.log(log.REREAD_VDOMS)
                return
            self.c.rewriter.reread(locals_, vdoms)
        finally:
            while True:
                try:
                    os.chdir("queue")
                    break
                except OSError:
                    self.pause(log.SWITCH_BACK)

    # The loop ------------------------------------------------------------------------

    def start(self) -> None:
        """Prepare the loop: nonblocking spawner pipes, the queue's state, the first status line."""
        for c in CHANNELS:
            try:
                fl = fcntl.fcntl(self.chanout[c], fcntl.F_GETFL)
                fcntl.fcntl(self.chanout[c], fcntl.F_SETFL, fl | os.O_NONBLOCK)
            except OSError:
                self.spawndied(c)  # drastic, but better than risking deadlock
        self.pqstart()
        self.status()
        self.nexttodorun = self.clock()
        if not self.external_todo:
            self.trigger_set()  # qmail-todo, if there is one, listens to lock/trigger
        self.cleanuptime = self.clock()

    def step(self, max_wait: float | None = None, qmail_home: str = "") -> None:
        """Run one turn of the loop, waiting at most max_wait seconds (None: as long as due)."""
        self.recent = self.clock()
        if self.runasap:
            self.runasap = False
            self.pqrun()
        if self.readasap:
            self.readasap = False
            self.reread(qmail_home or _home.home())
            if self.external_todo:
                self.todo_say(todoproto.REREAD)  # qmail-todo rewrites the recipients
        if self.exitasap and self.todo_alive and not self.todo_stopping:
            self.todo_stopping = True
            self.todo_say(todoproto.STOP)
        wakeup = self.recent + SLEEP_FOREVER
        rfds: list[int] = []
        wfds: list[int] = []
        for c in CHANNELS:
            if self.alive[c]:
                rfds.append(self.chanin[c])
                if self.comm[c]:
                    wfds.append(self.chanout[c])
        wakeup = self.pass_wakeup(wakeup)
        if self.todo_alive:
            rfds.append(self.todo_in)
            if self.todo_buf:
                wfds.append(self.todo_out)
        if not self.exitasap and not self.external_todo:
            if self.trigger != -1:
                rfds.append(self.trigger)
            if self.tododir is not None:
                wakeup = 0
            wakeup = min(wakeup, self.nexttodorun)
        if self.cleanupdir is not None:
            wakeup = 0
        if self.kept:
            wakeup = min(wakeup, min(self.kept.values()))
        wakeup = min(wakeup, self.cleanuptime)
        if self.wake != -1:
            rfds.append(self.wake)
        if self.clean_pending and self.clean_alive:
            rfds.append(self.fd_fromclean)
        timeout: float = 0 if wakeup <= self.recent else wakeup - self.recent + SLEEP_FUZZ
        if max_wait is not None:
            timeout = min(timeout, max_wait)
        try:
            readable, writable, _ = select.select(rfds, wfds, [], timeout)
        except OSError:
            self.log(log.SELECT_TROUBLE)
            return
        self.recent = self.clock()
        if self.wake != -1 and self.wake in readable:
            _drain(self.wake)
        for c in CHANNELS:
            if self.chanout[c] in writable:
                self.comm_flush(c)
        for c in CHANNELS:
            if self.alive[c] and self.chanin[c] in readable:
                self.del_dochan(c)
        if self.fd_fromclean in readable:
            self.clean_answers()
        if self.todo_alive and self.todo_out in writable:
            self.todo_flush()
        if self.todo_alive and self.todo_in in readable:
            self.todo_answers()
        # Deliveries are started before new messages are preprocessed (qmail:
        # the other way round), so that a batch of todo/ never keeps an idle
        # spawner waiting.
        self.pass_do()
        self.kept_do()
        if not self.external_todo:
            self.todo_do(self.trigger != -1 and self.trigger in readable)
        self.cleanup_do()

    def done(self) -> bool:
        """Return True once TERM (or a lost daemon) has come and no delivery is running."""
        # With qmail-todo: once it has gone too, so that its last records are read.
        return self.exitasap and self.del_canexit() and not self.todo_alive

    def close(self) -> None:
        """Close the descriptors the loop holds (for a Send that lives inside another program)."""
        for fd in [self.trigger, *self.closing, *(job.fd for job in self.jobs)]:
            if fd != -1:
                os.close(fd)
        for job in self.jobs:
            job.fd = -1
        self.trigger = -1
        self.unsynced.clear()
        self.closing.clear()
        if self.tododir is not None:
            self.tododir.close()
            self.tododir = None

    def finish(self) -> None:
        """Commit the kept messages, hear qmail-clean out, save the retry times and say goodbye."""
        if self.clean_alive:
            self.kept_do(everything=True)
        while self.clean_pending and self.clean_alive:
            self.clean_answers(block=True)
        self.pqfinish()
        self.log(log.STATUS_EXITING)


def _scan_ulong(field: bytes) -> int:
    """Return the number the leading digits of field spell, wrapping as C's unsigned long."""
    # Unbounded, a u or p record of 5000 digits made the info line's %d raise
    # (Python's 4300-digit limit) and cost quadratic time.
    n = 0
    for c in field:
        if not 48 <= c <= 57:
            break
        n = (n * 10 + c - 48) & 0xFFFFFFFFFFFFFFFF
    return n


def _read_ready(fd: int, n: int) -> bytes | None:
    """Read up to n bytes from fd if it is readable now; None if it is not."""
    ready, _, _ = select.select([fd], [], [], 0)
    if not ready:
        return None
    return os.read(fd, n)


def _drain(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 4096):
                return
        except (BlockingIOError, InterruptedError):
            return


def _die(line: bytes) -> int:
    try:
        os.write(FD_LOG, line)
    except OSError:
        pass  # safe: the logger is gone; the exit code says temporary
    return EXIT_TEMPORARY


def _read_spawn_max(fd: int) -> int | None:
    while True:
        try:
            data = os.read(fd, 1)
            return data[0] if data else None
        except InterruptedError:
            continue
        except OSError:
            return None


def _is_pipe(fd: int) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


def _log_crash(reason: str) -> None:
    os.write(FD_LOG, b"alert: " + reason.encode("utf-8", "backslashreplace") + b"\n")


def _clock() -> int:
    return int(time.time())


@program("qmail-send", crash=EXIT_TEMPORARY, on_crash=_log_crash)
def main(argv: list[str]) -> int:
    """Deliver the queue until TERM; return 0, or 111 if qmail-send cannot start."""
    # Before this process opens anything that could take descriptors 7 and 8.
    with_todo = _is_pipe(FD_FROMTODO) and _is_pipe(FD_TOTODO)
    qmail_home = _home.home()
    try:
        os.chdir(qmail_home)
    except OSError:
        return _die(log.CANNOT_START_HOME)
    controls = read_controls()
    if controls is None:
        return _die(log.CANNOT_START_CONTROLS)
    try:
        os.chdir("queue")
    except OSError:
        return _die(log.CANNOT_START_QUEUE)
    # Until the loop's state exists the handlers note the signal here.
    early = {"exit": False, "run": False, "read": False}

    def on_term(signum: int, frame: object) -> None:
        early["exit"] = True

    def on_alrm(signum: int, frame: object) -> None:
        early["run"] = True

    def on_hup(signum: int, frame: object) -> None:
        early["read"] = True

    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGALRM, on_alrm)
    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.umask(0o077)
    try:
        mutex = os.open(layout.SENDMUTEX, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return _die(log.CANNOT_START_MUTEX)
    try:
        fcntl.flock(mutex, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return _die(log.CANNOT_START_RUNNING)
    spawn_max = []
    for c in CHANNELS:
        n = _read_spawn_max(CHANFDIN[c])
        if n is None:
            return _die(log.CANNOT_START_SPAWN)
        spawn_max.append(n)
    send = Send(controls, _home.install().split, _clock, spawn_max=(spawn_max[0], spawn_max[1]))
    send.wake = wake_r
    if with_todo:
        send.attach_todo(FD_FROMTODO, FD_TOTODO)
    send.exitasap, send.runasap, send.readasap = early["exit"], early["run"], early["read"]
    # From here on the handlers set the loop's flags themselves, as qmail's do.
    signal.signal(signal.SIGTERM, lambda signum, frame: setattr(send, "exitasap", True))
    signal.signal(signal.SIGALRM, lambda signum, frame: setattr(send, "runasap", True))
    signal.signal(signal.SIGHUP, lambda signum, frame: setattr(send, "readasap", True))
    send.start()
    while not send.done():
        send.step(qmail_home=qmail_home)
    send.finish()
    return 0
