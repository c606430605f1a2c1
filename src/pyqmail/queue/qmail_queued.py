"""qmail-queued: let local users queue mail in a root-mode installation.

C qmail makes qmail-queue setuid qmailq. Python programs cannot be setuid, so
(ARCHITECTURE decision 6) this server, running as qmailq, listens on
QMAILHOME/run/qmail-queue.sock. qmail-queue, run by any other user, connects
and passes its descriptors 0 and 1; the server learns the caller's uid from
the kernel (SO_PEERCRED), queues the message exactly as qmail-queue does with
that uid in the Received line, and answers qmail-queue's exit code as one byte.

usage: qmail-queued [-p]   (started as root or as qmailq; as root it becomes qmailq)

With -p (as qmail-start starts it) it exits when the process that started
it has gone, so that it lives exactly as long as qmail-send.
"""

from __future__ import annotations

import os
import signal
import socket
import struct

from pyqmail import home as _home
from pyqmail.entry import program
from pyqmail.privs import Credentials, drop
from pyqmail.queue import qmail_queue
from pyqmail.queue.exits import QueueExit

_UCRED = struct.Struct("iII")
ANSWER_TIMEOUT = 60  # seconds a client has to send its descriptors
PARENT_CHECK = 1.0  # seconds between checks that the starting process lives (-p)


def serve_one(conn: socket.socket, qmail_home: str, inst: _home.Install) -> int:
    """Queue the message of one client connection; return the exit code sent back."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    _, uid, _ = _UCRED.unpack(creds)
    conn.settimeout(ANSWER_TIMEOUT)
    try:
        msg, fds, _, _ = socket.recv_fds(conn, 1, 4)
    except (OSError, socket.timeout):
        return QueueExit.READ_ERROR
    code: int = QueueExit.READ_ERROR
    try:
        if msg == b"Q" and len(fds) == 2:
            signal.signal(signal.SIGALRM, qmail_queue._on_alarm)
            signal.alarm(qmail_queue.SUICIDE_SECONDS)
            code = qmail_queue.queue_message(qmail_home, fds[0], fds[1], uid, os.getpid(), inst)
            signal.alarm(0)
    finally:
        for fd in fds:
            os.close(fd)
    try:
        conn.sendall(bytes([code]))
    except OSError:
        pass
    return code


def _reap(signum: int, frame: object) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


@program("qmail-queued", crash=111)
def main(argv: list[str]) -> int:
    """Serve queue requests of local users until killed."""
    qmail_home = _home.home()
    inst = _home.install()
    q = inst.users.get("qmailq")
    if inst.single or q is None:
        os.write(2, b"qmail-queued: fatal: this installation is single-user; qmail-queue writes the queue itself\n")
        return 111
    with_parent = argv[1:2] == ["-p"]
    parent = os.getppid()
    if os.geteuid() == 0:
        drop(Credentials(q.uid, q.gid))
    if os.getuid() != q.uid:
        os.write(2, b"qmail-queued: fatal: must run as root or qmailq\n")
        return 111
    path = os.path.join(qmail_home, qmail_queue.SOCKET)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0)
    try:
        srv.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o666)
    srv.listen(64)
    signal.signal(signal.SIGCHLD, _reap)
    os.umask(0o033)
    if with_parent:
        srv.settimeout(PARENT_CHECK)
    while True:
        if with_parent and os.getppid() != parent:
            return 0
        try:
            conn, _ = srv.accept()
        except InterruptedError:
            continue
        except TimeoutError:
            continue
        conn.settimeout(None)
        pid = os.fork()
        if pid == 0:
            srv.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            code = 81
            try:
                code = serve_one(conn, qmail_home, inst)
            finally:
                os._exit(code)
        conn.close()
