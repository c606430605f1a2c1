"""qmail-rcptcheckd: tell qmail-smtpd whether a local address has a mailbox (recipient validation, root mode).

    qmail-rcptcheckd

qmail-smtpd runs as qmaild and cannot look into users' homes; qmail-lspawn
can, because it runs as root and becomes each user. qmail-rcptcheckd answers
the one question qmail-smtpd needs, on QMAILHOME/run/qmail-rcptcheck.sock,
the way qmail-lspawn and qmail-local would decide it
(pyqmail.local.rcptcheck.check_local): for each connection it forks a
child that reads a local part (already rewritten by qmail-send's rules,
which qmail-smtpd applies itself from the world-readable control files),
finds its user with users.controller (qmail-getpw's rules with qmailp's ids,
as qmail-lspawn), drops to that user's uid and gid (never root) and searches
the home for the .qmail file qmail-local would use. It answers one line:
``K`` (delivered), ``D`` (no mailbox here by that name), ``Z`` and a reason
(cannot check now). Nothing is cached: a .qmail made or removed a moment ago
decides the next question.

Only root and qmaild (SO_PEERCRED) are answered: the socket tells nobody more
than RCPT TO tells any SMTP client, and nobody else needs it. A request is
at most 1000 bytes ended by NUL; a child lives at most 30 seconds (its own
alarm, and the parent's SIGKILL for a child its user has stopped); at most 40
children run at once. SIGTERM: remove the socket and exit 0. Errors go to
descriptor 2 (multilog).
"""

from __future__ import annotations

import os
import socket
import struct
import time

from pyqmail import home as _home
from pyqmail import sig as signal
from pyqmail.entry import program
from pyqmail.local import rcptcheck, users
from pyqmail.privs import Credentials, PrivilegeError, drop

SOCKET = "run/qmail-rcptcheck.sock"
EXIT_FAIL = 111
CHILDREN_MAX = 40
CHILD_SECONDS = 30
READ_SECONDS = 10
CHILD_SECONDS_ENV = "PYQMAIL_RCPTCHECKD_CHILD_SECONDS"  # test seam: CHILD_SECONDS
FULL_PAUSE = 0.05  # seconds between looks for a free slot when CHILDREN_MAX run
_UCRED = struct.Struct("3i")


def _say(text: str) -> None:
    try:
        os.write(2, f"qmail-rcptcheckd: {text}\n".encode("utf-8", "backslashreplace"))
    except OSError:
        pass  # safe: nowhere left to report; the answer on the socket still says what happened


def _read_request(conn: socket.socket) -> bytes | None:
    """Return the local part asked about (up to its NUL), or None for a malformed or late request."""
    conn.settimeout(READ_SECONDS)
    data = b""
    while b"\0" not in data:
        if len(data) > rcptcheck.LOCAL_MAX:
            return None
        try:
            chunk = conn.recv(rcptcheck.LOCAL_MAX + 2 - len(data))
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    return data.split(b"\0", 1)[0]


class Checker:
    """The lookup of one child, with the identities qmail-lspawn would use."""

    def __init__(self, qmail_home: str, inst: _home.Install) -> None:
        self.home = qmail_home
        self.inst = inst

    def rules(self, local: bytes) -> users.Assignment:
        """qmail-getpw's rules, run with qmailp's ids and the one group nofiles (as qmail-lspawn runs them)."""
        if self.inst.single or os.geteuid() != 0:
            return users.getpw(local)
        acct = self.inst.users.get("qmailp")
        gid = self.inst.groups.get("nofiles")
        if acct is None or gid is None:
            raise users.GetpwError(users.QLX_USAGE, "no qmailp user or nofiles group")
        os.setgroups([gid])
        os.setegid(gid)
        os.seteuid(acct.uid)
        try:
            return users.getpw(local)
        finally:
            os.seteuid(0)
            os.setegid(0)

    def become(self, who: users.Assignment) -> rcptcheck.Answer | None:
        """Drop to who's uid and gid, as qmail-lspawn does before qmail-local."""
        uid, gid = rcptcheck.scan_ulong(who.uid), rcptcheck.scan_ulong(who.gid)
        if self.inst.single:
            return rcptcheck.single_user_become(who)
        try:
            drop(Credentials(uid, gid))
        except (OSError, PrivilegeError) as e:
            return rcptcheck.Answer(rcptcheck.TEMPORARY, f"unable to become uid {uid}: {e}")
        return None

    def answer(self, local: bytes) -> rcptcheck.Answer:
        return rcptcheck.check_local(local, os.path.join(self.home, "users", "cdb"), self.become, self.rules)


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
                chunk = s.recv(2048)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        return rcptcheck.Answer(rcptcheck.TEMPORARY, f"qmail-rcptcheckd: {e.strerror or e}")
    return decode(data)


def serve_one(conn: socket.socket, checker: Checker) -> int:
    """In a child: read the question, answer it, return the exit code."""
    local = _read_request(conn)
    if local is None:
        return 100
    try:
        answer = checker.answer(local)
    except Exception as e:  # noqa: BLE001 - any trouble is "cannot check now", never "no mailbox"
        answer = rcptcheck.Answer(rcptcheck.TEMPORARY, f"internal error: {type(e).__name__}")
    if answer.code == rcptcheck.TEMPORARY:
        _say(f"cannot check a local part: {answer.why}")
    try:
        conn.sendall(encode(answer))
    except OSError:
        return 111
    return 0


def _allowed(conn: socket.socket, qmaild: int) -> bool:
    pid, uid, gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return uid in (0, qmaild, os.getuid())


class _Stop(Exception):
    pass


def _on_term(signum: int, frame: object) -> None:
    raise _Stop


def _reap(children: dict[int, float]) -> None:
    """Forget the children that have exited."""
    while children:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.pop(pid, None)


def _kill_overdue(children: dict[int, float], now: float) -> None:
    """SIGKILL the children past their deadline: the parent's limit, which a stopped child cannot ignore.

    A child runs as the recipient's user, who may stop it (SIGSTOP, then its
    own alarm is never acted on); CHILDREN_MAX such children would otherwise
    hold every slot and defer every recipient check of the host.
    """
    for pid, deadline in list(children.items()):
        if now >= deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # safe: it has exited; _reap forgets it
            children[pid] = float("inf")  # killed once; reaped when the kernel says so


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
    children: dict[int, float] = {}  # pid: the monotonic time it is killed at
    limit = float(os.environ.get(CHILD_SECONDS_ENV) or CHILD_SECONDS)
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
        srv.settimeout(5.0)
        while True:
            _reap(children)
            _kill_overdue(children, time.monotonic())
            if len(children) >= CHILDREN_MAX:
                time.sleep(FULL_PAUSE)  # safe: bounded; questions wait in the listen backlog
                continue
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                if not _allowed(conn, qmaild):
                    continue
                pid = os.fork()
                if pid == 0:
                    code = 111
                    try:
                        signal.signal(signal.SIGTERM, signal.SIG_DFL)
                        signal.alarm(max(1, int(limit)))
                        srv.close()
                        code = serve_one(conn, checker)
                    finally:
                        os._exit(code)
                children[pid] = time.monotonic() + limit
    except _Stop:
        pass
    except OSError as e:
        _say(f"fatal: {path}: {e.strerror or e}")
        return EXIT_FAIL
    finally:
        srv.close()
    # Only our own socket: a successor started meanwhile (supervise restarting a service
    # whose old process it has just sent TERM) has bound a new one at the same path.
    try:
        if os.lstat(path).st_ino == mine:
            os.unlink(path)
    except FileNotFoundError:
        pass
    return 0
