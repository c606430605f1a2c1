"""Handing a message to qmail-queue, as every queueing program does.

`QQ` starts $QMAILQUEUE (or QMAILHOME/bin/qmail-queue) through the spawn fast
path with the message pipe on descriptor 0, the envelope pipe on descriptor
1 and a pipe for a custom error string on descriptor 6, and turns its exit
code into the D/Z report qmail's programs give (exits.report).
"""

from __future__ import annotations

import os

from pyqmail import durable, spawn
from pyqmail import home as _home
from pyqmail.queue import exits

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

FD_ERRSTR = 6


def queue_program(env: Mapping[str, str] | None = None) -> str:
    """Return the program to queue with: $QMAILQUEUE, else QMAILHOME/bin/qmail-queue."""
    env = os.environ if env is None else env
    return env.get("QMAILQUEUE") or os.path.join(_home.home(), "bin", "qmail-queue")


class QQ:
    """One running qmail-queue: write the message, then close() with the envelope."""

    def __init__(self, env: Mapping[str, str] | None = None, program: str | None = None) -> None:
        self._env = dict(os.environ if env is None else env)
        prog = program or queue_program(self._env)
        msg_r, self._msg = os.pipe2(os.O_CLOEXEC)
        env_r, self._envfd = os.pipe2(os.O_CLOEXEC)
        self._err, err_w = os.pipe2(os.O_CLOEXEC)
        self._failed = False
        self._abandoned = False
        self._buf = bytearray()
        self._envelope: bytearray | None = None  # what begin() and to() have not written yet
        self._start_error = 120
        try:
            # qmail-queue runs in QMAILHOME, as qmail's programs start it.
            self.pid = spawn.spawn(prog, [prog], env=self._env, fds={0: msg_r, 1: env_r, 2: 2, FD_ERRSTR: err_w},
                                   cwd=_home.home())
        except OSError:
            self.pid = -1
            if not os.path.isdir(_home.home()):
                self._start_error = 61
            for fd in (self._msg, self._envfd, self._err):
                os.close(fd)
        finally:
            for fd in (msg_r, env_r, err_w):
                os.close(fd)

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
            durable.write_all(self._msg, self._buf)
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
                durable.write_all(self._envfd, env)
        except OSError:
            self._failed = True
        env.clear()

    def close(self, sender: bytes = b"", recipients: Iterable[bytes] = ()) -> bytes:
        """Send the envelope (begin(sender) and to() each recipient unless begun), wait for qmail-queue;
        return b"" or its D/Z report. An abandoned envelope is never ended, so nothing is queued."""
        if self.pid == -1:
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
        custom = bytearray()
        while len(custom) < 1024:
            try:
                chunk = os.read(self._err, 1024)
            except OSError:
                break
            if not chunk:
                break
            custom += chunk
        os.close(self._err)
        code = spawn.wait(self.pid)
        if code < 0:
            return exits.CRASHED
        if code == 0 and (self._failed or self._abandoned):
            return exits.report(54)
        return exits.report(code, bytes(custom))
