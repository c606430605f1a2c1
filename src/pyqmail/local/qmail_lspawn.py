"""qmail-lspawn: schedule local deliveries (qmail-lspawn(8)).

    qmail-lspawn defaultdelivery

Reads delivery commands from qmail-send on descriptor 0 and reports on
descriptor 1 (pyqmail.send.spawnproto). For each recipient it forks a child
that finds the user controlling the local part (users/cdb, else the rules of
qmail-getpw), then becomes QMAILHOME/bin/qmail-local under that user's uid and
gid, in QMAILHOME, with the message on descriptor 0 and a pipe on 1 and 2;
what qmail-local prints is the report, its exit code the verdict (0 K,
111/71/74/75 Z, anything else D). Deliveries never run as root. An empty
local part is a trash address: delivered at once.

In a single-user installation every delivery runs as the installing user,
so a user with another uid is deferred with the reason.

When both bin/qmail-getpw and bin/qmail-local are pyqmail's own programs,
qmail-local runs in a per-user worker (issue 17): a process forked once for
a (uid, gid), dropped to it for good, that runs one delivery at a time, set
up as the child would be, and waits for the next delivery of that user. See
docs/DESIGN.md, "qmail-lspawn's per-user workers". The user is found here
when users/cdb has them (a read of a local file); otherwise qmail-getpw's
rules (NSS, a stat of the home) run in one of at most 4 long-lived lookup
helpers, one lookup each at a time, else a short-lived child of their own
(pyqmail.local.getpwchild), whose answer this loop takes when it comes, so a
hung home or NSS source holds up only that delivery; a lookup that has not
answered after PYQMAIL_LSPAWN_LOOKUP_SECONDS (30) is killed and the delivery
deferred as qmail 1.03 defers on a crashed qmail-getpw ("Temporary failure
in qmail-lspawn.").
"""

from __future__ import annotations

import array
import fcntl
import math
import os
import select
import socket
import time

from pyqmail import errors, spawn
from pyqmail import home as _home
from pyqmail import sig as signal
from pyqmail.entry import program
from pyqmail.local import getpwchild, users
from pyqmail.privs import Credentials, PrivilegeError, drop
from pyqmail.send import spawnproto
from pyqmail import workers

EXIT_USAGE = 100
TRUNCREPORT = 3000
GETPW_MAX = 65536  # bytes of qmail-getpw output read
LOCAL_PROGRAM = "bin/qmail-local"
GETPW_PROGRAM = "bin/qmail-getpw"
GETPW_MODULE = "pyqmail.local.qmail_getpw"
LOCAL_MODULE = "pyqmail.local.qmail_local"  # the one program a worker runs (it has worker_reset)

# What qmail-lspawn reports for the exit codes of its own children (qlx.h).
REPORTS = {
    users.QLX_CDB: b"ZTrouble reading users/cdb in qmail-lspawn.\n",
    users.QLX_NOMEM: b"ZOut of memory in qmail-lspawn.\n",
    users.QLX_SYS: b"ZTemporary failure in qmail-lspawn.\n",
    users.QLX_NOALIAS: b"ZUnable to find alias user!\n",
    users.QLX_ROOT: b"ZNot allowed to perform deliveries as root.\n",
    users.QLX_USAGE: b"ZInternal qmail-lspawn bug.\n",
    users.QLX_NFS: b"ZNFS failure in qmail-local.\n",
    users.QLX_EXECHARD: b"DUnable to run qmail-local.\n",
    users.QLX_EXECSOFT: b"ZUnable to run qmail-local.\n",
    users.QLX_EXECPW: b"ZUnable to run qmail-getpw.\n",
}
CRASHED = b"Zqmail-local crashed.\n"
TEMPORARY_EXITS = frozenset({111, 71, 74, 75})
SINGLE_USER = b"single-user installation: cannot deliver as user %s (#4.3.0)\n"

# Per-user workers (issue 17). Each bound can be changed through the environment.
WORKER_COMM = "qmail-lspawn-w"  # a worker's name in ps between deliveries (15 bytes at most)
WORKERS_ENV = "PYQMAIL_LSPAWN_WORKERS"  # live workers at most; 0: a child per delivery, as before
IDLE_ENV = "PYQMAIL_LSPAWN_IDLE"  # seconds an idle worker waits for its user's next delivery
DELIVERIES_ENV = "PYQMAIL_LSPAWN_DELIVERIES"  # deliveries a worker runs before it exits
LOOKUP_ENV = "PYQMAIL_LSPAWN_LOOKUP_SECONDS"  # a user lookup child's deadline (getpwchild.LOOKUP_SECONDS)
IDLE_SECONDS = 30.0
DELIVERIES_MAX = 200
WORKERS_DEFAULT = 10  # qmail-send's default concurrencylocal: at most this many deliveries run at once
HANDOFF_MAX = 1 << 16  # bytes of one delivery's fields a worker accepts: below a socket pair's send buffer (more goes to a child)
SETTLE_SECONDS = 30.0  # how long the parent waits for a worker's verdict after its output ended
_VERDICT = 2  # bytes: qmail-local's exit code, then 1 if the worker takes another delivery


def report(status: int, output: bytes) -> bytes:
    """Return the report for qmail-local's wait status and output (cut at its first NUL)."""
    if os.WIFSIGNALED(status):
        return CRASHED
    code = os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 111
    fixed = REPORTS.get(code)
    if fixed is not None:
        return fixed
    letter = b"K" if code == 0 else b"Z" if code in TEMPORARY_EXITS else b"D"
    return letter + output.split(b"\0", 1)[0]


def _scan_ulong(field: bytes) -> int:
    """Return the leading decimal digits of field as a number (0 if none), as qmail's scan_ulong."""
    n = 0
    for c in field:
        if not 48 <= c <= 57:
            break
        n = n * 10 + c - 48
    return n


class _Miss(Exception):
    """users/cdb does not name the user: qmail-getpw's rules must decide."""


class _Exit(Exception):
    """The delivery child ends here with this exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class LocalSpawner(spawnproto.Spawner):
    """qmail-lspawn's half of qmail's spawn.c."""

    truncreport = TRUNCREPORT

    def __init__(self, aliasempty: bytes, qmail_home: str, inst: _home.Install) -> None:
        uid_q = inst.uid("qmailq")
        super().__init__(uid_q if uid_q != -1 else os.getuid())
        self.workers_max = _env_int(WORKERS_ENV, WORKERS_DEFAULT)
        self.idle = _env_float(IDLE_ENV, IDLE_SECONDS)
        self.deliveries_max = max(1, _env_int(DELIVERIES_ENV, DELIVERIES_MAX))
        self._pool: dict[tuple[int, int], list[_Worker]] = {}  # live workers by (uid, gid)
        self._wpids: dict[int, _Worker] = {}  # every worker not yet reaped, retired ones too
        self._serving: dict[int, _Worker] = {}  # slot -> the worker running that delivery
        self._handed: _Worker | None = None  # the worker start() just gave a delivery to
        self.lookup_seconds = _env_float(LOOKUP_ENV, getpwchild.LOOKUP_SECONDS)
        self._lookups: dict[int, _Lookup] = {}  # user lookup children not yet reaped, by pid
        self._looking: _Lookup | None = None  # the lookup start() just began
        self._helpers: dict[int, _Helper] = {}  # lookup helpers not yet retired, by pid
        self._helpers_gone: set[int] = set()  # helpers retired and not yet reaped
        self._seq = 0
        self.aliasempty = aliasempty
        self.home = qmail_home
        self.inst = inst
        self.local_program = os.path.join(qmail_home, LOCAL_PROGRAM)
        self.getpw_program = os.path.join(qmail_home, GETPW_PROGRAM)
        # Import qmail-local's module here, once: every delivery child is a
        # fork of this process and starts it without importing anything.
        stub = spawn.read_stub(self.local_program)
        if stub is not None:
            try:
                __import__(stub.module, fromlist=["main"])
            except ImportError:
                pass

    def immediate(self, sender: bytes, recip: bytes, at: int) -> bytes | None:
        """An empty local part is a trash address: delivered, silently."""
        return b"K" if at == 0 else None

    def report(self, status: int, output: bytes) -> bytes:
        return report(status, output)

    def start(self, messfd: int, outfd: int, sender: bytes, recip: bytes, at: int) -> int:
        self._handed = None
        self._looking = None
        if self.workers_max > 0 and self._ours():
            return self._start_worker(messfd, outfd, sender, recip, at)
        return self._start_child(messfd, outfd, sender, recip, at)

    def _ours(self) -> bool:
        """True if bin/qmail-getpw and bin/qmail-local are pyqmail's programs (an admin's own are exec'd)."""
        getpw = spawn.read_stub(self.getpw_program)
        local = spawn.read_stub(self.local_program)
        return (getpw is not None and getpw.module == GETPW_MODULE and local is not None
                and local.module == LOCAL_MODULE and os.access(self.local_program, os.X_OK))

    def _start_child(self, messfd: int, outfd: int, sender: bytes, recip: bytes, at: int) -> int:
        pid = os.fork()
        if pid == 0:
            code = users.QLX_SYS
            try:
                # The parent's wakeup descriptor and SIGCHLD and SIGALRM handlers are not ours.
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
                code = self._child(messfd, outfd, sender, recip, at)
            except _Exit as e:
                code = e.code
            except BaseException as e:  # noqa: BLE001 - the child must end in _exit, temporarily
                _say(outfd, f"qmail-lspawn: {type(e).__name__}: {e}\n".encode("utf-8", "replace"))
                code = 111
            finally:
                os._exit(code)
        return pid

    # In the child ----------------------------------------------------------------

    def _child(self, messfd: int, outfd: int, sender: bytes, recip: bytes, at: int) -> int:
        """Find the user and become qmail-local; return an exit code only on failure."""
        local, domain = recip[:at], recip[at + 1:]
        try:
            os.chdir(self.home)
        except OSError:
            return users.QLX_USAGE
        who = self._lookup(local)
        uid = _scan_ulong(who.uid)
        gid = _scan_ulong(who.gid)
        if self.inst.single and uid != os.getuid():
            _say(outfd, SINGLE_USER % who.user)
            return 111
        if uid == 0:
            return users.QLX_ROOT
        argv = [LOCAL_PROGRAM, "--"] + [os.fsdecode(a) for a in (
            who.user, who.homedir, local, who.dash, who.ext, domain, sender, self.aliasempty)]
        try:
            drop(Credentials(uid, gid))
        except (OSError, PrivilegeError):
            return users.QLX_USAGE
        try:
            spawn.become(self.local_program, argv, fds={0: messfd, 1: outfd, 2: outfd})
        except OSError as e:
            return users.QLX_EXECSOFT if errors.temporary(e) else users.QLX_EXECHARD

    def _lookup(self, local: bytes) -> users.Assignment:
        """Return who controls local (users.controller: users/cdb, then qmail-getpw); raise _Exit on trouble."""
        try:
            return users.controller(local, os.path.join(self.home, "users", "cdb"), self._getpw)
        except users.UsersCdbError as e:
            raise _Exit(e.code) from None

    def _getpw(self, local: bytes) -> users.Assignment:
        """qmail-getpw's answer for local: its rules in this process when the program is ours."""
        stub = spawn.read_stub(self.getpw_program)
        if stub is not None and stub.module == GETPW_MODULE:
            return self._getpw_here(local)
        return self._run_getpw(local)

    def _getpw_here(self, local: bytes) -> users.Assignment:
        """Apply qmail-getpw's rules here, with the ids it would run under; raise _Exit on trouble.

        bin/qmail-getpw is our own program, so its answer is users.getpw's: computed
        in this delivery child instead of a process of its own (issue 17). In root mode
        the program runs as qmailp with the one group nofiles, and what it may stat
        depends on that, so the child takes those ids as its effective ids for the
        lookup and takes root back afterwards (the real and saved uid stay 0) for the
        drop to the user. In single-user mode it would run as us anyway.
        """
        switched = False
        if not self.inst.single and os.geteuid() == 0:
            acct = self.inst.users.get("qmailp")
            gid = self.inst.groups.get("nofiles")
            if acct is None or gid is None:
                raise _Exit(users.QLX_USAGE)
            try:
                os.setgroups([gid])
                os.setegid(gid)
                os.seteuid(acct.uid)
            except OSError:
                raise _Exit(users.QLX_USAGE) from None
            switched = True
        try:
            return users.getpw(local)
        except users.GetpwError as e:
            raise _Exit(e.code) from None
        except Exception:  # noqa: BLE001 - as the program's crash: its temporary QLX_SYS
            raise _Exit(users.QLX_SYS) from None
        finally:
            if switched:
                os.seteuid(0)
                os.setegid(0)

    def _run_getpw(self, local: bytes) -> users.Assignment:
        """Run QMAILHOME/bin/qmail-getpw local (as qmailp in root mode) and parse its six fields."""
        creds = None
        if not self.inst.single:
            acct = self.inst.users.get("qmailp")
            gid = self.inst.groups.get("nofiles")
            if acct is None or gid is None:
                raise _Exit(users.QLX_USAGE)
            creds = Credentials(acct.uid, gid)
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = spawn.spawn(self.getpw_program, [GETPW_PROGRAM, os.fsdecode(local)], fds={1: w},
                              creds=creds)
        except OSError:
            os.close(r)
            raise _Exit(users.QLX_EXECPW) from None
        finally:
            os.close(w)
        out = bytearray()
        try:
            while len(out) < GETPW_MAX:
                try:
                    chunk = os.read(r, 4096)
                except InterruptedError:
                    continue
                if not chunk:
                    break
                out += chunk
        except OSError:
            raise _Exit(users.QLX_SYS) from None
        finally:
            os.close(r)
        code = spawn.wait(pid)
        if code < 0:
            raise _Exit(users.QLX_SYS)
        if code != 0:
            raise _Exit(code)
        fields = bytes(out).split(b"\0")
        if len(fields) < 7:
            raise _Exit(users.QLX_USAGE)
        return users.Assignment(*fields[:6])


    # Per-user workers (in the parent) ------------------------------------------------

    def run(self) -> int:
        # SIGALRM wakes the loop (through its wakeup descriptor) at a lookup's deadline.
        signal.signal(signal.SIGALRM, _no_op)
        return super().run()

    def docmd(self, slot: int, messid: bytes, sender: bytes, recip: bytes, ok: bool) -> None:
        self._handed = None
        self._looking = None
        super().docmd(slot, messid, sender, recip, ok)
        w, self._handed = self._handed, None
        lk, self._looking = self._looking, None
        d = self.deliveries.get(slot)
        if w is not None and d is not None and d.pid == w.pid:
            w.delivery = d
            self._serving[slot] = w
        if lk is not None and d is not None and d.pid == lk.pid:
            lk.delivery = d

    def _start_worker(self, messfd: int, outfd: int, sender: bytes, recip: bytes, at: int) -> int:
        """Hand the delivery to the recipient's worker (or a lookup child first); return its pid (a child's for the rest)."""
        local = recip[:at]
        try:
            who = self._lookup_parent(local)
        except _Exit as e:
            return self._verdict_child(outfd, e.code, b"")
        except _Miss:
            return self._start_lookup(messfd, outfd, sender, recip, at)
        return self._hand(who, messfd, outfd, sender, recip, at)

    def _hand(self, who: users.Assignment, messfd: int, outfd: int, sender: bytes, recip: bytes, at: int) -> int:
        """Hand the delivery for who to their worker; return its pid (a child's when it cannot); raise OSError."""
        local, domain = recip[:at], recip[at + 1:]
        uid = _scan_ulong(who.uid)
        gid = _scan_ulong(who.gid)
        if self.inst.single and uid != os.getuid():
            return self._verdict_child(outfd, 111, SINGLE_USER % who.user)
        if uid == 0:
            return self._verdict_child(outfd, users.QLX_ROOT, b"")
        fields = (who.user, who.homedir, local, who.dash, who.ext, domain, sender, self.aliasempty)
        msg = b"\0".join(fields)
        if len(msg) > HANDOFF_MAX or msg.count(b"\0") != len(fields) - 1:
            return self._start_child(messfd, outfd, sender, recip, at)  # as before, to the letter
        for _ in range(2):
            w = self._worker_for((uid, gid))
            if w is None:
                return self._start_child(messfd, outfd, sender, recip, at)
            try:
                w.ctl.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [messfd, outfd]))])
            except OSError:
                self._retire(w)  # it is ending (idle time out, EPIPE): a new one
                continue
            w.busy = True
            w.last = time.monotonic()
            self._handed = w
            return w.pid
        return self._start_child(messfd, outfd, sender, recip, at)

    def _lookup_parent(self, local: bytes) -> users.Assignment:
        """users/cdb's answer for local, here (a read of a local file); raise _Miss without one, _Exit on trouble."""
        try:
            found = users.lookup(local, os.path.join(self.home, "users", "cdb"))
        except users.UsersCdbError as e:
            raise _Exit(e.code) from None
        if found is None:
            raise _Miss
        return found

    # User lookups in a child (review of session 5, finding 2) -------------------------

    def _start_lookup(self, messfd: int, outfd: int, sender: bytes, recip: bytes, at: int) -> int:
        """Start qmail-getpw's rules for the delivery in a child (qmailp's ids in root mode); return its pid.

        The delivery waits, holding copies of its message and output descriptors,
        until the child is reaped (_looked_up) or killed at its deadline; raise OSError.
        """
        creds = None
        if not self.inst.single and os.geteuid() == 0:
            acct = self.inst.users.get("qmailp")
            gid = self.inst.groups.get("nofiles")
            if acct is None or gid is None:
                return self._verdict_child(outfd, users.QLX_USAGE, b"")
            creds = Credentials(acct.uid, gid)
        now = time.monotonic()
        h = self._idle_helper(creds, now)
        if h is not None:
            try:
                h.sock.send(getpwchild.request(recip[:at]), socket.MSG_DONTWAIT)
            except OSError:
                self._retire_helper(h)  # it has gone: a child this time
            else:
                lk = _Lookup(h.pid, -1, os.dup(messfd), os.dup(outfd), sender, recip, at, now + self.lookup_seconds)
                h.lookup = lk
                self._looking = lk
                self._arm(now)
                return h.pid
        pid, answer = getpwchild.start(recip[:at], creds)
        lk = _Lookup(pid, answer, os.dup(messfd), os.dup(outfd), sender, recip, at, now + self.lookup_seconds)
        self._lookups[pid] = lk
        self._looking = lk
        self._arm(now)
        return pid

    def _idle_helper(self, creds: Credentials | None, now: float) -> _Helper | None:
        """Return an idle lookup helper, a new one if fewer than HELPERS_MAX run, else None."""
        for h in list(self._helpers.values()):
            if h.lookup is None:
                if now < h.since + getpwchild.HELPER_IDLE:
                    return h
                self._retire_helper(h)
        if len(self._helpers) >= getpwchild.HELPERS_MAX:
            return None
        try:
            pid, sock = getpwchild.start_helper(creds)
        except OSError:
            return None  # a child per lookup instead
        h = _Helper(pid, sock, now)
        self._helpers[pid] = h
        return h

    def _retire_helper(self, h: _Helper, reaped: bool = False) -> None:
        """Forget a helper and end it (SIGKILL unless reaped: idle it holds nothing, busy it is late)."""
        if self._helpers.get(h.pid) is not h:
            return
        del self._helpers[h.pid]
        h.sock.close()
        if not reaped:
            try:
                os.kill(h.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # safe: not reaped yet, so it is ours; nothing to end
            self._helpers_gone.add(h.pid)

    def extra_fds(self) -> list[int]:
        return [h.sock.fileno() for h in self._helpers.values()]

    def extra_ready(self, fd: int) -> None:
        """A helper's answer (or its end): its delivery goes on."""
        for h in self._helpers.values():
            if h.sock.fileno() == fd:
                break
        else:
            return
        heard = getpwchild.hear(h)
        if heard is None:
            return
        answer, retire = heard
        lk, h.lookup = h.lookup, None
        if retire:
            self._retire_helper(h)
        if lk is not None:
            self._helper_done(lk, answer)
            self._arm(time.monotonic())

    def _helper_done(self, lk: _Lookup, answer: bytes) -> None:
        try:
            who: users.Assignment | int = getpwchild.helper_result(answer, lk.recip[:lk.at])
        except getpwchild.LookupFailed as e:
            who = e.code
        self._go_on(lk, who)

    def _arm(self, now: float) -> None:
        """Set the alarm for the earliest lookup deadline (none: no alarm)."""
        due = [lk.deadline for lk in self._lookups.values() if not lk.killed]
        due += [h.lookup.deadline for h in self._helpers.values() if h.lookup is not None]
        signal.alarm(max(1, math.ceil(min(due) - now)) if due else 0)

    def _overdue(self, now: float) -> None:
        """Kill every lookup child or helper past its deadline: a crashed qmail-getpw, QLX_SYS."""
        for lk in self._lookups.values():
            if not lk.killed and now >= lk.deadline:
                lk.killed = True  # reaped later, and read as killed
                try:
                    os.kill(lk.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass  # safe: not reaped yet, so it is ours; nothing to end
        for h in list(self._helpers.values()):
            late = h.lookup
            if late is not None and now >= late.deadline:
                h.lookup = None
                self._retire_helper(h)
                self._go_on(late, users.QLX_SYS)
            elif late is None and now >= h.since + getpwchild.HELPER_IDLE:
                self._retire_helper(h)
        self._arm(now)

    def _looked_up(self, lk: _Lookup, status: int) -> None:
        """The lookup child lk has ended (status): its delivery goes on."""
        data = getpwchild.read_all(lk.answer)
        try:
            who: users.Assignment | int = getpwchild.result(status, data, lk.recip[:lk.at])
        except getpwchild.LookupFailed as e:
            who = e.code
        self._go_on(lk, who)

    def _go_on(self, lk: _Lookup, who: users.Assignment | int) -> None:
        """Hand lk's delivery on to who's worker (or a child), or end it with qmail-getpw's exit code who."""
        self._by_pid.pop(lk.pid, None)
        d = lk.delivery
        try:
            if isinstance(who, int):
                code = who
            else:
                code = -1
                if d is not None:
                    self._handed = None
                    try:
                        pid = self._hand(who, lk.messfd, lk.outfd, lk.sender, lk.recip, lk.at)
                    except OSError:
                        code = users.QLX_SYS  # no fork: as the delivery child's own failure
                    else:
                        d.pid = pid
                        self._by_pid[pid] = d
                        w, self._handed = self._handed, None
                        if w is not None and w.pid == pid:
                            w.delivery = d
                            self._serving[d.slot] = w
            if code >= 0 and d is not None:
                # Its output ends when our copy closes (below): reported then, as this exit.
                d.status = code << 8
        finally:
            os.close(lk.messfd)
            os.close(lk.outfd)

    def _verdict_child(self, outfd: int, code: int, text: bytes) -> int:
        """Fork a child that says text and exits code: a failed lookup reported as the delivery child did."""
        pid = os.fork()
        if pid == 0:
            try:
                if text:
                    _say(outfd, text)
            finally:
                os._exit(code)
        return pid

    def _worker_for(self, key: tuple[int, int]) -> _Worker | None:
        """Return an idle worker of key, a new one, or None if all workers allowed are busy."""
        for w in self._pool.get(key, ()):
            if not w.busy:
                return w
        live = [w for ws in self._pool.values() for w in ws]
        if len(live) >= self.workers_max:
            idle = [w for w in live if not w.busy]
            if not idle:
                return None
            self._retire(min(idle, key=lambda w: w.last))  # least recently used, of any user
        return self._fork_worker(key)

    def _fork_worker(self, key: tuple[int, int]) -> _Worker:
        """Start a worker for key: it takes the ids for good before it reads anything; raise OSError."""
        pid, mine, theirs = workers.fork_pair(
            lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC))
        if pid == 0:
            code = 111
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
                # Nothing of the parent's stays open here: qmail-send's pipes,
                # other deliveries' pipes, other workers' sockets.
                for other in self._wpids.values():
                    other.ctl.detach()
                for helper in self._helpers.values():
                    helper.sock.detach()
                mine.detach()
                keep = theirs.fileno()
                os.closerange(0, keep)
                os.closerange(keep + 1, spawn._MAX_FD)
                code = _work(theirs, Credentials(*key), self)
            finally:
                os._exit(code)
        theirs.close()
        w = _Worker(key, pid, mine, time.monotonic())
        self._pool.setdefault(key, []).append(w)
        self._wpids[pid] = w
        return w

    def _retire(self, w: _Worker) -> None:
        """Give w no more deliveries; closing its socket ends it (it is reaped as any child).

        An idle one is also SIGKILLed: it runs as its user, who may have stopped it,
        and a stopped worker would read the socket's end only once continued. Only
        one not yet reaped (w.status None): its pid is still its own.
        """
        ws = self._pool.get(w.key)
        if ws is not None and w in ws:
            ws.remove(w)
            if not ws:
                del self._pool[w.key]
        if w.delivery is None:
            w.ctl.close()
            if w.status is None:
                try:
                    os.kill(w.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass  # safe: cannot happen before we reap it; nothing to end

    def _settle(self, w: _Worker, wait: float) -> None:
        """Take w's verdict on its delivery (waiting up to wait seconds); a worker gone without one is reaped."""
        d = w.delivery
        assert d is not None
        got: bytes | None
        try:
            ready = wait <= 0 or bool(select.select([w.ctl], [], [], wait)[0])
            got = w.ctl.recv(_VERDICT, socket.MSG_DONTWAIT) if ready else None
        except BlockingIOError:
            got = None
        except OSError:
            got = b""
        if got is None:
            if wait <= 0:
                return
            # Its output ended and no verdict came: stuck. As a killed child.
            os.kill(w.pid, signal.SIGKILL)
            got = b""
        if len(got) == _VERDICT:
            self._detach(w, got[0] << 8)
            w.served += 1
            w.last = time.monotonic()
            if not got[1]:
                self._retire(w)
            return
        # Gone (or going) without a verdict: as a delivery child that died.
        status = self._reap_worker(w)
        self._detach(w, status if os.WIFSIGNALED(status) else users.QLX_SYS << 8)
        self._retire(w)
        w.ctl.close()

    def _detach(self, w: _Worker, status: int) -> None:
        d = w.delivery
        assert d is not None
        w.delivery = None
        w.busy = False
        d.status = status
        self._by_pid.pop(w.pid, None)
        self._serving.pop(d.slot, None)

    def _reap_worker(self, w: _Worker) -> int:
        """Wait for w to end; return its wait status."""
        if w.status is None:
            while True:
                try:
                    _, w.status = os.waitpid(w.pid, 0)
                    break
                except InterruptedError:
                    continue
                except ChildProcessError:
                    w.status = 111 << 8
                    break
            self._wpids.pop(w.pid, None)
        return w.status

    def _reap(self) -> None:
        if self._lookups or self._helpers:
            self._overdue(time.monotonic())
        for pid, status in workers.reaped():
            lk = self._lookups.pop(pid, None)
            if lk is not None:
                self._looked_up(lk, status)
                self._arm(time.monotonic())
                continue
            if pid in self._helpers_gone:
                self._helpers_gone.discard(pid)
                continue
            h = self._helpers.get(pid)
            if h is not None:
                late, answer = h.lookup, b""
                if late is not None:
                    try:
                        answer = h.sock.recv(getpwchild.ANSWER_MAX + 2, socket.MSG_DONTWAIT)
                    except OSError:
                        answer = b""  # ended without an answer
                h.lookup = None
                self._retire_helper(h, reaped=True)  # reaped: never kill its pid
                if late is not None:
                    self._helper_done(late, answer)
                continue
            w = self._wpids.pop(pid, None)
            if w is None:
                d = self._by_pid.pop(pid, None)
                if d is not None:
                    d.status = status
                    self._finish(d)
                continue
            w.status = status
            d = w.delivery
            if d is not None:
                self._settle(w, 0)  # its verdict, if it gave one before it ended
                if w.delivery is not None:  # a verdict sent and not read: cannot be (recv was not blocked)
                    self._detach(w, status if os.WIFSIGNALED(status) else users.QLX_SYS << 8)
                self._finish(d)
            self._retire(w)
            w.ctl.close()

    def _read_delivery(self, d: spawnproto.Delivery) -> None:
        w = self._serving.get(d.slot)
        if w is None or w.delivery is not d:
            super()._read_delivery(d)
            return
        try:
            data = os.read(d.fd, 65536)
        except InterruptedError:
            return
        except OSError:
            data = b""
        if data:
            if len(d.output) < self.OUTPUT_MAX:
                d.output += data[:self.OUTPUT_MAX - len(d.output)]
            spawnproto.truncate(d.output, self.truncreport)
            return
        os.close(d.fd)
        d.fd = -1
        d.eof = True
        # The worker gives its verdict before it closes its copy of the output.
        self._settle(w, SETTLE_SECONDS)
        self._finish(d)


class _Lookup:
    """A delivery waiting for its user lookup child."""

    __slots__ = ("pid", "answer", "messfd", "outfd", "sender", "recip", "at", "deadline", "killed", "delivery")

    def __init__(self, pid: int, answer: int, messfd: int, outfd: int, sender: bytes, recip: bytes, at: int,
                 deadline: float) -> None:
        self.pid = pid
        self.answer = answer  # the read end of the child's answer pipe
        self.messfd = messfd  # our copies of the delivery's descriptors, until it is handed on
        self.outfd = outfd
        self.sender = sender
        self.recip = recip
        self.at = at
        self.deadline = deadline
        self.killed = False
        self.delivery: spawnproto.Delivery | None = None


class _Helper:
    """A long-lived user lookup process (getpwchild.start_helper) as qmail-lspawn sees it."""

    __slots__ = ("pid", "sock", "lookup", "since", "served")

    def __init__(self, pid: int, sock: socket.socket, now: float) -> None:
        self.pid = pid
        self.sock = sock  # our end of its socket pair, non-blocking
        self.lookup: _Lookup | None = None  # the delivery waiting for its answer
        self.since = now  # when it became idle
        self.served = 0


class _Worker:
    """qmail-lspawn's record of one per-user worker."""

    __slots__ = ("key", "pid", "ctl", "busy", "last", "served", "delivery", "status")

    def __init__(self, key: tuple[int, int], pid: int, ctl: socket.socket, now: float) -> None:
        self.key = key
        self.pid = pid
        self.ctl = ctl  # our end of the socket pair
        self.busy = False
        self.last = now
        self.served = 0
        self.delivery: spawnproto.Delivery | None = None
        self.status: int | None = None  # wait status once reaped


# In a worker -------------------------------------------------------------------------

def _fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


def _work(ctl: socket.socket, creds: Credentials, sp: LocalSpawner) -> int:
    """A worker's life: take creds for good, then run each delivery handed over ctl until it closes or idles out.

    A delivery is run as the delivery child ran it (spawn.become's set-up of
    qmail-local's main, in QMAILHOME); its verdict (exit code, and whether
    this worker takes another) goes back over ctl before the worker lets go
    of the output pipe, so that the end of the output means the verdict is
    there. The worker ends after a temporary failure or crash, a change in its
    descriptor count, ids or threads, a child left running, DELIVERIES_MAX
    deliveries or IDLE seconds with nothing to do.
    """
    from pyqmail.proctitle import set_title

    first = os.open(os.devnull, os.O_RDWR)  # descriptor 0: everything below ctl was closed
    null = fcntl.fcntl(first, fcntl.F_DUPFD_CLOEXEC, 3)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    set_title(WORKER_COMM, [WORKER_COMM, str(creds.uid)])
    failed = 0
    try:
        drop(creds)
    except Exception:  # noqa: BLE001 - the child's answer to a failed drop: QLX_USAGE
        failed = users.QLX_USAGE
    stub = spawn.read_stub(sp.local_program)
    mod = None
    if stub is not None:
        try:
            mod = __import__(stub.module, fromlist=["main"])
        except ImportError:
            failed = failed or users.QLX_EXECSOFT
    env = dict(os.environ)
    mask = os.umask(0o077)
    os.umask(mask)
    ctl.settimeout(sp.idle)
    baseline = len(_fds())
    ids = (os.getresuid(), os.getresgid(), os.getgroups())
    served = 0
    closing = False
    while True:
        try:
            msg, ancillary, _, _ = ctl.recvmsg(HANDOFF_MAX, socket.CMSG_SPACE(2 * 4), socket.MSG_CMSG_CLOEXEC)
        except TimeoutError:
            # Refuse what comes next (the parent's send fails: EPIPE), then serve what came before.
            ctl.shutdown(socket.SHUT_RD)
            ctl.setblocking(False)
            closing = True
            try:
                msg, ancillary, _, _ = ctl.recvmsg(HANDOFF_MAX, socket.CMSG_SPACE(2 * 4), socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, OSError):
                return 0
        if not msg and not ancillary:
            return 0
        fds = workers.received_fds(ancillary)
        served += 1
        code = failed or users.QLX_USAGE
        if len(fds) == 2 and not failed and mod is not None and stub is not None:
            code = _deliver(fds[0], fds[1], msg.split(b"\0"), sp, stub, mod, env, mask, served)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            set_title(WORKER_COMM, [WORKER_COMM, str(creds.uid)])
        closed_now = fds[:1] if len(fds) == 2 else fds
        for fd in closed_now:
            os.close(fd)
        # The count (the listing's own descriptor in both): only the output pipe more than before.
        more = (code in (0, 100) and served < sp.deliveries_max and not closing
                and len(_fds()) == baseline + len(fds) - len(closed_now) and not _children()
                and (os.getresuid(), os.getresgid(), os.getgroups()) == ids and _threads() == 1)
        try:
            ctl.sendall(bytes((code & 0xFF, int(more))))
        finally:
            for fd in fds[len(closed_now):]:
                os.close(fd)
        if not more:
            return 0


def _threads() -> int:
    """Threads of this process (a delivery that started one leaves a worker that must end)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def _children() -> bool:
    """Reap any child a delivery left behind; True if there was one."""
    left = False
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return left
        if pid == 0:
            return True
        left = True


def _deliver(messfd: int, outfd: int, fields: list[bytes], sp: LocalSpawner, stub: spawn.Stub,
             mod: object, env: dict[str, str], mask: int, seq: int) -> int:
    """Run one qmail-local in this process, set up as the delivery child was; return its exit code."""
    argv = [LOCAL_PROGRAM, "--"] + [os.fsdecode(a) for a in fields]
    rc = 111
    try:
        os.chdir(sp.home)
        os.umask(mask)
        os.dup2(messfd, 0)
        os.dup2(outfd, 1)
        os.dup2(outfd, 2)
        spawn._enter(sp.local_program, argv, env, None, None, None, stub, True)
        reset = getattr(mod, "worker_reset", None)
        if reset is not None:
            reset(seq)
        rc = mod.main([sp.local_program, *argv[1:]])  # type: ignore[attr-defined]
    except BaseException as e:  # noqa: BLE001 - as a crashed child: temporary
        _say(2, f"qmail-lspawn: {type(e).__name__}: {e}\n".encode("utf-8", "replace"))
        rc = 111
    finally:
        import sys

        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except BaseException:  # noqa: BLE001
                pass
        signal.alarm(0)
    return rc & 0xFF


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name) or default)
    except ValueError:
        return default


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


def _no_op(signum: int, frame: object) -> None:
    """SIGALRM handler: its only job is to write to the loop's wakeup descriptor."""


def _say(fd: int, data: bytes) -> None:
    try:
        os.write(fd, data)
    except OSError:
        pass  # the exit code tells qmail-lspawn's parent what happened


@program("qmail-lspawn", crash=111)
def main(argv: list[str]) -> int:
    """Run local deliveries as qmail-send commands them."""
    if len(argv) < 2:
        return EXIT_USAGE
    qmail_home = _home.home()
    try:
        os.chdir(qmail_home)
        os.chdir("queue/mess")
    except OSError:
        return 111
    spawner = LocalSpawner(os.fsencode(argv[1]), qmail_home, _home.install())
    return spawner.run()
