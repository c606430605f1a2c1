"""The client half of qmail-queued's socket: hand a message's two descriptors to the server.

The protocol (QMAILHOME/run/qmail-queue.sock): the client sends REQUEST_QUEUE
(REQUEST_QUEUE_UTF8 for a message flagged SMTPUTF8) with the message's and
the envelope's read descriptors as SCM_RIGHTS; the server answers ACK once it
holds them (before reading either), then qmail-queue's exit code as one
byte. No ACK means nothing has read the descriptors, so the client may still
give the message to someone else (the maildrop, or a qmail-queue it starts).
REQUEST_INJECT (pyqmail.inject.client) asks a worker to run qmail-inject
or sendmail itself. REQUEST_STOP (no descriptors) asks a `qmail-queued -p` to give way to a
standalone one: STOP_YES or STOP_NO.

Two clients use it: qmail-queue run by a local user in a root-mode
installation (qmail_queue.hand_to_server), and pyqmail.queue.qq, which in
that same case connects itself instead of starting that qmail-queue (issue
17: the process in the middle only passed two descriptors on).

Imports only os, sys and _socket: `socket` imports enum and selectors, about
10 ms of every local injection's start (issue 17). SCM_RIGHTS carries native
ints, what socket.send_fds builds with array.
"""

from __future__ import annotations

import os

from pyqmail.queue.exits import QueueExit

SOCKET = "run/qmail-queue.sock"
REQUEST_QUEUE = b"Q"
REQUEST_QUEUE_UTF8 = b"U"  # as REQUEST_QUEUE, for a message flagged SMTPUTF8 ($SMTPUTF8MAIL)
REQUEST_STOP = b"S"
# qmail-inject or sendmail asks a worker to run it (pyqmail.inject.client, .served): the
# caller's descriptors 0, 1 and 2 as SCM_RIGHTS, then a 4-byte length and the payload.
REQUEST_INJECT = b"I"
ACK = b"+"  # 43: not one of qmail-queue's exit codes
STOP_YES = b"y"
STOP_NO = b"n"
NO_SERVER = -1  # offer(): no qmail-queued took the descriptors

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    import _socket


def offer(qmail_home: str, msg_fd: int, env_fd: int, utf8: bool = False) -> tuple[_socket.socket | None, int]:
    """Pass msg_fd and env_fd to qmail-queued; return (the connection, 0) once it has acknowledged.

    Otherwise return (None, NO_SERVER) when no server took the descriptors
    (no socket, nobody listening, or the server hung up before acknowledging:
    the kernel dropped them unread, the message is still the caller's), or
    (None, code) for an exit code: 62 if the socket could not be used, or the
    code a server of the one-byte protocol answered at once. The connection
    is close-on-exec and must stay open, sending nothing more, until answer():
    the server's child stops, queueing nothing, when its client hangs up.
    """
    import _socket
    import sys

    try:
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    except OSError:
        return None, QueueExit.QUEUE_ERROR
    taken = False
    try:
        try:
            s.connect(os.path.join(qmail_home, SOCKET))
        except (FileNotFoundError, ConnectionRefusedError):
            return None, NO_SERVER
        except OSError:
            return None, QueueExit.QUEUE_ERROR
        try:
            fds = msg_fd.to_bytes(4, sys.byteorder) + env_fd.to_bytes(4, sys.byteorder)
            s.sendmsg([REQUEST_QUEUE_UTF8 if utf8 else REQUEST_QUEUE],
                      [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)], _socket.MSG_NOSIGNAL)
            _readable(s.fileno())
            ack = s.recv(1)
        except OSError:
            ack = b""
        if not ack:
            return None, NO_SERVER
        if ack != ACK:
            return None, ack[0]  # a server of the one-byte protocol answered the exit code
        taken = True
        return s, 0
    finally:
        if not taken:
            s.close()


def _readable(fd: int) -> None:
    """In a tcpserver worker serving several sessions, let the others run while the server works.

    Looked up, not imported: qmail-inject and qmail-queue never load pyqmail.wait.
    """
    import sys

    w = sys.modules.get("pyqmail.wait")
    if w is not None:
        w.readable(fd, 86400.0)  # the server's own timeouts bound the wait; the recv follows


def answer(conn: _socket.socket) -> int:
    """Return the exit code qmail-queued sends on conn (81 if it hangs up without one); close conn."""
    try:
        _readable(conn.fileno())
        code = conn.recv(1)
    except OSError:
        code = b""
    finally:
        conn.close()
    return code[0] if code else QueueExit.BUG
