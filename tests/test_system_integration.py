"""System integration: svscanboot, readproctitle, fghack, pgrphack, setlock (against daemontools 0.76's),
the boot-time service directory and systemd unit (`qmail services`, `qmail systemd`), and
pyqmail's sendmail as the system's (`qmail sendmail-install`).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CI, QHome, Result, expect, make_home, run, world_dir
from test_tai64 import real

ENV = {"PATH": "/usr/bin:/bin"}
WAIT = 20.0


@pytest.fixture(scope="module")
def home() -> Iterator[QHome]:
    h = make_home()
    yield h
    shutil.rmtree(h.path.parent, ignore_errors=True)


def both(home: QHome, name: str, args: list[str], cwd: Path | None = None, input: bytes = b"") -> tuple[Result, Result]:
    """Run our name and daemontools' name with the same arguments."""
    return (run([home.bin(name), *args], env=ENV, cwd=cwd, input=input),
            run([real(name), *args], env=ENV, cwd=cwd, input=input))


def same(home: QHome, name: str, args: list[str], cwd: Path | None = None, input: bytes = b"") -> Result:
    """Assert ours and daemontools' behave identically (code, stdout, stderr); return ours."""
    ours, theirs = both(home, name, args, cwd, input)
    assert (ours.returncode, ours.stdout, ours.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr), \
        f"ours:\n{ours.explain()}\ndaemontools:\n{theirs.explain()}"
    return ours


def until(what: str, check: object, timeout: float = WAIT) -> None:
    """Poll check() until it is true; fail naming what after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    """Return the pids whose parent is pid."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2:].split()[1]) == pid:
                out.append(int(entry))
    return out


def cmdline(pid: int) -> bytes:
    """Return pid's command line; b"" if it has exited since it was listed."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        return b""


# --- setlock, pgrphack, fghack ------------------------------------------------

def test_setlock_same_as_daemontools(home: QHome, tmp_path: Path) -> None:
    for args in ([], ["-z"], ["file"], ["/nonexistent/dir/lock", "true"], ["-x", "/nonexistent/dir/lock", "true"],
                 [str(tmp_path / "lock"), "/nonexistent/program"], [str(tmp_path / "lock"), "sh", "-c", "exit 7"],
                 ["-nNxX", str(tmp_path / "lock"), "true"]):
        same(home, "setlock", args)
    assert (tmp_path / "lock").stat().st_mode & 0o777 == 0o600
    # The lock is the same lock: each refuses -n while the other holds it.
    lock = str(tmp_path / "lock2")
    for holder, prober in ((home.bin("setlock"), real("setlock")), (real("setlock"), home.bin("setlock"))):
        inner = f"{prober} -n {lock} true; echo $?; {prober} -nx {lock} true; echo $?"
        res = expect(run([holder, lock, "sh", "-c", inner], env=ENV))
        assert res.stdout == b"111\n0\n", res.explain()
        assert res.stderr == f"setlock: fatal: unable to lock {lock}: temporary failure\n".encode(), res.explain()
    # The child holds the lock on a descriptor it inherits (daemontools': the lowest free, 3).
    ours, theirs = both(home, "setlock", [lock, "sh", "-c", "readlink /proc/$$/fd/3"])
    assert ours.stdout == theirs.stdout == lock.encode() + b"\n"


def test_pgrphack_same_as_daemontools(home: QHome) -> None:
    for args in ([], ["/nonexistent/program"], ["sh", "-c", "exit 9"]):
        same(home, "pgrphack", args)
    # The child leads its own session and process group.
    res = expect(run([home.bin("pgrphack"), "sh", "-c", "cut -d' ' -f1,5,6 /proc/$$/stat"], env=ENV))
    pid, pgrp, sid = res.stdout.split()
    assert pid == pgrp == sid


def test_fghack_same_as_daemontools(home: QHome) -> None:
    for args in ([], ["/nonexistent/program"], ["sh", "-c", "exit 7"], ["sh", "-c", "echo out; echo err >&2"],
                 ["sh", "-c", "kill -9 $$"]):
        same(home, "fghack", args)
    # The child gets the pipe on the same descriptors as daemontools' gives it.
    ours, theirs = both(home, "fghack", ["ls", "-l", "/proc/self/fd"])

    def fds(res: Result) -> list[tuple[str, str]]:
        rows = [line.split() for line in res.stdout.decode().splitlines()[1:]]
        return [(r[-3], r[-1][:5]) for r in rows]

    assert fds(ours) == fds(theirs) and ("33", "pipe:") in fds(ours), (ours.explain(), theirs.explain())
    # A background process keeps fghack in the foreground until it exits.
    start = time.monotonic()
    res = run([home.bin("fghack"), "sh", "-c", "sleep 0.5 & exit 3"], env=ENV)
    assert res.returncode == 3 and time.monotonic() - start >= 0.5, res.explain()


# --- readproctitle and svscanboot ---------------------------------------------

def _title_of(argv: list[str], data: bytes) -> tuple[bytes, int]:
    """Start argv, feed it data, return its /proc cmdline once it has read it, and its exit code at EOF."""
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, env=ENV)
    assert p.stdin is not None
    try:
        p.stdin.write(data)
        p.stdin.flush()
        until("readproctitle to show its input", lambda: data[-5:] + b"\0" in cmdline(p.pid))
        title = cmdline(p.pid)
    finally:
        p.stdin.close()
        if p.wait(timeout=WAIT) is None:
            p.kill()
    return title, p.returncode


def test_readproctitle_as_daemontools(home: QHome) -> None:
    data = b"fatal error xyz\nwarning abc\n"
    args = ["io", "errors:", "." * 20]
    ours, code = _title_of([str(home.bin("readproctitle")), *args], data)
    theirs, their_code = _title_of([real("readproctitle"), *args], data)
    assert theirs == b"%s\0io\0errors:\0... xyz\nwarning abc\n\0" % real("readproctitle").encode()
    # Ours shows the program's argv; D has the room of the interpreter's
    # arguments too ("python3 -IS"): as daemontools' and more of the input.
    head = b"%s\0io\0errors:\0..." % bytes(home.bin("readproctitle"))
    assert ours.startswith(head) and ours.endswith(b" xyz\nwarning abc\n\0") and ours.count(b"\0") == 4
    # Input longer than the room: the latest bytes, three dots in front.
    long_data = b"".join(b"line %d\n" % i for i in range(100))
    ours, _ = _title_of([str(home.bin("readproctitle")), *args], long_data)
    shown = ours[len(head):-1]
    assert ours.startswith(head) and 17 <= len(shown) < 100 and long_data.endswith(shown)
    assert code == their_code == 0
    for args in ([], ["...."], ["x", "...."]):
        same(home, "readproctitle", args)
    ours, _ = _title_of([str(home.bin("readproctitle")), "abcde"], b"hello\n")
    assert ours.endswith(b"\0...") is False and b"\0..." in ours and ours.endswith(b"abcdehello\n\0")


def test_svscanboot_starts_svscan_and_its_services(home: QHome) -> None:
    base = world_dir()
    try:
        top = base / "service"
        (top / "hello" / "log").mkdir(parents=True)
        out = base / "hello.out"
        logged = base / "hello.log"
        run_file = top / "hello" / "run"
        run_file.write_text(f"#!/bin/sh\necho started > {out}\necho to the log\nexec sleep 1000\n")
        run_file.chmod(0o755)
        log_run = top / "hello" / "log" / "run"
        log_run.write_text(f"#!/bin/sh\nexec cat > {logged}\n")
        log_run.chmod(0o755)
        # A service that cannot start: supervise's complaint reaches readproctitle.
        (top / "broken").mkdir()
        (top / "broken" / "run").write_text("#!/bin/sh\n")
        boot = subprocess.Popen([home.bin("svscanboot"), str(top)], env=ENV, start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            until("the service to run", lambda: out.exists() and logged.exists()
                  and logged.read_text() == "to the log\n")
            names = {pid: cmdline(pid) for pid in children(boot.pid)}
            # A stub shows its argv as setproctitle writes it: words apart by a space or a NUL.
            svscan = next(pid for pid, c in names.items() if re.search(rb"/svscan[ \0]", c))
            title = next(pid for pid, c in names.items() if b"readproctitle\0service\0errors:\0" in c)
            assert os.fsencode(top) in names[svscan]
            until("readproctitle to show supervise's complaint", lambda: b"unable to start" in cmdline(title))
            assert cmdline(title).endswith(b"\0")
            # svstat sees both services supervised.
            res = expect(run([home.bin("svstat"), str(top / "hello")], env=ENV))
            assert b": up (pid " in res.stdout, res.explain()
        finally:
            # Stop as an administrator would: svscan first, then every service and log.
            for pid in children(boot.pid):
                if re.search(rb"/svscan[ \0]", cmdline(pid)):
                    os.kill(pid, signal.SIGTERM)
            until("svscan to exit", lambda: not any(re.search(rb"/svscan[ \0]", cmdline(p)) for p in children(boot.pid)))
            run([home.bin("svc"), "-dx", str(top / "hello"), str(top / "broken"), str(top / "hello" / "log")], env=ENV)
            try:
                assert boot.wait(timeout=WAIT) == 0
            finally:
                if boot.poll() is None:
                    os.killpg(boot.pid, signal.SIGKILL)
                    boot.wait()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- the boot-time service directory and the systemd unit ---------------------

NO_PORTS = ["--smtp-port", "0", "--pop3-port", "0", "--qmtp-port", "0", "--smtps-port", "0", "--pop3s-port", "0"]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if CI:
            pytest.fail(f"{name} missing: .ci/run installs its Debian package")
        pytest.skip(f"{name} not installed")
    return path


def test_unit_names_do_not_collide() -> None:
    from pyqmail.admin import systemd

    assert systemd.unit_name("/var/qmail") == systemd.unit_name("/var/qmail/") == "pyqmail.service"
    escape = _tool("systemd-escape")
    for home in ("/var/qmail2", "/srv/mail/qmail-2", "/opt/.q/x_y.z", "/home/\u00e9l\u00e8ve/q"):
        want = subprocess.run([escape, "--path", home], capture_output=True, check=True).stdout.decode().strip()
        assert systemd.unit_name(home) == f"pyqmail-{want}.service"
    assert len({systemd.unit_name(h) for h in ("/var/qmail", "/var/qmail2", "/var-qmail", "/var/qmail-2")}) == 4


def _service_lines(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, eq, value = line.partition("=")
        if eq and not line.startswith("#"):
            out.setdefault(key, []).append(value)
    return out


def test_systemd_unit_verifies_and_its_commands_start_and_stop_svscan(home: QHome, tmp_path: Path) -> None:
    import shlex

    units = tmp_path / "units"
    res = expect(run([home.bin("qmail"), "systemd", "--home", home.path, *NO_PORTS, "--install",
                      "--unit-dir", units], env=ENV))
    name = "pyqmail-" + subprocess.run([_tool("systemd-escape"), "--path", str(home.path)], capture_output=True,
                                       check=True).stdout.decode().strip() + ".service"
    written = home.path / "boot" / "systemd" / name
    assert (units / name).read_text() == written.read_text(), res.explain()
    assert (home.path / "service" / "send" / "run").exists() and (home.path / "service" / "send" / "log" / "run").exists()
    # systemd-analyze verify: syntax, and every command's path exists.
    verify = [_tool("systemd-analyze"), "verify", "--man=no"]
    check = subprocess.run([*verify, str(units / name)], capture_output=True, env=ENV, timeout=120)
    assert check.returncode == 0 and name.encode() not in check.stderr, check
    broken = tmp_path / "broken" / name
    broken.parent.mkdir()
    broken.write_text(written.read_text().replace(f"ExecStart={home.path}/bin/svscan", "ExecStart=/nonexistent/svscan"))
    assert subprocess.run([*verify, str(broken)], capture_output=True, env=ENV, timeout=120).returncode != 0

    # Run the unit's own commands as systemd would: ExecStart, ExecStartPost with $MAINPID, then ExecStop.
    unit = _service_lines(written.read_text())
    env = dict(ENV, **dict([unit["Environment"][0].split("=", 1)]))
    svscan = subprocess.Popen(shlex.split(unit["ExecStart"][0]), env=env, start_new_session=True,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        env_main = dict(env, MAINPID=str(svscan.pid))
        expect(run(shlex.split(unit["ExecStartPost"][0]), env=env_main))
        assert (home.path / "run" / "svscan.pid").read_text().strip() == str(svscan.pid)
        send = home.path / "service" / "send"
        until("qmail-send's service to be up",
              lambda: b": up (pid " in run([home.bin("svstat"), send, send / "log"], env=ENV).stdout.split(b"\n")[0]
              and run([home.bin("svok"), send / "log"], env=ENV).returncode == 0)
        # `qmail up` sees the unit's svscan as a running system, not as one a killed
        # `qmail up` left behind: it refuses and leaves it running.
        refused = run([home.bin("qmail"), "up", "--home", home.path, *NO_PORTS], env=ENV, timeout=120)
        assert refused.returncode == 111 and f"systemd unit {name} (svscan pid {svscan.pid}) ".encode() in refused.stderr, refused
        assert svscan.poll() is None
        stop = unit["ExecStop"][0]
        assert stop.startswith("-")
        expect(run(shlex.split(stop[1:]), env=env_main, timeout=300))
        assert svscan.wait(timeout=WAIT) is not None
        for d in (send, send / "log"):
            assert run([home.bin("svok"), d], env=ENV).returncode != 0, f"{d} still supervised"
        expect(run(shlex.split(unit["ExecStopPost"][0]), env=env_main))
        assert not (home.path / "run" / "svscan.pid").exists()
        assert not (home.path / "run" / "svscan.unit").exists()
    finally:
        if svscan.poll() is None:
            os.killpg(svscan.pid, signal.SIGKILL)
            svscan.wait()
        run([home.bin("svc"), "-dx", home.path / "service" / "send", home.path / "service" / "send" / "log"], env=ENV)
    res = expect(run([home.bin("qmail"), "systemd", "--home", home.path, "--uninstall", "--unit-dir", units], env=ENV))
    assert not (units / name).exists() and written.exists()


def test_unit_refuses_a_home_it_cannot_name(tmp_path: Path) -> None:
    from pyqmail import home as _home
    from pyqmail.admin import systemd

    with pytest.raises(systemd.SystemdError, match="without blanks"):
        systemd.unit_text("/srv/my qmail", _home.Install(False, 23, {}, {}))


# --- sendmail as the system's --------------------------------------------------

def test_sendmail_install_through_alternatives_and_symlinks(home: QHome, tmp_path: Path) -> None:
    ua = _tool("update-alternatives")
    (tmp_path / "alt").mkdir()
    (tmp_path / "adm").mkdir()
    sbin = tmp_path / "usr" / "sbin" / "sendmail"
    lib = tmp_path / "usr" / "lib" / "sendmail"
    sbin.parent.mkdir(parents=True)
    lib.parent.mkdir(parents=True)
    sbin.write_text("another MTA's sendmail\n")
    ours = home.bin("sendmail")
    where = ["--home", str(home.path), "--sbin", str(sbin), "--lib", str(lib)]
    alt = ["--altdir", str(tmp_path / "alt"), "--admindir", str(tmp_path / "adm")]
    qmail = [str(home.bin("qmail")), "sendmail-install"]

    res = run([*qmail, *where, *alt], env=ENV)
    assert res.returncode == 100 and b"not replacing" in res.stderr, res.explain()
    assert sbin.read_text() == "another MTA's sendmail\n" and not lib.exists()

    expect(run([*qmail, *where, *alt, "--force"], env=ENV))
    assert sbin.resolve() == lib.resolve() == ours.resolve()
    assert os.readlink(sbin) == str(tmp_path / "alt" / "sendmail")  # through the alternatives
    query = subprocess.run([ua, *alt, "--query", "sendmail"], capture_output=True, check=True).stdout.decode()
    assert f"Value: {ours}" in query and f"Link: {sbin}" in query
    # The linked sendmail is pyqmail's: -bp lists the queue through qmail-qread.
    expect(run([sbin, "-bp"], env=ENV))
    # Installing again is harmless; then undo: the other MTA's file comes back.
    expect(run([*qmail, *where, *alt], env=ENV))
    expect(run([*qmail, *where, *alt, "--remove"], env=ENV))
    assert sbin.read_text() == "another MTA's sendmail\n" and not os.path.lexists(lib)
    assert not os.path.lexists(str(sbin) + ".pyqmail-saved")

    # Without an alternatives system: plain symlinks, same refusals.
    res = run([*qmail, *where, "--no-alternatives"], env=ENV)
    assert res.returncode == 100, res.explain()
    sbin.unlink()
    expect(run([*qmail, *where, "--no-alternatives"], env=ENV))
    assert os.readlink(sbin) == os.readlink(lib) == str(ours)
    expect(run([*qmail, *where, "--no-alternatives"], env=ENV))  # our own links are replaced
    expect(run([*qmail, *where, "--no-alternatives", "--remove"], env=ENV))
    assert not os.path.lexists(sbin) and not os.path.lexists(lib)
