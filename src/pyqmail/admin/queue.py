"""`qmail queue`: list, show, delete, expire or retry queued messages, safely.

    qmail queue list [--home DIR]
    qmail queue show [--home DIR] ID
    qmail queue delete [--home DIR] ID
    qmail queue expire [--home DIR] ID
    qmail queue retry [--home DIR]

A message is known by its number (the inode of mess/ID, INTERNALS.md). The
queue holds it either "queued" (todo/ID: qmail-send has not preprocessed it,
so its recipients are not yet sorted into local and remote) or
"preprocessed" (info/ID, local/ID, remote/ID, maybe bounce/ID).

Whether qmail-send runs is learnt from the lock it holds on
queue/lock/sendmutex (the same flock); its pid from /proc/locks.

- delete refuses while qmail-send runs; otherwise it holds that lock (so
  qmail-send cannot start meanwhile) and removes the files in the order
  qmail-send itself removes them: local, remote, bounce, info, then intd,
  todo (as qmail-clean does), then mess. Every intermediate state is one of
  INTERNALS.md's, and each removal is fsync'd before the next.
- expire takes the route qmail-send allows while running: info/ID's
  modification time (the message's birth) is set back past
  control/queuelifetime, the recipient lists are made due now, and a running
  qmail-send is sent ALRM. qmail-send then tries each remaining recipient
  once more and bounces those that fail ("I'm not going to try again").
- retry sends ALRM to a running qmail-send (every waiting recipient becomes
  due now); with qmail-send stopped it makes every recipient list due now
  (the retry time qmail-send stores as the lists' modification time).

Exit 0 when done; 1 when there is no such message or nothing could be done;
100 for a usage error; 111 for a temporary failure, including "qmail-send is
running" for delete.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import signal
import time
from dataclasses import dataclass, field

from pyqmail import control, durable, errors
from pyqmail import home as _home
from pyqmail.queue import layout
from pyqmail.queue.qmail_qread import printable, queue_date
from pyqmail.send import schedule

EXIT_OK = 0
EXIT_NOTHING = 1
EXIT_USAGE = 100
EXIT_TEMPORARY = 111

FD_OUT = 1
FD_ERR = 2
ENVELOPE_MAX = 64 << 20  # bytes of one envelope file read; qmail-queue writes far less per recipient
PROC_LOCKS = "/proc/locks"
_CHUNK = 65536

# The order qmail-send (and qmail-clean) remove a message's files: local and
# remote when their recipients are done, then bounce/N, info/N, and last
# intd/N and mess/N; todo/N goes with intd/N (qmail-clean's "todo" command).
DELETE_ORDER = ("local", "remote", "bounce", "info", "intd", "todo", "mess")

QUEUED = "queued"
PREPROCESSED = "preprocessed"

RUNNING_REFUSAL = ("qmail queue: refusing to {what} #{num}: qmail-send is running{pid}; "
                   "stop it first (qmail down, or svc -d the qmail-send service)\n")


class QueueError(Exception):
    """The queue cannot be read or changed; the message says what and why."""


class NoMessage(Exception):
    """There is no such message in the queue."""


@dataclass(slots=True)
class Recipient:
    """One envelope recipient: channel ('local', 'remote', or '' before preprocessing), done, address."""

    channel: str
    done: bool
    addr: bytes


@dataclass(slots=True)
class Message:
    """What the queue says about one message."""

    num: int
    state: str
    date: int
    size: int
    sender: bytes
    bouncing: bool
    recipients: list[Recipient] = field(default_factory=list)


# --- reading the queue -----------------------------------------------------------

def split_name(kind: str, num: int, split: int) -> str:
    """Return the queue-relative path of message num's file of kind."""
    return layout.split_name(kind, num, split)


def _read_file(path: str) -> bytes | None:
    """Return the contents of path (at most ENVELOPE_MAX bytes); None if it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise QueueError(f"unable to open queue/{path}: {errors.describe(e)}") from None
    try:
        chunks = []
        total = 0
        while True:
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > ENVELOPE_MAX:
                raise QueueError(f"queue/{path} is longer than {ENVELOPE_MAX} bytes")
            chunks.append(chunk)
    except OSError as e:
        raise QueueError(f"unable to read queue/{path}: {errors.describe(e)}") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def records(data: bytes) -> list[bytes]:
    """Return the NUL-terminated records of an envelope file (a last one without NUL is dropped)."""
    return data.split(b"\0")[:-1]


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise QueueError(f"unable to stat queue/{path}: {errors.describe(e)}") from None


def read_message(num: int, split: int) -> Message:
    """Read message num from the queue (the current directory); raise NoMessage or QueueError."""
    mess = _stat(split_name("mess", num, split))
    if mess is None:
        raise NoMessage(num)
    info_path = split_name("info", num, split)
    info = _read_file(info_path)
    if info is not None:
        st = _stat(info_path)
        recs = records(info)
        sender = recs[0][1:] if recs and recs[0][:1] == b"F" else b""
        msg = Message(num, PREPROCESSED, int(st.st_mtime) if st else 0, mess.st_size, sender,
                      _stat(f"bounce/{num}") is not None)
        for channel in ("local", "remote"):
            data = _read_file(split_name(channel, num, split))
            for rec in records(data or b""):
                if rec[:1] in (b"T", b"D"):
                    msg.recipients.append(Recipient(channel, rec[:1] == b"D", rec[1:]))
        return msg
    todo_path = layout.find_todo(num, split) or f"todo/{num}"  # either place (big-todo or flat)
    todo = _read_file(todo_path)
    if todo is None:
        # mess/N alone (or with intd/N) is a message being queued or being
        # eliminated (INTERNALS.md S2, S3): not in the queue for delivery.
        raise NoMessage(num)
    st = _stat(todo_path)
    msg = Message(num, QUEUED, int(st.st_mtime) if st else int(mess.st_mtime), mess.st_size, b"", False)
    for rec in records(todo):
        if rec[:1] == b"F":
            msg.sender = rec[1:]
        elif rec[:1] == b"T":
            msg.recipients.append(Recipient("", False, rec[1:]))
    return msg


def message_numbers(split: int) -> list[int]:
    """Return the numbers of the messages in todo/ and info/, in increasing order."""
    try:
        found = layout.todo_numbers(split)  # todo/ and, in a big-todo queue, its subdirectories
    except OSError as e:
        raise QueueError(f"unable to list queue/todo: {errors.describe(e)}") from None
    for d in [f"info/{i}" for i in range(split)]:
        try:
            names = os.listdir(d)
        except OSError as e:
            raise QueueError(f"unable to list queue/{d}: {errors.describe(e)}") from None
        found.update(int(n) for n in names if n.isdigit())
    return sorted(found)


# --- qmail-send's lock ---------------------------------------------------------------

class SendMutex:
    """queue/lock/sendmutex: held here means qmail-send is not running and cannot start."""

    def __init__(self) -> None:
        try:
            self.fd = os.open(layout.SENDMUTEX, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise QueueError(f"unable to open queue/{layout.SENDMUTEX}: {errors.describe(e)}") from None
        self.held = False

    def try_lock(self) -> bool:
        """Take the lock qmail-send takes, without waiting; return False if qmail-send holds it."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise QueueError(f"unable to lock queue/{layout.SENDMUTEX}: {errors.describe(e)}") from None
        self.held = True
        return True

    def holder(self) -> int | None:
        """Return the pid holding the lock, from /proc/locks; None if it cannot be told."""
        st = os.fstat(self.fd)
        return lock_holder(PROC_LOCKS, os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)

    def close(self) -> None:
        """Release the lock (if held) and close it."""
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> SendMutex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_locks(text: str, major: int, minor: int, ino: int) -> int | None:
    """Return the pid of the granted FLOCK lock on (major, minor, ino) in /proc/locks text, or None."""
    want = f"{major:02x}:{minor:02x}:{ino}"
    for line in text.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; waiters carry "->".
        if len(fields) < 6 or fields[1] == "->" or fields[1] != "FLOCK":
            continue
        if fields[5] == want and fields[4].lstrip("-").isdigit():
            pid = int(fields[4])
            if pid > 0:
                return pid
    return None


def lock_holder(path: str, major: int, minor: int, ino: int) -> int | None:
    """Return the pid holding a FLOCK lock on the file, as the kernel's lock table says; None if unknown."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(1 << 22)
    except OSError:
        return None
    return parse_locks(text, major, minor, ino)


# --- output ---------------------------------------------------------------------------

def _out(data: bytes) -> None:
    durable.write_all(FD_OUT, data)


def _err(text: str) -> None:
    durable.write_all(FD_ERR, text.encode("utf-8", "backslashreplace"))


def state_text(msg: Message) -> bytes:
    """Return the state column of a message: queued, preprocessed, or preprocessed, bouncing."""
    if msg.state == QUEUED:
        return b"queued (not yet preprocessed by qmail-send)"
    return b"preprocessed, bouncing" if msg.bouncing else b"preprocessed"


def recipient_line(r: Recipient) -> bytes:
    """Return '  local   not done  addr' for a recipient."""
    channel = (r.channel or "-").encode()
    status = b"done" if r.done else b"not done"
    return b"  %-6s  %-8s  " % (channel, status) + printable(r.addr) + b"\n"


def summary(msg: Message) -> bytes:
    """Return the listing of one message: a header line and a line per recipient."""
    head = (b"%d  " % msg.num + queue_date(msg.date) + b" GMT  %d bytes  <" % msg.size
            + printable(msg.sender) + b">  " + state_text(msg) + b"\n")
    return head + b"".join(recipient_line(r) for r in msg.recipients)


# --- the actions ---------------------------------------------------------------------

def do_list(split: int) -> int:
    """List every message; return the exit code."""
    nums = message_numbers(split)
    count = 0
    for num in nums:
        try:
            msg = read_message(num, split)
        except NoMessage:
            continue  # gone meanwhile (qmail-send finished it)
        _out(summary(msg))
        count += 1
    _out(b"%d message%s\n" % (count, b"" if count == 1 else b"s"))
    return EXIT_OK


def do_show(num: int, split: int) -> int:
    """Print message num's envelope, a blank line, then the message itself."""
    msg = read_message(num, split)
    head = [b"message: %d" % msg.num, b"state: " + state_text(msg),
            b"date: " + queue_date(msg.date) + b" GMT", b"size: %d bytes" % msg.size,
            b"sender: <" + printable(msg.sender) + b">"]
    for r in msg.recipients:
        where = r.channel.encode() + b", " if r.channel else b""
        head.append(b"recipient: " + where + (b"done" if r.done else b"not done") + b": " + printable(r.addr))
    _out(b"\n".join(head) + b"\n\n")
    path = split_name("mess", num, split)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NoMessage(num) from None
    except OSError as e:
        raise QueueError(f"unable to open queue/{path}: {errors.describe(e)}") from None
    try:
        while True:
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                break
            _out(chunk)
    except OSError as e:
        raise QueueError(f"unable to read queue/{path}: {errors.describe(e)}") from None
    finally:
        os.close(fd)
    return EXIT_OK


def _remove(path: str) -> bool:
    """Remove queue file path and make that durable; return False if it was not there."""
    try:
        os.unlink(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise QueueError(f"unable to remove queue/{path}: {errors.describe(e)}") from None
    try:
        durable.fsync_dir(os.path.dirname(path))
    except OSError as e:
        raise QueueError(f"unable to fsync queue/{os.path.dirname(path)}: {errors.describe(e)}") from None
    return True


def do_delete(num: int, split: int) -> int:
    """Remove message num while holding qmail-send's lock; refuse while qmail-send runs."""
    with SendMutex() as mutex:
        if not mutex.try_lock():
            pid = mutex.holder()
            _err(RUNNING_REFUSAL.format(what="delete", num=num, pid=f" (pid {pid})" if pid else ""))
            return EXIT_TEMPORARY
        read_message(num, split)  # raises NoMessage
        for kind in DELETE_ORDER:
            # intd/N and todo/N from both places (big-todo's subdirectory, the flat one).
            for path in layout.todo_names(kind, num, split) if kind in layout.TODO_DIRS \
                    else (split_name(kind, num, split),):
                if _remove(path):
                    _out(b"removed queue/" + path.encode() + b"\n")
    _out(b"deleted message #%d\n" % num)
    return EXIT_OK


def _make_due(num: int, split: int, now: int) -> int:
    """Make message num's recipient lists due now (qmail-send keeps their retry time as mtime); return how many."""
    n = 0
    for channel in ("local", "remote"):
        path = split_name(channel, num, split)
        try:
            os.utime(path, (now, now))
        except FileNotFoundError:
            continue
        except OSError as e:
            raise QueueError(f"unable to set the time of queue/{path}: {errors.describe(e)}") from None
        n += 1
    return n


def do_expire(num: int, split: int, now: int) -> int:
    """Set message num's birth back past queuelifetime and wake qmail-send; say which route was taken."""
    msg = read_message(num, split)
    if msg.state == QUEUED:
        _err(f"qmail queue: #{num} is not preprocessed yet (it is in todo/): qmail-send decides its "
             "lifetime once it has seen it; start qmail-send and expire it then, or delete it\n")
        return EXIT_NOTHING
    try:
        lifetime = control.read_int("queuelifetime", schedule.DEFAULT_LIFETIME)
    except control.ControlError as e:
        raise QueueError(str(e)) from None
    birth = now - lifetime - 1
    info = split_name("info", num, split)
    with SendMutex() as mutex:
        running = not mutex.try_lock()
        pid = mutex.holder() if running else None
        try:
            os.utime(info, (birth, birth))
        except FileNotFoundError:
            raise NoMessage(num) from None
        except OSError as e:
            raise QueueError(f"unable to set the time of queue/{info}: {errors.describe(e)}") from None
        _make_due(num, split, now)
        _out(b"expire #%d: queue/%s now dates from " % (num, info.encode()) + queue_date(birth)
             + b" GMT, past queuelifetime (%d seconds)\n" % lifetime)
        if running and pid is not None:
            os.kill(pid, signal.SIGALRM)
            _out(b"qmail-send (pid %d) is running: sent it ALRM; it tries the remaining recipients once more "
                 b"and bounces those that fail\n" % pid)
        elif running:
            _out(b"qmail-send is running but its pid is unknown: it tries the remaining recipients once more "
                 b"at their next retry and bounces those that fail\n")
        else:
            _out(b"qmail-send is not running: when it starts it tries the remaining recipients once more "
                 b"and bounces those that fail\n")
    return EXIT_OK


def do_retry(split: int, now: int) -> int:
    """Make every waiting delivery due now: ALRM to a running qmail-send, else the lists' retry times."""
    with SendMutex() as mutex:
        if not mutex.try_lock():
            pid = mutex.holder()
            if pid is None:
                _err("qmail queue: qmail-send is running but its pid cannot be found in /proc/locks\n")
                return EXIT_TEMPORARY
            os.kill(pid, signal.SIGALRM)
            _out(b"sent ALRM to qmail-send (pid %d): every waiting recipient is due now\n" % pid)
            return EXIT_OK
        lists = 0
        for num in message_numbers(split):
            lists += _make_due(num, split, now)
        _out(b"qmail-send is not running: %d recipient list%s made due now; "
             b"they are tried when it starts\n" % (lists, b"" if lists == 1 else b"s"))
    return EXIT_OK


# --- the command ---------------------------------------------------------------------

def _parser(prog: str) -> argparse.ArgumentParser:
    from pyqmail.admin import install

    p = argparse.ArgumentParser(prog=prog, description="List, show, delete, expire or retry queued messages.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    texts = {"list": "list every message: id, date, size, sender, recipients (done or not)",
             "show": "print a message's envelope and the message",
             "delete": "remove a message (only while qmail-send is stopped)",
             "expire": "make qmail-send try a message once more, then bounce it",
             "retry": "make every waiting delivery due now"}
    for action, text in texts.items():
        a = sub.add_parser(action, help=text)
        a.add_argument("--home", default=None,
                       help=install.HOME_HELP)
        if action in ("show", "delete", "expire"):
            a.add_argument("id", metavar="ID", help="the message number, as `qmail queue list` shows it")
    return p


def use_home(path: str | None) -> str:
    """Make path (default: the installed home) this process's QMAILHOME; return it, absolute."""
    from pyqmail.admin import install

    qmail_home = os.path.abspath(path or install.default_home())
    os.environ["QMAILHOME"] = qmail_home
    _home.reset()
    return qmail_home


def command(argv: list[str]) -> int:
    """Run `qmail queue ACTION ...`; return the exit code."""
    try:
        args = _parser(argv[0]).parse_args(argv[1:])
    except SystemExit as e:
        return EXIT_OK if e.code == 0 else EXIT_USAGE
    num = -1
    if getattr(args, "id", None) is not None:
        text = args.id.lstrip("#")
        if not text.isdigit():
            _err(f"{argv[0]}: not a message number: {args.id}\n")
            return EXIT_USAGE
        num = int(text)
    qmail_home = use_home(args.home)
    try:
        os.chdir(os.path.join(qmail_home, "queue"))
    except OSError as e:
        _err(f"qmail queue: unable to enter {qmail_home}/queue: {errors.describe(e)}\n")
        return EXIT_TEMPORARY
    split = _home.install().split
    now = int(time.time())
    try:
        if args.action == "list":
            return do_list(split)
        if args.action == "show":
            return do_show(num, split)
        if args.action == "delete":
            return do_delete(num, split)
        if args.action == "expire":
            return do_expire(num, split, now)
        return do_retry(split, now)
    except NoMessage:
        _err(f"qmail queue: no message #{num} in the queue of {qmail_home}\n")
        return EXIT_NOTHING
    except QueueError as e:
        _err(f"qmail queue: {e}\n")
        return EXIT_TEMPORARY
