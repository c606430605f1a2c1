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
"""

from __future__ import annotations

import os

from pyqmail import errors, spawn
from pyqmail import home as _home
from pyqmail import sig as signal
from pyqmail.entry import program
from pyqmail.local import users
from pyqmail.privs import Credentials, PrivilegeError, drop
from pyqmail.send import spawnproto

EXIT_USAGE = 100
TRUNCREPORT = 3000
GETPW_MAX = 65536  # bytes of qmail-getpw output read
LOCAL_PROGRAM = "bin/qmail-local"
GETPW_PROGRAM = "bin/qmail-getpw"
GETPW_MODULE = "pyqmail.local.qmail_getpw"

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
        pid = os.fork()
        if pid == 0:
            code = users.QLX_SYS
            try:
                # The parent's wakeup descriptor and SIGCHLD handler are not ours.
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
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
