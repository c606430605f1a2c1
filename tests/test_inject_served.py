"""qmail-inject and sendmail served by qmail-queued's workers (issue 17.3), against the local path.

In a root-mode home with qmail-queued running, the stubs of qmail-inject
and sendmail pass argv, environment and descriptors 0-2 to a worker
(pyqmail.inject.client, .served). $PYQMAIL_INJECT_LOCAL keeps the program
in the caller's process: the reference every served result is compared with.

Which path ran is seen from outside: the caller runs under
`strace -f -e trace=read,openat`; served, it never reads descriptor 0 and
never opens pyqmail's entry module (the stub's local path imports it).
"""

from __future__ import annotations

import fcntl
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import IS_ROOT, TEST_USER, QHome, Result, make_home, need_root_setup, world_dir
from inject_cases import CASES, FQDN, Case
from queuefmt import RECEIVED, files
from test_qq_handoff import Server, _as, _need_strace, _wait

from pyqmail.inject import header as hdr

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="a root-mode home: qmail-queued's workers as qmailq")

BASE = {"PATH": "/usr/bin:/bin", "QMAILUSER": "joe"}
LOCAL = {"PYQMAIL_INJECT_LOCAL": "1"}
GONE = b"qmail-inject: fatal: qq internal bug (#4.3.0)\n"
ENTRY = re.compile(r'openat\(.*pyqmail/(__pycache__/)?entry[.]')
READ0 = re.compile(r"^\d+\s+read\(0,", re.M)
MSG = b"To: a@b.c\nSubject: served\n\nbody\n"


class Run:
    """One finished program: its result, its pid (the caller's), the seconds it ran within and its trace."""

    def __init__(self, res: Result, pid: int, t0: int, t1: int, trace: str) -> None:
        self.res = res
        self.pid = pid
        self.t0 = t0
        self.t1 = t1
        self.trace = trace

    def path(self) -> str:
        """'served' or 'local', from the trace of the caller."""
        assert self.trace, "not traced"
        local = bool(ENTRY.search(self.trace))
        assert local or not READ0.search(self.trace), self.trace[-3000:]
        return "local" if local else "served"

    def fill(self, expected: bytes, idhost: bytes = FQDN.encode()) -> list[bytes]:
        if b"{" not in expected:
            return [expected]
        return [expected.replace(b"{DATE}", hdr.date_field(t)).replace(b"{MSGID}", hdr.msgid_field(t, self.pid, idhost))
                for t in range(self.t0, self.t1 + 1)]


def go(h: QHome, stdin: bytes | None = b"", args: tuple[str, ...] | list[str] = (),
       env: dict[str, str | None] | None = None, user: str | None = TEST_USER, prog: str = "qmail-inject",
       trace: bool = True, shell: str = "", argv0: str | None = None) -> Run:
    """Run QMAILHOME/bin/prog as user with env added to BASE (None unsets); stdin None: closed.

    shell: redirections for `exec` (e.g. '>&-'). With trace, the caller runs under strace -f
    and its pid is the traced one (strace's child); without, the pid is Popen's.
    """
    full = dict(BASE)
    for k, v in (env or {}).items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    out = world_dir()
    out.chmod(0o777)
    tfile = out / "trace"
    argv = [os.fspath(h.bin(prog)), *args]
    if argv0 is not None:
        argv = ["sh", "-c", f'exec -a {argv0} "$@"', "sh", *argv]
    if stdin is None or shell:
        argv = ["sh", "-c", f'exec "$@" {"0<&- " if stdin is None else ""}{shell}', "sh", *argv]
    if trace:
        argv = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=read,openat", "-o", str(tfile), *argv]
    kw = _as(user) if user is not None else {}
    t0 = int(time.time())
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=full, cwd=out, **kw)  # type: ignore[call-overload]
    try:
        o, e = p.communicate(stdin or b"", timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise
    t1 = int(time.time())
    text = tfile.read_text(errors="replace") if trace else ""
    pid = p.pid
    if trace:
        pid = int(text.split(None, 1)[0])  # the first process traced (sh execs the program)
    shutil.rmtree(out, ignore_errors=True)
    return Run(Result(argv, p.returncode, o, e), pid, t0, t1, text)


def _out(stdout: bytes, pid: int) -> bytes:
    """-n output with the generated Date and Message-ID's time and pid taken out."""
    stdout = re.sub(rb"Date: \d+ \w{3} \d{4} \d\d:\d\d:\d\d -0000\n", b"Date: {DATE}\n", stdout)
    return re.sub(rb"<\d{14}\.%d\.qmail@" % pid, b"<{STAMP}.{PID}.qmail@", stdout)


def _plain(argv: list[bytes] | list[str], stdin: bytes, env: dict[str, str],
           user: str = TEST_USER) -> tuple[int, bytes, bytes]:
    """Run argv as user (no trace); its exit code, -n output (see _out) and stderr."""
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         **_as(user))  # type: ignore[call-overload]
    try:
        o, e = p.communicate(stdin, timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise
    return p.returncode, _out(o, p.pid), e


def check(run: Run, code: int, stdout: bytes | list[bytes], stderr: bytes = b"") -> None:
    res = run.res
    assert (res.returncode, res.stderr) == (code, stderr), res.explain()
    wanted = stdout if isinstance(stdout, list) else [stdout]
    assert res.stdout in wanted, f"{res.explain()}\nwanted: {wanted[0]!r}"


def workers(server: Server) -> list[int]:
    """qmail-queued's workers (children named qmail-queued-w)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == server.proc.pid and comm == "qmail-queued-w":
            out.append(int(d))
    return sorted(out)


def queued(h: QHome) -> list[str]:
    return files(h.queue)["todo"]


def nothing_in_progress(h: QHome) -> bool:
    f = files(h.queue)
    return not f["pid"] and not f["intd"] and len(f["mess"]) == len(f["todo"])


def served_works(h: QHome) -> None:
    """A normal injection is served, and what it says is right."""
    r = go(h, MSG, ("-n",))
    assert r.path() == "served"
    check(r, 0, r.fill(b"Return-Path: <joe@silverton.berkeley.edu>\n{DATE}{MSGID}From: joe@silverton.berkeley.edu\n"
                       + MSG))


@pytest.fixture(scope="module")
def home() -> Iterator[QHome]:
    """A root-mode home for silverton.berkeley.edu."""
    need_root_setup()
    h = make_home(FQDN, single=False)
    yield h
    shutil.rmtree(h.path.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def server(home: QHome) -> Iterator[Server]:
    _need_strace()
    s = Server(home)
    yield s
    s.stop()


@pytest.fixture
def qhome() -> Iterator[QHome]:
    """A root-mode home of its own (its queue is read), with qmail-queued running."""
    need_root_setup()
    _need_strace()
    h = make_home(FQDN, single=False)
    s = Server(h)
    h.server = s  # type: ignore[attr-defined]
    yield h
    s.stop()
    h.server.stop()  # type: ignore[attr-defined]  # a test may have started another
    shutil.rmtree(h.path.parent, ignore_errors=True)


# --- 1. the table of header cases, served, byte for byte ---------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_header_case_served(home: QHome, server: Server, case: Case) -> None:
    r = go(home, case.stdin, ("-n", *case.args), case.env)
    check(r, case.code, r.fill(case.stdout), case.stderr)
    assert r.path() == "served"


@pytest.mark.parametrize("case", CASES[::7], ids=[c.name for c in CASES[::7]])
def test_header_case_local_reference(home: QHome, server: Server, case: Case) -> None:
    r = go(home, case.stdin, ("-n", *case.args), {**case.env, **LOCAL})
    check(r, case.code, r.fill(case.stdout), case.stderr)
    assert r.path() == "local"


# --- 2. queued messages: served and local give the same files --------------------------

def _new(h: QHome, before: set[str]) -> tuple[bytes, bytes]:
    """The one message queued since before: (todo/N, mess/N)."""
    (name,) = set(queued(h)) - before
    num = int(name)
    return (h.queue / "todo" / name).read_bytes(), (h.queue / "mess" / str(num % 23) / name).read_bytes()


def _normal(run: Run, todo: bytes, mess: bytes, uid: int) -> tuple[bytes, bytes]:
    """todo and mess with the caller's pid and the run's times taken out (each checked first)."""
    m = RECEIVED.match(mess)
    assert m and int(m.group(1)) == run.pid and m.group(2) == b"invoked by uid %d" % uid, mess[:200]
    rest = mess[m.end():]
    for t in range(run.t0, run.t1 + 1):
        todo = todo.replace(b"-%d.%d@" % (t, run.pid), b"-{VERP}@")  # QMAILINJECT=m: the caller's pid
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(t)).encode()
        rest = rest.replace(hdr.date_field(t), b"{DATE}\n").replace(b"<%s.%d.qmail@" % (stamp, run.pid), b"<{MSGID}@")
    fields = todo.split(b"\0")
    assert fields[1] == b"p%d" % run.pid, (todo, run.pid)
    assert fields[0].split(b" ")[0] == b"u%d" % uid, todo
    return b"\0".join([fields[0], b"p", *fields[2:]]), rest


def _both(h: QHome, user: str, stdin: bytes, args: tuple[str, ...] = (), env: dict[str, str | None] | None = None,
          prog: str = "qmail-inject", served: str = "served") -> tuple[bytes, bytes]:
    """Queue one message served and one locally; check both exit 0 and agree; return the normalized files."""
    uid = pwd.getpwnam(user).pw_uid
    got = []
    for extra, path in (({}, served), (LOCAL, "local")):
        before = set(queued(h))
        r = go(h, stdin, args, {**(env or {}), **extra}, user=user, prog=prog)
        assert (r.res.returncode, r.res.stdout, r.res.stderr) == (0, b"", b""), r.res.explain()
        assert r.path() == path
        got.append(_normal(r, *_new(h, before), uid))
    assert got[0] == got[1]
    return got[0]


QUEUE_CASES = [
    ("plain", MSG, (), {}),
    ("sender option", MSG, ("-fsender@example.org",), {}),
    ("args and header", b"To: h@example.com\nCc: c@example.com\n\nx\n", ("-a", "x@y.z", "w@v.u"), {}),
    ("header only", b"To: h@example.com\nBcc: b@example.com\n\nx\n", ("-h",), {}),
    ("header and args", b"To: h@example.com\n\nx\n", ("-H", "z@y.x"), {}),
    ("resent", b"To: h@example.com\nResent-To: r@example.com\n\nx\n", (), {}),
    ("QMAILINJECT i r", MSG, (), {"QMAILINJECT": "ir"}),
    ("QMAILINJECT s f c m", b"From: Joe <j@example.com>\nTo: a@b.c\n\nx\n", (), {"QMAILINJECT": "sfcm"}),
    ("names and hosts", MSG, (), {"QMAILNAME": "Joe Q. Public", "QMAILHOST": "h.example.org", "QMAILIDHOST": "id.example"}),
    ("SMTPUTF8MAIL", b"To: a@b.c\nSubject: \xc3\xa9t\xc3\xa9\n\nx\n", (), {"SMTPUTF8MAIL": "1"}),
    ("UTF-8 argument", MSG, ("-a", "j\u00f6rg@example.com"), {"LC_ALL": "C.UTF-8"}),
]


@pytest.mark.parametrize("user", [TEST_USER, "root"])
@pytest.mark.parametrize("stdin,args,env", [c[1:] for c in QUEUE_CASES], ids=[c[0] for c in QUEUE_CASES])
def test_queued_served_as_local(qhome: QHome, user: str, stdin: bytes, args: tuple[str, ...],
                                env: dict[str, str]) -> None:
    todo, mess = _both(qhome, user, stdin, args, env)
    utf8 = "SMTPUTF8MAIL" in env or any(not a.isascii() for a in args)
    assert todo.split(b"\0")[0].endswith(b" SMTPUTF8") == utf8, todo
    assert b"Message-ID: <{MSGID}@" in mess or b"Resent-Message-ID: <{MSGID}@" in mess, mess


@pytest.mark.parametrize("user", [TEST_USER, "root"])
def test_message_id_names_the_callers_pid(qhome: QHome, user: str) -> None:
    """Not traced: the pid in Message-ID, Received and p is the one Popen got, not a worker's."""
    before = set(queued(qhome))
    r = go(qhome, MSG, (), user=user, trace=False)
    assert r.res.returncode == 0, r.res.explain()
    assert r.pid not in workers(qhome.server)  # type: ignore[attr-defined]
    _normal(r, *_new(qhome, before), pwd.getpwnam(user).pw_uid)
    todo, mess = _new(qhome, before)
    assert any(hdr.msgid_field(t, r.pid, FQDN.encode()) in mess for t in range(r.t0, r.t1 + 1)), mess


def test_mft_file_stays_local_and_works(qhome: QHome, tmp_path: Path) -> None:
    """$QMAILMFTFILE is read with the caller's rights: the caller runs qmail-inject itself."""
    mft = world_dir() / "mft"
    mft.write_bytes(b"list@example.com\n")
    mft.chmod(0o644)
    _, mess = _both(qhome, TEST_USER, b"To: list@example.com\n\nx\n", (), {"QMAILMFTFILE": str(mft)},
                    served="local")
    assert b"Mail-Followup-To: list@example.com\n" in mess


# --- 3. sendmail ------------------------------------------------------------------------

SENDMAIL_CASES = [
    ("-t", b"To: t@example.com\nCc: c@example.com\n\nx\n", ("-t",)),
    ("-f", MSG, ("-f", "s@example.org", "a@b.c")),
    ("-F -oi", MSG, ("-F", "Full Name", "-oi", "a@b.c")),
    ("args", b"Subject: s\n\nx\n", ("a@b.c", "d@e.f")),
]


@pytest.mark.parametrize("stdin,args", [c[1:] for c in SENDMAIL_CASES], ids=[c[0] for c in SENDMAIL_CASES])
def test_sendmail_served_as_local(qhome: QHome, stdin: bytes, args: tuple[str, ...]) -> None:
    _both(qhome, TEST_USER, stdin, args, prog="sendmail")


def _link(h: QHome, name: str) -> Path:
    d = world_dir()
    (d / name).symlink_to(h.bin("sendmail"))
    return d / name


def test_sendmail_bp_mailq_bs_run_locally(qhome: QHome) -> None:
    assert go(qhome, MSG).res.returncode == 0  # in todo/: qmail-qread lists it once qmail-send has
    for args, user, stdin in ((("-bp",), "root", b""), ((), "root", b""), (("-bp",), TEST_USER, b""),
                              (("-bs",), TEST_USER, b"HELO x\r\nMAIL FROM:<a@b.c>\r\nQUIT\r\n")):
        prog = "sendmail"
        if not args:
            prog = os.fspath(_link(qhome, "mailq"))
        runs = []
        for extra in ({}, LOCAL):
            r = _go_prog(qhome, prog, stdin, args, extra, user)
            assert r.path() == "local"
            runs.append(r.res)
        assert (runs[0].returncode, runs[0].stdout, runs[0].stderr) == (runs[1].returncode, runs[1].stdout,
                                                                      runs[1].stderr)
        if args == ("-bs",):
            assert runs[0].returncode == 0 and runs[0].stdout.startswith(b"220 "), runs[0].explain()
            assert b"\r\n221 " in runs[0].stdout, runs[0].explain()


def _go_prog(h: QHome, prog: str, stdin: bytes, args: tuple[str, ...], env: dict[str, str | None],
             user: str) -> Run:
    if prog.startswith("/"):
        link = Path(prog)
        saved = h.bin
        try:
            h.bin = lambda name: link  # type: ignore[method-assign]
            return go(h, stdin, args, env, user=user)
        finally:
            h.bin = saved  # type: ignore[method-assign]
    return go(h, stdin, args, env, user=user, prog=prog)


def test_newaliases_and_usage_error_as_local(home: QHome, server: Server) -> None:
    for prog, args in ((os.fspath(_link(home, "newaliases")), ()), ("sendmail", ("-q",)), ("sendmail", ("-b",))):
        a = _go_prog(home, prog, b"", args, {}, TEST_USER)
        b = _go_prog(home, prog, b"", args, LOCAL, TEST_USER)
        assert a.res.returncode in (100, 111) and a.res.stderr, a.res.explain()
        assert (a.res.returncode, a.res.stdout, a.res.stderr) == (b.res.returncode, b.res.stdout, b.res.stderr)
        assert b.path() == "local"


# --- 4. what must run in the caller's process, and still works ---------------------------

def _uid_writer(path: Path, then: str) -> str:
    """A Python script that writes its uid to path and execs then (no fork: the trace stays one process)."""
    return (f"#!/usr/bin/python3 -IS\nimport os, sys\nopen({str(path)!r}, 'w').write(str(os.getuid()))\n"
            f"os.execv({then!r}, [{then!r}] + sys.argv[1:])\n")


def _script(where: Path, text: str) -> None:
    where.write_text(text)
    where.chmod(0o755)


def test_qmailqueue_runs_as_the_caller(qhome: QHome) -> None:
    d = world_dir()
    d.chmod(0o777)
    _script(d / "qq", _uid_writer(d / "uid", os.fspath(qhome.bin("qmail-queue"))))
    before = set(queued(qhome))
    r = go(qhome, MSG, (), {"QMAILQUEUE": str(d / "qq")})
    assert r.res.returncode == 0, r.res.explain()
    assert r.path() == "local"
    assert (d / "uid").read_text() == str(pwd.getpwnam(TEST_USER).pw_uid)
    assert len(set(queued(qhome)) - before) == 1


def test_another_home_runs_locally_with_its_own_queue(qhome: QHome) -> None:
    other = make_home(FQDN, single=False)  # no qmail-queued: its qmail-queue writes its maildrop
    try:
        before = set(queued(qhome))
        r = go(qhome, MSG, (), {"QMAILHOME": str(other.path)})
        assert r.res.returncode == 0, r.res.explain()
        assert r.path() == "local"
        assert set(queued(qhome)) == before
        assert len(os.listdir(other.path / "maildrop")) == 1
    finally:
        shutil.rmtree(other.path.parent, ignore_errors=True)


def _wrap(qhome: QHome, name: str) -> Path:
    """Replace bin/name by an administrator's wrapper that writes its uid, then runs the original; return
    the directory it writes `uid` into."""
    q = qhome.bin(name)
    q.rename(q.with_name(name + ".orig"))
    d = world_dir()
    d.chmod(0o777)
    _script(q, _uid_writer(d / "uid", os.fspath(q.with_name(name + ".orig"))))
    return d


def test_administrators_qmail_queue_wrapper_runs_as_the_caller(qhome: QHome) -> None:
    d = _wrap(qhome, "qmail-queue")
    for prog in ("qmail-inject", "sendmail"):
        (d / "uid").unlink(missing_ok=True)
        before = set(queued(qhome))
        r = go(qhome, MSG, ("a@b.c",) if prog == "sendmail" else (), prog=prog)
        assert r.res.returncode == 0, r.res.explain()
        assert r.path() == "local"
        assert (d / "uid").read_text() == str(pwd.getpwnam(TEST_USER).pw_uid)
        assert len(set(queued(qhome)) - before) == 1


def test_administrators_qmail_inject_wrapper_runs_for_sendmail(qhome: QHome) -> None:
    d = _wrap(qhome, "qmail-inject")
    before = set(queued(qhome))
    r = go(qhome, MSG, ("a@b.c",), prog="sendmail")
    assert r.res.returncode == 0, r.res.explain()
    assert r.path() == "local"
    assert (d / "uid").read_text() == str(pwd.getpwnam(TEST_USER).pw_uid)
    assert len(set(queued(qhome)) - before) == 1


def test_qmail_queued_down_drops(qhome: QHome) -> None:
    qhome.server.stop()  # type: ignore[attr-defined]
    r = go(qhome, MSG)
    assert r.res.returncode == 0, r.res.explain()
    assert r.path() == "local"
    assert len(os.listdir(qhome.path / "maildrop")) == 1 and queued(qhome) == []


BIG = b"To: a@b.c\n\n" + b"x" * 70000 + b"\n" + b"line\n" * 100000  # more than a socket buffer of output


@pytest.mark.parametrize("shell,stdin,args", [
    ("", None, ("-n",)), ("", None, ("a@b.c",)), (">&-", BIG, ("-n",)), (">&-", MSG, ()),
    ("2>&-", [c for c in CASES if c.code == 100][0].stdin, ("-n",)), ("2>&-", MSG, ("-n",)), ("0<&- 2>&-", None, ()),
], ids=["stdin -n", "stdin queue", "stdout big -n", "stdout queue", "stderr bad", "stderr -n", "stdin stderr"])
def test_closed_descriptors_as_local(qhome: QHome, shell: str, stdin: bytes | None, args: tuple[str, ...]) -> None:
    """A closed 0, 1 or 2 gives what the caller's own process gives (the socket must not take its place)."""
    got = []
    for extra in ({}, LOCAL):
        before = set(queued(qhome))
        r = go(qhome, stdin, args, extra, shell=shell)
        out = _out(r.res.stdout, r.pid)
        got.append((r.res.returncode, out, r.res.stderr, len(set(queued(qhome)) - before)))
    assert got[0] == got[1]


# --- 5. hostile callers, failures ------------------------------------------------------

def _pipe_holder(server: Server, ino: int) -> int:
    """The worker that holds the pipe whose inode is ino (0: none)."""
    for w in workers(server):
        try:
            for fd in os.listdir(f"/proc/{w}/fd"):
                if os.readlink(f"/proc/{w}/fd/{fd}") == f"pipe:[{ino}]":
                    return w
        except OSError:
            continue
    return 0


def _unread(f: object) -> int:
    buf = bytearray(4)
    fcntl.ioctl(f.fileno(), termios.FIONREAD, buf)  # type: ignore[attr-defined]
    return int.from_bytes(buf, "little")


def _start_reading(h: QHome, server: Server) -> tuple[subprocess.Popen[bytes], int]:
    """A served qmail-inject as pqtest reading a pipe that stays open; return it and the worker reading."""
    p = subprocess.Popen([h.bin("qmail-inject"), "x@y.z"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=BASE, cwd="/", **_as(TEST_USER))  # type: ignore[call-overload]
    assert p.stdin is not None
    p.stdin.write(b"To: a@b.c\nSubject: cut\n\n" + b"line\n" * 100)
    p.stdin.flush()
    ino = os.fstat(p.stdin.fileno()).st_ino
    _wait(lambda: _unread(p.stdin) == 0 and _pipe_holder(server, ino), 20, "a worker to read the message")
    return p, _pipe_holder(server, ino)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_client_killed_while_reading_queues_nothing(qhome: QHome, sig: int) -> None:
    server: Server = qhome.server  # type: ignore[attr-defined]
    for _ in range(4):
        p, worker = _start_reading(qhome, server)
        p.send_signal(sig)
        assert p.wait(timeout=20) == -sig
        # The pipe stays open (this end is held): the worker must see its caller gone, not an end of input.
        _wait(lambda: _pipe_holder(server, os.fstat(p.stdin.fileno()).st_ino) == 0, 20,  # type: ignore[union-attr]
              "the worker to let the caller's pipe go")
        _wait(lambda: nothing_in_progress(qhome), 20, "the worker to give the message up")
        served_works(qhome)
        for f in (p.stdin, p.stdout, p.stderr):
            f.close()  # type: ignore[union-attr]
    assert queued(qhome) == [] and server.proc.poll() is None
    assert len(workers(server)) <= 2, workers(server)


def test_worker_killed_after_ack_is_a_temporary_failure(qhome: QHome) -> None:
    server: Server = qhome.server  # type: ignore[attr-defined]
    p, worker = _start_reading(qhome, server)
    os.kill(worker, signal.SIGKILL)
    out, err = p.communicate(timeout=20)
    assert (p.returncode, out, err) == (111, b"", GONE)
    _wait(lambda: nothing_in_progress(qhome), 20, "nothing left in progress")
    assert queued(qhome) == []
    served_works(qhome)


def _payload(name: bytes = b"qmail-inject", argc: bytes = b"2", args: tuple[bytes, ...] = (b"qmail-inject", b"-n"),
             env: bytes = b"PATH=/bin\0") -> bytes:
    return b"\0".join([name, argc, *args, b""]) + env


HOSTILE = {
    "huge length": (3, b"I\xff\xff\xff\xff", False),
    "length past the limit": (3, b"I" + (1 << 24 | 1).to_bytes(4, "big") + b"x" * 1000, True),
    "truncated payload": (3, b"I" + (5000).to_bytes(4, "big") + _payload(), True),
    "truncated length": (3, b"I\0\0", True),
    "garbage": (3, b"I" + (64).to_bytes(4, "big") + bytes(range(192, 256)), True),
    "argc 0": (3, b"I" + len(_payload(argc=b"0")).to_bytes(4, "big") + _payload(argc=b"0"), True),
    "argc huge": (3, b"I" + len(_payload(argc=b"99999999")).to_bytes(4, "big") + _payload(argc=b"99999999"), True),
    "argc negative": (3, b"I" + len(_payload(argc=b"-1")).to_bytes(4, "big") + _payload(argc=b"-1"), True),
    "argc not a number": (3, b"I" + len(_payload(argc=b"two")).to_bytes(4, "big") + _payload(argc=b"two"), True),
    "no NUL at the end": (3, b"I" + len(_payload(env=b"PATH=/bin")).to_bytes(4, "big") + _payload(env=b"PATH=/bin"),
                          True),
    "not served": (3, b"I" + len(_payload(b"qmail-queue")).to_bytes(4, "big") + _payload(b"qmail-queue"), True),
    "name not ASCII": (3, b"I" + len(_payload(b"\xffinject")).to_bytes(4, "big") + _payload(b"\xffinject"), True),
    "no descriptors": (0, b"I" + len(_payload()).to_bytes(4, "big") + _payload(), True),
    "five descriptors": (5, b"I" + len(_payload()).to_bytes(4, "big") + _payload(), True),
    "two descriptors": (2, b"I" + len(_payload()).to_bytes(4, "big") + _payload(), True),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_request(qhome: QHome, name: str) -> None:
    server: Server = qhome.server  # type: ignore[attr-defined]
    nfds, data, shut = HOSTILE[name]
    null = os.open("/dev/null", os.O_RDWR)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(str(server.sock))
        socket.send_fds(s, [data], [null] * nfds)
        if shut:
            s.shutdown(socket.SHUT_WR)
        try:
            answer = s.recv(16)
        except ConnectionResetError:
            answer = b""  # closed with our bytes unread
        s.close()
    finally:
        os.close(null)
    assert answer[:1] != b"+", answer  # never acknowledged: nothing of the descriptors was read
    assert server.proc.poll() is None
    served_works(qhome)
    assert queued(qhome) == [] and nothing_in_progress(qhome)


def test_several_mib_served_in_bounded_memory(qhome: QHome) -> None:
    server: Server = qhome.server  # type: ignore[attr-defined]
    body = b"".join(b"%07d " % i + b"y" * 72 + b"\n" for i in range(80000))  # 6.4 MB
    before = set(queued(qhome))
    r = go(qhome, b"To: a@b.c\nSubject: big\n\n" + body)
    assert r.res.returncode == 0 and r.path() == "served", r.res.explain()
    _, mess = _new(qhome, before)
    assert mess.endswith(b"\nSubject: big\n\n" + body)
    for w in workers(server):
        hwm = [line for line in Path(f"/proc/{w}/status").read_text().splitlines() if line.startswith("VmHWM:")]
        assert int(hwm[0].split()[1]) < 60 * 1024, hwm


def test_unparsable_header_as_local(home: QHome, server: Server) -> None:
    (case,) = [c for c in CASES if c.code == 100][:1]
    a = go(home, case.stdin, (), case.env)
    b = go(home, case.stdin, (), {**case.env, **LOCAL})
    assert a.path() == "served" and b.path() == "local"
    assert a.res.returncode == 100 and a.res.stderr.startswith(b"qmail-inject: fatal: ")
    assert (a.res.returncode, a.res.stdout, a.res.stderr) == (b.res.returncode, b.res.stdout, b.res.stderr)


# --- 6. one request's environment is not the next one's ---------------------------------

ODD = {"QMAILUSER": "evil", "QMAILHOST": "evil.example", "QMAILNAME": "Evil", "LC_CTYPE": "C.UTF-8",
       "QMAILIDHOST": "evil-id.example", "QMAILINJECT": "f", "MAILNAME": "Mal", "EQ": "a=b=c", "LONG": "z" * 100000,
       "SMTPUTF8MAIL": "1"}


def test_environment_does_not_leak_to_the_next_request(qhome: QHome) -> None:
    server: Server = qhome.server  # type: ignore[attr-defined]
    clean = go(qhome, MSG, ("-n",))
    odd = go(qhome, MSG, ("-n",), ODD)
    after = go(qhome, MSG, ("-n",))
    assert {clean.path(), odd.path(), after.path()} == {"served"}
    assert len(workers(server)) == 1  # one worker served all three
    assert b"evil" in odd.res.stdout and b"Evil" in odd.res.stdout
    expected = (b"Return-Path: <joe@silverton.berkeley.edu>\n{DATE}{MSGID}From: joe@silverton.berkeley.edu\n" + MSG)
    check(clean, 0, clean.fill(expected))
    check(after, 0, after.fill(expected))
    # Queued: qmail-queued's own environment commits the clean message (no SMTPUTF8 from the odd one).
    before = set(queued(qhome))
    assert go(qhome, MSG, (), ODD).res.returncode == 0
    todo1, _ = _new(qhome, before)
    before = set(queued(qhome))
    r = go(qhome, MSG)
    assert r.res.returncode == 0 and r.path() == "served"
    todo2, mess2 = _normal(r, *_new(qhome, before), pwd.getpwnam(TEST_USER).pw_uid)
    assert todo1.split(b"\0")[0].endswith(b" SMTPUTF8") and todo2.split(b"\0")[0] == b"u%d" % pwd.getpwnam(
        TEST_USER).pw_uid
    assert b"evil" not in mess2 and b"Evil" not in mess2


def test_control_files_read_per_request(qhome: QHome) -> None:
    """A worker reads the control files for each request: a change is seen at once, as by a new process."""
    server: Server = qhome.server  # type: ignore[attr-defined]
    first = go(qhome, b"To: x\n\nb\n", ("-n",))
    assert b"To: x@silverton.berkeley.edu\n" in first.res.stdout
    for name, text in (("me", "me.example\n"), ("defaulthost", "dh.example\n"), ("idhost", "id.example\n"),
                       ("defaultdomain", "dd.example\n"), ("plusdomain", "pd.example\n")):
        qhome.control(name, text)
        runs = [go(qhome, b"To: x, w@nodots, p@q+\n\nb\n", ("-n",), extra) for extra in ({}, LOCAL)]
        assert [r.path() for r in runs] == ["served", "local"]
        outs = [_out(r.res.stdout, r.pid) for r in runs]
        assert runs[0].res.returncode == 0 and outs[0] == outs[1], (name, outs)
        assert text.strip().encode() in outs[0], (name, outs[0])
    assert len(workers(server)) == 1  # the same worker saw every change


def test_argument_bytes_not_utf8_as_local(qhome: QHome) -> None:
    """Arguments that are not UTF-8 reach the envelope as the bytes the caller gave (surrogateescape both ways)."""
    todo, _ = _both(qhome, TEST_USER, MSG, ("-f\udcfe@example.org", "-a", "j\udcffrg@example.com", "\u00e9@x.y"))
    assert b"F\xfe@example.org\0" in todo and b"Tj\xffrg@example.com\0" in todo and b"T\xc3\xa9@x.y\0" in todo, todo


def test_stdout_pipe_without_reader_as_local(home: QHome, server: Server) -> None:
    got = []
    for extra in ({}, LOCAL):
        rfd, wfd = os.pipe()
        os.close(rfd)
        try:
            p = subprocess.run([home.bin("qmail-inject"), "-n"], input=BIG, stdout=wfd, stderr=subprocess.PIPE,
                               env={**BASE, **extra}, timeout=30, **_as(TEST_USER))  # type: ignore[call-overload]
        finally:
            os.close(wfd)
        got.append((p.returncode, p.stderr))
    assert got[0] == got[1] == (0, b"")


def test_environment_with_duplicate_and_bare_entries_as_local(home: QHome, server: Server) -> None:
    """execve's environment as it is: two entries of one name (the first wins, as in Python's start), one without '='."""
    prog = os.fsencode(home.bin("qmail-inject"))
    got = []
    for extra in (b"", b"PYQMAIL_INJECT_LOCAL=1"):
        envp = [b"PATH=/usr/bin:/bin", b"QMAILUSER=first", b"QMAILUSER=second", b"BARE", b"=empty",
                b"QMAILHOST=h.example", b"QMAILHOST=i.example"] + ([extra] if extra else [])
        code = ("import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); a = [s.encode('latin-1') for s in sys.argv[1:]]; "
                "argv = (ctypes.c_char_p * 3)(a[0], b'-n', None); envp = (ctypes.c_char_p * (len(a)))(*a[1:], None); "
                "libc.execve(a[0], argv, envp); sys.exit(99)")
        got.append(_plain(["/usr/bin/python3", "-IS", "-c", code, prog.decode("latin-1"),
                           *[e.decode("latin-1") for e in envp]], MSG, {}))
    assert got[0] == got[1]
    assert got[0][0] == 0 and b"From: first@h.example\n" in got[0][1], got[0]


class LimitedServer(Server):
    """qmail-queued with options (Server runs it without)."""

    def __init__(self, home: QHome, *opts: str) -> None:
        self.sock = home.path / "run" / "qmail-queue.sock"
        self.proc = subprocess.Popen([home.bin("qmail-queued"), *opts], env={"PATH": "/usr/bin:/bin"},
                                     stderr=subprocess.PIPE, start_new_session=True)
        _wait(lambda: self.sock.exists() or self.proc.poll() is not None, 10, "qmail-queued's socket")
        assert self.proc.poll() is None


def test_callers_holding_input_open_are_bounded_by_c(qhome: QHome) -> None:
    """Served requests count against -c: past it, the caller runs qmail-inject itself, and every message is queued."""
    qhome.server.stop()  # type: ignore[attr-defined]
    server = LimitedServer(qhome, "-c", "2")
    qhome.server = server  # type: ignore[attr-defined]
    procs = []
    held = []
    try:
        for i in range(4):
            p = subprocess.Popen([qhome.bin("qmail-inject"), f"r{i}@example.com"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=BASE, cwd="/",
                                 **_as(TEST_USER))  # type: ignore[call-overload]
            procs.append(p)
            assert p.stdin is not None
            p.stdin.write(b"Subject: held\n")
            p.stdin.flush()
            _wait(lambda: _unread(p.stdin) == 0, 20, "qmail-inject to read")
            held.append(_pipe_holder(server, os.fstat(p.stdin.fileno()).st_ino))
        assert [bool(w) for w in held] == [True, True, False, False], held
        assert len(workers(server)) == 2
        for p in procs:
            out, err = p.communicate(b"\nbody\n", timeout=30)
            assert (p.returncode, out, err) == (0, b"", b"")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    _wait(lambda: len(queued(qhome)) == 4, 20, "four messages in todo/")


@pytest.mark.parametrize("owner,group,mode", [("root", "qmail", 0o640), (TEST_USER, "root", 0o600), ("root", "root", 0o604)],
                         ids=["qmail group only", "caller's own", "others only"])
def test_control_file_not_readable_by_all_as_local(qhome: QHome, owner: str, group: str, mode: int) -> None:
    """qmail-inject reads control files with the caller's rights: one that not everyone may read runs in the caller."""
    import grp

    c = qhome.path / "control" / "defaulthost"
    c.write_text("private.example\n")
    os.chown(c, pwd.getpwnam(owner).pw_uid, grp.getgrnam(group).gr_gid)
    c.chmod(mode)
    runs = [go(qhome, b"To: x\n\nb\n", ("-n",), extra) for extra in ({}, LOCAL)]
    assert [r.path() for r in runs] == ["local", "local"]
    assert [(r.res.returncode, _out(r.res.stdout, r.pid), r.res.stderr) for r in runs][0] == \
        [(r.res.returncode, _out(r.res.stdout, r.pid), r.res.stderr) for r in runs][1]


def test_stopped_caller_reads_nothing(qhome: QHome) -> None:
    """A stopped caller (^Z, SIGSTOP) reads nothing, as a stopped qmail-inject would; once continued, it reads on."""
    server: Server = qhome.server  # type: ignore[attr-defined]
    p, worker = _start_reading(qhome, server)
    try:
        p.send_signal(signal.SIGSTOP)
        _wait(lambda: Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T", 10, "stopped")
        assert p.stdin is not None
        p.stdin.write(b"more\n")
        p.stdin.flush()
        # What a stopped qmail-inject would leave: the line unread. Bounded wait for a worker reading it.
        deadline = time.monotonic() + 1
        while _unread(p.stdin) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _unread(p.stdin) == 5
        p.send_signal(signal.SIGCONT)
        _wait(lambda: _unread(p.stdin) == 0, 20, "the worker to read on once its caller runs again")  # type: ignore[arg-type]
        o, e = p.communicate(timeout=30)  # closes the pipe: the end of the message
        assert p.returncode == 0, e
        assert b"line\nmore\n" in b"".join(f.read_bytes() for f in (qhome.queue / "mess").rglob("*") if f.is_file())
    finally:
        if p.returncode is None:
            p.kill()
            p.communicate(timeout=20)


def test_killed_caller_blocked_writing_frees_the_worker(qhome: QHome) -> None:
    """-n output blocked on a full pipe that another process holds unread: killing the caller frees the worker
    (SIGIO on the caller's hang-up interrupts the write), as the user's own qmail-inject would die with it."""
    server: Server = qhome.server  # type: ignore[attr-defined]
    r, w = os.pipe()
    ino = os.fstat(r).st_ino
    msg = b"Subject: big\n\n" + (b"x" * 75 + b"\n") * 14000  # 1 MB: far more than the pipe holds
    src = world_dir() / "big"
    src.write_bytes(msg)  # a file: the worker reads all of it, then blocks writing the output
    p = None
    try:
        with open(src, "rb") as f:
            p = subprocess.Popen([qhome.bin("qmail-inject"), "-n", "x@y.z"], stdin=f, stdout=w,
                                 stderr=subprocess.PIPE, env=BASE, cwd="/", **_as(TEST_USER))  # type: ignore[call-overload]
        os.close(w)
        w = -1
        reader = os.fdopen(os.dup(r), "rb", buffering=0)
        _wait(lambda: _pipe_holder(server, ino) and _unread(reader) >= 65536, 20,  # type: ignore[arg-type]
              "a worker writing into the full pipe")
        p.kill()
        assert p.wait(timeout=20) == -signal.SIGKILL
        reader.close()
        _wait(lambda: _pipe_holder(server, ino) == 0, 10, "the worker to let the caller's pipe go")
        _wait(lambda: nothing_in_progress(qhome), 20, "nothing left half-queued")
        served_works(qhome)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        if p is not None and p.stderr is not None:
            p.stderr.close()


def test_terminal_input_runs_locally(qhome: QHome) -> None:
    """A terminal on descriptor 0 stays with the caller: job control (^Z, bg and SIGTTIN) acts on the reader."""
    master, slave = os.openpty()
    out = world_dir()
    out.chmod(0o777)
    tfile = out / "trace"
    argv = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=read,openat", "-o", str(tfile),
            os.fspath(qhome.bin("qmail-inject")), "-n", "x@y.z"]
    p = subprocess.Popen(argv, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=BASE,
                         **_as(TEST_USER))  # type: ignore[call-overload]
    os.close(slave)
    try:
        os.write(master, b"Subject: tty\n\nbody\n\x04")
        o, e = p.communicate(timeout=30)
    finally:
        os.close(master)
    assert p.returncode == 0, e
    assert b"Subject: tty\n" in o
    run = Run(Result(argv, p.returncode, o, e), p.pid, 0, 0, tfile.read_text(errors="replace"))
    assert run.path() == "local"
    shutil.rmtree(out, ignore_errors=True)


def test_sendmail_sender_does_not_leak_to_the_next_request(qhome: QHome) -> None:
    """sendmail -f changes QMAILUSER/QMAILHOST and removes QMAILNAME in the worker: the next request has its own."""
    server: Server = qhome.server  # type: ignore[attr-defined]
    uid = pwd.getpwnam(TEST_USER).pw_uid
    before = set(queued(qhome))
    r = go(qhome, MSG, ("-F", "Eve", "-f", "eve@evil.example", "a@b.c"), prog="sendmail")
    assert r.res.returncode == 0 and r.path() == "served", r.res.explain()
    _, mess1 = _normal(r, *_new(qhome, before), uid)
    assert b"From: eve@evil.example\n" in mess1
    before = set(queued(qhome))
    r = go(qhome, MSG, ("-F", "Joe Q", "a@b.c"), {"QMAILNAME": None}, prog="sendmail")
    assert r.res.returncode == 0 and r.path() == "served", r.res.explain()
    todo2, mess2 = _normal(r, *_new(qhome, before), uid)
    assert b'From: "Joe Q" <joe@silverton.berkeley.edu>\n' in mess2 and b"evil" not in todo2 + mess2, mess2
    assert len(workers(server)) == 1
