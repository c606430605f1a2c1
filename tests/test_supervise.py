"""supervise and svscan, and daemontools 0.76 driving and reading ours (and ours theirs)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import QHome, Result, expect, make_home, run, world_dir
from pyqmail.svc import status
from test_tai64 import real

FAST = "0.05"  # our supervise's pause after a start (daemontools: 1 second)
RUN_SLEEP = "#!/bin/sh\nexec sleep 1000\n"


@pytest.fixture(scope="module")
def home() -> Iterator[QHome]:
    h = make_home()
    yield h
    shutil.rmtree(h.path.parent, ignore_errors=True)


class Procs:
    """Daemons a test started, each in its own session so that teardown can end it with its children."""

    def __init__(self, home: QHome) -> None:
        self.home = home
        self.started: list[subprocess.Popen[bytes]] = []
        self.base = world_dir()

    def env(self, **extra: str) -> dict[str, str]:
        env = {"PATH": f"{self.home.path / 'bin'}:/usr/bin:/bin", "PYQMAIL_SUPERVISE_PAUSE": FAST}
        env.update(extra)
        return env

    def start(self, argv: list[str | Path], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([os.fspath(a) for a in argv], env=self.env() if env is None else env,
                             cwd=cwd or self.base, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
        self.started.append(p)
        return p

    def supervise(self, service: Path, ours: bool = True, **env: str) -> subprocess.Popen[bytes]:
        prog = self.home.bin("supervise") if ours else real("supervise")
        p = self.start([prog, service], env=self.env(**env))
        until(lambda: svok(service), f"supervise running in {service}", p)
        return p

    def service(self, name: str, script: str = RUN_SLEEP) -> Path:
        s = self.base / name
        s.mkdir(parents=True)
        write_run(s, script)
        return s

    def close(self) -> None:
        for p in self.started:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.communicate(timeout=30)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def procs(home: QHome) -> Iterator[Procs]:
    p = Procs(home)
    yield p
    p.close()


def write_run(d: Path, script: str) -> None:
    (d / "run").write_text(script)
    (d / "run").chmod(0o755)


def until(pred: Callable[[], object], what: str, proc: subprocess.Popen[bytes] | None = None,
          timeout: float = 20) -> None:
    """Poll pred until true; fail naming what (with the daemon's stderr if it died)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: daemon exited {proc.returncode}: {proc.stderr.read() if proc.stderr else b''!r}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for: {what}")
        time.sleep(0.02)


def svok(service: Path) -> bool:
    return run([real("svok"), service]).returncode == 0


def state(service: Path) -> status.Status:
    return status.read(os.fspath(service))


def pid_now(service: Path) -> int:
    """Return the service's pid, 0 while no supervise answers (one may be exiting as we look)."""
    try:
        return state(service).pid
    except status.StatusError:
        return 0


def svstat_both(home: QHome, service: Path) -> bytes:
    """Return svstat's line for service, asserting ours and daemontools' print the same."""
    for _ in range(5):
        ours = expect(run([home.bin("svstat"), service]))
        theirs = expect(run([real("svstat"), service]))
        if ours.stdout == theirs.stdout:
            return ours.stdout
    assert ours.stdout == theirs.stdout, (ours.explain(), theirs.explain())
    return ours.stdout


def control(ours: bool, home: QHome, service: Path, opts: str) -> Result:
    prog = home.bin("svc") if ours else real("svc")
    res = expect(run([prog, opts, service]))
    assert res.stderr == b"", res.explain()
    return res


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


UP_RE = re.compile(rb"^(.*): up \(pid (\d+)\) \d+ seconds(.*)\n$")
DOWN_RE = re.compile(rb"^(.*): down \d+ seconds(.*)\n$")


# --- the status file format ---

def test_pack_is_daemontools_layout() -> None:
    data = status.pack(994720184 * 10**9 + 848605123, 0x01020304, True, "u")
    assert data == bytes.fromhex("400000003b4a39c2" "3294b13c" "04030201") + b"\x01u"
    assert status.pack(0, 0, True, "")[16:] == b"\0\0"  # paused only shows while up
    st = status.unpack(data, normally_up=True)
    assert (st.pid, st.stamp, st.paused, st.want, st.normally_up) == (0x01020304, 994720184, True, "u", True)
    with pytest.raises(ValueError):
        status.unpack(data[:17], True)


def test_describe_wording() -> None:
    up = status.Status(pid=7, stamp=100, nano=0, paused=True, want="d", normally_up=False)
    assert up.describe(105) == "up (pid 7) 5 seconds, normally down, paused, want down"
    down = status.Status(pid=0, stamp=100, nano=0, paused=True, want="u", normally_up=True)
    assert down.describe(99) == "down 0 seconds, normally up, want up"
    assert status.Status(0, 100, 0, False, "", False).describe(100) == "down 0 seconds"


# --- daemontools drives and reads our supervise ---

@pytest.mark.parametrize("ours_supervise", [True, False], ids=["our-supervise", "real-supervise"])
@pytest.mark.parametrize("ours_svc", [True, False], ids=["our-svc", "real-svc"])
def test_svc_and_svstat_against_either_supervise(home: QHome, procs: Procs, ours_supervise: bool,
                                                  ours_svc: bool) -> None:
    s = procs.service("s", "#!/bin/sh\ntrap 'echo hup >> hups' HUP\nwhile :; do sleep 1; done\n")
    sup = procs.supervise(s, ours=ours_supervise)
    until(lambda: state(s).pid, "service up", sup)
    pid = state(s).pid
    m = UP_RE.match(svstat_both(home, s))
    assert m and int(m.group(2)) == pid and m.group(3) == b""

    control(ours_svc, home, s, "-p")
    until(lambda: state(s).paused, "paused")
    until(lambda: proc_state(pid) == "T", "child stopped")
    assert UP_RE.match(svstat_both(home, s)).group(3) == b", paused"  # type: ignore[union-attr]
    control(ours_svc, home, s, "-c")
    until(lambda: not state(s).paused and proc_state(pid) != "T", "continued")

    control(ours_svc, home, s, "-h")
    until(lambda: (s / "hups").exists() and (s / "hups").read_text() == "hup\n", "HUP delivered")

    control(ours_svc, home, s, "-d")
    until(lambda: state(s).pid == 0, "service down")
    assert state(s).want == "d"
    assert DOWN_RE.match(svstat_both(home, s)).group(2) == b", normally up"  # type: ignore[union-attr]

    control(ours_svc, home, s, "-u")
    until(lambda: state(s).pid not in (0, pid), "service up again")
    pid = state(s).pid
    assert state(s).want == "u"

    # Killed: supervise starts it again.
    os.kill(pid, signal.SIGKILL)
    until(lambda: state(s).pid not in (0, pid), "restarted after kill")
    pid = state(s).pid

    # Once: up now, not restarted when it exits.
    control(ours_svc, home, s, "-o")
    until(lambda: state(s).want == "", "want nothing")
    control(ours_svc, home, s, "-t")
    until(lambda: state(s).pid == 0, "down after -o and TERM")
    assert DOWN_RE.match(svstat_both(home, s)).group(2) == b", normally up"  # type: ignore[union-attr]

    # -o on a down service starts it once.
    control(ours_svc, home, s, "-o")
    until(lambda: state(s).pid != 0, "started once")
    assert UP_RE.match(svstat_both(home, s)).group(3) == b""

    # Normally down, want down while up.
    (s / "down").write_bytes(b"")
    control(ours_svc, home, s, "-u")
    until(lambda: state(s).want == "u", "want up")
    assert UP_RE.match(svstat_both(home, s)).group(3) == b", normally down"  # type: ignore[union-attr]

    # -x alone waits for the service to go down; -d then ends supervise.
    control(ours_svc, home, s, "-x")
    assert sup.poll() is None
    control(ours_svc, home, s, "-d")
    assert sup.wait(timeout=30) == 0
    assert svstat_both(home, s) == s.as_posix().encode() + b": supervise not running\n"
    assert run([home.bin("svok"), s]).returncode == 100


@pytest.mark.parametrize("ours_supervise", [True, False], ids=["our-supervise", "real-supervise"])
def test_down_file_keeps_it_down(home: QHome, procs: Procs, ours_supervise: bool) -> None:
    s = procs.service("s")
    (s / "down").write_bytes(b"")
    sup = procs.supervise(s, ours=ours_supervise)
    until(lambda: (s / "supervise" / "status").exists(), "status written", sup)
    st = state(s)
    assert (st.pid, st.want, st.normally_up) == (0, "d", False)
    line = svstat_both(home, s)
    assert DOWN_RE.match(line).group(2) == b""  # type: ignore[union-attr]
    assert not (s / "supervise" / "status.new").exists()
    control(True, home, s, "-dx")
    assert sup.wait(timeout=30) == 0
    assert sup.stderr is not None and sup.stderr.read() == b""


def test_state_files_as_daemontools_makes_them(home: QHome, procs: Procs) -> None:
    ours, theirs = procs.service("ours"), procs.service("theirs")
    for s, is_ours in ((ours, True), (theirs, False)):
        procs.supervise(s, ours=is_ours)
        until(lambda: state(s).pid, "up")

    def shape(s: Path) -> list[tuple[str, int, int]]:
        return sorted((p.name, stat.S_IFMT(p.lstat().st_mode), stat.S_IMODE(p.lstat().st_mode))
                      for p in [s / "supervise", *(s / "supervise").iterdir()])

    assert shape(ours) == shape(theirs)
    a, b = [(s / "supervise" / "status").read_bytes() for s in (ours, theirs)]
    assert (len(a), a[:4], a[16:]) == (len(b), b[:4], b[16:])


@pytest.mark.parametrize("first_ours", [True, False], ids=["ours-first", "real-first"])
def test_one_supervise_per_service(home: QHome, procs: Procs, first_ours: bool) -> None:
    s = procs.service("s")
    procs.supervise(s, ours=first_ours)
    second = home.bin("supervise") if not first_ours else real("supervise")
    res = run([second, "s"], cwd=procs.base)
    assert (res.returncode, res.stdout, res.stderr) == (
        111, b"", b"supervise: fatal: unable to acquire s/supervise/lock: temporary failure\n"), res.explain()
    # And our own second supervise, whichever holds the lock.
    res = run([home.bin("supervise"), "s"], cwd=procs.base)
    assert res.returncode == 111 and res.stderr.endswith(b"temporary failure\n")


def test_restarts_pause_after_each_start(home: QHome, procs: Procs) -> None:
    s = procs.service("s", "#!/bin/sh\ndate +%s.%N >> starts\n")
    procs.supervise(s, PYQMAIL_SUPERVISE_PAUSE="0.2")
    until(lambda: (s / "starts").exists() and len((s / "starts").read_text().split()) >= 4, "four starts")
    times = [float(t) for t in (s / "starts").read_text().split()]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= 0.19, gaps


def test_run_that_cannot_start(home: QHome, procs: Procs) -> None:
    s = procs.base / "s"
    s.mkdir()
    sup = procs.start([home.bin("supervise"), "s"])
    until(lambda: svok(s), "supervise running", sup)
    control(True, home, s, "-dx")
    assert sup.wait(timeout=30) == 0
    _, err = sup.communicate(timeout=30)
    assert err.startswith(b"supervise: fatal: unable to start s/run: file does not exist\n"), err
    assert set(err.split(b"\n")) == {b"supervise: fatal: unable to start s/run: file does not exist", b""}


def test_run_sees_what_daemontools_gives_it(home: QHome, procs: Procs) -> None:
    script = ("#!/bin/sh\n{ echo \"$0\"; pwd; env | sort; grep -E '^Sig(Ign|Blk|Cgt)' /proc/self/status;"
              " ls /proc/self/fd | wc -l; } > seen.tmp; mv seen.tmp seen; exec sleep 1000\n")
    seen = []
    for name, ours in (("ours", True), ("theirs", False)):
        s = procs.service(name, script)
        procs.supervise(s, ours=ours, LANG="C", X="y")
        until(lambda: (s / "seen").exists(), "run wrote what it saw")
        seen.append((s / "seen").read_bytes().replace(os.fsencode(s), b"S"))
    # Our knob stays out of the service's environment; daemontools' passes it on.
    assert b"PYQMAIL_SUPERVISE_PAUSE" not in seen[0]
    assert seen[0] == b"".join(ln for ln in seen[1].splitlines(True) if not ln.startswith(b"PYQMAIL_"))


def test_usage_and_chdir_like_daemontools(home: QHome, tmp_path: Path) -> None:
    for prog in ("supervise", "svscan"):
        for args in ([], ["/nonexistent"], ["a", "b"]):
            if prog == "svscan" and not args:
                continue  # scans . forever
            if prog == "svscan" and args == ["a", "b"]:
                continue
            ours = run([home.bin(prog), *args], cwd=tmp_path)
            theirs = run([real(prog), *args], cwd=tmp_path)
            assert (ours.returncode, ours.stdout, ours.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "down").mkdir()
    (tmp_path / "s" / "supervise").write_bytes(b"")  # not a directory: no lock file possible
    ours = run([home.bin("supervise"), "s"], cwd=tmp_path)
    theirs = run([real("supervise"), "s"], cwd=tmp_path)
    assert (ours.returncode, ours.stderr) == (theirs.returncode, theirs.stderr) == (
        111, b"supervise: fatal: unable to acquire s/supervise/lock: not a directory\n")


# --- svscan ---

def test_svscan_pipes_service_to_log_and_restarts(home: QHome, procs: Procs) -> None:
    root = procs.base / "service"
    root.mkdir()
    a = root / "a"
    (a / "log").mkdir(parents=True)
    write_run(a, "#!/bin/sh\necho \"line $$\"\nexec sleep 1000\n")
    write_run(a / "log", "#!/bin/sh\nexec cat >> out\n")
    (root / ".hidden").mkdir()
    write_run(root / ".hidden", "#!/bin/sh\ntouch ran\nexec sleep 1000\n")
    (root / "plainfile").write_bytes(b"")
    scan = procs.start([home.bin("svscan"), root], env=procs.env(PYQMAIL_SVSCAN_RESCAN="0.2"))
    out = a / "log" / "out"

    def lines() -> list[str]:
        return out.read_text().splitlines() if out.exists() else []

    until(lambda: len(lines()) == 1, "first line logged", scan)
    until(lambda: svok(a) and svok(a / "log"), "both supervised")
    # Each supervise is a process of its own name: pkill svscan spares them, pgrep supervise finds them.
    kids = children(scan.pid)
    assert len(kids) == 2 and all(comm(k) == "supervise" for k in kids), [(k, comm(k)) for k in kids]
    first = state(a).pid
    assert lines() == [f"line {first}"]

    # The service dies: its next output goes down the same pipe.
    os.kill(first, signal.SIGKILL)
    until(lambda: len(lines()) == 2, "second line logged")
    second = state(a).pid
    assert lines() == [f"line {first}", f"line {second}"]

    # The logger dies: its replacement reads the same pipe.
    os.kill(state(a / "log").pid, signal.SIGKILL)
    until(lambda: state(a / "log").pid not in (0,), "log restarted")
    os.kill(second, signal.SIGKILL)
    until(lambda: len(lines()) == 3, "third line logged")

    # supervise told to exit: svscan starts another, which starts the service
    # (the old one, told -d, never would).
    third = state(a).pid
    expect(run([home.bin("svc"), "-dx", a]))
    # svok can still see the old supervise in its last moment: read the pid without failing.
    until(lambda: svok(a) and pid_now(a) not in (0, third), "supervise restarted by svscan", scan)
    until(lambda: len(lines()) == 4, "fourth line logged")

    # A new service is found on the next scan; dot-directories never.
    b = root / "b"
    b.mkdir()
    write_run(b, RUN_SLEEP)
    until(lambda: svok(b) and state(b).pid != 0, "new service started", scan)
    assert not (root / ".hidden" / "supervise").exists()
    assert not (root / ".hidden" / "ran").exists()
    assert svstat_both(home, b).startswith(os.fsencode(b) + b": up (pid ")


def test_svscan_alrm_scans_at_once(home: QHome, procs: Procs) -> None:
    root = procs.base / "service"
    first = root / "first"
    first.mkdir(parents=True)
    write_run(first, RUN_SLEEP)
    scan = procs.start([home.bin("svscan"), root], env=procs.env(PYQMAIL_SVSCAN_RESCAN="3600"))
    # The first scan has happened (so svscan waits for ALRM) once first is supervised.
    until(lambda: svok(first), "first scan", scan)
    c = root / "c"
    c.mkdir()
    write_run(c, RUN_SLEEP)
    scan.send_signal(signal.SIGALRM)
    until(lambda: svok(c) and state(c).pid != 0, "started after ALRM", scan)


def children(pid: int) -> list[int]:
    """Return the pids whose parent is pid."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(name))
    return out


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def test_svscan_runs_daemontools_supervise_found_on_path(home: QHome, procs: Procs) -> None:
    root = procs.base / "service"
    d = root / "d"
    (d / "log").mkdir(parents=True)
    write_run(d, "#!/bin/sh\necho hello\nexec sleep 1000\n")
    write_run(d / "log", "#!/bin/sh\nexec cat >> out\n")
    env = procs.env(PYQMAIL_SVSCAN_RESCAN="0.2")
    env["PATH"] = "/usr/bin:/bin"  # daemontools' supervise comes first
    scan = procs.start([home.bin("svscan"), root], env=env)
    until(lambda: (d / "log" / "out").exists() and (d / "log" / "out").read_text() == "hello\n", "logged", scan)
    sup_pid = int(subprocess.run(["pgrep", "-f", "-s", str(scan.pid), "^supervise d$"], capture_output=True,
                                 text=True).stdout.split()[0])
    assert os.readlink(f"/proc/{sup_pid}/exe") == os.path.realpath(real("supervise"))


@pytest.mark.parametrize("ours", [True, False], ids=["ours", "daemontools"])
def test_svscan_warnings(home: QHome, procs: Procs, ours: bool) -> None:
    root = procs.base / ("ours" if ours else "theirs")
    (root / "a" / "log").mkdir(parents=True)
    (root / "dangling").symlink_to("nowhere")
    (root / "b").mkdir()
    prog = home.bin("svscan") if ours else real("svscan")
    # No supervise on $PATH: every start fails with daemontools' warning.
    scan = procs.start([prog, root], env={"PATH": "/nonexistent", "PYQMAIL_SVSCAN_RESCAN": "3600"})
    assert scan.stderr is not None
    got = b""
    while got.count(b"\n") < 4:
        chunk = os.read(scan.stderr.fileno(), 4096)
        assert chunk, got
        got += chunk
    assert sorted(got.splitlines()) == sorted([
        b"svscan: warning: unable to start supervise a: file does not exist",
        b"svscan: warning: unable to start supervise a/log: file does not exist",
        b"svscan: warning: unable to start supervise b: file does not exist",
        b"svscan: warning: unable to stat dangling: file does not exist",
    ])
