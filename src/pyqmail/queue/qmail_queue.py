"""qmail-queue: queue a mail message for delivery (qmail-queue(8), INTERNALS.md).

The message comes on descriptor 0, the envelope on descriptor 1. The steps
follow INTERNALS.md's states: pid/ file created (its inode is the message
number), renamed to mess/ (S2), message written and fsync'd, intd/ created
(S3) with the envelope, linked to todo/ (S4), then fsync'd (that one fsync
makes the envelope and the link durable), trigger pulled. Any
failure removes what was made and exits with the code of qmail-queue(8).
In a big-todo queue (pyqmail.queue.layout) intd/N and todo/N are
intd/D/N and todo/D/N, D = N modulo the split, as mess/N.

Run as root, qmail-queue writes the queue as qmailq. Run as another local
user in a root-mode installation, it cannot write the queue itself (Python
cannot be setuid), so it hands its two descriptors to qmail-queued over a UNIX
socket; the server learns the caller's uid from the kernel (SO_PEERCRED) and
writes the queue exactly as here, naming that uid in the Received line. When
no qmail-queued answers, it writes the message and envelope into
QMAILHOME/maildrop/ instead (pyqmail.queue.maildrop), where qmail-queued
finds it later and queues it with the uid of the file's owner.
"""

from __future__ import annotations

import os
import select
from pyqmail import sig as signal
import time

from pyqmail import durable
from pyqmail import home as _home
from pyqmail.entry import program
from pyqmail.privs import Credentials, drop
from pyqmail.queue import handoff as _handoff
from pyqmail.queue import layout
from pyqmail.queue.envelope import ADDR_MAX, CHUNK as _CHUNK, FD_ENVELOPE, FD_ERRSTR, FD_MESSAGE, Exit, Reader
from pyqmail.queue.exits import QueueExit
from pyqmail.smtputf8 import ENV_B as SMTPUTF8_ENV, flagged, todo_u

SUICIDE_SECONDS = 86400
# The socket and its protocol: pyqmail.queue.handoff, whose names these are.
SOCKET = _handoff.SOCKET
REQUEST_QUEUE = _handoff.REQUEST_QUEUE
REQUEST_QUEUE_UTF8 = _handoff.REQUEST_QUEUE_UTF8
REQUEST_STOP = _handoff.REQUEST_STOP
ACK = _handoff.ACK
STOP_YES = _handoff.STOP_YES
STOP_NO = _handoff.STOP_NO
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


# Stop queueing with an exit code: the exception of the one envelope reader.
Die = Exit
_Envelope = Reader  # the envelope reader, under the name the fuzz tests use


def date822(when: float) -> str:
    """Return qmail's RFC 822 date: '22 Nov 2026 15:23:38 -0000' in UTC."""
    t = time.gmtime(when)
    return f"{t.tm_mday} {_MONTHS[t.tm_mon - 1]} {t.tm_year} {t.tm_hour:02}:{t.tm_min:02}:{t.tm_sec:02} -0000"


def received_line(pid: int, uid: int, inst: _home.Install, when: float) -> bytes:
    """Return the Received line qmail-queue puts on top of every message."""
    if not inst.single and uid == inst.uid("alias"):
        who = "invoked by alias"
    elif not inst.single and uid == inst.uid("qmaild"):
        who = "invoked from network"
    elif not inst.single and uid == inst.uid("qmails"):
        who = "invoked for bounce"
    else:
        who = f"invoked by uid {uid}"
    return f"Received: (qmail {pid} {who}); {date822(when)}\n".encode()


class Watch:
    """A qmail-queued child's watch on its client: the client's socket and an idle time.

    C's caller can kill the setuid qmail-queue it started; here the work is
    the server's, so it stops when the client does: when the client's
    socket hangs up (or carries anything more: the client sends nothing
    after its request), and when the client's descriptors give nothing for
    `idle` seconds. Either is qmail-queue's read error, 54.
    """

    def __init__(self, peer: int, idle: float) -> None:
        self._peer = peer
        self._idle_ms = max(0, int(idle * 1000))
        self._polls: dict[int, select.poll] = {}

    def wait(self, fd: int) -> None:
        """Return once fd is readable; Die(54) if the client goes or fd stays silent for the idle time."""
        poll = self._polls.get(fd)
        if poll is None:
            poll = self._polls[fd] = select.poll()
            poll.register(fd, select.POLLIN)
            poll.register(self._peer, select.POLLIN)
        while True:
            try:
                events = poll.poll(self._idle_ms)
                break
            except InterruptedError:
                continue
        if not events or any(efd == self._peer for efd, _ in events):
            raise Die(QueueExit.READ_ERROR)

    def check(self) -> None:
        """Die(54) unless the client is still there, waiting for its answer."""
        poll = select.poll()
        poll.register(self._peer, select.POLLIN)
        if poll.poll(0):
            raise Die(QueueExit.READ_ERROR)


class _Queuer:
    """One message on its way from S1 to S4; cleanup() takes it back to S1, close() closes its files."""

    def __init__(self) -> None:
        self.mess_fd = -1
        self.intd_fd = -1
        self.mess_fn = ""
        self.intd_fn = ""
        self.made: list[tuple[int, str]] = []  # (descriptor, name) of files cleanup() removes, newest last

    def cleanup(self) -> None:
        """Remove what was made (intd/N, then mess/N), stopping at the first failure as qmail does."""
        for fd, fn in reversed(self.made):
            try:
                durable.trunc_unlink(fd, fn)
            except OSError:
                return
        self.made.clear()

    def close(self) -> None:
        for fd in (self.intd_fd, self.mess_fd):
            if fd != -1:
                os.close(fd)
        self.intd_fd = self.mess_fd = -1


def _write(fd: int, data: bytes | bytearray | memoryview) -> None:
    try:
        durable.write_all(fd, data)
    except OSError:
        raise Die(QueueExit.WRITE_ERROR) from None


def _fsync(fd: int) -> None:
    try:
        durable.fsync(fd)
    except OSError:
        raise Die(QueueExit.WRITE_ERROR) from None


def _open_pid(pid: int, start: int) -> tuple[int, str]:
    for seq in range(1, 10):
        name = f"pid/{pid}.{start}.{seq}"
        try:
            return durable.create_excl(name), name
        except FileExistsError:
            continue
        except OSError:
            break
    raise Die(QueueExit.PID_ERROR)


def queue_message(qmail_home: str, msg_fd: int, env_fd: int, uid: int, pid: int,
                  inst: _home.Install, now: float | None = None, msg_len: int | None = None,
                  watch: Watch | None = None, env_len: int | None = None,
                  utf8: bool = False, trigger: bool = True) -> int:
    """Queue the message on msg_fd with the envelope on env_fd; return the exit code.

    trigger=False: lock/trigger is not pulled; the caller pulls it (qmail-queued's
    child, after it has answered its client: the wake-up of qmail-send is not
    part of the commit the client waits for).

    utf8: the message is flagged SMTPUTF8 ($SMTPUTF8MAIL; todo/N says `u... SMTPUTF8`).

    The message is what msg_fd holds up to its end, or exactly msg_len bytes
    (fewer is a read error, 54); the envelope is read up to its final NUL,
    within env_len bytes if given (an envelope not ended by then: 54). The working directory becomes QMAILHOME/queue.
    With watch (qmail-queued's child), every read waits on the watch and the
    client must still be there when the message is committed. Exit 0 means
    the message is on disk; any other exit leaves nothing to deliver (or, in
    the one case todo/N could not be taken back, a duplicate at worst).
    """
    q = _Queuer()
    try:
        return _queue(q, qmail_home, msg_fd, env_fd, uid, pid, inst, now, msg_len, watch, env_len, utf8, trigger)
    except Die as e:
        q.cleanup()
        return e.code
    except BaseException:
        q.cleanup()
        raise
    finally:
        q.close()


def _queue(q: _Queuer, qmail_home: str, msg_fd: int, env_fd: int, uid: int, pid: int,
           inst: _home.Install, now: float | None, msg_len: int | None, watch: Watch | None,
           env_len: int | None = None, utf8: bool = False, trigger: bool = True) -> int:
    if now is None:
        now = time.time()
    try:
        os.chdir(qmail_home)
    except OSError:
        raise Die(QueueExit.HOME_ERROR) from None
    try:
        os.chdir("queue")
    except OSError:
        raise Die(QueueExit.QUEUE_ERROR) from None

    fd, pid_fn = _open_pid(pid, int(now))
    q.mess_fd = fd
    try:
        messnum = os.fstat(fd).st_ino
    except OSError:
        raise Die(QueueExit.PID_ERROR) from None
    mess_fn = layout.split_name("mess", messnum, inst.split)
    try:
        os.link(pid_fn, mess_fn)
    except OSError:
        try:
            os.unlink(pid_fn)
        except OSError:
            pass  # safe: qmail-clean removes pid/ files left for 36 hours
        raise Die(QueueExit.MESS_ERROR) from None
    q.mess_fn = mess_fn
    q.made.append((fd, mess_fn))  # S2: from here on, cleanup removes mess/N
    try:
        os.unlink(pid_fn)
    except OSError:
        raise Die(QueueExit.PID_ERROR) from None

    # The message, behind its Received line.
    buf = bytearray(received_line(pid, uid, inst, now))
    left = -1 if msg_len is None else msg_len
    while left:
        if watch is not None:
            watch.wait(msg_fd)
        try:
            chunk = os.read(msg_fd, _CHUNK if left < 0 else min(left, _CHUNK))
        except OSError:
            raise Die(QueueExit.READ_ERROR) from None
        if not chunk:
            if left > 0:
                raise Die(QueueExit.READ_ERROR)
            break
        if left > 0:
            left -= len(chunk)
        buf += chunk
        if len(buf) >= _CHUNK:
            _write(fd, buf)
            buf.clear()
    _write(fd, buf)
    _fsync(fd)

    try:
        big = layout.is_bigtodo()
    except OSError:
        raise Die(QueueExit.INTD_ERROR) from None
    intd_fn = layout.todo_name("intd", messnum, inst.split, big)
    try:
        ifd = durable.create_excl(intd_fn)
    except OSError:
        raise Die(QueueExit.INTD_ERROR) from None
    q.intd_fd, q.intd_fn = ifd, intd_fn
    q.made.append((ifd, intd_fn))  # S3

    # The SMTPUTF8 flag is kept after the uid, where C's qmail-send ignores it (pyqmail.smtputf8).
    out = bytearray(todo_u(uid, utf8) + b"p%d\0" % pid)
    for letter, addr in Reader(env_fd, None if watch is None else watch.wait, limit=env_len).fields():
        out += letter + addr
        if len(out) >= _CHUNK:
            _write(ifd, out)
            out.clear()
    _write(ifd, out)
    if watch is not None:
        watch.check()  # a client killed before this point has queued nothing, as with C's qmail-queue

    # The envelope is not fsync'd before the link (qmail's order) but after
    # it: link(2) raises intd/N's link count and the big-todo rename changes
    # its ctime, changes to that inode made in the journal transactions that
    # also hold the new todo entries. An fsync of the inode commits its last
    # transaction (ext4: i_sync_tid; xfs: the log up to the inode's last
    # LSN), and journals commit in order, so this one fsync makes the
    # envelope's bytes, todo/N and the earlier mess/N link durable together.
    # What a power failure before it returns can leave, a todo/N naming a
    # torn envelope of a message never acknowledged, qmail-send removes
    # (pyqmail.send.qmail_send, "torn envelope"). It must be fsync, not
    # fdatasync: a link changes no data.
    todo_fn = f"todo/{messnum}"
    try:
        os.link(intd_fn, todo_fn)
    except OSError:
        raise Die(QueueExit.TODO_ERROR) from None
    if big:
        # Big-todo: todo/N moves into its subdirectory by one rename, which
        # changes todo/, todo/D/ and the inode's ctime in one journal
        # transaction, so the fsync below makes todo/D/N durable. Until the
        # rename, todo/N is in the flat place, which every reader of todo/
        # takes too.
        try:
            os.rename(todo_fn, layout.todo_name("todo", messnum, inst.split, True))
        except OSError:
            pass  # safe: todo/N stays in the flat place, queued all the same and read from there
        else:
            todo_fn = layout.todo_name("todo", messnum, inst.split, True)
    # S4: queued. From here on mess/N and intd/N are never removed, whatever happens.
    q.made.clear()
    try:
        durable.fsync(ifd)
    except OSError:
        return _take_back(todo_fn)
    if trigger:
        layout.pull_trigger(".")
    return QueueExit.OK


def _take_back(todo_fn: str) -> int:
    """The envelope's fsync failed after the link: take the message back from S4; return the exit code.

    qmail-send may have seen todo/N already. If it is gone, qmail-send has
    preprocessed it, and qmail-send removes todo/N only after its own info/,
    local/ and remote/ files are fsync'd, or once a kept message is wholly
    delivered: the message is durable (or delivered) after all, exit 0.
    Otherwise todo/N is unlinked and the exit is temporary (53). mess/N
    and intd/N are not removed: qmail-send may have opened todo/N just before
    the unlink and be preprocessing it (then it is delivered, and the
    sender's retry makes a duplicate: never a loss); if not, qmail-send's
    cleanup removes them after 36 hours, as a crashed qmail-queue's.
    """
    try:
        os.unlink(todo_fn)
    except FileNotFoundError:
        return QueueExit.OK
    except OSError:
        pass  # safe: todo/N stays and is delivered; the temporary exit risks a duplicate, never a loss
    return QueueExit.WRITE_ERROR


def _on_alarm(signum: int, frame: object) -> None:
    raise Die(QueueExit.TIMEOUT)


def hand_to_server(qmail_home: str) -> int:
    """Pass descriptors 0 and 1 to qmail-queued; return the exit code it answers.

    If no qmail-queued takes them (no socket, nobody listening, or the server
    goes away before acknowledging), write the message into the maildrop.
    """
    conn, code = _handoff.offer(qmail_home, FD_MESSAGE, FD_ENVELOPE, flagged(os.environb.get(SMTPUTF8_ENV)))
    if conn is not None:
        return _handoff.answer(conn)
    if code == _handoff.NO_SERVER:
        return drop_message(qmail_home, FD_MESSAGE, FD_ENVELOPE)
    return code


def drop_message(qmail_home: str, msg_fd: int, env_fd: int, now: float | None = None) -> int:
    """Write the message on msg_fd and the envelope on env_fd into the maildrop; return the exit code.

    Exit 0 means the file is on disk under its final name `m...`; the envelope
    is checked as queue_message checks it (11, 54, 91), and any other failure
    is a temporary one, the file removed.
    """
    from pyqmail.queue import maildrop

    if now is None:
        now = time.time()
    top = os.path.join(qmail_home, maildrop.DIR)
    name = maildrop.unique(now)
    tmp = os.path.join(top, "t" + name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return QueueExit.QUEUE_ERROR
    published = False
    try:
        _drop(fd, top, msg_fd, env_fd)
        try:
            os.rename(tmp, os.path.join(top, "m" + name))
        except OSError:
            raise Die(QueueExit.QUEUE_ERROR) from None
        published = True
        # Writers cannot open the directory (it is not readable) to fsync it.
        # The rename changed the file's ctime in the same journal transaction
        # (ext4, xfs), so fsyncing the file commits the rename too. If that
        # fails, the file is taken back and the exit is temporary.
        try:
            durable.fsync(fd)
        except OSError:
            try:
                os.unlink(os.path.join(top, "m" + name))
            except OSError:
                pass  # safe: gone (qmail-queued has queued it) or stuck: a duplicate at worst, never a loss
            return QueueExit.WRITE_ERROR
        return QueueExit.OK
    except Die as e:
        if not published:
            _unlink_quietly(fd, tmp)
        return e.code
    except BaseException:
        if not published:
            _unlink_quietly(fd, tmp)
        raise
    finally:
        os.close(fd)


def _unlink_quietly(fd: int, path: str) -> None:
    try:
        durable.trunc_unlink(fd, path)
    except OSError:
        pass  # a t file left behind is removed by qmail-queued after 36 hours


def _drop(fd: int, top: str, msg_fd: int, env_fd: int) -> None:
    from pyqmail.queue import maildrop

    buf = bytearray(maildrop.header(0))
    offset = maildrop.HEADER_SIZE
    while True:
        try:
            chunk = os.read(msg_fd, _CHUNK)
        except OSError:
            raise Die(QueueExit.READ_ERROR) from None
        if not chunk:
            break
        offset += len(chunk)
        buf += chunk
        if len(buf) >= _CHUNK:
            _write(fd, buf)
            buf.clear()
    _write(fd, buf)
    buf.clear()
    for letter, addr in Reader(env_fd).fields():
        buf += letter + addr
        if len(buf) >= _CHUNK:
            _write(fd, buf)
            buf.clear()
    buf += b"\0"
    _write(fd, buf)
    try:
        if os.pwrite(fd, offset.to_bytes(8, "big"), maildrop.OFFSET_AT) != 8:
            raise Die(QueueExit.WRITE_ERROR)
        # The group is the directory's (setgid): qmailq's group qmail reads it.
        os.fchmod(fd, maildrop.FILE_MODE)
        if os.fstat(fd).st_gid != os.stat(top).st_gid:
            raise Die(QueueExit.QUEUE_ERROR)  # not setgid: qmail-queued could not read the file
    except OSError:
        raise Die(QueueExit.WRITE_ERROR) from None
    _fsync(fd)


@program("qmail-queue", crash=QueueExit.BUG)
def main(argv: list[str]) -> int:
    """Queue the message on descriptor 0 for the envelope on descriptor 1."""
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(SUICIDE_SECONDS)
    inst = _home.install()
    qmail_home = _home.home()
    uid = os.getuid()
    if not inst.single and os.geteuid() != 0 and uid != inst.uid("qmailq"):
        return hand_to_server(qmail_home)
    if not inst.single and os.geteuid() == 0:
        q = inst.users.get("qmailq")
        if q is None:
            return QueueExit.HOME_ERROR
        drop(Credentials(q.uid, q.gid))
    os.umask(0o033)
    try:
        return queue_message(qmail_home, FD_MESSAGE, FD_ENVELOPE, uid, os.getpid(), inst,
                             utf8=flagged(os.environb.get(SMTPUTF8_ENV)))
    finally:
        signal.alarm(0)
