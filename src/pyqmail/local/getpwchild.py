"""qmail-getpw's rules in a short-lived child, for the root parents of qmail-lspawn and qmail-rcptcheckd.

getpwnam goes through NSS (LDAP, sssd) and the rules stat the candidate's home
directory (an NFS home, a FUSE file system its user mounted there): either can
block for as long as the source or the mount likes. qmail 1.03 ran qmail-getpw
in the delivery's child; the daemons here keep one loop for every user, so a
users/cdb miss is looked up in a process of its own, with qmailp's ids and the
one group nofiles as qmail-lspawn gave qmail-getpw: a long-lived helper
(start_helper) when one is free, else a child for that lookup alone (start);
the parent reads the answer without blocking and kills the process past a
deadline (review of session 5, finding 2; docs/DESIGN.md).

The child writes its answer on a pipe and exits: 0 and the answer, or
qmail-getpw's exit code (QLX_NOALIAS, QLX_NFS, QLX_SYS) and nothing. The
answer carries no extension: qmail-getpw's extension is always the end of
the local part, so its length is enough, and the answer stays far below a
pipe's buffer (user, ids and home: under 4200 bytes), so the child never
waits for its reader.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from pyqmail import spawn, workers
from pyqmail.local import users
from pyqmail.privs import Credentials, drop

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from typing import Protocol

    class HelperLike(Protocol):
        """What qmail-lspawn's and qmail-rcptcheckd's records of a helper have in common."""

        sock: socket.socket
        since: float
        served: int

        @property
        def lookup(self) -> object | None: ...

LOOKUP_SECONDS = 30.0  # a lookup child that has not answered by then is killed: temporary failure
ANSWER_MAX = 8192  # bytes of an answer read (user 31, ids, a home path of at most PATH_MAX)
_EXTLEN = struct.Struct("!I")


class LookupFailed(Exception):
    """The lookup child did not answer; .code is qmail-lspawn's exit for it (qmail-getpw's, or QLX_SYS)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def encode(who: users.Assignment, local: bytes) -> bytes:
    """Return the child's answer for who (its extension as a length: a suffix of local)."""
    if not local.endswith(who.ext):
        raise ValueError("extension is not the end of the local part")
    return _EXTLEN.pack(len(who.ext)) + b"".join(f + b"\0" for f in (who.user, who.uid, who.gid, who.homedir, who.dash))


def decode(data: bytes, local: bytes) -> users.Assignment:
    """Return the Assignment an answer carries for local; raise LookupFailed(QLX_USAGE) if malformed."""
    if len(data) < _EXTLEN.size:
        raise LookupFailed(users.QLX_USAGE, "short answer from the lookup child")
    (extlen,) = _EXTLEN.unpack_from(data)
    fields = data[_EXTLEN.size:].split(b"\0")
    if len(fields) != 6 or fields[5] or extlen > len(local):
        raise LookupFailed(users.QLX_USAGE, "malformed answer from the lookup child")
    return users.Assignment(fields[0], fields[1], fields[2], fields[3], fields[4], local[len(local) - extlen:])


def start(local: bytes, creds: Credentials | None) -> tuple[int, int]:
    """Fork a child applying qmail-getpw's rules to local (as creds, if given); return (pid, answer fd).

    The answer descriptor is the read end of a pipe, close-on-exec; the
    child holds nothing else of the parent's (its descriptors are closed but
    for 2), so that a hung lookup holds no other delivery's pipe open.
    SIGTERM is blocked across the fork: the child must not run the parent's
    handler. Raise OSError if the pipe or the fork fails.
    """
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = workers.fork_term_blocked()
    except OSError:
        os.close(r)
        os.close(w)
        raise
    if pid == 0:
        code = users.QLX_SYS
        try:
            os.dup2(w, 1)
            os.closerange(0, 1)
            os.closerange(3, spawn._MAX_FD)
            code = _child(local, creds)
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _child(local: bytes, creds: Credentials | None) -> int:
    """Apply the rules and write the answer on descriptor 1; return the exit code."""
    if creds is not None:
        try:
            drop(creds)
        except Exception:  # noqa: BLE001 - qmail-lspawn's prot_uid failing: QLX_USAGE
            return users.QLX_USAGE
    try:
        who = users.getpw(local)
    except users.GetpwError as e:
        return e.code
    data = encode(who, local)
    while data:
        n = os.write(1, data)
        data = data[n:]
    return 0


def result(status: int, data: bytes, local: bytes) -> users.Assignment:
    """Return the child's answer from its wait status and output; raise LookupFailed as qmail-lspawn reads qmail-getpw.

    Killed (at the deadline too): QLX_SYS, qmail 1.03's reading of a crashed
    qmail-getpw ("Temporary failure in qmail-lspawn."); a nonzero exit: that code.
    """
    if os.WIFSIGNALED(status):
        raise LookupFailed(users.QLX_SYS, f"the user lookup was killed by signal {os.WTERMSIG(status)}")
    code = os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else users.QLX_SYS
    if code != 0:
        raise LookupFailed(code, f"the user lookup exited {code}")
    return decode(data, local)


def read_all(fd: int) -> bytes:
    """Read what the exited child left in fd, without blocking, at most ANSWER_MAX bytes; close fd."""
    out = bytearray()
    try:
        os.set_blocking(fd, False)
        while len(out) <= ANSWER_MAX:
            try:
                chunk = os.read(fd, 4096)
            except InterruptedError:
                continue
            except BlockingIOError:
                break  # a descendant holds the pipe: what the child wrote is all here
            if not chunk:
                break
            out += chunk
    except OSError:
        pass  # safe: a cut answer fails to decode (QLX_USAGE), a temporary failure
    finally:
        os.close(fd)
    return bytes(out)


# A pool of long-lived lookup processes ---------------------------------------------------
#
# A child per lookup pays a fork, an exit and the child's first NSS call (glibc loads
# its modules afresh in every new process) on every users/cdb miss: about 2 ms. A helper
# is the same child kept: forked once, dropped to qmailp:nofiles for good, it answers
# one local part after another over a socket pair, so NSS stays loaded. The parent
# sends a helper at most one lookup at a time and keeps the same deadline: a helper
# that has not answered by then is SIGKILLed (its lookup fails as a killed child's) and
# another is forked when one is needed. Past HELPERS_MAX busy helpers the parent falls
# back to a child per lookup (start), so hung lookups never queue the others.

HELPERS_MAX = 4  # helpers at once; past that, a child per lookup
HELPER_COMM = "qmail-getpw"  # a helper's name in ps: it is qmail-getpw, kept
HELPER_IDLE = 60.0  # seconds a helper waits for its next lookup before the parent retires it
HELPER_LOOKUPS = 1000  # lookups a helper answers before the parent retires it
_REQUEST = b"L"  # a request is this byte and the local part (never an empty message: that is the end)
REQUEST_MAX = 1 << 17  # bytes of a request a helper reads (a local part is at most 64 KiB)


def start_helper(creds: Credentials | None) -> tuple[int, socket.socket]:
    """Fork a helper answering lookups as creds; return (pid, the parent's end, non-blocking); raise OSError."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        pid = workers.fork_term_blocked()
    except OSError:
        mine.close()
        theirs.close()
        raise
    if pid == 0:
        code = users.QLX_SYS
        try:
            mine.detach()
            keep = theirs.fileno()
            os.closerange(0, 2)
            os.closerange(3, keep)
            os.closerange(keep + 1, spawn._MAX_FD)
            from pyqmail.proctitle import set_title

            set_title(HELPER_COMM, [HELPER_COMM, "helper"])
            code = _helper(theirs, creds)
        finally:
            os._exit(code)
    theirs.close()
    mine.setblocking(False)
    return pid, mine


def request(local: bytes) -> bytes:
    """Return the message asking a helper about local."""
    return _REQUEST + local


def _helper(sock: socket.socket, creds: Credentials | None) -> int:
    """A helper's life: answer each request with its exit code byte and answer, until the parent closes."""
    failed = False
    if creds is not None:
        try:
            drop(creds)
        except Exception:  # noqa: BLE001 - as a child's failed drop: QLX_USAGE for every lookup
            failed = True
    while True:
        msg = sock.recv(REQUEST_MAX)
        if not msg.startswith(_REQUEST):
            return 0
        local = msg[1:]
        if failed:
            answer = bytes((users.QLX_USAGE,))
        else:
            try:
                answer = b"\0" + encode(users.getpw(local), local)
            except users.GetpwError as e:
                answer = bytes((e.code & 0xFF,))
            except Exception:  # noqa: BLE001 - as qmail-getpw's crash: QLX_SYS
                answer = bytes((users.QLX_SYS,))
        sock.send(answer)


def helper_result(answer: bytes, local: bytes) -> users.Assignment:
    """Return a helper's answer for local; raise LookupFailed as result() does (an empty answer: it died)."""
    if not answer:
        raise LookupFailed(users.QLX_SYS, "the user lookup helper ended without an answer")
    return result(answer[0] << 8, answer[1:], local)


def hear(h: HelperLike) -> tuple[bytes, bool] | None:
    """Read helper h's answer (b"": it ended); None if there is nothing to read yet.

    Returns (answer, retire): h has served one more lookup and is idle from now; retire
    when it ended, spoke out of turn (no lookup of h's) or has served HELPER_LOOKUPS.
    The caller takes h.lookup.
    """
    try:
        answer = h.sock.recv(ANSWER_MAX + 2)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        answer = b""
    h.since = time.monotonic()
    h.served += 1
    return answer, not answer or h.lookup is None or h.served >= HELPER_LOOKUPS
