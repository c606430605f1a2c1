"""`qmail status`: the services, queue and recent errors of an installation, for an admin.

    qmail status [--home DIR]

Reads the layout `qmail up` makes and any other supervision running this
home's programs (pyqmail.admin.supervision): the svscan directory QMAILHOME/service
(one daemontools service per program, each with a log/ service),
run/up.pid and run/svscan.pid, and the multilog logs
QMAILHOME/log/NAME/current (with the rotated @*.s files). One item per line:

    qmail up: running (pid N) | not running [(stale pid N in run/up.pid)]
    svscan: running (pid N) | not running [...]
    nothing runs: start it with: qmail up --home HOME     (only then)
    service NAME: <svstat's text>                          (NAME/log for the logger)
    supervised by svscan (pid N) in DIR                    (this home's services elsewhere:
    service DIR/NAME: <svstat's text>                       the book's /service, systemd's...)
    listening NAME: HOST:PORT                              (from the run script's tcpserver)
    messages in queue: N
    messages in queue but not yet preprocessed: M
    oldest message: #ID, S seconds old | oldest message: none
    concurrency send: local l/L remote r/R                 (last qmail-send status line)
    concurrency NAME: n/m                                  (last tcpserver status line)
    error NAME: YYYY-MM-DD HH:MM:SS.nnnnnnnnn TEXT         (last ERRORS_MAX per log)

A service where supervise never ran (no supervise/ok) is "supervise not
running", like one whose supervise has stopped. Error lines are those with
one of ERROR_MARKS, except qmail-send's and tcpserver's routine lines
(ROUTINE), which quote addresses and host names chosen by others.

Exit 0 when everything that exists is up, 1 when something is down or
nothing runs, 100 for a usage error, 111 when something could not be read.
"""

from __future__ import annotations

import argparse
import getopt
import os
import re
import shlex
import time
from dataclasses import dataclass, field

from pyqmail import durable, errors
from pyqmail import home as _home
from pyqmail.queue import layout
from pyqmail.queue.qmail_qstat import LINE_QUEUE, LINE_TODO, count_files
from pyqmail.svc import status as svstatus
from pyqmail.svc.tai64nlocal import convert

EXIT_OK = 0
EXIT_DOWN = 1
EXIT_USAGE = 100
EXIT_TROUBLE = 111

FD_OUT = 1
SERVICE_DIR = "service"
LOG_DIR = "log"
UP_PID = "run/up.pid"
SVSCAN_PID = "run/svscan.pid"
SERVICE_ORDER = ("send", "queued", "smtpd", "smtps", "qmtpd", "pop3d", "pop3s")  # `qmail up`'s services, shown in this order
SEND_LOG = "send"
ERRORS_MAX = 10  # error lines shown per log
ERROR_MARKS = (b"deferral:", b"failure:", b"warning:", b"alert:", b"unable", b"trouble", b"internal error")
# Routine lines that quote addresses, host names or delivery reports, which
# may hold any of ERROR_MARKS ("to remote unable@x", a remote host named
# trouble.example): never errors.
ROUTINE = (b"starting delivery ", b"info msg ", b"new msg ", b"end msg ", b"bounce msg ", b"status: ",
           b"tcpserver: pid ", b"tcpserver: ok ", b"tcpserver: end ", b"tcpserver: status: ")
SUCCESS = re.compile(rb"delivery \d+: success: ")
SEND_STATUS = b"status: local "
TCPSERVER_STATUS = b"tcpserver: status: "
TAIL_MAX = 256 << 10  # bytes read from the end of each log file
RUN_MAX = 64 << 10  # bytes of a run script read
PID_MAX = 64  # bytes of a pid file read
LINE_MAX = 1000  # a longer log line is cut and marked with "..."
TCPSERVER_OPTIONS = "46dDvqQhHrR1UXx:t:u:g:l:b:B:c:pPoO"  # tcpserver's getopt string
EVERY_ADDRESS = "0"  # tcpserver's host for every local address

# A log line may hold bytes a remote client chose: keep control bytes
# (terminal escapes, 8-bit CSI included) off the admin's terminal.
_SHOWABLE = bytes(c if (32 <= c < 127 or c >= 160 or c == 9) else ord("?") for c in range(256))


@dataclass(slots=True)
class Report:
    """The lines of `qmail status` and the exit code they add up to."""

    lines: list[bytes] = field(default_factory=list)
    down: bool = False
    trouble: bool = False

    def add(self, text: str | bytes) -> None:
        """Append one line (without its newline)."""
        self.lines.append(text.encode("latin-1", "replace") if isinstance(text, str) else text)

    def code(self) -> int:
        """Return the exit code: trouble beats down beats ok."""
        if self.trouble:
            return EXIT_TROUBLE
        return EXIT_DOWN if self.down else EXIT_OK

    def text(self) -> bytes:
        """Return all lines, each ended by a newline."""
        return b"".join(line + b"\n" for line in self.lines)


# --- processes: qmail up and svscan -------------------------------------------------------

def alive(pid: int) -> bool:
    """Return whether a process pid exists (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_pidfile(r: Report, qmail_home: str, name: str, relpath: str) -> bool:
    """Report whether the process named in relpath runs; return True if it does."""
    try:
        with open(os.path.join(qmail_home, relpath), "rb") as f:
            data = f.read(PID_MAX)
    except FileNotFoundError:
        r.add(f"{name}: not running")
        return False
    except OSError as e:
        r.add(f"{name}: unable to read {relpath}: {errors.describe(e)}")
        r.trouble = True
        return False
    text = data.strip()
    if not text.isdigit() or int(text) <= 0:
        r.add(f"{name}: not running ({relpath} holds no pid)")
        r.down = True
        return False
    pid = int(text)
    if not alive(pid):
        # The pid file outlived its process: it was meant to run and does not.
        r.add(f"{name}: not running (stale pid {pid} in {relpath})")
        r.down = True
        return False
    r.add(f"{name}: running (pid {pid})")
    return True


# --- services --------------------------------------------------------------------------------

def service_names(qmail_home: str) -> list[str] | None:
    """Return the services in QMAILHOME/service in display order; None if there is no such directory."""
    try:
        names = [e.name for e in os.scandir(os.path.join(qmail_home, SERVICE_DIR))
                 if not e.name.startswith(".") and e.is_dir()]
    except FileNotFoundError:
        return None
    return ordered(names)


def ordered(names: list[str]) -> list[str]:
    """Return names with `qmail up`'s services first, in SERVICE_ORDER, then the others sorted."""
    known = [n for n in SERVICE_ORDER if n in names]
    return known + sorted(n for n in names if n not in SERVICE_ORDER)


def service_line(r: Report, label: str, service_dir: str, now: int) -> bool:
    """Report one service's state as svstat says it; return True if supervise runs for it."""
    try:
        st = svstatus.read(service_dir)
    except svstatus.NotRunning as e:
        r.add(f"service {label}: {e}")
        r.down = True
        return False
    except svstatus.StatusError as e:
        try:
            os.lstat(os.path.join(service_dir, svstatus.OK))
        except FileNotFoundError:
            # supervise makes supervise/ok when it starts: it never ran here.
            r.add(f"service {label}: {svstatus.NotRunning()}")
            r.down = True
            return False
        except OSError:
            pass  # safe: the first error, e, is the one reported just below
        r.add(f"service {label}: {e}")
        r.trouble = True
        return False
    r.add(f"service {label}: {st.describe(now)}")
    if not st.pid:
        r.down = True
    return True


def listen_address(script: bytes) -> str | None:
    """Return 'HOST:PORT' of the tcpserver the run script's last command execs; None if it runs none.

    Raise ValueError if the script names tcpserver but its host and port cannot be read.
    """
    text = script.decode("latin-1").replace("\\\n", " ")
    for line in reversed(text.splitlines()):
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        for i, word in enumerate(words):
            if os.path.basename(word) != "tcpserver":
                continue
            try:
                _opts, rest = getopt.getopt(words[i + 1:], TCPSERVER_OPTIONS)
            except getopt.GetoptError as e:
                raise ValueError(str(e)) from None
            if len(rest) < 2:
                raise ValueError("no host and port")
            host, port = rest[0], rest[1]
            if host == EVERY_ADDRESS:
                return f"{host}:{port} (every address)"
            return f"{host}:{port}"
    return None


def check_listen(r: Report, name: str, service_dir: str) -> bool:
    """Report where a network service listens; return True if it is one."""
    try:
        with open(os.path.join(service_dir, "run"), "rb") as f:
            script = f.read(RUN_MAX)
    except FileNotFoundError:
        r.add(f"listening {name}: unknown (no run script)")
        r.down = True
        return False
    except OSError as e:
        r.add(f"listening {name}: unable to read run: {errors.describe(e)}")
        r.trouble = True
        return False
    try:
        where = listen_address(script)
    except ValueError as e:
        r.add(f"listening {name}: unknown (tcpserver line in run: {e})")
        return True
    if where is None:
        return False
    r.add(f"listening {name}: {where}")
    return True


# --- the queue -------------------------------------------------------------------------------

def oldest(queue_dir: str, split: int) -> tuple[int, int] | None:
    """Return (message number, birth in unix seconds) of the oldest message; None if the queue is empty.

    A preprocessed message's birth is info/N's modification time, as
    qmail-send and qmail-qread take it; before that, todo/N's.
    """
    found: tuple[int, int] | None = None
    numbers = layout.todo_numbers(split, queue_dir)  # todo/ and, in a big-todo queue, its subdirectories
    for d in [f"info/{i}" for i in range(split)]:
        numbers.update(int(n) for n in os.listdir(os.path.join(queue_dir, d)) if n.isdigit())
    for num in numbers:
        for name in (layout.split_name("info", num, split), *layout.todo_names("todo", num, split)):
            try:
                born = int(os.stat(os.path.join(queue_dir, name)).st_mtime)
            except (FileNotFoundError, NotADirectoryError):
                continue  # delivered (or preprocessed) meanwhile, or in todo/'s other place
            if found is None or (born, num) < (found[1], found[0]):
                found = (num, born)
            break
    return found


def check_queue(r: Report, qmail_home: str, now: int) -> None:
    """Report the queue as qmail-qstat counts it, and the oldest message's age."""
    queue_dir = os.path.join(qmail_home, "queue")
    for d in ("mess", "todo"):
        try:
            os.scandir(os.path.join(queue_dir, d)).close()
        except OSError as e:
            r.add(f"queue: unable to read queue/{d}: {errors.describe(e)}")
            r.trouble = True
            return
    qdir = os.fsencode(queue_dir)
    r.add(LINE_QUEUE + b"%d" % count_files(qdir + b"/mess"))
    r.add(LINE_TODO + b"%d" % count_files(qdir + b"/todo"))
    try:
        first = oldest(queue_dir, _home.install().split)
    except OSError as e:
        r.add(f"oldest message: unable to read the queue: {errors.describe(e)}")
        r.trouble = True
        return
    if first is None:
        r.add("oldest message: none")
    else:
        r.add(f"oldest message: #{first[0]}, {max(0, now - first[1])} seconds old")


# --- logs ------------------------------------------------------------------------------------

def tail(path: str) -> list[bytes]:
    """Return the whole lines of the last TAIL_MAX bytes of path; [] if it does not exist.

    Raise OSError for other trouble.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    try:
        size = os.fstat(fd).st_size
        start = max(0, size - TAIL_MAX)
        data = os.pread(fd, TAIL_MAX, start)
    finally:
        os.close(fd)
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]  # the first is the end of a line we did not read whole
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def log_lines(log_dir: str) -> list[bytes]:
    """Return the recent lines of a multilog directory: the newest rotated file's, then current's."""
    try:
        rotated = sorted(n for n in os.listdir(log_dir)
                         if n.startswith("@") and (n.endswith(".s") or n.endswith(".u")))
    except FileNotFoundError:
        return []
    lines = tail(os.path.join(log_dir, rotated[-1])) if rotated else []
    return lines + tail(os.path.join(log_dir, "current"))


def text_of(line: bytes) -> bytes:
    """Return a log line without its TAI64N stamp."""
    if line.startswith(b"@"):
        head, _, rest = line.partition(b" ")
        return rest if head else line
    return line


def shown(line: bytes) -> bytes:
    """Return a log line as printed: stamp in local time, control bytes as '?', cut at LINE_MAX."""
    line = convert(line).translate(_SHOWABLE)
    return line if len(line) <= LINE_MAX else line[:LINE_MAX] + b"..."


def is_error(line: bytes) -> bool:
    """Return whether a log line reports a problem."""
    text = text_of(line)
    if text.startswith(ROUTINE) or SUCCESS.match(text):
        return False
    return any(mark in text for mark in ERROR_MARKS)


def last_status(lines: list[bytes], prefix: bytes) -> bytes | None:
    """Return what follows the last line's prefix (after its stamp), None if no line has it."""
    for line in reversed(lines):
        text = text_of(line)
        if text.startswith(prefix):
            return text
    return None


def log_names(qmail_home: str, services: list[str]) -> list[str]:
    """Return the logs to read: the services' first, then any other directory in QMAILHOME/log."""
    try:
        others = ordered([e.name for e in os.scandir(os.path.join(qmail_home, LOG_DIR))
                          if not e.name.startswith(".") and e.is_dir() and e.name not in services])
    except FileNotFoundError:
        others = []
    return [*services, *others]


def check_logs(r: Report, qmail_home: str, names: list[str], network: set[str]) -> None:
    """Report the concurrency lines and the recent errors of each log."""
    logs: dict[str, list[bytes]] = {}
    for name in names:
        try:
            logs[name] = log_lines(os.path.join(qmail_home, LOG_DIR, name))
        except OSError as e:
            r.add(f"log {name}: unable to read {LOG_DIR}/{name}: {errors.describe(e)}")
            r.trouble = True
    for name in names:
        if name not in logs:
            continue
        if name == SEND_LOG:
            prefix, keep = SEND_STATUS, len(b"status: ")
        elif name in network:
            prefix, keep = TCPSERVER_STATUS, len(TCPSERVER_STATUS)
        else:
            continue
        found = last_status(logs[name], prefix)
        r.add(b"concurrency %s: %s" % (os.fsencode(name),
                                        b"not logged yet" if found is None else shown(found[keep:])))
    for name in names:
        for line in [x for x in logs.get(name, []) if is_error(x)][-ERRORS_MAX:]:
            r.add(b"error %s: %s" % (os.fsencode(name), shown(line)))


# --- the command -----------------------------------------------------------------------------

def check_elsewhere(r: Report, qmail_home: str, now: int) -> tuple[bool, list[str]]:
    """Report this home's services outside QMAILHOME/service (the book's /service, systemd's...).

    Return (whether a supervise runs any of them, the directories holding them).
    """
    from pyqmail.admin import supervision

    s = supervision.survey(qmail_home, now)
    own = os.path.join(os.path.abspath(qmail_home), SERVICE_DIR)
    running = False
    tops: list[str] = []
    last_where = ""
    for svc in s.services:
        top = os.path.dirname(svc.directory)
        if top == own:
            continue
        if top not in tops:
            tops.append(top)
        where = svc.where()
        if where != last_where:
            r.add(f"supervised by {where}" if svc.running or svc.scanner else f"not supervised: {top}")
            last_where = where
        running |= service_line(r, svc.directory, svc.directory, now)
        log = os.path.join(svc.directory, "log")
        if os.path.isdir(log):
            running |= service_line(r, log, log, now)
        check_listen(r, svc.directory, svc.directory)
    return running, tops


def collect(qmail_home: str, now: int) -> Report:
    """Return the status report of the installation in qmail_home at unix time now."""
    r = Report()
    up_runs = check_pidfile(r, qmail_home, "qmail up", UP_PID)
    svscan_runs = check_pidfile(r, qmail_home, "svscan", SVSCAN_PID)
    services = service_names(qmail_home)
    lines_before = len(r.lines)
    supervised = False
    network: set[str] = set()
    for name in services or []:
        sdir = os.path.join(qmail_home, SERVICE_DIR, name)
        supervised |= service_line(r, name, sdir, now)
        if os.path.isdir(os.path.join(sdir, "log")):
            supervised |= service_line(r, f"{name}/log", os.path.join(sdir, "log"), now)
        if check_listen(r, name, sdir):
            network.add(name)
    elsewhere, tops = check_elsewhere(r, qmail_home, now)
    if not (up_runs or svscan_runs or supervised or elsewhere):
        if tops:
            advice = "nothing runs: this home's services in " + ", ".join(tops) + \
                     " are not supervised: start svscan over " + (tops[0] if len(tops) == 1 else "one of them")
        else:
            advice = f"nothing runs: start it with: qmail up --home {qmail_home}"
        r.lines.insert(lines_before, advice.encode("latin-1", "replace"))
        r.down = True
    if services is None and not tops:
        r.add(f"services: none ({qmail_home}/{SERVICE_DIR} does not exist)")
    check_queue(r, qmail_home, now)
    check_logs(r, qmail_home, log_names(qmail_home, services or []), network)
    return r


def use_home(path: str | None) -> str:
    """Make path (default: the installed home) this process's QMAILHOME; return it, absolute."""
    from pyqmail.admin.queue import use_home as _use

    return _use(path)


def command(argv: list[str]) -> int:
    """Run `qmail status [--home DIR]`; return the exit code."""
    from pyqmail.admin import install

    p = argparse.ArgumentParser(prog=argv[0], description="Show the services, queue and recent errors "
                                "of a pyqmail installation.")
    p.add_argument("--home", default=None, help=install.HOME_HELP)
    try:
        args = p.parse_args(argv[1:])
    except SystemExit as e:
        return EXIT_OK if e.code == 0 else EXIT_USAGE
    qmail_home = use_home(args.home)
    if not os.path.isdir(qmail_home):
        r = Report(trouble=True)
        r.add(f"qmail status: no installation at {qmail_home}")
    else:
        r = collect(qmail_home, int(time.time()))
    try:
        durable.write_all(FD_OUT, r.text())
    except OSError:
        return EXIT_TROUBLE
    return r.code()
