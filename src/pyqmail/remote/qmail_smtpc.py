"""qmail-smtpc: send a message to a smarthost without a queue (the book, chapter 6).

The interface is qmail-queue's (qmail-queue(8)): the message on descriptor 0,
then the envelope on descriptor 1 (F sender NUL, T recipient NUL ..., NUL),
qmail-queue's exit codes. It is the SMTP sibling of qmail-qmqpc: installed as
QMAILHOME/bin/qmail-queue (or named by $QMAILQUEUE) it turns qmail-inject,
sendmail and qmail-smtpd into clients of one smarthost, as the book's
"Sending Mail Without a Queue" script does.

The message, behind the Received line qmail-queue would have added, goes to
QMAILHOME/bin/qmail-remote with every recipient at once. The host given to
qmail-remote is $SMARTHOST (the book's script), else the relay of
control/smtproutes' catch-all line (":relay" or ":relay:port"; qmail-remote
applies that line's port itself). Without either, exit 55.

Exit 0 when every recipient was accepted; 31 when the message or (with none
deferred) a recipient was rejected for good; a temporary code when anything
was deferred: 73 when no SMTP connection could be made, 74 when it died,
else 71. 91 for a malformed envelope, 54 for a read error, 81 when
qmail-remote cannot run or gives no usable report.
"""

from __future__ import annotations

import os
import time

from pyqmail import control, spawn
from pyqmail import home as _home
from pyqmail.control import ControlError
from pyqmail.entry import program
from pyqmail.queue.envelope import Exit, read_envelope, spool
from pyqmail.queue.exits import QueueExit
from pyqmail.queue.qmail_queue import received_line
from pyqmail.remote import smtproutes

CHUNK = 65536
REPORT_MAX = 1 << 20  # qmail-remote's reports: a letter and a short text per recipient
NO_CONNECTION = b"Sorry, I wasn't able to establish an SMTP connection."
CONNECTION_DIED = b"but connection died."


def smarthost(env: dict[str, str]) -> str:
    """Return the host for qmail-remote: $SMARTHOST, else smtproutes' catch-all relay."""
    if env.get("SMARTHOST"):
        return env["SMARTHOST"]
    try:
        lines = control.read_lines("smtproutes")
    except ControlError:
        raise Exit(QueueExit.CONFIG_ERROR) from None
    route = smtproutes.route(smtproutes.parse(lines or []).get("") or "")
    if route is None or not route.relay:
        raise Exit(QueueExit.CONFIG_ERROR)
    return route.relay


def remote(host: str, sender: bytes, recips: list[bytes], message_fd: int, env: dict[str, str]) -> bytes:
    """Run qmail-remote on the message; return its reports."""
    prog = os.path.join(_home.home(), "bin", "qmail-remote")
    r, w = os.pipe()
    try:
        argv = ["qmail-remote", host, os.fsdecode(sender), *map(os.fsdecode, recips)]
        pid = spawn.spawn(prog, argv, env=env, fds={0: message_fd, 1: w, 2: 2})
    except OSError:
        os.close(r)
        os.close(w)
        raise Exit(QueueExit.BUG) from None
    os.close(w)
    out = bytearray()
    try:
        while len(out) < REPORT_MAX:
            chunk = os.read(r, CHUNK)
            if not chunk:
                break
            out += chunk
    finally:
        os.close(r)
        spawn.wait(pid)
    return bytes(out)


def verdict(reports: bytes, count: int) -> int:
    """Return the exit code for qmail-remote's reports on count recipients."""
    items = reports.split(b"\0")[:-1]
    letters = [x[:1] for x in items[:-1]]
    # With every recipient reported, their letters decide: after the last
    # recipient is refused qmail-remote ends with "DGiving up on ...", even when
    # the refusals were temporary.
    if items and len(letters) == count and all(c in (b"r", b"h", b"s") for c in letters):
        if b"s" in letters:
            return QueueExit.TEMP_REFUSED
        if b"h" in letters:
            return QueueExit.PERM_REFUSED
        if items[-1][:1] == b"K":
            return QueueExit.OK
    if not items or items[-1][:1] not in (b"K", b"Z", b"D"):
        raise Exit(QueueExit.BUG)
    final = items[-1]
    if final[:1] == b"D":
        return QueueExit.PERM_REFUSED
    if final[:1] == b"Z":
        if final[1:].startswith(NO_CONNECTION):
            return QueueExit.CONN_REJECTED
        if CONNECTION_DIED in final:
            return QueueExit.COMM_FAILED
        return QueueExit.TEMP_REFUSED
    raise Exit(QueueExit.BUG)  # K without a report for every recipient


@program("qmail-smtpc", crash=QueueExit.BUG)
def main(argv: list[str]) -> int:
    """Send the message on fd 0 with the envelope on fd 1 to the smarthost; exit as qmail-queue."""
    env = dict(os.environ)
    try:
        try:
            os.chdir(_home.home())
        except OSError:
            raise Exit(QueueExit.HOME_ERROR) from None
        host = smarthost(env)
        head = received_line(os.getpid(), os.getuid(), _home.install(), time.time())
        message = spool(0, head)
        try:
            sender, recips = read_envelope(1)
            if not recips:
                return QueueExit.OK  # as qmail-queue: a message for nobody is taken and dropped
            return verdict(remote(host, sender, recips, message, env), len(recips))
        finally:
            os.close(message)
    except Exit as e:
        return e.code
