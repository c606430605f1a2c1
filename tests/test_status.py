"""`qmail status`: real supervise processes on a hand-made service tree, a queued message, stamped logs."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import VENV_BIN, QHome, Result, expect, make_home, run
from pyqmail import home as _home
from pyqmail.admin import status
from pyqmail.svc import status as svstatus
from pyqmail.svc import tai64

FAST = "0.05"  # our supervise's pause after a start
RUN_SLEEP = "#!/bin/sh\nexec sleep 1000\n"
HOUR = 3600
SECONDS = r"\d+ seconds"


@pytest.fixture
def home() -> Iterator[QHome]:
    h = make_home()
    yield h
    shutil.rmtree(h.path.parent, ignore_errors=True)


@pytest.fixture
def in_home(home: QHome, monkeypatch: pytest.MonkeyPatch) -> Iterator[QHome]:
    """The home, made this process's QMAILHOME for calls of status.collect()."""
    monkeypatch.setenv("QMAILHOME", str(home.path))
    _home.reset()
    yield home
    _home.reset()


def until(pred: Callable[[], object], what: str, timeout: float = 20) -> None:
    """Poll pred until true; fail naming what."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for: {what}")
        time.sleep(0.02)


def env() -> dict[str, str]:
    e = {"PATH": "/usr/bin:/bin"}
    if "TZ" in os.environ:  # error lines are shown in local time: the same zone as this test's
        e["TZ"] = os.environ["TZ"]
    return e


def qmail_status(home: QHome, code: int) -> list[str]:
    res = expect(run([VENV_BIN / "qmail", "status", "--home", str(home.path)], env=env()), code)
    assert res.stderr == b"", res.explain()
    return res.stdout.decode("latin-1").splitlines()


def write_run(d: Path, script: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "run").write_text(script)
    (d / "run").chmod(0o755)


class Supervised:
    """supervise processes a test started; stop() ends them with svc -dx, always called at teardown."""

    def __init__(self, home: QHome) -> None:
        self.home = home
        self.procs: list[tuple[Path, subprocess.Popen[bytes]]] = []

    def start(self, service: Path) -> None:
        p = subprocess.Popen([os.fspath(self.home.bin("supervise")), os.fspath(service)],
                             env={"PATH": f"{self.home.path / 'bin'}:/usr/bin:/bin",
                                  "PYQMAIL_SUPERVISE_PAUSE": FAST},
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True)
        self.procs.append((service, p))
        until(lambda: self.up(service) or p.poll() is not None, f"{service} up")
        assert p.poll() is None, p.stderr.read() if p.stderr else b""

    @staticmethod
    def up(service: Path) -> bool:
        try:
            return svstatus.read(os.fspath(service)).pid != 0
        except svstatus.StatusError:
            return False

    def svc(self, opts: str, service: Path) -> Result:
        return expect(run([self.home.bin("svc"), opts, service]))

    def stop(self) -> None:
        for service, p in self.procs:
            if p.poll() is None:
                run([self.home.bin("svc"), "-dx", service])
        for _service, p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=20)
            if p.stderr:
                p.stderr.close()
        self.procs.clear()


@pytest.fixture
def sup(home: QHome) -> Iterator[Supervised]:
    s = Supervised(home)
    try:
        yield s
    finally:
        s.stop()


def stamp(unix: int, nano: int = 0) -> bytes:
    return tai64.label(unix * 1_000_000_000 + nano)


def local(unix: int, nano: int = 0) -> str:
    text = tai64.local(unix, nano)
    assert text is not None
    return text.decode()


def write_log(home: QHome, name: str, lines: list[tuple[int, bytes]], file: str = "current") -> None:
    d = home.path / "log" / name
    d.mkdir(parents=True, exist_ok=True)
    with open(d / file, "ab") as f:
        for unix, text in lines:
            f.write(stamp(unix) + b" " + text + b"\n")


# qmail-send's activity record (qmail-log(5) texts), oldest first.
SEND_LINES = [
    b"status: local 0/10 remote 0/20",
    b"new msg 12345",
    b"info msg 12345: bytes 310 from <a@b.example> qp 4711 uid 0",
    b"starting delivery 1: msg 12345 to remote unable@far.example",
    b"status: local 0/10 remote 1/20",
    b"delivery 1: deferral: Sorry,_I_wasn't_able_to_establish_an_SMTP_connection._(#4.4.1)/",
    b"status: local 0/10 remote 0/20",
    b"starting delivery 2: msg 12345 to local nobody@test.example.com",
    b"status: local 1/10 remote 0/20",
    b"delivery 2: failure: Sorry,_no_mailbox_here_by_that_name._(#5.1.1)/",
    b"alert: unable to reread control/locals",
    b"warning: trouble injecting bounce message, will try later",
    b"delivery 3: success: 1.2.3.4_accepted_message./Remote_host_said:_250_ok_unable_to_fail/",
    b"status: local 2/10 remote 3/20",
    b"end msg 12345",
]
SEND_ERRORS = [SEND_LINES[i] for i in (5, 9, 10, 11)]


def layout(home: QHome, now: int) -> dict[str, Path]:
    """Make the tree `qmail up` makes: service/send and service/smtpd, each with log/, and their logs."""
    svc = home.path / "service"
    bindir = home.path / "bin"
    write_run(svc / "send", RUN_SLEEP)
    write_run(svc / "send" / "log", RUN_SLEEP)
    write_run(svc / "smtpd", "#!/bin/sh\nexec 2>&1\n"
              f"exec {bindir}/tcpserver -v -R -c 40 \\\n  127.0.0.1 0 {bindir}/qmail-smtpd\n")
    write_run(svc / "smtpd" / "log", RUN_SLEEP)
    (home.path / "run").mkdir(exist_ok=True)
    base = now - HOUR
    write_log(home, "send", [(base + i, line) for i, line in enumerate(SEND_LINES)])
    write_log(home, "smtpd", [(base, b"tcpserver: status: 0/40"), (base + 1, b"tcpserver: status: 1/40"),
                              (base + 2, b"tcpserver: pid 99 from 127.0.0.1"),
                              (base + 3, b"tcpserver: ok 99 localhost:127.0.0.1:25 trouble.example:127.0.0.1::40000"),
                              (base + 4, b"tcpserver: end 99 status 0"),
                              (base + 5, b"tcpserver: status: 0/40")])
    return {"send": svc / "send", "send/log": svc / "send" / "log",
            "smtpd": svc / "smtpd", "smtpd/log": svc / "smtpd" / "log"}


def inject(home: QHome) -> int:
    """Queue one message with qmail-inject (no qmail-send runs); return its number."""
    expect(run([home.bin("qmail-inject"), "-f", "a@b.example", "joe@far.example"],
               input=b"Subject: status\n\nhello\n", env={"PATH": "/usr/bin:/bin", "USER": "root"}))
    (name,) = os.listdir(home.queue / "todo")
    return int(name)


def expected_errors(now: int) -> list[str]:
    base = now - HOUR
    return [f"error send: {local(base + SEND_LINES.index(x))} {x.decode()}" for x in SEND_ERRORS]


def test_services_up_down_and_stopped(home: QHome, sup: Supervised) -> None:
    now = int(time.time())
    dirs = layout(home, now)
    num = inject(home)
    for name in ("send", "send/log", "smtpd", "smtpd/log"):
        sup.start(dirs[name])

    lines = qmail_status(home, 0)
    head = [
        "qmail up: not running",
        "svscan: not running",
        rf"service send: up \(pid \d+\) {SECONDS}",
        rf"service send/log: up \(pid \d+\) {SECONDS}",
        rf"service smtpd: up \(pid \d+\) {SECONDS}",
        rf"service smtpd/log: up \(pid \d+\) {SECONDS}",
        "listening smtpd: 127.0.0.1:0",
        "messages in queue: 1",
        "messages in queue but not yet preprocessed: 1",
        rf"oldest message: #{num}, \d+ seconds old",
        "concurrency send: local 2/10 remote 3/20",
        "concurrency smtpd: 0/40",
    ]
    assert len(lines) == len(head) + len(SEND_ERRORS), lines
    for pattern, line in zip(head, lines):
        assert re.fullmatch(pattern, line), (pattern, line)
    assert lines[len(head):] == expected_errors(now)

    # One service down (svc -d): reported with svstat's words, exit 1.
    sup.svc("-d", dirs["smtpd"])
    until(lambda: not sup.up(dirs["smtpd"]), "smtpd down")
    lines = qmail_status(home, 1)
    assert re.fullmatch(rf"service smtpd: down {SECONDS}, normally up", lines[4]), lines
    assert re.fullmatch(rf"service send: up \(pid \d+\) {SECONDS}", lines[2]), lines

    # Everything stopped: nothing runs, yet the queue and the errors are shown.
    sup.stop()
    lines = qmail_status(home, 1)
    assert lines[:7] == [
        "qmail up: not running",
        "svscan: not running",
        f"nothing runs: start it with: qmail up --home {home.path}",
        "service send: supervise not running",
        "service send/log: supervise not running",
        "service smtpd: supervise not running",
        "service smtpd/log: supervise not running",
    ]
    assert lines[8:10] == ["messages in queue: 1", "messages in queue but not yet preprocessed: 1"]
    assert lines[-len(SEND_ERRORS):] == expected_errors(now)


def test_pid_files(home: QHome, sup: Supervised) -> None:
    """up.pid and svscan.pid: a live pid runs, a dead one is stale (exit 1), garbage holds no pid."""
    now = int(time.time())
    dirs = layout(home, now)
    shutil.rmtree(dirs["smtpd"])
    sup.start(dirs["send"])
    sup.start(dirs["send/log"])
    (home.path / "run" / "up.pid").write_text(f"{os.getpid()}\n")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (home.path / "run" / "svscan.pid").write_text(f"{dead.pid}\n")
    lines = qmail_status(home, 1)
    assert lines[:2] == [f"qmail up: running (pid {os.getpid()})",
                         f"svscan: not running (stale pid {dead.pid} in run/svscan.pid)"]
    (home.path / "run" / "svscan.pid").write_text(f"{os.getpid()}\n")
    lines = qmail_status(home, 0)
    assert lines[1] == f"svscan: running (pid {os.getpid()})"
    # smtpd's log directory remains: its errors are still read, with no concurrency line.
    assert "concurrency smtpd: 0/40" not in lines
    (home.path / "run" / "svscan.pid").write_bytes(b"x" * 10000)
    assert qmail_status(home, 1)[1] == "svscan: not running (run/svscan.pid holds no pid)"


def test_collect_exact_at_fixed_time(in_home: QHome) -> None:
    """With time fixed, every line is exact: the oldest message's age and the error lines."""
    home = in_home
    now = 2_000_000_000
    dirs = layout(home, now)
    (dirs["smtpd"] / "down").write_text("")
    num = inject(home)
    os.utime(home.queue / "todo" / str(num), (now - 300, now - 300))
    r = status.collect(str(home.path), now)
    assert r.code() == status.EXIT_DOWN
    assert r.text().decode().splitlines() == [
        "qmail up: not running",
        "svscan: not running",
        f"nothing runs: start it with: qmail up --home {home.path}",
        "service send: supervise not running",
        "service send/log: supervise not running",
        "service smtpd: supervise not running",
        "service smtpd/log: supervise not running",
        "listening smtpd: 127.0.0.1:0",
        "messages in queue: 1",
        "messages in queue but not yet preprocessed: 1",
        f"oldest message: #{num}, 300 seconds old",
        "concurrency send: local 2/10 remote 3/20",
        "concurrency smtpd: 0/40",
        *expected_errors(now),
    ]


def test_errors_last_ten_rotated_and_other_logs(in_home: QHome) -> None:
    """Ten error lines per log at most, the newest rotated file read before current, hostile bytes masked."""
    home = in_home
    now = 2_000_000_000
    (home.path / "service").mkdir()
    write_log(home, "send", [(now - 900, b"delivery 1: deferral: too_old_rotated_away")], "@400000005f000000000000.s")
    write_log(home, "send", [(now - 800 + i, b"delivery %d: deferral: in_rotated" % i) for i in range(3)],
              "@400000006f000000000000.s")
    write_log(home, "send", [(now - 100 + i, b"delivery %d: deferral: d%d" % (10 + i, i)) for i in range(8)]
              + [(now - 10, b"delivery 20: success: ok/")])
    write_log(home, "pop3d", [(now - 5, b"unable to \x1b[2Jwipe \x9b the screen\x00")])
    with open(home.path / "log" / "pop3d" / "current", "ab") as f:
        f.write(b"no stamp here: trouble\n")
    lines = status.collect(str(home.path), now).text().decode("latin-1").splitlines()
    errs = [x for x in lines if x.startswith("error ")]
    assert errs == [
        f"error send: {local(now - 799)} delivery 1: deferral: in_rotated",
        f"error send: {local(now - 798)} delivery 2: deferral: in_rotated",
        *[f"error send: {local(now - 100 + i)} delivery {10 + i}: deferral: d{i}" for i in range(8)],
        f"error pop3d: {local(now - 5)} unable to ?[2Jwipe ? the screen?",
        "error pop3d: no stamp here: trouble",
    ]
    assert "concurrency send: not logged yet" in lines
    assert f"services: none ({home.path}/service does not exist)" not in lines


@pytest.mark.parametrize(("script", "where"), [
    ("#!/bin/sh\nexec tcpserver -v -R -c 40 127.0.0.1 2525 qmail-smtpd 2>&1\n", "127.0.0.1:2525"),
    ("exec envdir ./env softlimit -m 3000000 /x/bin/tcpserver -vRc40 -u 7 -g 8 -x r.cdb 0 25 a b\n",
     "0:25 (every address)"),
    ("exec tcpserver -B 'hi there' \\\n  -l mail.example.com \\\n  ::1 209 qmail-qmtpd\n", "::1:209"),
    ("exec tcpserver -- 10.0.0.1 110 qmail-popup x checkpassword qmail-pop3d Maildir\n", "10.0.0.1:110"),
    ("exec tcpserver $HOST $PORT qmail-smtpd\n", "$HOST:$PORT"),
    ("# exec tcpserver 1.2.3.4 25 qmail-smtpd\nexec tcpserver 5.6.7.8 26 qmail-smtpd\n", "5.6.7.8:26"),
    ("#!/bin/sh\nexec qmail-start ./Maildir/ splogger qmail\n", None),
    ("# tcpserver 1.2.3.4 25\nexec sleep 1000\n", None),
    ("", None),
    ("exec tcpserver 'unbalanced 1.2.3.4 25 x\n", None),
])
def test_listen_address(script: str, where: str | None) -> None:
    assert status.listen_address(script.encode()) == where


@pytest.mark.parametrize("script", ["exec tcpserver -c\n", "exec tcpserver -v 127.0.0.1\n",
                                    "exec tcpserver -Z 1 2 x\n"])
def test_listen_address_unreadable(script: str) -> None:
    with pytest.raises(ValueError):
        status.listen_address(script.encode())


def test_hostile_files(in_home: QHome) -> None:
    """Oversized logs are read from their end only; a long line is cut; a binary run script is harmless."""
    home = in_home
    now = 2_000_000_000
    write_run(home.path / "service" / "smtpd", "")
    (home.path / "service" / "smtpd" / "run").write_bytes(bytes(range(256)) * 1000)
    d = home.path / "log" / "send"
    d.mkdir(parents=True)
    with open(d / "current", "wb") as f:
        f.write(b"@" + b"f" * 10_000_000 + b" status: local 9/9 remote 9/9 alert: unable\n")
        f.write(stamp(now) + b" alert: " + b"x" * 5000 + b"\n")
        f.write(stamp(now) + b" status: local 1/10 remote 0/20")  # no newline yet: multilog writes lines whole
    lines = status.collect(str(home.path), now).text().splitlines()
    assert b"concurrency send: local 1/10 remote 0/20" in lines
    errs = [x for x in lines if x.startswith(b"error ")]
    assert errs == [b"error send: " + local(now).encode() + b" alert: " + b"x" * (status.LINE_MAX - 37) + b"..."]
    assert b"service smtpd: supervise not running" in lines


def test_usage_and_missing_home(tmp_path: Path) -> None:
    res = expect(run([VENV_BIN / "qmail", "status", "--bogus"], env=env()), 100)
    assert res.stdout == b""
    expect(run([VENV_BIN / "qmail", "status", "--help"], env=env()), 0)
    res = expect(run([VENV_BIN / "qmail", "status", "--home", str(tmp_path / "none")], env=env()), 111)
    assert res.stdout == f"qmail status: no installation at {tmp_path / 'none'}\n".encode()


def test_unreadable_queue_is_trouble(home: QHome) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads every directory")
    (home.queue / "todo").chmod(0)
    try:
        lines = qmail_status(home, 111)
    finally:
        (home.queue / "todo").chmod(0o700)
    assert "queue: unable to read queue/todo: access denied" in lines
