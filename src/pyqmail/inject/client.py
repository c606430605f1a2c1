"""The front of qmail-inject and sendmail: ask qmail-queued to run them, before anything is imported.

Most of an injection's time was the interpreter's start and the imports of
qmail-inject and the queue client (issue 17.3, docs/DESIGN.md "Injection
served by qmail-queued"). In a root-mode home, qmail-queued's workers
have them loaded already. So the stub of qmail-inject (and of sendmail)
calls `run` first: it passes the program's argv, its environment exactly as
exec gave it (/proc/self/environ: Python's start may have added LC_CTYPE)
and its descriptors 0, 1 and 2 (SCM_RIGHTS) over QMAILHOME/run/qmail-queue.sock,
and a worker runs the program on them, as this process's uid (SO_PEERCRED)
and pid, and answers its exit code, which this process exits with.

Nothing is read from descriptor 0 until the worker has acknowledged (ACK).
Any refusal before that (no server, a server at its limits, a request it does not serve
here, $QMAILQUEUE or $QMAILMFTFILE set: that program must run and that
file be read as the caller) returns, and
the stub runs the program in this process as always. After the
acknowledgement the worker owns the message: if it goes without an answer,
this process says what qmail-inject says when qmail-queue goes without one
and exits 111.

While the worker runs, SIGINT and SIGTERM kill this process as they kill
C's qmail-inject; the worker sees its client gone and queues nothing.

Imports only sys, posix, _signal and _socket (all in the interpreter
or loaded by its start but _socket): this runs in every injection.
$PYQMAIL_INJECT_LOCAL set (to anything) keeps the program in this process.
"""

import posix
import sys

REQUEST_INJECT = b"I"  # pyqmail.queue.handoff: the request byte, then a 4-byte length and the payload
ACK = b"+"  # handoff.ACK
SOCKET = "/run/qmail-queue.sock"  # handoff.SOCKET under the home
PAYLOAD_MAX = 1 << 24  # qmail-queued refuses more (the kernel's ARG_MAX is far below)
LOCAL = b"PYQMAIL_INJECT_LOCAL"
# exits.report(QueueExit.BUG) after "qmail-inject: fatal: ", as qmail-inject says it when
# qmail-queue (here the worker) goes without an exit code; sendmail runs qmail-inject.
GONE = b"qmail-inject: fatal: qq internal bug (#4.3.0)\n"
EXIT_TEMP = 111


def payload(name: str, argv: list[str], environ: bytes) -> bytes:
    """Return the request's payload: name NUL, the argument count NUL, each argument NUL, the environment block."""
    enc, errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
    args = [a.encode(enc, errors) for a in argv]
    return b"\0".join([name.encode(), str(len(args)).encode(), *args, b""]) + environ


def _environ() -> bytes | None:
    """Return the environment exec gave this process (NUL-terminated entries), None if /proc says nothing."""
    try:
        fd = posix.open("/proc/self/environ", posix.O_RDONLY | posix.O_CLOEXEC)
    except OSError:
        return None
    try:
        parts = []
        while True:
            chunk = posix.read(fd, 65536)
            if not chunk:
                break
            parts.append(chunk)
    except OSError:
        return None
    finally:
        posix.close(fd)
    return b"".join(parts)


def run(name: str, home: str) -> None:
    """Have qmail-queued run program name with this process's argv, environment and descriptors.

    Exits with the program's exit code when a worker took it; returns when
    none did, and nothing of descriptor 0 has been read.
    """
    env = posix.environ
    if LOCAL in env or b"QMAILQUEUE" in env or b"QMAILMFTFILE" in env or posix.getuid() != posix.geteuid():
        return  # programs and files of the caller's naming, or a setuid caller: run as the caller
    if posix.isatty(0):
        return  # a terminal: job control (^Z, bg, SIGTTIN) must act on the process that reads it
    override = env.get(b"QMAILHOME")
    if override and override != home.encode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()):
        return  # another home's program: run here, with that home's own queue
    environ = _environ()
    if environ is None:
        return
    data = payload(name, sys.argv, environ)
    if len(data) > PAYLOAD_MAX:
        return
    import _signal  # type: ignore[import-not-found]  # signal itself imports enum
    import _socket

    try:
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    except OSError:
        return
    if s.fileno() <= 2:
        # 0, 1 or 2 was closed (the socket takes the lowest free number): passed on, the socket
        # itself would be the program's input or output. The program runs here, with it closed.
        s.close()
        return
    old_int = None
    try:
        try:
            s.connect(home + SOCKET)
            fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))
            head = REQUEST_INJECT + len(data).to_bytes(4, "big")
            sent = s.sendmsg([head, data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)], _socket.MSG_NOSIGNAL)
            if sent < len(head) + len(data):
                s.sendall(memoryview(head + data)[sent:], _socket.MSG_NOSIGNAL)
            old_int = _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
            ack = s.recv(1)
        except OSError:
            ack = b""  # no server, a server gone: nothing was read
        if ack != ACK:
            if old_int is not None:
                _signal.signal(_signal.SIGINT, old_int)
            return  # refused before anything was read: this process runs the program
        try:
            code = s.recv(1)
        except OSError:
            code = b""
        if not code:
            try:
                posix.write(2, GONE)
            except OSError:
                pass  # safe: stderr gone; the exit code says temporary
            posix._exit(EXIT_TEMP)
        posix._exit(code[0])
    finally:
        s.close()
