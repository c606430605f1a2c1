"""The book's /service layout under our svscan is recognised by `qmail status` and `qmail doctor`, and
`qmail up` refuses to start a second system; doctor's checks of what runs (socket, pid files, locks, maildrop)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import QHome, Result, make_home, run, world_dir
from pyqmail.svc import status as svstatus
from remotekit import DnsServer

ENV = {"PATH": "/usr/bin:/bin"}


def until(pred: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for: {what}")
        time.sleep(0.05)


def is_up(service: Path) -> bool:
    try:
        return svstatus.read(os.fspath(service)).pid != 0
    except svstatus.StatusError:
        return False


def write_run(d: Path, text: str) -> None:
    d.mkdir(parents=True)
    (d / "run").write_text(text)
    (d / "run").chmod(0o755)


class Book:
    """The book's layout: SERVICE/qmail-send and SERVICE/qmail-smtpd running HOME's programs, under our svscan."""

    def __init__(self, home: QHome) -> None:
        self.home = home
        self.service = world_dir() / "service"
        h, b = home.path, home.path / "bin"
        write_run(self.service / "qmail-send",
                  f"#!/bin/sh\nexec 2>&1\ncd {h} || exit 111\nexec {b}/qmail-start ./Maildir/\n")
        write_run(self.service / "qmail-send" / "log", f"#!/bin/sh\nexec {b}/multilog t ./main\n")
        write_run(self.service / "qmail-smtpd",
                  f"#!/bin/sh\nexec 2>&1\nexec {b}/tcpserver -v -R -l test.example.com -c 40 127.0.0.1 0 "
                  f"{b}/qmail-smtpd\n")
        self.scan: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.scan = subprocess.Popen([os.fspath(self.home.bin("svscan")), os.fspath(self.service)],
                                     env={"PATH": f"{self.home.path}/bin:/usr/bin:/bin",
                                          "PYQMAIL_SUPERVISE_PAUSE": "0.05"},
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        for name in ("qmail-send", "qmail-send/log", "qmail-smtpd"):
            until(lambda: is_up(self.service / name), f"{name} up")

    def stop(self) -> None:
        if self.scan is not None:
            self.scan.terminate()
            self.scan.wait(timeout=30)
        for d in ("qmail-send", "qmail-smtpd", "qmail-send/log"):
            run([self.home.bin("svc"), "-dx", self.service / d])
        for d in ("qmail-send", "qmail-smtpd", "qmail-send/log"):
            until(lambda: not _supervised(self.service / d), f"{d} stopped")
        shutil.rmtree(self.service.parent, ignore_errors=True)


def _supervised(d: Path) -> bool:
    try:
        svstatus.read(os.fspath(d))
    except svstatus.NotRunning:
        return False
    except svstatus.StatusError:
        return False
    return True


@pytest.fixture
def home() -> Iterator[QHome]:
    h = make_home()
    yield h
    shutil.rmtree(h.path.parent, ignore_errors=True)


@pytest.fixture
def book(home: QHome) -> Iterator[Book]:
    b = Book(home)
    try:
        yield b
    finally:
        b.stop()


def doctor(home: QHome) -> Result:
    with DnsServer({("test.example.com", "A"): ["203.0.113.1"]}) as dns:
        res = run([home.bin("qmail"), "doctor"], env={**ENV, **dns.env})
    assert res.returncode in (0, 1) and res.stderr == b"", res.explain()
    return res


def lines(res: Result) -> list[str]:
    return res.stdout.decode("latin-1").splitlines()


def test_book_layout_seen_by_status_doctor_and_up(home: QHome, book: Book) -> None:
    book.start()
    assert book.scan is not None
    svc = book.service
    res = run([home.bin("qmail"), "status"], env=ENV)
    out = lines(res)
    assert res.returncode == 0, res.explain()
    assert not any(x.startswith("nothing runs") for x in out), out
    assert f"supervised by svscan (pid {book.scan.pid}) in {svc}" in out, out
    for name in ("qmail-send", "qmail-send/log", "qmail-smtpd"):
        assert any(x.startswith(f"service {svc}/{name}: up (pid ") for x in out), out
    assert f"listening {svc}/qmail-smtpd: 127.0.0.1:0" in out, out

    out = lines(doctor(home))
    for name in ("qmail-send", "qmail-smtpd"):
        assert any(x.startswith(f"ok: service {svc}/{name}: up (pid ") and
                   x.endswith(f"(svscan (pid {book.scan.pid}) in {svc})") for x in out), out
    assert not [x for x in out if x.startswith("problem: ")], out

    t0 = time.monotonic()
    res = run([home.bin("qmail"), "up"], env=ENV, timeout=60)
    assert res.returncode == 111, res.explain()
    err = res.stderr.decode()
    assert err.startswith(f"qmail up: fatal: this home's services already run: svscan (pid {book.scan.pid}) in {svc}: "
                          f"{svc}/qmail-send, {svc}/qmail-smtpd"), err
    assert f"see: qmail status --home {home.path}" in err
    assert time.monotonic() - t0 < 20
    assert not (home.path / "service").exists()  # nothing was started or written
    assert not (home.path / "run" / "up.pid").exists()


def test_second_svscan_over_the_same_directory(home: QHome, book: Book) -> None:
    book.start()
    second = subprocess.Popen([os.fspath(home.bin("svscan")), os.fspath(book.service)],
                              env={"PATH": f"{home.path}/bin:/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert book.scan is not None
        until(lambda: Path(f"/proc/{second.pid}/cwd").resolve() == book.service, "second svscan in place")
        problems = [x for x in lines(doctor(home)) if x.startswith("problem: ")]
        assert problems == [f"problem: 2 svscan processes (pids {book.scan.pid}, {second.pid}) run over {book.service}: "
                            "each starts its own supervise, and the second of each pair cannot lock the service; "
                            f"fix: kill {second.pid}"], problems
    finally:
        second.terminate()
        second.wait(timeout=30)


def test_up_takes_a_lock_not_just_a_pid(home: QHome) -> None:
    pidfile = home.path / "run" / "up.pid"
    pidfile.parent.mkdir(exist_ok=True)
    pidfile.touch()
    # A lock held by another process: `qmail up` refuses, naming it.
    holder = subprocess.Popen(["/usr/bin/flock", "-x", os.fspath(pidfile), "/bin/sleep", "60"], start_new_session=True)
    try:
        until(lambda: _locked(pidfile), "flock holds up.pid")
        pidfile.write_text(f"{holder.pid}\n")
        res = run([home.bin("qmail"), "up"], env=ENV)
        assert (res.returncode, res.stderr.decode()) == (
            111, f"qmail up: fatal: already running in {home.path} (pid {holder.pid}); "
                 f"stop it with: qmail down --home {home.path}\n"), res.explain()
        assert "problem: run/up.pid" not in doctor(home).stdout.decode()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # flock and the sleep that inherited the lock
        holder.wait()
    # The same file unlocked, naming a live process (this test): stale, and `qmail down` does not signal it.
    pidfile.write_text(f"{os.getpid()}\n")
    res = run([home.bin("qmail"), "down"], env=ENV)
    assert (res.returncode, res.stderr) == (111, f"qmail down: nothing runs in {home.path}\n".encode())
    out = lines(doctor(home))
    assert (f"problem: run/up.pid is stale: no `qmail up` holds its lock; `qmail status` and `qmail down` may act "
            f"on the wrong process; fix: rm {pidfile}") in out, out


def _locked(path: Path) -> bool:
    from pyqmail.admin import supervision

    return supervision.lock_held(str(path)) is True


def test_doctor_stale_svscan_pid_dangling_socket_queued_lock_and_maildrop(home: QHome) -> None:
    run_dir = home.path / "run"
    run_dir.mkdir(exist_ok=True)
    dead = subprocess.Popen(["/bin/true"])
    dead.wait()
    (run_dir / "svscan.pid").write_text(f"{dead.pid}\n")
    sock_path = run_dir / "qmail-queue.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(os.fspath(sock_path))
    s.close()  # bound, never listening: connect gives ECONNREFUSED
    drop = home.path / "maildrop"
    drop.mkdir(exist_ok=True)
    for i in range(3):
        (drop / f"m{i}").write_bytes(b"x")
    (drop / "tpartial").write_bytes(b"x")
    out = [x for x in lines(doctor(home)) if x.startswith("problem: ")]
    q = home.path
    assert (f"problem: run/svscan.pid is stale: pid {dead.pid} does not exist; `qmail status` and `qmail down` may "
            f"act on the wrong process; fix: rm {q}/run/svscan.pid") in out, out
    assert any(x.startswith("problem: run/qmail-queue.sock is dangling: nothing listens on it (ECONNREFUSED)")
               for x in out), out
    assert any(x.startswith("problem: 3 messages wait in maildrop/, start qmail-queued: ") for x in out), out
    # A live process that is not svscan is not what run/svscan.pid claims.
    (run_dir / "svscan.pid").write_text(f"{os.getpid()}\n")
    # qmail-queued's lock held while its socket does not answer.
    lock = q / "queue" / "lock" / "queued"
    lock.write_text("4242 p\n")
    holder = subprocess.Popen(["/usr/bin/flock", "-x", os.fspath(lock), "/bin/sleep", "60"], start_new_session=True)
    try:
        until(lambda: _locked(lock), "flock holds queued")
        out = [x for x in lines(doctor(home)) if x.startswith("problem: ")]
        assert (f"problem: run/svscan.pid is stale: pid {os.getpid()} is not svscan; `qmail status` and `qmail down` "
                f"may act on the wrong process; fix: rm {q}/run/svscan.pid") in out, out
        assert (f"problem: qmail-queued (pid 4242) holds queue/lock/queued but run/qmail-queue.sock does not answer: "
                "it accepts nothing; fix: kill 4242   (supervise or qmail-start starts it again)") in out, out
        assert not any("wait in maildrop/" in x for x in out), out  # qmail-queued (the lock) is there
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # flock and the sleep that inherited the lock
        holder.wait()
    # A listening socket is fine.
    sock_path.unlink()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(os.fspath(sock_path))
    srv.listen(1)
    try:
        assert "ok: run/qmail-queue.sock: qmail-queued answers" in lines(doctor(home))
    finally:
        srv.close()


def test_loopback_me_on_a_loopback_system_is_fine(home: QHome) -> None:
    home.control("me", "localhost.localdomain\n")
    out = lines(doctor(home))
    assert "ok: control/me localhost.localdomain is a loopback name, and the system listens on loopback only" in out
    assert not [x for x in out if x.startswith("problem: ")], out
    # Listening on every address, the same name is a problem: nobody else can reach it.
    write_run(home.path / "service" / "smtpd",
              f"#!/bin/sh\nexec {home.path}/bin/tcpserver -v -R 0 25 {home.path}/bin/qmail-smtpd\n")
    out = lines(doctor(home))
    assert any(x.startswith("problem: control/me localhost.localdomain has no address in DNS") for x in out), out


def test_up_prints_where_postmaster_mail_goes(home: QHome) -> None:
    from pyqmail.admin import up
    from pyqmail import home as _home

    saved = _home.stub_home()
    _home.set_default(str(home.path))
    try:
        inst = _home.install()
        import pwd

        me = pwd.getpwuid(os.getuid())
        assert up.postmaster_goes(str(home.path), inst) == (
            f"forwarded to {me.pw_name} (you: {me.pw_dir}/Maildir/)")
        (home.path / "alias" / ".qmail-postmaster").write_text("./pm/\n|/bin/cat\n")
        assert up.postmaster_goes(str(home.path), inst) == f"delivered to {home.path}/alias/pm/, piped to /bin/cat"
        (home.path / "alias" / ".qmail-postmaster").write_text("")
        assert up.postmaster_goes(str(home.path), inst) == (
            f"the alias user's default delivery, {home.path}/alias/Maildir/")
    finally:
        _home.set_default(saved or "")
        _home.reset()



def test_systemd_unit_names_its_svscan_directory(home: QHome) -> None:
    from pyqmail.admin import supervision

    units = home.path / "boot" / "systemd"
    units.mkdir(parents=True)
    (units / "pyqmail-x.service").write_text(
        f"[Service]\nExecStart={home.path}/bin/svscan /srv/qmail-services\nRestart=always\n")
    (units / "other.timer").write_text("ExecStart=/bin/svscan /nope\n")
    assert supervision.unit_scan_dirs(str(home.path)) == ["/srv/qmail-services"]
