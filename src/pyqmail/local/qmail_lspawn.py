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
        """Return who controls local: users/cdb first, then qmail-getpw; raise _Exit on trouble."""
        try:
            found = users.lookup(local, os.path.join(self.home, "users", "cdb"))
        except users.UsersCdbError as e:
            raise _Exit(e.code) from None
        if found is not None:
            return found
        stub = spawn.read_stub(self.getpw_program)
        if self.inst.single and stub is not None and stub.module == GETPW_MODULE:
            # The same rules as the program, without a process: it would run as us anyway.
            try:
                return users.getpw(local)
            except users.GetpwError as e:
                raise _Exit(e.code) from None
        return self._run_getpw(local)

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
