"""Handing a message to qmail-queue, as every queueing program does (qmail's qmail.c).

`QQ` starts $QMAILQUEUE (or QMAILHOME/bin/qmail-queue) through the spawn fast
path with the message pipe on descriptor 0, the envelope pipe on descriptor
1 and a pipe for a custom error string on descriptor 6, and turns its exit
code into the D/Z report qmail's programs give (exits.report). After close(),
`code` and `custom` hold qmail-queue's raw exit code and descriptor-6 text,
which a filter hands on untouched (exits.relay).

A receiver of network mail (qmail-smtpd, qmail-qmtpd, qmail-qmqpd) passes
network=True: when control/smtpfilters names filters, the message goes
through `qmail-qfilter` with that chain, and the chain ends at the program
named above (given to qmail-qfilter as $QQF_QMAILQUEUE).

In a root-mode home, a caller that is not qmailq would start a qmail-queue
that passes its descriptors to qmail-queued (another user) or forks to write
the queue as qmailq (root): QQ passes them to qmail-queued itself
(QQ._hand_over, pyqmail.queue.handoff), and qmail-queue is started only when
no qmail-queued acknowledges.
"""

from __future__ import annotations

import os
import sys

from pyqmail import durable
from pyqmail import home as _home
from pyqmail.queue import exits

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    import _socket
    from collections.abc import Iterable, Mapping, Sequence

FD_ERRSTR = 6
CUSTOM_READ = 1024  # bytes of descriptor 6 read (exits.custom_report uses the first 255)
SMTPFILTERS = "smtpfilters"
QMAIL_QUEUE_MODULE = "pyqmail.queue.qmail_queue"  # what a stub of this installation's qmail-queue names


def queue_program(env: Mapping[str, str] | None = None) -> str:
    """Return the program to queue with: $QMAILQUEUE, else QMAILHOME/bin/qmail-queue."""
    env = os.environ if env is None else env
    return env.get("QMAILQUEUE") or os.path.join(_home.home(), "bin", "qmail-queue")


def smtpfilters() -> list[list[str]]:
    """Return the filter commands of control/smtpfilters (none if it is missing); raise ControlError.

    One command per line, its words separated by blanks (no quoting); lines
    starting with # are comments. A first word without a slash names
    QMAILHOME/bin/WORD when that exists, else it is looked up in $PATH by
    qmail-qfilter, as execvp does.
    """
    from pyqmail import control

    lines = control.read_lines(SMTPFILTERS)
    out = []
    bindir = os.path.join(_home.home(), "bin")
    for line in lines or ():
        words = line.split()
        if "/" not in words[0] and os.path.exists(os.path.join(bindir, words[0])):
            words[0] = os.path.join(bindir, words[0])
        out.append(words)
    return out


def chain_argv(filters: Sequence[Sequence[str]]) -> list[str]:
    """Return qmail-qfilter's argv for filters: QMAILHOME/bin/qmail-qfilter f1 [args] -- f2 [args] ..."""
    argv = [os.path.join(_home.home(), "bin", "qmail-qfilter")]
    for i, words in enumerate(filters):
        if i:
            argv.append("--")
        argv += words
    return argv



def _write_all(fd: int, data: bytes | bytearray) -> None:
    """Write all of data into qmail-queue's pipe fd; raise OSError as durable.write_all does.

    In a tcpserver worker serving several sessions, a full pipe (qmail-queue or a
    $QMAILQUEUE filter not reading yet: 64 KiB of buffer) lets the others run: the
    write end is made non-blocking and each wait for room goes through pyqmail.wait
    (looked up, not imported, as in queue.handoff). Elsewhere the blocking write.
    """
    waiting = sys.modules.get("pyqmail.wait")
    if waiting is None or waiting.hub is None:
        durable.write_all(fd, data)
        return
    import select

    view = memoryview(data)
    os.set_blocking(fd, False)  # our end only: the read end is another open file, qmail-queue's
    try:
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                waiting.ready(fd, select.POLLOUT, 86400 * 1000)  # qmail-queue's own alarm bounds it
    finally:
        os.set_blocking(fd, True)

class QQ:
    """One running qmail-queue: write the message, then close() with the envelope."""

    code: int | None
    """qmail-queue's exit code once closed (-N: killed by signal N; 120/61/55: it could not be started)."""
    custom: bytes
    """What qmail-queue wrote on descriptor 6 (its first CUSTOM_READ bytes), once closed."""

    def __init__(self, env: Mapping[str, str] | None = None, program: str | None = None,
                 network: bool = False) -> None:
        """Start qmail-queue (program, else $QMAILQUEUE, else QMAILHOME/bin/qmail-queue) with env.

        network=True: the chain of control/smtpfilters comes first (see the module).
        """
        self._env = dict(os.environ if env is None else env)
        self.code = None
        self.custom = b""
        self._failed = False
        self._abandoned = False
        self._buf = bytearray()
        self._envelope: bytearray | None = None  # what begin() and to() have not written yet
        self._start_error = 120
        self._conn: _socket.socket | None = None  # qmail-queued's connection, when it took the message
        prog = program or queue_program(self._env)
        argv = [prog]
        chained = False
        if network:
            from pyqmail.control import ControlError

            try:
                chain = smtpfilters()
            except ControlError:
                self.pid = -1
                self._start_error = 55
                return
            if chain:
                self._env["QQF_QMAILQUEUE"] = prog
                chained = True
                argv = chain_argv(chain)
                prog = argv[0]
        msg_r, self._msg = os.pipe2(os.O_CLOEXEC)
        env_r, self._envfd = os.pipe2(os.O_CLOEXEC)
        self._err = -1
        try:
            if not chained:
                self._conn = self._hand_over(prog, msg_r, env_r)
                if self._conn is not None:
                    self.pid = os.getpid()  # the pid qmail-queued's Received line and `p` record name
                    return
            from pyqmail import spawn  # here, not at the top: a hand-over needs none of it (issue 17)

            self._err, err_w = os.pipe2(os.O_CLOEXEC)
            try:
                # qmail-queue runs in QMAILHOME, as qmail's programs start it.
                self.pid = spawn.spawn(prog, argv, env=self._env, fds={0: msg_r, 1: env_r, 2: 2, FD_ERRSTR: err_w},
                                       cwd=_home.home())
            except OSError:
                self.pid = -1
                if not os.path.isdir(_home.home()):
                    self._start_error = 61
                for fd in (self._msg, self._envfd, self._err):
                    os.close(fd)
            finally:
                os.close(err_w)
        finally:
            for fd in (msg_r, env_r):
                os.close(fd)

    def _hand_over(self, prog: str, msg_r: int, env_r: int) -> _socket.socket | None:
        """Give msg_r and env_r to qmail-queued where prog would only do that; return the connection.

        prog is this installation's own qmail-queue, a pyqmail stub started
        by fork-and-call (spawn's fast path), in a root-mode home, and this
        process is not qmailq. As another user, that qmail-queue would only
        connect to qmail-queued and pass its descriptors 0 and 1
        (qmail_queue.hand_to_server); this process does it itself, one
        process fewer per message (issue 17). As root (real and effective
        uid 0), it would drop to qmailq and write the queue itself, with uid
        0 in the Received line and the `u` record: qmail-queued writes the
        same records for a root client (SO_PEERCRED says uid 0), with the
        same fsyncs, without a fork per message. None when that is not the
        case, or no qmail-queued acknowledged (down, or at its -c limit for
        the uid): qmail-queue is started as always (and writes the maildrop,
        or as root the queue).
        """
        if "/" not in prog or (os.geteuid() == 0) != (os.getuid() == 0):
            return None  # a setuid-root caller: qmail-queue names the real uid, qmail-queued would see 0
        from pyqmail.stubfile import runnable_stub

        stub = runnable_stub(prog, QMAIL_QUEUE_MODULE)
        if stub is None:
            return None
        qmail_home = _home.home()
        if (self._env.get("QMAILHOME") or stub.home) != qmail_home:
            return None  # qmail-queue would serve another home
        try:
            inst = _home.install()
        except (OSError, ValueError):
            return None  # qmail-queue fails as it fails
        if inst.single or os.getuid() == inst.uid("qmailq"):
            return None
        from pyqmail.queue import handoff
        from pyqmail.smtputf8 import ENV as SMTPUTF8_ENV, flagged

        conn, _ = handoff.offer(qmail_home, msg_r, env_r, flagged(self._env.get(SMTPUTF8_ENV)))
        return conn

    def write(self, data: bytes) -> None:
        """Queue data as part of the message; errors are reported by close()."""
        if self.pid == -1 or self._failed:
            return
        self._buf += data
        if len(self._buf) >= 65536:
            self._flush()

    def fail(self) -> None:
        """Abandon the message: close() then gives qmail-queue no envelope, so nothing is queued."""
        self._abandoned = True

    def _flush(self) -> None:
        try:
            _write_all(self._msg, self._buf)
        except OSError:
            self._failed = True
        self._buf.clear()

    def begin(self, sender: bytes) -> None:
        """End the message and start the envelope with its sender (qmail's qmail_from)."""
        if self.pid == -1 or self._envelope is not None:
            return
        self._flush()
        os.close(self._msg)
        self._envelope = bytearray(b"F" + sender + b"\0")

    def to(self, recipient: bytes) -> None:
        """Add a recipient to the envelope, streamed to qmail-queue 64 KiB at a time (qmail_to)."""
        env = self._envelope
        if env is None:
            return
        env += b"T" + recipient + b"\0"
        if len(env) >= 65536:
            self._send_envelope()

    def _send_envelope(self) -> None:
        env = self._envelope
        assert env is not None
        try:
            if not (self._abandoned or self._failed):
                _write_all(self._envfd, env)
        except OSError:
            self._failed = True
        env.clear()

    def close(self, sender: bytes = b"", recipients: Iterable[bytes] = ()) -> bytes:
        """Send the envelope (begin(sender) and to() each recipient unless begun), wait for qmail-queue;
        return b"" or its D/Z report. An abandoned envelope is never ended, so nothing is queued."""
        if self.pid == -1:
            self.code = self._start_error
            return exits.report(self._start_error)
        self.begin(sender)
        for r in recipients:
            self.to(r)
        assert self._envelope is not None
        if self._abandoned:
            self._envelope.clear()
        else:
            self._envelope += b"\0"
            self._send_envelope()
        os.close(self._envfd)
        if self._conn is not None:
            from pyqmail.queue import handoff

            # qmail-queued writes nothing for descriptor 6: custom stays b"", as from the
            # qmail-queue that handed the message over.
            code = handoff.answer(self._conn)
            self._conn = None
            self.code = code
        else:
            custom = bytearray()
            # In a tcpserver worker serving several sessions, the others run until qmail-queue (or a
            # slow $QMAILQUEUE filter) answers; looked up, not imported, as in queue.handoff.
            waiting = sys.modules.get("pyqmail.wait")
            while len(custom) < CUSTOM_READ:
                try:
                    if waiting is not None:
                        waiting.readable(self._err, 86400.0)  # qmail-queue's own alarm bounds it
                    chunk = os.read(self._err, CUSTOM_READ - len(custom))
                except OSError:
                    break
                if not chunk:
                    break
                custom += chunk
            os.close(self._err)
            from pyqmail import spawn

            code = spawn.wait(self.pid)
            self.code, self.custom = code, bytes(custom)
        if code < 0:
            return exits.CRASHED
        if code == 0 and (self._failed or self._abandoned):
            return exits.report(54)
        return exits.report(code, self.custom)
