"""qmail-rspawn: schedule remote deliveries (qmail-rspawn(8)).

    qmail-rspawn

Reads delivery commands from qmail-send on descriptor 0 and reports on
descriptor 1 (pyqmail.send.spawnproto). For each recipient it runs
$QMAILREMOTE, or else QMAILHOME/bin/qmail-remote, as
``qmail-remote host sender recip`` with the message on descriptor 0 and
turns its output (qmail-remote(8): per recipient an r/h/s record, then a
K/Z/D record, each NUL-terminated; exit 0) into the report. Until this
installation has a qmail-remote, every remote delivery is deferred.
At start it clears the TCP timeout table, lock/tcpto.
"""

from __future__ import annotations

import os

from pyqmail import errors, spawn
from pyqmail import home as _home
from pyqmail import sig as signal
from pyqmail.entry import program
from pyqmail.queue import layout
from pyqmail.send import spawnproto

REMOTE_PROGRAM = "bin/qmail-remote"
NOT_AVAILABLE = b"ZSorry, remote delivery is not available yet. (#4.3.0)\n"
CRASHED = b"Zqmail-remote crashed.\n"
RUN_TEMPORARY = b"ZUnable to run qmail-remote.\n"
RUN_PERMANENT = b"DUnable to run qmail-remote.\n"
NO_OUTPUT = b"Zqmail-remote produced no output.\n"
EXIT_TEMPORARY = 111
EXIT_PERMANENT = 100


def _cstr(data: bytes, start: int) -> bytes:
    end = data.find(b"\0", start)
    return data[start:] if end == -1 else data[start:end]


def report(status: int, output: bytes) -> bytes:
    """Return the report for qmail-remote's wait status and output, as qmail-rspawn makes it.

    The verdict is the first K/Z/D record (none: D), overridden by the
    recipient record: 's' makes it Z, 'h' makes it D. The text is the
    recipient record's, followed by the K/Z/D record's when that one decided.
    """
    if os.WIFSIGNALED(status):
        return CRASHED
    code = os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else EXIT_TEMPORARY
    if code == EXIT_TEMPORARY:
        return RUN_TEMPORARY
    if code != 0:
        return RUN_PERMANENT
    if not output:
        return NO_OUTPUT
    result = -1
    j = 0
    for k, c in enumerate(output):
        if c == 0:
            first = output[j:j + 1]
            if first == b"K":
                result = 1
                break
            if first == b"Z":
                result = 0
                break
            if first == b"D":
                break
            j = k + 1
    verdict = result
    if output[:1] == b"s":
        verdict = 0
    elif output[:1] == b"h":
        verdict = -1
    out = bytearray({1: b"K", 0: b"Z", -1: b"D"}[verdict])
    nul = output.find(b"\0", 1)
    if nul != -1:
        out += _cstr(output, 1)
        k = nul + 1
        if result <= verdict and k < len(output) and output[k:k + 1] in (b"Z", b"D", b"K"):
            out += _cstr(output, k + 1)
    return bytes(out)


def clean_tcpto() -> None:
    """Forget every remembered TCP timeout (qmail's tcpto_clean, and lock/tcpto6); running in queue/mess."""
    for name, size in ((layout.TCPTO, layout.TCPTO_SIZE), (layout.TCPTO6, layout.TCPTO6_SIZE)):
        try:
            fd = os.open(os.path.join("..", name), os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            os.write(fd, b"\0" * size)
        except OSError:
            pass  # as in qmail: if it fails, bummer
        finally:
            os.close(fd)


class RemoteSpawner(spawnproto.Spawner):
    """qmail-rspawn's half of qmail's spawn.c."""

    truncreport = 0

    def __init__(self, qmail_home: str, inst: _home.Install, env: dict[str, str]) -> None:
        uid_q = inst.uid("qmailq")
        super().__init__(uid_q if uid_q != -1 else os.getuid())
        self.env = env
        self.program = env.get("QMAILREMOTE") or os.path.join(qmail_home, REMOTE_PROGRAM)
        self.fixed = bool(env.get("QMAILREMOTE"))
        # Import qmail-remote's module here, once (as qmail-lspawn does for
        # qmail-local): every delivery child is a fork and starts without importing.
        stub = spawn.read_stub(self.program)
        if stub is not None:
            try:
                mod = __import__(stub.module, fromlist=["main"])
                hook = getattr(mod, "preload", None)
                if hook is not None:
                    hook()
            except ImportError:
                pass

    def immediate(self, sender: bytes, recip: bytes, at: int) -> bytes | None:
        if not self.fixed and not os.path.exists(self.program):
            return NOT_AVAILABLE
        return None

    def report(self, status: int, output: bytes) -> bytes:
        return report(status, output)

    def start(self, messfd: int, outfd: int, sender: bytes, recip: bytes, at: int) -> int:
        argv = [self.program if self.fixed else "qmail-remote"] + [
            os.fsdecode(a) for a in (recip[at + 1:], sender, recip)]
        pid = os.fork()
        if pid == 0:
            code = EXIT_TEMPORARY
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                spawn.become(self.program, argv, env=self.env, fds={0: messfd, 1: outfd, 2: outfd})
            except OSError as e:
                code = EXIT_TEMPORARY if errors.temporary(e) else EXIT_PERMANENT
            except BaseException:  # noqa: BLE001 - the child must end in _exit, temporarily
                code = EXIT_TEMPORARY
            finally:
                os._exit(code)
        return pid


@program("qmail-rspawn", crash=111)
def main(argv: list[str]) -> int:
    """Run remote deliveries as qmail-send commands them."""
    qmail_home = _home.home()
    try:
        os.chdir(qmail_home)
        os.chdir("queue/mess")
    except OSError:
        return 111
    spawner = RemoteSpawner(qmail_home, _home.install(), dict(os.environ))
    clean_tcpto()
    return spawner.run()
