"""qmail-spp, the qmail SMTP plugin patch, as a check of qmail-smtpd (pyqmail.smtpd.policy).

control/smtpplugins ($SPPCONFFILE names another file, relative to the home)
lists programs under the sections `[connection] [helo] [mail] [rcpt] [data]
[auth]` (the first letter after '[' decides, as the patch); lines before any
section are ignored, and so are empty lines and '#' comments. A line starting
with ':' runs through `/bin/sh -c`. $NOSPP set: no plugins. No control file:
no plugins (the patch dies with 421 instead; pyqmail's file is optional).

For each command, the section's programs run one after another, with
descriptor 0 on /dev/null, 1 a pipe read here, 2 qmail-smtpd's (its log), and
qmail-smtpd's environment (tcp-environ(5)'s TCPREMOTEIP... included) plus
SMTPHELOHOST (HELO/EHLO argument), SMTPMAILFROM (MAIL address), SMTPRCPTTO (the
RCPT address), SMTPRCPTCOUNT (recipients accepted so far), SMTPRCPTCOUNTALL
(RCPTs asked so far, this one included), SMTPRCPTHOSTSOK (1 if relaying or
rcpthosts allows this recipient, else 0) and SMTPAUTHUSER (after AUTH). These
stay in qmail-smtpd's environment, as the patch puts them there.

Each line a plugin prints is a command (its first byte):
  A        accept: no more plugins in this session (the core's checks still apply)
  N        next: no more plugins for this command (the core's checks still apply)
  O        ok: as N, and the core's badmailfrom (MAIL) and rcpthosts (RCPT) are skipped
  Emsg     refuse this command with msg
  LMmsg, LRmsg, LDmsg  refuse the next MAIL, RCPT or DATA with msg (until RSET or the message ends)
  Rmsg     send msg and drop the connection
  D        drop the connection without a word
  Svar=val set var in qmail-smtpd's environment;  Uvar  unset it
  Hline    add the header line to the message
  Caddr    change the MAIL or RCPT address to addr
  Pmsg     send msg to the client now (before the command's reply)
A, N, O, E, R and D end the plugin's output. msg is sent as it is: the plugin
writes the SMTP code. A line ends at a NUL, as the patch reads it (a C string),
and a CR before its LF is part of the line end; control bytes in an H line
(a plugin echoing the client's text) are written as '?'. A plugin that cannot be run, exits 120, is killed by a
signal, or runs longer than $SPPTIMEOUT seconds (pyqmail's own; default 60;
then its process group is killed) is `451 qmail-spp failure: PROGRAM: WHY
(#4.3.0)`: a temporary refusal of the command, never an accepted message.
"""

from __future__ import annotations

import os
import select
import signal
import time

from pyqmail import control
from pyqmail import wait
from pyqmail.control import ControlError
from pyqmail.smtpd import policy
from pyqmail.smtpd.policy import Check, Verdict
from pyqmail.smtpd.receive import scan_ulong

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

    from pyqmail.smtpd.policy import View

CONFFILE = "smtpplugins"
SECTIONS = {ord("c"): "connect", ord("h"): "helo", ord("m"): "mail", ord("r"): "rcpt", ord("d"): "data",
            ord("a"): "auth"}
TIMEOUT = 60.0
OUTPUT_MAX = 65536  # bytes of a plugin's output read; the rest is ignored
EXIT_CANT_EXEC = 120
FINAL = frozenset(b"ANODER")
CRLF = b"\r\n"
OK = b"250 ok\r\n"
_HEADER_SAFE = bytes(c if c == 9 or 32 <= c != 127 else 63 for c in range(256))  # control bytes but TAB as '?'


def failure(program: bytes, why: bytes) -> bytes:
    """Return the 451 for a plugin that could not give an answer (the patch's err_spp)."""
    return b"451 qmail-spp failure: " + program + b": " + why + b" (#4.3.0)\r\n"


class Result:
    """What one plugin run said: its output and how it ended."""

    __slots__ = ("output", "failed")

    def __init__(self, output: bytes, failed: bytes | None) -> None:
        self.output = output
        self.failed = failed  # why it gave no answer, or None


def run(program: bytes, env: Mapping[bytes, bytes], timeout: float) -> Result:
    """Run one plugin line (':' = through /bin/sh -c) and collect its stdout within timeout seconds."""
    argv = [b"/bin/sh", b"-c", program[1:]] if program[:1] == b":" else [program]
    r, w = os.pipe()
    try:
        try:
            pid = os.posix_spawn(argv[0], argv, env,
                                 file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                               (os.POSIX_SPAWN_DUP2, w, 1), (os.POSIX_SPAWN_CLOSE, r)],
                                 setpgroup=0, setsigdef=(signal.SIGPIPE,))
        except OSError:
            os.close(r)
            return Result(b"", b"can't execute")
    finally:
        os.close(w)
    out = b""
    deadline = time.monotonic() + timeout
    hung = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not wait.ready(r, select.POLLIN, min(int(left * 1000) + 1, wait.POLL_MAX_MS)):
                hung = True
                break
            chunk = os.read(r, 4096)
            if not chunk:
                break
            if len(out) < OUTPUT_MAX:
                out += chunk
            if _final(out):
                break  # the patch stops reading at A N O D E R
    finally:
        os.close(r)
    status = None if hung else _wait(pid, deadline)
    if status is None:
        _kill(pid)
        return Result(out, b"plugin timed out")
    if os.WIFSIGNALED(status):
        return Result(out, b"child crashed")
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_CANT_EXEC:
        return Result(out, b"can't execute")
    return Result(out, None)


def _wait(pid: int, deadline: float) -> int | None:
    """Reap pid by deadline; return its wait status, or None if it is still running then."""
    delay = 0.001
    while True:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            return status
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        wait.sleep(min(delay, left))  # a plugin that printed its answer and lingers: poll its end
        delay = min(delay * 2, 0.05)


def _kill(pid: int) -> None:
    """Kill the plugin's process group (a shell's children too) and reap it."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # safe: the group is gone already
    os.waitpid(pid, 0)


def _final(out: bytes) -> bool:
    """Whether a complete line of out is one of A N O D E R E (the end of the plugin's answer)."""
    for line in out.split(b"\n")[:-1]:
        if line[:1] and line[0] in FINAL:
            return True
    return False


class Spp(Check):
    """qmail-spp's plugins, by section."""

    name = "spp"

    def __init__(self, plugins: dict[str, list[bytes]], timeout: float = TIMEOUT) -> None:
        self.plugins = plugins
        self.timeout = timeout
        self.on = True  # A turns the plugins off for the rest of the session
        self.later: dict[str, bytes] = {}  # L: a refusal waiting for the next MAIL (M), RCPT (R), DATA (D)

    def _run(self, section: str, var: bytes | None, addr: bytes | None) -> Verdict | None:
        """Run section's plugins; var names the environment variable holding addr (MAIL, RCPT)."""
        if not self.on:
            return None
        programs = self.plugins.get(section)
        if not programs:
            return None
        env = os.environb
        if var is not None and addr is not None:
            env[var] = addr
        before = b""
        header = b""
        changed: bytes | None = None
        for program in programs:
            res = run(program, env, self.timeout)
            final = 0
            reply = b""
            for line in res.output.split(b"\n"):
                nul = line.find(b"\0")
                if nul != -1:
                    line = line[:nul]  # the patch reads each line as a C string (and the environment takes no NUL)
                if line[-1:] == b"\r":
                    line = line[:-1]  # a plugin writing CR LF line ends
                if not line:
                    continue
                cmd, arg = line[0], line[1:]
                if cmd == 72:  # H
                    # A plugin may echo the client's text ($SMTPHELOHOST...): a CR in it would end
                    # the field for many readers, a field injected below the Received line.
                    header += arg.translate(_HEADER_SAFE) + b"\n"
                elif cmd == 67:  # C
                    if var is not None:
                        changed = arg
                        env[var] = arg
                elif cmd == 83:  # S
                    name, eq, value = arg.partition(b"=")
                    if eq and name:
                        env[name] = value
                elif cmd == 85:  # U
                    if arg:
                        env.pop(arg, None)
                elif cmd == 80:  # P
                    before += arg + CRLF
                elif cmd == 76:  # L
                    key = {77: "mail", 82: "rcpt", 68: "data"}.get(arg[0] if arg else 0)
                    if key is not None:
                        self.later[key] = self.later.get(key, b"") + arg[1:] + CRLF
                elif cmd in FINAL:
                    final = cmd
                    reply = arg + CRLF
                    break
            if res.failed is not None:
                return Verdict(failure(program, res.failed), before=before, header=header)
            if final == 65:  # A
                self.on = False
                return Verdict(stop=True, before=before, header=header, address=changed)
            if final == 78:  # N
                return Verdict(stop=True, before=before, header=header, address=changed)
            if final == 79:  # O
                return Verdict(OK, before=before, header=header, address=changed)
            if final == 69:  # E
                return Verdict(reply, before=before, header=header)
            if final == 82:  # R
                return Verdict(reply, drop=True, before=before, header=header)
            if final == 68:  # D
                return Verdict(drop=True, before=before, header=header)
        if before or header or changed is not None:
            return Verdict(before=before, header=header, address=changed)
        return None

    def _later(self, key: str) -> Verdict | None:
        text = self.later.get(key)
        return Verdict(text) if text else None

    def connect(self, s: View) -> Verdict | None:
        return self._run("connect", None, None)

    def helo(self, s: View, name: bytes) -> Verdict | None:
        os.environb[b"SMTPHELOHOST"] = name
        return self._run("helo", None, None)

    def mail(self, s: View, addr: bytes) -> Verdict | None:
        return self._later("mail") or self._run("mail", b"SMTPMAILFROM", addr)

    def rcpt(self, s: View, addr: bytes) -> Verdict | None:
        v = self._later("rcpt")
        if v is not None:
            return v
        env = os.environb
        env[b"SMTPRCPTCOUNT"] = b"%d" % s.rcptcount
        env[b"SMTPRCPTCOUNTALL"] = b"%d" % s.rcptcountall
        env[b"SMTPRCPTHOSTSOK"] = b"1" if s.rcpt_allowed else b"0"
        return self._run("rcpt", b"SMTPRCPTTO", addr)

    def data(self, s: View) -> Verdict | None:
        return self._later("data") or self._run("data", None, None)

    def auth(self, s: View, user: bytes) -> Verdict | None:
        os.environb[b"SMTPAUTHUSER"] = user
        return self._run("auth", None, None)

    def reset(self, s: View) -> None:
        self.later = {}


def parse(lines: list[str]) -> dict[str, list[bytes]]:
    """Return the programs of each section of control/smtpplugins' lines."""
    plugins: dict[str, list[bytes]] = {}
    section: str | None = None
    for text in lines:
        line = text.encode("latin-1")
        if line[:1] == b"[":
            section = SECTIONS.get(line[1]) if len(line) > 1 else None
        elif section is not None:
            plugins.setdefault(section, []).append(line)
    return plugins


def load(env: Mapping[bytes, bytes]) -> Spp | None:
    """Return the check for control/smtpplugins ($SPPCONFFILE), or None: $NOSPP, no file, no plugins."""
    if b"NOSPP" in env:
        return None
    name = env.get(b"SPPCONFFILE")
    if name:
        lines = _read_lines(name.decode("latin-1"))
    else:
        lines = control.read_lines(CONFFILE)
    if lines is None:
        return None
    plugins = parse(lines)
    if not plugins:
        return None
    t = env.get(b"SPPTIMEOUT")
    timeout = float(scan_ulong(t)[0]) if t is not None and scan_ulong(t)[1] else TIMEOUT
    return Spp(plugins, timeout)


def _read_lines(path: str) -> list[str] | None:
    """Read a plugin list at path (relative to the home, qmail-smtpd's cwd) as control files are read."""
    from pyqmail import home as _home

    full = path if path.startswith("/") else f"{_home.home()}/{path}"
    try:
        with open(full, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ControlError(f"unable to read controls: {path}: {e.strerror}") from e
    out = []
    for raw in data.decode("latin-1").split("\n"):
        line = raw.rstrip(" \t")
        if line and not line.startswith("#"):
            out.append(line)
    return out


policy.register("spp", load)
