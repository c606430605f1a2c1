"""qmail-rcptcheckd: tell qmail-smtpd whether a local address has a mailbox (recipient validation, root mode).

    qmail-rcptcheckd

qmail-smtpd runs as qmaild and cannot look into users' homes; qmail-lspawn
can, because it runs as root and becomes each user. qmail-rcptcheckd answers
the one question qmail-smtpd needs, on QMAILHOME/run/qmail-rcptcheck.sock,
the way qmail-lspawn and qmail-local would decide it
(pyqmail.local.rcptcheck.check_local). The question is a local part
(already rewritten by qmail-send's rules, which qmail-smtpd applies itself
from the world-readable control files), ended by NUL; the answer is one
line: ``K`` (delivered), ``D`` (no mailbox here by that name), ``Z`` and a
reason (cannot check now).

The parent (root) reads questions without blocking (a poll loop: a slow
client holds only its own connection) and finds each one's user as
qmail-lspawn does: users/cdb here (a read of a local file), else
qmail-getpw's rules (NSS, a stat of the home) in a short-lived child with
qmailp's ids and the group nofiles (pyqmail.local.getpwchild: one of at most
4 long-lived helpers, each with one lookup at a time, else a child of its
own), whose answer the loop reads when it comes; one not answered within
PYQMAIL_RCPTCHECKD_LOOKUP_SECONDS (30) is killed and the question answered
``Z`` (a hung home or NSS source holds up only its own questions). The search of the home for the .qmail file qmail-local would
use runs as that user, in a worker: a process forked once per (uid, gid),
dropped to those ids for good (it never regains root), which receives the
client's connection (SCM_RIGHTS) with the user's home and extension,
answers on it, and waits for the next question. Nothing is cached: users/cdb
and the rules are read afresh for each question, the worker opens the home
and the .qmail files afresh, so a file made or removed a moment ago decides
the next question.

One worker per user, so a slow home (NFS) or a user who stops their worker
holds up only that user's questions: at most 20 wait for one worker (past
that: ``Z`` busy at once); a worker busy with one question for 30 seconds is
SIGKILLed by the parent (its passed connections close: qmail-smtpd sees no
answer, 451); a worker is retired after 60 seconds without a question and
after 1000 questions; at most 40 run, and a new user's worker replaces the
least recently used idle one (all 40 busy: ``Z`` busy). Workers show in ps
as ``qmail-rcptcheckd worker UID`` (comm qmail-rcptchk-w).

Only root and qmaild (SO_PEERCRED) are answered: the socket tells nobody more
than RCPT TO tells any SMTP client, and nobody else needs it. A request is
at most 1000 bytes ended by NUL, and must arrive within 10 seconds; at most
200 connections wait for their question. SIGTERM: remove the socket and exit
0 (workers finish the questions they hold, then exit). Errors go to
descriptor 2 (multilog). In a single-user installation the workers keep
the installing user's ids.
"""

from __future__ import annotations

import array
import errno
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable

from pyqmail import home as _home
from pyqmail import sig as signal
from pyqmail import wait
from pyqmail.entry import program
from pyqmail.local import getpwchild, rcptcheck, users
from pyqmail.privs import Credentials, PrivilegeError, drop
from pyqmail import workers

SOCKET = "run/qmail-rcptcheck.sock"
EXIT_FAIL = 111
CHILDREN_MAX = 40  # workers at once
CHILD_SECONDS = 30  # one question's limit in a worker
READ_SECONDS = 10  # for a question to arrive
QUEUE_MAX = 20  # questions handed to one worker and not yet answered
PENDING_MAX = 200  # connections whose question has not arrived yet
IDLE_SECONDS = 60  # a worker without a question this long is retired
QUESTIONS_MAX = 1000  # a worker is retired (once idle) after this many questions
CHILD_SECONDS_ENV = "PYQMAIL_RCPTCHECKD_CHILD_SECONDS"  # test seam: CHILD_SECONDS
IDLE_SECONDS_ENV = "PYQMAIL_RCPTCHECKD_IDLE_SECONDS"  # test seam: IDLE_SECONDS
READ_SECONDS_ENV = "PYQMAIL_RCPTCHECKD_READ_SECONDS"  # test seam: READ_SECONDS
QUESTIONS_MAX_ENV = "PYQMAIL_RCPTCHECKD_QUESTIONS_MAX"  # test seam: QUESTIONS_MAX
LOOKUP_SECONDS_ENV = "PYQMAIL_RCPTCHECKD_LOOKUP_SECONDS"  # a user lookup child's deadline
LOOKUPS_MAX = 40  # user lookup children at once (past that: Z busy)
WORKER_COMM = "qmail-rcptchk-w"  # a worker's name in ps (comm: 15 bytes; the parent's is qmail-rcptcheck)
BUSY = "busy: too many questions waiting for this user"
BUSY_ALL = "busy: every worker is busy"
BUSY_LOOKUPS = "busy: too many user lookups under way"
_UCRED = struct.Struct("3i")
_HANDOFF = struct.Struct("!III")  # lengths of homedir, dash, ext; then the three
_HANDOFF_MAX = 65536  # a longer handoff (a home path past any PATH_MAX) arrives cut: no answer, 451


def _say(text: str) -> None:
    try:
        os.write(2, f"qmail-rcptcheckd: {text}\n".encode("utf-8", "backslashreplace"))
    except OSError:
        pass  # safe: nowhere left to report; the answer on the socket still says what happened


class Checker:
    """The parent's part of a question: qmail-lspawn's user lookup, with its identities."""

    def __init__(self, qmail_home: str, inst: _home.Install) -> None:
        self.home = qmail_home
        self.inst = inst

    def lookup_credentials(self) -> Credentials | None:
        """The ids qmail-getpw's rules run with: qmailp and the one group nofiles (None: ours, single-user mode).

        Raise users.GetpwError(QLX_USAGE) if the installation has no qmailp or nofiles.
        """
        if self.inst.single or os.geteuid() != 0:
            return None
        acct = self.inst.users.get("qmailp")
        gid = self.inst.groups.get("nofiles")
        if acct is None or gid is None:
            raise users.GetpwError(users.QLX_USAGE, "no qmailp user or nofiles group")
        return Credentials(acct.uid, gid)

    def rules(self, local: bytes) -> users.Assignment:
        """qmail-getpw's rules here, with qmailp's ids and the one group nofiles; every id taken back after.

        The daemon runs them in a child (getpwchild); this is for a caller that may block.
        """
        creds = self.lookup_credentials()
        if creds is None:
            return users.getpw(local)
        groups = os.getgroups()
        os.setgroups([creds.gid])
        try:
            os.setegid(creds.gid)
            os.seteuid(creds.uid)
            try:
                return users.getpw(local)
            finally:
                os.seteuid(0)
                os.setegid(0)
        finally:
            os.setgroups(groups)

    def decide(self, local: bytes, rules: Callable[[bytes], users.Assignment] | None = None
               ) -> rcptcheck.Answer | users.Assignment:
        """Return the answer if it needs no look into a home, else who must look (as who's ids).

        rules stands for qmail-getpw (default: self.rules); _Miss, which the
        daemon's rules raise on a users/cdb miss, goes through.
        """
        handed: list[users.Assignment] = []

        def become(who: users.Assignment) -> rcptcheck.Answer | None:
            if self.inst.single:
                early = rcptcheck.single_user_become(who)
                if early is not None:
                    return early
            handed.append(who)
            return _HANDED

        try:
            answer = rcptcheck.check_local(local, os.path.join(self.home, "users", "cdb"), become, rules or self.rules)
        except _Miss:
            raise
        except Exception as e:  # noqa: BLE001 - any trouble is "cannot check now", never "no mailbox"
            return rcptcheck.Answer(rcptcheck.TEMPORARY, f"internal error: {type(e).__name__}")
        return handed[0] if answer is _HANDED and handed else answer

    def credentials(self, who: users.Assignment) -> Credentials | None:
        """Return the ids a worker for who takes (None: keep ours, single-user mode)."""
        if self.inst.single:
            return None
        return Credentials(rcptcheck.scan_ulong(who.uid), rcptcheck.scan_ulong(who.gid))


_HANDED = rcptcheck.Answer("handed to a worker")  # compared by identity


class _Miss(Exception):
    """users/cdb does not name the user: qmail-getpw's rules must decide (in a lookup child)."""


def _miss(local: bytes) -> users.Assignment:
    raise _Miss


def encode(answer: rcptcheck.Answer) -> bytes:
    """Return the line that carries answer to qmail-smtpd."""
    line = answer.code.encode() + (answer.why.encode("utf-8", "replace") if answer.code == rcptcheck.TEMPORARY else b"")
    return line.replace(b"\n", b" ")[:1000] + b"\n"


def decode(line: bytes) -> rcptcheck.Answer:
    """Return the Answer a line of qmail-rcptcheckd carries; an unknown line is TEMPORARY."""
    code = line[:1].decode("latin-1")
    if code in (rcptcheck.DELIVER, rcptcheck.NO_MAILBOX):
        return rcptcheck.Answer(code)
    why = line[1:].rstrip(b"\n").decode("utf-8", "replace") if code == rcptcheck.TEMPORARY else "bad answer"
    return rcptcheck.Answer(rcptcheck.TEMPORARY, why or "no answer")


def ask(qmail_home: str, local: bytes, timeout: float = 20.0) -> rcptcheck.Answer:
    """Ask QMAILHOME's qmail-rcptcheckd about local; TEMPORARY if it cannot be asked or does not answer."""
    path = os.path.join(qmail_home, SOCKET)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(local + b"\0")
            data = b""
            while not data.endswith(b"\n") and len(data) < 2048:
                if not wait.readable(s.fileno(), timeout):
                    raise TimeoutError(errno.ETIMEDOUT, "timed out")
                chunk = s.recv(2048)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        return rcptcheck.Answer(rcptcheck.TEMPORARY, f"qmail-rcptcheckd: {e.strerror or e}")
    return decode(data)


def _allowed(conn: socket.socket, qmaild: int) -> bool:
    pid, uid, gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return uid in (0, qmaild, os.getuid())


def _reply(conn: socket.socket, answer: rcptcheck.Answer) -> None:
    """Answer on conn without waiting (the line fits an empty socket buffer) and close it."""
    if answer.code == rcptcheck.TEMPORARY:
        _say(f"cannot check a local part: {answer.why}")
    try:
        conn.send(encode(answer))
    except OSError:
        pass  # safe: the client has gone; it reads no answer as TEMPORARY
    conn.close()


# --- the worker: one user's searches, as that user --------------------------------------------------

def handoff(who: users.Assignment) -> bytes:
    """Return the message that hands who's search to a worker (the fields mailbox() reads)."""
    return _HANDOFF.pack(len(who.homedir), len(who.dash), len(who.ext)) + who.homedir + who.dash + who.ext


def unhandoff(msg: bytes) -> users.Assignment | None:
    """Return the Assignment a handoff message carries (uid and gid empty), None if malformed."""
    if len(msg) < _HANDOFF.size:
        return None
    a, b, c = _HANDOFF.unpack_from(msg)
    if _HANDOFF.size + a + b + c != len(msg):
        return None
    p = _HANDOFF.size
    return users.Assignment(b"", b"", b"", msg[p:p + a], msg[p + a:p + a + b], msg[p + a + b:])


def work(ctl: socket.socket, creds: Credentials | None, limit: float) -> int:
    """A worker's life: take creds for good, then answer each question handed over ctl until it closes.

    After each question, answered or not, one byte on ctl tells the parent
    it is done (the parent counts what it has handed over).
    """
    failed: rcptcheck.Answer | None = None
    if creds is not None:
        try:
            drop(creds)
        except (OSError, PrivilegeError) as e:
            failed = rcptcheck.Answer(rcptcheck.TEMPORARY, f"unable to become uid {creds.uid}: {e}")
        except Exception as e:  # noqa: BLE001 - e.g. an id too large: "cannot check now", as before
            failed = rcptcheck.Answer(rcptcheck.TEMPORARY, f"internal error: {type(e).__name__}")
    while True:
        msg, ancillary, flags, _ = ctl.recvmsg(_HANDOFF_MAX, socket.CMSG_SPACE(4 * 4), socket.MSG_CMSG_CLOEXEC)
        if not msg and not ancillary:
            return 0  # the parent retired us
        fds = workers.received_fds(ancillary)
        try:
            who = unhandoff(msg)
            if fds and who is not None:
                conn = socket.socket(fileno=fds.pop(0))
                signal.alarm(max(1, int(limit)))
                try:
                    try:
                        answer = failed or rcptcheck.mailbox(who)
                    except Exception as e:  # noqa: BLE001 - trouble is "cannot check now", never "no mailbox"
                        answer = rcptcheck.Answer(rcptcheck.TEMPORARY, f"internal error: {type(e).__name__}")
                    if answer.code == rcptcheck.TEMPORARY:
                        _say(f"cannot check a local part: {answer.why}")
                    conn.settimeout(limit)
                    try:
                        conn.sendall(encode(answer))
                    except OSError:
                        pass  # safe: the client has gone; it reads no answer as TEMPORARY
                finally:
                    conn.close()
                    signal.alarm(0)
        finally:
            for fd in fds:
                os.close(fd)
            ctl.send(b"d")


class _Worker:
    """The parent's record of one worker."""

    __slots__ = ("key", "pid", "ctl", "waiting", "started", "last", "served")

    def __init__(self, key: tuple[int, int], pid: int, ctl: socket.socket, now: float) -> None:
        self.key = key
        self.pid = pid
        self.ctl = ctl  # the parent's end of the socket pair
        self.waiting = 0  # questions handed over and not yet answered
        self.started = now  # when the question it works on began (if waiting)
        self.last = now  # when it was last handed a question
        self.served = 0


class _Lookup:
    """A question waiting for its user lookup child."""

    __slots__ = ("pid", "fd", "conn", "local", "data", "deadline")

    def __init__(self, pid: int, fd: int, conn: socket.socket, local: bytes, deadline: float) -> None:
        self.pid = pid
        self.fd = fd  # the read end of the child's answer pipe
        self.conn = conn
        self.local = local
        self.data = b""
        self.deadline = deadline


def _answered(lookup: Callable[[], users.Assignment]) -> Callable[[bytes], users.Assignment]:
    """qmail-getpw's rules as a lookup child or helper answered them: its assignment, or its failure raised."""
    try:
        who = lookup()
    except getpwchild.LookupFailed as e:
        failed = e

        def refused(local: bytes) -> users.Assignment:
            raise users.GetpwError(failed.code, str(failed))

        return refused
    return lambda local: who


class _Helper:
    """A long-lived user lookup process (getpwchild.start_helper) as the parent sees it."""

    __slots__ = ("pid", "sock", "lookup", "since", "served")

    def __init__(self, pid: int, sock: socket.socket, now: float) -> None:
        self.pid = pid
        self.sock = sock  # the parent's end of its socket pair, non-blocking
        self.lookup: _Lookup | None = None  # the question it is answering
        self.since = now  # when it became idle
        self.served = 0


class _Pending:
    """A connection whose question has not all arrived."""

    __slots__ = ("conn", "data", "deadline")

    def __init__(self, conn: socket.socket, deadline: float) -> None:
        self.conn = conn
        self.data = b""
        self.deadline = deadline


class _Stop(BaseException):
    """SIGTERM: not an Exception, so that no `except Exception` of a question swallows it."""


def _on_term(signum: int, frame: object) -> None:
    raise _Stop


class Daemon:
    """The parent's poll loop: read questions, answer or hand them to workers, keep workers in bounds."""

    def __init__(self, srv: socket.socket, checker: Checker, qmaild: int, limit: float,
                 idle: float, questions_max: int, read: float = READ_SECONDS,
                 lookup: float = getpwchild.LOOKUP_SECONDS) -> None:
        self.srv = srv
        self.checker = checker
        self.qmaild = qmaild
        self.limit = limit
        self.idle = idle
        self.questions_max = questions_max
        self.read_seconds = read
        self.lookup_seconds = lookup
        self.lookups: dict[int, _Lookup] = {}  # by the answer pipe's descriptor
        self.reaped: dict[int, int] = {}  # lookup children reaped before their answer was read: pid -> status
        self.helpers: dict[int, _Helper] = {}  # by pid, those not yet retired
        self.sel = selectors.DefaultSelector()
        self.pending: dict[int, _Pending] = {}
        self.workers: dict[tuple[int, int], _Worker] = {}
        self.by_pid: dict[int, _Worker] = {}
        self.dying: set[int] = set()  # killed or retired workers not yet reaped
        self.listening = False

    def run(self) -> None:
        """Serve until SIGTERM (_Stop) or a failure of the listening socket (OSError)."""
        self.srv.setblocking(False)
        while True:
            want = len(self.pending) < PENDING_MAX
            if want != self.listening:
                if want:
                    self.sel.register(self.srv, selectors.EVENT_READ, None)
                else:
                    self.sel.unregister(self.srv)
                self.listening = want
            now = time.monotonic()
            events = self.sel.select(self._timeout(now))
            for key, _ in events:
                # A descriptor closed by an earlier event of this round may have been reused.
                if key.data is None:
                    self._accept()
                elif isinstance(key.data, _Pending) and self.pending.get(key.fd) is key.data:
                    self._read(key.data)
                elif isinstance(key.data, _Worker) and self.by_pid.get(key.data.pid) is key.data:
                    self._done(key.data)
                elif isinstance(key.data, _Lookup) and self.lookups.get(key.fd) is key.data:
                    self._answer(key.data)
                elif isinstance(key.data, _Helper) and self.helpers.get(key.data.pid) is key.data:
                    self._helper_answer(key.data)
            self._tend(time.monotonic())

    def _timeout(self, now: float) -> float:
        """Seconds until the next deadline (a question's arrival, a worker's limit or idle time)."""
        soon = now + 5.0
        for p in self.pending.values():
            soon = min(soon, p.deadline)
        for w in self.workers.values():
            soon = min(soon, w.started + self.limit if w.waiting else w.last + self.idle)
        for lk in self.lookups.values():
            soon = min(soon, lk.deadline)
        for h in self.helpers.values():
            soon = min(soon, h.lookup.deadline if h.lookup is not None else h.since + getpwchild.HELPER_IDLE)
        return max(0.0, soon - now)

    def _accept(self) -> None:
        while len(self.pending) < PENDING_MAX:
            try:
                conn, _ = self.srv.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: the questions wait in the backlog
                _say(f"unable to accept: {e.strerror or e}")
                return
            try:
                allowed = _allowed(conn, self.qmaild)
            except OSError:
                allowed = False
            if not allowed:
                conn.close()
                continue
            conn.setblocking(False)
            p = _Pending(conn, time.monotonic() + self.read_seconds)
            self.pending[conn.fileno()] = p
            self.sel.register(conn, selectors.EVENT_READ, p)

    def _drop_pending(self, p: _Pending) -> None:
        self.sel.unregister(p.conn)
        del self.pending[p.conn.fileno()]

    def _read(self, p: _Pending) -> None:
        """Read what has arrived of a question; a whole one is decided, a malformed one closed."""
        try:
            chunk = p.conn.recv(rcptcheck.LOCAL_MAX + 2 - len(p.data))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        p.data += chunk
        if b"\0" in p.data:
            self._drop_pending(p)
            self._question(p.conn, p.data.split(b"\0", 1)[0])
        elif not chunk or len(p.data) > rcptcheck.LOCAL_MAX:
            self._drop_pending(p)
            p.conn.close()  # malformed: no answer, as a request cut short

    def _question(self, conn: socket.socket, local: bytes) -> None:
        try:
            decided = self.checker.decide(local, _miss)
        except _Miss:
            self._start_lookup(conn, local)
            return
        self._route(conn, decided)

    # User lookups in a child (review of session 5, finding 2) -------------------------

    def _start_lookup(self, conn: socket.socket, local: bytes) -> None:
        """Run qmail-getpw's rules for local in a helper or a child; conn waits for its answer or deadline."""
        busy = sum(1 for h in self.helpers.values() if h.lookup is not None)
        if len(self.lookups) + busy >= LOOKUPS_MAX:
            _reply(conn, rcptcheck.Answer(rcptcheck.TEMPORARY, BUSY_LOOKUPS))
            return
        try:
            creds = self.checker.lookup_credentials()
        except users.GetpwError as e:
            _reply(conn, rcptcheck.Answer(rcptcheck.TEMPORARY, str(e)))
            return
        now = time.monotonic()
        h = self._idle_helper(creds, now)
        if h is not None:
            try:
                h.sock.send(getpwchild.request(local), socket.MSG_DONTWAIT)
            except OSError:
                self._retire_helper(h)  # it has gone: a child this time
            else:
                h.lookup = _Lookup(h.pid, -1, conn, local, now + self.lookup_seconds)
                return
        try:
            pid, fd = getpwchild.start(local, creds)
        except users.GetpwError as e:
            _reply(conn, rcptcheck.Answer(rcptcheck.TEMPORARY, str(e)))
            return
        except OSError as e:
            _reply(conn, rcptcheck.Answer(rcptcheck.TEMPORARY, f"unable to fork: {e.strerror or e}"))
            return
        os.set_blocking(fd, False)
        lk = _Lookup(pid, fd, conn, local, time.monotonic() + self.lookup_seconds)
        self.lookups[fd] = lk
        self.sel.register(fd, selectors.EVENT_READ, lk)

    def _answer(self, lk: _Lookup) -> None:
        """Read what the lookup child wrote; at its end, decide the question with its answer."""
        try:
            chunk = os.read(lk.fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if chunk and len(lk.data) < getpwchild.ANSWER_MAX:
            lk.data += chunk
            return
        self._drop_lookup(lk)
        status = self.reaped.pop(lk.pid, None)
        if status is None and chunk:
            os.kill(lk.pid, signal.SIGKILL)  # an answer past ANSWER_MAX: not qmail-getpw's
        if status is None:
            # Its answer pipe closed as it exited: it is a zombie now, or about to be.
            try:
                _, status = os.waitpid(lk.pid, 0)
            except ChildProcessError:
                status = users.QLX_SYS << 8
        self._route(lk.conn, self.checker.decide(
            lk.local, _answered(lambda: getpwchild.result(status, lk.data, lk.local))))

    def _idle_helper(self, creds: Credentials | None, now: float) -> _Helper | None:
        """Return an idle helper, a new one if fewer than HELPERS_MAX run, else None."""
        for h in self.helpers.values():
            if h.lookup is None:
                return h
        if len(self.helpers) >= getpwchild.HELPERS_MAX:
            return None
        try:
            pid, sock = getpwchild.start_helper(creds)
        except OSError as e:
            _say(f"unable to fork a user lookup helper: {e.strerror or e}")
            return None
        h = _Helper(pid, sock, now)
        self.helpers[pid] = h
        self.sel.register(sock, selectors.EVENT_READ, h)
        return h

    def _helper_answer(self, h: _Helper) -> None:
        """Take a helper's answer and decide its question; an end or a word out of turn retires it."""
        heard = getpwchild.hear(h)
        if heard is None:
            return
        answer, retire = heard
        lk, h.lookup = h.lookup, None
        if retire:
            self._retire_helper(h)
        if lk is not None:
            self._helper_decide(lk, answer)

    def _helper_decide(self, lk: _Lookup, answer: bytes) -> None:
        """Decide lk's question with a helper's answer (empty: it ended without one)."""
        self._route(lk.conn, self.checker.decide(
            lk.local, _answered(lambda: getpwchild.helper_result(answer, lk.local))))

    def _retire_helper(self, h: _Helper, reaped: bool = False) -> None:
        """Forget a helper and end it (SIGKILL unless reaped: idle it holds nothing, busy it is late)."""
        if self.helpers.get(h.pid) is not h:
            return
        del self.helpers[h.pid]
        self.sel.unregister(h.sock)
        h.sock.close()
        if not reaped:
            try:
                os.kill(h.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # safe: not reaped yet, so it is ours; nothing to end
            self.dying.add(h.pid)

    def _drop_lookup(self, lk: _Lookup) -> None:
        self.sel.unregister(lk.fd)
        del self.lookups[lk.fd]
        os.close(lk.fd)

    def _route(self, conn: socket.socket, decided: rcptcheck.Answer | users.Assignment) -> None:
        """Answer conn, or hand it with who must look to that user's worker."""
        if isinstance(decided, rcptcheck.Answer):
            _reply(conn, decided)
            return
        creds = self.checker.credentials(decided)
        key = (os.getuid(), os.getgid()) if creds is None else (creds.uid, creds.gid)
        now = time.monotonic()
        w = self.workers.get(key)
        if w is None:
            if len(self.workers) >= CHILDREN_MAX:
                idle = [x for x in self.workers.values() if not x.waiting]
                if not idle:
                    _reply(conn, rcptcheck.Answer(rcptcheck.TEMPORARY, BUSY_ALL))
                    return
                self._retire(min(idle, key=lambda x: x.last))
            try:
                w = self._fork(key, creds, now, conn)
            except OSError as e:
                _reply(conn, rcptcheck.Answer(rcptcheck.TEMPORARY, f"unable to fork: {e.strerror or e}"))
                return
        if w.waiting >= QUEUE_MAX:
            _reply(conn, rcptcheck.Answer(rcptcheck.TEMPORARY, BUSY))
            return
        try:
            w.ctl.sendmsg([handoff(decided)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [conn.fileno()]))],
                          socket.MSG_DONTWAIT)
        except BlockingIOError:
            _reply(conn, rcptcheck.Answer(rcptcheck.TEMPORARY, BUSY))
            return
        except OSError as e:  # the worker has gone: a new one for the next question
            self._retire(w)
            _reply(conn, rcptcheck.Answer(rcptcheck.TEMPORARY, f"worker lost: {e.strerror or e}"))
            return
        conn.close()  # the worker holds it now
        if not w.waiting:
            w.started = now
        w.waiting += 1
        w.last = now
        w.served += 1

    def _fork(self, key: tuple[int, int], creds: Credentials | None, now: float, conn: socket.socket) -> _Worker:
        """Start a worker for key; it takes creds in the child, before it reads anything.

        conn, the question being handed, is closed in the child: it arrives
        over the pair like any other (a copy kept would hold the client's
        connection open for the worker's life).
        """
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            # TERM blocked across fork: the child must not run the parent's _Stop cleanup.
            pid = workers.fork_term_blocked()
        except OSError:
            mine.close()
            theirs.close()
            raise
        if pid == 0:
            code = 111
            try:
                self._forget_all()
                conn.close()
                mine.close()
                from pyqmail.proctitle import set_title

                set_title(WORKER_COMM, ["qmail-rcptcheckd", "worker", str(key[0])])
                code = work(theirs, creds, self.limit)
            finally:
                os._exit(code)
        theirs.close()
        mine.setblocking(False)
        w = _Worker(key, pid, mine, now)
        self.workers[key] = w
        self.by_pid[pid] = w
        self.sel.register(mine, selectors.EVENT_READ, w)
        return w

    def _forget_all(self) -> None:
        """In a new worker: close every descriptor of the parent's (the listener, questions, other workers)."""
        self.sel.close()
        self.srv.close()
        for p in self.pending.values():
            p.conn.close()
        for w in self.workers.values():
            w.ctl.close()
        for lk in self.lookups.values():
            lk.conn.close()
            os.close(lk.fd)
        for h in self.helpers.values():
            h.sock.close()
            if h.lookup is not None:
                h.lookup.conn.close()

    def _done(self, w: _Worker) -> None:
        """Count the answers a worker reports; its end of the pair closed: it has gone."""
        while True:  # one byte a message (SOCK_SEQPACKET)
            try:
                got = w.ctl.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                got = b""
            if not got:
                self._retire(w)
                return
            w.waiting = max(0, w.waiting - len(got))
            w.started = time.monotonic()

    def _forget(self, w: _Worker) -> bool:
        """Drop a worker's record and close our end of its pair; False if it was already forgotten."""
        if self.by_pid.get(w.pid) is not w:
            return False
        del self.by_pid[w.pid]
        if self.workers.get(w.key) is w:
            del self.workers[w.key]
        self.sel.unregister(w.ctl)
        w.ctl.close()
        return True

    def _retire(self, w: _Worker) -> None:
        """Forget a worker and end it: SIGKILL, which a stopped one cannot ignore.

        Its questions in flight close with the socket pair (the client reads
        no answer: TEMPORARY). An idle worker loses nothing by the kill. Only
        a worker not yet reaped is killed: its pid cannot have been reused.
        """
        if self._forget(w):
            try:
                os.kill(w.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # safe: cannot happen before we reap it; nothing to end
            self.dying.add(w.pid)

    def _tend(self, now: float) -> None:
        """Reap exited workers, kill those past their limit, retire idle and worn ones, drop late questions."""
        looking = {lk.pid for lk in self.lookups.values()}
        for pid, status in workers.reaped() if self.by_pid or self.dying or looking or self.helpers else ():
            self.dying.discard(pid)
            if pid in looking:
                self.reaped[pid] = status  # its answer is read from its pipe
            helper = self.helpers.get(pid)
            if helper is not None:
                lk, answer = helper.lookup, b""
                if lk is not None:
                    try:
                        answer = helper.sock.recv(getpwchild.ANSWER_MAX + 2, socket.MSG_DONTWAIT)
                    except OSError:
                        answer = b""  # ended without an answer
                self._retire_helper(helper, reaped=True)  # reaped: never kill its pid
                if lk is not None:
                    self._helper_decide(lk, answer)
            gone = self.by_pid.get(pid)
            if gone is not None:
                self._forget(gone)  # reaped: never kill its pid again
        for lk in list(self.lookups.values()):
            if now >= lk.deadline:
                _say(f"killing the user lookup for {lk.local.decode('utf-8', 'backslashreplace')}: "
                     f"no answer in {self.lookup_seconds:g} seconds")
                self._drop_lookup(lk)
                if self.reaped.pop(lk.pid, None) is None:
                    try:
                        os.kill(lk.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass  # safe: not reaped yet, so it is ours; nothing to end
                    self.dying.add(lk.pid)
                _reply(lk.conn, rcptcheck.Answer(rcptcheck.TEMPORARY,
                                                 f"user lookup timed out after {self.lookup_seconds:g} seconds"))
        for h in list(self.helpers.values()):
            late = h.lookup
            if late is not None and now >= late.deadline:
                _say(f"killing the user lookup for {late.local.decode('utf-8', 'backslashreplace')}: "
                     f"no answer in {self.lookup_seconds:g} seconds")
                h.lookup = None
                self._retire_helper(h)
                _reply(late.conn, rcptcheck.Answer(rcptcheck.TEMPORARY,
                                                   f"user lookup timed out after {self.lookup_seconds:g} seconds"))
            elif late is None and now >= h.since + getpwchild.HELPER_IDLE:
                self._retire_helper(h)
        for w in list(self.workers.values()):
            if w.waiting and now >= w.started + self.limit:
                _say(f"killing the worker for uid {w.key[0]}: busy for {self.limit:g} seconds")
                self._retire(w)
            elif not w.waiting and (now >= w.last + self.idle or w.served >= self.questions_max):
                self._retire(w)
        for p in list(self.pending.values()):
            if now >= p.deadline:
                self._drop_pending(p)
                p.conn.close()

    def close(self) -> None:
        """Stop: close every connection; workers finish what they hold and exit at their pair's end."""
        for p in list(self.pending.values()):
            p.conn.close()
        self.pending.clear()
        for lk in list(self.lookups.values()):
            lk.conn.close()
            os.close(lk.fd)
            if lk.pid not in self.reaped:
                try:
                    os.kill(lk.pid, signal.SIGKILL)  # a hung lookup would outlive us
                except ProcessLookupError:
                    pass  # safe: not reaped yet, so it is ours; nothing to end
        self.lookups.clear()
        for h in list(self.helpers.values()):
            if h.lookup is not None:
                h.lookup.conn.close()
                h.lookup = None
            self._retire_helper(h)
        for w in list(self.by_pid.values()):
            w.ctl.close()
        self.by_pid.clear()
        self.workers.clear()
        self.sel.close()


def _seconds(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


@program("qmail-rcptcheckd", crash=EXIT_FAIL)
def main(argv: list[str]) -> int:
    """Answer recipient checks on QMAILHOME/run/qmail-rcptcheck.sock until SIGTERM."""
    qmail_home = _home.home()
    inst = _home.install()
    qmaild = inst.uid("qmaild")
    if not inst.single and os.geteuid() != 0:
        _say("fatal: must run as root: it becomes each user to look at their .qmail files")
        return EXIT_FAIL
    checker = Checker(qmail_home, inst)
    path = os.path.join(qmail_home, SOCKET)
    signal.signal(signal.SIGTERM, _on_term)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    daemon = Daemon(srv, checker, qmaild, _seconds(CHILD_SECONDS_ENV, CHILD_SECONDS),
                    _seconds(IDLE_SECONDS_ENV, IDLE_SECONDS), int(_seconds(QUESTIONS_MAX_ENV, QUESTIONS_MAX)),
                    _seconds(READ_SECONDS_ENV, READ_SECONDS), _seconds(LOOKUP_SECONDS_ENV, getpwchild.LOOKUP_SECONDS))
    mine = -1
    try:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        # The socket is made 0666 by bind itself: who may ask is decided by SO_PEERCRED.
        # No chmod afterwards: run/ is qmailq's, and a path can be swapped for a symlink.
        old = os.umask(0o111)
        try:
            srv.bind(path)
        finally:
            os.umask(old)
        mine = os.lstat(path).st_ino
        srv.listen(64)
        daemon.run()
    except _Stop:
        pass
    except OSError as e:
        _say(f"fatal: {path}: {e.strerror or e}")
        return EXIT_FAIL
    finally:
        daemon.close()
        srv.close()
    # Only our own socket: a successor started meanwhile (supervise restarting a service
    # whose old process it has just sent TERM) has bound a new one at the same path.
    try:
        if os.lstat(path).st_ino == mine:
            os.unlink(path)
    except FileNotFoundError:
        pass
    return 0
