"""qmail-start: turn on mail delivery (qmail-start(8)).

    qmail-start [ defaultdelivery [ logger arg ... ] ]

Starts qmail-lspawn (with defaultdelivery, ./Mailbox if none), qmail-rspawn
and qmail-clean, wired by pipes to the descriptors of qmail-send(8), and
qmail-todo (which preprocesses new messages, as the ext-todo patch's) with a
qmail-clean of its own, wired to qmail-send's descriptors 7 and 8; and
then becomes qmail-send itself, so that its process is the one a supervisor
signals. qmail-send's activity record goes to qmail-start's descriptor 1,
or through logger (run with its arguments, found on $PATH) when one is
given. Run as root in a root-mode installation every daemon gets its qmail
ids, as qmail's: the qmail group for all; qmail-send as qmails, qmail-clean
as qmailq, qmail-rspawn as qmailr, qmail-lspawn stays root (it delivers as
each recipient); the logger runs as qmaill in group nofiles. Otherwise
(single-user mode) everything runs as the invoking user. qmail-start prints
nothing, even on failure, with one exception: before touching anything it
checks qmail-send's lock (queue/lock/sendmutex), and if another qmail-send
holds it writes qmail-send's own `alert: cannot start: qmail-send is already
running` to descriptor 1 and exits 111, so that a second qmail-start spawns
no daemon, makes no pipe and leaves qmail-queued's socket alone. In root
mode it also starts `qmail-queued -p`, the injection server, for
installations that run only the book's qmail-send service; where qmail-queued
runs as a service of its own (`qmail up`), that one serves and the -p one
waits.
"""

from __future__ import annotations

import fcntl
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

from pyqmail import home as _home
from pyqmail import spawn
from pyqmail.entry import program
from pyqmail.privs import Credentials, drop
from pyqmail.queue import layout
from pyqmail.send import log

DEFAULT_DELIVERY = "./Mailbox"
EXIT_FAIL = 111


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _ids(inst: _home.Install) -> dict[str, Credentials] | None:
    """Return the credentials of each process, or None if the install record lacks some."""
    need = ("qmaill", "qmailq", "qmailr", "qmails")
    if any(r not in inst.users for r in need) or "qmail" not in inst.groups or "nofiles" not in inst.groups:
        return None
    gid_q, gid_n = inst.groups["qmail"], inst.groups["nofiles"]
    return {
        "start": Credentials(0, gid_q),
        "logger": Credentials(inst.users["qmaill"].uid, gid_n),
        "qmail-lspawn": Credentials(0, gid_q),
        "qmail-rspawn": Credentials(inst.users["qmailr"].uid, gid_q),
        "qmail-clean": Credentials(inst.users["qmailq"].uid, gid_q),
        "qmail-send": Credentials(inst.users["qmails"].uid, gid_q),
        "qmail-todo": Credentials(inst.users["qmails"].uid, gid_q),
    }


def send_running(qmail_home: str) -> bool:
    """Return True if a qmail-send holds queue/lock/sendmutex now (False if it cannot be told)."""
    try:
        fd = os.open(os.path.join(qmail_home, "queue", layout.SENDMUTEX), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False  # qmail-send itself then says why it cannot start
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # the lock, if taken, ends here: qmail-send takes its own
    return False


def _start_todo(bindir: str, stderr: dict[int, int],
                who: Callable[[str], Credentials | None]) -> dict[int, int]:
    """Start qmail-todo and its qmail-clean (ext-todo); return qmail-send's descriptors 7 and 8 for it.

    qmail-todo: 0 from qmail-send, 1 to qmail-send, 2 to its qmail-clean, 3
    from it. If it cannot be started, qmail-send gets no 7 and 8 and
    preprocesses todo/ itself, as qmail 1.03's.
    """
    (t_cmd_r, t_cmd_w), (t_rec_r, t_rec_w), (tc_cmd_r, tc_cmd_w), (tc_rep_r, tc_rep_w) = \
        [os.pipe2(os.O_CLOEXEC) for _ in range(4)]
    started = False
    try:
        spawn.spawn(os.path.join(bindir, "qmail-todo"), ["qmail-todo"],
                    fds={0: t_cmd_r, 1: t_rec_w, 2: tc_cmd_w, 3: tc_rep_r}, creds=who("qmail-todo"))
        started = True
        spawn.spawn(os.path.join(bindir, "qmail-clean"), ["qmail-clean"], fds={0: tc_cmd_r, 1: tc_rep_w, **stderr},
                    creds=who("qmail-clean"))
    except OSError:
        pass  # qmail-todo without its qmail-clean says so in the log and stops; qmail-send follows
    finally:
        for fd in (t_cmd_r, t_rec_w, tc_cmd_w, tc_rep_r, tc_cmd_r, tc_rep_w):
            os.close(fd)
    if not started:
        os.close(t_cmd_w)
        os.close(t_rec_r)
        return {}
    return {7: t_rec_r, 8: t_cmd_w}


@program("qmail-start", crash=EXIT_FAIL)
def main(argv: list[str]) -> int:
    """Start the delivery daemons and become qmail-send; return 111 only if that fails."""
    try:
        os.chdir("/")
    except OSError:
        return EXIT_FAIL
    os.umask(0o077)
    qmail_home = _home.home()
    inst = _home.install()
    creds: dict[str, Credentials] | None = None
    if not inst.single and os.geteuid() == 0:
        creds = _ids(inst)
        if creds is None:
            return EXIT_FAIL
        try:
            drop(creds["start"], allow_root=True)
        except OSError:
            return EXIT_FAIL

    if send_running(qmail_home):
        try:
            os.write(1, log.CANNOT_START_RUNNING)
        except OSError:
            pass  # no log: the exit code says it
        return EXIT_FAIL

    def who(name: str) -> Credentials | None:
        return None if creds is None else creds[name]

    args = argv[1:]
    delivery = args[0] if args else DEFAULT_DELIVERY
    logger = args[1:]
    stderr = {2: 2} if _open(2) else {}
    bindir = os.path.join(qmail_home, "bin")

    log_fd = 1
    if logger:
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            spawn.spawn(logger[0], logger, fds={0: r, **({1: 1} if _open(1) else {}), **stderr},
                        creds=who("logger"))
        except OSError:
            pass  # as qmail: the logger's failure is silent; qmail-send writes into the void
        finally:
            os.close(r)
        log_fd = w

    if creds is not None:
        # Root mode: local users, qmail-send's bounces (as qmails) and
        # qmail-local's forwards (as the user) queue through qmail-queued,
        # pyqmail's stand-in for a setuid qmail-queue. It becomes qmailq
        # itself and ends when qmail-send (this process, later) ends; if a
        # standalone qmail-queued holds its lock, it waits and touches nothing.
        try:
            spawn.spawn(os.path.join(bindir, "qmail-queued"), ["qmail-queued", "-p"],
                        fds={**({1: 1} if _open(1) else {}), **stderr})
        except OSError:
            pass  # local injection then fails with qmail-queue's temporary 62

    pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(6)]
    (l_cmd_r, l_cmd_w), (l_rep_r, l_rep_w), (r_cmd_r, r_cmd_w), (r_rep_r, r_rep_w), \
        (c_cmd_r, c_cmd_w), (c_rep_r, c_rep_w) = pipes
    daemons = [("qmail-lspawn", [delivery], l_cmd_r, l_rep_w),
               ("qmail-rspawn", [], r_cmd_r, r_rep_w),
               ("qmail-clean", [], c_cmd_r, c_rep_w)]
    for name, extra, cmd_r, rep_w in daemons:
        try:
            spawn.spawn(os.path.join(bindir, name), [name, *extra], fds={0: cmd_r, 1: rep_w, **stderr},
                        creds=who(name))
        except OSError:
            pass  # qmail-send finds out and says so in its log
        finally:
            os.close(cmd_r)
            os.close(rep_w)
    send_fds = {0: log_fd, 1: l_cmd_w, 2: l_rep_r, 3: r_cmd_w, 4: r_rep_r, 5: c_cmd_w, 6: c_rep_r}
    send_fds.update(_start_todo(bindir, stderr, who))
    try:
        spawn.become(os.path.join(bindir, "qmail-send"), ["qmail-send"], fds=send_fds, creds=who("qmail-send"))
    except OSError:
        return EXIT_FAIL
